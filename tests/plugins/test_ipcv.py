"""IPCV on synthetic tensors: the strategy driven by the fake tower against a brute-force, full-index-space
re-implementation of the reference algorithm (per-token loops for top-K, kNN and NGR Eq. 3-5)."""
from __future__ import annotations

import math

import pytest
import torch

from vision_fakes import FakeTower, assert_full_grid, make_tokens
from tokcomp.errors import ConfigError
from tokcomp.plugins.ipcv import IPCV, keep_mask, ngr
from tokcomp.tokens import VisionContext

GRIDS = [(4, 4), (4, 6), (2, 2), (6, 4)]


# ------------------------------------------------------------------------------------------------------
# brute-force reference
# ------------------------------------------------------------------------------------------------------
def _keep_count(n, ratio):
    return max(min(1, n), min(math.floor(n * ratio + 0.5), n))   # round half up, clamped to [1, n]


def reference_ipcv(tower, full, p, a, ratio, k, stabilize=True, reintegrate=True):
    """IPCV in the original index space: a boolean 'alive' set, per-token Python loops, full-N attention in AS
    blocks (all N queries, then only the kept rows are used), exactly the reference pseudo-code of
    reference/algorithms.md §2.1 with per-segment top-K and per-segment kNN."""
    n = full.n
    h = full.hidden.clone()
    kept, removed, nbrs, h0 = None, [], {}, None
    for i in range(tower.depth):
        if i == p - 1:
            h_prev = h.clone()
        if kept is None:
            h = tower.block(i, full.with_hidden(h)).hidden
        elif stabilize and p <= i < p + a:
            rec = h.clone()
            for r in removed:
                drift = torch.stack([h[j] - h0[j] for j in nbrs[r]]).mean(0)
                rec[r] = h0[r] + drift
            everything = full.with_hidden(rec)
            out, _ = tower.attention(i, everything, everything)
            x = rec + out
            idx = torch.tensor(kept)
            h[idx] = x[idx] + tower.mlp(i, x[idx])
        else:
            idx = torch.tensor(kept)
            h[idx] = tower.block(i, full.select(idx).with_hidden(h[idx])).hidden
        if i == p - 1:
            score = (h - h_prev).norm(dim=-1)
            kept = []
            for s in range(int(full.segment.max()) + 1):
                members = [j for j in range(n) if int(full.segment[j]) == s and not bool(full.cls[j])]
                ranked = sorted(members, key=lambda j: (-float(score[j]), j))
                kept += ranked[: _keep_count(len(members), ratio)]
            kept += [j for j in range(n) if bool(full.cls[j])]
            kept = sorted(kept)
            removed = [j for j in range(n) if j not in kept]
            h0 = h.clone()
            nbrs = {}
            for r in removed:
                cand = [j for j in kept if int(full.segment[j]) == int(full.segment[r]) and not bool(full.cls[j])]
                cand.sort(key=lambda j: (float(((h0[r] - h0[j]) ** 2).sum()), j))
                nbrs[r] = cand[:k]
    for r in removed:
        if reintegrate:
            h[r] = h0[r] + torch.stack([h[j] - h0[j] for j in nbrs[r]]).mean(0)
        else:
            h[r] = h[nbrs[r][0]]
    return h, kept


# ------------------------------------------------------------------------------------------------------
# the strategy against the reference
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("stabilize,reintegrate", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("p,a", [(1, 2), (3, 7), (5, 1)])
def test_matches_reference(order, stabilize, reintegrate, p, a):
    layout, full = make_tokens(GRIDS, order)
    tower = FakeTower(depth=6)
    s = IPCV(keep_ratio=0.35, prune_layer=p, stabilize_layers=a, neighbors=3, stabilize=stabilize,
             reintegrate=reintegrate)
    out, ctx, calls = tower.run(s, full, layout, family="qwen2_vl")
    ref, kept = reference_ipcv(tower, full, p, a, 0.35, 3, stabilize, reintegrate)
    assert_full_grid(out, full)
    torch.testing.assert_close(out.hidden, ref, rtol=1e-5, atol=1e-5)  # NGR accumulates in float32
    assert ctx.counts[p - 1] == len(kept) and ctx.counts[tower.depth - 1] == len(kept)
    as_blocks = [c[1] for c in calls if c[0] == "variant" and c[2]]
    assert as_blocks == (list(range(p, min(p + a, tower.depth))) if stabilize else [])
    assert all(c[2] in ((), ("extra_kv",)) for c in calls if c[0] == "variant")


def test_plain_pruning_with_nearest_kept_restoration():
    """stabilize=False, reintegrate=False is exactly: run every block on the kept tokens only after P-1, then copy
    each pruned token's nearest kept token (pruning-time L2, same segment) from the final states."""
    layout, full = make_tokens(GRIDS, "qwen", seed=3)
    tower = FakeTower(depth=5, seed=4)
    p = 2
    out, _, _ = tower.run(IPCV(keep_ratio=0.5, prune_layer=p, stabilize=False, reintegrate=False), full, layout)
    # plain pruning
    t = full
    for i in range(p):
        t = tower.block(i, t)
    h_prev_in = full
    for i in range(p - 1):
        h_prev_in = tower.block(i, h_prev_in)
    score = (t.hidden - h_prev_in.hidden).norm(dim=-1)
    keep = torch.zeros(full.n, dtype=torch.bool)
    for s in range(len(GRIDS)):
        m = (full.segment == s).nonzero()[:, 0]
        keep[m[torch.sort(score[m], descending=True, stable=True).indices[: _keep_count(len(m), 0.5)]]] = True
    h0 = t.hidden.clone()
    k_tok = t.select(keep)
    for i in range(p, tower.depth):
        k_tok = tower.block(i, k_tok)
    final = t.hidden.clone()
    final[keep] = k_tok.hidden
    kept_idx = keep.nonzero()[:, 0]
    for r in (~keep).nonzero()[:, 0].tolist():
        same = kept_idx[full.segment[kept_idx] == full.segment[r]]
        d = ((h0[same] - h0[r]) ** 2).sum(-1)
        final[r] = final[same[torch.argmin(d)]]
    torch.testing.assert_close(out.hidden, final, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", ["qwen", "internvl"])
def test_full_grid_complete_and_ordered_with_both_on(order):
    layout, full = make_tokens(GRIDS, order, seed=5)
    out, ctx, _ = FakeTower(depth=6).run(IPCV(keep_ratio=0.25, prune_layer=2, stabilize_layers=3), full, layout)
    assert_full_grid(out, full)
    assert ctx.counts[0] == full.n and ctx.counts[1] < full.n


# ------------------------------------------------------------------------------------------------------
# budget, segments, no-op
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(keep_ratio=1.0), dict(num_tokens=10_000)])
@pytest.mark.parametrize("order", ["qwen", "internvl"])
def test_keep_all_is_exact_noop(kw, order):
    layout, full = make_tokens(GRIDS, order)
    tower = FakeTower(depth=5)
    plain, _, _ = tower.run(None, full, layout)
    out, ctx, calls = tower.run(IPCV(prune_layer=2, **kw), full, layout)
    assert torch.equal(out.hidden, plain.hidden) and torch.equal(out.origin, full.origin)
    assert all(c[2] == () for c in calls if c[0] == "variant")
    assert "ipcv" not in ctx.state


def test_keep_counts_per_frame_across_segment_boundaries():
    """Video frames are separate segments: each keeps its own top-K, the first patch of every frame belongs to that
    frame (no searchsorted(right=False) bug), and a frame whose scores are all low still keeps >= 1."""
    grids = [(4, 4)] * 3 + [(2, 2)]
    layout, full = make_tokens(grids, "qwen", images=[0, 0, 0, 1])
    n_per = [16, 16, 16, 4]
    score = torch.rand(full.n, generator=torch.Generator().manual_seed(0)) + 10.0
    score[32:48] = -5.0                  # frame 2: all low; a global top-K would empty it
    score[16] = 100.0                    # first patch of frame 1: best score overall
    k = torch.tensor([_keep_count(n, 0.3) for n in n_per])
    keep = keep_mask(score, full.segment, full.cls, k)
    counts = torch.bincount(full.segment[keep], minlength=4)
    assert counts.tolist() == k.tolist() == [5, 5, 5, 1]
    assert bool(keep[16]) and int(full.segment[16]) == 1
    # the strategy uses the same counts, and num_tokens counts patches per segment
    tower = FakeTower(depth=4)
    for kw, want in ((dict(keep_ratio=0.3), sum(k.tolist())), (dict(num_tokens=6), 6 + 6 + 6 + 4)):
        _, ctx, _ = tower.run(IPCV(prune_layer=1, **kw), full, layout)
        assert ctx.counts[0] == want


def test_internvl_cls_always_kept_and_never_a_neighbour():
    layout, full = make_tokens([(4, 4), (4, 4), (2, 2)], "internvl")
    s = IPCV(keep_ratio=0.1, prune_layer=1, neighbors=4)
    tower = FakeTower(depth=3)
    ctx = VisionContext(layout, tower.depth, "internvl")
    t = s.start(full, ctx)
    s.block_variant(0, t, ctx)
    kept = s.after_block(0, tower.block(0, t), ctx)
    st = ctx.state["ipcv"]
    assert int(kept.cls.sum()) == 3 and not bool(st.removed.cls.any())
    assert torch.bincount(kept.segment[~kept.cls]).tolist() == [2, 2, 1]   # round(16*0.1)=2, max(1, 0)=1
    assert not bool(kept.cls[st.nb].any())
    valid = st.nn >= 0
    nb_seg = kept.segment[st.nb[st.nn.clamp_min(0)]]
    assert bool((nb_seg == st.removed.segment[:, None])[valid].all()), "neighbours never cross segments"
    assert bool(valid[:, 0].all())


def test_batch_row_invariance():
    """An image's output does not depend on the other images of the call (per-segment top-K and kNN)."""
    tower = FakeTower(depth=5)
    layout, full = make_tokens([(4, 6), (4, 4)], "qwen", seed=7)
    alone_layout, alone = make_tokens([(4, 6)], "qwen", seed=7)
    assert torch.equal(alone.hidden, full.hidden[: alone.n])
    s = IPCV(keep_ratio=0.3, prune_layer=2, stabilize_layers=2, neighbors=4)
    both, _, _ = tower.run(s, full, layout)
    one, _, _ = tower.run(s, alone, alone_layout)
    torch.testing.assert_close(both.hidden[: alone.n], one.hidden, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------
# kernels, config
# ------------------------------------------------------------------------------------------------------
def test_ngr_against_per_token_loop():
    g = torch.Generator().manual_seed(0)
    h0_rem, h0_nb = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g)
    h_now = h0_nb + torch.randn(9, 5, generator=g)
    nn = torch.randint(0, 9, (7, 3), generator=g)
    nn[2, 1:] = -1                                    # a row with one valid neighbour
    got = ngr(h0_rem, h_now, h0_nb, nn)
    for r in range(7):
        js = [j for j in nn[r].tolist() if j >= 0]
        want = h0_rem[r] + sum(h_now[j] - h0_nb[j] for j in js) / len(js)     # Eq. 3-5
        torch.testing.assert_close(got[r], want, rtol=1e-6, atol=1e-6)


def test_family_defaults_and_range():
    layout, full = make_tokens([(4, 4)], "qwen")
    s = IPCV()
    assert s.config.keep_ratio == 0.35 and s.config.neighbors == 10
    assert s.resolve(VisionContext(layout, 32, "qwen2_vl")) == (3, 7)
    assert s.resolve(VisionContext(layout, 24, "internvl")) == (7, 3)
    assert s.resolve(VisionContext(layout, 32, "somethingelse")) == (3, 7)
    assert IPCV(prune_layer=2, stabilize_layers=0).resolve(VisionContext(layout, 24, "internvl")) == (2, 0)
    with pytest.raises(ConfigError, match="prune_layer"):
        FakeTower(depth=4).run(s, full, layout, family="internvl")    # 7 does not fit 4 blocks
    with pytest.raises(ConfigError):
        IPCV(prune_layer=0)
    with pytest.raises(ConfigError, match="prune_layer"):
        IPCV(prune_layer=4).validate({"vision": 4, "llm": 4})
    IPCV(prune_layer=3).validate({"vision": 4, "llm": 4})


def test_registered():
    import tokcomp
    s = tokcomp.get("ipcv", keep_ratio=0.5)
    assert isinstance(s, IPCV) and s.granularity == "patch" and s.stage == "vision"
    assert s.spec == "ipcv(keep_ratio=0.5)"
