"""V²Drop on synthetic steps: selection against a loop, schedule counts, budget matching, paper schedule."""
import math

import pytest
import torch

from llm_fakes import FakeLLM, layer_counts_from_plan
from tokcomp.errors import ConfigError
from tokcomp.ops.schedule import fit_fractions, one_shot_area, schedule_area
from tokcomp.plugins.v2drop import PAPER_DEPTH, PAPER_FRACTIONS, PAPER_LAYERS, V2Drop

torch.set_num_threads(1)

ROWS = [
    ([("t", 3), ("v", (1, 4, 4)), ("t", 2), ("v", (1, 3, 3)), ("t", 4)], 31),
    ([("t", 2), ("v", (2, 3, 3)), ("t", 3)], 32),
    ([("t", 4)], 33),
]


def naive_variation_topk(step, b, budget):
    vis = step.visual[b].nonzero()[:, 0].tolist()
    var = {}
    for p in vis:
        var[p] = math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(step.hidden[b, p], step.hidden_in[b, p])))
    return sorted(sorted(vis, key=lambda p: (-var[p], p))[:min(budget, len(vis))])


@pytest.mark.parametrize("n_layers,kw", [(8, dict(keep_ratio=0.3)), (12, {}), (6, dict(num_tokens=7)),
                                         (8, dict(schedule=[[2, 0.6], [5, 0.2], [7, 0.0]]))])
def test_selection_equals_loop_and_counts_follow_schedule(n_layers, kw):
    pruner = V2Drop(**kw)
    res = FakeLLM(ROWS, n_layers).run(pruner)
    layers = pruner.stage_layers(n_layers)
    assert [s.layer for s, _ in res.steps] == [x - 1 for x in layers]
    for stage, (step, sel) in enumerate(res.steps):
        for b in range(step.visual.shape[0]):
            n0 = int(step.n_visual_original[b])
            budget = pruner.plan(n0, n_layers)[stage] if n0 else 0
            assert sel.keep[b].tolist() == naive_variation_topk(step, b, budget)
    for b, row in enumerate(FakeLLM(ROWS, n_layers).rows):
        want = layer_counts_from_plan(pruner, int(row.visual.sum()), n_layers)
        assert [res.counts[i][b] for i in range(n_layers)] == want


@pytest.mark.parametrize("n_layers", [4, 8, 28, 36])
@pytest.mark.parametrize("ratio", [0.05, 0.1663, 0.3, 0.5, 0.9])
def test_layer_average_matches_one_shot(n_layers, ratio):
    pruner = V2Drop(keep_ratio=ratio)
    for n in (64, 576, 1296):
        counts = layer_counts_from_plan(pruner, n, n_layers)
        target = one_shot_area(pruner.config.keep_count(n), n, n_layers) * n
        layers = pruner.stage_layers(n_layers)
        reachable = schedule_area(layers, [0.0] * len(layers), n_layers) * n + (n_layers - layers[0])
        if target >= reachable:  # min 1 token per stage: exact up to rounding each stage
            assert abs(sum(counts) - target) <= 0.5 * (n_layers - layers[0]) + 1e-6
        else:  # below "drop all but one" after the first stage: the most aggressive schedule
            assert counts[layers[0]:] == [1] * (n_layers - layers[0])


def test_paper_schedule_reproduced_at_default():
    pruner = V2Drop()
    assert pruner.stage_layers(PAPER_DEPTH) == list(PAPER_LAYERS)
    target = one_shot_area(pruner.config.keep_ratio * 1.0, 1, PAPER_DEPTH)
    got = fit_fractions(list(PAPER_LAYERS), PAPER_DEPTH, pruner.anchors(list(PAPER_LAYERS), PAPER_DEPTH), target)
    assert got == pytest.approx(list(PAPER_FRACTIONS), abs=1e-12)
    assert pruner.plan(1000, PAPER_DEPTH) in ([250, 12, 1], [249, 12, 1], [250, 13, 1])
    assert pruner.stage_layers(56) == [6, 32, 44] and pruner.stage_layers(4) == [1, 2, 3]


def test_keep_ratio_one_is_noop_and_batch_invariance():
    assert V2Drop(keep_ratio=1.0).prune_layers(28) == []
    pruner = V2Drop(keep_ratio=0.4)
    res = FakeLLM(ROWS, 8).run(pruner)
    step, _ = res.steps[0]
    full = V2Drop(keep_ratio=1.0)
    full.prune_layers(8)
    sel = full.select(step, {"n_layers": 8})
    for b in range(step.visual.shape[0]):
        assert sel.keep[b].tolist() == step.visual[b].nonzero()[:, 0].tolist()
    for b, row in enumerate(ROWS):
        alone = FakeLLM([row], 8).run(V2Drop(keep_ratio=0.4))
        assert torch.equal(res.kept[b], alone.kept[0])


def test_config_validation():
    with pytest.raises(ConfigError, match="strictly increasing"):
        V2Drop(schedule=[[3, 0.5], [3, 0.2]])
    with pytest.raises(ConfigError, match="cannot increase"):
        V2Drop(schedule=[[3, 0.2], [5, 0.5]])
    with pytest.raises(ConfigError, match="not both"):
        V2Drop(schedule=[[3, 0.2]], keep_ratio=0.5)
    with pytest.raises(ConfigError, match=">= 1"):
        V2Drop(schedule=[[0, 0.2]])
    with pytest.raises(ConfigError, match="out of range"):
        V2Drop(schedule=[[3, 0.5], [8, 0.1]]).validate({"llm": 8})
    V2Drop(schedule=[[3, 0.5], [7, 0.1]]).validate({"llm": 8})
    assert V2Drop(schedule=[[3, 0.5], [7, 0.1]]).spec == "v2drop(schedule=[[3,0.5],[7,0.1]])"
