"""A complete one-shot LLM pruner plugin: keep the visual tokens whose hidden state has the largest norm."""
import torch

from tokcomp import ScorePruner, hookimpl


class HiddenNorm(ScorePruner):
    """Before decoder layer K (``layer``, default 2), keep each row's visual tokens of largest layer-(K-1) norm."""

    name = "hidden_norm"
    summary = "largest hidden-state norm at layer K-1 (example third-party LLM pruner)"

    def score(self, step, ctx) -> torch.Tensor:
        return step.hidden.float().norm(dim=-1)      # [B, L]: larger is kept


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(HiddenNorm)
