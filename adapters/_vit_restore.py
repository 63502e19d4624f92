"""Plain-ViT token sets and full-grid restoration (pure tensor functions, no model code).

A plain ViT encoder (DINOv2, ViT, CLIP, SigLIP) runs every image as one row of a batch ``[B, P + h*w, C]``:
``P`` prefix tokens (CLS, DINOv2 register tokens; SigLIP has none) then the ``h x w`` patch grid in raster order.
There is no 2x2 merger, so each patch is its own *unit* (``unit_size = 1``) and each image is one segment.

A token-reducing strategy leaves fewer tokens than the grid has. The encoder's output keeps its usual shape, so the
adapter restores the full grid from the reduced set with one of two documented rules (:func:`restore_full_grid`):

* ``"sources"`` (default): a patch that was **merged** into another token (ToMe, ToFu, LUVC-OIM, ``pool``) gets a
  copy of the token that absorbed it (its *source* token, tracked by :func:`update_sources` through every step);
  a patch that was **pruned** (``random``, DART-ViT, ...) gets a copy of the nearest present token on the patch grid
  of its image (squared grid distance, ties to the lower original index).
* ``"nearest"``: every missing patch gets the nearest present token on the grid, merged or not.

Patch-granularity strategies (IPCV) restore the grid themselves (Neighbor-Guided Reconstruction) in ``finish``.

Merge sources are read from the strategy's own arithmetic: the adapter runs each strategy step with the incoming
hidden states as an autograd leaf (inference only, nothing is kept) and pulls one random probe back through the step
(:func:`gradient_destinations`): a vanished token whose state flows into a surviving token was merged into it; a
vanished token with no path to any output was pruned. This is exact for every merge rule that is a function of the
merged tokens (weighted mean, MLERP, pooling). When no gradient path exists (a strategy that computes under
``torch.no_grad``, a user forward with autograd on, inference mode) or a survivor's ``size`` grew more than the
traced merges explain (ToFu's prune mode: the destination keeps its features but absorbs the source's size), the
remaining vanished tokens are assigned by size and feature (:func:`update_sources`), which is an inference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokcomp.ops.knn import knn, unique_rows
from tokcomp.tokens import VisionLayout, VisionTokens

RULES = ("sources", "nearest")
_TOL = 1e-3  # sizes are patch counts stored as float32


def grid_layout(n_images: int, h: int, w: int, n_prefix: int) -> VisionLayout:
    """The layout of ``n_images`` images of ``h x w`` patches, each preceded by ``n_prefix`` prefix tokens.

    Returns a VisionLayout with ``n_tokens = B * (P + h*w)``, ``unit_size = 1`` (every patch is a unit),
    segments = images (``segment_grid[b] = (1, h, w)``), ``unit_patches[B*h*w, 1]`` the flat index of each patch
    (prefix offset included), ``unit_grid[U, 3] = (0, r, c)``, ``has_cls = P > 0``. Unit ``b*h*w + r*w + c``.
    """
    B, hw, n1 = int(n_images), int(h) * int(w), int(n_prefix) + int(h) * int(w)
    p = torch.arange(hw)
    flat = (torch.arange(B)[:, None] * n1 + n_prefix + p[None]).reshape(-1, 1)
    cell = torch.stack([torch.zeros_like(p), p // w, p % w], -1)
    return VisionLayout(
        n_tokens=B * n1, unit_size=1,
        segment_grid=torch.tensor([[1, h, w]], dtype=torch.long).repeat(B, 1),
        segment_image=torch.arange(B), unit_patches=flat, unit_segment=torch.arange(B).repeat_interleave(hw),
        unit_grid=cell.repeat(B, 1), has_cls=n_prefix > 0)


def grid_tokens(hidden: Tensor, h: int, w: int, n_prefix: int) -> VisionTokens:
    """The full token set of a block input ``hidden[B, P + h*w, C]`` (rows image-major, prefix first).

    Metadata on ``hidden``'s device: ``segment`` = image, ``pos = (0, r, c)`` (prefix: -1), ``unit`` as in
    :func:`grid_layout` (prefix: -1), ``size = 1``, ``origin = arange(N)``, ``cls`` = prefix flag, ``rope = None``.
    """
    B, n1, C = hidden.shape
    dev, hw = hidden.device, h * w
    p = torch.arange(hw, device=dev)
    pre = torch.full((n_prefix,), -1, dtype=torch.long, device=dev)
    local_unit = torch.cat([pre, p])                                              # [n1]
    imgs = torch.arange(B, device=dev)
    unit = torch.where(local_unit[None] >= 0, imgs[:, None] * hw + local_unit[None], -1).reshape(-1)
    pos1 = torch.cat([torch.full((n_prefix, 3), -1, dtype=torch.long, device=dev),
                      torch.stack([torch.zeros_like(p), p // w, p % w], -1)])      # [n1, 3]
    cls1 = torch.zeros(n1, dtype=torch.bool, device=dev)
    cls1[:n_prefix] = True
    return VisionTokens(
        hidden=hidden.reshape(B * n1, C), segment=imgs.repeat_interleave(n1), pos=pos1.repeat(B, 1), unit=unit,
        size=torch.ones(B * n1, dtype=torch.float32, device=dev), origin=torch.arange(B * n1, device=dev),
        cls=cls1.repeat(B), rope=None)


# ------------------------------------------------------------------------------------------------------
# source tracking
# ------------------------------------------------------------------------------------------------------
def initial_sources(n_tokens: int, device=None) -> Tensor:
    """LongTensor[N] ``arange(N)``: every original token is represented by itself."""
    return torch.arange(n_tokens, device=device)


def gradient_destinations(leaf: Tensor, out: Tensor, rows: Tensor, seg_leaf: Tensor, seg_out: Tensor,
                          seed: int = 0) -> Tensor:
    """Which output row each input row ``rows`` flows into, from one vector-Jacobian product.

    Args:
        leaf: Tensor[n_in, C] the step's input hidden states (an autograd leaf).
        out: Tensor[n_out, C] the step's output hidden states, computed from ``leaf`` with autograd on.
        rows: LongTensor[V] the input rows to resolve (the vanished ones).
        seg_leaf: LongTensor[n_in], seg_out: LongTensor[n_out] segments (a token only merges within its own).
        seed: seed of the random probe.
    Returns:
        LongTensor[V]: for every row, the output row ``o`` maximising ``cos(d out_o . R_o / d leaf_row, R_o)`` for a
        random probe ``R [n_out, C]`` (for a weighted-mean merge the pulled-back vector is exactly ``w * R_o``),
        or -1 if the row reaches no output (pruned) or ``out`` has no gradient path to ``leaf``.
    """
    res = torch.full((rows.numel(),), -1, dtype=torch.long, device=rows.device)
    if rows.numel() == 0 or out.grad_fn is None:
        return res
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    (g,) = torch.autograd.grad(out, leaf, probe, allow_unused=True, retain_graph=False)
    if g is None:
        return res
    g = g[rows.to(g.device)].float()
    norm = g.norm(dim=1)
    live = norm > 0
    if not bool(live.any()):
        return res
    p = torch.nn.functional.normalize(probe.float(), dim=1)
    cos = (g[live] / norm[live, None]) @ p.T                                            # [v, n_out]
    same = seg_leaf.to(cos.device)[rows.to(cos.device)][live][:, None] == seg_out.to(cos.device)[None, :]
    cos = cos.masked_fill(~same, float("-inf"))
    best = cos.argmax(1)
    ok = torch.isfinite(cos.gather(1, best[:, None])[:, 0])
    idx = live.nonzero()[:, 0].to(res.device)
    res[idx[ok.to(res.device)]] = best[ok].to(res.device)
    return res


def update_sources(sources: Tensor, before: VisionTokens, after: VisionTokens, dest: Tensor | None = None) -> Tensor:
    """Carry the source map through one strategy step ``before -> after``.

    Args:
        sources: LongTensor[N] for every original token, the ``origin`` of the token that represents it now
            (itself while present, its merge destination once merged), or -1 once pruned.
        before, after: the token sets handed to and returned by one strategy callback (any order).
        dest: optional LongTensor[before.n]: the row of ``after`` each row of ``before`` was traced into
            (:func:`gradient_destinations`; -1: not traced). Used for the vanished rows.
    Returns:
        The updated LongTensor[N]. Tokens of ``before`` missing from ``after`` *vanished*. A traced vanished token
        goes to its traced destination. Then, a token of ``after`` present in ``before`` whose size grew by more
        than its traced sources explain has capacity left; untraced vanished tokens of its segment are assigned
        greedily (smallest distance first) to the destination whose *added mean*
        ``(size_after * h_after - size_before * h_before - traced) / capacity`` is nearest (L2) to their ``before``
        state, while capacity lasts (destinations with identical added means are filled in row order; see
        :func:`_assign`). Vanished tokens left over were pruned (-1). Tokens of ``after`` absent from
        ``before`` (restored by the strategy) represent themselves again.
    """
    dev = sources.device
    n = sources.shape[0]
    b_org, a_org = before.origin.to(dev), after.origin.to(dev)
    in_after = torch.zeros(n, dtype=torch.bool, device=dev)
    in_after[a_org] = True
    in_before = torch.zeros(n, dtype=torch.bool, device=dev)
    in_before[b_org] = True
    vanished = (~in_after[b_org]).nonzero()[:, 0]                      # rows of before
    fresh = a_org[~in_before[a_org]]
    out = sources.clone()
    if fresh.numel():
        out[fresh] = fresh
    if vanished.numel() == 0:
        return out
    target = torch.full((n,), -1, dtype=torch.long, device=dev)        # origin -> new representative origin
    traced = torch.full((vanished.numel(),), -1, dtype=torch.long, device=dev)
    if dest is not None:
        traced = dest.to(dev)[vanished]
        traced = torch.where(traced >= 0, traced, -1)
        # a traced destination must be a survivor (present before and after)
        ok = traced >= 0
        idx = ok.nonzero()[:, 0]
        ok[idx] = in_before[a_org[traced[idx]]]
        traced = torch.where(ok, traced, -1)
        target[b_org[vanished[ok]]] = a_org[traced[ok]]
    row_b = torch.full((n,), -1, dtype=torch.long, device=dev)
    row_b[b_org] = torch.arange(b_org.numel(), device=dev)
    surv = in_before[a_org].nonzero()[:, 0]                            # rows of after that existed before
    rb = row_b[a_org[surv]]
    size_b, size_a = before.size.to(dev).float(), after.size.to(dev).float()
    hb, ha = before.hidden.detach().float(), after.hidden.detach().float()
    gain = size_a[surv] - size_b[rb]
    # sizes and content already explained by traced merges
    t_ok = traced >= 0
    explained = torch.zeros(after.n, dtype=torch.float32, device=dev).index_add_(
        0, traced[t_ok], size_b[vanished[t_ok]])
    t_sum = torch.zeros(after.n, hb.shape[-1], dtype=torch.float32, device=hb.device).index_add_(
        0, traced[t_ok].to(hb.device), hb[vanished[t_ok].to(hb.device)] * size_b[vanished[t_ok]].to(hb.device)[:, None])
    cap = gain - explained[surv]
    left = (~t_ok).nonzero()[:, 0]
    has_cap = cap > _TOL
    if left.numel() and bool(has_cap.any()):
        dst = surv[has_cap]                                            # rows of after
        rbd = rb[has_cap].to(hb.device)
        c = cap[has_cap]
        added = (ha[dst.to(ha.device)] * size_a[dst].to(ha.device)[:, None] - hb[rbd] * size_b[rbd.to(dev)].to(hb.device)[:, None]
                 - t_sum[dst.to(hb.device)]) / c.to(hb.device)[:, None]
        vl = vanished[left]
        assign = _assign(hb[vl.to(hb.device)], size_b[vl], before.segment.to(dev)[vl], added, c,
                         after.segment.to(dev)[dst])
        good = assign >= 0
        target[b_org[vl[good]]] = a_org[dst[assign[good]]]
    ident = torch.arange(n, device=dev)
    mapping = torch.where(in_before & ~in_after, target, ident)        # vanished -> dest origin or -1
    present = out >= 0
    out[present] = mapping[out[present]]
    return out


def _assign(h_v: Tensor, s_v: Tensor, seg_v: Tensor, added: Tensor, cap: Tensor, seg_d: Tensor,
            n_candidates: int = 16, block: int = 256) -> Tensor:
    """Greedy capacity-limited assignment of vanished tokens to destinations (see :func:`update_sources`).

    h_v [V, C], s_v [V], seg_v [V]; added [D, C], cap [D], seg_d [D] -> LongTensor[V] destination row or -1.

    Destinations of a segment with identical added means form one *class* (flat images make large ones), its rows
    in index order. Vanished tokens are taken in order of their distance to the nearest destination of their
    segment (ties: lower position); each goes to the first row with capacity for its size in the nearest class of
    its segment that has one (L2 in float64; classes at equal distance by their first row), which then loses that
    much capacity.

    Implementation (the result is exactly that sequential greedy's): one kNN finds every token's
    ``n_candidates`` nearest classes and a Python pass walks these lists. A token whose candidates are all full
    (tokens of a flat region all want the same classes) takes the nearest class with room from its full distance
    row instead; the rows are computed ``block`` tokens at a time (one float64 matmul) in processing order.
    """
    V, D = h_v.shape[0], added.shape[0]
    dev = seg_v.device
    if V == 0 or D == 0:
        return torch.full((V,), -1, dtype=torch.long, device=dev)
    hv, ad = h_v.float(), added.to(h_v.device).float()
    sv, sd = seg_v.to(h_v.device), seg_d.to(h_v.device)
    first, cls_of = unique_rows(torch.cat([ad, sd[:, None].to(ad.dtype)], 1))     # classes, by first row
    rep, rep_seg = ad[first], sd[first]
    n_cls = first.numel()
    members: list[list[int]] = [[] for _ in range(n_cls)]
    for row, c in enumerate(cls_of.tolist()):
        members[c].append(row)                                                     # ascending rows
    caps, sizes = cap.float().tolist(), s_v.float().tolist()
    least = min(sizes) - _TOL                     # a destination with less room than this fits no token any more
    ptr = [0] * n_cls                             # members before ptr[c] are full for good
    # an upper bound of each class's largest room (exact after a failed fit), for the full-row search
    bound = torch.full((n_cls,), float("-inf"), dtype=torch.float64)
    bound.scatter_reduce_(0, cls_of.cpu(), cap.double().cpu(), reduce="amax")

    def fit_class(c: int, need: float) -> int:
        m = members[c]
        while ptr[c] < len(m) and caps[m[ptr[c]]] < least:
            ptr[c] += 1
        for r in m[ptr[c]:]:
            if caps[r] >= need:
                return r
        bound[c] = max((caps[r] for r in m[ptr[c]:]), default=0.0)
        return -1

    kc = max(1, min(int(n_candidates), n_cls))
    nn = knn(hv, rep, kc, query_group=sv, key_group=rep_seg)                      # [V, kc] classes, -1 padded
    n_in_seg = torch.bincount(rep_seg, minlength=int(max(int(sv.max()), int(sd.max()))) + 1)
    complete = (n_in_seg[sv] <= kc).tolist()          # the list holds every class of the token's segment
    near = nn[:, 0]
    dmin = ((hv.double() - rep.double()[near.clamp_min(0)]) ** 2).sum(1).masked_fill(near < 0, float("inf"))
    order = torch.sort(dmin, stable=True).indices.tolist()
    rep64, rep_sq = rep.double(), (rep.double() ** 2).sum(1)
    rows: dict[int, Tensor] = {}                                                   # full distance rows, by token

    def full_row(pos: int) -> Tensor:
        j = order[pos]
        if j not in rows:
            ids = torch.tensor([jj for jj in order[pos:pos + block] if jj not in rows], device=hv.device)
            q = hv[ids].double()
            d = torch.addmm(rep_sq[None, :] + (q * q).sum(1, keepdim=True), q, rep64.T, alpha=-2.0)
            d = d.masked_fill(sv[ids][:, None] != rep_seg[None, :], float("inf")).cpu()
            for r, jj in enumerate(ids.tolist()):
                rows[jj] = d[r]
        return rows.pop(j)

    out = [-1] * V
    for pos, j in enumerate(order):
        if int(near[j]) < 0:
            continue                                                               # no destination in its segment
        need = sizes[j] - _TOL
        pick = -1
        for c in nn[j].tolist():
            if c < 0:
                break
            pick = fit_class(c, need)
            if pick >= 0:
                break
        if pick < 0 and not complete[j]:                                           # nearest class with room
            d = full_row(pos)
            while pick < 0:
                c = int(torch.argmin(d.masked_fill(bound < need, float("inf"))))
                if not bool(bound[c] >= need) or d[c] == float("inf"):
                    break
                pick = fit_class(c, need)
        rows.pop(j, None)
        if pick >= 0:
            out[j] = pick
            caps[pick] -= sizes[j]
    return torch.tensor(out, dtype=torch.long, device=dev)


# ------------------------------------------------------------------------------------------------------
# restoration
# ------------------------------------------------------------------------------------------------------
def nearest_present(tokens: VisionTokens, layout: VisionLayout, missing: Tensor, radius: int = 3) -> Tensor:
    """For grid patches ``missing`` (LongTensor[M] unit ids), the row of ``tokens`` of the nearest present non-prefix
    token of the same image (squared (t, h, w) grid distance; ties to the lower original index); -1 if the image
    kept no patch.

    The present cells within ``radius`` (per axis) of each missing patch are looked up on a dense grid map (a
    nearest one there at distance < radius + 1 is the nearest overall), so the cost is linear in the grid; patches
    with nothing that close (heavy pruning) fall back to a kNN over the present tokens of their image."""
    body = (~tokens.cls).nonzero()[:, 0]
    body = body[torch.argsort(tokens.origin[body], stable=True)]
    dev = tokens.pos.device
    missing = missing.to(dev)
    out = torch.full((missing.numel(),), -1, dtype=torch.long, device=dev)
    if missing.numel() == 0 or body.numel() == 0:
        return out
    q, qs = layout.unit_grid.to(dev)[missing], layout.unit_segment.to(dev)[missing]
    kp, ks = tokens.pos[body], tokens.segment[body]
    lo = torch.minimum(q.min(0).values, kp.min(0).values)
    size = torch.maximum(q.max(0).values, kp.max(0).values) - lo + 1                 # (T, H, W)
    n_seg = int(max(int(qs.max()), int(ks.max()))) + 1

    def cell(seg: Tensor, p: Tensor) -> Tensor:
        p = p - lo
        return ((seg * size[0] + p[:, 0]) * size[1] + p[:, 1]) * size[2] + p[:, 2]
    grid = torch.full((n_seg * int(size.prod()),), body.numel(), dtype=torch.long, device=dev)
    grid.scatter_reduce_(0, cell(ks, kp), torch.arange(body.numel(), device=dev), reduce="amin")  # lowest origin
    best_d = torch.full((missing.numel(),), radius ** 2 * 3 + 1, dtype=torch.long, device=dev)
    best = torch.full((missing.numel(),), body.numel(), dtype=torch.long, device=dev)
    span = [range(-radius, radius + 1) if int(size[a]) > 1 else range(1) for a in range(3)]
    for dt in span[0]:
        for dh in span[1]:
            for dw in span[2]:
                off = torch.tensor([dt, dh, dw], device=dev)
                p = q + off
                ok = ((p >= lo) & (p < lo + size)).all(1)
                idx = torch.where(ok, grid[cell(qs, torch.where(ok[:, None], p, lo))], body.numel())
                d = dt * dt + dh * dh + dw * dw
                better = (idx < body.numel()) & ((d < best_d) | ((d == best_d) & (idx < best)))
                best_d = torch.where(better, d, best_d)
                best = torch.where(better, idx, best)
    sure = best_d < (radius + 1) ** 2                    # anything outside the window is at least radius + 1 away
    out[sure] = body[best[sure]]
    rest = (~sure).nonzero()[:, 0]
    if rest.numel():
        nn = knn(q[rest].float(), kp.float(), 1, query_group=qs[rest], key_group=ks)
        col = nn[:, 0] if nn.shape[1] else torch.full((rest.numel(),), -1, dtype=torch.long, device=dev)
        out[rest] = torch.where(col >= 0, body[col.clamp_min(0)], -1)
    return out


def restore_full_grid(tokens: VisionTokens, layout: VisionLayout, rule: str = "sources",
                      sources: Tensor | None = None) -> Tensor:
    """The full token grid ``Tensor[N, C]`` (N = ``layout.n_tokens``, rows = original order) from a reduced set.

    Args:
        tokens: the reduced token set (every prefix token present; any order).
        layout: the call's :func:`grid_layout`.
        rule: ``"sources"`` (merged patches copy their merge destination, pruned ones the nearest present token)
            or ``"nearest"`` (every missing patch copies the nearest present token); see the module docstring.
        sources: LongTensor[N] from :func:`update_sources` (needed for ``"sources"``; None: treated as all pruned).
    Returns:
        Tensor[N, C] in ``tokens.hidden.dtype``; present tokens keep their own state, a missing patch of an image
        with no present patch is zeros.
    """
    if rule not in RULES:
        raise ValueError(f"unknown restoration rule {rule!r}; use one of {RULES}")
    N, C = layout.n_tokens, tokens.hidden.shape[-1]
    dev = tokens.hidden.device
    full = tokens.hidden.new_zeros(N, C)
    origin = tokens.origin.to(dev)
    full[origin] = tokens.hidden
    row_of = torch.full((N,), -1, dtype=torch.long, device=dev)
    row_of[origin] = torch.arange(tokens.n, device=dev)
    patch = layout.unit_patches[:, 0].to(dev)
    missing = (row_of[patch] < 0).nonzero()[:, 0]                   # unit ids
    if missing.numel() == 0:
        return full
    src_row = torch.full((missing.numel(),), -1, dtype=torch.long, device=dev)
    if rule == "sources" and sources is not None:
        s = sources.to(dev)[patch[missing]]
        src_row = torch.where(s >= 0, row_of[s.clamp_min(0)], -1)
    need = (src_row < 0).nonzero()[:, 0]
    if need.numel():
        src_row[need] = nearest_present(tokens, layout, missing[need]).to(dev)
    ok = src_row >= 0
    full[patch[missing[ok]]] = tokens.hidden[src_row[ok]]
    return full


def patch_owner(tokens: VisionTokens, layout: VisionLayout, rule: str = "sources",
                sources: Tensor | None = None) -> Tensor:
    """LongTensor[U] for every grid patch, the original index (``origin``) of the token whose state it gets under
    :func:`restore_full_grid` (itself if present; -1 if nothing). Used to draw which patches were kept/merged."""
    dev = tokens.origin.device
    idx = tokens.with_hidden((tokens.origin + 1).to(torch.float64)[:, None])   # 0 marks "nothing"
    full = restore_full_grid(idx, layout, rule, sources)
    return full[layout.unit_patches[:, 0].to(dev), 0].round().long() - 1
