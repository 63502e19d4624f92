"""tokcomp.ops.schedule: progressive-pruner schedules against brute-force layer sums."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.ops.schedule import (achieved_counts, check_schedule, evenly_spaced, fit_fractions, one_shot_area,
                                  scale_layers, schedule_area, stage_counts)


def brute_area(layers, fractions, depth):
    """Sum over every layer of the fraction of tokens it sees."""
    total = 0.0
    for i in range(depth):
        seen = [f for layer, f in zip(layers, fractions) if layer <= i]
        total += seen[-1] if seen else 1.0
    return total


def test_scale_layers():
    assert scale_layers([3, 16, 22], 28, 28) == [3, 16, 22]
    assert scale_layers([3, 16, 22], 28, 56) == [6, 32, 44]
    assert scale_layers([3, 16, 22], 28, 4) == [1, 2, 3]
    assert scale_layers([3, 7, 16], 32, 3) == [1, 2]      # the third stage does not fit
    assert scale_layers([3, 7, 16], 32, 1) == []
    assert scale_layers([1, 2, 3], 28, 28) == [1, 2, 3]


def test_evenly_spaced():
    assert evenly_spaced(2, 28, 4) == [2, 10, 19, 27]
    assert evenly_spaced(2, 4, 4) == [2, 3]
    assert evenly_spaced(2, 12, 1) == [11]
    assert evenly_spaced(20, 12, 3) == [11]


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 40), st.data())
def test_area_and_fit_against_brute_force(depth, data):
    m = data.draw(st.integers(1, min(5, depth - 1)))
    layers = sorted(data.draw(st.sets(st.integers(1, depth - 1), min_size=m, max_size=m)))
    paper = sorted((data.draw(st.floats(0, 1)) for _ in range(m)), reverse=True)
    anchors = [[0.0] * m, paper, [1.0] * m]
    assert schedule_area(layers, paper, depth) == pytest.approx(brute_area(layers, paper, depth))
    target = data.draw(st.floats(layers[0], depth))
    got = fit_fractions(layers, depth, anchors, target)
    assert brute_area(layers, got, depth) == pytest.approx(target, abs=1e-9)
    assert all(0.0 <= f <= 1.0 for f in got) and got == sorted(got, reverse=True)
    # an anchor is reproduced exactly at its own area
    assert fit_fractions(layers, depth, anchors, schedule_area(layers, paper, depth)) == pytest.approx(paper)


def test_fit_clamps_outside_the_anchor_range():
    assert fit_fractions([2, 5], 8, [[0.2, 0.1], [1.0, 1.0]], 0.0) == [0.2, 0.1]
    assert fit_fractions([2, 5], 8, [[0.2, 0.1], [1.0, 0.5]], 100.0) == [1.0, 0.5]
    assert fit_fractions([], 8, [], 3.0) == []


def test_stage_counts_and_achieved():
    assert stage_counts(100, [0.255, 0.0125, 0.0], minimum=1) == [26, 1, 1]
    assert stage_counts(100, [0.5, 0.6], minimum=0) == [50, 50]        # never increases
    assert stage_counts(0, [0.5], minimum=1) == [0]
    assert achieved_counts(10, [2, 5], [6, 3], 7) == [10, 10, 6, 6, 6, 3, 3]
    assert one_shot_area(5, 10, 8) == 2 + 6 * 0.5
    assert brute_area([2], [0.5], 8) == one_shot_area(5, 10, 8)


def test_check_schedule():
    assert check_schedule([[3, 0.5], [5, 0.5], [9, 0]]) == [(3, 0.5), (5, 0.5), (9, 0.0)]
    for bad, msg in (([], "empty"), ([[0, 0.5]], ">= 1"), ([[2, 1.5]], r"\[0, 1\]"),
                     ([[3, 0.5], [2, 0.1]], "increasing"), ([[2, 0.1], [3, 0.5]], "cannot increase"),
                     ([[2, 0.1, 3]], "pairs")):
        with pytest.raises(ValueError, match=msg):
            check_schedule(bad)
