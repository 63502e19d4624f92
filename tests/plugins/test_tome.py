"""ToMe at unit granularity on synthetic tensors: matching and merging against naive loops, the whole tower against a
naive re-implementation, the finish contract, the budget, proportional attention, no-op and batch invariance."""
from __future__ import annotations

import math

import pytest
import torch

from tokcomp.errors import ConfigError
from tokcomp.plugins.tome import ToMe
from tokcomp.tokens import VisionContext
from vision_fakes import FakeTower, assert_whole_units, make_tokens
from vision_refs import naive_apply_pairs, naive_tower, naive_unit_matching

GRIDS = [(4, 8), (6, 6), (2, 2), (4, 4)]


def _keep_count(n, ratio):
    return max(min(1, n), min(math.floor(n * ratio + 0.5), n))   # round half up, clamped to [1, n]


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("r", [[1, 2, 0, 1], [4, 9, 1, 4], [16, 18, 2, 8]])
def test_mid_matches_naive_loop(order, r):
    layout, tokens = make_tokens(GRIDS, order, seed=2)
    keys = torch.randn(tokens.n, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tokens = tokens.with_hidden(tokens.hidden, size=torch.rand(tokens.n, generator=torch.Generator()
                                                                .manual_seed(4)) + 0.5)
    ctx = VisionContext(layout, 4, "")
    s = ToMe(keep_ratio=0.5)
    got = s._mid(tokens, keys, i=0, r=torch.tensor(r), ctx=ctx)
    pairs = naive_unit_matching(tokens, keys, r)
    want = naive_apply_pairs(tokens, pairs)
    assert len(pairs) == sum(min(x, n // 2) for x, n in zip(r, [8, 9, 1, 4]))
    assert torch.equal(got.origin, want.origin)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-6, atol=1e-6)   # merge sums in float32
    torch.testing.assert_close(got.size, want.size)
    assert torch.equal(got.unit, want.unit) and torch.equal(got.pos, want.pos)  # dst keeps its id/positions


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("schedule,start", [("constant", 0), ("decreasing", 1), ([3, 0, 1, 1, 0], 1)])
def test_tower_matches_naive_and_meets_budget(order, schedule, start):
    layout, full = make_tokens(GRIDS, order, seed=5)
    tower = FakeTower(depth=6, seed=6)
    s = ToMe(keep_ratio=0.3, schedule=schedule, start_layer=start)
    s.validate({"vision": tower.depth})
    out, ctx, calls = tower.run(s, full, layout)
    r_table = s.r_table(ctx)
    want = naive_tower(tower, full, r_table, start, True)
    assert torch.equal(out.origin, want.origin)
    torch.testing.assert_close(out.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    ids = assert_whole_units(out, full, layout)
    units = [8, 9, 1, 4]
    got_units = torch.bincount(layout.unit_segment[ids], minlength=4).tolist()
    assert got_units == [_keep_count(n, 0.3) for n in units]
    # sizes are conserved per segment: every original patch is accounted for exactly once
    for seg in range(4):
        m = (out.segment == seg) & ~out.cls
        assert float(out.size[m].sum()) == pytest.approx(4 * units[seg])
    # never more than half of a segment's units per block, nothing before start_layer
    cur = torch.tensor(units)
    for row in r_table:
        assert bool((row <= cur // 2).all())
        cur = cur - row
    assert all(c[2] == () for c in calls if c[0] == "variant" and c[1] < start)
    if isinstance(schedule, list):
        assert r_table.sum(1).tolist()[1] == 0      # zero weight -> no merge in that block


def test_proportional_attention_only_after_the_first_merge():
    layout, full = make_tokens(GRIDS, "qwen")
    tower = FakeTower(depth=5)
    _, _, calls = tower.run(ToMe(keep_ratio=0.5, start_layer=1), full, layout)
    kinds = [c[2] for c in calls if c[0] == "variant"]
    assert kinds[0] == () and kinds[1] == ("mid",)
    assert all("size_bias" in k for k in kinds[2:])
    _, _, calls = tower.run(ToMe(keep_ratio=0.5, prop_attn=False), full, layout)
    assert all("size_bias" not in c[2] for c in calls if c[0] == "variant")


@pytest.mark.parametrize("kw", [dict(keep_ratio=1.0), dict(num_tokens=10_000)])
@pytest.mark.parametrize("order", ["qwen", "internvl"])
def test_keep_all_is_exact_noop(kw, order):
    layout, full = make_tokens(GRIDS, order)
    tower = FakeTower(depth=4)
    plain, _, _ = tower.run(None, full, layout)
    out, _, calls = tower.run(ToMe(**kw), full, layout)
    assert torch.equal(out.hidden, plain.hidden) and torch.equal(out.origin, full.origin)
    assert all(c[2] == () for c in calls if c[0] == "variant")


def test_num_tokens_is_units_per_segment_and_infeasible_targets_clip():
    layout, full = make_tokens(GRIDS, "qwen")
    out, _, _ = FakeTower(depth=4).run(ToMe(num_tokens=3), full, layout)
    ids, _ = out.units()
    assert torch.bincount(layout.unit_segment[ids], minlength=4).tolist() == [3, 3, 1, 3]
    # one merging block can at most halve: keep_ratio 0.1 on 8 units -> 4 units left
    out, _, _ = FakeTower(depth=2).run(ToMe(keep_ratio=0.1, start_layer=1), full, layout)
    ids, _ = out.units()
    assert torch.bincount(layout.unit_segment[ids], minlength=4).tolist() == [4, 5, 1, 2]


def test_batch_row_invariance():
    tower = FakeTower(depth=5)
    layout, full = make_tokens([(4, 8), (6, 6)], "qwen", seed=9)
    alone_layout, alone = make_tokens([(4, 8)], "qwen", seed=9)
    s = ToMe(keep_ratio=0.25)
    both, _, _ = tower.run(s, full, layout)
    one, _, _ = tower.run(s, alone, alone_layout)
    m = both.segment == 0
    assert torch.equal(both.origin[m], one.origin)
    torch.testing.assert_close(both.hidden[m], one.hidden, rtol=0, atol=1e-12)


def test_config_validation():
    with pytest.raises(ConfigError, match="schedule"):
        ToMe(keep_ratio=0.5, schedule=[1, 2]).validate({"vision": 4})
    with pytest.raises(ConfigError, match="start_layer"):
        ToMe(keep_ratio=0.5, start_layer=4).validate({"vision": 4})
    with pytest.raises(ConfigError):
        ToMe(schedule="linear")
    ToMe(schedule=[1, 1, 1], start_layer=1).validate({"vision": 4})
    assert ToMe().config.keep_ratio == 0.5 and ToMe.granularity == "unit" and not ToMe.flash_compatible


def test_registered_and_spec_round_trip():
    import tokcomp
    s = tokcomp.get("tome", keep_ratio=0.4, schedule="decreasing")
    assert isinstance(s, ToMe) and s.spec == "tome(keep_ratio=0.4,schedule=decreasing)"
    from tokcomp.spec import parse_spec
    assert parse_spec("tome(keep_ratio=0.4,schedule=[1,2,3])").vision.config.schedule == [1, 2, 3]
