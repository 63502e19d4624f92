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
from tokcomp.ops.matching import Match, bipartite_dense, matching_per_segment, merge_weighted, r_schedule
from tokcomp.ops.units import unit_features, unit_match_rows
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import BlockVariant, VisionContext, VisionTokens


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


def unit_bipartite_match(tokens: VisionTokens, keys: Tensor, r_per_segment: Tensor,
                         seq: Tensor | None = None) -> tuple[Match, Tensor]:
    """ToMe's matching on whole units.

    Args:
        tokens: the current token set (complete units, optional CLS rows).
        keys: [N, d] head-averaged keys of this block.
        r_per_segment: LongTensor[S] units to remove per segment.
        seq: None: the units alternate in unit order and CLS rows never take part ("spatial"). Otherwise
            LongTensor[U_all] (indexed by unit id): each unit's position in ToMe's sequence of its segment; the
            CLS rows then stand first in their segment's sequence (in row order) and take part as protected
            tokens, as ToMe's ``class_token``.
    Returns:
        (unit-level :class:`Match` indexing the rows of ``rows``; with ``seq``, its ``order`` holds each surviving
        unit's position in the sequence ToMe's merge returns (CLS rows counted), ``rows`` LongTensor[U, u] from
        :meth:`VisionTokens.units`).
    """
    ids, rows = tokens.units()
    seg = tokens.segment[rows[:, 0]]
    metric = unit_features(keys, rows.to(keys.device), "mean")
    if seq is None:
        return matching_per_segment(metric, seg.to(metric.device), r_per_segment), rows
    dev = metric.device
    cls_rows = tokens.cls.nonzero()[:, 0]
    n_cls = int(cls_rows.numel())
    items_metric = torch.cat([keys[cls_rows.to(keys.device)].to(metric.dtype), metric])
    items_seg = torch.cat([tokens.segment[cls_rows], seg]).to(dev)
    key = torch.cat([cls_rows - tokens.n, seq.to(ids.device)[ids]]).to(dev)       # CLS first, in row order
    perm = torch.sort(key, stable=True).indices
    perm = perm[torch.sort(items_seg[perm], stable=True).indices]
    protected = (perm < n_cls)
    m = matching_per_segment(items_metric[perm], items_seg[perm], r_per_segment.to(dev), protected)
    src, dst = perm[m.src] - n_cls, perm[m.dst] - n_cls                             # never CLS (protected)
    by_src = torch.argsort(src)
    src, dst = src[by_src], dst[by_src]
    kept_items = perm[m.keep]
    unit_kept = kept_items >= n_cls
    by_unit = torch.argsort(kept_items[unit_kept])
    keep = (kept_items[unit_kept] - n_cls)[by_unit]
    order = m.order[unit_kept][by_unit]
    return Match(src, dst, keep, order), rows


def dense_unit_match(tokens: VisionTokens, keys: Tensor, r_per_segment: Tensor,
                     seq: Tensor | None = None) -> tuple[Match, Tensor] | None:
    """:func:`unit_bipartite_match` through ToMe's dense computation (:func:`tokcomp.ops.matching.bipartite_dense`,
    ~30 tensor ops instead of ~150) when every segment holds the same number of units and CLS rows and removes the
    same ``r``, with segments in ascending order (one image, or a batch of equal images: the common case). Same
    arguments and the same result; None when the token set does not qualify (then use the general function)."""
    ids, rows = tokens.units()
    U = int(ids.numel())
    r_seg = r_per_segment.reshape(-1)
    S = int(r_seg.numel())
    if U == 0 or S == 0 or U % S or not bool((r_seg == r_seg[0]).all()):
        return None
    n_u = U // S
    seg = tokens.segment[rows[:, 0]]
    want = torch.arange(S, device=seg.device).repeat_interleave(n_u)
    if not torch.equal(seg, want):
        return None
    cls_rows = tokens.cls.nonzero()[:, 0] if seq is not None else rows.new_empty(0)
    P = int(cls_rows.numel()) // S
    if P * S != cls_rows.numel() or (P and not torch.equal(tokens.segment[cls_rows], want[::n_u].repeat_interleave(P))):
        return None
    r = min(int(r_seg[0]), n_u // 2)
    if r <= 0:
        return None
    dev = keys.device
    metric = unit_features(keys, rows.to(dev), "mean").view(S, n_u, -1)   # [S, n_u, d]
    if seq is None:
        perm = torch.arange(n_u, device=dev).expand(S, -1)
    else:
        perm = torch.sort(seq.to(ids.device)[ids].view(S, n_u), dim=1, stable=True).indices.to(dev)
        metric = metric.gather(1, perm[..., None].expand(-1, -1, metric.shape[-1]))
    if P:
        metric = torch.cat([keys[cls_rows.to(dev)].to(metric.dtype).view(S, P, -1), metric], 1)
    src, dst, seq_new = bipartite_dense(metric, r, P)                    # item positions per segment
    base = (torch.arange(S, device=dev) * n_u)[:, None]
    src_u = (base + perm.gather(1, src - P)).reshape(-1)                 # unit indices into rows
    dst_u = (base + perm.gather(1, dst - P)).reshape(-1)
    by_src = torch.argsort(src_u)
    unit_pos = torch.full((S, n_u), -1, dtype=torch.long, device=dev)
    unit_pos.scatter_(1, perm.gather(1, seq_new[:, P:] - P), torch.arange(P, P + n_u - r, device=dev).expand(S, -1))
    unit_pos = unit_pos.reshape(-1)
    keep = (unit_pos >= 0).nonzero()[:, 0]
    return Match(src_u[by_src], dst_u[by_src], keep, unit_pos[keep]), rows


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
        seq = self.sequence(ctx)
        found = dense_unit_match(tokens, keys, r, seq)
        match, rows = found if found is not None else unit_bipartite_match(tokens, keys, r.to(keys.device), seq)
        if seq is not None:
            ids = tokens.unit[rows[match.keep.to(rows.device), 0]].to(seq.device)
            seq[ids] = match.order.to(seq.device)
        if match.r == 0:
            return tokens
        rm = unit_match_rows(match, rows, tokens.n)
        x, size = self.merge(tokens.hidden, tokens.size, rm, i, ctx)
        ctx.state[self._KEY + ".merged"] = True
        return tokens.select(rm.keep).with_hidden(x, size=size)

    def merge(self, x: Tensor, size: Tensor, match: Match, i: int, ctx: VisionContext) -> tuple[Tensor, Tensor]:
        """Merge rule of block ``i`` on token rows: ToMe's size-weighted average ([N, C], [N] -> kept rows)."""
        return merge_weighted(x, size, match)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(ToMe)
