import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.ops.cluster import dpc_knn, merge_clusters

torch.set_num_threads(1)


def brute_dpc(x, n_clusters, k):
    pts = x.double().tolist()
    n, c_dim = len(pts), len(pts[0])
    c, k = max(1, min(n_clusters, n)), max(1, min(k, n))
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q)) / c_dim) for q in pts] for p in pts]
    density = []
    for i in range(n):
        near = sorted(range(n), key=lambda j: (dist[i][j], j))[:k]
        density.append(math.exp(-sum(dist[i][j] ** 2 for j in near) / k))
    dmax = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(dist[i][j] for j in denser) if denser else dmax)
    score = [delta[i] * density[i] for i in range(n)]
    centers = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:c])
    assign = []
    for i in range(n):
        if i in centers:
            assign.append(centers.index(i))
        else:
            assign.append(min(range(c), key=lambda t: (dist[i][centers[t]], t)))
    return centers, assign


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,c_dim,n_clusters,k", [(1, 3, 1, 1), (2, 2, 1, 1), (9, 4, 3, 3), (20, 5, 4, 4), (25, 8, 7, 5), (12, 3, 20, 30)])
def test_dpc_knn_matches_brute_force(seed, n, c_dim, n_clusters, k):
    g = torch.Generator().manual_seed(seed)
    # a few blobs so the density peaks are meaningful
    centres = torch.randn(3, c_dim, generator=g) * 4
    x = centres[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, c_dim, generator=g) + 10.0
    centers, assign = dpc_knn(x, n_clusters, k, chunk=7 if seed % 2 else 4096)
    want_c, want_a = brute_dpc(x, n_clusters, k)
    assert centers.tolist() == want_c
    assert assign.tolist() == want_a


@pytest.mark.parametrize("seed", range(4))
def test_dpc_knn_duplicates_deterministic(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g) * 3
    x = base[torch.randint(0, 4, (18,), generator=g)]  # exact duplicates: density ties
    for n_clusters, k in [(3, 3), (6, 4), (10, 2)]:
        centers, assign = dpc_knn(x, n_clusters, k)
        want_c, want_a = brute_dpc(x, n_clusters, k)
        assert centers.tolist() == want_c and assign.tolist() == want_a
        again = dpc_knn(x.bfloat16().float(), n_clusters, k)
        assert torch.equal(again[0], dpc_knn(x.bfloat16(), n_clusters, k)[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 30), st.integers(1, 12), st.integers(1, 12))
def test_dpc_knn_properties(seed, n, n_clusters, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    centers, assign = dpc_knn(x, n_clusters, k)
    c = min(n_clusters, n)
    assert centers.shape == (c,) and assign.shape == (n,)
    assert centers.tolist() == sorted(set(centers.tolist()))
    assert assign.min() >= 0 and assign.max() < c
    assert assign[centers].tolist() == list(range(c))  # centres join themselves
    # every point sits with a centre at least as close as any other centre
    d = torch.cdist(x.double(), x[centers].double())
    assert torch.all(d.gather(1, assign[:, None])[:, 0] <= d.min(1).values + 1e-5)


def test_dpc_knn_empty():
    centers, assign = dpc_knn(torch.zeros(0, 3), 2, 2)
    assert centers.numel() == 0 and assign.numel() == 0


def test_merge_clusters_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(15, 4, generator=g)
    assign = torch.randint(0, 5, (15,), generator=g)
    assign[assign == 3] = 4  # cluster 3 empty -> zero row
    got = merge_clusters(x, assign, 5)
    for t in range(5):
        members = [i for i in range(15) if int(assign[i]) == t]
        want = sum(x[i].double() for i in members) / len(members) if members else torch.zeros(4, dtype=torch.float64)
        torch.testing.assert_close(got[t].double(), want, rtol=1e-6, atol=1e-6)
    got16 = merge_clusters(x.bfloat16(), assign, 5)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), got, rtol=2e-2, atol=2e-2)
