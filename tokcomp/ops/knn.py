"""Chunked k-nearest-neighbour search and IPCV's Neighbor-Guided Reconstruction (NGR).

Distances are squared L2 in float32: a fast matmul expansion ``|q|^2 + |k|^2 - 2 q.k``
(after centring both sets on the mean key, which removes the large shared offset of ViT
hidden states that would otherwise cost float32 precision) finds candidates, and the
candidates near the k-th distance are re-ranked with exact differences. Queries are
processed in chunks, so memory is O(chunk * K), never O(R * K).

Exact duplicates (flat image regions: many identical tokens) are collapsed first
(:func:`unique_rows`): identical keys tie exactly, so the search runs on the distinct keys and
the duplicates are put back in index order; identical queries share one search. Groups
(:func:`knn` with ``query_group``/``key_group``) are searched one at a time, so several images
cost the sum of their own R x K, not the whole call's.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = ["knn", "knn_where", "neighbor_average", "neighbor_guided_reconstruction", "smallest_k", "unique_rows"]


def unique_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Exact duplicate rows of ``x`` [N, C] (any float dtype, bitwise equality of the float32 values).

    Returns:
        first: LongTensor[U] the index of the first occurrence of every distinct row, ascending.
        inverse: LongTensor[N] for every row, the position in ``first`` of its distinct row.

    One integer hash per row, a sort, and an exact comparison of rows with equal hashes that end up
    adjacent; rows are only merged when bitwise equal (a hash collision merely leaves a duplicate
    unmerged). O(N * C) plus a sort of N integers.
    """
    n = x.shape[0]
    device = x.device
    if n == 0:
        e = torch.empty(0, dtype=torch.long, device=device)
        return e, e
    xf = x.float().contiguous()
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    mult = torch.randint(1, 2**31 - 1, (xf.shape[1],), generator=gen, dtype=torch.long).to(device) * 2 + 1
    step = max(1, (1 << 22) // max(1, xf.shape[1]))
    h = torch.cat([(xf[a:a + step].view(torch.int32).long() * mult).sum(1)   # int64, wraps around: a hash
                   for a in range(0, n, step)])
    order = torch.sort(h, stable=True).indices                 # equal hashes adjacent, in index order
    xs = xf[order]
    same = torch.zeros(n, dtype=torch.bool, device=device)
    same[1:] = (h[order[1:]] == h[order[:-1]]) & (xs[1:] == xs[:-1]).all(1)
    cls_sorted = torch.cumsum(~same, 0) - 1                     # class id along the sorted order
    n_cls = int(cls_sorted[-1]) + 1
    cls = torch.empty(n, dtype=torch.long, device=device)
    cls[order] = cls_sorted
    first_of = torch.full((n_cls,), n, dtype=torch.long, device=device)
    first_of.scatter_reduce_(0, cls, torch.arange(n, device=device), reduce="amin")
    by_first = torch.argsort(first_of)                          # classes ordered by first occurrence
    rank = torch.empty(n_cls, dtype=torch.long, device=device)
    rank[by_first] = torch.arange(n_cls, device=device)
    return first_of[by_first], rank[cls]


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

    Stages per chunk: (1) squared distances by the float32 matmul expansion (centred on the key
    mean) and their top-k; the k-th value plus a rounding bound defines a band that must
    contain every exact top-k key. (2) A query whose band holds more than k keys, or whose
    picks lie within rounding of each other, repeats (1) in float64 (near-duplicates closer
    than float32 rounding); (3) a query still tied there is re-ranked on exact float64
    ``sum((q - k)^2)`` over its float64 band, by (distance, key index). So duplicate keys and a
    query equal to a key (self at distance 0) tie exactly and the lower index wins, which the
    matmul alone cannot promise. Exact duplicates are collapsed before any of this
    (:func:`unique_rows`), so flat regions cost one search per distinct token. Memory stays
    O(chunk * K). Inputs must be finite (squared distances must not overflow float32).
    """
    if (query_group is None) != (key_group is None):
        raise ValueError("give both query_group and key_group, or neither")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    r, n_keys = query.shape[0], keys.shape[0]
    kk = max(0, min(int(k), n_keys))
    if key_group is None:
        return _knn_dedup(query, keys, kk, chunk).to(query.device)
    out = torch.full((r, kk), -1, dtype=torch.long, device=query.device)
    if r == 0 or kk == 0:
        return out
    qg = query_group.to(query.device, torch.long)
    kg = key_group.to(keys.device, torch.long)
    q_order = torch.sort(qg, stable=True).indices
    k_order = torch.sort(kg, stable=True).indices
    q_ids, q_counts = torch.unique_consecutive(qg[q_order], return_counts=True)
    k_ids, k_counts = torch.unique_consecutive(kg[k_order], return_counts=True)
    k_start = dict(zip(k_ids.tolist(), (torch.cumsum(k_counts, 0) - k_counts).tolist()))
    k_len = dict(zip(k_ids.tolist(), k_counts.tolist()))
    q0 = 0
    for gid, qc in zip(q_ids.tolist(), q_counts.tolist()):
        qi = q_order[q0:q0 + qc]
        q0 += qc
        if gid not in k_start:
            continue
        ki = k_order[k_start[gid]:k_start[gid] + k_len[gid]]          # ascending key indices of the group
        local = _knn_dedup(query[qi], keys[ki.to(keys.device)], min(kk, ki.numel()), chunk).to(out.device)
        out[qi, :local.shape[1]] = torch.where(local >= 0, ki.to(out.device)[local.clamp_min(0)], -1)
    return out


def _knn_dedup(query: Tensor, keys: Tensor, kk: int, chunk: int) -> Tensor:
    """:func:`knn` without groups (``kk <= K`` neighbours) on the distinct rows of ``query`` and ``keys``.

    Distinct keys are ordered by first occurrence, so a tie between two distinct keys goes to the lower first
    index; the members of the chosen distinct keys are then re-sorted by (exact distance, index)."""
    r, n_keys = query.shape[0], keys.shape[0]
    if r == 0 or kk == 0:
        return torch.full((r, kk), -1, dtype=torch.long, device=keys.device)
    q_first, q_inv = unique_rows(query)
    k_first, k_inv = unique_rows(keys)
    uq, uk = query[q_first.to(query.device)], keys[k_first.to(keys.device)]
    n_u = uk.shape[0]
    core = knn_where(uq, uk, min(kk, n_u), None, chunk=chunk)               # [Uq, k'] distinct-key indices
    if n_u == n_keys:                                                        # no duplicate keys
        return k_first.to(core.device)[core][q_inv.to(core.device)]
    res = _expand_duplicates(uq, uk, core, k_inv.to(core.device), kk, chunk)
    return res[q_inv.to(res.device)]


def _expand_duplicates(uq: Tensor, uk: Tensor, core: Tensor, k_inv: Tensor, kk: int, chunk: int) -> Tensor:
    """Members (original key indices) of the chosen distinct keys ``core`` [Uq, k'], first ``kk`` by (exact float64
    distance, index). Memory O(chunk * k' * min(kk, largest multiplicity))."""
    dev = core.device
    n_u = uk.shape[0]
    members = torch.sort(k_inv, stable=True).indices                       # keys grouped by class, ascending
    counts = torch.bincount(k_inv, minlength=n_u)
    offset = torch.cumsum(counts, 0) - counts
    m = min(kk, int(counts.max()))
    kq = core.shape[1]
    out = torch.empty(core.shape[0], kk, dtype=torch.long, device=dev)
    step = max(1, chunk * 64 // max(1, kq * m))
    col = torch.arange(m, device=dev)
    uk64 = uk.double()
    for s in range(0, core.shape[0], step):
        c = core[s:s + step]                                                 # [ch, k']
        q = uq[s:s + step].double().to(uk.device)
        delta = torch.stack([((q - uk64[c[:, j].to(uk.device)]) ** 2).sum(1) for j in range(kq)], 1).to(dev)
        ok = col[None, None, :] < counts[c][..., None]                       # [ch, k', m]
        idx = members[(offset[c][..., None] + col).clamp_max(members.numel() - 1)]
        key_d = torch.where(ok, delta[..., None].expand_as(ok), torch.full_like(delta[..., None], float("inf"))
                            .expand_as(ok)).reshape(c.shape[0], -1)
        idx = torch.where(ok, idx, members.numel()).reshape(c.shape[0], -1)
        by_idx = torch.sort(idx, dim=1, stable=True).indices
        by_d = torch.sort(key_d.gather(1, by_idx), dim=1, stable=True).indices
        pick = by_idx.gather(1, by_d)[:, :kk]
        out[s:s + step] = idx.gather(1, pick)
    return out


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
    growth = 2.0 * c_dim**0.5 + 16.0
    tol = growth * _matmul_eps(kf)
    wide: tuple[Tensor, ...] | None = None  # float64 keys, centred keys, centre, |k|^2 (stage 2), built on demand
    pair_batch = max(1, chunk * n_keys // max(c_dim, 1))
    for s in range(0, r, chunk):
        q_raw = query[s : s + chunk].float().to(keys.device)
        mask = None if allowed is None else allowed(s, s + q_raw.shape[0])
        # stage 1: float32 expansion; a row is settled when its band holds exactly the picks and
        # no two picks are within rounding of each other
        idx, unsettled, _ = _expansion_topk(q_raw - centre, kf, k_sq, mask, kk, tol)
        rows = unsettled.nonzero().squeeze(1)
        if rows.numel():
            # stage 2: the same in float64 (near-duplicates, e.g. flat image regions next to textured
            # ones, are closer than float32 rounding of the centred norms); rows still tied there are
            # re-ranked on exact float64 differences, over their (small) float64 band only
            if wide is None:
                k64 = k_raw.double()
                c64 = k64.mean(0, keepdim=True)
                wide = (k64, k64 - c64, c64, ((k64 - c64) ** 2).sum(1))
            k64, kf64, c64, k_sq64 = wide
            tol64 = growth * 2.0**-52
            step = max(1, min(chunk, (1 << 24) // max(n_keys, 1)))
            for a in range(0, rows.numel(), step):
                sub = rows[a : a + step]
                q64 = q_raw[sub].double()
                m_sub = None if mask is None else mask[sub]
                i64, uns64, band64 = _expansion_topk(q64 - c64, kf64, k_sq64, m_sub, kk, tol64)
                again = uns64.nonzero().squeeze(1)
                if again.numel():
                    i64[again] = _exact_rerank(q64[again], k64, band64[again], kk, pair_batch)
                idx[sub] = i64
        out[s : s + chunk] = idx.to(out.device)
    return out


def _expansion_topk(q: Tensor, kf: Tensor, k_sq: Tensor, mask: Tensor | None, kk: int, tol: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``kk`` by the expansion ``|q|^2 + |k|^2 - 2 q.k`` (centred inputs, any float dtype).

    q [m, C], kf [K, C], k_sq [K], mask BoolTensor[m, K] or None -> (idx LongTensor[m, kk] (-1 where fewer
    keys are allowed), unsettled BoolTensor[m], band BoolTensor[m, K]): a row is unsettled when more keys
    than ``kk`` lie within the rounding bound ``tol * (|q|^2 + |k|^2)`` of the k-th, or two picks lie within
    rounding of each other; its exact top-k is inside its band."""
    q_sq = (q * q).sum(1, keepdim=True)
    d = torch.addmm(q_sq + k_sq[None, :], q, kf.T, alpha=-2.0).clamp_min_(0.0)  # [m, K]
    if mask is not None:
        d.masked_fill_(~mask, float("inf"))
    v, ix = torch.topk(d, kk, dim=1, largest=False, sorted=True)
    e_sel = tol * (q_sq + k_sq[ix])  # [m, kk] error bounds of the picked entries
    kth_hi = v[:, -1:] + e_sel.amax(1, keepdim=True)
    band = (d - tol * k_sq[None, :]) <= (kth_hi + tol * q_sq)
    if mask is not None:
        band &= ~torch.isinf(d)
    near_tie = ((v[:, 1:] - v[:, :-1]) <= (e_sel[:, 1:] + e_sel[:, :-1])).any(1)
    unsettled = (band.sum(1) > kk) | near_tie
    return ix.masked_fill(torch.isinf(v), -1), unsettled, band


def _exact_rerank(q: Tensor, k: Tensor, band: Tensor, kk: int, pair_batch: int) -> Tensor:
    """Top-``kk`` of ``band`` entries by exact ``sum((q_i - k_j)^2)`` in float64, ties by index.

    q: [m, C], k: [K, C] float64; band: BoolTensor[m, K] -> LongTensor[m, kk] (-1 padded).
    """
    fmax = torch.finfo(torch.float64).max
    exact = torch.full(band.shape, float("inf"), dtype=torch.float64, device=band.device)
    pairs = band.nonzero()
    for p in range(0, pairs.shape[0], pair_batch):
        i, j = pairs[p : p + pair_batch].unbind(1)
        exact[i, j] = ((q[i] - k[j]) ** 2).sum(1).nan_to_num_(nan=fmax, posinf=fmax)
    idx = smallest_k(exact, kk)
    return idx.masked_fill_(torch.isinf(exact.gather(1, idx)), -1)


def neighbor_average(nn: Tensor, n_keys: int) -> Tensor:
    """The NGR averaging operator of a neighbour table: a sparse CSR matrix ``W [R, n_keys]`` (float32) with
    ``W[i, nn[i, j]] = 1 / (valid neighbours of i)`` for every valid (``>= 0``) entry, so that ``W @ drift`` is each
    row's mean neighbour drift (a row without neighbours: zero). Build it once per neighbour table; applying it is one
    sparse matmul, whatever ``k``."""
    r, k = nn.shape
    valid = nn >= 0
    count = valid.sum(1).clamp_min(1).float()
    rows = torch.arange(r, device=nn.device)[:, None].expand(r, k)[valid]
    cols = nn[valid]
    vals = (1.0 / count)[:, None].expand(r, k)[valid]
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (r, n_keys),
                                  check_invariants=False).coalesce()      # valid by construction
    with warnings.catch_warnings():                 # torch warns once that CSR is "beta"; the ops used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


def neighbor_guided_reconstruction(h0_removed: Tensor, drift_kept: Tensor, nn: Tensor,
                                   average: Tensor | None = None) -> Tensor:
    """IPCV NGR (paper Eq. 3-5): removed tokens follow the mean drift of their kept neighbours.

    ``h_removed_now = h0_removed + mean_j drift_kept[nn[:, j]]`` where
    ``drift_kept = h_kept_now - h_kept_at_prune``.

    Args:
        h0_removed: [R, C] states of the removed tokens at pruning time.
        drift_kept: [K, C] drift of the kept tokens since pruning.
        nn: LongTensor[R, k] indices into the kept tokens (e.g. from :func:`knn`); ``-1``
            entries are padding and are left out of the mean. A row with no valid neighbour
            gets zero drift (its pruning-time state).
        average: :func:`neighbor_average` of ``nn`` (built here if not given; pass it when the same table
            serves several calls, as in IPCV's stabilised blocks).
    Returns:
        [R, C] in ``h0_removed.dtype``; the mean is one sparse matmul in float32 (memory O(R * k + R * C)).
    """
    if drift_kept.shape[0] == 0 or nn.shape[1] == 0:
        return h0_removed.clone()
    if average is None:
        average = neighbor_average(nn.to(drift_kept.device), drift_kept.shape[0])
    drift = torch.sparse.mm(average.to(drift_kept.device), drift_kept.float())
    return (h0_removed.float() + drift.to(h0_removed.device)).to(h0_removed.dtype)
