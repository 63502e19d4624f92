"""Baselines at matched budgets: ``random`` (vision and LLM) and ``pool`` (vision, average pooling of units).

A method that cannot beat these is not worth its cost. They are also the strategies of the invariant matrix.

Randomness is seeded and batch-invariant: the choice for an image (vision) or a row (LLM) depends only on the
seed and that image's / row's own shape, never on what else is in the batch, so row *b* of a batch makes the
same choice as the same prompt alone.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from tokcomp.config import LayerField, PruneLayer, StrategyConfig
from tokcomp.hookspecs import hookimpl
from tokcomp.strategy import ScorePruner, ScorePrunerConfig, ViTCompressor
from tokcomp.tokens import LLMContext, LLMStep, VisionContext, VisionTokens


def _scores(n: int, *key: int) -> torch.Tensor:
    """Float32[n] uniform scores from a generator seeded by ``key`` (deterministic, CPU)."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2 ** 62)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _unit_windows(tokens: VisionTokens, ctx: VisionContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(unit_ids[U'], rows[U', u], segment[U'])`` of the complete units present in ``tokens``."""
    ids, rows = tokens.units()
    return ids, rows, ctx.layout.unit_segment.to(ids.device)[ids]


class RandomVisionConfig(StrategyConfig):
    layer: int | None = LayerField(0, tower="vision",
                                   description="drop after this vision block (None: after the last block)")
    seed: int = Field(0, ge=0, description="random seed")


class RandomVision(ViTCompressor):
    """Keep a seeded random subset of units (2x2 patch groups) of every segment after a vision block."""

    name = "random"
    summary = "random units kept per image/frame/tile (baseline)"
    granularity = "unit"
    Config = RandomVisionConfig

    def _at(self, ctx: VisionContext) -> int:
        return ctx.depth - 1 if self.config.layer is None else self.config.layer

    def after_block(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        if i != self._at(ctx) or self.config.is_noop_budget:
            return tokens
        ids, rows, seg = _unit_windows(tokens, ctx)
        grid = ctx.layout.segment_grid
        keep_rows = [rows[:0].reshape(-1)]
        for s in torch.unique(seg).tolist():
            members = (seg == s).nonzero()[:, 0]
            k = self.config.keep_count(len(members))
            t, h, w = grid[s].tolist()
            score = _scores(len(members), self.config.seed, t, h, w, len(members))
            chosen = members[torch.topk(score, k).indices.sort().values.to(members.device)]
            keep_rows.append(rows[chosen].reshape(-1))
        keep = torch.cat(keep_rows)
        cls_rows = tokens.cls.nonzero()[:, 0]
        return tokens.select(torch.cat([cls_rows, keep]).sort().values)


class PoolConfig(StrategyConfig):
    layer: int | None = LayerField(None, tower="vision",
                                   description="pool after this vision block (None: after the last block)")


def pool_windows(h: int, w: int, k: int) -> torch.Tensor:
    """A partition of an ``h x w`` grid into exactly ``k`` rectangular windows (``1 <= k <= h*w``).

    If ``k = gh * gw`` with ``gh | h`` and ``gw | w``, every window is ``(h/gh) x (w/gw)``, the most square such
    shape (ties: wider than tall). Otherwise the rows form ``gh`` bands of near-equal height (``gh ~ sqrt(k h / w)``,
    at least ``ceil(k / w)``), band ``b`` holds ``c_b`` windows of near-equal width side by side, and the ``c_b``
    (each at most ``w``) follow the bands' heights (largest remainders, ties to the upper band), summing to ``k``.

    Returns:
        LongTensor[h, w] window id of every cell, ids ``0 .. k-1`` in raster order of the windows' top-left cells.
    """
    h, w = int(h), int(w)
    k = max(1, min(int(k), h * w))
    best = None
    for gh in range(1, min(h, k) + 1):
        if h % gh or k % gh or w % (k // gh):
            continue
        ph, pw = h // gh, w // (k // gh)
        score = (max(ph, pw) / min(ph, pw), ph > pw)
        if best is None or score < best[0]:
            best = (score, gh)
    if best is not None:
        gh = best[1]
        counts = [k // gh] * gh
    else:
        lo, hi = -(-k // w), min(h, k)
        gh = min(max(round(math.sqrt(k * h / w)), lo), hi)
        heights = torch.bincount(torch.arange(h) * gh // h, minlength=gh).tolist()
        ideal = [k * hb / h for hb in heights]
        counts = [min(int(x), w) for x in ideal]
        for b in sorted(range(gh), key=lambda b: (-(ideal[b] - int(ideal[b])), b)):
            if sum(counts) == k:
                break
            if counts[b] < w:
                counts[b] += 1
        while sum(counts) < k:   # capped bands left room elsewhere
            b = next(b for b in range(gh) if counts[b] < w)
            counts[b] += 1
    band = torch.arange(h) * gh // h                                   # [h]
    c = torch.tensor(counts, dtype=torch.long)
    offset = torch.cumsum(c, 0) - c
    col = torch.arange(w)
    return offset[band][:, None] + (col[None, :] * c[band][:, None]) // w


class Pool(ViTCompressor):
    """Average-pool whole units over rectangular windows of each segment's unit grid (size-weighted, patch-wise).

    Each segment ends with exactly ``keep_count(units)`` units: its unit grid is split into that many windows by
    :func:`pool_windows` (equal windows whenever the count factors over the grid, otherwise bands of near-equal
    windows). Each pooled unit sits at the placeholder (and the positions) of its window's top-left unit."""

    name = "pool"
    summary = "2-D average pooling of units on the unit grid (baseline)"
    granularity = "unit"
    Config = PoolConfig

    def after_block(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        at = ctx.depth - 1 if self.config.layer is None else self.config.layer
        if i != at or self.config.is_noop_budget:
            return tokens
        ids, rows, seg = _unit_windows(tokens, ctx)
        cell = ctx.layout.unit_grid.to(ids.device)[ids]  # (t, h, w) per unit
        window = torch.empty_like(ids)
        for s in torch.unique(seg).tolist():
            m = seg == s
            t, y, x = cell[m].unbind(-1)
            y = (t - t.min()) * (int(y.max()) + 1) + y - y.min()      # frames stacked (a segment is one frame)
            x = x - x.min()
            h, w = int(y.max()) + 1, int(x.max()) + 1
            grid = pool_windows(h, w, self.config.keep_count(int(m.sum()))).to(ids.device)
            window[m] = grid[y, x] + (s << 32)  # unique per segment
        _, win = torch.unique(window, return_inverse=True)
        n_win = int(win.max()) + 1
        x = tokens.hidden[rows]                                   # [U, u, C]
        sz = tokens.size[rows].to(torch.float32)                  # [U, u]
        acc = torch.zeros(n_win, *x.shape[1:], dtype=torch.float32, device=x.device)
        acc.index_add_(0, win.to(x.device), (x.float() * sz[..., None].to(x.device)))
        tot = torch.zeros(n_win, sz.shape[1], dtype=torch.float32, device=sz.device).index_add_(0, win.to(sz.device), sz)
        pooled = (acc / tot[..., None].to(acc.device)).to(x.dtype)
        # representative = the window's first unit in id order (its top-left unit)
        first = torch.full((n_win,), ids.numel(), dtype=torch.long, device=ids.device)
        first.scatter_reduce_(0, win, torch.arange(ids.numel(), device=ids.device), reduce="amin")
        rep_rows = rows[first].reshape(-1)
        out = tokens.select(rep_rows)
        out = out.with_hidden(pooled.reshape(-1, x.shape[-1]), size=tot.reshape(-1).to(tokens.size.dtype))
        cls_rows = tokens.cls.nonzero()[:, 0]
        if cls_rows.numel():
            out = VisionTokens.cat([tokens.select(cls_rows), out])
        order = torch.argsort(out.origin)
        return out.select(order)


class RandomLLMConfig(ScorePrunerConfig):
    layer: int = PruneLayer(2, description="K: prune before decoder layer K (FastV's and DART's default point)")
    seed: int = Field(0, ge=0, description="random seed")


class RandomLLM(ScorePruner):
    """Keep a seeded random subset of each row's visual tokens before decoder layer K."""

    name = "random"
    summary = "random visual tokens kept before LLM layer K (baseline)"
    Config = RandomLLMConfig

    def score(self, step: LLMStep, ctx: LLMContext) -> torch.Tensor:
        """Uniform scores that depend only on the seed and the row's own original visual count (batch-invariant)."""
        out = torch.zeros(step.visual.shape, dtype=torch.float32)
        for b, n in enumerate(step.n_visual_original.tolist()):
            pos = step.visual[b].nonzero()[:, 0].cpu()
            out[b, pos] = _scores(pos.numel(), self.config.seed, int(n))
        return out


@hookimpl
def tokcomp_register(registry):
    for cls in (RandomVision, Pool, RandomLLM):
        registry.add_strategy(cls)
