"""DART duplication-aware token selection (Wen et al. 2025), deterministic variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .select import stable_order

__all__ = ["dart_select", "dart_quotas"]


def dart_quotas(n_keep: int, n_image_pivots: int, n_pivots: int) -> list[int]:
    """Per-pivot pick quotas: the ``n_keep - n_image_pivots`` non-pivot slots over ``n_pivots``.

    Every pivot gets ``TOKEN_TOPK = (n_keep - P_i) // (P_i + P_t)``; the remainder goes one
    each to the first pivots in pivot order (highest key L1 norm first). Returns a list of
    ``n_pivots`` ints summing to ``max(n_keep - n_image_pivots, 0)``.
    """
    extra = max(n_keep - n_image_pivots, 0)
    if n_pivots == 0:
        return []
    base, rest = divmod(extra, n_pivots)
    return [base + (1 if i < rest else 0) for i in range(n_pivots)]


def dart_select(
    keys_l1: Tensor,
    hidden: Tensor,
    candidates: Tensor,
    text: Tensor,
    n_keep: int,
    pivots_image: int = 4,
    pivots_text: int = 4,
) -> Tensor:
    """DART: keep pivots plus, per pivot, the tokens LEAST similar to it (non-duplicates).

    Args:
        keys_l1: [L] L1 norm of each token's key at layer K-1 (any float dtype).
        hidden: [L, C] hidden states used for cosine similarity (float32 internally).
        candidates: LongTensor[Nv] prunable visual token indices into L (unique).
        text: LongTensor[Nt] text token indices usable as reference pivots (may be empty).
        n_keep: visual tokens to keep; clamped to ``[0, Nv]``.
        pivots_image / pivots_text: P_i / P_t, clamped to ``Nv`` / ``Nt``.
    Returns:
        LongTensor[n_keep] sorted ascending, a subset of ``candidates``.

    Algorithm (reference: DART ``modeling_qwen2_vl_self.py``), made deterministic:
      1. image pivots = top-P_i candidates by ``keys_l1``; text pivots = top-P_t text tokens
         (ties by lower token index). If ``n_keep <= P_i``: return the top-``n_keep`` image
         pivots (also when ``P_i + P_t == 0``).
      2. pivot order: all pivots by ``keys_l1`` descending, ties by lower token index (the
         reference iterates a Python ``set``, whose order is arbitrary).
      3. quotas from :func:`dart_quotas` (remainder to the first pivots in that order), so
         exactly ``n_keep`` visual tokens are kept.
      4. in pivot order, each pivot takes its quota of remaining non-pivot candidates with the
         LOWEST cosine similarity to it (ties by lower token index); picks are removed from the
         pool (greedy, disjoint).
      5. result = image pivots + all picks; text pivots were only references.
    """
    device = candidates.device
    cand = torch.sort(candidates.to(torch.long)).values
    text = text.to(device=device, dtype=torch.long)
    nv = cand.shape[0]
    n_keep = max(0, min(int(n_keep), nv))
    if n_keep == 0:
        return cand[:0]
    score = keys_l1.float().to(device)
    p_i = max(0, min(int(pivots_image), nv))
    p_t = max(0, min(int(pivots_text), text.shape[0]))
    img_rank = stable_order(score[cand])  # positions in cand, best first
    if n_keep <= p_i or p_i + p_t == 0:  # no room beyond pivots, or no pivots at all
        return torch.sort(cand[img_rank[:n_keep]]).values
    img_piv = cand[img_rank[:p_i]]
    txt_piv = text[stable_order(score[text])[:p_t]] if p_t > 0 else text[:0]

    pivots = torch.cat([img_piv, txt_piv])
    # score desc, then lower token index: order by index first, then a stable sort by score
    pivots = torch.sort(pivots).values
    pivots = pivots[stable_order(score[pivots])]
    quotas = dart_quotas(n_keep, p_i, pivots.shape[0])

    in_pool = torch.ones(nv, dtype=torch.bool, device=device)
    in_pool[img_rank[:p_i]] = False
    h_piv = F.normalize(hidden[pivots].float(), dim=-1).to(device)
    h_cand = F.normalize(hidden[cand].float(), dim=-1).to(device)
    sim = h_piv @ h_cand.T  # [P, Nv] cosine, float32
    picks = [img_piv]
    for p, q in enumerate(quotas):
        if q == 0:
            continue
        s = sim[p].masked_fill(~in_pool, float("inf"))
        order = stable_order(s, descending=False)
        take = order[in_pool[order]][:q]
        in_pool[take] = False
        picks.append(cand[take])
    return torch.sort(torch.cat(picks)).values
