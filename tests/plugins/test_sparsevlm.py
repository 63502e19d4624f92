"""SparseVLM on synthetic steps: raters, rater scores and recycling clusters against naive loops; schedule counts."""
import dataclasses
import math

import pytest
import torch

from llm_fakes import FakeLLM, layer_counts_from_plan
from tokcomp.errors import ConfigError
from tokcomp.ops.schedule import one_shot_area
from tokcomp.tokens import LLMContext
from tokcomp.plugins.sparsevlm import (PAPER_DEPTH, PAPER_LAYERS, PAPER_SCHEDULES, SparseVLM, recycle_select,
                                       text_raters)

torch.set_num_threads(1)

ROWS = [
    ([("t", 3), ("v", (1, 6, 5)), ("t", 3), ("v", (1, 4, 4)), ("t", 7)], 41),
    ([("t", 2), ("v", (2, 4, 4)), ("t", 5)], 42),
    ([("t", 4)], 43),
]


# ------------------------------------------------------------------------------------------------ naive
def naive_raters(visual_emb, text_emb):
    """Boolean list over the text tokens, by explicit loops in float64."""
    v, t = visual_emb.double().tolist(), text_emb.double().tolist()
    mean = [0.0] * len(t)
    for row in v:
        logits = [sum(a * b for a, b in zip(row, col)) for col in t]
        top = max(logits)
        ex = [math.exp(x - top) for x in logits]
        z = sum(ex)
        for j in range(len(t)):
            mean[j] += ex[j] / z / len(v)
    avg = sum(mean) / len(mean)
    return [m > avg for m in mean]


def naive_dpc(x, c):
    """Density-peaks clustering with k = c neighbours (SparseVLM's cluster_and_merge, deterministic ties)."""
    pts = x.double().tolist()
    n, dim = len(pts), len(pts[0])
    d = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(pts[i], pts[j])) / dim) for j in range(n)] for i in range(n)]
    k = min(c, n)
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:k]) / k) for i in range(n)]
    dmax = max(max(r) for r in d)
    delta = []
    for i in range(n):
        denser = [d[i][j] for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(denser) if denser else dmax)
    centres = sorted(sorted(range(n), key=lambda i: (-delta[i] * rho[i], i))[:c])
    assign = [min(range(c), key=lambda j: (d[i][centres[j]], j)) for i in range(n)]
    for j, ctr in enumerate(centres):
        assign[ctr] = j
    merged = [[sum(pts[i][ch] for i in range(n) if assign[i] == j) / assign.count(j) for ch in range(dim)]
              for j in range(c)]
    return centres, assign, merged


def naive_stage(step, b, budget, raters_orig, fraction=0.3, cluster_size=10, recycle=True):
    """(kept positions, centre positions, merged rows) of one row at one stage."""
    q = step.queries[b].tolist()
    seen, rows = set(), []
    for r, pos in enumerate(q):
        if pos not in seen:
            seen.add(pos)
            if int(step.embeds_index[b, pos]) in raters_orig:
                rows.append(r)
    if not rows:
        rows = sorted({q.index(p) for p in q})
    heads = step.attn.shape[1]
    vis = step.visual[b].nonzero()[:, 0].tolist()
    score = {p: sum(float(step.attn[b, h, r, p]) for h in range(heads) for r in rows) / (heads * len(rows))
             for p in vis}
    order = sorted(vis, key=lambda p: (-score[p], p))
    n_keep = min(budget, len(vis))
    m = len(vis) - n_keep
    if not recycle or m == 0 or n_keep == 0:
        return sorted(order[:n_keep]), [], None
    p = min(int(fraction * m) + 1, m)
    c = min(p // cluster_size + 1, p, n_keep)
    pool = order[n_keep - c:][:p]
    if c == 1:  # one cluster: every recycled token, in the slot of the best-scored one
        mean = step.hidden[b, pool].double().mean(0)
        return sorted(order[:n_keep - 1]), [pool[0]], [mean.tolist()]
    centres, _, merged = naive_dpc(step.hidden[b, pool], c)
    return sorted(order[:n_keep - c]), [pool[i] for i in centres], merged


# ------------------------------------------------------------------------------------------------ tests
def test_text_raters_equal_naive_loop():
    g = torch.Generator().manual_seed(0)
    for n_v, n_t, scale in ((40, 9, 1.0), (7, 15, 0.3), (100, 3, 2.0)):
        v, t = torch.randn(n_v, 12, generator=g) * scale, torch.randn(n_t, 12, generator=g) * scale
        assert text_raters(v, t, chunk=16).tolist() == naive_raters(v, t)
    assert text_raters(torch.randn(4, 3), torch.randn(0, 3)).numel() == 0


@pytest.mark.parametrize("n,c", [(12, 2), (31, 4), (5, 5), (9, 3)])
def test_recycling_clusters_equal_naive_dpc(n, c):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 6, generator=g)
    from tokcomp.ops.cluster import dpc_knn, merge_clusters
    centres, assign = dpc_knn(x, c, c)
    want_c, want_a, want_m = naive_dpc(x, c)
    assert centres.tolist() == want_c and assign.tolist() == want_a
    assert torch.allclose(merge_clusters(x, assign, c).double(), torch.tensor(want_m, dtype=torch.float64), atol=1e-6)


def test_recycle_select_counts():
    g = torch.Generator().manual_seed(3)
    score, hidden = torch.rand(50, generator=g), torch.randn(50, 8, generator=g)
    for budget in (0, 1, 2, 10, 49, 50):
        kept, centres, merged = recycle_select(score, budget, hidden)
        assert kept.numel() + centres.numel() == budget
        assert not set(kept.tolist()) & set(centres.tolist())
        if merged is not None:
            assert merged.shape == (centres.numel(), 8)
    kept, centres, merged = recycle_select(score, 20, hidden)  # m = 30: p = 10, c = 2
    assert centres.numel() == 2 and kept.numel() == 18
    kept, centres, merged = recycle_select(score, 20, None)
    assert kept.tolist() == sorted(torch.sort(score, descending=True, stable=True).indices[:20].tolist())


@pytest.mark.parametrize("n_layers,kw", [(8, dict(keep_ratio=0.3)), (8, dict(keep_ratio=0.2, recycle=False)),
                                         (6, dict(schedule=[[2, 0.7], [4, 0.3]], cluster_size=3)),
                                         (10, dict(num_tokens=12, recycle_fraction=0.5))])
def test_selection_equals_naive_and_counts_follow_schedule(n_layers, kw):
    pruner = SparseVLM(**kw)
    fake = FakeLLM(ROWS, n_layers)
    res = fake.run(pruner)
    layers = pruner.stage_layers(n_layers)
    assert [s.layer for s, _ in res.steps] == [x - 1 for x in layers]
    # raters from the layer-0 embeddings of each row's original tokens
    raters = res.ctx.state[SparseVLM._RATERS]
    for b, row in enumerate(fake.rows):
        vis = row.visual.nonzero()[:, 0]
        if vis.numel() == 0:
            assert raters[b].numel() == 0
            continue
        text = [i for i in range(row.n) if i > int(vis[0]) and not bool(row.visual[i])]
        mask = naive_raters(row.embeds[vis], row.embeds[text])
        pad = res.steps[0][0].embeds.shape[1] - row.n
        assert (raters[b] - pad).tolist() == [t for t, m in zip(text, mask) if m]
    n_centres = [0]
    for stage, (step, sel) in enumerate(res.steps):
        for b in range(step.visual.shape[0]):
            n0 = int(step.n_visual_original[b])
            budget = pruner.plan(n0, n_layers)[stage] if n0 else 0
            kept, centres, merged = naive_stage(step, b, budget, set(raters[b].tolist()),
                                                pruner.config.recycle_fraction, pruner.config.cluster_size,
                                                pruner.config.recycle)
            assert sel.keep[b].tolist() == sorted(kept + centres)
            rep = None if sel.replace is None else sel.replace[b]
            if merged is None or not centres:
                assert rep is None
            else:
                assert rep[0].tolist() == centres
                n_centres.append(len(centres))
                assert torch.allclose(rep[1].double(), torch.tensor(merged, dtype=torch.float64), atol=1e-5)
    if pruner.config.recycle:  # recycling happened, with several DPC clusters in the cluster_size=3 case
        assert max(n_centres) >= (2 if pruner.config.cluster_size == 3 else 1)
    else:
        assert max(n_centres) == 0
    for b, row in enumerate(fake.rows):
        want = layer_counts_from_plan(pruner, int(row.visual.sum()), n_layers)
        assert [res.counts[i][b] for i in range(n_layers)] == want


def test_paper_schedule_and_budget_matching():
    pruner = SparseVLM()
    assert pruner.stage_layers(PAPER_DEPTH) == list(PAPER_LAYERS)
    assert pruner.prune_layers(PAPER_DEPTH) == [2, 6, 15]  # the reference's pruning_loc
    assert pruner.plan(576, PAPER_DEPTH) == list(PAPER_SCHEDULES[192])
    for n_layers in (4, 12, 32, 40):
        for ratio in (0.1, 0.25, 0.5, 0.8):
            p = SparseVLM(keep_ratio=ratio)
            counts = layer_counts_from_plan(p, 576, n_layers)
            target = one_shot_area(p.config.keep_count(576), 576, n_layers) * 576
            first = p.stage_layers(n_layers)[0]
            assert abs(sum(counts) - target) <= 0.5 * (n_layers - first) + 1e-6


def test_attention_queries_and_noop():
    pruner = SparseVLM(keep_ratio=0.3)
    assert pruner.prune_layers(32) == [2, 6, 15]
    assert all(pruner.attention_queries(i) == "text" for i in pruner.prune_layers(32))
    assert SparseVLM(keep_ratio=1.0).prune_layers(32) == []
    res = FakeLLM(ROWS, 8).run(SparseVLM(keep_ratio=0.3))
    step, _ = res.steps[0]
    full = SparseVLM(keep_ratio=1.0)
    sel = full.select(step, LLMContext(n_layers=8))
    assert sel.replace is None
    for b in range(step.visual.shape[0]):
        assert sel.keep[b].tolist() == step.visual[b].nonzero()[:, 0].tolist()


def test_batch_row_equals_single_run():
    both = FakeLLM(ROWS, 8).run(SparseVLM(keep_ratio=0.25))
    for b, row in enumerate(ROWS):
        alone = FakeLLM([row], 8).run(SparseVLM(keep_ratio=0.25))
        assert torch.equal(both.kept[b], alone.kept[0])
        assert torch.allclose(both.hidden[b], alone.hidden[0], atol=1e-6)


def test_config():
    c = SparseVLM().config
    assert c.recycle and c.recycle_fraction == 0.3 and c.cluster_size == 10
    assert abs(c.keep_ratio - 0.30880) < 1e-4
    with pytest.raises(ConfigError):
        SparseVLM(recycle_fraction=0.0)
    with pytest.raises(ConfigError, match="not both"):
        SparseVLM(schedule=[[3, 0.5]], num_tokens=4)


# ------------------------------------------------------------------------------------------------ v1.0 rank count
def _rank_k(n_rows, n_cols, k, seed):
    """A positive [n_rows, n_cols] matrix of rank exactly min(k, n_rows, n_cols) (generic factors)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_rows, k, generator=g, dtype=torch.float64) @ torch.rand(k, n_cols, generator=g,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("rows,n,k,scale,bias,want", [
    (12, 40, 2, 13.5, 0.0, 27),      # int(2 * 13.5) = 27 < 39
    (12, 20, 2, 13.5, 0.0, 19),      # capped at n - 1
    (12, 40, 3, 2.0, 1.5, 7),        # int(7.5) = 7
    (12, 40, 3, 2.0, -50.0, 0),      # never negative
    (6, 5, 5, 13.5, 0.0, 5),         # rank == n: the stage keeps everything
    (3, 5, 5, 1.0, 0.0, 3),          # rank limited by the raters: 3
])
def test_rank_count_is_the_official_formula(rows, n, k, scale, bias, want):
    """v1.0 (score.py:attn_postprocess_rank): n if rank(R) == n else min(int(rank * scale + bias), n - 1), on
    matrices whose rank is known by construction."""
    from tokcomp.plugins.sparsevlm import rank_count
    assert rank_count(_rank_k(rows, n, k, seed=n + k).float(), scale, bias) == want


@pytest.mark.parametrize("recycled", ["inside", "extra"])
def test_rank_mode_keeps_the_rank_count(recycled):
    """count='rank' at v1.0's layers: each row keeps min(int(13.5 * k), n - 1) tokens (k = the known rank of its
    raters' attention over its visual tokens), the top-scored ones, recycling inside or on top of that count."""
    p = SparseVLM(count="rank", recycled=recycled, rank_scale=4.0)
    assert p.stage_layers(32) == [3, 7, 16, 20] and p.prune_layers(32) == [2, 6, 15, 19]
    res = FakeLLM(ROWS, 8).run(p)
    step, _ = res.steps[0]
    attn = step.attn.clone()
    k_of_row = [3, 2, 1]
    for b, k in enumerate(k_of_row):   # every query row a generic combination of k positive vectors (all heads)
        attn[b] = _rank_k(attn.shape[2], attn.shape[3], k, seed=b).float()[None]
    step = dataclasses.replace(step, attn=attn)
    sel = p.select(step, LLMContext(n_layers=8))
    raters = SparseVLM(count="rank").raters(step, LLMContext(n_layers=8))
    ranks = []
    for b, k in enumerate(k_of_row):
        vis = step.visual[b].nonzero()[:, 0]
        if vis.numel() == 0:
            assert sel.keep[b].numel() == 0
            continue
        n = vis.numel()
        raters_b = set(raters[b].tolist())
        rank = min(k, len(raters_b))          # k generic rows, or fewer raters than that
        ranks.append(rank)
        count = min(int(rank * 4.0), n - 1)
        if recycled == "inside":
            kept, centres, _ = naive_stage(step, b, count, raters_b)
            assert sel.keep[b].tolist() == sorted(kept + centres) and len(sel.keep[b]) == count
        else:
            m = n - count
            c = int((int(0.3 * m) + 1) / 10) + 1
            top, _, _ = naive_stage(step, b, count, raters_b, recycle=False)
            assert set(top) <= set(sel.keep[b].tolist()) and len(sel.keep[b]) == count + c
    assert max(ranks) >= 2


def test_recycled_extra_is_the_official_accounting():
    """v1.5 "192" at 576 tokens: the official code keeps 300 / 200 / 110 top tokens and adds the recycled cluster
    tokens (int(0.3 m) + 1 best dropped, int(p / 10) + 1 clusters), 309 / 204 / 113 in all; 'inside' keeps exactly
    300 / 200 / 110."""
    g = torch.Generator().manual_seed(0)
    n, got_extra, got_inside = 576, [], []
    for budget in (300, 200, 110):
        score, hidden = torch.rand(n, generator=g), torch.randn(n, 8, generator=g)
        kept, centres, merged = recycle_select(score, budget, hidden, extra=True)
        order = torch.sort(score, descending=True, stable=True).indices.tolist()
        assert kept.tolist() == sorted(order[:budget])
        p = int(0.3 * (n - budget)) + 1
        assert set(centres.tolist()) <= set(order[budget:budget + p])      # centres among the best p dropped
        assert merged.shape == (int(p / 10) + 1, 8)
        got_extra.append(kept.numel() + centres.numel())
        kept_i, centres_i, _ = recycle_select(score, budget, hidden)
        got_inside.append(kept_i.numel() + centres_i.numel())
        n = got_extra[-1]
    assert got_extra == [309, 204, 113]
    assert got_inside == [300, 200, 110]


def test_rank_mode_takes_no_budget():
    with pytest.raises(ConfigError, match="count='rank'"):
        SparseVLM(count="rank", keep_ratio=0.3)
    with pytest.raises(ConfigError, match="count='rank'"):
        SparseVLM(count="rank", schedule=[[2, 0.5]])
    assert SparseVLM(count="rank").config.rank_scale == 13.5 and SparseVLM().config.recycled == "inside"
