"""InternVL adapter: invariants on tiny InternVL models (sdpa and eager) against independent truths.

Truths used: the unmodified model (keep 1.0, text-only rows, restore), the same prompt alone (batches), a no-cache
recompute (cached decoding), the unmodified InternViT run tile by tile on hand-picked token subsets (vision side),
the model's own pixel shuffle (layout), and the unmodified model fed a hand re-packed prompt (prompt re-packing).
"""
from __future__ import annotations

import pytest
import torch

import tokcomp
from tokcomp.errors import AdapterError
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import BlockVariant, VisionTokens

from tokcomp.adapters import _hf as hf
from tokcomp.adapters._internvl_vision import block_ops, tile_layout, tile_tokens
from tokcomp.adapters._vision import run_block_variant

N_NEW = 4
VISION = ["random", "pool"]
ATTNS = ["sdpa", "eager"]


def _specs():
    out = []
    for r in ("1.0", "0.5"):
        for v in VISION:
            out.append(f"{v}(keep_ratio={r})+none")
        out.append(f"none+random(keep_ratio={r})")
    for rv in ("1.0", "0.5"):
        for v in VISION:
            for rl in ("1.0", "0.5"):
                out.append(f"{v}(keep_ratio={rv})+random(keep_ratio={rl})")
    return out


SPECS = _specs()


# ------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=ATTNS)
def vlm(request, tiny_vlm_factory):
    return tiny_vlm_factory("tiny-internvl", attn=request.param)


@pytest.fixture(scope="module")
def images():
    from tokcomp.testing import default_images
    return default_images()        # 5 tiles, 3 tiles, 5 tiles, 1 tile (no thumbnail)


def _rows(images):
    """Left-padded rows with different tile counts: 5 tiles; two images (3 + 1 tiles); text only."""
    return [images[0], [images[1], images[3]], None]


def _inputs(vlm, rows):
    from tokcomp.testing import make_inputs
    return make_inputs(vlm, rows)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _impls(model):
    c = model.config
    return (hf.attn_impl(c), hf.attn_impl(c.text_config), hf.attn_impl(c.vision_config))


@torch.no_grad()
def _generate(model, inputs, n=N_NEW):
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1), hf.output_cache(out)


@torch.no_grad()
def _recompute(model, inputs, seq):
    """Logits of a no-cache forward over prompt + generated tokens at the generated steps."""
    L = inputs["input_ids"].shape[1]
    am = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, L:])], 1)
    kw = dict(input_ids=seq, attention_mask=am, use_cache=False)
    if "pixel_values" in inputs:
        kw["pixel_values"] = inputs["pixel_values"]
    n = seq.shape[1] - L
    return model(**kw).logits[:, -(n + 1):-1]


@pytest.fixture(scope="module")
def base(vlm, images):
    """Unmodified-model outputs on the batch (computed before any session; also installs transformers' own
    output-capturing hooks so hook counts compare like with like)."""
    inp = _inputs(vlm, _rows(images))
    with torch.no_grad():
        logits = vlm.model(**inp).logits
    seq, glog, _ = _generate(vlm.model, inp)
    return dict(inputs=inp, logits=logits, seq=seq, glog=glog, hooks=_hooks(vlm.model), impls=_impls(vlm.model))


# ------------------------------------------------------------------------------------------------------
# the invariant matrix: random/pool (vision) x random (LLM), keep 1.0 and 0.5, every stage and pair
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
def test_invariants(vlm, images, base, spec):
    model, inp = vlm.model, base["inputs"]
    noop = "0.5" not in spec
    with tokcomp.compress(model, spec) as s:
        assert _hooks(model) > base["hooks"]
        with torch.no_grad():
            logits = model(**inp).logits
        seq, glog, cache = _generate(model, inp)
        rec = s.report.last
        # cached decoding == no-cache recompute inside the session
        ref = _recompute(model, inp, seq)
        assert (ref - glog).abs().max().item() < 1e-4
        # cache layer 0 holds the whole prompt that entered the LLM (never shortened)
        L_in = cache.layers[0].get_seq_length()
        assert all(cache.get_seq_length(i) <= L_in for i in range(len(cache.layers)))
        assert L_in == max(rec.llm_in[b] + int((inp["input_ids"][b] != vlm.image_token_id).sum()
                           - (inp["attention_mask"][b] == 0).sum()) for b in range(3)) + N_NEW - 1
        # row b equals the same prompt alone
        for b, row in enumerate(_rows(images)):
            one = _inputs(vlm, [row])
            with torch.no_grad():
                lo = model(**one).logits[0, -1]
            s1, _, _ = _generate(model, one)
            assert (lo - logits[b, -1]).abs().max().item() < 1e-4, f"row {b}"
            assert torch.equal(s1[0, -N_NEW:], seq[b, -N_NEW:]), f"row {b}"
        # the text-only row is untouched
        text = _inputs(vlm, [None])
        with torch.no_grad():
            t_logits = model(**text).logits
        st, _, _ = _generate(model, text)
    with torch.no_grad():
        t_ref = model(**text).logits
    assert torch.equal(t_logits, t_ref)
    assert torch.equal(st, _generate(model, text)[0])
    # achieved counts
    assert rec.llm_in[2] == 0
    if noop:
        assert torch.equal(logits, base["logits"])
        assert torch.equal(seq, base["seq"]) and torch.equal(glog, base["glog"])
        assert rec.llm_in == [20, 16, 0]
    else:
        vis_spec, llm_spec = spec.split("+")
        if "0.5" in vis_spec:
            assert rec.vision_out == [10, 6, 2] and rec.llm_in == [10, 8, 0]
        else:
            assert rec.vision_out == [20, 12, 4] and rec.llm_in == [20, 16, 0]
        if "0.5" in llm_spec:
            assert rec.llm_layers[0] == rec.llm_in and rec.llm_layers[3] == [(n + 1) // 2 for n in rec.llm_in]
    # leaving the session restores the model
    assert _hooks(model) == base["hooks"] and _impls(model) == base["impls"]
    assert not hasattr(model, "_tokcomp_session")
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, base["logits"])


def test_exception_inside_session_restores(vlm, base):
    model, inp = vlm.model, base["inputs"]
    with pytest.raises(RuntimeError, match="boom"):
        with tokcomp.compress(model, "random(keep_ratio=0.5)+random(keep_ratio=0.5)"):
            with torch.no_grad():
                model(**inp)
            raise RuntimeError("boom")
    assert _hooks(model) == base["hooks"] and _impls(model) == base["impls"]
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, base["logits"])


class _Broken(ViTCompressor):
    """Fails inside a hook (after block 1)."""

    name = "broken_test"
    granularity = "unit"

    def after_block(self, i, tokens, ctx):
        if i == 1:
            raise ValueError("strategy failure")
        return tokens


def test_exception_inside_a_hook_restores(vlm, base):
    model, inp = vlm.model, base["inputs"]
    with pytest.raises(ValueError, match="strategy failure"):
        with tokcomp.compress(model, vision=_Broken(keep_ratio=0.5)):
            with torch.no_grad():
                model(**inp)
    assert _hooks(model) == base["hooks"]
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, base["logits"])
    with tokcomp.compress(model, "random(keep_ratio=0.5)+none"), torch.no_grad():
        model(**inp)           # a fresh session works after the failure


# ------------------------------------------------------------------------------------------------------
# vision side against the unmodified InternViT
# ------------------------------------------------------------------------------------------------------
def test_layout_matches_pixel_shuffle(vlm):
    """unit_patches[u] are the tokens pixel shuffle concatenates (TL, TR, BL, BR) into placeholder u."""
    model = vlm.model
    g = model.config.vision_config.image_size[0] // model.config.vision_config.patch_size[0]
    T = 3
    lay = tile_layout(T, g)
    idx = torch.arange(T * (1 + g * g), dtype=torch.float32).view(T, 1 + g * g, 1)
    feats = idx[:, 1:].reshape(T, g, g, 1)
    shuf = model.model.pixel_shuffle(feats, 0.5).reshape(-1, 4)            # [T*(g/2)^2, 4] channel order
    assert torch.equal(shuf.long(), lay.unit_patches)
    tok = tile_tokens(idx.expand(-1, -1, 2).contiguous(), g)
    assert int(tok.cls.sum()) == T and bool((tok.unit[tok.cls] == -1).all())
    for u in range(lay.n_units):
        assert sorted(tok.origin[tok.unit == u].tolist()) == lay.unit_patches[u].tolist()
        assert bool((tok.segment[lay.unit_patches[u]] == lay.unit_segment[u]).all())


def _tower_reference(model, pixel_values, keep_rows_after0):
    """Unmodified InternViT tile by tile: full block 0, then blocks 1.. on the chosen rows of each tile; the
    kept rows are scattered back (zeros elsewhere), pixel-shuffled and projected."""
    tower = model.model.vision_tower
    with torch.no_grad():
        emb = tower.embeddings(pixel_values)
        h = tower.encoder.layer[0](emb)
        full = torch.zeros_like(h)
        for t in range(h.shape[0]):
            x = h[t:t + 1, keep_rows_after0[t]]
            for layer in tower.encoder.layer[1:]:
                x = layer(x)
            full[t, keep_rows_after0[t]] = x[0]
        T, n1, C = full.shape
        g = int(round((n1 - 1) ** 0.5))
        f = model.model.pixel_shuffle(full[:, 1:].reshape(T, g, g, C), 0.5).reshape(T, -1, 4 * C)
        return model.model.multi_modal_projector(f)                           # [T, n, D]


def test_vision_drop_matches_tilewise_reference(vlm, images):
    model = vlm.model
    inp = _inputs(vlm, [[images[1], images[3]]])
    seen = []
    with tokcomp.compress(model, "random(keep_ratio=0.5,layer=0)+none") as s, torch.no_grad():
        h = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
        try:
            feats = model.model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output   # [T, n, D]
        finally:
            h.remove()
    kept = feats.abs().amax(-1) > 0                                                           # [T, n]
    assert kept.sum(1).tolist() == [2, 2, 2, 2]
    C = model.config.vision_config.hidden_size
    assert seen == [torch.Size([1, 8, 4 * C])]                    # the projector runs on the kept units only
    assert s.report.vision[-1].vision_blocks == {0: 4 * 9, 1: 4 * 9, 2: 4 * 9, 3: 4 * 9}   # CLS + 2 units
    T = feats.shape[0]
    g = 4
    lay = tile_layout(T, g)
    rows = []
    for t in range(T):
        units = lay.unit_patches.view(T, -1, 4)[t][kept[t]] - t * (1 + g * g)
        rows.append(torch.cat([torch.zeros(1, dtype=torch.long), units.reshape(-1)]).sort().values)
    ref = _tower_reference(model, inp["pixel_values"], rows)
    assert (feats[kept] - ref[kept]).abs().max().item() < 1e-5


def test_unit_drop_after_last_block_equals_reprojected_features(vlm, images):
    """Dropping after the last block: kept features equal the unmodified ones, and the whole model equals the
    unmodified model fed the hand re-packed prompt (placeholders removed, original positions, kept features)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    model = vlm.model
    inp = _inputs(vlm, [images[0], [images[1], images[3]]])
    depth = model.config.vision_config.num_hidden_layers
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
    seen = {}

    def spy(m, a, kw):
        seen["pos"], seen["mask"] = kw.get("position_ids"), kw.get("attention_mask")
    with tokcomp.compress(model, f"random(keep_ratio=0.5,layer={depth - 1})+none"), torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
        h = model.model.language_model.layers[0].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            logits = model(**inp).logits
        finally:
            h.remove()
    # gappy positions never reach the layers (flash's packed-sequence test); the padding mask is explicit
    assert seen["pos"] is None and seen["mask"] is not None
    kept = (feats.abs().amax(-1) > 0).reshape(-1)
    flat, flat_full = feats.reshape(-1, feats.shape[-1]), full.reshape(-1, full.shape[-1])
    assert (flat[kept] - flat_full[kept]).abs().max().item() < 1e-6 and int(kept.sum()) == kept.numel() // 2
    # hand re-packing
    ids, am = inp["input_ids"], inp["attention_mask"]
    img = ids == vlm.image_token_id
    tok_keep = am.bool().clone()
    tok_keep[img] = kept
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    Lp = int(tok_keep.sum(1).max())
    B = ids.shape[0]
    new_ids = torch.full((B, Lp), vlm.tokenizer.pad_token_id)
    new_am, new_pos = torch.zeros(B, Lp, dtype=torch.long), torch.zeros(B, Lp, dtype=torch.long)
    for b in range(B):
        n = int(tok_keep[b].sum())
        new_ids[b, Lp - n:], new_pos[b, Lp - n:] = ids[b, tok_keep[b]], pos[b, tok_keep[b]]
        new_am[b, Lp - n:] = 1
    with torch.no_grad():
        ref = model(input_ids=new_ids, attention_mask=new_am, position_ids=new_pos,
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=flat_full[kept][None])}).logits
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------------
# the block runner (BlockVariant) against the unmodified InternVLVisionLayer
# ------------------------------------------------------------------------------------------------------
def _tile_hidden(vlm, images):
    inp = _inputs(vlm, [images[1]])
    tower = vlm.model.model.vision_tower
    with torch.no_grad():
        h = tower.encoder.layer[0](tower.embeddings(inp["pixel_values"]))    # [T, 17, C]
    return h


def test_block_runner_variants_match_native_layer(vlm, images):
    model = vlm.model
    layer = model.model.vision_tower.encoder.layer[1]
    impl = hf.attn_impl(model.config.vision_config)
    h = _tile_hidden(vlm, images)
    T, n1, C = h.shape
    g = int(round((n1 - 1) ** 0.5))
    toks = tile_tokens(h, g)
    with torch.no_grad():
        native = layer(h).reshape(-1, C)
        ops = block_ops(layer, impl)
        plain = run_block_variant(ops, toks, BlockVariant(), toks.segment)
        assert (plain.hidden - native).abs().max().item() < 1e-5
        # ragged tiles: queries = a different subset per tile, the rest as extra key/value tokens
        q_mask = torch.ones(toks.n, dtype=torch.bool)
        for t in range(T):
            q_mask[t * n1 + 1 + torch.arange(t, 2 * t + 3)] = False       # tile t loses t + 3 patches
        q, e = toks.select(q_mask), toks.select(~q_mask)
        out = run_block_variant(ops, q, BlockVariant(extra_kv=e), q.segment, e.segment)
        assert (out.hidden - native[q_mask]).abs().max().item() < 1e-5
        # MLP on a subset: the other rows keep the attention residual only
        sub = torch.arange(0, q.n, 2)
        out = run_block_variant(ops, q, BlockVariant(extra_kv=e, mlp_on=sub), q.segment, e.segment)
        assert (out.hidden[sub] - native[q_mask][sub]).abs().max().item() < 1e-5
        a, _ = layer.attention(layer.layernorm_before(h))
        after_attn = (layer.lambda_1 * a + h).reshape(-1, C)[q_mask]
        rest = torch.ones(q.n, dtype=torch.bool)
        rest[sub] = False
        assert (out.hidden[rest] - after_attn[rest]).abs().max().item() < 1e-5
        # proportional attention: log(size) added to every key's logit (eager reference per tile)
        sized = toks.with_hidden(toks.hidden, size=torch.arange(toks.n, dtype=torch.float32) % 3 + 1)
        seen = {}

        def mid(tokens, keys):
            seen["keys"] = keys
            return tokens
        out = run_block_variant(ops, sized, BlockVariant(size_bias=True, mid=mid), sized.segment)
        att = layer.attention
        hn = layer.layernorm_before(h)
        H, d = att.num_heads, att.head_dim
        qq = att.q_norm(att.q_proj(hn)).view(T, n1, H, d).transpose(1, 2)
        kk = att.k_norm(att.k_proj(hn)).view(T, n1, H, d).transpose(1, 2)
        vv = att.v_proj(hn).view(T, n1, H, d).transpose(1, 2)
        bias = sized.size.log().view(T, 1, 1, n1)
        w = torch.softmax(qq @ kk.transpose(-1, -2) * att.scale + bias, -1)
        o = att.projection_layer((w @ vv).transpose(1, 2).reshape(T, n1, C))
        x = layer.lambda_1 * o + h
        ref = (layer.lambda_2 * layer.mlp(layer.layernorm_after(x)) + x).reshape(-1, C)
        assert (out.hidden - ref).abs().max().item() < 1e-5
        assert (seen["keys"] - kk.transpose(1, 2).reshape(-1, H, d).mean(1)).abs().max().item() < 1e-6


class _PatchKeepRestore(ViTCompressor):
    """A patch-granularity test strategy: after block 0 tile t keeps all but t + 1 patches (ragged tiles);
    block 1 runs with the removed tokens as extra keys/values; finish puts the removed tokens back."""

    name = "patch_test"
    granularity = "patch"

    def after_block(self, i, tokens, ctx):
        if i == 0:
            drop = torch.zeros(tokens.n, dtype=torch.bool)
            n1 = int((tokens.segment == 0).sum())
            for t in range(ctx.layout.n_segments):
                drop[t * n1 + 2 + torch.arange(t + 1)] = True
            ctx.state["removed"] = tokens.select(drop)
            return tokens.select(~drop)
        if i == 1:
            ctx.state["after1"] = tokens
        return tokens

    def block_variant(self, i, tokens, ctx):
        return BlockVariant(extra_kv=ctx.state["removed"]) if i == 1 else None

    def finish(self, tokens, ctx):
        return VisionTokens.cat([tokens, ctx.state["removed"]])


def test_patch_strategy_ragged_tiles_and_restore(vlm, images):
    model = vlm.model
    inp = _inputs(vlm, [images[1]])
    strat = _PatchKeepRestore(keep_ratio=0.5)
    seen = {}
    orig_finish = strat.finish

    def finish(tokens, ctx):
        seen["after1"] = ctx.state["after1"]
        seen["cls"] = int(tokens.cls.sum())
        return orig_finish(tokens, ctx)
    strat.finish = finish
    tower = model.model.vision_tower
    with torch.no_grad():
        ref = tower(pixel_values=inp["pixel_values"], output_hidden_states=True).hidden_states[2]   # after layer 1
    with tokcomp.compress(model, vision=strat) as s, torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
        logits = model(**inp).logits
    a1 = seen["after1"]
    assert (a1.hidden - ref.reshape(-1, ref.shape[-1])[a1.origin]).abs().max().item() < 1e-5
    assert seen["cls"] == 3 and s.report.last.vision_blocks[1] == 3 * 17 - (1 + 2 + 3)
    assert bool((feats.abs().amax(-1) > 0).all()) and s.report.last.llm_in == [12]
    assert torch.isfinite(logits).all()


class _DropCLS(ViTCompressor):
    name = "drop_cls_test"
    granularity = "unit"

    def after_block(self, i, tokens, ctx):
        return tokens.select(~tokens.cls) if i == 0 else tokens


def test_cls_is_never_dropped(vlm, images):
    model = vlm.model
    inp = _inputs(vlm, [images[0]])
    seen = []

    class Spy(ViTCompressor):
        name = "spy_test"
        granularity = "unit"

        def after_block(self, i, tokens, ctx):
            seen.append((int(tokens.cls.sum()), bool((tokens.unit[tokens.cls] == -1).all()),
                         bool((tokens.pos[tokens.cls] == -1).all())))
            return tokens
    with tokcomp.compress(model, vision=Spy(keep_ratio=1.0)), torch.no_grad():
        model(**inp)
    assert seen == [(5, True, True)] * 4
    with tokcomp.compress(model, vision=_DropCLS(keep_ratio=1.0)), torch.no_grad():
        with pytest.raises(AdapterError, match="CLS"):
            model(**inp)


# ------------------------------------------------------------------------------------------------------
# special prompts and refusals
# ------------------------------------------------------------------------------------------------------
def test_single_tile_image(vlm, images):
    model = vlm.model
    inp = _inputs(vlm, [images[3]])
    assert inp["pixel_values"].shape[0] == 1
    for spec in ("random(keep_ratio=0.5)+random(keep_ratio=0.5)", "pool(keep_ratio=0.5)+none"):
        with tokcomp.compress(model, spec) as s:
            seq, glog, _ = _generate(model, inp)
            assert (_recompute(model, inp, seq) - glog).abs().max().item() < 1e-4
        assert s.report.last.vision_out == [2] and s.report.last.llm_in == [2]


def test_static_cache_is_refused(vlm, base):
    model, inp = vlm.model, base["inputs"]
    before = _hooks(model)          # transformers may have added its own capture hooks since `base` (older releases do)
    with tokcomp.compress(model, "random(keep_ratio=0.5)+none"):
        with pytest.raises(AdapterError, match="static"):
            model.generate(**inp, max_new_tokens=2, cache_implementation="static")
    assert _hooks(model) == before


class _NeedsRows(ViTCompressor):
    name = "needs_rows_test"
    granularity = "unit"
    needs_attention_rows = True


class _TokenGranularity(ViTCompressor):
    name = "token_test"
    granularity = "token"


def test_unmet_needs_are_refused_before_any_forward(vlm, base):
    model = vlm.model
    before = _hooks(model)
    for strat, msg in ((_NeedsRows(keep_ratio=0.5), "attention rows"), (_TokenGranularity(keep_ratio=0.5), "granularity")):
        with pytest.raises(AdapterError, match=msg):
            tokcomp.compress(model, vision=strat)
    assert _hooks(model) == before
    with tokcomp.compress(model, "random(keep_ratio=0.5)+none"), torch.no_grad():
        with pytest.raises(AdapterError, match="vision_feature_layer"):
            model(**base["inputs"], vision_feature_layer=-2)


def test_adapter_resolution_and_depths(vlm):
    s = tokcomp.compress(vlm.model, "random(keep_ratio=0.5)+none")
    assert s.adapter.name == "internvl"
    assert s.adapter.depths() == {"vision": 4, "llm": 4}


def test_manual_decode_and_expanded_generate(vlm, images):
    """Forward + manual decode steps on the returned cache (with the full-length mask, and with no mask and no
    positions) equal generate(); num_return_sequences expansion of the features works."""
    model = vlm.model
    inp = _inputs(vlm, [images[0], [images[1], images[3]]])
    one = _inputs(vlm, [images[0]])
    with tokcomp.compress(model, "random(keep_ratio=0.5)+random(keep_ratio=0.5)") as s, torch.no_grad():
        for x, with_mask in ((inp, True), (one, False)):
            gseq, glog, _ = _generate(model, x, n=3)
            out = model(**x)
            assert (out.logits[:, -1] - glog[:, 0]).abs().max().item() < 1e-4
            cache, am, L = hf.output_cache(out), x["attention_mask"], x["input_ids"].shape[1]
            for step in (1, 2):
                nxt = gseq[:, L + step - 1:L + step]          # generate's token (placeholders are suppressed)
                am = torch.cat([am, torch.ones_like(nxt)], 1)
                kw = dict(attention_mask=am) if with_mask else {}
                out = model(input_ids=nxt, **hf.cache_kwargs(cache), **kw)
                assert (out.logits[:, -1] - glog[:, step]).abs().max().item() < 1e-4
        seq = model.generate(**inp, max_new_tokens=3, do_sample=True, num_return_sequences=2)
        assert seq.shape[0] == 4 and s.report.last.llm_in == [10, 10, 8, 8]


@pytest.mark.parametrize("spec", ["ipcv(keep_ratio=0.5,prune_layer=1,stabilize_layers=2)+fastv(keep_ratio=0.5)",
                                  "tome(keep_ratio=0.5)+dart(keep_ratio=0.5)"])
def test_method_strategies_compose(tiny_vlm_factory, images, spec):
    """Smoke: registered methods (patch granularity with block variants, merging with size bias and mid, attention
    rows in the LLM) run on InternVL and keep the session invariants that hold for any strategy."""
    from tokcomp.registry import default_registry
    names = {c.name for c in default_registry().strategies()}
    if not {p.split("(")[0] for p in spec.split("+")} <= names:
        pytest.skip("method plugin not installed")
    vlm = tiny_vlm_factory("tiny-internvl")
    model = vlm.model
    inp = _inputs(vlm, _rows(images))
    with torch.no_grad():
        ref = model(**inp).logits
    hooks = _hooks(model)
    with tokcomp.compress(model, spec) as s, torch.no_grad():
        logits = model(**inp).logits
        seq, _, _ = _generate(model, inp)
    assert torch.isfinite(logits).all() and seq.shape[1] == inp["input_ids"].shape[1] + N_NEW
    assert s.report.last.llm_in[2] == 0 and s.report.last.llm_layers[3][0] < s.report.last.llm_layers[0][0]
    assert _hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, ref)
