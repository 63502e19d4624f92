"""V²Drop (Chen, Liu, Wen et al., "Variation-aware Vision Token Dropping for Faster Large Vision-Language
Models", arXiv 2509.01552): progressive, attention-free LLM pruning by token variation.

A token's *variation* at a stage before layer l is the L2 norm of layer l-1's update of it,
``||hidden_out - hidden_in||_2`` (the reference's ``||x_l - x_{l-1}||``). At each stage every row keeps its
most-varying visual tokens (all images / frames of the row compete together) and drops the least-varying ones.

Schedule. The official Qwen2-VL code (28 layers) prunes before layers {3, 16, 22}, keeping 25 %, then 5 % of
that, then none of the visual tokens (``max(1, ...)``: one survives). As cumulative fractions of the original
count: (0.25, 0.0125, 0), minimum one token. On another depth the layers scale proportionally
(``tokcomp.ops.schedule.scale_layers``). The budget follows ``plugins/_progressive.py``: the per-stage fractions
are interpolated between "drop all", the paper's schedule and "keep all" so the layer-averaged count equals a
one-shot pruner's at K=2; the default keep_ratio (≈0.1663) is the one at which this reproduces the paper's
schedule exactly on a 28-layer LLM. An explicit ``schedule`` replaces all of this.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from tokcomp.hookspecs import hookimpl
from tokcomp.ops.schedule import scale_layers
from tokcomp.plugins._progressive import ProgressiveConfig, ProgressivePruner, paper_keep_ratio, scaled_paper_anchors
from tokcomp.tokens import LLMContext, LLMStep

#: official Qwen2-VL schedule (Qwen2VL_V2Drop/modeling_qwen2_vl_self.py): prune before these layers of 28
PAPER_DEPTH = 28
PAPER_LAYERS = (3, 16, 22)
#: cumulative keep fractions of the original visual count: 0.25, 0.25 * 0.05, 0 (then max(1, .))
PAPER_FRACTIONS = (0.25, 0.25 * 0.05, 0.0)


class V2DropConfig(ProgressiveConfig):
    """V²Drop: budget matched to a one-shot K=2 pruner (default: the paper's Qwen2-VL schedule), or ``schedule``."""

    default_keep_ratio: ClassVar[float] = paper_keep_ratio(PAPER_LAYERS, PAPER_FRACTIONS, PAPER_DEPTH)


def variation(hidden: torch.Tensor, hidden_in: torch.Tensor) -> torch.Tensor:
    """Per-token variation ``||hidden - hidden_in||_2`` in float32.

    Args:
        hidden, hidden_in: Tensor[..., D] output and input of one decoder layer.
    Returns:
        float32 Tensor[...].
    """
    return (hidden.float() - hidden_in.float()).norm(dim=-1)


class V2Drop(ProgressivePruner):
    """Drop the least-varying visual tokens at a schedule of layers."""

    name = "v2drop"
    paper = "https://arxiv.org/abs/2509.01552"
    summary = "progressive: drops the visual tokens a layer changed least (L2 update), at paper-scaled layers"
    Config = V2DropConfig
    needs_attention_rows = False
    needs_keys = False
    flash_compatible = True
    minimum = 1  # the reference keeps max(1, .) visual tokens

    def default_layers(self, n_layers: int) -> list[int]:
        return scale_layers(PAPER_LAYERS, PAPER_DEPTH, n_layers)

    def anchors(self, layers: list[int], n_layers: int) -> list[list[float]]:
        return scaled_paper_anchors(layers, [PAPER_FRACTIONS])

    def score(self, step: LLMStep, ctx: LLMContext) -> torch.Tensor:
        return variation(step.hidden, step.hidden_in)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(V2Drop)
