import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.ops.knn import knn, neighbor_guided_reconstruction, smallest_k

torch.set_num_threads(1)


def brute_knn(query, keys, k, qg=None, kg=None):
    q, kk = query.double().tolist(), keys.double().tolist()
    kk_eff = min(k, len(kk))
    out = []
    for i, qi in enumerate(q):
        cands = [j for j in range(len(kk)) if qg is None or int(kg[j]) == int(qg[i])]
        cands.sort(key=lambda j: (sum((a - b) ** 2 for a, b in zip(qi, kk[j])), j))
        row = cands[:kk_eff]
        out.append(row + [-1] * (kk_eff - len(row)))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("r,n_keys,c,k", [(1, 1, 3, 1), (7, 5, 4, 3), (20, 12, 8, 10), (30, 6, 5, 10), (0, 4, 3, 2), (5, 0, 3, 2)])
def test_knn_matches_brute_force(seed, r, n_keys, c, k):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(r, c, generator=g) + 5.0  # shared offset, as ViT states have
    keys = torch.randn(n_keys, c, generator=g) + 5.0
    got = knn(query, keys, k)
    assert got.shape == (r, min(k, n_keys)) and got.dtype == torch.long
    assert got.tolist() == brute_knn(query, keys, k)


@pytest.mark.parametrize("seed", range(4))
def test_knn_ties_lower_index_and_chunks(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    keys = base[torch.randint(0, 4, (15,), generator=g)]  # many exact duplicates
    query = torch.cat([torch.randn(9, 6, generator=g), keys[:3]])
    want = brute_knn(query, keys, 7)
    for chunk in (1, 4, 4096):
        assert knn(query, keys, 7, chunk=chunk).tolist() == want


@pytest.mark.parametrize("seed", range(4))
def test_knn_groups_and_padding(seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(25, 5, generator=g)
    keys = torch.randn(14, 5, generator=g)
    qg = torch.randint(0, 4, (25,), generator=g)
    kg = torch.randint(0, 3, (14,), generator=g)  # group 3 has no keys at all
    for k in (1, 4, 20):
        for chunk in (2, 4096):
            got = knn(query, keys, k, query_group=qg, key_group=kg, chunk=chunk)
            assert got.tolist() == brute_knn(query, keys, k, qg, kg)
    got = knn(query, keys, 4, query_group=qg, key_group=kg)
    assert (got[qg == 3] == -1).all()
    with pytest.raises(ValueError):
        knn(query, keys, 2, query_group=qg)


def test_knn_bf16_and_self():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 8, generator=g) * 3 + 100).bfloat16()
    got = knn(x, x, 3)
    assert got.tolist() == brute_knn(x.float(), x.float(), 3)
    assert got[:, 0].tolist() == list(range(16))  # distinct points: self is nearest


def brute_smallest_k(d, k):
    return [sorted(range(len(row)), key=lambda j: (row[j], j))[:k] for row in d.tolist()]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_smallest_k_properties(data):
    r = data.draw(st.integers(0, 6))
    n = data.draw(st.integers(1, 12))
    k = data.draw(st.integers(0, n))
    vals = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, float("inf")]), min_size=r * n, max_size=r * n))
    d = torch.tensor(vals, dtype=torch.float32).view(r, n)
    assert smallest_k(d, k).tolist() == brute_smallest_k(d, k)


# ---------------------------------------------------------------- NGR
def brute_ngr(h0, drift, nn):
    out = h0.double().clone()
    for i in range(h0.shape[0]):
        cols = [j for j in nn[i].tolist() if j >= 0]
        if cols:
            out[i] += sum(drift[j].double() for j in cols) / len(cols)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("r,n_kept,c,k", [(1, 1, 2, 1), (9, 6, 5, 3), (20, 11, 7, 10), (4, 3, 3, 3)])
def test_ngr_matches_brute_force(seed, r, n_kept, c, k):
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(r, c, generator=g)
    drift = torch.randn(n_kept, c, generator=g)
    nn = torch.randint(-1, n_kept, (r, k), generator=g)  # -1 = padding
    nn[0] = -1  # a row without any valid neighbour keeps its pruning-time state
    got = neighbor_guided_reconstruction(h0, drift, nn)
    assert got.dtype == h0.dtype and got.shape == h0.shape
    torch.testing.assert_close(got.double(), brute_ngr(h0, drift, nn), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], h0[0])


def test_ngr_end_to_end_ipcv_like_and_bf16():
    g = torch.Generator().manual_seed(1)
    n, c = 30, 6
    h_at_prune = torch.randn(n, c, generator=g)
    kept = torch.arange(0, n, 3)
    removed = torch.tensor([i for i in range(n) if i % 3])
    h_now_kept = h_at_prune[kept] + 0.1 * torch.randn(len(kept), c, generator=g)
    nn = knn(h_at_prune[removed], h_at_prune[kept], 4)
    got = neighbor_guided_reconstruction(h_at_prune[removed], h_now_kept - h_at_prune[kept], nn)
    want = brute_ngr(h_at_prune[removed], h_now_kept - h_at_prune[kept], torch.tensor(brute_knn(h_at_prune[removed], h_at_prune[kept], 4)))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got16 = neighbor_guided_reconstruction(h_at_prune[removed].bfloat16(), (h_now_kept - h_at_prune[kept]).bfloat16(), nn)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), got, rtol=2e-2, atol=2e-2)
    # no kept tokens at all: identity
    empty = neighbor_guided_reconstruction(h_at_prune[removed], h_now_kept[:0], nn[:, :0])
    assert torch.equal(empty, h_at_prune[removed])


def brute_unique_rows(x):
    rows = [tuple(r) for r in x.float().tolist()]
    first = []
    seen = {}
    inv = []
    for i, r in enumerate(rows):
        if r not in seen:
            seen[r] = len(first)
            first.append(i)
        inv.append(seen[r])
    return first, inv


@pytest.mark.parametrize("seed", range(4))
def test_unique_rows_matches_brute_force(seed):
    from tokcomp.ops.knn import unique_rows
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 7, generator=g)
    x = torch.cat([base[torch.randint(0, 5, (30,), generator=g)], torch.randn(6, 7, generator=g)])
    x = x[torch.randperm(x.shape[0], generator=g)]
    first, inv = unique_rows(x)
    assert (first.tolist(), inv.tolist()) == brute_unique_rows(x)
    first, inv = unique_rows(x[:0])
    assert first.numel() == 0 and inv.numel() == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 30), st.integers(1, 20), st.integers(1, 12), st.booleans())
def test_knn_with_duplicates_and_groups_matches_brute_force(seed, r, n_keys, k, groups):
    """Flat regions: many exact duplicates among keys and queries (also across groups), ties by lower index."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, (4, 3), generator=g).float()
    keys = base[torch.randint(0, 4, (n_keys,), generator=g)]
    query = torch.cat([base, torch.randn(2, 3, generator=g)])[torch.randint(0, 6, (r,), generator=g)]
    qg = kg = None
    if groups:
        qg, kg = torch.randint(0, 3, (r,), generator=g), torch.randint(0, 3, (n_keys,), generator=g)
    got = knn(query, keys, k, query_group=qg, key_group=kg, chunk=3)
    assert got.tolist() == brute_knn(query, keys, k, qg, kg)


def test_knn_all_identical_is_index_order():
    x = torch.ones(50, 16) * 3.0
    assert knn(x[:7], x, 5).tolist() == [[0, 1, 2, 3, 4]] * 7
