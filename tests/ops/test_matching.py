import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.ops.matching import (
    Match,
    bipartite_dense,
    bipartite_soft_matching,
    matching_per_segment,
    merge_mlerp,
    merge_weighted,
    prune_matched,
    r_schedule,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- brute-force references
def _cos(u, v):
    nu = max(math.sqrt(sum(a * a for a in u)), 1e-12)
    nv = max(math.sqrt(sum(b * b for b in v)), 1e-12)
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def brute_match_one(metric, r, protected):
    """Returns (src, dst) as local index lists, src ascending."""
    m = metric.double().tolist()
    n = len(m)
    a_set = [i for i in range(0, n, 2) if not protected[i]]
    b_set = [j for j in range(1, n, 2) if not protected[j]]
    r = min(r, (n - sum(protected)) // 2, len(a_set) if b_set else 0)
    r = max(r, 0)
    if r == 0:
        return [], []
    best = {}
    for a in a_set:
        sims = [(_cos(m[a], m[b]), b) for b in b_set]
        top = max(s for s, _ in sims)
        best[a] = (top, min(b for s, b in sims if s == top))
    order = sorted(a_set, key=lambda a: (-best[a][0], a))
    src = sorted(order[:r])
    return src, [best[a][1] for a in src]


def brute_match_segments(metric, segment, r_seg, protected):
    n = metric.shape[0]
    prot = protected.tolist() if protected is not None else [False] * n
    src, dst = [], []
    for s in range(len(r_seg)):
        members = [i for i in range(n) if int(segment[i]) == s]
        if not members:
            continue
        ls, ld = brute_match_one(metric[members], int(r_seg[s]), [prot[i] for i in members])
        src += [members[i] for i in ls]
        dst += [members[i] for i in ld]
    pairs = sorted(zip(src, dst))
    src = [p[0] for p in pairs]
    dst = [p[1] for p in pairs]
    keep = [i for i in range(n) if i not in set(src)]
    return src, dst, keep


def check_match(match, src, dst, keep):
    assert match.src.tolist() == src
    assert match.dst.tolist() == dst
    assert match.keep.tolist() == keep


def brute_order(metric, segment, r_seg, protected, match):
    """Each survivor's position in the sequence ToMe's merge returns, per segment (written from tome/merge.py:
    ``cat([unm, dst])`` with CLS/distill first, ``unm`` sorted when there is a class token, else in ``edge_idx``
    order = best score descending), or the input order when the segment merges nothing."""
    m = metric.double().tolist()
    prot = protected.tolist() if protected is not None else [False] * len(m)
    removed = set(match.src.tolist())
    pos = {}
    for s in range(len(r_seg)):
        members = [i for i in range(len(m)) if int(segment[i]) == s]
        if not any(i in removed for i in members):
            pos.update({i: p for p, i in enumerate(members)})
            continue
        a = [i for k, i in enumerate(members) if k % 2 == 0 and not prot[i]]
        b = [i for k, i in enumerate(members) if k % 2 == 1 and not prot[i]]
        best = {i: max(_cos(m[i], m[j]) for j in b) for i in a}
        first = [i for i in members if prot[i]]
        unm = [i for i in a if i not in removed]
        if not first:
            unm = sorted(unm, key=lambda i: (-best[i], i))
        pos.update({i: p for p, i in enumerate(first + unm + b)})
    return [pos[i] for i in match.keep.tolist()]


# ---------------------------------------------------------------- matching
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,r", [(0, 3), (1, 1), (2, 1), (7, 2), (16, 8), (16, 20), (25, 5), (40, 0)])
def test_bipartite_matches_brute_force(seed, n, r):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(n, 6, generator=g)
    protected = torch.rand(n, generator=g) < 0.15
    protected[:1] = True  # CLS-like
    for prot in (None, protected):
        got = bipartite_soft_matching(metric, r, protected=prot)
        pl = prot.tolist() if prot is not None else [False] * n
        ls, ld = brute_match_one(metric, r, pl)
        check_match(got, ls, ld, [i for i in range(n) if i not in ls])


def test_bipartite_ties_lower_index():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # A = 0, 2, 4 ; B = 1, 3, 5 ; rows 0/2/4 identical, B rows 1 and 3 identical
    metric = torch.stack([v[0], v[0], v[0], v[0], v[0], v[1]])
    got = bipartite_soft_matching(metric, 2)
    assert got.src.tolist() == [0, 2] and got.dst.tolist() == [1, 1]
    assert got.keep.tolist() == [1, 3, 4, 5]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,n_seg", [(12, 1), (30, 3), (45, 5), (9, 4)])
def test_matching_per_segment_matches_brute_force(seed, n, n_seg):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(n, 5, generator=g)
    segment = torch.randint(0, n_seg, (n,), generator=g)  # interleaved, not contiguous
    protected = torch.rand(n, generator=g) < 0.2
    r_seg = torch.randint(0, 8, (n_seg,), generator=g)
    for chunk in (1, 3, 4096):
        got = matching_per_segment(metric, segment, r_seg, protected, chunk=chunk)
        check_match(got, *brute_match_segments(metric, segment, r_seg, protected))
        assert got.order.tolist() == brute_order(metric, segment, r_seg, protected, got)
    got = matching_per_segment(metric, segment, r_seg)
    assert got.order.tolist() == brute_order(metric, segment, r_seg, None, got)
    got = matching_per_segment(metric, segment, 3)
    check_match(got, *brute_match_segments(metric, segment, [3] * (int(segment.max()) + 1), None))


def _dense_as_match(items, r, P):
    """bipartite_dense's positions as a Match over the flattened [S*n] items (for comparison)."""
    S, n, _ = items.shape
    src, dst, seq = bipartite_dense(items, r, P)
    base = (torch.arange(S) * n)[:, None]
    src, dst = (src + base).reshape(-1), (dst + base).reshape(-1)
    by = torch.argsort(src)
    pos = torch.full((S, n), -1, dtype=torch.long).scatter_(1, seq, torch.arange(n - r).expand(S, -1)).reshape(-1)
    keep = (pos >= 0).nonzero()[:, 0]
    return Match(src[by], dst[by], keep, pos[keep])


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(2, 41), st.integers(0, 3), st.integers(1, 30), st.integers(0, 2**16),
       st.sampled_from(["random", "flat", "clusters", "nan"]))
def test_bipartite_dense_equals_matching_per_segment(S, n_free, P, r, seed, kind):
    """The dense fast path (equal segments, protected prefix) returns exactly what the general matching returns:
    the same pairs, survivors and ToMe sequence, exact ties (flat and clustered features) and NaN included."""
    g = torch.Generator().manual_seed(seed)
    n = n_free + P
    if kind == "random":
        items = torch.randn(S, n, 6, generator=g)
    else:
        items = torch.ones(S, n, 6) + (torch.rand(S, n, 6, generator=g) < (0.0 if kind == "flat" else 0.15)) * 0.5
        if kind == "nan":
            items[:, P + 1] = float("nan")
    r = min(r, n_free // 2)
    if r == 0:
        return
    got = _dense_as_match(items, r, P)
    segment = torch.arange(S).repeat_interleave(n)
    protected = (torch.arange(n) < P).repeat(S)
    want = matching_per_segment(items.reshape(S * n, -1), segment, torch.full((S,), r), protected)
    assert torch.equal(got.src, want.src) and torch.equal(got.dst, want.dst)
    assert torch.equal(got.keep, want.keep) and torch.equal(got.order, want.order)


def test_bipartite_dense_matches_official_sequence():
    """Hand-checked case: CLS first (P=1), A = 0,2,4,6, B = 1,3,5; r=1 merges the A item most similar to a B item;
    the returned sequence is [CLS, unmerged A in input order, all B] as ToMe's merge with a class token."""
    e = torch.eye(3)
    items = torch.stack([e[0], e[1], e[2], e[2], e[0] + e[1], e[1] * 2, e[0] - e[1]])[None]
    src, dst, seq = bipartite_dense(items, 1, 1)
    assert src.tolist() == [[2]] and dst.tolist() == [[3]]           # item 2 == item 3 (cosine 1)
    assert seq.tolist() == [[0, 4, 6, 1, 3, 5]]


def test_matching_no_partner_and_bf16():
    # only protected B tokens: nothing can merge even though r > 0
    metric = torch.randn(4, 3)
    got = bipartite_soft_matching(metric, 1, protected=torch.tensor([False, True, False, True]))
    assert got.r == 0 and got.keep.tolist() == [0, 1, 2, 3]
    x = torch.randn(20, 8)
    a = bipartite_soft_matching(x.bfloat16(), 5)
    b = bipartite_soft_matching(x.bfloat16().float(), 5)
    assert torch.equal(a.src, b.src) and torch.equal(a.dst, b.dst)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_matching_properties(data):
    n = data.draw(st.integers(0, 40))
    n_seg = data.draw(st.integers(1, 4))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    metric = torch.randint(-2, 3, (n, 3), generator=g).float()  # ties and zero vectors
    segment = torch.randint(0, n_seg, (n,), generator=g)
    protected = torch.rand(n, generator=g) < 0.3
    r_seg = torch.randint(0, 25, (n_seg,), generator=g)
    m = matching_per_segment(metric, segment, r_seg, protected)
    src, dst, keep = m.src.tolist(), m.dst.tolist(), m.keep.tolist()
    assert not protected[m.src].any() and not protected[m.dst].any()
    assert src == sorted(set(src)) and keep == sorted(keep)
    assert sorted(src + keep) == list(range(n))
    assert not set(dst) & set(src)
    assert torch.equal(segment[m.src], segment[m.dst])
    size = torch.bincount(segment, minlength=n_seg)
    n_prot = torch.bincount(segment[protected], minlength=n_seg)
    per_seg = torch.bincount(segment[m.src], minlength=n_seg)
    assert (per_seg <= torch.minimum(r_seg, (size - n_prot) // 2)).all()


# ---------------------------------------------------------------- merges
def brute_groups(match, n):
    groups = {int(d): [int(d)] for d in match.dst}
    for s, d in zip(match.src.tolist(), match.dst.tolist()):
        groups[d].append(s)
    return groups


def brute_merge(x, size, match, mode):
    x, size = x.double(), size.double()
    out, sizes = [], []
    groups = brute_groups(match, x.shape[0])
    for i in match.keep.tolist():
        g = groups.get(i, [i])
        w = size[g]
        mean = (x[g] * w[:, None]).sum(0) / w.sum()
        if mode == "wavg":
            row = mean
        elif mode == "mlerp":
            row = mean / mean.norm() * max(float(x[j].norm()) for j in g) if len(g) > 1 else x[i]
        else:  # prune
            row = x[i]
        out.append(row)
        sizes.append(w.sum())
    return torch.stack(out), torch.stack(sizes)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode", ["wavg", "mlerp", "prune"])
def test_merges_match_brute_force(seed, mode):
    g = torch.Generator().manual_seed(seed)
    n = 24
    x = torch.randn(n, 7, generator=g)
    size = torch.randint(1, 5, (n,), generator=g).float()
    metric = torch.randn(n, 4, generator=g)
    metric[1::2] = metric[0:1]  # many A tokens share a dst (multi-source groups)
    metric[3::2] += torch.randn(n // 2 - 1, 4, generator=g)
    match = bipartite_soft_matching(metric, 10)
    fn = {"wavg": merge_weighted, "mlerp": merge_mlerp, "prune": prune_matched}[mode]
    got_x, got_s = fn(x, size, match)
    want_x, want_s = brute_merge(x, size, match, mode)
    assert got_x.shape == (n - match.r, 7) and got_x.dtype == x.dtype and got_s.dtype == size.dtype
    torch.testing.assert_close(got_x.double(), want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_s.double(), want_s)
    assert float(got_s.sum()) == float(size.sum())  # total size conserved


@pytest.mark.parametrize("fn", [merge_weighted, merge_mlerp, prune_matched])
def test_merges_bf16_untouched_rows_identical(fn):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(18, 5, generator=g).bfloat16()
    size = torch.ones(18)
    match = bipartite_soft_matching(torch.randn(18, 4, generator=g), 4)
    out, s = fn(x, size, match)
    assert out.dtype == torch.bfloat16
    untouched = [p for p, i in enumerate(match.keep.tolist()) if i not in set(match.dst.tolist())]
    assert torch.equal(out[untouched], x[match.keep][untouched])
    empty = Match(match.src[:0], match.dst[:0], torch.arange(18))
    out0, s0 = fn(x, size, empty)
    assert torch.equal(out0, x) and torch.equal(s0, size)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 30), st.integers(0, 15))
def test_mlerp_norm_and_direction(seed, n, r):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * torch.rand(n, 1, generator=g) * 5
    size = torch.rand(n, generator=g) + 0.1
    match = bipartite_soft_matching(torch.randn(n, 3, generator=g), r)
    out, new_size = merge_mlerp(x, size, match)
    wavg, wsize = merge_weighted(x, size, match)
    torch.testing.assert_close(new_size, wsize)
    groups = brute_groups(match, n)
    pos = {int(i): p for p, i in enumerate(match.keep.tolist())}
    for d, members in groups.items():
        want_norm = max(float(x[j].norm()) for j in members)
        assert abs(float(out[pos[d]].norm()) - want_norm) <= 1e-4 * max(want_norm, 1)
        cos = torch.nn.functional.cosine_similarity(out[pos[d]], wavg[pos[d]], dim=0)
        assert float(cos) > 1 - 1e-5


# ---------------------------------------------------------------- r schedule
def halving_floor(n, layers):
    for _ in range(layers):
        n -= n // 2
    return n


def simulate(n, sched):
    cur = n
    for r in sched:
        assert 0 <= r <= cur // 2
        cur -= r
    return cur


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 30), st.sampled_from(["constant", "decreasing"]))
def test_r_schedule_feasible_and_exact(n, keep, layers, kind):
    sched = r_schedule(n, keep, layers, kind)
    assert len(sched) == layers
    final = simulate(n, sched)
    target = min(keep, n)
    if layers == 0:
        assert final == n
    elif target >= halving_floor(n, layers):
        assert final == target  # exact whenever feasible
    else:
        assert final == halving_floor(n, layers)  # closest reachable


def test_r_schedule_shapes():
    c = r_schedule(576, 200, 12, "constant")
    assert sum(c) == 376 and max(c) - min(c) <= 1 and c == sorted(c, reverse=True)
    d = r_schedule(576, 200, 12, "decreasing")
    assert sum(d) == 376 and d == sorted(d, reverse=True) and d[0] > 2 * d[-2] and d[-1] == 0
    # ToMe's own inflect=-1 example: r=8 over 12 layers -> linear 16 ... 0
    tome = [int(16 + (-16 / 11) * i) for i in range(12)]
    assert r_schedule(1000, 1000 - sum(tome), 12, tome) == tome
    # caps bind: every layer takes at least what the remaining layers cannot halve away
    assert r_schedule(100, 13, 3) == [48, 26, 13]  # 100 -> 52 -> 26 -> 13, the tightest feasible
    assert r_schedule(100, 0, 2) == [50, 25]
    assert r_schedule(10, 20, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        r_schedule(10, 5, 3, [1, 2])
    with pytest.raises(ValueError):
        r_schedule(10, 5, 3, "linear")


def test_schedule_drives_matching_to_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(197, 8, generator=g)
    protected = torch.zeros(197, dtype=torch.bool)
    protected[0] = True  # CLS
    size = torch.ones(197)
    for r in r_schedule(196, 60, 12, "decreasing"):
        m = bipartite_soft_matching(x, r, protected=protected)
        assert m.r == r
        x, size = merge_weighted(x, size, m)
        protected = protected[m.keep]
    assert x.shape[0] == 61 and float(size.sum()) == 197.0 and bool(protected[0])


@pytest.mark.parametrize("fn", [merge_weighted, merge_mlerp])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merges_touch_only_destinations(fn, dtype):
    """Rows that receive nothing come back bit-identical in x.dtype, several sources may share one destination,
    and r = 0 returns the input rows unchanged."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 6, generator=g).to(dtype)
    size = torch.rand(12, generator=g) + 0.5
    m = Match(torch.tensor([1, 4, 7]), torch.tensor([9, 9, 0]), torch.tensor([0, 2, 3, 5, 6, 8, 9, 10, 11]))
    out, s = fn(x, size, m)
    untouched = [k for k, row in enumerate(m.keep.tolist()) if row not in (0, 9)]
    assert torch.equal(out[untouched], x[m.keep][untouched])
    torch.testing.assert_close(s[m.keep.tolist().index(9)], size[[9, 1, 4]].sum())
    e = torch.empty(0, dtype=torch.long)
    out0, s0 = fn(x, size, Match(e, e, torch.arange(12)))
    assert torch.equal(out0, x) and torch.equal(s0, size)
