"""Density-peaks clustering with kNN density (DPC-kNN) and cluster merging (SparseVLM recycling).

Follows SparseVLM's ``utils.cluster_and_merge`` (itself TCFormer's ``cluster_dpc_knn``) with
the random tie-breaking noise replaced by a deterministic order, the n x n distance matrix
replaced by row chunks, and exact duplicates collapsed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .knn import knn, knn_where, unique_rows
from .select import stable_order

__all__ = ["dpc_knn", "merge_clusters"]


def _pair_sqdist(a: Tensor, b: Tensor) -> Tensor:
    """Squared L2 distances [A, B] of float32 rows (inputs already centred), clamped >= 0."""
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def dpc_knn(x: Tensor, n_clusters: int, k: int, *, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Density-peaks clustering.

    Distances are ``||x_i - x_j||_2 / sqrt(C)`` (as in SparseVLM), in float32.

    1. density ``rho_i = exp(-mean of squared distance to its k nearest points)``; the k
       nearest include the point itself (distance 0), as in the reference.
    2. order: j is "denser" than i if ``rho_j > rho_i``, or equal and ``j < i`` (replaces the
       reference's random 1e-6 noise); ``delta_i`` = distance to the nearest denser point
       (found with :func:`knn_where`, exact re-ranking, ties to the lower index), and for the
       densest point the largest pairwise distance.
    3. centres = the ``n_clusters`` largest ``delta * rho`` (ties by lower index).
    4. every point joins its nearest centre (ties: lower centre index); centres join
       themselves.

    Cost: two passes over the pairwise distances in row chunks (one matmul each: the density's
    k smallest and the largest distance, then the nearest denser point) plus a kNN against the
    centres; the density sums the matmul distances of the k nearest (float32 rounding, as the
    reference's ``cdist``). Exact duplicates (flat regions) are collapsed first
    (:func:`~tokcomp.ops.knn.unique_rows`): a duplicate has its first occurrence's density and,
    being later in the order, that first occurrence as nearest denser point (``delta = 0``).

    Args:
        x: [n, C] points (any float dtype).
        n_clusters: clamped to ``[1, n]``.
        k: neighbours for the density, clamped to ``[1, n]`` (SparseVLM uses ``k = n_clusters``).
        chunk: rows per distance block; memory O(chunk * n).
    Returns:
        centers: LongTensor[c] point indices, ascending.
        assign: LongTensor[n] cluster id in ``[0, c)`` (position in ``centers``).
    """
    n, c_dim = x.shape
    device = x.device
    if n == 0:
        e = torch.empty(0, dtype=torch.long, device=device)
        return e, e
    c = max(1, min(int(n_clusters), n))
    k = max(1, min(int(k), n))
    xf = x.float()
    xf = xf - xf.mean(0, keepdim=True)
    inv_c = 1.0 / max(c_dim, 1)
    first, inv = unique_rows(xf)
    u = xf[first]
    n_u = u.shape[0]
    mult = torch.bincount(inv, minlength=n_u).to(torch.float32)

    # pass 1: density over the k nearest points (duplicates counted with their multiplicity), largest distance
    kk = min(k, n_u)
    sums = torch.empty(n_u, dtype=torch.float32, device=device)
    dmax = torch.zeros((), dtype=torch.float32, device=device)
    step = max(1, chunk)
    for s in range(0, n_u, step):
        d = _pair_sqdist(u[s:s + step], u)                                  # [ch, U]
        rows = torch.arange(d.shape[0], device=device)
        d[rows, rows + s] = 0.0                                             # self: exactly 0
        dmax = torch.maximum(dmax, d.max())
        v, ix = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        m = mult[ix]
        take = (k - (torch.cumsum(m, 1) - m)).clamp(min=0.0).minimum(m)
        sums[s:s + step] = (take * v).sum(1)
    density_u = torch.exp(-(sums * inv_c) / k)
    density = density_u[inv]

    # pass 2: nearest denser point; only first occurrences need a search (a duplicate's is its first occurrence)
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[stable_order(density)] = torch.arange(n, device=device)
    r_u = rank[first]
    parent_u = knn_where(u, u, 1, lambda a, b: r_u[None, :] < r_u[a:b, None], chunk=chunk)[:, 0]
    has = parent_u >= 0                                                     # only the densest has none
    delta_u = (((u - u[parent_u.clamp_min(0)]) ** 2).sum(1) * inv_c).sqrt()
    delta_u = torch.where(has, delta_u, (dmax * inv_c).sqrt())
    is_first = torch.zeros(n, dtype=torch.bool, device=device)
    is_first[first] = True
    delta = torch.where(is_first, delta_u[inv], torch.zeros((), dtype=torch.float32, device=device))

    centers = torch.sort(stable_order(delta * density)[:c]).values
    assign = knn(u, xf[centers], 1, chunk=chunk)[:, 0][inv]
    assign[centers] = torch.arange(c, device=device)
    return centers, assign


def merge_clusters(x: Tensor, assign: Tensor, c: int) -> Tensor:
    """Uniform mean of the points of each cluster.

    Args:
        x: [n, C]; assign: LongTensor[n] in ``[0, c)``; c: number of clusters.
    Returns:
        [c, C] in x.dtype (float32 accumulation); an empty cluster gives a zero row.
    """
    assign = assign.to(device=x.device, dtype=torch.long)
    total = torch.zeros(c, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, assign, x.float())
    count = torch.bincount(assign, minlength=c).to(torch.float32).clamp_min(1.0)
    return (total / count[:, None]).to(x.dtype)
