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


# ------------------------------------------------------------------------------------------------------
# ToMe as the official code runs it (facebookresearch/ToMe, tome/merge.py + tome/patch/timm.py)
# ------------------------------------------------------------------------------------------------------
def tome_items(tokens: VisionTokens) -> list[list[int]]:
    """The rows of ``tokens`` as ToMe's items, in row order: a prefix (CLS) row alone, a unit's rows together
    (ordered by origin). The reference below keeps its rows in ToMe's sequence order, so this is the sequence."""
    items, seen = [], {}
    for row in range(tokens.n):
        if bool(tokens.cls[row]):
            items.append([row])
            continue
        u = int(tokens.unit[row])
        if u not in seen:
            seen[u] = len(items)
            items.append([])
        items[seen[u]].append(row)
    return [sorted(it, key=lambda r: int(tokens.origin[r])) for it in items]


def tome_initial_sequence(tokens: VisionTokens) -> VisionTokens:
    """ToMe's input sequence of every segment: its prefix rows, then its units in unit-id order (each unit's rows
    contiguous), segments in order. For a plain ViT this is the original ``[CLS, p0, p1, ...]``."""
    rows = []
    for s in sorted(set(tokens.segment.tolist())):
        pre = [r for r in range(tokens.n) if int(tokens.segment[r]) == s and bool(tokens.cls[r])]
        units = sorted({int(tokens.unit[r]) for r in range(tokens.n) if int(tokens.segment[r]) == s
                        and not bool(tokens.cls[r])})
        body = [r for u in units for r in sorted((r for r in range(tokens.n) if int(tokens.unit[r]) == u
                                                  and not bool(tokens.cls[r])), key=lambda r: int(tokens.origin[r]))]
        rows += pre + body
    return tokens.select(torch.tensor(rows, dtype=torch.long))


def official_tome_step(tokens: VisionTokens, keys: torch.Tensor, r_seg: list[int]
                       ) -> tuple[VisionTokens, list[tuple[int, int]]]:
    """One ToMe merge per segment, written from the official ``bipartite_soft_matching`` (rows must be in ToMe's
    sequence order, see :func:`tome_initial_sequence`).

    Per segment with t items (a CLS row or a whole unit; the metric of a unit is its rows' mean key) and its first
    item a prefix row (``class_token``) or not: ``r = min(r, (t - protected) // 2)``, nothing happens if r <= 0;
    A = items 0, 2, 4, ..., B = items 1, 3, 5, ...; cosine scores A x B, the CLS row of A and the distillation
    column of B (a second prefix item) set to -inf; each A's best B (first maximum); A ordered by best score
    descending (a stable sort); the first r merge into their best B; the rest stay, sorted by A position when
    there is a CLS. The merge is the size-weighted mean (``merge_wavg``) and the new sequence is
    ``[unmerged A, all B]`` (with a distillation token: ``[CLS, distill, other unmerged A, other B]``).
    Returns the new token set (rows in the new sequence) and the (src unit, dst unit) pairs.
    """
    items_all = tome_items(tokens)
    pairs, new_rows = [], []
    for s in sorted(set(tokens.segment.tolist())):
        items = [it for it in items_all if int(tokens.segment[it[0]]) == s]
        t = len(items)
        cls_tok = bool(tokens.cls[items[0][0]])
        distill = t > 1 and bool(tokens.cls[items[1][0]])
        protected = int(cls_tok) + int(distill)
        r = min(r_seg[s], (t - protected) // 2)
        if r <= 0:
            new_rows += [row for it in items for row in it]
            continue
        metric = [keys[it].double().mean(0).tolist() for it in items]
        a_items, b_items = list(range(0, t, 2)), list(range(1, t, 2))
        node_max, node_idx = [], []
        for ai, a in enumerate(a_items):
            sc = [(_cos(metric[a], metric[b]) if not (cls_tok and ai == 0) and not (distill and bi == 0)
                   else -math.inf) for bi, b in enumerate(b_items)]
            top = max(sc)
            node_max.append(top)
            node_idx.append(sc.index(top))
        edge = sorted(range(len(a_items)), key=lambda ai: -node_max[ai])
        src, unm = edge[:r], edge[r:]
        if cls_tok:
            unm = sorted(unm)
        for ai in src:
            pairs.append((int(tokens.unit[items[a_items[ai]][0]]), int(tokens.unit[items[b_items[node_idx[ai]]][0]])))
        seq = [a_items[ai] for ai in unm] + b_items
        if distill:
            seq = [a_items[unm[0]], b_items[0]] + [a_items[ai] for ai in unm[1:]] + b_items[1:]
        new_rows += [row for k in seq for row in items[k]]
    order = {int(tokens.origin[row]): pos for pos, row in enumerate(new_rows)}
    merged = naive_apply_pairs(tokens, pairs)
    rank = torch.tensor([order[int(o)] for o in merged.origin.tolist()])
    return merged.select(torch.argsort(rank)), pairs


def official_tome_tower(tower, full, r_table, start, prop_attn=True, rule_of=lambda i: "wavg"):
    """The ToMe tower as the official code runs it: rows in ToMe's sequence order, attention (size bias once
    merged), :func:`official_tome_step` between attention and MLP, then the MLP. Rows of the result are in ToMe's
    final order (sort by origin to compare)."""
    t, merged = tome_initial_sequence(full), False
    for i in range(tower.depth):
        out, k = tower.attention(i, t, t, prop_attn and merged)
        t = t.with_hidden(t.hidden + out)
        if i >= start and int(r_table[i - start].sum()):
            before = t
            t, pairs = official_tome_step(t, k.mean(1), r_table[i - start].tolist())
            if pairs and rule_of(i) != "wavg":
                t = _reorder_like(naive_apply_pairs(before, pairs, rule_of(i)), t)
            merged = merged or bool(pairs)
        t = t.with_hidden(t.hidden + tower.mlp(i, t.hidden))
    return t


def _reorder_like(x: VisionTokens, like: VisionTokens) -> VisionTokens:
    """Rows of ``x`` in the row order of ``like`` (same origins)."""
    pos = {int(o): p for p, o in enumerate(x.origin.tolist())}
    return x.select(torch.tensor([pos[int(o)] for o in like.origin.tolist()], dtype=torch.long))
