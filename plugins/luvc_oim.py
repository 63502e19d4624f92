"""LUVC-OIM: the Orthogonal Iterative Merger of LUVC (Zheng et al., arXiv 2512.09010), as interpreted by this project.

**No reference code exists** and the paper body could not be read; this is the project's reading of the published
description ("an iterative merging scheme that is orthogonal in spatial axes", in the visual encoder), see
docs/methods/luvc_oim.md. What this implementation does:

* one *merge step* halves one spatial axis of a segment's unit grid (units = the 2x2 patch groups that become LLM
  tokens): adjacent units are merged pairwise along that axis -- columns ``(2j, 2j+1)`` for a width step, rows for a
  height step -- patch-wise (TL with TL, ...) and size-weighted (``x = sum(s x) / sum(s)``);
* steps alternate width, height, width, ... (orthogonal axes), so an ``h x w`` unit grid becomes ``h x ceil(w/2)``,
  then ``ceil(h/2) x ceil(w/2)``, ...; the grid stays regular;
* a merged unit sits at its first member's position (left / top): it keeps that unit's id, positions and rotary
  embedding; an odd last column / row stays unmerged (it becomes its own cell of the smaller grid);
* the number of steps per segment is the one whose resulting unit count is closest to the budget
  (``keep_count(units)``; ties go to fewer steps, i.e. more tokens); e.g. ``keep_ratio=0.25`` on an even grid is
  exactly 2 steps, ``0.5`` one step, ``0.35`` on a 32x32 grid two steps (achieved 0.25);
* step ``j`` runs after vision block ``layers[j]`` (the last listed block takes any further steps); by default the
  steps are spread evenly over the tower: step ``j`` of ``n`` after block ``round((j+1) * depth / (n+1)) - 1``
  (rounded half up).

Attention-free and proportional-attention-free, hence flash-attention compatible.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator
from torch import Tensor

from tokcomp.config import LayerField, StrategyConfig
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.matching import Match, merge_weighted
from tokcomp.ops.units import unit_match_rows
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import VisionContext, VisionTokens


class OIMConfig(StrategyConfig):
    """OIM's fields. ``keep_ratio`` (default 0.25: one step per axis) / ``num_tokens`` (units per segment) choose
    the number of halving steps per segment (closest achievable count)."""

    default_keep_ratio: ClassVar[float] = 0.25

    layers: list[int] | None = LayerField(
        None, tower="vision",
        description="vision blocks after which merge steps 0, 1, 2, ... run (non-decreasing; the last block listed "
                    "takes any further steps); None: steps spread evenly over the tower")
    max_steps: int | None = Field(None, ge=0, description="cap on the number of merge steps (None: no cap)")

    @field_validator("layers")
    @classmethod
    def _sorted(cls, v):
        if v is not None and (not v or any(b < a for a, b in zip(v, v[1:]))):
            raise ValueError("layers must be a non-empty, non-decreasing list of vision block indices")
        return v


def grid_after(h: int, w: int, steps: int) -> tuple[int, int]:
    """Unit grid ``(h', w')`` after ``steps`` alternating halvings (width first), odd edges kept."""
    for j in range(steps):
        if j % 2 == 0:
            w = (w + 1) // 2
        else:
            h = (h + 1) // 2
    return h, w


def steps_for(h: int, w: int, target: int, cap: int | None = None, frames: int = 1) -> int:
    """Number of steps whose unit count ``frames * h' * w'`` is closest to ``target`` (ties: fewer steps)."""
    best, best_d, s = 0, abs(frames * h * w - target), 0
    while True:
        hs, ws = grid_after(h, w, s)
        if abs(frames * hs * ws - target) < best_d:
            best, best_d = s, abs(frames * hs * ws - target)
        if (hs == 1 and ws == 1) or (cap is not None and s >= cap):
            return best
        s += 1


def pair_match(cell: Tensor, group: Tensor, axis: int) -> Match:
    """Pairwise merge along one axis of a regular grid of units.

    Args:
        cell: LongTensor[U, 2] current (row, col) grid cell of each unit.
        group: LongTensor[U] grid id (segment, frame); only units of one group pair up.
        axis: 1 = width (pair columns 2j, 2j+1), 0 = height (pair rows 2j, 2j+1).
    Returns:
        unit-level :class:`Match`: ``src`` the odd member of every complete pair, ``dst`` its even partner
        (the first member: left / top); unpaired units (an odd last column / row) are untouched.
    """
    r, c = cell[:, 0], cell[:, 1]
    key = lambda g, rr, cc: (g << 42) | (rr << 21) | cc  # noqa: E731  (grids < 2**21 per side)
    keys = key(group, r, c)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    odd = (cell[:, axis] % 2) == 1
    cand = odd.nonzero().squeeze(1)
    pr, pc = r[cand] - (1 - axis), c[cand] - axis
    want = key(group[cand], pr, pc)
    pos = torch.searchsorted(sorted_keys, want).clamp_max(keys.numel() - 1)
    found = sorted_keys[pos] == want
    src, dst = cand[found], order[pos[found]]
    removed = torch.zeros(cell.shape[0], dtype=torch.bool, device=cell.device)
    removed[src] = True
    return Match(src, dst, (~removed).nonzero().squeeze(1))


class LuvcOIM(ViTCompressor):
    """LUVC's Orthogonal Iterative Merger, project interpretation (see the module docstring). Unit granularity."""

    name = "luvc_oim"
    paper = "https://arxiv.org/abs/2512.09010"
    summary = ("merge adjacent units pairwise, alternating width and height, size-weighted; regular smaller grid "
               "(project interpretation: no reference code)")
    granularity = "unit"
    Config = OIMConfig

    _KEY: ClassVar[str] = "luvc_oim"

    # -- plan -------------------------------------------------------------------------------------------
    def plan(self, ctx: VisionContext) -> list[list[int]]:
        """Per segment, the block after which each of its merge steps runs (cached per forward)."""
        key = self._KEY + ".plan"
        if key in ctx.state:
            return ctx.state[key]
        lay, depth = ctx.layout, ctx.depth
        units = torch.bincount(lay.unit_segment, minlength=lay.n_segments).tolist()
        plan = []
        for s in range(lay.n_segments):
            uh, uw = self._unit_grid(lay, s)
            frames = units[s] // max(uh * uw, 1)
            n = steps_for(uh, uw, self.config.keep_count(units[s]), self.config.max_steps, frames) if units[s] else 0
            if self.config.layers is None:
                blocks = [(2 * (j + 1) * depth + n + 1) // (2 * (n + 1)) - 1 for j in range(n)]  # round half up
            else:
                ls = self.config.layers
                blocks = [ls[min(j, len(ls) - 1)] for j in range(n)]
            plan.append([min(max(b, 0), depth - 1) for b in blocks])
        ctx.state[key] = plan
        ctx.state[self._KEY + ".done"] = [0] * lay.n_segments
        return plan

    @staticmethod
    def _unit_grid(layout, s: int) -> tuple[int, int]:
        """``(rows, cols)`` of segment ``s``'s unit grid (per frame)."""
        m = layout.unit_segment == s
        if not bool(m.any()):
            return 0, 0
        g = layout.unit_grid[m]
        return int(g[:, 1].max()) + 1, int(g[:, 2].max()) + 1

    # -- callbacks --------------------------------------------------------------------------------------
    def after_block(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        if self.config.is_noop_budget:
            return tokens
        plan = self.plan(ctx)
        done = ctx.state[self._KEY + ".done"]
        while True:
            due = [s for s, p in enumerate(plan) if done[s] < len(p) and p[done[s]] == i]
            if not due:
                return tokens
            for axis in (1, 0):  # width steps (even step index), height steps (odd)
                segs = [s for s in due if (done[s] % 2 == 0) == (axis == 1)]
                if segs:
                    tokens = self._step(tokens, ctx, segs, axis, done)
            for s in due:
                done[s] += 1

    def _step(self, tokens: VisionTokens, ctx: VisionContext, segs: list[int], axis: int,
              done: list[int]) -> VisionTokens:
        """One merge step along ``axis`` in the segments ``segs`` (each has done ``done[s]`` steps so far)."""
        ids, rows = tokens.units()
        dev = rows.device
        seg = tokens.segment[rows[:, 0]].to(dev)
        grid = ctx.layout.unit_grid.to(dev)[ids.to(dev)]                          # original (t, h, w)
        n_done = torch.tensor(done, dtype=torch.long, device=dev)[seg]
        n_w, n_h = (n_done + 1) // 2, n_done // 2
        cell = torch.stack([grid[:, 1] >> n_h, grid[:, 2] >> n_w], 1)              # current (row, col)
        active = torch.zeros(ctx.layout.n_segments, dtype=torch.bool, device=dev)
        active[torch.tensor(segs, dtype=torch.long, device=dev)] = True
        sub = active[seg].nonzero().squeeze(1)
        group = seg[sub] * (int(grid[:, 0].max()) + 1) + grid[sub, 0]
        m = pair_match(cell[sub], group, axis)
        if m.r == 0:
            return tokens
        unit_m = Match(sub[m.src], sub[m.dst], m.keep)
        rm = unit_match_rows(unit_m, rows, tokens.n)
        x, size = merge_weighted(tokens.hidden, tokens.size, rm)
        return tokens.select(rm.keep, hidden=x).with_hidden(x, size=size)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(LuvcOIM)
