"""Density-peaks clustering with kNN density (DPC-kNN) and cluster merging (SparseVLM recycling).

Follows SparseVLM's ``utils.cluster_and_merge`` (itself TCFormer's ``cluster_dpc_knn``) with
the random tie-breaking noise replaced by a deterministic order, and the n x n distance
matrix replaced by row chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .knn import knn, knn_where
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
       (found with :func:`knn_where`, exact re-ranking), and for the densest point the
       largest pairwise distance.
    3. centres = the ``n_clusters`` largest ``delta * rho`` (ties by lower index).
    4. every point joins its nearest centre (ties: lower centre index); centres join
       themselves.

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

    nn = knn(xf, xf, k, chunk=chunk)  # [n, k], self included (distance 0)
    sq = torch.zeros(n, dtype=torch.float32, device=device)
    for j in range(k):
        sq += ((xf - xf[nn[:, j]]) ** 2).sum(1)
    density = torch.exp(-(sq * inv_c) / k)

    # rank[i] = position in (density desc, index asc); denser <=> lower rank
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[stable_order(density)] = torch.arange(n, device=device)
    parent = knn_where(xf, xf, 1, lambda a, b: rank[None, :] < rank[a:b, None], chunk=chunk)[:, 0]
    dmax = torch.zeros((), dtype=torch.float32, device=device)
    for s in range(0, n, max(1, chunk)):
        dmax = torch.maximum(dmax, _pair_sqdist(xf[s : s + chunk], xf).max())
    has = parent >= 0  # only the densest point has no denser one
    delta = (((xf - xf[parent.clamp_min(0)]) ** 2).sum(1) * inv_c).sqrt()
    delta = torch.where(has, delta, (dmax * inv_c).sqrt())

    centers = torch.sort(stable_order(delta * density)[:c]).values
    assign = knn(xf, xf[centers], 1, chunk=chunk)[:, 0]
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
