"""Fidelity, FLOPs and CPU time of one vision compressor on a plain ViT encoder against the unmodified encoder.

Fidelity is computed on the encoder's normal output, i.e. with the full patch grid restored by each method's own
rule (IPCV: Neighbor-Guided Reconstruction; merging methods: copy of the merge destination; pruning methods: copy of
the nearest kept patch), after the model's final layer norm:

* ``patch_cos``: mean over all patches of the cosine to the unmodified model's final patch feature;
* ``restored_cos``: the same over the patches that did not survive as themselves (pruned or merged away);
* ``patch_cos_nearest`` / ``restored_cos_nearest``: the same when every missing patch copies its nearest kept patch
  on the grid (the alternative rule; for IPCV: instead of NGR, from the same run's kept tokens);
* ``cls_cos``: cosine of the pooled embedding (``pooler_output``, DINOv2's CLS after the final norm);
* ``gap_cos``: cosine of the mean patch feature (global average pooling).

FLOPs are analytic (:func:`tokcomp.metrics.flops.vision_block`) from the token counts every block actually ran on
(queries, keys/values, MLP tokens), plus the patch embedding; restoration / matching / kNN are not counted (the CPU
time includes them).

Time is the process CPU time (``time.process_time``) of one forward of the whole photo batch, the minimum over the
``repeats`` forwards, the first of which gives the fidelity (min, not mean: on a shared machine other jobs only ever add time); wall-clock
times are recorded beside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import tokcomp
from tokcomp.adapters.vit import find_parts, restore_full_grid
from tokcomp.metrics.flops import VisionDims, linear, vision_block


@dataclass
class Reference:
    """The unmodified model's outputs on the photo batch."""

    last: Tensor            # [B, 1 + hw, C] last_hidden_state (after the final norm)
    pooled: Tensor          # [B, C]
    flops: int
    blocks: list[dict]


def dims_of(model) -> VisionDims:
    cfg = model.config
    return VisionDims(width=cfg.hidden_size, heads=cfg.num_attention_heads,
                      mlp=int(cfg.hidden_size * getattr(cfg, "mlp_ratio", 4)), mlp_mats=2)


def flops_of(model, blocks: list[dict], n_images: int, n_patches: int) -> int:
    """Analytic FLOPs of one forward from per-block counts (see :class:`tokcomp.metrics.flops.VisionDims`)."""
    d = dims_of(model)
    ps = model.config.patch_size
    f = linear(n_images * n_patches, 3 * ps * ps, d.width)                     # patch embedding
    for blk in blocks:
        f += vision_block(d, blk["q"], blk["kv"], blk["mlp"])
    return f


def plain_blocks(n_images: int, n_tokens: int, depth: int) -> list[dict]:
    """Per-block counts of the unmodified encoder."""
    q = [n_tokens] * n_images
    return [{"q": q, "kv": q, "mlp": n_images * n_tokens} for _ in range(depth)]


@torch.no_grad()
def reference(model, x: Tensor) -> Reference:
    out = model(pixel_values=x)
    B, n1, _ = out.last_hidden_state.shape
    blocks = plain_blocks(B, n1, len(find_parts(model).layers))
    return Reference(out.last_hidden_state, out.pooler_output, flops_of(model, blocks, B, n1 - 1), blocks)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def status_maps(adapter, granularity: str, n_images: int, n1: int, n_prefix: int) -> tuple[Tensor, Tensor]:
    """Per image and patch: ``status`` (0 kept, 1 merged into another token, 2 pruned) and ``owner`` (index of the
    patch whose token it is represented by, -1 if pruned). Both LongTensor[B, hw]."""
    hw = n1 - n_prefix
    org = torch.arange(n_images * n1).view(n_images, n1)[:, n_prefix:]          # [B, hw] flat origins of patches
    status = torch.full((n_images, hw), 2, dtype=torch.long)
    owner = torch.full((n_images, hw), -1, dtype=torch.long)
    kept_set = adapter.last_kept if granularity == "patch" else adapter.last_tokens
    present = torch.zeros(n_images * n1, dtype=torch.bool)
    present[kept_set.origin.cpu()] = True
    status[present[org]] = 0
    owner[present[org]] = org[present[org]]
    src = adapter.last_sources
    if granularity != "patch" and src is not None:
        s = src.cpu()[org]
        merged = (~present[org]) & (s >= 0)
        status[merged] = 1
        owner[merged] = s[merged]
    base = (torch.arange(n_images) * n1 + n_prefix)[:, None]
    owner = torch.where(owner >= 0, owner - base, -1)
    return status, owner


@torch.no_grad()
def evaluate(model, x: Tensor, spec: str, ref: Reference, repeats: int = 2) -> dict:
    """Run ``spec`` on the batch ``x``: ``repeats`` timed forwards, the first also gives the fidelity.

    Returns a dict with per-photo fidelity lists, their means, achieved counts, FLOPs, times and status maps."""
    parts = find_parts(model)
    P = parts.n_prefix
    with tokcomp.compress(model, vision=spec) as s:
        c0, w0 = time.process_time(), time.perf_counter()
        out = model(pixel_values=x)                    # the fidelity forward, timed too
        times, walls = [time.process_time() - c0], [time.perf_counter() - w0]
        ad = s.adapter
        strat = s.vision
        tokens_final = ad.last_tokens
        kept_blocks = ad.last_blocks
        status, owner = status_maps(ad, strat.granularity, x.shape[0], ref.last.shape[1], P)
        # the alternative rule: nearest kept patch on the grid, from the set the last block ran on
        near = restore_full_grid(ad.last_kept if strat.granularity == "patch" else tokens_final, ad.last_layout,
                                 "nearest")
        for _ in range(repeats - 1):
            c0, w0 = time.process_time(), time.perf_counter()
            model(pixel_values=x)
            times.append(time.process_time() - c0)
            walls.append(time.perf_counter() - w0)
    B, n1, C = ref.last.shape
    near = model.layernorm(near.view(B, n1, C)) if hasattr(model, "layernorm") else near.view(B, n1, C)
    pc = _cos(out.last_hidden_state[:, P:], ref.last[:, P:])                      # [B, hw]
    pn = _cos(near[:, P:], ref.last[:, P:])
    restored = status > 0
    per = {
        "patch_cos": pc.mean(1).tolist(),
        "restored_cos": [float(pc[b][restored[b]].mean()) if bool(restored[b].any()) else 1.0 for b in range(B)],
        "patch_cos_nearest": pn.mean(1).tolist(),
        "restored_cos_nearest": [float(pn[b][restored[b]].mean()) if bool(restored[b].any()) else 1.0
                                 for b in range(B)],
        "cls_cos": _cos(out.pooler_output, ref.pooled).tolist(),
        "gap_cos": _cos(out.last_hidden_state[:, P:].mean(1), ref.last[:, P:].mean(1)).tolist(),
    }
    hw = n1 - P
    flops = flops_of(model, kept_blocks, B, hw)
    n_after = [sum(b["q"]) - B * P for b in kept_blocks]                           # patch tokens entering each block
    kept = int((status == 0).sum()) / (B * hw)
    return {
        "spec": spec, "granularity": strat.granularity,
        "per_photo": per, "mean": {k: sum(v) / len(v) for k, v in per.items()},
        "achieved_keep": kept, "mean_tokens": sum(n_after) / (len(n_after) * B * hw),
        "flops": flops, "rel_flops": flops / ref.flops, "times": times, "time": min(times), "walls": walls,
        "wall": min(walls),
        "status": status, "owner": owner,
    }


@torch.no_grad()
def time_plain(model, x: Tensor, repeats: int = 2) -> tuple[list[float], list[float]]:
    """Process CPU seconds and wall seconds of ``repeats`` unmodified forwards of the batch."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        model(pixel_values=x)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return cpu, wall
