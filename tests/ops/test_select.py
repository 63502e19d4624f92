import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.ops.select import keep_count, segment_of, stable_order, topk_per_segment

torch.set_num_threads(1)


# ---------------------------------------------------------------- keep_count
@pytest.mark.parametrize(
    "n,ratio,expected",
    [
        (10, 0.25, 3),  # 2.5 rounds half up (Python's round would give 2)
        (10, 0.35, 4),  # 3.5 -> 4
        (3, 0.5, 2),  # 1.5 -> 2
        (5, 0.5, 3),  # 2.5 -> 3 (banker's would give 2)
        (576, 0.222, 128),
        (100, 1.0, 100),
        (100, 0.0, 1),  # minimum
        (100, 0.001, 1),
        (0, 0.5, 0),  # n < minimum -> n
        (1, 0.1, 1),
    ],
)
def test_keep_count_ratio(n, ratio, expected):
    assert keep_count(n, keep_ratio=ratio) == expected


def test_keep_count_tokens_and_minimum():
    assert keep_count(100, num_tokens=30) == 30
    assert keep_count(10, num_tokens=30) == 10
    assert keep_count(10, num_tokens=0) == 0  # explicit count: no minimum
    assert keep_count(100, keep_ratio=0.0, minimum=0) == 0
    assert keep_count(100, keep_ratio=0.01, minimum=5) == 5
    assert keep_count(3, keep_ratio=0.01, minimum=5) == 3


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(keep_ratio=0.5, num_tokens=3), dict(keep_ratio=1.5), dict(num_tokens=-1)]
)
def test_keep_count_errors(kwargs):
    with pytest.raises(ValueError):
        keep_count(10, **kwargs)


@given(st.integers(0, 5000), st.floats(0.0, 1.0))
def test_keep_count_bounds(n, r):
    k = keep_count(n, keep_ratio=r)
    assert min(1, n) <= k <= n
    assert abs(k - n * r) <= 0.5 + 1e-9 or k == min(1, n)


# ---------------------------------------------------------------- topk_per_segment
def brute_topk_per_segment(score, segment, k):
    score, segment, k = score.float().tolist(), segment.tolist(), k.tolist()
    out = []
    for s in range(len(k)):
        members = [i for i in range(len(score)) if segment[i] == s]
        members.sort(key=lambda i: (-score[i], i))
        out += members[: max(k[s], 0)]
    return sorted(out)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,n_seg", [(0, 1), (1, 1), (5, 1), (17, 3), (40, 6), (64, 2)])
def test_topk_per_segment_matches_brute_force(seed, n, n_seg):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (n,), generator=g).float()  # many ties
    if seed % 2:
        score = torch.randn(n, generator=g)
    segment = torch.randint(0, n_seg, (n,), generator=g)  # not contiguous
    size = torch.bincount(segment, minlength=n_seg)
    k = torch.stack([torch.randint(-1, int(sz) + 3, (1,), generator=g)[0] for sz in size])
    got = topk_per_segment(score, segment, k)
    assert got.dtype == torch.long
    assert got.tolist() == brute_topk_per_segment(score, segment, k)


def test_topk_per_segment_edges():
    score = torch.tensor([1.0, 1.0, 1.0, 5.0, 0.0, 2.0])
    segment = torch.tensor([0, 1, 0, 1, 0, 2])
    # k=0 segment, k=size segment, k>size segment
    assert topk_per_segment(score, segment, torch.tensor([0, 2, 9])).tolist() == [1, 3, 5]
    # ties: lower index wins
    assert topk_per_segment(score, segment, torch.tensor([1, 0, 0])).tolist() == [0]
    assert topk_per_segment(score, segment, 1).tolist() == [0, 3, 5]
    # bf16 input, NaN ranks lowest
    s = torch.tensor([float("nan"), 0.5, -3.0]).bfloat16()
    assert topk_per_segment(s, torch.zeros(3, dtype=torch.long), torch.tensor([2])).tolist() == [1, 2]
    with pytest.raises(ValueError):
        topk_per_segment(score, segment, torch.tensor([1, 1]))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_topk_per_segment_properties(data):
    n_seg = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(0, 60))
    segment = torch.tensor(data.draw(st.lists(st.integers(0, n_seg - 1), min_size=n, max_size=n)), dtype=torch.long)
    score = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), dtype=torch.float32)
    k = torch.tensor(data.draw(st.lists(st.integers(0, 70), min_size=n_seg, max_size=n_seg)))
    got = topk_per_segment(score, segment, k)
    size = torch.bincount(segment, minlength=n_seg)
    assert torch.equal(torch.bincount(segment[got], minlength=n_seg), torch.minimum(k, size))
    assert got.tolist() == sorted(set(got.tolist()))
    # every kept token beats (or ties with a higher index) every dropped token of its segment
    dropped = sorted(set(range(n)) - set(got.tolist()))
    for i in got.tolist():
        for j in dropped:
            if segment[i] == segment[j]:
                assert (score[i] > score[j]) or (score[i] == score[j] and i < j)


def test_stable_order():
    s = torch.tensor([2.0, 3.0, 2.0, float("nan"), 3.0])
    assert stable_order(s).tolist() == [1, 4, 0, 2, 3]
    assert stable_order(s, descending=False).tolist() == [0, 2, 1, 4, 3]


# ---------------------------------------------------------------- segment_of
def brute_segment_of(cu, idx):
    cu = cu.tolist()
    return [next(s for s in range(len(cu) - 1) if cu[s] <= i < cu[s + 1]) for i in idx.tolist()]


@pytest.mark.parametrize("cu", [[0, 100, 200], [0, 5, 5, 10], [0, 1], [0, 3, 4, 4, 4, 9, 12], [0, 0, 7]])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_segment_of(cu, dtype):
    cu_t = torch.tensor(cu, dtype=dtype)
    idx = torch.arange(cu[-1])
    got = segment_of(cu_t, idx)
    assert got.dtype == torch.long
    assert got.tolist() == brute_segment_of(cu_t, idx)
    for s in range(len(cu) - 1):  # the first token of every non-empty segment maps to it
        if cu[s] < cu[s + 1]:
            assert int(segment_of(cu_t, torch.tensor([cu[s]]))[0]) == s


def test_segment_of_fixes_ipcv_boundary_bug():
    cu = torch.tensor([0, 100, 200], dtype=torch.int32)
    idx = torch.tensor([0, 99, 100, 199])
    assert segment_of(cu, idx).tolist() == [0, 0, 1, 1]
    buggy = torch.searchsorted(cu.long(), idx, right=False) - 1  # IPCV L1236
    assert buggy.tolist() == [-1, 0, 0, 1]
