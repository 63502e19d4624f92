"""LUVC-SPU on synthetic steps: the spectral score against an explicit DFT, per-span budgets, the cascade."""
import cmath
import math
from fractions import Fraction

import pytest
import torch

from llm_fakes import FakeLLM, layer_counts_from_plan
from tokcomp.errors import ConfigError
from tokcomp.ops.schedule import one_shot_area
from tokcomp.plugins.luvc_spu import SPU, proportional_split, spectral_scores

torch.set_num_threads(1)

ROWS = [
    ([("t", 3), ("v", (1, 5, 6)), ("t", 2), ("v", (1, 4, 4)), ("t", 4)], 51),  # even and odd grid sides
    ([("t", 2), ("v", (3, 3, 4)), ("t", 3)], 52),                            # 3-frame video
    ([("t", 4)], 53),
]


def _freq(k: int, n: int) -> float:
    return k / n if k <= (n - 1) // 2 else (k - n) / n


def naive_residual_energy(grid: torch.Tensor, cutoff: float) -> list[list[float]]:
    """||x - lowpass(x)||^2 per cell of one frame [h, w, C], with an explicit 2-D DFT (complex sums)."""
    h, w, c = grid.shape
    x = grid.double().tolist()
    out = [[0.0] * w for _ in range(h)]
    passes = [[2.0 * math.hypot(_freq(u, h), _freq(v, w)) <= cutoff + 1e-12 for v in range(w)] for u in range(h)]
    for ch in range(c):
        spec = [[sum(x[a][b][ch] * cmath.exp(-2j * math.pi * (u * a / h + v * b / w))
                     for a in range(h) for b in range(w)) for v in range(w)] for u in range(h)]
        for a in range(h):
            for b in range(w):
                low = sum(spec[u][v] * cmath.exp(2j * math.pi * (u * a / h + v * b / w))
                          for u in range(h) for v in range(w) if passes[u][v]) / (h * w)
                out[a][b] += (x[a][b][ch] - low.real) ** 2
    return out


def naive_split(counts, total):
    s = sum(counts)
    if total >= s:
        return list(counts)
    quota = [Fraction(total * c, s) for c in counts]
    base = [int(q) for q in quota]
    order = sorted(range(len(counts)), key=lambda j: (-(quota[j] - base[j]), j))
    for j in order[:total - sum(base)]:
        base[j] += 1
    return base


@pytest.mark.parametrize("grid,cutoff", [((1, 4, 4), 0.5), ((1, 5, 6), 0.3), ((2, 3, 5), 1.0), ((1, 6, 4), 0.0)])
def test_spectral_scores_equal_explicit_dft(grid, cutoff):
    g = torch.Generator().manual_seed(sum(grid))
    t, h, w = grid
    cells = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    cells = cells.reshape(-1, 3)
    present = torch.rand(cells.shape[0], generator=g) < 0.7  # pruned cells are zeros on the grid
    cells = cells[present]
    hidden = torch.randn(cells.shape[0], 3, generator=g)
    got = spectral_scores(hidden, cells, grid, cutoff)
    frames = torch.zeros(t, h, w, 3)
    frames[cells[:, 0], cells[:, 1], cells[:, 2]] = hidden
    want = [naive_residual_energy(frames[f], cutoff) for f in range(t)]
    for i, (f, a, b) in enumerate(cells.tolist()):
        assert abs(float(got[i]) - want[f][a][b]) < 1e-4 * max(1.0, want[f][a][b])


def test_proportional_split_equals_naive():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts = torch.randint(0, 30, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        total = int(torch.randint(0, sum(counts) + 3, (1,), generator=g))
        got = proportional_split(counts, total)
        assert got == naive_split(counts, total)
        assert sum(got) == min(total, sum(counts)) and all(a <= c for a, c in zip(got, counts))


@pytest.mark.parametrize("n_layers,kw", [(8, dict(keep_ratio=0.4)), (10, dict(keep_ratio=0.3, stages=6, cutoff=0.8)),
                                         (8, dict(keep_ratio=0.5, floor=0.25)),
                                         (6, dict(schedule=[[2, 0.6], [4, 0.2], [5, 0.0]]))])
def test_selection_equals_naive_and_counts_follow_schedule(n_layers, kw):
    pruner = SPU(**kw)
    fake = FakeLLM(ROWS, n_layers)
    res = fake.run(pruner)
    layers = pruner.stage_layers(n_layers)
    assert [s.layer for s, _ in res.steps] == [x - 1 for x in layers]
    for stage, (step, sel) in enumerate(res.steps):
        for b in range(step.visual.shape[0]):
            n0 = int(step.n_visual_original[b])
            budget = pruner.plan(n0, n_layers)[stage] if n0 else 0
            spans = [s for s in step.spans[b] if s.positions.numel()]
            alloc = naive_split([s.positions.numel() for s in spans], budget)
            want = []
            for s, k in zip(spans, alloc):
                t, h, w = s.grid
                frames = torch.zeros(t, h, w, step.hidden.shape[-1])
                frames[s.cells[:, 0], s.cells[:, 1], s.cells[:, 2]] = step.hidden[b, s.positions]
                energy = [naive_residual_energy(frames[f], pruner.config.cutoff) for f in range(t)]
                score = {int(p): energy[f][a][c] for p, (f, a, c) in zip(s.positions, s.cells.tolist())}
                # scores differ by far more than the float32/float64 gap here; ties go to the lower position
                want += sorted(score, key=lambda p: (-score[p], p))[:k]
            assert sel.keep[b].tolist() == sorted(want)
    for b, row in enumerate(fake.rows):
        n0 = int(row.visual.sum())
        counts = [res.counts[i][b] for i in range(n_layers)]
        assert counts == layer_counts_from_plan(pruner, n0, n_layers)
        if n0 and pruner.config.schedule is None:
            assert counts[-1] == round(pruner.config.floor * n0)  # the cascade ends at the floor


def test_default_cascade_and_budget_matching():
    pruner = SPU()
    assert pruner.config.keep_ratio == 0.5 and pruner.config.floor == 0.0
    assert pruner.stage_layers(28) == [2, 10, 19, 27] and pruner.prune_layers(28) == [1, 9, 18, 26]
    assert pruner.plan(1000, 28)[-1] == 0
    for n_layers in (4, 9, 28, 36):
        for ratio in (0.05, 0.2, 0.5, 0.9, 0.99):
            p = SPU(keep_ratio=ratio)
            for n in (16, 600):
                counts = layer_counts_from_plan(p, n, n_layers)
                target = one_shot_area(p.config.keep_count(n), n, n_layers) * n
                first = p.stage_layers(n_layers)[0]
                if target >= first * n:  # reachable: matched up to rounding each stage
                    assert abs(sum(counts) - target) <= 0.5 * (n_layers - first) + 1e-6
                assert counts == sorted(counts, reverse=True)
    high = SPU(keep_ratio=0.99).plan(1000, 28)  # beyond a cascade to zero: the last stage is raised
    assert high[:3] == [1000, 1000, 1000] and 0 < high[3] < 1000


def test_keep_ratio_one_is_noop_and_batch_invariance():
    assert SPU(keep_ratio=1.0).prune_layers(28) == []
    res = FakeLLM(ROWS, 8).run(SPU(keep_ratio=0.4))
    step, _ = res.steps[0]
    full = SPU(keep_ratio=1.0)
    sel = full.select(step, {"n_layers": 8})
    for b in range(step.visual.shape[0]):
        assert sel.keep[b].tolist() == step.visual[b].nonzero()[:, 0].tolist()
    for b, row in enumerate(ROWS):
        alone = FakeLLM([row], 8).run(SPU(keep_ratio=0.4))
        assert torch.equal(res.kept[b], alone.kept[0])


def test_config():
    assert SPU(keep_ratio=0.3, stages=1).stage_layers(12) == [11]
    assert SPU(start=9, stages=4).stage_layers(12) == [9, 10, 11]
    with pytest.raises(ConfigError):
        SPU(floor=1.5)
    with pytest.raises(ConfigError):
        SPU(start=0)
    with pytest.raises(ConfigError, match="out of range"):
        SPU(start=12).validate({"llm": 12})
    assert SPU.name == "luvc_spu" and not SPU.needs_attention_rows and not SPU.needs_keys and SPU.flash_compatible
