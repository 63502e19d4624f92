"""A complete third-party tokcomp plugin in one file: keep the units with the largest feature norm.

``l2norm`` is a real (if simple) vision compressor: after vision block ``layer`` it scores every unit (an LLM-token
group of patches) by the mean L2 norm of its patch features and keeps the top ones of every image / frame / tile.
Because it keeps whole units, the LLM receives fewer visual tokens at their original positions.
"""
from __future__ import annotations

import torch
from pydantic import Field


from tokcomp.config import LayerField, StrategyConfig
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.select import topk_per_segment
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import VisionContext, VisionTokens


class L2NormConfig(StrategyConfig):
    default_keep_ratio = 0.5
    layer: int = LayerField(0, tower="vision", description="select after this vision block")
    largest: bool = Field(True, description="keep the largest-norm units (False: the smallest)")


class L2Norm(ViTCompressor):
    name = "l2norm"
    summary = "keep the units with the largest mean feature norm (example third-party plugin)"
    granularity = "unit"
    Config = L2NormConfig

    def after_block(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        if i != self.config.layer or self.config.is_noop_budget:
            return tokens
        ids, rows = tokens.units()                                   # [U], [U, u]
        score = tokens.hidden[rows].float().norm(dim=-1).mean(-1)    # [U]
        if not self.config.largest:
            score = -score
        seg = ctx.layout.unit_segment.to(ids.device)[ids]
        n_seg = ctx.layout.n_segments
        sizes = torch.bincount(seg, minlength=n_seg)
        k = torch.tensor([self.config.keep_count(int(n)) if n else 0 for n in sizes.tolist()], device=ids.device)
        kept = topk_per_segment(score.cpu(), seg.cpu(), k.cpu()).to(ids.device)
        keep_rows = torch.cat([tokens.cls.nonzero()[:, 0], rows[kept].reshape(-1)]).sort().values
        return tokens.select(keep_rows)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(L2Norm)


__all__ = ["L2Norm", "L2NormConfig", "tokcomp_register"]
