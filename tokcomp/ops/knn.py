"""Chunked k-nearest-neighbour search and IPCV's Neighbor-Guided Reconstruction (NGR).

Distances are squared L2 in float32: a fast matmul expansion ``|q|^2 + |k|^2 - 2 q.k``
(after centring both sets on the mean key, which removes the large shared offset of ViT
hidden states that would otherwise cost float32 precision) finds candidates, and the
candidates near the k-th distance are re-ranked with exact differences. Queries are
processed in chunks, so memory is O(chunk * K), never O(R * K).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["knn", "knn_where", "neighbor_guided_reconstruction", "smallest_k"]


def smallest_k(d: Tensor, k: int) -> Tensor:
    """Column indices of the ``k`` smallest entries of each row, deterministic.

    Args:
        d: [R, K] float tensor without NaN (``inf`` allowed).
        k: ``0 <= k <= K``.
    Returns:
        LongTensor[R, k] ordered by (value ascending, column index ascending): among equal
        values the lower column always wins, unlike bare ``torch.topk``.

    ``torch.topk`` only supplies the k-th value per row; the set is then rebuilt exactly:
    everything strictly below it plus the lowest-indexed entries equal to it.
    """
    r, n = d.shape
    if k == 0 or r == 0:
        return torch.empty(r, k, dtype=torch.long, device=d.device)
    thr = torch.topk(d, k, dim=1, largest=False, sorted=True).values[:, -1:]
    below = d < thr
    at = d == thr
    room = k - below.sum(1, keepdim=True)
    chosen = below | (at & (torch.cumsum(at, 1, dtype=torch.int32) <= room))
    cols = chosen.nonzero()[:, 1].view(r, k)  # row-major: ascending column within a row
    order = torch.sort(d.gather(1, cols), dim=1, stable=True).indices
    return cols.gather(1, order)


def _matmul_eps(t: Tensor) -> float:
    """Unit roundoff of a float32 matmul on ``t``'s device under the current precision flags."""
    if t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    if torch.get_float32_matmul_precision() != "highest":
        return 2.0**-8
    return 2.0**-24


def knn(
    query: Tensor,
    keys: Tensor,
    k: int,
    *,
    query_group: Tensor | None = None,
    key_group: Tensor | None = None,
    chunk: int = 4096,
) -> Tensor:
    """The ``k`` nearest keys (L2) of every query.

    Args:
        query: [R, C] any float dtype (computed in float32; inputs must be finite).
        keys: [K, C].
        k: number of neighbours; the result has ``min(k, K)`` columns.
        query_group / key_group: optional LongTensor[R] / LongTensor[K] (both or neither);
            a query only considers keys of its own group (same image, frame, tile).
        chunk: queries processed at once; peak extra memory is O(chunk * K).
    Returns:
        LongTensor[R, min(k, K)] of key indices, nearest first, ties broken by the lower key
        index. When a query's group has fewer than ``min(k, K)`` keys, its valid neighbours
        come first and the rest of the row is ``-1``.

    Two stages per chunk: (1) squared distances by the matmul expansion (centred on the key
    mean) and their top-k; the k-th value plus a rounding bound defines a band that must
    contain every exact top-k key. (2) A query whose band holds more than k keys, or whose
    picks lie within rounding of each other, is re-ranked on exact float32 ``sum((q - k)^2)``
    over its band, by (distance, key index). So duplicate keys and a query equal to a key
    (self at distance 0) tie exactly and the lower index wins, which the matmul alone cannot
    promise. On generic data almost no row needs stage 2; on heavily duplicated inputs (flat
    image regions) many do, and stage 2 is batched so memory stays O(chunk * K). Inputs must
    be finite (squared distances must not overflow float32).
    """
    if (query_group is None) != (key_group is None):
        raise ValueError("give both query_group and key_group, or neither")
    allowed = None
    if key_group is not None:
        kg = key_group.to(keys.device)
        qg = query_group.to(keys.device)
        allowed = lambda a, b: qg[a:b, None] == kg[None, :]  # noqa: E731
    return knn_where(query, keys, k, allowed, chunk=chunk)


def knn_where(
    query: Tensor,
    keys: Tensor,
    k: int,
    allowed: Callable[[int, int], Tensor] | None,
    *,
    chunk: int = 4096,
) -> Tensor:
    """:func:`knn` restricted by an arbitrary pair mask, built one query chunk at a time.

    ``allowed(a, b)`` returns BoolTensor[b - a, K]: which keys queries ``a..b-1`` may use
    (``None``: all). Same output, tie rule and ``-1`` padding as :func:`knn`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    r, n_keys = query.shape[0], keys.shape[0]
    kk = max(0, min(int(k), n_keys))
    out = torch.full((r, kk), -1, dtype=torch.long, device=query.device)
    if r == 0 or kk == 0:
        return out
    c_dim = keys.shape[1]
    k_raw = keys.float()
    centre = k_raw.mean(0, keepdim=True)
    kf = k_raw - centre
    k_sq = (kf * kf).sum(1)
    # rounding bound of the expansion relative to |q|^2 + |k|^2 (probabilistic sqrt(C) growth;
    # measured float32 GEMM error is ~10x below it)
    tol = (2.0 * c_dim**0.5 + 16.0) * _matmul_eps(kf)
    pair_batch = max(1, chunk * n_keys // max(c_dim, 1))
    for s in range(0, r, chunk):
        q_raw = query[s : s + chunk].float().to(keys.device)
        q = q_raw - centre
        q_sq = (q * q).sum(1, keepdim=True)
        d = torch.addmm(q_sq + k_sq[None, :], q, kf.T, alpha=-2.0).clamp_min_(0.0)  # [ch, K]
        if allowed is not None:
            d.masked_fill_(~allowed(s, s + q.shape[0]), float("inf"))
        # stage 1: approximate top-k and the band that must contain the exact top-k
        v, ix = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        e_sel = tol * (q_sq + k_sq[ix])  # [ch, kk] error bounds of the picked entries
        kth_hi = v[:, -1:] + e_sel.amax(1, keepdim=True)
        band = (d - tol * k_sq[None, :]) <= (kth_hi + tol * q_sq)
        if allowed is not None:
            band &= ~torch.isinf(d)
        # a row is settled when its band holds exactly the picks and no two picks are
        # within rounding of each other; otherwise it is re-ranked on exact distances
        near_tie = ((v[:, 1:] - v[:, :-1]) <= (e_sel[:, 1:] + e_sel[:, :-1])).any(1)
        unsettled = (band.sum(1) > kk) | near_tie
        idx = ix.masked_fill(torch.isinf(v), -1)
        rows = unsettled.nonzero().squeeze(1)
        if rows.numel():
            idx[rows] = _exact_rerank(q_raw[rows], k_raw, band[rows], kk, pair_batch)
        out[s : s + chunk] = idx.to(out.device)
    return out


def _exact_rerank(q: Tensor, k: Tensor, band: Tensor, kk: int, pair_batch: int) -> Tensor:
    """Top-``kk`` of ``band`` entries by exact float32 ``sum((q_i - k_j)^2)``, ties by index.

    q: [m, C], k: [K, C] float32; band: BoolTensor[m, K] -> LongTensor[m, kk] (-1 padded).
    """
    fmax = torch.finfo(torch.float32).max
    exact = torch.full(band.shape, float("inf"), dtype=torch.float32, device=band.device)
    pairs = band.nonzero()
    for p in range(0, pairs.shape[0], pair_batch):
        i, j = pairs[p : p + pair_batch].unbind(1)
        exact[i, j] = ((q[i] - k[j]) ** 2).sum(1).nan_to_num_(nan=fmax, posinf=fmax)
    idx = smallest_k(exact, kk)
    return idx.masked_fill_(torch.isinf(exact.gather(1, idx)), -1)


def neighbor_guided_reconstruction(h0_removed: Tensor, drift_kept: Tensor, nn: Tensor) -> Tensor:
    """IPCV NGR (paper Eq. 3-5): removed tokens follow the mean drift of their kept neighbours.

    ``h_removed_now = h0_removed + mean_j drift_kept[nn[:, j]]`` where
    ``drift_kept = h_kept_now - h_kept_at_prune``.

    Args:
        h0_removed: [R, C] states of the removed tokens at pruning time.
        drift_kept: [K, C] drift of the kept tokens since pruning.
        nn: LongTensor[R, k] indices into the kept tokens (e.g. from :func:`knn`); ``-1``
            entries are padding and are left out of the mean. A row with no valid neighbour
            gets zero drift (its pruning-time state).
    Returns:
        [R, C] in ``h0_removed.dtype``; the mean is accumulated in float32, one neighbour
        column at a time (memory O(R * C), not O(R * k * C)).
    """
    r, c = h0_removed.shape
    if drift_kept.shape[0] == 0 or nn.shape[1] == 0:
        return h0_removed.clone()
    acc = torch.zeros(r, c, dtype=torch.float32, device=h0_removed.device)
    count = torch.zeros(r, 1, dtype=torch.float32, device=h0_removed.device)
    for j in range(nn.shape[1]):
        col = nn[:, j].to(drift_kept.device)
        valid = (col >= 0)[:, None]
        picked = drift_kept.index_select(0, col.clamp_min(0)).float()
        acc += torch.where(valid, picked, torch.zeros((), dtype=torch.float32, device=picked.device))
        count += valid
    return (h0_removed.float() + acc / count.clamp_min(1.0)).to(h0_removed.dtype)
