"""ToMe at unit granularity on synthetic tensors: matching and merging against the official algorithm (written out in
``vision_refs.official_tome_step``: ToMe's sequence with CLS in the alternation, reordered after every merge) and, for
``order="spatial"``, against naive loops; the whole tower against both; the finish contract, the budget,
proportional attention, no-op and batch invariance."""
from __future__ import annotations

import math

import pytest
import torch

from tokcomp.errors import ConfigError
from tokcomp.plugins.tofu import ToFu
from tokcomp.plugins.tome import ToMe
from tokcomp.tokens import VisionContext
from vision_fakes import FakeTower, assert_whole_units, make_tokens
from vision_refs import (naive_apply_pairs, naive_tower, naive_unit_matching, official_tome_step, official_tome_tower,
                         tome_initial_sequence)

from tokcomp.adapters._vit_restore import grid_layout, grid_tokens

GRIDS = [(4, 8), (6, 6), (2, 2), (4, 4)]


def _keep_count(n, ratio):
    return max(min(1, n), min(math.floor(n * ratio + 0.5), n))   # round half up, clamped to [1, n]


def _by_origin(t):
    return t.select(torch.argsort(t.origin))


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("r", [[1, 2, 0, 1], [4, 9, 1, 4], [16, 18, 2, 8]])
@pytest.mark.parametrize("seq", ["tome", "spatial"])
def test_mid_matches_reference(order, r, seq):
    layout, tokens = make_tokens(GRIDS, order, seed=2)
    keys = torch.randn(tokens.n, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tokens = tokens.with_hidden(tokens.hidden, size=torch.rand(tokens.n, generator=torch.Generator()
                                                                .manual_seed(4)) + 0.5)
    ctx = VisionContext(layout, 4, "")
    s = ToMe(keep_ratio=0.5, order=seq)
    got = s._mid(tokens, keys, i=0, r=torch.tensor(r), ctx=ctx)
    if seq == "spatial":
        pairs = naive_unit_matching(tokens, keys, r)
        want = naive_apply_pairs(tokens, pairs)
    else:
        start = tome_initial_sequence(tokens)
        want, pairs = official_tome_step(start, keys[start.origin], r)
        want = _by_origin(want)
    assert len(pairs) == sum(min(x, n // 2) for x, n in zip(r, [8, 9, 1, 4]))
    assert torch.equal(got.origin, want.origin)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-6, atol=1e-6)   # merge sums in float32
    torch.testing.assert_close(got.size, want.size)
    assert torch.equal(got.unit, want.unit) and torch.equal(got.pos, want.pos)  # dst keeps its id/positions


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("schedule,start", [("constant", 0), ("decreasing", 1), ([3, 0, 1, 1, 0], 1)])
@pytest.mark.parametrize("seq", ["tome", "spatial"])
def test_tower_matches_reference_and_meets_budget(order, schedule, start, seq):
    layout, full = make_tokens(GRIDS, order, seed=5)
    tower = FakeTower(depth=6, seed=6)
    s = ToMe(keep_ratio=0.3, schedule=schedule, start_layer=start, order=seq)
    s.validate({"vision": tower.depth})
    out, ctx, calls = tower.run(s, full, layout)
    r_table = s.r_table(ctx)
    if seq == "spatial":
        want = naive_tower(tower, full, r_table, start, True)
    else:
        want = _by_origin(official_tome_tower(tower, full, r_table, start, True))
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


# ---------------------------------------------------------------------------------------------------------------
# the official algorithm over several merging blocks: groups and sizes, with and without CLS
# ---------------------------------------------------------------------------------------------------------------
def _plain_vit(grids_hw, n_prefix, feat, seed):
    """unit_size 1 (plain ViT: every patch its own unit), ``n_prefix`` prefix tokens per image (1 = CLS, 2 = CLS +
    DeiT's distillation token); hidden = [feat random features | one-hot of the original row]."""
    h, w = grids_hw
    layout = grid_layout(2, h, w, n_prefix)
    n1 = n_prefix + h * w
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(2 * n1, feat, generator=g, dtype=torch.float64),
                   torch.eye(2 * n1, dtype=torch.float64)], 1)
    return layout, grid_tokens(x.view(2, n1, -1), h, w, n_prefix)


def _units(grids, order, feat, seed):
    layout, t = make_tokens(grids, order, seed=seed, c=feat)
    return layout, t.with_hidden(torch.cat([t.hidden, torch.eye(t.n, dtype=torch.float64)], 1))


def _groups_from_onehot(t, feat):
    """{origin of a surviving row: frozenset of the original rows merged into it} from the one-hot columns."""
    counts = (t.hidden[:, feat:] * t.size.double()[:, None]).round().long()
    return {int(o): frozenset(counts[k].nonzero()[:, 0].tolist()) for k, o in enumerate(t.origin.tolist())}


@pytest.mark.parametrize("case", ["vit", "vit-cls", "vit-cls-distill", "qwen", "internvl"])
def test_groups_match_official_over_several_blocks(case):
    """tokcomp's default ``tome`` against the official algorithm on the same tensors: after 6 merging blocks every
    surviving token represents exactly the same original tokens with the same size, with and without CLS."""
    feat = 6
    if case.startswith("vit"):
        n_prefix = {"vit": 0, "vit-cls": 1, "vit-cls-distill": 2}[case]
        layout, tokens = _plain_vit((8, 10), n_prefix, feat, seed=11)
        r_blocks = [[8, 8], [8, 8], [12, 5], [8, 8], [3, 9], [8, 8]]
    else:
        layout, tokens = _units(GRIDS, case, feat, seed=11)
        r_blocks = [[2, 2, 0, 1], [2, 1, 1, 1], [1, 2, 0, 1], [1, 1, 0, 0], [1, 1, 0, 1], [0, 1, 0, 0]]
    w = [torch.randn(feat, 8, generator=torch.Generator().manual_seed(20 + i), dtype=torch.float64)
         for i in range(len(r_blocks))]
    s, ctx = ToMe(keep_ratio=0.5), VisionContext(layout, len(r_blocks), "")
    ref, groups = tome_initial_sequence(tokens), {o: {o} for o in tokens.origin.tolist()}
    origins_of_unit = {}
    for row in range(tokens.n):
        if not bool(tokens.cls[row]):
            origins_of_unit.setdefault(int(tokens.unit[row]), []).append(int(tokens.origin[row]))
    got = tokens
    for i, r in enumerate(r_blocks):
        got = s._mid(got, got.hidden[:, :feat] @ w[i], i=i, r=torch.tensor(r), ctx=ctx)
        ref, pairs = official_tome_step(ref, ref.hidden[:, :feat] @ w[i], r)
        assert pairs, "every block merges something"
        for src, dst in pairs:   # merge_source: patch j of the source joins patch j of the destination
            for o_src, o_dst in zip(sorted(origins_of_unit[src]), sorted(origins_of_unit[dst])):
                groups[o_dst] |= groups.pop(o_src)
    ref = _by_origin(ref)
    assert torch.equal(got.origin, ref.origin)
    assert _groups_from_onehot(got, feat) == {o: frozenset(g) for o, g in groups.items()}
    assert torch.equal(got.size, ref.size.to(got.size.dtype))
    assert {o: float(sz) for o, sz in zip(got.origin.tolist(), got.size)} == {o: float(len(g)) for o, g in groups.items()}
    torch.testing.assert_close(got.hidden, ref.hidden, rtol=1e-6, atol=1e-6)


def test_spatial_order_is_a_different_method():
    """The order-preserving variant is not the official one: with CLS its sets are swapped in the first block, and
    without CLS the reordering changes later blocks' pairs."""
    feat = 6
    for n_prefix in (0, 1):
        layout, tokens = _plain_vit((8, 10), n_prefix, feat, seed=3)
        ctx_t, ctx_s = VisionContext(layout, 4, ""), VisionContext(layout, 4, "")
        a = b = tokens
        w = torch.randn(feat, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        for i in range(4):
            a = ToMe(order="tome")._mid(a, a.hidden[:, :feat] @ w, i=i, r=torch.tensor([8, 8]), ctx=ctx_t)
            b = ToMe(order="spatial")._mid(b, b.hidden[:, :feat] @ w, i=i, r=torch.tensor([8, 8]), ctx=ctx_s)
            if n_prefix and i == 0:
                assert not torch.equal(a.origin, b.origin)
        assert _groups_from_onehot(a, feat) != _groups_from_onehot(b, feat)


def _unit_set(S, n_units, u, n_prefix, kind, seed):
    """S equal segments, each ``n_prefix`` CLS rows then ``n_units`` units of ``u`` consecutive rows."""
    g = torch.Generator().manual_seed(seed)
    seg, cls, unit = [], [], []
    for s in range(S):
        seg += [s] * (n_prefix + n_units * u)
        cls += [True] * n_prefix + [False] * (n_units * u)
        unit += [-1] * n_prefix + [s * n_units + k for k in range(n_units) for _ in range(u)]
    n = len(seg)
    from tokcomp.tokens import VisionTokens
    tokens = VisionTokens(torch.randn(n, 8, generator=g), torch.tensor(seg), torch.zeros(n, 3, dtype=torch.long),
                          torch.tensor(unit), torch.rand(n, generator=g) + 0.5, torch.arange(n), torch.tensor(cls))
    keys = torch.randn(n, 8, generator=g) if kind == "random" else \
        torch.ones(n, 8) + (torch.rand(n, 8, generator=g) < 0.1) * 0.5          # exact ties: flat image
    return tokens, keys


@pytest.mark.parametrize("S,n_units,u", [(1, 37, 1), (3, 20, 1), (1, 21, 4), (2, 14, 4)])
@pytest.mark.parametrize("n_prefix", [0, 1, 2])
@pytest.mark.parametrize("kind", ["random", "flat"])
@pytest.mark.parametrize("order", ["tome", "spatial"])
@pytest.mark.parametrize("cls", [ToMe, ToFu])
def test_dense_path_equals_general_path(S, n_units, u, n_prefix, kind, order, cls):
    """The dense fast path (equal segments) gives bit for bit what the general path gives, block after block
    (pairs, merged states and sizes, ToMe's sequence), also on exact ties (flat image)."""
    tokens, keys0 = _unit_set(S, n_units, u, n_prefix, kind, seed=S * 100 + n_units + n_prefix)
    fast, slow = cls(keep_ratio=0.5, order=order), cls(keep_ratio=0.5, order=order)
    ctx_f, ctx_s = VisionContext(None, 6, ""), VisionContext(None, 6, "")   # _mid reads no layout (seq given)
    for c in (ctx_f, ctx_s):
        c.state["tome.seq"] = c.state["tofu.seq"] = torch.arange(S * n_units)
    a = b = tokens
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(7))
    for i, r in enumerate([1, 3, 2, 5, 1, 2]):
        keys = keys0[:a.n] if kind == "flat" else a.hidden @ w
        a = fast._mid(a, keys, i=i, r=torch.full((S,), r), ctx=ctx_f)
        b = slow._mid_general(b, keys, i, torch.full((S,), r), ctx_s)
        assert ctx_f.state.get(fast._KEY + ".dense") is not None, "the dense path served"
        assert torch.equal(a.origin, b.origin) and torch.equal(a.unit, b.unit)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.size, b.size)
        if order == "tome":
            assert torch.equal(ctx_f.state[fast._KEY + ".seq"], ctx_s.state[slow._KEY + ".seq"])


def test_dense_path_declines_unequal_sets():
    """Unequal segments or unequal per-segment r go to the general path."""
    from tokcomp.plugins.tome import dense_sequence
    layout, tokens = make_tokens(GRIDS, "qwen", seed=1)
    assert dense_sequence(tokens, None, 4) is None
    tokens, keys = _unit_set(2, 6, 1, 1, "random", seed=0)
    assert dense_sequence(tokens, torch.arange(12), 2) is not None
    ctx = VisionContext(layout, 4, "")
    assert ToMe()._mid_dense(tokens, keys, 0, torch.tensor([1, 2]), ctx) is None
    assert ToMe()._mid_dense(tokens, keys, 0, torch.tensor([1, 1]), ctx) is not None


def test_dense_path_bounded_memory(monkeypatch):
    """Above DENSE_MAX_SCORES score entries the chunked general path serves (same result)."""
    import tokcomp.plugins.tome as tome
    tokens, keys = _unit_set(1, 40, 1, 1, "random", seed=3)
    ctx = VisionContext(None, 4, "")
    ctx.state["tome.seq"] = torch.arange(40)
    assert ToMe()._mid_dense(tokens, keys, 0, torch.tensor([3]), ctx) is not None
    monkeypatch.setattr(tome, "DENSE_MAX_SCORES", 20 * 20 - 1)
    ctx.state.clear()
    ctx.state["tome.seq"] = torch.arange(40)
    assert ToMe()._mid_dense(tokens, keys, 0, torch.tensor([3]), ctx) is None
