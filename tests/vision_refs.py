"""Brute-force references (Python loops, float64) for the unit-granularity vision compressors' decisions."""
from __future__ import annotations

import math

import torch

from tokcomp.tokens import VisionTokens


def units_of(tokens: VisionTokens) -> dict[int, list[int]]:
    """unit id -> its rows ordered by origin (TL, TR, BL, BR), CLS left out."""
    out: dict[int, list[int]] = {}
    for row in range(tokens.n):
        if not bool(tokens.cls[row]):
            out.setdefault(int(tokens.unit[row]), []).append(row)
    return {u: sorted(rows, key=lambda r: int(tokens.origin[r])) for u, rows in sorted(out.items())}


def _cos(a, b):
    na = math.sqrt(sum(x * x for x in a)) or 1e-12
    nb = math.sqrt(sum(x * x for x in b)) or 1e-12
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def naive_unit_matching(tokens: VisionTokens, keys: torch.Tensor, r_seg: list[int]) -> list[tuple[int, int]]:
    """ToMe bipartite soft matching on units, per segment: returns (src unit id, dst unit id) pairs."""
    units = units_of(tokens)
    by_seg: dict[int, list[int]] = {}
    for u, rows in units.items():
        by_seg.setdefault(int(tokens.segment[rows[0]]), []).append(u)
    pairs = []
    for s, us in by_seg.items():
        metric = {u: keys[units[u]].double().mean(0).tolist() for u in us}
        a_set, b_set = us[0::2], us[1::2]
        r = min(r_seg[s], len(us) // 2, len(a_set) if b_set else 0)
        if r == 0:
            continue
        best = {}
        for pos, a in enumerate(a_set):
            sims = [(_cos(metric[a], metric[b]), b) for b in b_set]
            top = max(v for v, _ in sims)
            best[a] = (top, min(b for v, b in sims if v == top), pos)
        chosen = sorted(a_set, key=lambda a: (-best[a][0], best[a][2]))[:r]
        pairs += [(a, best[a][1]) for a in chosen]
    return pairs


def naive_apply_pairs(tokens: VisionTokens, pairs: list[tuple[int, int]], rule: str = "wavg") -> VisionTokens:
    """Merge src units into dst units patch-wise with ``rule`` ("wavg": size-weighted mean; "mlerp": mean direction
    with the largest member norm; "prune": dst unchanged) and sizes summed; src rows dropped, order kept."""
    units = units_of(tokens)
    x = tokens.hidden.clone()
    size = tokens.size.clone()
    groups: dict[int, list[int]] = {}
    for src, dst in pairs:
        groups.setdefault(dst, []).append(src)
    for dst, srcs in groups.items():
        for j in range(len(units[dst])):
            members = [units[dst][j]] + [units[s][j] for s in srcs]
            w = torch.stack([tokens.size[m].double() for m in members])
            v = torch.stack([tokens.hidden[m].double() for m in members])
            mean = (w[:, None] * v).sum(0) / w.sum()
            if rule == "wavg":
                new = mean
            elif rule == "mlerp":
                new = mean / mean.norm() * max(float(m.norm()) for m in v)
            elif rule == "prune":
                new = tokens.hidden[units[dst][j]].double()
            else:
                raise ValueError(rule)
            x[units[dst][j]] = new.to(x.dtype)
            size[units[dst][j]] = float(w.sum())
    dropped = {r for src, _ in pairs for r in units[src]}
    keep = torch.tensor([r for r in range(tokens.n) if r not in dropped], dtype=torch.long)
    return tokens.with_hidden(x, size=size).select(keep)


def naive_dart(feat: torch.Tensor, n_keep: int, pivots: int) -> list[int]:
    """DART on one segment's unit features [U, D] (no text pivots): greedy Python loop; returns kept local indices."""
    f = feat.double().tolist()
    l1 = [sum(abs(v) for v in row) for row in f]
    order = sorted(range(len(f)), key=lambda i: (-l1[i], i))
    n_keep = min(n_keep, len(f))
    if n_keep <= pivots or pivots == 0:
        return sorted(order[:n_keep])
    piv = order[:pivots]
    extra = n_keep - pivots
    quota = [extra // pivots + (1 if p < extra % pivots else 0) for p in range(pivots)]
    pool = [i for i in range(len(f)) if i not in piv]
    kept = list(piv)
    for p, q in zip(piv, quota):
        ranked = sorted(pool, key=lambda i: (_cos(f[p], f[i]), i))
        take = ranked[:q]
        kept += take
        pool = [i for i in pool if i not in take]
    return sorted(kept)


def naive_tower(tower, full, r_table, start, prop_attn, rule_of=lambda i: "wavg"):
    """The ToMe tower written out: attention (size bias once merged), naive unit matching/merging, MLP."""
    t, merged = full, False
    for i in range(tower.depth):
        out, k = tower.attention(i, t, t, prop_attn and merged)
        t = t.with_hidden(t.hidden + out)
        if i >= start:
            r = r_table[i - start].tolist()
            pairs = naive_unit_matching(t, k.mean(1), r) if sum(r) else []
            if pairs:
                t, merged = naive_apply_pairs(t, pairs, rule_of(i)), True
        t = t.with_hidden(t.hidden + tower.mlp(i, t.hidden))
    return t
