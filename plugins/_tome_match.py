"""ToMe's matching on whole units (used by :mod:`tokcomp.plugins.tome` and :mod:`tokcomp.plugins.tofu`): the general
per-segment path with unit-id bookkeeping (:func:`unit_bipartite_match`) and the dense path for equal segments, whose
sequence stays as token rows between blocks (:class:`DenseSequence`, :func:`dense_match_rows`). Both give the same
pairs and sequence; see docs/methods/tome.md."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokcomp.ops.matching import Match, bipartite_dense, matching_per_segment
from tokcomp.ops.units import unit_features
from tokcomp.tokens import VisionTokens


def unit_bipartite_match(tokens: VisionTokens, keys: Tensor, r_per_segment: Tensor,
                         seq: Tensor | None = None) -> tuple[Match, Tensor]:
    """ToMe's matching on whole units.

    Args:
        tokens: the current token set (complete units, optional CLS rows).
        keys: [N, d] head-averaged keys of this block.
        r_per_segment: LongTensor[S] units to remove per segment.
        seq: None: the units alternate in unit order and CLS rows never take part ("spatial"). Otherwise
            LongTensor[U_all] (indexed by unit id): each unit's position in ToMe's sequence of its segment; the
            CLS rows then stand first in their segment's sequence (in row order) and take part as protected
            tokens, as ToMe's ``class_token``.
    Returns:
        (unit-level :class:`Match` indexing the rows of ``rows``; with ``seq``, its ``order`` holds each surviving
        unit's position in the sequence ToMe's merge returns (CLS rows counted), ``rows`` LongTensor[U, u] from
        :meth:`VisionTokens.units`).
    """
    ids, rows = tokens.units()
    seg = tokens.segment[rows[:, 0]]
    metric = unit_features(keys, rows.to(keys.device), "mean")
    if seq is None:
        return matching_per_segment(metric, seg.to(metric.device), r_per_segment), rows
    dev = metric.device
    cls_rows = tokens.cls.nonzero()[:, 0]
    n_cls = int(cls_rows.numel())
    items_metric = torch.cat([keys[cls_rows.to(keys.device)].to(metric.dtype), metric])
    items_seg = torch.cat([tokens.segment[cls_rows], seg]).to(dev)
    key = torch.cat([cls_rows - tokens.n, seq.to(ids.device)[ids]]).to(dev)       # CLS first, in row order
    perm = torch.sort(key, stable=True).indices
    perm = perm[torch.sort(items_seg[perm], stable=True).indices]
    protected = (perm < n_cls)
    m = matching_per_segment(items_metric[perm], items_seg[perm], r_per_segment.to(dev), protected)
    src, dst = perm[m.src] - n_cls, perm[m.dst] - n_cls                             # never CLS (protected)
    by_src = torch.argsort(src)
    src, dst = src[by_src], dst[by_src]
    kept_items = perm[m.keep]
    unit_kept = kept_items >= n_cls
    by_unit = torch.argsort(kept_items[unit_kept])
    keep = (kept_items[unit_kept] - n_cls)[by_unit]
    order = m.order[unit_kept][by_unit]
    return Match(src, dst, keep, order), rows


#: the dense path's score matrices ([S, n/2, n/2] float32) stay below this many entries (128 MiB, one chunk of the
#: general path at 8k B tokens); larger sets (a 16k-patch ViT image) take the chunked general path
DENSE_MAX_SCORES = 1 << 25


@dataclass(eq=False)
class DenseSequence:
    """ToMe's sequence of every segment as token rows, for a token set of S segments that hold the same number of
    units (and of CLS rows), segments in ascending order: one image, or a batch of equal images (the common case).

    Attributes:
        origin: the ``origin`` tensor of the token set described (identity: the set the last dense merge returned).
        cls: LongTensor[S, P] rows of each segment's protected items (CLS, registers); P = 0 with order "spatial".
        units: LongTensor[S, n_u, u] rows of each unit, units in sequence order, patches in unit order.
    """

    origin: Tensor
    cls: Tensor
    units: Tensor


def dense_sequence(tokens: VisionTokens, seq: Tensor | None, n_segments: int) -> DenseSequence | None:
    """The :class:`DenseSequence` of ``tokens`` (``seq``: each unit's sequence position by unit id, None for the
    spatial order), or None when the segments are not equal (then :func:`unit_bipartite_match` serves)."""
    ids, rows = tokens.units()
    U, S = int(ids.numel()), n_segments
    if U == 0 or S == 0 or U % S:
        return None
    n_u = U // S
    want = torch.arange(S, device=rows.device).repeat_interleave(n_u)
    if not torch.equal(tokens.segment[rows[:, 0]], want):
        return None
    cls = rows.new_empty(S, 0)
    if seq is not None:
        cls_rows = tokens.cls.nonzero()[:, 0]
        P = int(cls_rows.numel()) // S
        if P * S != cls_rows.numel() or not torch.equal(tokens.segment[cls_rows], want[::n_u].repeat_interleave(P)):
            return None
        cls = cls_rows.view(S, P)
    units = rows.view(S, n_u, -1)
    if seq is not None:
        perm = torch.sort(seq.to(ids.device)[ids].view(S, n_u), dim=1, stable=True).indices
        units = units.gather(1, perm[..., None].expand(-1, -1, units.shape[2]))
    return DenseSequence(tokens.origin, cls, units)


def dense_match_rows(keys: Tensor, d: DenseSequence, r: int, spatial: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One block of ToMe's matching on a :class:`DenseSequence` through ToMe's dense computation
    (:func:`tokcomp.ops.matching.bipartite_dense`): the same pairs as :func:`unit_bipartite_match`.

    Args:
        keys: [N, d] head-averaged keys; d: the token set's sequence; r: units removed per segment
            (``1 <= r <= n_u // 2``); spatial: the next sequence keeps unit order (else ToMe's merge order).
    Returns:
        ``(src LongTensor[S*r*u] rows ascending, dst [S*r*u] the row each merges into (same patch slot),
        units LongTensor[S, n_u - r, u] the surviving units' rows in the next block's sequence, old row numbers)``.
    """
    S, n_u, u = d.units.shape
    P = d.cls.shape[1]
    dev = keys.device
    units = d.units.to(dev)
    metric = keys[units].mean(2) if u > 1 else keys[units[..., 0]]      # unit_features' mean (exact for u = 1)
    if P:
        metric = torch.cat([keys[d.cls.to(dev)].to(metric.dtype), metric], 1)
    src, dst, seq_new = bipartite_dense(metric, r, P)                    # item positions per segment
    grow = (-1, -1, u)
    src_rows = units.gather(1, (src - P)[..., None].expand(*grow)).reshape(-1)
    dst_rows = units.gather(1, (dst - P)[..., None].expand(*grow)).reshape(-1)
    by = torch.argsort(src_rows)
    if spatial:
        gone = torch.zeros(S, n_u, dtype=torch.bool, device=dev).scatter_(1, src - P, True)
        nxt = units[~gone].view(S, n_u - r, u)
    else:
        nxt = units.gather(1, (seq_new[:, P:] - P)[..., None].expand(*grow))
    return src_rows[by], dst_rows[by], nxt
