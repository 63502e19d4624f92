"""Bipartite soft matching and merge rules (ToMe, ToFu), on packed token sets.

Relation to ToMe's ``tome/merge.py`` (``bipartite_soft_matching``):

- Same sets, scores and picks: within a segment, positions 0, 2, 4, ... are set A and 1, 3, 5, ...
  set B (protected tokens keep their position, as ToMe's CLS at index 0), the ``r`` A tokens
  with the highest best-cosine merge into their best B.
- The token rows are not moved: ``Match.keep`` is ascending. ToMe's merge returns the survivors
  reordered (``[unmerged A, all B]``, CLS first), and that order decides the next block's A/B
  split. ``Match.order`` gives each survivor's position in ToMe's returned sequence, so a caller
  that wants ToMe's next split sorts by it (``plugins/tome.py`` does, by default).
- Deterministic ties: each A token's best B is the lowest-indexed B among equal
  similarities; among equal best-similarities the lower-indexed A token is merged first (and
  comes first among the unmerged). ToMe's ``argsort`` is not stable, so on exact ties (flat
  images) its choice is unspecified.
- Packed input: several segments (images/frames) in one call, matched independently.
- A protected token (e.g. CLS) is never a source and never a destination: it is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .select import stable_order, topk_per_segment

__all__ = [
    "Match",
    "bipartite_dense",
    "bipartite_soft_matching",
    "matching_per_segment",
    "merge_weighted",
    "merge_mlerp",
    "prune_matched",
    "r_schedule",
]


@dataclass(frozen=True, eq=False)
class Match:
    """Result of a matching over N tokens.

    src: LongTensor[r] removed tokens, ascending.
    dst: LongTensor[r] destination of each ``src`` (a surviving token).
    keep: LongTensor[N - r] surviving tokens in ascending original order.
    order: optional LongTensor[N - r] aligned with ``keep``: each survivor's position within its
        segment in the sequence ToMe's merge returns (see :func:`matching_per_segment`).
    """

    src: Tensor
    dst: Tensor
    keep: Tensor
    order: Tensor | None = None

    @property
    def r(self) -> int:
        return int(self.src.shape[0])


def matching_per_segment(
    metric: Tensor,
    segment: Tensor,
    r_per_segment: Tensor | int,
    protected: Tensor | None = None,
    *,
    chunk: int = 4096,
) -> Match:
    """ToMe bipartite soft matching, independently within each segment.

    Within segment s (its tokens taken in ascending index order, need not be contiguous),
    positions 0, 2, 4, ... form set A and 1, 3, 5, ... set B. Every unprotected A token finds
    its most cosine-similar unprotected B token of the same segment; the ``r_s`` A tokens with
    the highest best-similarity are merged into their match.

    Args:
        metric: [N, C] matching features (e.g. head-averaged keys); cosine in float32.
        segment: LongTensor[N] segment ids in ``[0, S)``.
        r_per_segment: LongTensor[S] (or an int for every segment); clamped per segment to
            ``min(r_s, (n_s - n_protected_s) // 2, #A tokens that can be matched)``.
        protected: optional BoolTensor[N]; protected tokens are neither merged away nor
            merged into.
        chunk: A tokens compared at once; memory O(chunk * |B_s|). Loops over segments.
    Returns:
        :class:`Match` with global token indices. ``order`` is the survivors' sequence as ToMe's
        ``merge`` returns it, per segment: protected tokens first (input order; ToMe: CLS, then
        the distillation token), then the unmerged A tokens (in input order if the segment has a
        protected token, as ToMe sorts them when ``class_token``; otherwise by best similarity,
        descending, ties by input order, as ToMe's ``edge_idx``), then every B token in input
        order. A segment with nothing to merge keeps its input order (ToMe's ``do_nothing``).
    """
    n = metric.shape[0]
    device = metric.device
    segment = segment.to(device=device, dtype=torch.long)
    if n == 0:
        e = torch.empty(0, dtype=torch.long, device=device)
        return Match(e, e, e, e)
    if isinstance(r_per_segment, int):
        r_per_segment = torch.full((int(segment.max()) + 1,), r_per_segment, dtype=torch.long, device=device)
    r_seg = r_per_segment.to(device=device, dtype=torch.long)
    n_seg = r_seg.shape[0]
    if protected is None:
        protected = torch.zeros(n, dtype=torch.bool, device=device)
    protected = protected.to(device=device, dtype=torch.bool)

    # position of every token within its segment -> A/B set and slot
    order = torch.sort(segment, stable=True).indices
    counts = torch.bincount(segment, minlength=n_seg)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device) - starts[segment[order]]
    slot, is_b = rank // 2, (rank % 2) == 1

    b_ok = is_b & ~protected
    n_b_ok = torch.bincount(segment[b_ok], minlength=n_seg)
    a_ok = ~is_b & ~protected & (n_b_ok[segment] > 0)
    n_prot = torch.bincount(segment[protected], minlength=n_seg)
    r_eff = torch.minimum(r_seg.clamp_min(0), (counts - n_prot) // 2)
    r_eff = torch.minimum(r_eff, torch.bincount(segment[a_ok], minlength=n_seg))

    m = F.normalize(metric.float(), dim=-1)
    a_idx = a_ok.nonzero().squeeze(1)  # ascending
    b_idx = b_ok.nonzero().squeeze(1)
    if a_idx.numel() == 0 or int(r_eff.sum()) == 0:
        e = torch.empty(0, dtype=torch.long, device=device)
        return Match(e, e, torch.arange(n, device=device), rank)
    # B tokens of each segment in slot order: [S, maxB], -1 = absent (padding or protected)
    max_b = int(slot[b_idx].max()) + 1
    b_tok = torch.full((n_seg, max_b), -1, dtype=torch.long, device=device)
    b_tok[segment[b_idx], slot[b_idx]] = b_idx
    best = torch.empty(a_idx.shape[0], dtype=torch.float32, device=device)
    dst_all = torch.empty(a_idx.shape[0], dtype=torch.long, device=device)
    seg_a = segment[a_idx]
    for sid in torch.unique(seg_a).tolist():
        rows = (seg_a == sid).nonzero().squeeze(1)
        cols = b_tok[sid]
        absent = cols < 0
        any_absent = bool(absent.any())
        mb = m[cols.clamp_min(0)]  # [maxB, C]
        for c0 in range(0, rows.shape[0], max(1, chunk)):
            rr = rows[c0 : c0 + chunk]
            sim = m[a_idx[rr]] @ mb.T  # [ch, maxB]
            if any_absent:
                sim.masked_fill_(absent[None, :], float("-inf"))
            val, j = sim.max(dim=1)  # first maximum = lowest B slot = lowest B index
            best[rr] = val
            dst_all[rr] = cols[j]

    pick = topk_per_segment(best, segment[a_idx], r_eff)  # ascending positions in a_idx
    src, dst = a_idx[pick], dst_all[pick]
    removed = torch.zeros(n, dtype=torch.bool, device=device)
    removed[src] = True
    keep = (~removed).nonzero().squeeze(1)
    active = r_eff > 0
    order = _merged_order(keep, segment, is_b, protected, a_idx, best, active, n_seg)
    return Match(src, dst, keep, order)


def bipartite_dense(items: Tensor, r: int, n_protected: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`matching_per_segment` for S segments of equal length, each already in sequence order: ToMe's own
    dense computation (a few batched ops instead of per-token bookkeeping), with the same sets, picks, tie rules
    and returned sequence.

    Args:
        items: [S, n, C] matching features, each segment's items in sequence order, its ``n_protected`` protected
            items (CLS, registers) first; cosine in float32.
        r: items to remove per segment, ``0 < r <= (n - n_protected) // 2`` (the caller clamps; every segment
            removes exactly ``r``).
        n_protected: P, protected items at positions ``0..P-1`` of every segment (never merged, never a
            destination).
    Returns:
        ``(src [S, r], dst [S, r], seq [S, n - r])``: positions (within the segment) of the removed items and of
        their destinations, in pick order (best similarity first); ``seq`` the positions of the surviving items in
        the order ToMe's merge returns them: the protected items, then the unmerged A items (in input order if
        ``P > 0``, as ToMe sorts them with a class token; else by best similarity, ties by input order), then
        every B item in input order.
    """
    S, n, _ = items.shape
    P = n_protected
    dev = items.device
    m = F.normalize(items.float(), dim=-1)
    pa, pb = (P + 1) // 2, P // 2                                         # protected A rows / B columns
    # the same products as matching_per_segment (unprotected A rows against every B slot, one matmul per
    # segment), so exact ties (flat images) break the same way in both
    a, b = m[:, 2 * pa::2].contiguous(), m[:, 1::2].contiguous()
    scores = torch.stack([a[s] @ b[s].T for s in range(S)])             # [S, nA - pa, nB]
    if pb:
        scores[:, :, :pb] = float("-inf")
    best, dst_b = scores.max(dim=-1)                                      # first maximum: lowest B position
    best = torch.nan_to_num(best, nan=torch.finfo(torch.float32).min)    # NaN ranks last
    edge = torch.sort(best, dim=1, descending=True, stable=True).indices  # ties: lower A position first
    src_a = edge[:, :r]
    src, dst = 2 * (src_a + pa), 2 * dst_b.gather(1, src_a) + 1
    unm = edge[:, r:] if P == 0 else torch.sort(edge[:, r:], dim=1).values
    head = torch.arange(P, device=dev).expand(S, P)
    tail = (2 * torch.arange(pb, b.shape[1], device=dev) + 1).expand(S, -1)
    return src, dst, torch.cat([head, 2 * (unm + pa), tail], 1)


def _merged_order(keep: Tensor, segment: Tensor, is_b: Tensor, protected: Tensor, a_idx: Tensor,
                  best: Tensor, active: Tensor, n_seg: int) -> Tensor:
    """Position of each survivor ``keep`` [K] within its segment in ToMe's returned sequence.

    segment/is_b/protected: [N]; a_idx [A] matchable A tokens with their ``best`` [A] similarity;
    active: BoolTensor[S] segments that merge anything. Returns LongTensor[K]."""
    n = segment.shape[0]
    device = segment.device
    idx = torch.arange(n, device=device)
    group = torch.where(protected, 0, torch.where(is_b, 2, 1))
    within = idx.clone()
    has_prot = torch.bincount(segment[protected], minlength=n_seg) > 0
    by_score = torch.empty(a_idx.shape[0], dtype=torch.long, device=device)
    by_score[stable_order(best)] = torch.arange(a_idx.shape[0], device=device)
    free = ~has_prot[segment[a_idx]]
    within[a_idx[free]] = by_score[free]
    on = active[segment]
    group = torch.where(on, group, 0)
    within = torch.where(on, within, idx)
    seg_k = segment[keep]
    key = (seg_k * 3 + group[keep]) * n + within[keep]
    pos = torch.empty(keep.shape[0], dtype=torch.long, device=device)
    pos[torch.sort(key).indices] = torch.arange(keep.shape[0], device=device)
    counts = torch.bincount(seg_k, minlength=n_seg)
    return pos - (torch.cumsum(counts, 0) - counts)[seg_k]


def bipartite_soft_matching(metric: Tensor, r: int, *, protected: Tensor | None = None) -> Match:
    """ToMe bipartite soft matching for ONE segment.

    Args:
        metric: [N, C]; even indices form set A, odd indices set B; cosine in float32.
        r: tokens to remove; clamped to ``min(r, (N - n_protected) // 2)`` and to the number
            of unprotected A tokens (when at least one unprotected B exists).
        protected: optional BoolTensor[N]; protected tokens (CLS) are never merged away and
            never merged into.
    Returns:
        :class:`Match`; see :func:`matching_per_segment` for the tie rules.
    """
    seg = torch.zeros(metric.shape[0], dtype=torch.long, device=metric.device)
    return matching_per_segment(metric, seg, torch.tensor([int(r)], device=metric.device), protected)


def _dst_sums(x: Tensor, size: Tensor, match: Match) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float32 size-weighted sums over each destination and its sources, computed on those rows only.

    Returns ``(dsts LongTensor[D] the distinct destination rows ascending, num [D, C] = s_d x_d + sum s_src x_src,
    den [D] = s_d + sum s_src, den_all [N] every row's summed size)``; the sums run in the same order as an
    ``index_add`` over the whole set (destination first, then sources in ``match.src`` order)."""
    sf = size.float()
    dsts, slot = torch.unique(match.dst, return_inverse=True)
    num = (x[dsts].float() * sf[dsts, None]).index_add_(0, slot, x[match.src].float() * sf[match.src, None])
    den_all = sf.index_add(0, match.dst, sf[match.src])
    return dsts, num, den_all[dsts], den_all


def _place(x: Tensor, match: Match, dsts: Tensor, rows: Tensor) -> Tensor:
    """``x[match.keep]`` with the destination rows ``dsts`` replaced by ``rows`` (float32, cast to x.dtype)."""
    out = x[match.keep]
    out[torch.searchsorted(match.keep, dsts)] = rows.to(x.dtype)
    return out


def merge_weighted(x: Tensor, size: Tensor, match: Match) -> tuple[Tensor, Tensor]:
    """ToMe's ``merge_wavg``: each dst becomes the size-weighted mean of itself and its srcs.

    Args:
        x: [N, C] features; size: [N] positive token sizes (1 for a fresh patch; keep them
            in float32, bf16 cannot count past 256 exactly).
    Returns:
        ([N - r, C] in x.dtype, [N - r] in size.dtype), rows in ``match.keep`` order.
        Tokens that receive nothing are returned bit-identical. Accumulation in float32, on the merged rows only
        (one gather of the survivors; no full-width float32 copy of the set).
    """
    if match.r == 0:
        return x[match.keep], size[match.keep]
    dsts, num, den, den_all = _dst_sums(x, size, match)
    return _place(x, match, dsts, num / den[:, None]), den_all[match.keep].to(size.dtype)


def merge_mlerp(x: Tensor, size: Tensor, match: Match) -> tuple[Tensor, Tensor]:
    """ToFu's MLERP merge: norm-preserving multi-token interpolation.

    For every dst with its srcs G: ``x_dst = xbar / ||xbar|| * max_{i in G} ||x_i||`` where
    ``xbar = sum_i s_i x_i / sum_i s_i``; if ``xbar == 0`` the (zero) mean is returned.
    Sizes are summed.

    Args/returns as :func:`merge_weighted` ([N - r, C], [N - r] in ``match.keep`` order).
    """
    if match.r == 0:
        return x[match.keep], size[match.keep]
    dsts, num, den, den_all = _dst_sums(x, size, match)
    mean = num / den[:, None]
    slot = torch.searchsorted(dsts, match.dst)
    max_norm = x[dsts].float().norm(dim=1).scatter_reduce(0, slot, x[match.src].float().norm(dim=1), reduce="amax",
                                                          include_self=True)
    mean_norm = mean.norm(dim=1)
    scale = torch.where(mean_norm > 0, max_norm / mean_norm.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    return _place(x, match, dsts, mean * scale[:, None]), den_all[match.keep].to(size.dtype)


def prune_matched(x: Tensor, size: Tensor, match: Match) -> tuple[Tensor, Tensor]:
    """ToFu prune mode: drop every src, keep dst features unchanged.

    Sizes: ``size[dst] += size[src]`` (our choice; ToFu's is unpublished), so the surviving
    token still accounts for the area it now represents under proportional attention, and
    the total size is conserved exactly as in the merge modes.

    Returns ([N - r, C] in x.dtype, [N - r] in size.dtype) in ``match.keep`` order.
    """
    sf = size.float()
    den = sf.index_add(0, match.dst, sf[match.src])
    return x[match.keep], den[match.keep].to(size.dtype)


def r_schedule(
    n_tokens: int,
    keep: int,
    n_layers: int,
    kind: str | Sequence[int] = "constant",
) -> list[int]:
    """Per-layer merge counts ``r_l`` taking ``n_tokens`` down to ``keep`` over ``n_layers``.

    Each layer obeys ToMe's cap ``r_l <= current_l // 2`` (and never goes below ``keep``).
    The final count equals ``keep`` whenever that is feasible, i.e. whenever
    ``keep >= ceil^L(n_tokens / 2)`` (halving every layer); otherwise the schedule halves
    every layer, the closest reachable count. ``n_tokens`` and ``keep`` count mergeable
    tokens (leave protected ones out).

    Shapes of the profile (weights ``w_l``; the remaining reduction D is spread over the
    remaining layers as ``ceil(D * w_l / sum_{j>=l} w_j)``, exact integer arithmetic, then
    clamped to the feasible interval ``[current - keep * 2^(L-l-1), min(current//2, current-keep)]``):

    - ``"constant"``: ``w_l = 1`` (equal r, remainder on the first layers).
    - ``"decreasing"``: ``w_l = L - 1 - l``, ToMe's ``inflect=-1`` linear ramp (2r ... 0)
      rescaled to reach the target.
    - a list of ``L`` non-negative ints: relative weights; a list that already sums to
      ``n_tokens - keep`` and respects the caps is returned unchanged.
    """
    if n_tokens < 0 or keep < 0 or n_layers < 0:
        raise ValueError("n_tokens, keep and n_layers must be >= 0")
    if isinstance(kind, str):
        if kind == "constant":
            w = [1] * n_layers
        elif kind == "decreasing":
            w = [n_layers - 1 - i for i in range(n_layers)]
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; use 'constant', 'decreasing' or a list")
    else:
        w = [int(v) for v in kind]
        if len(w) != n_layers or any(v < 0 for v in w):
            raise ValueError(f"a list schedule needs {n_layers} non-negative weights, got {list(kind)}")
    out, cur = [], n_tokens
    for i in range(n_layers):
        rem_layers = n_layers - i
        deficit = max(cur - keep, 0)
        w_rest = sum(w[i:])
        want = -(-deficit * w[i] // w_rest) if w_rest > 0 else deficit
        lo = max(0, cur - keep * (1 << (rem_layers - 1)))
        hi = min(cur // 2, deficit)
        r = min(max(want, lo), hi)
        out.append(r)
        cur -= r
    return out
