"""ToFu at unit granularity: prune mode before the switch block, MLERP (norm and direction) after, against naive
loops and a naive tower."""
from __future__ import annotations

import pytest
import torch

from tokcomp.errors import ConfigError
from tokcomp.plugins.tofu import ToFu
from tokcomp.tokens import VisionContext
from vision_fakes import FakeTower, assert_whole_units, make_tokens
from vision_refs import naive_apply_pairs, naive_tower, naive_unit_matching, official_tome_tower, units_of

GRIDS = [(4, 8), (6, 6), (2, 2), (4, 4)]


def _setup(seed=2):
    layout, tokens = make_tokens(GRIDS, "qwen", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    keys = torch.randn(tokens.n, 8, generator=g, dtype=torch.float64)
    tokens = tokens.with_hidden(tokens.hidden * (torch.rand(tokens.n, 1, generator=g, dtype=torch.float64) * 3),
                                size=torch.rand(tokens.n, generator=g) + 0.5)
    return layout, tokens, keys


def test_mlerp_norm_and_direction():
    """After the switch: each merged patch has the largest norm of its members and the direction of their
    size-weighted mean."""
    layout, tokens, keys = _setup()
    r = [4, 4, 0, 2]
    s = ToFu(keep_ratio=0.5, merge_from_layer=0)
    got = s._mid(tokens, keys, i=0, r=torch.tensor(r), ctx=VisionContext(layout, 4, ""))
    pairs = naive_unit_matching(tokens, keys, r)
    want = naive_apply_pairs(tokens, pairs, "mlerp")
    assert torch.equal(got.origin, want.origin)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.size, want.size)
    units = units_of(tokens)
    groups = {}
    for src, dst in pairs:
        groups.setdefault(dst, []).append(src)
    row_of = {int(o): k for k, o in enumerate(got.origin)}
    for dst, srcs in groups.items():
        for j in range(4):
            members = [units[dst][j]] + [units[x][j] for x in srcs]
            v = tokens.hidden[members]
            w = tokens.size[members].double()
            out = got.hidden[row_of[int(tokens.origin[units[dst][j]])]]
            assert float(out.norm()) == pytest.approx(float(v.norm(dim=1).max()), rel=1e-5)
            mean = (w[:, None] * v).sum(0)
            assert float(torch.nn.functional.cosine_similarity(out, mean, dim=0)) == pytest.approx(1.0, abs=1e-6)


def test_prune_mode_before_the_switch():
    layout, tokens, keys = _setup(seed=4)
    r = [3, 4, 0, 1]
    s = ToFu(keep_ratio=0.5, merge_from_layer=2)
    got = s._mid(tokens, keys, i=1, r=torch.tensor(r), ctx=VisionContext(layout, 4, ""))
    pairs = naive_unit_matching(tokens, keys, r)
    want = naive_apply_pairs(tokens, pairs, "prune")
    assert torch.equal(got.origin, want.origin)
    assert torch.equal(got.hidden, tokens.hidden[got.origin])       # survivors untouched
    torch.testing.assert_close(got.size, want.size)                  # dst size += src size


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("switch", [None, 0, 3])
@pytest.mark.parametrize("seq", ["tome", "spatial"])
def test_tower_matches_naive(order, switch, seq):
    """ToFu = ToMe's matching (its sequence order included: ``order`` is inherited) with ToFu's merge rules."""
    layout, full = make_tokens(GRIDS, order, seed=5)
    tower = FakeTower(depth=6, seed=6)
    s = ToFu(keep_ratio=0.3, merge_from_layer=switch, order=seq)
    out, ctx, _ = tower.run(s, full, layout)
    at = tower.depth // 2 if switch is None else switch
    assert s.switch_layer(ctx) == at
    rule = lambda i: "prune" if i < at else "mlerp"  # noqa: E731
    if seq == "spatial":
        want = naive_tower(tower, full, s.r_table(ctx), 0, True, rule)
    else:
        want = official_tome_tower(tower, full, s.r_table(ctx), 0, True, rule)
        want = want.select(torch.argsort(want.origin))
    assert torch.equal(out.origin, want.origin)
    torch.testing.assert_close(out.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    assert_whole_units(out, full, layout)


@pytest.mark.parametrize("kw", [dict(keep_ratio=1.0), dict(num_tokens=10_000)])
def test_keep_all_is_exact_noop(kw):
    layout, full = make_tokens(GRIDS, "internvl")
    tower = FakeTower(depth=4)
    plain, _, _ = tower.run(None, full, layout)
    out, _, calls = tower.run(ToFu(**kw), full, layout)
    assert torch.equal(out.hidden, plain.hidden) and torch.equal(out.origin, full.origin)
    assert all(c[2] == () for c in calls if c[0] == "variant")


def test_config_and_registration():
    import tokcomp
    s = tokcomp.get("tofu", keep_ratio=0.4, merge_from_layer=2)
    assert isinstance(s, ToFu) and s.spec == "tofu(keep_ratio=0.4,merge_from_layer=2)"
    with pytest.raises(ConfigError, match="merge_from_layer"):
        s.validate({"vision": 2})
    assert ToFu().config.merge_from_layer is None and ToFu.granularity == "unit"
