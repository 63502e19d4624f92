"""DART-ViT on synthetic tensors: per-segment selection against a naive greedy loop, the finish contract, budgets,
no-op, batch invariance."""
from __future__ import annotations

import math

import pytest
import torch

from tokcomp.plugins.dart_vit import DartViT, dart_units
from tokcomp.tokens import VisionContext
from vision_fakes import FakeTower, assert_whole_units, make_tokens
from vision_refs import naive_dart, units_of

GRIDS = [(4, 8), (6, 6), (2, 2), (8, 4)]
UNITS = [8, 9, 1, 8]


def _keep_count(n, ratio):
    return max(min(1, n), min(math.floor(n * ratio + 0.5), n))   # round half up, clamped to [1, n]


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("ratio,pivots", [(0.222, 4), (0.5, 4), (0.7, 2), (0.5, 0), (0.3, 1)])
def test_selection_matches_naive_greedy_loop(order, ratio, pivots):
    layout, tokens = make_tokens(GRIDS, order, seed=11)
    rows = dart_units(tokens, lambda n: _keep_count(n, ratio), pivots)
    units = units_of(tokens)
    want = []
    for s in range(len(GRIDS)):
        us = [u for u, r in units.items() if int(tokens.segment[r[0]]) == s]
        feat = torch.stack([torch.cat([tokens.hidden[r] for r in units[u]]) for u in us])
        for local in naive_dart(feat, _keep_count(len(us), ratio), pivots):
            want += units[us[local]]
    want = sorted(want + tokens.cls.nonzero()[:, 0].tolist())
    assert rows.tolist() == want


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("layer", [None, 1])
def test_tower_contract_and_counts(order, layer):
    layout, full = make_tokens(GRIDS, order, seed=12)
    tower = FakeTower(depth=4)
    out, ctx, calls = tower.run(DartViT(layer=layer), full, layout)
    ids = assert_whole_units(out, full, layout)
    assert torch.bincount(layout.unit_segment[ids], minlength=4).tolist() == [_keep_count(n, 0.222) for n in UNITS]
    at = tower.depth - 1 if layer is None else layer
    assert [ctx.counts[i] == full.n for i in range(tower.depth)] == [i < at for i in range(tower.depth)]
    assert all(c[2] == () for c in calls if c[0] == "variant")
    # the kept units carry the states the plain tower computes up to the selection block
    plain = full
    for i in range(at + 1):
        plain = tower.block(i, plain)
    if layer is None:
        assert torch.equal(out.hidden, plain.hidden[out.origin])


@pytest.mark.parametrize("kw", [dict(keep_ratio=1.0), dict(num_tokens=100)])
def test_keep_all_is_noop(kw):
    layout, full = make_tokens(GRIDS, "qwen")
    tower = FakeTower(depth=3)
    plain, _, _ = tower.run(None, full, layout)
    out, _, _ = tower.run(DartViT(layer=0, **kw), full, layout)
    assert torch.equal(out.hidden, plain.hidden) and torch.equal(out.origin, full.origin)


def test_num_tokens_per_segment_and_batch_invariance():
    layout, full = make_tokens(GRIDS, "qwen", seed=13)
    ctx = VisionContext(layout, 4, "")
    kept = DartViT(num_tokens=5).after_block(3, full, ctx)
    ids, _ = kept.units()
    assert torch.bincount(layout.unit_segment[ids], minlength=4).tolist() == [5, 5, 1, 5]
    alone_layout, alone = make_tokens(GRIDS[:1], "qwen", seed=13)
    one = DartViT(num_tokens=5).after_block(3, alone, VisionContext(alone_layout, 4, ""))
    assert torch.equal(one.origin, kept.origin[kept.segment == 0])


def test_defaults_and_registration():
    import tokcomp
    s = tokcomp.get("dart_vit")
    assert isinstance(s, DartViT) and s.config.keep_ratio == 0.222 and s.config.pivots == 4
    assert s.config.layer is None and DartViT.granularity == "unit" and DartViT.flash_compatible
