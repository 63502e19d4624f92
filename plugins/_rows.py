"""Row helpers shared by the LLM pruners (not a strategy): which tokens of a row count as its text."""
from __future__ import annotations

import torch


def text_after_first_visual(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions of the non-visual valid tokens after the first visual token of one row (DART's text pivots,
    SparseVLM's rater candidates, the adapter's ``"text"`` queries).

    Args:
        visual, valid: BoolTensor[L].
    Returns:
        LongTensor[T] ascending (empty if the row has no visual token).
    """
    vis = visual.nonzero()[:, 0]
    if vis.numel() == 0:
        return vis
    after = torch.arange(visual.shape[0], device=visual.device) > vis[0]
    return (after & valid & ~visual).nonzero()[:, 0]
