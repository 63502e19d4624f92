"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV'24): one-shot LLM pruning by the last
prompt token's attention.

Before decoder layer K, every row keeps the visual tokens that received the most attention from the row's LAST
prompt token at layer K-1, averaged over heads (the official code ranks by that one row; issue #14). The
attention row is computed by the adapter beside SDPA / flash for that one layer only (``attention_queries``),
never an L x L matrix and never a global eager mode. Text tokens are always kept; the budget is per row.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from tokcomp.config import PruneLayer
from tokcomp.hookspecs import hookimpl
from tokcomp.strategy import ScorePruner, ScorePrunerConfig
from tokcomp.tokens import LLMContext, LLMStep


class FastVConfig(ScorePrunerConfig):
    """FastV: K = ``layer`` (paper and README: K=2), keep_ratio = kept fraction after layer K (paper: R=50 %
    dropped, so 0.5 kept)."""

    default_keep_ratio: ClassVar[float] = 0.5

    layer: int = PruneLayer(2, description="K: prune before decoder layer K, ranking by layer K-1's attention "
                                           "(paper: 2)")


def last_query_scores(attn: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the last query row.

    Args:
        attn: Tensor[B, H, R, L] softmax rows (R >= 1; the last row is the last prompt token).
    Returns:
        float32 Tensor[B, L].
    """
    return attn[:, :, -1, :].float().mean(1)


class FastV(ScorePruner):
    """Keep each row's visual tokens most attended by its last prompt token at layer K-1."""

    name = "fastv"
    paper = "https://arxiv.org/abs/2403.06764"
    summary = "last-token attention at layer K-1 (head mean), top-k visual tokens kept before layer K"
    Config = FastVConfig
    attention = "last"        # rows computed beside the kernel, only at layer K-1: flash-compatible
    examples = ({}, {"layer": 3})

    def score(self, step: LLMStep, ctx: LLMContext) -> torch.Tensor:
        if step.attn is None:
            raise ValueError("fastv needs attention rows of the last prompt token (step.attn is None); the adapter "
                             "must serve attention_queries(layer) == 'last'")
        return last_query_scores(step.attn)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(FastV)
