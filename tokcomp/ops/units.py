"""Unit-level helpers: lift decisions about whole units (2x2 patch groups) to their token rows.

A *unit* is the group of ``u`` patches that becomes one LLM token (Qwen2-VL's PatchMerger group, InternVL's
pixel-shuffle group). Unit-granularity compressors (ToMe, ToFu, DART-ViT, LUVC-OIM) decide on units and then merge
or drop whole units, patch-wise: patch ``j`` (TL, TR, BL, BR) of a source unit goes into patch ``j`` of its
destination unit, so every surviving unit still has all ``u`` patches for the merger.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .matching import Match

__all__ = ["unit_features", "unit_match_rows", "unit_keep_rows"]


def unit_features(x: Tensor, rows: Tensor, reduce: str = "mean") -> Tensor:
    """Per-unit features from token features.

    Args:
        x: [N, C] token features (hidden states or keys).
        rows: LongTensor[U, u] token rows of each unit (patch order TL, TR, BL, BR).
        reduce: ``"mean"`` (mean over the unit's patches, [U, C]) or ``"cat"`` (concatenation, [U, u*C]).
    Returns:
        [U, C] or [U, u*C] in ``x.dtype``.
    """
    g = x[rows.to(x.device)]  # [U, u, C]
    if reduce == "mean":
        return g.mean(1)
    if reduce == "cat":
        return g.reshape(g.shape[0], -1)
    raise ValueError(f"reduce must be 'mean' or 'cat', not {reduce!r}")


def unit_match_rows(match: Match, rows: Tensor, n: int) -> Match:
    """Expand a unit-level :class:`Match` to a token-row-level one.

    Args:
        match: ``src``/``dst`` index the first axis of ``rows`` (units); ``match.keep`` is ignored.
        rows: LongTensor[U, u] token rows of each unit, same patch order for every unit.
        n: number of token rows in the set ``rows`` indexes (CLS and other non-unit rows included).
    Returns:
        :class:`Match` over token rows: ``src`` ascending, ``dst[i]`` the row at the same patch slot of the
        destination unit, ``keep`` every row not in ``src``, ascending.
    """
    device = rows.device
    src = rows[match.src.to(device)].reshape(-1)
    dst = rows[match.dst.to(device)].reshape(-1)
    order = torch.argsort(src)
    src, dst = src[order], dst[order]
    removed = torch.zeros(n, dtype=torch.bool, device=device)
    removed[src] = True
    return Match(src, dst, (~removed).nonzero().squeeze(1))


def unit_keep_rows(keep_units: Tensor, rows: Tensor, n: int, always: Tensor | None = None) -> Tensor:
    """Token rows to keep when keeping the units ``keep_units`` (plus the rows ``always``, e.g. CLS).

    Args:
        keep_units: LongTensor[K] indices into the first axis of ``rows``.
        rows: LongTensor[U, u]; n: number of token rows; always: optional BoolTensor[N] rows kept regardless.
    Returns:
        LongTensor[K*u + #always] ascending (the original row order is preserved).
    """
    mask = torch.zeros(n, dtype=torch.bool, device=rows.device)
    mask[rows[keep_units.to(rows.device)].reshape(-1)] = True
    if always is not None:
        mask |= always.to(rows.device)
    return mask.nonzero().squeeze(1)
