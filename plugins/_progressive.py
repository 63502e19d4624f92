"""Shared budget logic of the progressive LLM pruners (V²Drop, SparseVLM, LUVC-SPU); not a strategy itself.

A progressive pruner prunes at several *stages*. Stage ``(l, n)`` means: decoder layers from ``l`` on run on
``n`` visual tokens; the pruner is called after layer ``l - 1`` (``prune_layers`` returns ``l - 1``). Layers are
numbered as FastV's / DART's ``K`` ("prune before layer l"), for every method, whatever the paper's own wording.

Budget (DESIGN.md §3): unless an explicit ``schedule`` is given, a row with N visual tokens gets per-stage
counts whose layer-averaged count equals that of a one-shot pruner at layer ``K = 2`` keeping
``keep_count(N)`` (``K*N + (L-K)*k`` token-layers), up to rounding each stage's count to an integer. The
counts come from :func:`tokcomp.ops.schedule.fit_fractions` along the method's anchor schedules (its paper's
schedules scaled to the depth, plus the extremes), so the paper's schedule is reproduced exactly at the
keep_ratio whose one-shot area equals the paper schedule's area.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator, model_validator

from tokcomp.config import StrategyConfig
from tokcomp.errors import ConfigError
from tokcomp.ops.schedule import check_schedule, fit_fractions, one_shot_area, schedule_area, stage_counts
from tokcomp.ops.select import top_visual
from tokcomp.strategy import LLMPruner
from tokcomp.tokens import LLMContext, LLMStep, Selection

#: the one-shot layer K whose layer-averaged count a progressive schedule matches (DESIGN.md §3)
ONE_SHOT_LAYER = 2


class ProgressiveConfig(StrategyConfig):
    """Base config: a budget (matched to a one-shot pruner at K=2) or an explicit ``schedule``."""

    schedule: list[tuple[int, float]] | None = Field(
        None, description="explicit stages [[layer, fraction], ...]: before decoder `layer`, keep `fraction` of the "
                          "ORIGINAL visual tokens (cumulative, non-increasing; layers strictly increasing, >= 1); "
                          "replaces keep_ratio/num_tokens")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v):
        return None if v is None else check_schedule(v)

    @model_validator(mode="after")
    def _schedule_xor_budget(self):
        if self.schedule is not None and ({"keep_ratio", "num_tokens"} & self.model_fields_set):
            raise ValueError("give either an explicit schedule or a budget (keep_ratio / num_tokens), not both; "
                             "fix: drop one of them")
        return self


def paper_keep_ratio(layers: tuple[int, ...], fractions: tuple[float, ...], depth: int) -> float:
    """The keep_ratio whose one-shot area (K=2) equals the area of a paper schedule at the paper's depth."""
    return (schedule_area(layers, fractions, depth) - ONE_SHOT_LAYER) / (depth - ONE_SHOT_LAYER)


class ProgressivePruner(LLMPruner):
    """Base of the progressive pruners: stage layers, per-row stage counts, the stage of a step.

    A score-only progressive pruner writes ``default_layers``, ``anchors`` and ``score(step, ctx) -> Tensor[B, L]``;
    the default ``select`` keeps each row's stage budget of best-scored visual tokens (ties by lower position)."""

    #: minimum visual tokens a stage keeps per row (V²Drop's ``max(1, ...)``; SPU may reach 0)
    minimum: ClassVar[int] = 1

    # -- to override -------------------------------------------------------------------------------------
    def default_layers(self, n_layers: int) -> list[int]:
        """Stage layers (prune before) for an LLM of ``n_layers`` layers when no schedule is given."""
        raise NotImplementedError

    def anchors(self, layers: list[int], n_layers: int) -> list[list[float]]:
        """Anchor fraction vectors (one value per stage) that :func:`fit_fractions` interpolates between."""
        raise NotImplementedError

    # -- schedule -----------------------------------------------------------------------------------------
    def stage_layers(self, n_layers: int) -> list[int]:
        """Layers before which the pruner prunes (the explicit schedule's, or the method's defaults)."""
        if self.config.schedule is not None:
            return [layer for layer, _ in self.config.schedule]
        return self.default_layers(n_layers)

    def plan(self, n_visual: int, n_layers: int) -> list[int]:
        """Visual tokens kept after each stage for a row with ``n_visual`` visual tokens (same order as
        :meth:`stage_layers`)."""
        layers = self.stage_layers(n_layers)
        if self.config.schedule is not None:
            fractions = [f for _, f in self.config.schedule]
        else:
            target = one_shot_area(self.config.keep_count(n_visual), n_visual, n_layers, ONE_SHOT_LAYER)
            fractions = fit_fractions(layers, n_layers, self.anchors(layers, n_layers), target)
        return stage_counts(n_visual, fractions, self.minimum)

    def prune_layers(self, n_layers: int) -> list[int]:
        if self.config.schedule is None and self.config.is_noop_budget:
            return []
        return [layer - 1 for layer in self.stage_layers(n_layers)]

    def validate(self, depths: dict[str, int], family: str = "") -> None:
        super().validate(depths, family=family)
        depth = depths.get("llm")
        if depth is not None and self.config.schedule is not None:
            bad = [layer for layer, _ in self.config.schedule if layer > depth - 1]
            if bad:
                raise ConfigError(f"{self.name}: schedule layer(s) {bad} out of range for this language model, which "
                                  f"has {depth} layers (prune points 1..{depth - 1}); fix: choose layers < {depth}")

    # -- per step -----------------------------------------------------------------------------------------
    def stage_budget(self, step: LLMStep, ctx: LLMContext | None = None) -> list[int]:
        """Per row, the visual tokens to keep after ``step.layer`` (the stage before layer ``step.layer + 1``)."""
        layers = self.stage_layers(step.n_layers)
        if step.layer + 1 not in layers:
            raise ValueError(f"{self.name}: layer {step.layer} is not a prune point of this schedule "
                             f"(prune_layers = {[x - 1 for x in layers]})")
        stage = layers.index(step.layer + 1)
        return [self.plan(int(n), step.n_layers)[stage] for n in step.n_visual_original.tolist()]

    def score(self, step: LLMStep, ctx: LLMContext) -> torch.Tensor:
        """Tensor[B, L]: how much each current token deserves to stay (only visual entries are read)."""
        raise NotImplementedError

    def select(self, step: LLMStep, ctx: LLMContext) -> Selection:
        with torch.no_grad():
            score = self.score(step, ctx)
        return Selection(keep=top_visual(score, step.visual, self.stage_budget(step, ctx)))


def scaled_paper_anchors(layers: list[int], paper: list[tuple[float, ...]]) -> list[list[float]]:
    """Paper fraction vectors truncated to the stages that survived scaling, plus all-zeros and all-ones."""
    m = len(layers)
    return [[0.0] * m] + [list(p[:m]) for p in paper] + [[1.0] * m]


__all__ = ["ONE_SHOT_LAYER", "ProgressiveConfig", "ProgressivePruner", "paper_keep_ratio", "scaled_paper_anchors"]
