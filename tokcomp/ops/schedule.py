"""Layer schedules of progressive LLM pruners (V²Drop, SparseVLM, LUVC-SPU): pure arithmetic, no tensors.

Convention. A schedule is a list of stages ``(layer l_i, fraction c_i)``, layers strictly increasing in
``[1, L-1]``: decoder layers ``l_i .. l_{i+1}-1`` run on ``c_i * N`` visual tokens (``l_{m+1} = L``), i.e. the
pruner prunes *before* layer ``l_i`` using the outputs of layer ``l_i - 1``; layers ``0 .. l_1-1`` see all N.
Fractions are cumulative (of the original count N) and non-increasing.

Budget matching (DESIGN.md §3). The *area* of a schedule is its visual token-layers in units of N:
``A = l_1 + sum_i (l_{i+1} - l_i) * c_i``; the layer-averaged visual-token count is ``A * N / L``. A one-shot
pruner (FastV, DART) at layer K keeping ``k`` of ``N`` has area ``K + (L-K) * k / N``. :func:`fit_fractions`
finds the fractions whose area equals a target area by moving along a chain of *anchor* schedules (the paper's
own schedules, plus "nothing kept" and "everything kept"): area is linear in the fractions, so linear
interpolation between the two anchors that bracket the target hits it exactly, and a paper schedule is
reproduced exactly when the target equals its area.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["scale_layers", "schedule_area", "one_shot_area", "fit_fractions", "stage_counts", "achieved_counts",
           "check_schedule", "evenly_spaced"]


def scale_layers(layers: Sequence[int], paper_depth: int, depth: int) -> list[int]:
    """Scale a paper's stage layers to an LLM of ``depth`` layers.

    ``l' = floor(l * depth / paper_depth + 0.5)`` clamped to ``[1, depth - 1]``; a stage that collides with the
    previous one moves one layer later, and stages pushed past ``depth - 1`` are dropped (only on LLMs shallower
    than the number of stages). At ``depth == paper_depth`` the layers are unchanged.
    """
    if depth < 2:
        return []
    out: list[int] = []
    for layer in layers:
        v = min(max(math.floor(layer * depth / paper_depth + 0.5), 1), depth - 1)
        if out and v <= out[-1]:
            v = out[-1] + 1
        if v > depth - 1:
            break
        out.append(v)
    return out


def schedule_area(layers: Sequence[int], fractions: Sequence[float], depth: int) -> float:
    """Area (visual token-layers / N) of stages ``(layers[i], fractions[i])`` on ``depth`` layers."""
    if not layers:
        return float(depth)
    bounds = list(layers[1:]) + [depth]
    return float(layers[0]) + sum((b - a) * c for a, b, c in zip(layers, bounds, fractions))


def one_shot_area(keep: int, n: int, depth: int, layer: int = 2) -> float:
    """Area (/ N) of a one-shot pruner keeping ``keep`` of ``n`` before ``layer`` (clamped to ``[0, depth-1]``)."""
    if n <= 0:
        return float(depth)
    k_layer = min(max(int(layer), 0), max(depth - 1, 0))
    return k_layer + (depth - k_layer) * keep / n


def fit_fractions(layers: Sequence[int], depth: int, anchors: Sequence[Sequence[float]],
                  target: float) -> list[float]:
    """Cumulative keep fractions with ``schedule_area == target``, interpolated along ``anchors``.

    Args:
        layers: stage layers (strictly increasing, in ``[1, depth-1]``).
        depth: L.
        anchors: fraction vectors (one value per stage, each non-increasing, in ``[0, 1]``); they are ordered by
            area (stable), and the target is reached by linear interpolation between the two bracketing anchors.
            Include the extremes you allow (e.g. all zeros and all ones).
        target: desired area (/ N).
    Returns:
        one fraction per stage. A target below the smallest anchor area returns that anchor, above the largest
        returns the largest (the caller documents what is unreachable). Convex combinations of non-increasing
        vectors are non-increasing, so the result is a valid schedule.
    """
    m = len(layers)
    if m == 0:
        return []
    if not anchors or any(len(a) != m for a in anchors):
        raise ValueError(f"every anchor needs {m} fractions")
    areas = [schedule_area(layers, a, depth) for a in anchors]
    order = sorted(range(len(anchors)), key=lambda i: areas[i])
    chain = [(areas[i], [float(v) for v in anchors[i]]) for i in order]
    if target <= chain[0][0]:
        return list(chain[0][1])
    for (a0, v0), (a1, v1) in zip(chain, chain[1:]):
        if target <= a1:
            t = 0.0 if a1 <= a0 else (target - a0) / (a1 - a0)
            return [x0 + t * (x1 - x0) for x0, x1 in zip(v0, v1)]
    return list(chain[-1][1])


def stage_counts(n: int, fractions: Sequence[float], minimum: int = 0) -> list[int]:
    """Visual tokens after each stage for a row with ``n`` visual tokens.

    ``n_i = floor(c_i * n + 0.5)``, clamped to ``[min(minimum, n_{i-1}), n_{i-1}]`` (``n_0 = n``): never more
    than the previous stage, never fewer than ``minimum`` unless the previous stage already had fewer.
    """
    out, prev = [], int(n)
    for c in fractions:
        k = math.floor(float(c) * n + 0.5)
        k = max(min(int(minimum), prev), min(k, prev))
        out.append(k)
        prev = k
    return out


def achieved_counts(n: int, layers: Sequence[int], counts: Sequence[int], depth: int) -> list[int]:
    """Visual tokens entering each of the ``depth`` layers under stages ``(layers[i], counts[i])``."""
    out, cur, stage = [], int(n), 0
    for i in range(depth):
        while stage < len(layers) and layers[stage] == i:
            cur = int(counts[stage])
            stage += 1
        out.append(cur)
    return out


def evenly_spaced(start: int, depth: int, stages: int) -> list[int]:
    """``stages`` layers evenly spaced from ``start`` to the last layer ``depth - 1`` (both included when
    ``stages >= 2``; one stage sits at ``depth - 1``), rounded half up, duplicates removed."""
    last = depth - 1
    start = min(max(int(start), 1), last)
    if stages <= 1 or start == last:
        return [last] if last >= 1 else []
    out: list[int] = []
    for i in range(stages):
        v = math.floor(start + (last - start) * i / (stages - 1) + 0.5)
        if not out or v > out[-1]:
            out.append(v)
    return out


def check_schedule(schedule: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """Validate an explicit schedule ``[(layer, fraction), ...]``; return it as tuples.

    Layers: integers >= 1, strictly increasing (prune before that layer). Fractions: cumulative keep fractions
    of the original visual count, in ``[0, 1]``, non-increasing. Raises ValueError naming the problem."""
    out: list[tuple[int, float]] = []
    if len(schedule) == 0:
        raise ValueError("schedule is empty; give at least one [layer, fraction] pair or leave it unset")
    for item in schedule:
        if len(item) != 2:
            raise ValueError(f"schedule entries are [layer, fraction] pairs, got {list(item)!r}")
        layer, frac = item
        if int(layer) != layer or int(layer) < 1:
            raise ValueError(f"schedule layer {layer!r} must be an integer >= 1 (tokens are pruned before it)")
        if not 0.0 <= float(frac) <= 1.0:
            raise ValueError(f"schedule fraction {frac!r} at layer {layer} must lie in [0, 1]")
        if out and int(layer) <= out[-1][0]:
            raise ValueError(f"schedule layers must be strictly increasing, got {out[-1][0]} then {int(layer)}")
        if out and float(frac) > out[-1][1]:
            raise ValueError(f"schedule fractions are cumulative (of the original count) and cannot increase: "
                             f"{out[-1][1]} at layer {out[-1][0]}, then {float(frac)} at layer {int(layer)}")
        out.append((int(layer), float(frac)))
    return out
