"""ToFu: Token Fusion (Kim, Gao, Hsu, Shen, Jin; WACV 2024; arXiv 2312.01026), at unit granularity.

ToFu keeps ToMe's matching (:mod:`tokcomp.plugins.tome`: whole units, head-averaged keys, bipartite soft matching
per segment over ToMe's sequence order (``order``, default ``"tome"``), the same ``r`` schedule and proportional
attention) and changes the merge rule per block:

* blocks ``< merge_from_layer``: **prune** -- the matched source unit is dropped, the destination keeps its
  features unchanged; sizes add up (``size_dst += size_src``, so proportional attention still counts the area);
* blocks ``>= merge_from_layer``: **MLERP merge** -- ``x = xbar / ||xbar|| * max_i ||x_i||`` with
  ``xbar`` the size-weighted mean of the destination and its sources (patch-wise), which keeps feature norms where
  averaging would shrink them.

**Unverified** (no official code exists; the paper body could not be read): the switch layer (the paper picks it per
model from a linearity probe ``||f((a+b)/2) - (f(a)+f(b))/2||``; our default, half the tower, is a project choice),
whether prune mode adds the source's size to the destination (we do), and the exact MLERP weighting (we weight by
size, like ToMe's average).
"""
from __future__ import annotations

from torch import Tensor

from tokcomp.config import LayerField
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.matching import Match, merge_mlerp, prune_matched
from tokcomp.plugins.tome import ToMe, ToMeConfig
from tokcomp.tokens import VisionContext


class ToFuConfig(ToMeConfig):
    """ToMe's fields plus the prune/merge switch."""

    merge_from_layer: int | None = LayerField(
        None, tower="vision", ge=0,
        description="blocks before this one prune (drop the matched source unit), blocks from it on merge by MLERP; "
                    "None: half the tower (depth // 2). UNVERIFIED default: the paper picks it per model")


class ToFu(ToMe):
    """ToFu (see the module docstring). Unit granularity."""

    name = "tofu"
    paper = "https://arxiv.org/abs/2312.01026"
    summary = "ToMe matching; prune in early blocks, norm-preserving MLERP merging in later ones"
    Config = ToFuConfig

    _KEY = "tofu"

    def switch_layer(self, ctx: VisionContext) -> int:
        """First block that merges by MLERP (blocks before it prune)."""
        m = self.config.merge_from_layer
        return ctx.depth // 2 if m is None else m

    def merge(self, x: Tensor, size: Tensor, match: Match, i: int, ctx: VisionContext) -> tuple[Tensor, Tensor]:
        if i < self.switch_layer(ctx):
            return prune_matched(x, size, match)
        return merge_mlerp(x, size, match)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(ToFu)
