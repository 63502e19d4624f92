"""Synthetic LLM steps and a fake decoder stack for testing LLM pruners without a model.

``FakeLLM(rows, n_layers)`` plays the adapter's engine: it runs ``pruner.prune_layers`` / ``select`` over a fake
stack whose "layers" are deterministic functions of each token's identity (row seed, original index), so a row's
data never depends on the rest of the batch or on padding. It fills every ``LLMStep`` field (attention rows by a
brute-force softmax over the visible keys, post-"RoPE" keys, layer-0 embeddings, a norm), applies selections
like the engine (text always kept, original order, left re-padding, ``Selection.replace``), and records the visual
tokens per row entering each layer.

A row is a list of items: ``("t", n)`` n text tokens, ``("v", (t, h, w))`` an image / video span of t*h*w tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokcomp.tokens import LLMContext, LLMStep, Selection, VisualSpan

DIM, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 8


def _gen(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 7) % (2 ** 61)
    return torch.Generator().manual_seed(seed)


@dataclass
class RowData:
    """One row's original tokens: kinds, span membership and the per-layer random tensors."""

    items: list
    seed: int
    visual: torch.Tensor = field(init=False)      # BoolTensor[n0]
    span_of: torch.Tensor = field(init=False)     # LongTensor[n0], -1 for text
    cell: torch.Tensor = field(init=False)        # LongTensor[n0, 3]
    grids: list = field(init=False)
    embeds: torch.Tensor = field(init=False)      # [n0, D]

    def __post_init__(self):
        vis, span, cell, grids = [], [], [], []
        for kind, arg in self.items:
            if kind == "t":
                vis += [False] * arg
                span += [-1] * arg
                cell += [(0, 0, 0)] * arg
            else:
                t, h, w = arg
                j = len(grids)
                grids.append((t, h, w))
                for ti in range(t):
                    for hi in range(h):
                        for wi in range(w):
                            vis.append(True)
                            span.append(j)
                            cell.append((ti, hi, wi))
        self.visual = torch.tensor(vis, dtype=torch.bool)
        self.span_of = torch.tensor(span, dtype=torch.long)
        self.cell = torch.tensor(cell, dtype=torch.long).view(-1, 3)
        self.grids = grids
        self.embeds = torch.randn(self.n, DIM, generator=_gen(self.seed, 0)) * 2.0

    @property
    def n(self) -> int:
        return int(self.visual.numel())

    def layer(self, i: int):
        """(delta [n0, D], q [n0, H, hd], k [n0, Hkv, hd]) of layer i for every original token."""
        g = _gen(self.seed, i + 1)
        return (torch.randn(self.n, DIM, generator=g), torch.randn(self.n, HEADS, HEAD_DIM, generator=g),
                torch.randn(self.n, KV_HEADS, HEAD_DIM, generator=g))


def fake_norm(x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm with a fixed non-trivial weight (stands in for the LLM's final norm)."""
    w = 1.0 + 0.5 * torch.arange(x.shape[-1], dtype=torch.float32, device=x.device) / x.shape[-1]
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(x.dtype)


def brute_attention(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eager attention probabilities of one row: q [L, H, hd], k [L, Hkv, hd], valid BoolTensor[L] ->
    float32 [H, L, L] (causal, padding keys masked; fully masked (pad) query rows are zeros)."""
    n, h, hd = q.shape
    rep = h // k.shape[1]
    kk = k.repeat_interleave(rep, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kk.float()) / hd ** 0.5
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & valid[None, :]
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


@dataclass
class FakeResult:
    counts: dict[int, list[int]]           # visual tokens per row entering each layer
    steps: list[tuple[LLMStep, Selection]]
    kept: list[torch.Tensor]               # per row: original indices of the visual tokens left at the end
    hidden: list[torch.Tensor]             # per row: final hidden states of the unpadded current tokens
    ctx: LLMContext


class FakeLLM:
    """A fake decoder stack of ``n_layers`` layers over the given rows (see the module docstring)."""

    def __init__(self, rows: list[tuple[list, int]], n_layers: int):
        self.rows = [RowData(items, seed) for items, seed in rows]
        self.n_layers = n_layers

    def run(self, pruner, ctx: LLMContext | None = None) -> FakeResult:
        rows, n_layers = self.rows, self.n_layers
        cur = [torch.arange(r.n) for r in rows]                 # original indices of current tokens
        hid = [r.embeds.clone() for r in rows]                  # current hidden states (unpadded)
        prune = pruner.prune_layers(n_layers)
        ctx = LLMContext(n_layers=n_layers, prune_layers=list(prune)) if ctx is None else ctx
        assert prune == sorted(set(prune)), prune
        pruner.begin(ctx)
        counts, steps = {}, []
        for i in range(n_layers):
            counts[i] = [int(r.visual[c].sum()) for r, c in zip(rows, cur)]
            outs, qs, ks = [], [], []
            for r, c, h in zip(rows, cur, hid):
                delta, q, k = r.layer(i)
                outs.append(h + 0.1 * torch.tanh(h) + delta[c])
                qs.append(q[c])
                ks.append(k[c])
            if i in prune:
                step = self._step(i, cur, hid, outs, qs, ks, pruner)
                sel = pruner.select(step, ctx)
                steps.append((step, sel))
                cur, outs = self._apply(step, sel, cur, outs)
            hid = outs
        kept = [c[r.visual[c]] for r, c in zip(rows, cur)]
        return FakeResult(counts, steps, kept, hid, ctx)

    # -- helpers ------------------------------------------------------------------------------------------
    def _step(self, i, cur, hid_in, outs, qs, ks, pruner) -> LLMStep:
        rows, b_size = self.rows, len(self.rows)
        length = max(int(c.numel()) for c in cur)
        pad = [length - int(c.numel()) for c in cur]

        def padded(ts, fill_shape, dtype=torch.float32):
            out = torch.zeros(b_size, length, *fill_shape, dtype=dtype)
            for b, t in enumerate(ts):
                out[b, pad[b]:] = t
            return out

        visual = torch.zeros(b_size, length, dtype=torch.bool)
        valid = torch.zeros(b_size, length, dtype=torch.bool)
        index = torch.zeros(b_size, length, dtype=torch.long)
        spans = []
        for b, (r, c) in enumerate(zip(rows, cur)):
            visual[b, pad[b]:] = r.visual[c]
            valid[b, pad[b]:] = True
            index[b, pad[b]:] = c
            row_spans = []
            for j, grid in enumerate(r.grids):
                m = r.span_of[c] == j
                row_spans.append(VisualSpan(row=b, positions=m.nonzero()[:, 0] + pad[b], grid=grid,
                                            cells=r.cell[c[m]]))
            spans.append(row_spans)
        hidden = padded(outs, (DIM,))
        hidden_in = padded(hid_in, (DIM,))
        q = padded(qs, (HEADS, HEAD_DIM))
        k = padded(ks, (KV_HEADS, HEAD_DIM))
        keys = k.permute(0, 2, 1, 3).contiguous()              # [B, Hkv, L, hd]
        embeds0 = torch.zeros(b_size, max(r.n for r in rows), DIM)
        e_pad = [embeds0.shape[1] - r.n for r in rows]
        for b, r in enumerate(rows):
            embeds0[b, e_pad[b]:] = r.embeds
        step = LLMStep(layer=i, hidden=hidden, hidden_in=hidden_in, visual=visual, valid=valid, spans=spans,
                       n_visual_original=torch.tensor([int(r.visual.sum()) for r in rows]), n_layers=self.n_layers,
                       keys=keys if pruner.needs_keys else None, embeds=embeds0,
                       embeds_index=index + torch.tensor(e_pad)[:, None], norm=fake_norm)
        kind = pruner.attention_queries(i)
        if kind is not None:
            probs = [brute_attention(q[b], k[b], valid[b]) for b in range(b_size)]  # [H, L, L] each
            if kind == "last":
                queries = torch.full((b_size, 1), length - 1, dtype=torch.long)
            else:
                lists = []
                for b in range(b_size):
                    vis = visual[b].nonzero()[:, 0]
                    after = torch.arange(length) > (vis[0] if vis.numel() else length)
                    lists.append((after & valid[b] & ~visual[b]).nonzero()[:, 0])
                r_max = max(1, max(int(x.numel()) for x in lists))
                queries = torch.stack([torch.cat([x, x[-1:].expand(r_max - x.numel())]) if x.numel()
                                       else torch.full((r_max,), length - 1) for x in lists])
            step.queries = queries
            step.attn = torch.stack([probs[b][:, queries[b]] for b in range(b_size)])  # [B, H, R, L]
        return step

    def _apply(self, step: LLMStep, sel: Selection, cur, outs):
        new_cur, new_out = [], []
        for b, (c, o) in enumerate(zip(cur, outs)):
            pad = step.visual.shape[1] - int(c.numel())
            keep_vis = sel.keep[b]
            assert bool(step.visual[b, keep_vis].all()), "selection must contain visual positions only"
            assert keep_vis.unique().numel() == keep_vis.numel(), "duplicate positions in the selection"
            text = (step.valid[b] & ~step.visual[b]).nonzero()[:, 0]
            keep = torch.sort(torch.cat([text, keep_vis])).values
            hidden = step.hidden[b].clone()
            if sel.replace is not None and sel.replace[b] is not None:
                idx, values = sel.replace[b]
                assert bool(torch.isin(idx, keep_vis).all()), "replaced slots must be kept"
                hidden[idx] = values
            new_cur.append(c[keep - pad])
            new_out.append(hidden[keep])
        return new_cur, new_out


def planned_counts(pruner, n_visual: int, n_layers: int) -> list[int]:
    """Visual tokens entering each layer that a pruner's own budget implies (progressive: its plan; one-shot: its
    budget from layer K on)."""
    if hasattr(pruner, "plan"):
        return layer_counts_from_plan(pruner, n_visual, n_layers)
    from tokcomp.ops.schedule import achieved_counts
    if not pruner.prune_layers(n_layers):
        return [n_visual] * n_layers
    k = pruner.config.keep_count(n_visual) if n_visual else 0
    return achieved_counts(n_visual, [pruner.config.layer], [k], n_layers)


def layer_counts_from_plan(pruner, n_visual: int, n_layers: int) -> list[int]:
    """Visual tokens entering each layer according to the pruner's own plan (progressive pruners)."""
    from tokcomp.ops.schedule import achieved_counts
    if not pruner.prune_layers(n_layers):
        return [n_visual] * n_layers
    return achieved_counts(n_visual, pruner.stage_layers(n_layers), pruner.plan(n_visual, n_layers), n_layers)
