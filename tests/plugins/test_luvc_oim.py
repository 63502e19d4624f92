"""LUVC-OIM (project interpretation) on synthetic tensors: step counts, pairing, the grid after merging (regular,
first-member positions, sizes, block means), no-op, batch invariance."""
from __future__ import annotations

import math

import pytest
import torch

from tokcomp.errors import ConfigError
from tokcomp.plugins.luvc_oim import LuvcOIM, grid_after, pair_match, steps_for
from tokcomp.tokens import VisionContext
from vision_fakes import FakeTower, assert_whole_units, make_tokens

GRIDS = [(4, 8), (6, 10), (2, 2), (8, 6)]          # unit grids 2x4, 3x5, 1x1, 4x3


def test_grid_after_and_steps_for():
    assert [grid_after(2, 4, s) for s in range(5)] == [(2, 4), (2, 2), (1, 2), (1, 1), (1, 1)]
    assert [grid_after(3, 5, s) for s in range(6)] == [(3, 5), (3, 3), (2, 3), (2, 2), (1, 2), (1, 1)]
    assert steps_for(16, 16, 64) == 2 and steps_for(16, 16, 128) == 1 and steps_for(16, 16, 256) == 0
    assert steps_for(32, 32, 358) == 2          # keep_ratio 0.35 on 32x32: 256 is closer than 512
    assert steps_for(4, 4, 6) == 1              # 8 and 4 tie at distance 2: fewer steps
    assert steps_for(3, 5, 5) == 2              # 6 (2 steps) and 4 (3 steps) tie: fewer steps
    assert steps_for(16, 16, 1) == 8 and steps_for(16, 16, 1, cap=3) == 3
    assert steps_for(2, 2, 3, frames=2) == 1    # 2 frames x 2x2 = 8 -> 2 frames x 2x1 = 4 closest to 3


@pytest.mark.parametrize("axis", [0, 1])
def test_pair_match_against_brute_force(axis):
    cells, groups = [], []
    for g, (h, w) in enumerate([(3, 5), (4, 4), (1, 1), (2, 3)]):
        for r in range(h):
            for c in range(w):
                cells.append((r, c)), groups.append(g)
    perm = torch.randperm(len(cells), generator=torch.Generator().manual_seed(0))
    cell = torch.tensor(cells)[perm]
    group = torch.tensor(groups)[perm]
    m = pair_match(cell, group, axis)
    want = {}
    for i in range(len(cell)):
        r, c = cell[i].tolist()
        if (r, c)[axis] % 2 == 1:
            partner = (r - 1, c) if axis == 0 else (r, c - 1)
            j = [k for k in range(len(cell)) if int(group[k]) == int(group[i]) and tuple(cell[k].tolist()) == partner]
            want[i] = j[0]
    assert dict(zip(m.src.tolist(), m.dst.tolist())) == want
    assert sorted(m.keep.tolist() + m.src.tolist()) == list(range(len(cell)))


def _expected_after_steps(tokens, layout, steps_of_segment):
    """Brute force: present units (first members of each block), their patch-wise block means and sizes."""
    want = {}
    for u in range(layout.n_units):
        s = int(layout.unit_segment[u])
        _, hh, ww = layout.unit_grid[u].tolist()
        n = steps_of_segment[s]
        bw, bh = 2 ** ((n + 1) // 2), 2 ** (n // 2)
        if hh % bh or ww % bw:
            continue
        members = [v for v in range(layout.n_units) if int(layout.unit_segment[v]) == s
                   and hh <= int(layout.unit_grid[v, 1]) < hh + bh and ww <= int(layout.unit_grid[v, 2]) < ww + bw]
        feats = torch.stack([tokens.hidden[layout.unit_patches[v]] for v in members])   # [m, 4, C]
        want[u] = (feats.mean(0), len(members))
    return want


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_all_steps_at_one_block_give_block_means_on_a_regular_grid(order, ratio):
    layout, full = make_tokens(GRIDS, order, seed=21)
    tower = FakeTower(depth=4)
    out, ctx, _ = tower.run(LuvcOIM(keep_ratio=ratio, layers=[1]), full, layout)
    ids = assert_whole_units(out, full, layout)
    state = full
    for i in range(2):
        state = tower.block(i, state)
    units = [8, 15, 1, 12]
    unit_grids = [(2, 4), (3, 5), (1, 1), (4, 3)]
    steps = [steps_for(h, w, max(1, math.floor(n * ratio + 0.5))) for (h, w), n in zip(unit_grids, units)]
    want = _expected_after_steps(state, layout, steps)
    assert sorted(want) == ids.tolist()
    # the grid is regular: h' x w' cells per segment
    counts = torch.bincount(layout.unit_segment[ids], minlength=4).tolist()
    assert counts == [grid_after(h, w, n)[0] * grid_after(h, w, n)[1] for (h, w), n in zip(unit_grids, steps)]
    # at block 1 the merged units hold the block means; sizes count the merged units
    ctx2 = VisionContext(layout, 4, "")
    merged = LuvcOIM(keep_ratio=ratio, layers=[1]).after_block(1, state, ctx2)
    m_ids, m_rows = merged.units()
    for u, rows in zip(m_ids.tolist(), m_rows):
        mean, k = want[u]
        torch.testing.assert_close(merged.hidden[rows], mean, rtol=1e-6, atol=1e-6)
        assert merged.size[rows].tolist() == [float(k)] * 4


@pytest.mark.parametrize("order", ["qwen", "internvl"])
def test_default_spread_steps_keep_a_regular_grid(order):
    layout, full = make_tokens(GRIDS, order, seed=22)
    tower = FakeTower(depth=6)
    s = LuvcOIM(keep_ratio=0.1)
    out, ctx, _ = tower.run(s, full, layout)
    ids = assert_whole_units(out, full, layout)
    plan = s.plan(ctx)
    unit_grids = [(2, 4), (3, 5), (1, 1), (4, 3)]
    for seg, ((h, w), blocks) in enumerate(zip(unit_grids, plan)):
        n = len(blocks)
        assert n == steps_for(h, w, max(1, math.floor(h * w * 0.1 + 0.5)))
        assert blocks == [math.floor((j + 1) * 6 / (n + 1) + 0.5) - 1 for j in range(n)]
        mine = ids[layout.unit_segment[ids] == seg]
        cells = layout.unit_grid[mine][:, 1:]
        bh, bw = 2 ** (n // 2), 2 ** ((n + 1) // 2)
        assert bool((cells[:, 0] % bh == 0).all()) and bool((cells[:, 1] % bw == 0).all())   # first members
        assert mine.numel() == grid_after(h, w, n)[0] * grid_after(h, w, n)[1]
        sizes = out.size[(out.segment == seg) & ~out.cls]
        assert float(sizes.sum()) == pytest.approx(4 * h * w)


@pytest.mark.parametrize("kw", [dict(keep_ratio=1.0), dict(num_tokens=1000)])
def test_keep_all_is_exact_noop(kw):
    layout, full = make_tokens(GRIDS, "internvl")
    tower = FakeTower(depth=4)
    plain, _, _ = tower.run(None, full, layout)
    out, _, _ = tower.run(LuvcOIM(**kw), full, layout)
    assert torch.equal(out.hidden, plain.hidden) and torch.equal(out.origin, full.origin)


def test_video_frames_and_batch_invariance():
    """Frames of a video are separate segments: merging never crosses them, and an image's result does not depend on
    the rest of the call."""
    layout, full = make_tokens([(4, 4), (4, 4), (6, 10)], "qwen", images=[0, 0, 1], seed=23)
    alone_layout, alone = make_tokens([(4, 4), (4, 4)], "qwen", images=[0, 0], seed=23)
    tower = FakeTower(depth=4)
    s = LuvcOIM(keep_ratio=0.25, layers=[0, 2])
    both, _, _ = tower.run(s, full, layout)
    one, _, _ = tower.run(s, alone, alone_layout)
    m = both.segment < 2
    assert torch.equal(both.origin[m], one.origin)
    torch.testing.assert_close(both.hidden[m], one.hidden, rtol=0, atol=1e-12)
    # 2x2 units -> 1x1 per frame; 3x5 units: target round(3.75) = 4 -> 3 steps (2x2)
    assert torch.bincount(both.segment[~both.cls], minlength=3).tolist() == [4, 4, 4 * 4]


def test_config_validation_and_registration():
    import tokcomp
    with pytest.raises(ConfigError, match="non-decreasing"):
        LuvcOIM(layers=[3, 1])
    with pytest.raises(ConfigError, match="layers"):
        LuvcOIM(layers=[1, 5]).validate({"vision": 4})
    s = tokcomp.get("luvc_oim", layers=[1, 2])
    assert isinstance(s, LuvcOIM) and s.config.keep_ratio == 0.25 and s.spec == "luvc_oim(layers=[1,2])"
