"""Budgets and top-k selection within segments (images, frames, tiles).

All functions are pure and device-agnostic. Scores are compared in float32 (exact for
bf16/fp16 inputs), and ties are always broken by the lower token index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["keep_count", "topk_per_segment", "segment_of", "stable_order", "top_visual"]


def keep_count(
    n: int,
    keep_ratio: float | None = None,
    num_tokens: int | None = None,
    minimum: int = 1,
) -> int:
    """Number of tokens to keep out of ``n``; exactly one of ``keep_ratio`` / ``num_tokens``.

    - ``keep_ratio`` (``0 <= r <= 1``): ``floor(n * r + 0.5)`` (round half up, not Python's
      banker's rounding, so 0.5 always rounds up), then clamped to ``[minimum, n]``; if
      ``n < minimum`` the result is ``n``.
    - ``num_tokens`` (``>= 0``): ``min(num_tokens, n)``; ``minimum`` is NOT applied, so an
      explicit ``num_tokens=0`` means "drop all".
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if (keep_ratio is None) == (num_tokens is None):
        raise ValueError("give exactly one of keep_ratio and num_tokens")
    if num_tokens is not None:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return min(int(num_tokens), n)
    if not (0.0 <= keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    k = math.floor(n * keep_ratio + 0.5)
    return min(max(k, minimum), n)


def stable_order(score: Tensor, descending: bool = True) -> Tensor:
    """Permutation sorting ``score`` [N] by value, ties by lower index -> LongTensor[N].

    Computed in float32; NaN sorts last (treated as the worst score in either direction).
    """
    s = score.float()
    worst = float("-inf") if descending else float("inf")
    s = torch.where(torch.isnan(s), torch.full_like(s, worst), s)
    return torch.sort(s, descending=descending, stable=True).indices


def top_visual(score: Tensor, visual: Tensor, budgets: list[int]) -> list[Tensor]:
    """Per row, the ``budgets[b]`` visual positions with the highest score (an LLM pruner's top-k).

    Args:
        score: Tensor[B, L] any float dtype (compared in float32; NaN ranks lowest); non-visual entries are ignored.
        visual: BoolTensor[B, L] candidate (visual) positions.
        budgets: visual tokens to keep per row (clamped to the row's visual count).
    Returns:
        per row, LongTensor[k_b] ascending positions; ties are broken by the lower position.
    """
    out = []
    for b, budget in enumerate(budgets):
        pos = visual[b].nonzero()[:, 0]
        k = max(0, min(int(budget), pos.numel()))
        chosen = stable_order(score[b].to(pos.device)[pos])[:k]
        out.append(torch.sort(pos[chosen]).values)
    return out


def topk_per_segment(score: Tensor, segment: Tensor, k: Tensor | int) -> Tensor:
    """Indices of the ``k[s]`` highest scores within each segment ``s``.

    Args:
        score: [N] any float dtype (compared in float32; NaN ranks lowest).
        segment: LongTensor[N], segment id of each token in ``[0, S)``; segments need not be
            contiguous.
        k: LongTensor[S] per-segment budget (values < 0 count as 0, values > segment size keep
            the whole segment), or an int applied to every segment.
    Returns:
        LongTensor[K] of token indices, sorted ascending (original order), K = sum_s min(k_s, n_s).
        Ties are broken by the lower index.

    Vectorised: one stable sort by score (descending), one stable sort by segment, then the
    rank within the segment is compared with the segment's budget.
    """
    n = score.shape[0]
    device = score.device
    segment = segment.to(device=device, dtype=torch.long)
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if isinstance(k, int):
        n_seg = int(segment.max()) + 1
        k = torch.full((n_seg,), k, dtype=torch.long, device=device)
    k = k.to(device=device, dtype=torch.long)
    if int(segment.min()) < 0 or int(segment.max()) >= k.shape[0]:
        raise ValueError("segment ids must lie in [0, len(k))")
    order = stable_order(score, descending=True)  # by score, ties by index
    order = order[torch.sort(segment[order], stable=True).indices]  # group by segment
    seg_sorted = segment[order]
    counts = torch.bincount(segment, minlength=k.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - starts[seg_sorted]
    chosen = order[rank < k[seg_sorted]]
    return torch.sort(chosen).values


def segment_of(cu_seqlens: Tensor, idx: Tensor) -> Tensor:
    """Segment id of each token index, given cumulative segment boundaries.

    Args:
        cu_seqlens: [S+1] ascending boundaries, ``cu[0] = 0``; segment ``s`` is
            ``[cu[s], cu[s+1])``. Any integer dtype (Qwen2-VL uses int32).
        idx: LongTensor[M] token indices in ``[0, cu[-1])``.
    Returns:
        LongTensor[M], ``s`` such that ``cu[s] <= idx < cu[s+1]``.

    Uses ``searchsorted(cu, idx, right=True) - 1`` so that ``idx == cu[s]`` (the first token
    of segment s) maps to ``s``; empty segments are skipped correctly. The IPCV reference code
    uses ``right=False``, which assigns the first token of every segment >= 1 to the previous
    segment (e.g. ``cu=[0,100,200]``: index 100 -> frame 0); do not repeat that.
    """
    cu = cu_seqlens.to(device=idx.device, dtype=torch.long)
    return torch.searchsorted(cu, idx.to(torch.long), right=True) - 1
