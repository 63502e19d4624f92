"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
EMNLP'25): one-shot, duplication-aware LLM pruning, attention-free.

Before decoder layer K, per row: pivots = the ``pivots_image`` visual tokens and the ``pivots_text`` text tokens
with the largest key L1 norm at layer K-1 (post-RoPE keys; GQA: the un-repeated KV heads give the same ranking),
then, pivot by pivot (key-norm order, deterministic), the remaining visual tokens LEAST cosine-similar to the
pivot on the final-normed layer K-1 hidden states (official code; ``norm=False`` is IPCV's un-normed variant).
Selection kernel: :func:`tokcomp.ops.dart.dart_select` (exactly the budget, remainder to the first pivots).

Deviations from the reference code (fixes): every visual token of the row counts (all images and frames, not
only the first span); "text" = every non-visual valid token after the row's first visual token; the pivot order
is deterministic (the reference iterates a Python set).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from tokcomp.config import PruneLayer, StrategyConfig
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.dart import dart_select
from tokcomp.plugins._rows import text_after_first_visual
from tokcomp.strategy import LLMPruner
from tokcomp.tokens import LLMContext, LLMStep, Selection


class DARTConfig(StrategyConfig):
    """DART: K = ``layer`` (official scripts: 2 for LLaVA, Qwen2-VL, Qwen2.5-VL), 4 + 4 pivots, keep_ratio 0.222
    (the code's default ``reduction_ratio=0.778``)."""

    default_keep_ratio: ClassVar[float] = 0.222

    layer: int = PruneLayer(2, description="K: prune before decoder layer K using layer K-1's keys and hidden states "
                                        "(official: 2)")
    pivots_image: int = Field(4, ge=0, le=64, description="visual pivot tokens (official: 4)")
    pivots_text: int = Field(4, ge=0, le=64, description="text pivot tokens, used only as references (official: 4)")
    norm: bool = Field(True, description="compare final-normed hidden states (official DART); false: raw states "
                                         "(IPCV's variant)")


def key_l1(keys: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's key over KV heads and channels.

    Args:
        keys: Tensor[B, H_kv, L, hd] post-RoPE keys.
    Returns:
        float32 Tensor[B, L].
    """
    return keys.float().abs().sum(dim=(1, 3))


class DART(LLMPruner):
    """Keep key-norm pivots plus, per pivot, the visual tokens least similar to it (non-duplicates)."""

    name = "dart"
    paper = "https://arxiv.org/abs/2502.11494"
    summary = "duplication-aware: key-norm pivots, then the tokens least cosine-similar to each pivot, before layer K"
    Config = DARTConfig
    needs_attention_rows = False
    needs_keys = True
    flash_compatible = True

    def prune_layers(self, n_layers: int) -> list[int]:
        return [] if self.config.is_noop_budget else [self.config.layer - 1]

    def select(self, step: LLMStep, ctx: LLMContext) -> Selection:
        if step.keys is None:
            raise ValueError("dart needs the post-RoPE keys of layer K-1 (step.keys is None); the adapter must serve "
                             "needs_keys")
        cfg = self.config
        with torch.no_grad():
            l1 = key_l1(step.keys)  # [B, L]
            hidden = step.hidden
            if cfg.norm and step.norm is not None:
                hidden = step.norm(hidden)
            keep = []
            for b in range(step.visual.shape[0]):
                pos = step.visual[b].nonzero()[:, 0]
                if pos.numel() == 0:
                    keep.append(pos)
                    continue
                k = min(cfg.keep_count(int(step.n_visual_original[b])), pos.numel())
                text = text_after_first_visual(step.visual[b], step.valid[b])
                keep.append(dart_select(l1[b], hidden[b], pos, text, k, cfg.pivots_image, cfg.pivots_text))
        return Selection(keep=keep)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(DART)
