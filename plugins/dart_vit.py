"""DART-ViT: DART's duplication-aware selection (Wen et al., arXiv 2502.11494) inside the vision tower, on units.

After vision block ``layer`` (default: the last block), in every segment (image, video frame, InternVL tile):

1. each unit (the 2x2 patch group that becomes one LLM token) is described by the concatenation of its patches'
   hidden states, ``[u*C]``;
2. pivots: the ``pivots`` units with the largest L1 norm of that feature (DART ranks by the L1 norm of the keys of
   layer K-1; inside the ViT we use the hidden states the selection happens on: no keys are needed, so any attention
   backend works). There are no text tokens inside the ViT, so there are no text pivots (``pivot_text = 0``);
3. in a deterministic pivot order (L1 norm descending, ties by lower unit index; the reference iterates a Python
   ``set``), each pivot takes its quota of the remaining units LEAST cosine-similar to it (non-duplicates);
   the quotas split the ``keep - pivots`` slots evenly, the remainder to the first pivots;
4. pivots + picks are kept as whole units; the others are dropped. Kept units keep their ids and positions.

The kernel is :func:`tokcomp.ops.dart.dart_select` (shared with the LLM-side DART).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from tokcomp.config import LayerField, StrategyConfig
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.dart import dart_select
from tokcomp.ops.units import unit_features, unit_keep_rows
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import VisionContext, VisionTokens


class DartViTConfig(StrategyConfig):
    """DART-ViT's fields. ``keep_ratio`` (default 0.222 = 1 - DART's default ``reduction_ratio`` 0.778): fraction of
    each segment's units kept; ``num_tokens``: units kept per segment."""

    default_keep_ratio: ClassVar[float] = 0.222

    layer: int | None = LayerField(None, tower="vision",
                                   description="select after this vision block (None: after the last block)")
    pivots: int = Field(4, ge=0, description="pivot units per segment, by L1 norm (DART's pivot_image_token = 4)")


def dart_units(tokens: VisionTokens, keep_of, pivots: int) -> torch.Tensor:
    """Rows of ``tokens`` kept by DART per segment (whole units, CLS always kept), ascending.

    Args:
        tokens: complete units (+ optional CLS rows).
        keep_of: ``n_units -> units kept`` for one segment.
        pivots: pivot units per segment.
    Returns:
        LongTensor[K] row indices, ascending.
    """
    _, rows = tokens.units()
    seg = tokens.segment[rows[:, 0]]
    feat = unit_features(tokens.hidden, rows.to(tokens.hidden.device), "cat")     # [U, u*C]
    l1 = feat.float().abs().sum(-1)
    none = torch.empty(0, dtype=torch.long, device=seg.device)
    kept = [none]
    for s in torch.unique(seg).tolist():
        members = (seg == s).nonzero().squeeze(1)
        local = torch.arange(members.numel(), device=seg.device)
        pick = dart_select(l1[members.to(l1.device)], feat[members.to(feat.device)], local, none,
                           keep_of(int(members.numel())), pivots_image=pivots, pivots_text=0)
        kept.append(members[pick.to(members.device)])
    return unit_keep_rows(torch.cat(kept), rows, tokens.n, always=tokens.cls)


class DartViT(ViTCompressor):
    """DART-ViT (see the module docstring). Unit granularity."""

    name = "dart_vit"
    paper = "https://arxiv.org/abs/2502.11494"
    summary = "DART duplication-aware unit selection (L1 pivots, least-similar picks) inside the vision tower"
    granularity = "unit"
    Config = DartViTConfig
    examples = ({"layer": 1},)                   # inside the tower (the default acts after the last block)

    def after_block(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        at = ctx.depth - 1 if self.config.layer is None else self.config.layer
        if i != at or self.config.is_noop_budget:
            return tokens
        return tokens.select(dart_units(tokens, self.config.keep_count, self.config.pivots))


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(DartViT)
