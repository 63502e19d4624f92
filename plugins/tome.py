"""ToMe: Token Merging (Bolya et al., ICLR 2023; arXiv 2210.09461), at unit granularity for VLM vision towers.

In every block from ``start_layer`` on, between attention and MLP (``BlockVariant.mid``):

* the metric of a unit (the 2x2 patch group that becomes one LLM token) is the mean of its patches' keys,
  averaged over heads (the keys of this block's attention);
* bipartite soft matching within each segment (image, video frame, InternVL tile; never across segments), as
  ToMe's ``bipartite_soft_matching``: the segment's sequence alternates between set A and set B; every A unit finds
  its most cosine-similar B unit; the ``r_s`` A units with the highest similarity merge into their match (at most
  half of the segment's units per block). ``order="tome"`` (default) is ToMe's sequence: CLS (and any other prefix
  token) first, protected, then the units; after each merge the sequence is the one ToMe's ``merge`` returns
  (``[CLS, unmerged A, all B]``), which decides the next block's split. The token rows themselves never move (the
  sequence is bookkeeping in ``ctx.state``). ``order="spatial"`` alternates over the units in unit order in every
  block, CLS left out (the order-preserving variant);
* merging is patch-wise and size-weighted (TL with TL, TR with TR, ...): ``x_dst = sum(s x) / sum(s)``; the merged
  unit keeps the destination unit's id, positions and rotary embedding, so the LLM sees it at an original position;
* proportional attention: once sizes differ from 1, every block adds ``log(size)`` of each key to the logits
  (``BlockVariant.size_bias``; an additive float bias, hence not flash-attention compatible unless
  ``prop_attn=false``).

The per-block ``r_s`` comes from the budget: each segment must end with ``keep_count(units_s)`` units after the
last block, spread over the merging blocks by :func:`tokcomp.ops.matching.r_schedule` ("constant", "decreasing" =
ToMe's ``inflect=-1`` ramp, or a list of relative weights). A target below what halving in every block can reach
is clipped to that (the report's achieved counts show it).
"""
from __future__ import annotations

import functools
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from tokcomp.config import LayerField, StrategyConfig
from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.matching import Match, merge_weighted, r_schedule
from tokcomp.ops.units import unit_match_rows
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import BlockVariant, VisionContext, VisionTokens

from ._tome_match import (
    DENSE_MAX_SCORES,
    DenseSequence,
    dense_match_rows,
    dense_sequence,
    unit_bipartite_match,
)


class ToMeConfig(StrategyConfig):
    """ToMe's fields. ``keep_ratio``: fraction of each segment's units left after the last block (default 0.5, a
    project choice: the paper sets r per layer for timm ViTs); ``num_tokens``: units per segment."""

    default_keep_ratio: ClassVar[float] = 0.5

    start_layer: int = LayerField(0, tower="vision", ge=0, description="first vision block that merges")
    schedule: Literal["constant", "decreasing"] | list[int] = Field(
        "constant",
        description="how the merges are spread over blocks start_layer..last: 'constant' (equal r), 'decreasing' "
                    "(ToMe's inflect=-1 linear ramp) or one non-negative weight per merging block")
    prop_attn: bool = Field(True, description="proportional attention: add log(size) of each key to the logits")
    order: Literal["tome", "spatial"] = Field(
        "tome",
        description="the sequence the A/B sets alternate over: 'tome' = the official code's (CLS first and in the "
                    "alternation; after each merge [CLS, unmerged A, B]); 'spatial' = units in their original order in "
                    "every block, CLS left out")


class ToMe(ViTCompressor):
    """ToMe (see the module docstring). Unit granularity: ``finish`` returns whole units."""

    name = "tome"
    paper = "https://arxiv.org/abs/2210.09461"
    summary = ("bipartite soft matching of whole units on head-averaged keys, size-weighted merging, "
               "proportional attention")
    granularity = "unit"
    flash_compatible = False  # proportional attention is an additive float bias (flash: prop_attn=false)

    def flash_ok(self) -> bool:
        return not self.config.prop_attn
    Config = ToMeConfig

    _KEY: ClassVar[str] = "tome"

    def validate(self, depths: dict[str, int], family: str = "") -> None:
        super().validate(depths, family)
        sched = self.config.schedule
        if isinstance(sched, list) and "vision" in depths:
            want = depths["vision"] - self.config.start_layer
            if len(sched) != want:
                raise ConfigError(f"{self.name}: schedule has {len(sched)} weights but blocks "
                                  f"{self.config.start_layer}..{depths['vision'] - 1} merge ({want} blocks); "
                                  f"fix: give {want} weights, or schedule=constant")

    # -- schedule ---------------------------------------------------------------------------------------
    def r_table(self, ctx: VisionContext) -> Tensor:
        """LongTensor[L, S]: units removed in each merging block (``start_layer + l``) per segment.

        Cached in ``ctx.state`` for the forward."""
        key = self._KEY + ".r"
        if key not in ctx.state:
            n_blocks = max(0, ctx.depth - self.config.start_layer)
            units = torch.bincount(ctx.layout.unit_segment, minlength=ctx.layout.n_segments).tolist()
            kind = self.config.schedule
            if isinstance(kind, list) and len(kind) != n_blocks:
                raise ConfigError(f"{self.name}: schedule needs {n_blocks} weights for this tower, got {len(kind)}")
            cols = [r_schedule(u, self.config.keep_count(u), n_blocks, kind) if u else [0] * n_blocks
                    for u in units]
            ctx.state[key] = torch.tensor(cols, dtype=torch.long).reshape(len(units), n_blocks).T.contiguous()
        return ctx.state[key]

    # -- callbacks --------------------------------------------------------------------------------------
    def block_variant(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> BlockVariant | None:
        if self.config.is_noop_budget or i < self.config.start_layer:
            return None
        r = self.r_table(ctx)[i - self.config.start_layer]
        size_bias = self.config.prop_attn and bool(ctx.state.get(self._KEY + ".merged", False))
        if int(r.sum()) == 0:
            return BlockVariant(size_bias=True) if size_bias else None
        return BlockVariant(size_bias=size_bias, mid=functools.partial(self._mid, i=i, r=r, ctx=ctx))

    def sequence(self, ctx: VisionContext) -> Tensor | None:
        """LongTensor[U] (by unit id): each unit's position in ToMe's sequence of its segment, kept in ``ctx.state``
        for the forward (starts as the unit order); None with ``order="spatial"``."""
        if self.config.order != "tome":
            return None
        key = self._KEY + ".seq"
        if key not in ctx.state:
            ctx.state[key] = torch.arange(ctx.layout.n_units)
        return ctx.state[key]

    def _mid(self, tokens: VisionTokens, keys: Tensor, *, i: int, r: Tensor, ctx: VisionContext) -> VisionTokens:
        out = self._mid_dense(tokens, keys, i, r, ctx)
        return out if out is not None else self._mid_general(tokens, keys, i, r, ctx)

    def _mid_general(self, tokens: VisionTokens, keys: Tensor, i: int, r: Tensor, ctx: VisionContext) -> VisionTokens:
        """Any token set: per-segment matching with bookkeeping by unit id."""
        seq = self.sequence(ctx)
        match, rows = unit_bipartite_match(tokens, keys, r.to(keys.device), seq)
        if seq is not None:
            ids = tokens.unit[rows[match.keep.to(rows.device), 0]].to(seq.device)
            seq[ids] = match.order.to(seq.device)
        ctx.state.pop(self._KEY + ".dense", None)
        if match.r == 0:
            return tokens
        rm = unit_match_rows(match, rows, tokens.n)
        x, size = self.merge(tokens.hidden, tokens.size, rm, i, ctx)
        ctx.state[self._KEY + ".merged"] = True
        return tokens.select(rm.keep, hidden=x).with_hidden(x, size=size)

    def _mid_dense(self, tokens: VisionTokens, keys: Tensor, i: int, r: Tensor, ctx: VisionContext
                   ) -> VisionTokens | None:
        """Equal segments removing the same ``r``: the same result as :meth:`_mid_general` (pairs, merged states
        bit for bit, sequence) from ToMe's dense computation, with the sequence kept as token rows between blocks
        (a :class:`DenseSequence` in ``ctx.state``); None when the set does not qualify."""
        rs = r.tolist()
        if not rs or any(x != rs[0] for x in rs):
            return None
        seq = self.sequence(ctx)
        d = ctx.state.get(self._KEY + ".dense")
        if d is None or d.origin is not tokens.origin:
            d = dense_sequence(tokens, seq, len(rs))
            if d is None:
                return None
        S, n_u, _ = d.units.shape
        k = min(rs[0], n_u // 2)
        half = (n_u + d.cls.shape[1] + 1) // 2
        if k <= 0 or S * half * half > DENSE_MAX_SCORES:
            return None                                 # the general path compares in chunks
        src, dst, nxt = dense_match_rows(keys, d, k, seq is None)
        meta = tokens.segment.device
        removed = torch.zeros(tokens.n, dtype=torch.bool, device=meta)
        removed[src.to(meta)] = True
        keep = (~removed).nonzero()[:, 0]
        renumber = torch.cumsum(~removed, 0) - 1
        x, size = self.merge(tokens.hidden, tokens.size, Match(src, dst, keep.to(src.device)), i, ctx)
        out = tokens.select(keep, hidden=x).with_hidden(x, size=size)
        units = renumber[nxt.to(meta)]
        ctx.state[self._KEY + ".dense"] = DenseSequence(out.origin, renumber[d.cls.to(meta)], units)
        ctx.state[self._KEY + ".merged"] = True
        if seq is not None:
            P = d.cls.shape[1]
            seq[out.unit[units[:, :, 0]].reshape(-1).to(seq.device)] = \
                torch.arange(P, P + n_u - k, device=seq.device).repeat(S)
        return out

    def merge(self, x: Tensor, size: Tensor, match: Match, i: int, ctx: VisionContext) -> tuple[Tensor, Tensor]:
        """Merge rule of block ``i`` on token rows: ToMe's size-weighted average ([N, C], [N] -> kept rows)."""
        return merge_weighted(x, size, match)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(ToMe)
