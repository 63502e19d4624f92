"""The per-session engine of the plain-ViT adapter: hooks that drive a ViTCompressor through the encoder's own loop.

Hooks (all through the adapter's ``Surgery``; state lives on the engine, never on modules):

* pre-hook on the tower (the module that receives ``pixel_values``): refuses what a changing token set cannot serve
  (``bool_masked_pos``, ``attention_mask``, per-layer ``hidden_states`` / ``attentions``) and resets the call state;
* pre-hook on the embeddings: reads the pixel size, hence the ``h x w`` patch grid;
* pre-hook on every layer: at layer 0 builds the layout and the full token set and calls ``start``; then substitutes
  the current token set. When every image has the same count ``K`` and the strategy asks for no
  :class:`~tokcomp.tokens.BlockVariant`, the native layer runs on ``[B, K, C]``; otherwise the block runs here from
  its submodules (per-image segment attention, extra key/values, MLP subset, proportional attention, ``mid``) and
  the native layer gets a ``[1, 1, C]`` dummy, so its call costs next to nothing;
* forward hook on every layer: ``after_block``; after the last layer ``finish``, and the output is the full
  ``[B, P + h*w, C]`` grid again (restored by the strategy for ``patch`` granularity, by
  :func:`~adapters._vit_restore.restore_full_grid` for ``unit``), so the final norm, pooler and heads work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from tokcomp.errors import AdapterError
from tokcomp.tokens import BlockVariant, VisionLayout, VisionTokens

from . import _hf as hf
from ._tower import HookedTower
from ._vision import BlockOps, check_prefix, to_grid
from ._vit_restore import (RULES, gradient_destinations, grid_layout, grid_tokens, initial_sources, restore_full_grid,
                           update_sources)


# ------------------------------------------------------------------------------------------------------
# one block as parts
# ------------------------------------------------------------------------------------------------------
def block_ops(layer, kind: str, impl: str) -> BlockOps:
    """The parts of one pre-norm encoder layer for :func:`adapters._vision.run_block_variant`.

    ``kind``: ``"dinov2"`` (norm1, attention.{q,k,v,o}_proj, layer_scale1/2, drop_path), ``"vit"``
    (layernorm_before/after, attention.{q,k,v,o}_proj, dropout) or ``"clip"`` (CLIP / SigLIP: layer_norm1/2,
    self_attn.{q,k,v,out}_proj). Same arithmetic as the layer's own forward; attention runs through the model's
    backend (``impl``) once per image, or as one packed varlen call for flash-attention.
    """
    if kind == "dinov2":
        att, norm1, norm2 = layer.attention, layer.norm1, layer.norm2
        out_proj, scaling, H = att.o_proj, att.scaling, att.num_attention_heads

        def post_attn(o):
            return layer.drop_path(layer.layer_scale1(o))

        def mlp(h):
            return layer.drop_path(layer.layer_scale2(layer.mlp(h)))
    elif kind == "vit":
        att, norm1, norm2 = layer.attention, layer.layernorm_before, layer.layernorm_after
        out_proj, scaling, H = att.o_proj, att.scaling, att.num_attention_heads

        def post_attn(o):
            return layer.dropout(o)

        def mlp(h):
            return layer.dropout(layer.mlp(h))
    elif kind == "clip":
        att, norm1, norm2 = layer.self_attn, layer.layer_norm1, layer.layer_norm2
        out_proj, scaling, H = att.out_proj, att.scale, att.num_heads

        def post_attn(o):
            return o

        def mlp(h):
            return layer.mlp(h)
    else:  # pragma: no cover - guarded by the adapter
        raise AdapterError(f"unknown plain-ViT layer kind {kind!r}")
    d = att.head_dim
    fn = hf.attention_kernel(att, impl)

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return att.q_proj(h).view(-1, H, d), att.k_proj(h).view(-1, H, d), att.v_proj(h).view(-1, H, d)

    def kv(h: Tensor) -> tuple[Tensor, Tensor]:
        return att.k_proj(h).view(-1, H, d), att.v_proj(h).view(-1, H, d)

    def attn_out(o: Tensor) -> Tensor:
        return post_attn(out_proj(o))

    def attend(q, k, v, mask):                          # [1, H, n, d] x [1, H, m, d] -> [1, n, H, d]
        return fn(att, q, k, v, mask, dropout=0.0, scaling=scaling, is_causal=False)[0]

    def attend_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        return fn(att, q, k, v, None, dropout=0.0, scaling=scaling, is_causal=False, cu_seq_lens_q=cu_q,
                  cu_seq_lens_k=cu_k, max_length_q=max_q, max_length_k=max_k)[0]

    flash = hf.is_flash(impl)
    return BlockOps(norm1=norm1, qkv=qkv, attn_out=attn_out, norm2=norm2, mlp=mlp, attend=attend, kv=kv,
                    rotary=None, attend_varlen=attend_varlen if flash else None)


# ------------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """Where a plain-ViT encoder keeps its pieces (found by the adapter)."""

    tower: Any                                        # receives pixel_values
    embeddings: Any
    layers: list
    patch_size: tuple[int, int]
    n_prefix: int                                     # CLS + register tokens before the patches
    kind: str                                         # block layout, see block_ops
    config: Any


class ViTEngine:
    """Drives a ViTCompressor through a plain ViT encoder (also its :class:`~adapters._tower.TowerIO`); one per
    session. The block loop is the shared :class:`~adapters._tower.HookedTower`.

    Args:
        adapter: the adapter (its ``session.report`` gets the records unless ``on_done`` is given).
        strategy: the ViTCompressor.
        parts: the encoder's pieces.
        blocks: the layers to drive (default: all; LLaVA: up to its feature layer).
        rule: how the output grid is restored after ``finish`` for unit strategies: ``"sources"`` (merged patches
            copy their merge destination, pruned ones the nearest present token), ``"nearest"``, or ``"zeros"``
            (zero rows at dropped units: a VLM then drops their features).
        on_done: ``on_done(call, kept)`` receives each finished call (its record; ``kept`` BoolTensor[U] units).

    After every call: :attr:`last_tokens` (the reduced set ``finish`` returned, before restoration),
    :attr:`last_kept` (the token set the last block ran on), :attr:`last_sources` (LongTensor[N], see
    :func:`~adapters._vit_restore.update_sources`; None unless tracked), :attr:`last_layout` and
    :attr:`last_blocks` (per block: query tokens ``q`` and key/value tokens ``kv`` per image, tokens whose MLP ran
    ``mlp``; what an analytic FLOPs count needs).
    """

    def __init__(self, adapter, strategy, parts: Parts, family: str = "vit", blocks=None, rule: str = "sources",
                 on_done: Callable | None = None):
        self.adapter, self.strategy, self.parts, self.family = adapter, strategy, parts, family
        self.rule, self.on_done = rule, on_done
        self.driver = HookedTower(parts.layers if blocks is None else blocks, self, strategy, family, step=self._step)
        self.grid: tuple[int, int] | None = None
        self.shape: tuple[int, int] = (0, 0)          # (B, P + h*w) of the call in flight
        self.sources: Tensor | None = None
        self._per_image: tuple | None = None
        self.last_tokens: VisionTokens | None = None
        self.last_kept: VisionTokens | None = None
        self.last_sources: Tensor | None = None
        self.last_layout: VisionLayout | None = None
        self.last_blocks: list[dict] = []

    @property
    def tracks(self) -> bool:
        """Merge sources are tracked only where the restoration uses them (unit granularity, rule "sources")."""
        return self.strategy.granularity != "patch" and self.rule == "sources"

    def attach(self, surgery) -> None:
        p = self.parts
        surgery.pre_hook(p.tower, self._tower_pre)
        surgery.pre_hook(p.embeddings, self._embeddings_pre)
        self.driver.attach(surgery)

    def _impl(self) -> str:
        return hf.attn_impl(self.parts.config) or "eager"

    # -- hooks ------------------------------------------------------------------------------------------
    def _tower_pre(self, mod, args, kw):
        if kw.get("bool_masked_pos") is not None:
            raise AdapterError("ViT adapter: bool_masked_pos (masked image modelling) is not supported inside a "
                               "compression session; call the model outside the session")
        if kw.get("attention_mask") is not None:
            raise AdapterError("ViT adapter: an attention_mask cannot follow a changing token set; call the "
                               "encoder without attention_mask inside a compression session")
        if self.rule != "zeros" and (kw.get("output_hidden_states") or kw.get("output_attentions")):
            raise AdapterError("ViT adapter: per-layer hidden_states / attentions are not available while a vision "
                               "compressor changes the token set; call the model outside the session for them")
        self.grid, self.sources, self._per_image = None, None, None
        return None

    def _embeddings_pre(self, mod, args, kw):
        px = args[0] if args else kw.get("pixel_values")
        ph, pw = self.parts.patch_size
        self.grid = (int(px.shape[-2]) // ph, int(px.shape[-1]) // pw)
        return None

    # -- TowerIO --------------------------------------------------------------------------------------------
    def begin(self, args, kw):
        p = self.parts
        if self.grid is None:
            raise AdapterError("ViT adapter: the embeddings did not run before the first layer; call the model "
                               "(pixel_values -> outputs) as a whole inside a compression session")
        hidden = args[0] if args else kw["hidden_states"]
        B, n1, _ = hidden.shape
        h, w = self.grid
        if n1 != p.n_prefix + h * w:
            raise AdapterError(f"ViT adapter: the first layer got {n1} tokens per image; expected {p.n_prefix} prefix "
                               f"+ {h}x{w} patches from the pixel size")
        layout = grid_layout(B, h, w, p.n_prefix)
        self.shape = (B, n1)
        self.sources = initial_sources(layout.n_tokens, hidden.device) if self.tracks else None
        return layout, grid_tokens(hidden, h, w, p.n_prefix)

    def segments(self, i, tokens):
        return tokens.segment

    def native(self, i, tokens, q_seg, args, kw):
        B = self.shape[0]
        memo = self._per_image
        if memo is None or memo[0] is not tokens.segment:              # one host sync per token-set change
            counts = torch.bincount(tokens.segment, minlength=B)
            memo = self._per_image = (tokens.segment, int(counts[0]) if bool((counts == counts[0]).all()) else 0)
        if not memo[1]:
            return None
        return self._feed(tokens.hidden.reshape(B, memo[1], tokens.hidden.shape[-1]), args, kw)

    def dummy(self, i, tokens, args, kw):
        return self._feed(tokens.hidden[:1][None], args, kw)          # [1, 1, C]: the native call costs ~0

    @staticmethod
    def _feed(new: Tensor, args, kw):
        if args:
            return (new,) + tuple(args[1:]), kw
        return args, {**kw, "hidden_states": new}

    def read(self, out, tokens):
        return out.reshape(-1, out.shape[-1])

    def ops(self, i, block):
        return block_ops(block, self.parts.kind, self._impl())

    def adjust(self, variant: BlockVariant) -> BlockVariant:
        """``variant`` with its ``mid`` callback wrapped so merges made between attention and MLP are tracked."""
        if variant.mid is None or not self.tracks:
            return variant
        inner: Callable = variant.mid

        def mid(tokens: VisionTokens, keys: Tensor) -> VisionTokens:
            return self._step(lambda t: inner(t, keys), tokens, "in a block's mid step")
        return replace(variant, mid=mid)

    def after_last(self, driver, out):
        run = driver.call.run
        before = run.tokens
        done = driver.finish()
        call = driver.end()
        layout = run.layout
        B, n1 = self.shape
        kept = None
        if self.strategy.granularity == "patch" or not run.changed:
            full = done.tokens.hidden
        elif self.rule == "zeros":
            full, kept = to_grid(done, layout)
        else:
            if self.rule not in RULES:
                raise AdapterError(f"ViT adapter: unknown restoration rule {self.rule!r}; use one of {RULES}")
            full = restore_full_grid(done.tokens, layout, self.rule, self.sources)
        body = done.tokens.segment[~done.tokens.cls]
        call.record.vision_out = torch.bincount(body, minlength=B).tolist()
        self.last_tokens, self.last_kept, self.last_layout = done.tokens, before, layout
        self.last_sources = self.sources
        self.last_blocks = [{"q": q, "kv": kv, "mlp": mlp} for _, (q, kv, mlp) in sorted(run.block_runs.items())]
        if self.on_done is not None:
            self.on_done(call, kept)
        else:
            self.adapter.session.report.vision.append(call.record)
        if not run.changed:
            return None
        return full.reshape(B, n1, -1).to(out.dtype)

    # -- one strategy step ----------------------------------------------------------------------------------
    def _step(self, fn: Callable[[VisionTokens], VisionTokens], tokens: VisionTokens, where: str) -> VisionTokens:
        """Run one strategy step ``fn(tokens)``, check the prefix tokens, and carry the merge sources.

        With source tracking on and autograd off (an inference forward), the step runs on a leaf copy of the hidden
        states with autograd on, so :func:`gradient_destinations` can read where every vanished token went; the
        result is detached."""
        probe = None
        if self.sources is not None and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled() \
                and not tokens.hidden.is_inference() and tokens.hidden.is_floating_point():
            leaf = tokens.hidden.detach().requires_grad_(True)
            probe = tokens.with_hidden(leaf)
            with torch.enable_grad():
                after = fn(probe)
        else:
            after = fn(tokens)
        if after is probe:
            after = tokens
        elif probe is not None and after is not tokens:
            vanished = (~torch.isin(tokens.origin, after.origin.to(tokens.origin.device))).nonzero()[:, 0]
            dest = torch.full((tokens.n,), -1, dtype=torch.long, device=tokens.segment.device)
            if after.hidden.requires_grad and vanished.numel():
                dest[vanished] = gradient_destinations(probe.hidden, after.hidden, vanished, tokens.segment,
                                                       after.segment)
            after = after.with_hidden(after.hidden.detach())
            self.sources = update_sources(self.sources, tokens, after, dest)
        elif self.sources is not None and after is not tokens:
            self.sources = update_sources(self.sources, tokens, after)
        if after is not tokens and after.cls is not tokens.cls:
            check_prefix(after, self.shape[0], self.parts.n_prefix, where, self.strategy.name)
        return after
