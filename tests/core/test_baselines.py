"""The baselines against hand-written references on synthetic token sets (toy layout: units stored 2x2-consecutive)."""
import pytest
import torch

import tokcomp
from tokcomp.plugins.baselines import pool_windows
from tokcomp.tokens import LLMContext, LLMStep, VisionContext
from toymodel import toy_layout, toy_tokens


def _tokens(grids, c=6, seed=0):
    layout = toy_layout(grids)
    g = torch.Generator().manual_seed(seed)
    return toy_tokens(torch.randn(layout.n_tokens, c, generator=g), layout), layout


def test_random_vision_keeps_whole_units_per_segment_deterministically():
    grids = [(4, 4), (2, 6), (6, 6)]
    tokens, layout = _tokens(grids)
    s = tokcomp.get("random", stage="vision", keep_ratio=0.5, layer=0)
    ctx = VisionContext(layout, depth=2)
    out = s.after_block(0, tokens, ctx)
    ids, rows = out.units()
    assert rows.shape[1] == 4
    per_seg = torch.bincount(layout.unit_segment[ids], minlength=3).tolist()
    assert per_seg == [2, 2, 5]                       # half up: 4*.5=2, 3*.5=1.5->2, 9*.5=4.5->5
    assert torch.equal(out.origin, out.origin.sort().values)
    assert torch.equal(s.after_block(0, tokens, ctx).origin, out.origin)   # deterministic
    assert s.after_block(1, tokens, ctx) is tokens                           # only at its layer


def test_random_vision_choice_of_an_image_does_not_depend_on_the_batch():
    s = tokcomp.get("random", stage="vision", keep_ratio=0.5, layer=0, seed=7)
    alone, la = _tokens([(6, 6)])
    both, lb = _tokens([(4, 4), (6, 6)])
    keep_alone = s.after_block(0, alone, VisionContext(la, 1)).origin
    keep_both = s.after_block(0, both, VisionContext(lb, 1)).origin
    assert torch.equal(keep_both[keep_both >= 16] - 16, keep_alone)


def _naive_pool(tokens, layout, ph, pw):
    out = {}
    for u in range(layout.n_units):
        s = int(layout.unit_segment[u])
        _, uh, uw = layout.unit_grid[u].tolist()
        out.setdefault((s, uh // ph, uw // pw), []).append(u)
    result = []
    for key in sorted(out, key=lambda k: min(out[k])):
        members = out[key]
        x = torch.stack([tokens.hidden[layout.unit_patches[u]] for u in members])   # [m, 4, C]
        result.append((min(members), x.mean(0), len(members)))
    return result


@pytest.mark.parametrize("keep, window, grids", [(0.5, (1, 2), [(4, 8), (4, 4)]), (0.25, (2, 2), [(4, 8), (8, 8)]),
                                                  (1 / 3, (1, 3), [(6, 6), (2, 6)])])
def test_pool_matches_a_naive_window_average(keep, window, grids):
    """When the budget factors over the unit grid, the windows are equal rectangles (hand-computed here)."""
    tokens, layout = _tokens(grids)
    s = tokcomp.get("pool", keep_ratio=keep)
    out = s.after_block(1, tokens, VisionContext(layout, depth=2))
    ids, rows = out.units()
    ref = _naive_pool(tokens, layout, *window)
    assert ids.tolist() == [r[0] for r in ref]
    for j, (_, mean, m) in enumerate(ref):
        torch.testing.assert_close(out.hidden[rows[j]], mean, rtol=1e-5, atol=1e-6)
        assert out.size[rows[j]].tolist() == [float(m)] * 4


@pytest.mark.parametrize("h, w, k, shape", [(6, 6, 9, (2, 2)), (6, 6, 18, (1, 2)), (36, 1, 18, (2, 1)),
                                            (2, 6, 4, (1, 3)), (4, 4, 16, (1, 1)), (3, 5, 1, (3, 5))])
def test_pool_windows_equal_when_the_count_factors(h, w, k, shape):
    grid = pool_windows(h, w, k)
    ph, pw = shape
    want = (torch.arange(h)[:, None] // ph) * (w // pw) + torch.arange(w)[None, :] // pw
    assert torch.equal(grid, want)


def test_pool_windows_hit_any_budget_with_rectangles():
    """Every grid up to 9 x 9 and every count: exactly k windows, each a full rectangle, ids in raster order of their
    top-left cells; near-equal sizes (at most 2x the mean area + one row/column of slack)."""
    for h in range(1, 10):
        for w in range(1, 10):
            for k in range(1, h * w + 1):
                grid = pool_windows(h, w, k)
                assert grid.shape == (h, w) and sorted(set(grid.flatten().tolist())) == list(range(k)), (h, w, k)
                tops = []
                for win in range(k):
                    ys, xs = (grid == win).nonzero().unbind(1)
                    box = (int(ys.max()) - int(ys.min()) + 1) * (int(xs.max()) - int(xs.min()) + 1)
                    assert box == ys.numel(), (h, w, k, win)
                    assert ys.numel() <= 2 * h * w / k + max(h, w), (h, w, k, win)
                    tops.append((int(ys.min()), int(xs.min())))
                assert tops == sorted(tops), (h, w, k)


@pytest.mark.parametrize("kw", [dict(keep_ratio=0.5), dict(keep_ratio=0.2), dict(num_tokens=7), dict(keep_ratio=0.35)])
def test_pool_hits_its_budget_on_any_shape(kw):
    """A 1000 x 28 image (Qwen2-VL: 72 x 2 patches, 36 x 1 units), odd grids and a thin strip: every segment keeps
    exactly keep_count(units) units, each the size-weighted mean of its window, total size conserved."""
    grids = [(72, 2), (6, 6), (10, 14), (2, 18)]
    tokens, layout = _tokens(grids)
    tokens = tokens.with_hidden(tokens.hidden, size=torch.rand(tokens.n, generator=torch.Generator().manual_seed(1)) + 1)
    s = tokcomp.get("pool", **kw)
    out = s.after_block(1, tokens, VisionContext(layout, depth=2))
    ids, rows = out.units()
    n_units = torch.bincount(layout.unit_segment, minlength=len(grids))
    got = torch.bincount(layout.unit_segment[ids], minlength=len(grids))
    assert got.tolist() == [s.config.keep_count(int(n)) for n in n_units]
    for seg in range(len(grids)):
        m = out.segment == seg
        assert float(out.size[m].sum()) == pytest.approx(float(tokens.size[tokens.segment == seg].sum()))
    # each output unit = size-weighted mean (patch-wise) of the units of its window
    for seg, (ph, pw) in enumerate(grids):
        members = (layout.unit_segment == seg).nonzero()[:, 0]
        cells = layout.unit_grid[members]
        grid = pool_windows(ph // 2, pw // 2, s.config.keep_count(members.numel()))
        win = grid[cells[:, 1], cells[:, 2]]
        for wid in range(int(win.max()) + 1):
            us = members[win == wid]
            rep = int(us.min())
            j = int((ids == rep).nonzero()[0, 0])
            p = layout.unit_patches[us]                                        # [m, 4]
            wts = tokens.size[p].double()
            want = (tokens.hidden[p].double() * wts[..., None]).sum(0) / wts.sum(0)[:, None]
            torch.testing.assert_close(out.hidden[rows[j]].double(), want, rtol=1e-5, atol=1e-6)


def test_pool_keep_one_is_identity():
    tokens, layout = _tokens([(4, 4)])
    out = tokcomp.get("pool", keep_ratio=1.0).after_block(1, tokens, VisionContext(layout, 2))
    assert out is tokens


def _step(n_vis_rows, L=20):
    B = len(n_vis_rows)
    visual = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(n_vis_rows):
        visual[b, 3:3 + n] = True
    h = torch.randn(B, L, 4)
    return LLMStep(layer=1, hidden=h, hidden_in=h, visual=visual, valid=torch.ones(B, L, dtype=torch.bool),
                   spans=[[] for _ in range(B)], n_visual_original=visual.sum(1), n_layers=4)


def test_random_llm_budget_per_row_and_batch_invariance():
    s = tokcomp.get("random", stage="llm", keep_ratio=0.5, seed=3)
    sel = s.select(_step([12, 8]), LLMContext(n_layers=4))
    assert [len(k) for k in sel.keep] == [6, 4]
    assert all(bool(_step([12, 8]).visual[b, k].all()) for b, k in enumerate(sel.keep))
    alone = s.select(_step([8]), LLMContext(n_layers=4))
    assert torch.equal(alone.keep[0].sort().values, sel.keep[1].sort().values)
    assert s.prune_layers(4) == [1] and tokcomp.get("random", stage="llm", keep_ratio=1.0).prune_layers(4) == []
