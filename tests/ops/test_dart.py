import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.ops.dart import dart_quotas, dart_select

torch.set_num_threads(1)


def _cos(u, v):
    nu = max(math.sqrt(sum(a * a for a in u)), 1e-12)
    nv = max(math.sqrt(sum(b * b for b in v)), 1e-12)
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def brute_dart(keys_l1, hidden, candidates, text, n_keep, p_img, p_txt):
    sc = keys_l1.float().tolist()
    h = hidden.double().tolist()
    cand = sorted(candidates.tolist())
    text = text.tolist()
    n_keep = max(0, min(n_keep, len(cand)))
    if n_keep == 0:
        return []
    by_score = lambda i: (-sc[i], i)  # noqa: E731
    p_i, p_t = min(p_img, len(cand)), min(p_txt, len(text))
    img_sorted = sorted(cand, key=by_score)
    if n_keep <= p_i or p_i + p_t == 0:
        return sorted(img_sorted[:n_keep])
    img_piv = img_sorted[:p_i]
    pivots = sorted(img_piv + sorted(text, key=by_score)[:p_t], key=by_score)
    base, rest = divmod(n_keep - p_i, len(pivots))
    pool = [c for c in cand if c not in img_piv]
    kept = list(img_piv)
    for t, p in enumerate(pivots):
        q = base + (1 if t < rest else 0)
        pool.sort(key=lambda j: (_cos(h[p], h[j]), j))
        kept += pool[:q]
        pool = pool[q:]
    return sorted(kept)


def make_case(seed, length, spans, dup=False):
    g = torch.Generator().manual_seed(seed)
    keys_l1 = torch.rand(length, generator=g) * 10
    hidden = torch.randn(length, 6, generator=g)
    if dup:  # exact duplicates -> exact cosine ties; repeated key norms -> score ties
        hidden = hidden[torch.randint(0, 4, (length,), generator=g)]
        keys_l1 = torch.randint(0, 3, (length,), generator=g).float()
    cand = torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.empty(0, dtype=torch.long)
    is_cand = torch.zeros(length, dtype=torch.bool)
    is_cand[cand] = True
    text = (~is_cand).nonzero().squeeze(1)
    return keys_l1, hidden, cand, text


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize(
    "length,spans,n_keep,p_img,p_txt",
    [
        (60, [(5, 45)], 13, 4, 4),
        (60, [(5, 45)], 4, 4, 4),  # n_keep == P_i
        (60, [(5, 45)], 2, 4, 4),  # n_keep < P_i
        (60, [(5, 45)], 40, 4, 4),  # everything
        (60, [(5, 45)], 99, 4, 4),  # more than Nv
        (60, [(5, 45)], 0, 4, 4),
        (50, [(0, 50)], 17, 4, 4),  # no text at all
        (30, [(3, 6)], 2, 4, 4),  # fewer candidates than pivots
        (80, [(2, 20), (30, 61)], 23, 3, 5),  # two images, interleaved text
        (80, [(2, 20), (30, 61)], 23, 0, 5),  # text pivots only
        (80, [(2, 20), (30, 61)], 23, 0, 0),  # no pivots at all
    ],
)
def test_dart_matches_brute_force(seed, dup, length, spans, n_keep, p_img, p_txt):
    keys_l1, hidden, cand, text = make_case(seed, length, spans, dup)
    got = dart_select(keys_l1, hidden, cand, text, n_keep, p_img, p_txt)
    want = brute_dart(keys_l1, hidden, cand, text, n_keep, p_img, p_txt)
    assert got.dtype == torch.long
    assert got.tolist() == want
    assert len(want) == max(0, min(n_keep, cand.numel()))


def test_dart_bf16_and_unsorted_candidates():
    keys_l1, hidden, cand, text = make_case(7, 70, [(10, 60)])
    ref = dart_select(keys_l1, hidden, cand, text, 20)
    shuffled = cand[torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(dart_select(keys_l1, hidden, shuffled, text, 20), ref)
    got16 = dart_select(keys_l1.bfloat16(), hidden.bfloat16(), cand, text, 20)
    want16 = brute_dart(keys_l1.bfloat16(), hidden.bfloat16(), cand, text, 20, 4, 4)
    assert got16.tolist() == want16


def test_dart_quotas():
    assert dart_quotas(132, 4, 8) == [16] * 8  # LLaVA "128": 4 + 8 * 16
    assert dart_quotas(13, 4, 8) == [2, 1, 1, 1, 1, 1, 1, 1]  # remainder to the first pivots
    assert dart_quotas(3, 4, 8) == [0] * 8
    assert dart_quotas(10, 0, 0) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 40), st.integers(0, 45), st.integers(0, 6), st.integers(0, 6), st.integers(0, 10))
def test_dart_properties(seed, nv, n_keep, p_img, p_txt, nt):
    keys_l1, hidden, cand, text = make_case(seed, nv + nt, [(0, nv)])
    got = dart_select(keys_l1, hidden, cand, text, n_keep, p_img, p_txt)
    assert got.numel() == min(n_keep, nv)
    assert got.tolist() == sorted(set(got.tolist()))
    assert set(got.tolist()) <= set(cand.tolist())
    # the strongest image pivots always survive
    top = sorted(range(nv), key=lambda i: (-float(keys_l1[i]), i))[: min(p_img, n_keep, nv)]
    assert set(top) <= set(got.tolist())
