"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV'24): one-shot LLM pruning by the last
prompt token's attention.

Before decoder layer K, every row keeps the visual tokens that received the most attention from the row's LAST
prompt token at layer K-1, averaged over heads (the official code ranks by that one row; issue #14). The
attention row is computed by the adapter beside SDPA / flash for that one layer only (``attention_queries``),
never an L x L matrix and never a global eager mode. Text tokens are always kept; the budget is per row.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from tokcomp.config import LayerField, StrategyConfig
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.select import stable_order
from tokcomp.strategy import LLMPruner
from tokcomp.tokens import LLMStep, Selection


class FastVConfig(StrategyConfig):
    """FastV: K = ``layer`` (paper and README: K=2), keep_ratio = kept fraction after layer K (paper: R=50 %
    dropped, so 0.5 kept)."""

    default_keep_ratio: ClassVar[float] = 0.5

    layer: int = LayerField(2, tower="llm", ge=1,
                            description="K: prune before decoder layer K, ranking by layer K-1's attention "
                                        "(paper: 2)")


def last_query_scores(attn: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the last query row.

    Args:
        attn: Tensor[B, H, R, L] softmax rows (R >= 1; the last row is the last prompt token).
    Returns:
        float32 Tensor[B, L].
    """
    return attn[:, :, -1, :].float().mean(1)


class FastV(LLMPruner):
    """Keep each row's visual tokens most attended by its last prompt token at layer K-1."""

    name = "fastv"
    paper = "https://arxiv.org/abs/2403.06764"
    summary = "last-token attention at layer K-1 (head mean), top-k visual tokens kept before layer K"
    Config = FastVConfig
    needs_attention_rows = True
    needs_keys = False
    flash_compatible = True  # rows are computed beside the kernel, only at layer K-1

    def prune_layers(self, n_layers: int) -> list[int]:
        return [] if self.config.is_noop_budget else [self.config.layer - 1]

    def attention_queries(self, layer: int) -> str | None:
        return "last" if layer == self.config.layer - 1 else None

    def select(self, step: LLMStep, ctx: dict[str, Any]) -> Selection:
        if step.attn is None:
            raise ValueError("fastv needs attention rows of the last prompt token (step.attn is None); the adapter "
                             "must serve attention_queries(layer) == 'last'")
        with torch.no_grad():
            score = last_query_scores(step.attn)  # [B, L]
            keep = []
            for b in range(step.visual.shape[0]):
                pos = step.visual[b].nonzero()[:, 0]
                k = min(self.config.keep_count(int(step.n_visual_original[b])), pos.numel()) if pos.numel() else 0
                chosen = stable_order(score[b].to(pos.device)[pos])[:k]
                keep.append(torch.sort(pos[chosen]).values)
        return Selection(keep=keep)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(FastV)
