"""Qwen2-VL / Qwen2.5-VL vision side: layout, block runner, variants, finish, merger - against independent truths.

Truths: transformers' own packing helpers, a hand-written block loop calling the unmodified blocks with
recomputed ``cu_seqlens`` (no hooks), and a float64 brute-force attention with explicit segment masks.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import tokcomp
from tokcomp.adapters._qwen_layout import block_segments, initial_tokens, qwen_vision_meta
from tokcomp.adapters._vision import check_finish, cu_seqlens_of, run_block_variant, sdpa_attend, segment_attention
from tokcomp.adapters.qwen2_vl import Qwen2VLAdapter
from tokcomp.adapters import _hf as hf
from tokcomp.errors import AdapterError
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import BlockVariant, VisionTokens
from tokcomp.testing import default_images, make_inputs, make_video_inputs, matrix

torch.set_num_threads(1)

MODELS = matrix.presets("qwen2_vl")


@pytest.fixture(params=MODELS)
def name(request):
    return request.param


@pytest.fixture(params=["sdpa", "eager"])
def vlm(request, name, tiny_vlm_factory):
    return tiny_vlm_factory(name, attn=request.param)


def _vision_inputs(vlm):
    """pixel_values and grid_thw of images of 12, 8, 9 (odd 3x3 unit grid) and 4 units plus a 2-frame video."""
    ims = default_images()
    inp = make_inputs(vlm, [[ims[0], ims[1]], [ims[2], ims[3]]])
    vid = make_video_inputs(vlm, frames=4, size=(56, 84))
    pv = torch.cat([inp["pixel_values"], vid["pixel_values_videos"]])
    grid = torch.cat([inp["image_grid_thw"], vid["video_grid_thw"]])
    return pv, grid


def _window(visual):
    return (visual.window_size, visual.patch_size) if hasattr(visual, "fullatt_block_indexes") else None


# ------------------------------------------------------------------------------------------------ layout
def test_layout_matches_transformers_packing(vlm):
    visual = vlm.model.model.visual
    pv, grid = _vision_inputs(vlm)
    meta = qwen_vision_meta(grid, 2, _window(visual))
    lay = meta.layout
    n = int(grid.prod(-1).sum())
    assert lay.n_tokens == n and lay.n_units == n // 4
    # raster (h, w) positions as transformers computes them, permuted to block order for Qwen2.5-VL
    raster = get_vision_position_ids(grid, 2)
    if _window(visual) is None:
        perm = torch.arange(n)
    else:
        widx, cu_win = get_vision_window_index(grid, 2, *_window(visual))
        perm = (widx[:, None] * 4 + torch.arange(4)).reshape(-1)
        tokens = initial_tokens(meta, torch.zeros(n, 1), None)
        assert torch.equal(cu_seqlens_of(block_segments(meta, tokens, True))[0], cu_win)
    assert torch.equal(meta.pos[:, 1:], raster[perm])
    tokens = initial_tokens(meta, torch.zeros(n, 1), None)
    assert torch.equal(cu_seqlens_of(block_segments(meta, tokens, False))[0], get_vision_cu_seqlens(grid))
    # unit u's patches: 4 consecutive block positions whose positions form the 2x2 group at unit_grid[u]
    for u in range(lay.n_units):
        rows = lay.unit_patches[u]
        assert torch.equal(rows, rows[0] + torch.arange(4))
        _, bh, bw = lay.unit_grid[u].tolist()
        assert meta.pos[rows, 1:].tolist() == [[2 * bh, 2 * bw], [2 * bh, 2 * bw + 1],
                                               [2 * bh + 1, 2 * bw], [2 * bh + 1, 2 * bw + 1]]
        assert bool((meta.unit[rows] == u).all()) and bool((meta.segment[rows] == lay.unit_segment[u]).all())
    assert lay.segment_grid.tolist()[-2:] == [[1, 4, 6], [1, 4, 6]]          # the video's two frames
    assert lay.segment_image.tolist() == [0, 1, 2, 3, 4, 4]
    assert meta.units_per_image() == [12, 8, 9, 4, 12]


# ------------------------------------------------------------------------------------------------ reference tower
def _recount(base_cu: torch.Tensor, keep_tok: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of the kept tokens: per-segment counts of ``keep_tok`` (block order), empty segments removed."""
    seg = torch.searchsorted(base_cu[1:].long(), torch.arange(keep_tok.numel()), right=True)
    counts = torch.bincount(seg[keep_tok], minlength=base_cu.numel() - 1)
    return torch.unique_consecutive(torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32))


def reference_tower(model, pv, grid, j: int, keep_tok: torch.Tensor, restore: bool = False) -> torch.Tensor:
    """The unmodified blocks, called by hand: all tokens through block ``j``, then only ``keep_tok`` (BoolTensor
    over block-order tokens). ``restore``: before the merger put back the dropped tokens' block-``j`` states
    (patch granularity); else the merger sees kept whole units only. Returns [U, D] in raster order, zeros at
    dropped units."""
    v = model.model.visual
    windowed = hasattr(v, "fullatt_block_indexes")
    x = v.patch_embed(pv.to(v.patch_embed.proj.weight.dtype))
    cos, sin = v.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
    cu = get_vision_cu_seqlens(grid)
    n = x.shape[0]
    widx = torch.arange(n // 4)
    cu_win = None
    if windowed:
        widx, cu_win = get_vision_window_index(grid, 2, v.window_size, v.patch_size)
        perm = (widx[:, None] * 4 + torch.arange(4)).reshape(-1)
        x, cos, sin = x[perm], cos[perm], sin[perm]
    kept_rows = keep_tok.nonzero()[:, 0]
    saved = None
    for i, blk in enumerate(v.blocks):
        base = cu if not windowed or i in v.fullatt_block_indexes else cu_win
        if i <= j:
            x = blk(x, cu_seqlens=base, max_seqlen=None, position_embeddings=(cos, sin))
            if i == j:
                saved = x
                x = x[kept_rows]
        else:
            x = blk(x, cu_seqlens=_recount(base, keep_tok), max_seqlen=None,
                    position_embeddings=(cos[kept_rows], sin[kept_rows]))
    if restore:
        full = saved.clone()
        full[kept_rows] = x
        merged = v.merger(full)
        return merged[torch.argsort(widx)]
    merged = v.merger(x)
    kept_units = keep_tok.view(-1, 4)[:, 0]
    out = merged.new_zeros(n // 4, merged.shape[-1])
    out[widx[kept_units]] = merged
    return out


class _DropUnits(ViTCompressor):
    """Test strategy: after block ``at`` keep the units whose raster id satisfies ``keep_unit`` (unit granularity)."""

    name = "drop_units_test"
    granularity = "unit"

    def __init__(self, at: int, keep_unit, **kw):
        super().__init__(keep_ratio=0.5, **kw)
        self.at, self.keep_unit = at, keep_unit

    def after_block(self, i, tokens, ctx):
        if i != self.at:
            return tokens
        return tokens.select(self.keep_unit(tokens.unit))


class _DropPatchesRestore(ViTCompressor):
    """Test strategy (patch granularity): after block ``at`` drop the patches with ``origin % 3 == 1`` (partial
    units), keep their states in ctx.state and put them back in finish()."""

    name = "drop_patches_test"
    granularity = "patch"

    def __init__(self, at: int, **kw):
        super().__init__(keep_ratio=0.5, **kw)
        self.at = at

    def after_block(self, i, tokens, ctx):
        if i != self.at:
            return tokens
        drop = tokens.origin % 3 == 1
        ctx.state["dropped"] = tokens.select(drop)
        return tokens.select(~drop)

    def finish(self, tokens, ctx):
        return VisionTokens.cat([ctx.state["dropped"], tokens])      # out of order on purpose


def _tower(model, pv, grid, **kw):
    with torch.no_grad():
        return model.model.visual(pv, grid_thw=grid, **kw).pooler_output


@pytest.mark.parametrize("at", [0, 2])
def test_unit_drop_matches_hand_written_block_loop(vlm, at):
    """Dropping whole units after block ``at`` equals the unmodified blocks called by hand on the kept tokens with
    recomputed per-frame (and per-window) cu_seqlens; dropped units are zero rows; image 1 (all units kept) is
    unchanged."""
    model = vlm.model
    pv, grid = _vision_inputs(vlm)
    keep_unit = lambda u: (u % 3 != 1) | ((u >= 12) & (u < 20))             # noqa: E731 image 1 keeps all units
    meta = qwen_vision_meta(grid, 2, _window(model.model.visual))
    keep_tok = keep_unit(meta.unit)
    ref_full = _tower(model, pv, grid)
    with torch.no_grad():
        ref = reference_tower(model, pv, grid, at, keep_tok)
    with tokcomp.compress(model, vision=_DropUnits(at, keep_unit)) as s:
        out = _tower(model, pv, grid)
    kept = keep_unit(torch.arange(meta.layout.n_units))
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    assert bool((out[~kept] == 0).all())
    assert torch.allclose(out[12:20], ref_full[12:20], atol=1e-5, rtol=0)
    assert s.report.vision[-1].vision_out == [int(kept[a:b].sum()) for a, b in
                                              ((0, 12), (12, 20), (20, 29), (29, 33), (33, 45))]
    assert s.report.vision[-1].vision_blocks[at] == 4 * int(kept.sum())


def test_patch_drop_and_restore_matches_hand_written_block_loop(vlm):
    """Patch granularity with partial units (cu_seqlens per frame / window of single patches), finish() returning
    the full grid out of order: equals the hand-written loop; the merger sees the restored grid."""
    model = vlm.model
    pv, grid = _vision_inputs(vlm)
    n = int(grid.prod(-1).sum())
    keep_tok = torch.arange(n) % 3 != 1
    with torch.no_grad():
        ref = reference_tower(model, pv, grid, 1, keep_tok, restore=True)
    with tokcomp.compress(model, vision=_DropPatchesRestore(1)) as s:
        out = _tower(model, pv, grid)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    assert s.report.vision[-1].vision_blocks == {0: n, 1: int(keep_tok.sum()), 2: int(keep_tok.sum()),
                                                 3: int(keep_tok.sum())}


# ------------------------------------------------------------------------------------------------ block variants
def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], -1)


def brute_block(blk, tokens: VisionTokens, seg, extra: VisionTokens | None = None, extra_seg=None,
                size_bias=False, mlp_on=None) -> torch.Tensor:
    """Float64 reference of a Qwen vision block on ``tokens`` with explicit [N, M] segment masks."""
    b = copy.deepcopy(blk).double()
    heads = b.attn.num_heads
    allt = tokens if extra is None else VisionTokens.cat([tokens, extra])
    kseg = seg if extra is None else torch.cat([seg, extra_seg])
    x = tokens.hidden.double()
    xa = allt.hidden.double()
    cos, sin = (r.double()[:, None] for r in allt.rope)
    qkv = b.attn.qkv(b.norm1(xa)).view(xa.shape[0], 3, heads, -1)
    q, k, v = qkv.unbind(1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q = q[: tokens.n]
    s = torch.einsum("nhd,mhd->hnm", q, k) * q.shape[-1] ** -0.5
    if size_bias:
        s = s + allt.size.double().log()[None, None, :]
    s = s.masked_fill(seg[None, :, None] != kseg[None, None, :], float("-inf"))
    o = torch.einsum("hnm,mhd->nhd", s.softmax(-1), v).reshape(tokens.n, -1)
    x = x + b.attn.proj(o)
    idx = torch.arange(tokens.n) if mlp_on is None else mlp_on
    x[idx] = x[idx] + b.mlp(b.norm2(x[idx]))
    return x


def _block_setup(vlm, i):
    model = vlm.model
    visual = model.model.visual
    pv, grid = _vision_inputs(vlm)
    meta = qwen_vision_meta(grid, 2, _window(visual))
    with torch.no_grad():
        x = visual.patch_embed(pv)
        cos, sin = visual.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
        if _window(visual) is not None:
            widx, _ = get_vision_window_index(grid, 2, *_window(visual))
            perm = (widx[:, None] * 4 + torch.arange(4)).reshape(-1)
            x, cos, sin = x[perm], cos[perm], sin[perm]
        x = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))   # not just embeddings
    tokens = initial_tokens(meta, x, (cos, sin))
    windowed = _window(visual) is not None and i not in visual.fullatt_block_indexes
    return visual.blocks[i], meta, tokens, block_segments(meta, tokens, windowed)


@pytest.mark.parametrize("i", [0, 1])
def test_plain_variant_equals_native_block(vlm, i):
    """run_block_variant with an empty BlockVariant reproduces the native block (window and full blocks)."""
    blk, meta, tokens, seg = _block_setup(vlm, i)
    ops = Qwen2VLAdapter(vlm.model)._block_ops(blk)
    with torch.no_grad():
        ours = run_block_variant(ops, tokens, BlockVariant(), seg).hidden
        native = blk(tokens.hidden, cu_seqlens=cu_seqlens_of(seg)[0], max_seqlen=None,
                     position_embeddings=tokens.rope)
    assert torch.allclose(ours, native, atol=1e-6, rtol=0), (ours - native).abs().max()


@pytest.mark.parametrize("i", [0, 1])
def test_variant_extra_kv_size_bias_mlp_subset_matches_bruteforce(vlm, i):
    """Queries = a subset of tokens; keys/values = queries + extra tokens (their own states, same segments);
    log-size bias on keys; MLP on a subset: equals a float64 brute force with explicit segment masks."""
    blk, meta, tokens, seg = _block_setup(vlm, i)
    g = torch.Generator().manual_seed(7)
    is_q = torch.rand(tokens.n, generator=g) < 0.6
    q_tok, e_tok = tokens.select(is_q), tokens.select(~is_q)
    e_tok = e_tok.with_hidden(e_tok.hidden + torch.randn(e_tok.hidden.shape, generator=g),
                              size=1 + 3 * torch.rand(e_tok.n, generator=g))
    q_tok = q_tok.with_hidden(q_tok.hidden, size=1 + 3 * torch.rand(q_tok.n, generator=g))
    q_seg, e_seg = seg[is_q], seg[~is_q]
    mlp_on = torch.arange(0, q_tok.n, 3)
    ops = Qwen2VLAdapter(vlm.model)._block_ops(blk)
    with torch.no_grad():
        ours = run_block_variant(ops, q_tok, BlockVariant(extra_kv=e_tok, mlp_on=mlp_on, size_bias=True),
                                 q_seg, e_seg).hidden
        ref = brute_block(blk, q_tok, q_seg, e_tok, e_seg, size_bias=True, mlp_on=mlp_on)
    assert torch.allclose(ours.double(), ref, atol=2e-5, rtol=0), (ours.double() - ref).abs().max()


def test_variant_mid_gets_head_mean_keys_and_mlp_runs_on_its_output(tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    blk, meta, tokens, seg = _block_setup(vlm, 0)
    seen = {}

    def mid(t, keys):
        seen["keys"] = keys
        return t.select(torch.arange(0, t.n, 2))                     # "merge": keep every other token

    ops = Qwen2VLAdapter(vlm.model)._block_ops(blk)
    with torch.no_grad():
        out = run_block_variant(ops, tokens, BlockVariant(mid=mid), seg)
        _, k, _ = ops.qkv(blk.norm1(tokens.hidden))
        full = brute_block(blk, tokens, seg, mlp_on=torch.arange(0))  # attention only (MLP on no token)
        half = full[::2]
        half = half + copy.deepcopy(blk).double().mlp(copy.deepcopy(blk).double().norm2(half))
    assert torch.allclose(seen["keys"], k.mean(1), atol=0, rtol=0)
    assert out.n == (tokens.n + 1) // 2 and torch.equal(out.origin, tokens.origin[::2])
    assert torch.allclose(out.hidden.double(), half, atol=2e-5, rtol=0)


def test_segment_attention_never_crosses_segments():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 2, 4, generator=g) for _ in range(3))
    seg = torch.tensor([0, 0, 0, 5, 5, 1, 1, 1, 1, 1])
    out = segment_attention(q, k, v, seg, seg, None, sdpa_attend(0.5))
    for s in seg.unique():
        m = seg == s
        ref = torch.softmax(torch.einsum("nhd,mhd->hnm", q[m], k[m]) * 0.5, -1)
        assert torch.allclose(out[m], torch.einsum("hnm,mhd->nhd", ref, v[m]), atol=1e-6)


class _EveryBlockVariant(ViTCompressor):
    """Test strategy: an explicit BlockVariant for every block; optionally extra_kv = units dropped after block 0."""

    name = "variant_test"
    granularity = "unit"

    def __init__(self, extra: bool, **kw):
        super().__init__(keep_ratio=0.5, **kw)
        self.extra = extra

    def after_block(self, i, tokens, ctx):
        if self.extra and i == 0:
            drop = tokens.unit % 2 == 1
            ctx.state["dropped"] = tokens.select(drop)
            return tokens.select(~drop)
        return tokens

    def block_variant(self, i, tokens, ctx):
        if self.extra and i == 1:
            return BlockVariant(extra_kv=ctx.state["dropped"])
        return BlockVariant()


def test_variants_through_the_hooks(vlm):
    """Variants run by the adapter inside the tower (native block fed a 1-token dummy): empty variants at every
    block reproduce the unmodified tower; an extra_kv variant at block 1 equals the float64 brute force."""
    model = vlm.model
    visual = model.model.visual
    pv, grid = _vision_inputs(vlm)
    ref = _tower(model, pv, grid)
    with tokcomp.compress(model, vision=_EveryBlockVariant(False)):
        out = _tower(model, pv, grid)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)

    meta = qwen_vision_meta(grid, 2, _window(visual))
    keep_tok = meta.unit % 2 == 0
    with torch.no_grad():                        # hand-written: block 0 on all, block 1 brute force, rest native
        x = visual.patch_embed(pv)
        cos, sin = visual.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
        widx = torch.arange(meta.layout.n_units)
        if _window(visual) is not None:
            widx, _ = get_vision_window_index(grid, 2, *_window(visual))
            perm = (widx[:, None] * 4 + torch.arange(4)).reshape(-1)
            x, cos, sin = x[perm], cos[perm], sin[perm]
        tokens = initial_tokens(meta, x, (cos, sin))
        windowed = [_window(visual) is not None and i not in visual.fullatt_block_indexes for i in range(4)]
        seg0 = block_segments(meta, tokens, windowed[0])
        h = visual.blocks[0](x, cu_seqlens=cu_seqlens_of(seg0)[0], max_seqlen=None, position_embeddings=(cos, sin))
        t1 = tokens.with_hidden(h)
        q, e = t1.select(keep_tok), t1.select(~keep_tok)
        seg_q, seg_e = block_segments(meta, q, windowed[1]), block_segments(meta, e, windowed[1])
        h = brute_block(visual.blocks[1], q, seg_q, e, seg_e).float()
        for i in (2, 3):
            seg = block_segments(meta, q, windowed[i])
            h = visual.blocks[i](h, cu_seqlens=cu_seqlens_of(seg)[0], max_seqlen=None, position_embeddings=q.rope)
        merged = visual.merger(h)
        ref2 = merged.new_zeros(meta.layout.n_units, merged.shape[-1])
        ref2[widx[keep_tok.view(-1, 4)[:, 0]]] = merged
    with tokcomp.compress(model, vision=_EveryBlockVariant(True)):
        out2 = _tower(model, pv, grid)
    assert torch.allclose(out2, ref2, atol=2e-5, rtol=0), (out2 - ref2).abs().max()


# ------------------------------------------------------------------------------------------------ finish
class _PartialUnits(ViTCompressor):
    name = "partial_units_test"
    granularity = "unit"

    def finish(self, tokens, ctx):
        return tokens.select(tokens.origin % 4 != 3)


class _DuplicatePatch(ViTCompressor):
    name = "dup_patch_test"
    granularity = "patch"

    def finish(self, tokens, ctx):
        return VisionTokens.cat([tokens, tokens.select(torch.tensor([0]))])


@pytest.mark.parametrize("strategy,match", [(_PartialUnits, "whole units"),
                                            (_DuplicatePatch, "exactly once")])
def test_invalid_finish_is_refused_and_model_restored(tiny_vlm_factory, strategy, match):
    model = tiny_vlm_factory("tiny-qwen2.5-vl").model
    vlm = tiny_vlm_factory("tiny-qwen2.5-vl")
    pv, grid = _vision_inputs(vlm)
    ref = _tower(model, pv, grid)
    with pytest.raises(AdapterError, match=match):
        with tokcomp.compress(model, vision=strategy(keep_ratio=0.5)):
            _tower(model, pv, grid)
    assert torch.equal(_tower(model, pv, grid), ref)


def test_check_finish_orders_units_in_tower_order():
    from tokcomp.tokens import VisionLayout
    lay = VisionLayout(n_tokens=8, unit_size=4, segment_grid=torch.tensor([[1, 2, 4]]),
                       segment_image=torch.tensor([0]), unit_patches=torch.tensor([[4, 5, 6, 7], [0, 1, 2, 3]]),
                       unit_segment=torch.tensor([0, 0]), unit_grid=torch.tensor([[0, 0, 0], [0, 0, 1]]))
    unit = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    t = VisionTokens(torch.arange(8.0)[:, None], torch.zeros(8, dtype=torch.long), torch.zeros(8, 3, dtype=torch.long),
                     unit, torch.ones(8), torch.arange(8), torch.zeros(8, dtype=torch.bool))
    done = check_finish(t.select(torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])), lay, "unit")
    assert done.units.tolist() == [1, 0] and done.rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(AdapterError):
        check_finish(t.select(torch.tensor([0, 1, 2, 4, 5, 6, 7])), lay, "unit")


# ------------------------------------------------------------------------------------------------ flash path
def _fake_varlen(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, is_causal=False,
                 cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kw):
    """A stand-in for flash-attention's varlen kernel (same calling convention, SDPA per segment), which checks
    that what it is given is consistent (int32 cu_seqlens, exact max lengths, no mask)."""
    assert attention_mask is None and not is_causal
    assert cu_seq_lens_q.dtype == torch.int32 and cu_seq_lens_k.dtype == torch.int32
    lq, lk = cu_seq_lens_q.diff(), cu_seq_lens_k.diff()
    assert int(lq.max()) == max_length_q and int(lk.max()) == max_length_k
    assert int(cu_seq_lens_q[-1]) == query.shape[2] and int(cu_seq_lens_k[-1]) == key.shape[2]
    outs = []
    for a, b, c, d in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist(),
                          cu_seq_lens_k[:-1].tolist(), cu_seq_lens_k[1:].tolist()):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, c:d], value[:, :, c:d], scale=scaling))
    return torch.cat(outs, 2).transpose(1, 2), None


@pytest.fixture
def fake_flash():
    """Registers the fake varlen kernel under a name containing 'flash' (so transformers takes its flash paths)."""
    name = "tokcomp_test_flash_varlen"
    undo = hf.register_attention(name, _fake_varlen, mask_like="flash_attention_2")
    yield name
    undo()


@pytest.mark.parametrize("name", MODELS)
def test_flash_paths_match_sdpa(tiny_vlm_factory, fake_flash, name):
    """With a flash-style vision backend the tower gets exact int32 cu_seqlens and max_seqlen for the current
    token set, and variants with extra keys use one varlen call with different q / k segment lengths."""
    vlm = tiny_vlm_factory(name, attn="sdpa")
    model = vlm.model
    pv, grid = _vision_inputs(vlm)
    keep_unit = lambda u: u % 3 != 1                                          # noqa: E731
    strategies = [lambda: _DropUnits(1, keep_unit), lambda: _EveryBlockVariant(True),
                  lambda: _DropPatchesRestore(0)]
    refs = []
    for make in strategies:
        with tokcomp.compress(model, vision=make()):
            refs.append(_tower(model, pv, grid))
    cfg = model.config.vision_config
    old = hf.attn_impl(cfg)
    hf.set_config_attn(cfg, fake_flash)
    try:
        for make, ref in zip(strategies, refs):
            with tokcomp.compress(model, vision=make()):
                out = _tower(model, pv, grid)
            assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
        with pytest.raises(AdapterError, match="flash"):
            with tokcomp.compress(model, vision=_SizeBias(keep_ratio=0.5)):
                _tower(model, pv, grid)
    finally:
        hf.set_config_attn(cfg, old)


class _SizeBias(ViTCompressor):
    name = "size_bias_test"
    granularity = "unit"

    def block_variant(self, i, tokens, ctx):
        return BlockVariant(size_bias=True)
