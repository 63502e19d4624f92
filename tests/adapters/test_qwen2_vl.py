"""Qwen2-VL / Qwen2.5-VL adapter: the invariant matrix, prompt re-packing, positions, decoding, video, refusals.

Truths: the unmodified model, the same prompt alone, a no-cache recompute, and transformers' own
``get_rope_index`` on the full prompt. Vision-tower internals are tested in ``test_qwen2_vl_vision.py``.
"""
from __future__ import annotations

import pytest
import torch

import tokcomp
from tokcomp.adapters import _hf as hf
from tokcomp.errors import AdapterError
from tokcomp.strategy import ViTCompressor
from tokcomp.testing import Video, default_images, make_inputs, make_video_inputs, procedural_video
from tokcomp.testing import invariants as inv
from tokcomp.testing import matrix

torch.set_num_threads(1)

MODELS = matrix.presets("qwen2_vl")
ATTN = ["sdpa", "eager"]
SPECS = inv.invariant_specs()                       # random / pool (vision), random (llm), pairs; keep 1.0 and 0.5
NOOP = [s for s in SPECS if inv.noop_spec(s)]
HALF = [s for s in SPECS if not inv.noop_spec(s)]


@pytest.fixture(params=MODELS)
def name(request):
    return request.param


@pytest.fixture(params=ATTN)
def vlm(request, name, tiny_vlm_factory):
    return tiny_vlm_factory(name, attn=request.param)


# ------------------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("spec", NOOP)
def test_keep_one_is_identity(vlm, spec):
    inv.check_keep_one_is_identity(vlm, spec)


@pytest.mark.parametrize("spec", SPECS)
def test_session_restores_model(vlm, spec):
    inv.check_restores_model(vlm, spec)


@pytest.mark.parametrize("spec", HALF)
def test_session_restores_after_exception(vlm, spec):
    inv.check_restores_after_exception(vlm, spec)


@pytest.mark.parametrize("spec", SPECS)
def test_cached_decoding_matches_recompute(vlm, spec):
    inv.check_cached_decoding_matches_recompute(vlm, spec)


@pytest.mark.parametrize("spec", SPECS)
def test_rows_match_alone(vlm, spec):
    inv.check_rows_match_alone(vlm, spec)


@pytest.mark.parametrize("spec", HALF)
def test_text_only_untouched(vlm, spec):
    inv.check_text_only_untouched(vlm, spec)


@pytest.mark.parametrize("spec", ["random(keep_ratio=0.5)+none", "none+random(keep_ratio=0.5)",
                                  "pool(keep_ratio=0.5)+random(keep_ratio=0.5)"])
def test_static_cache_refused(vlm, spec):
    inv.check_static_cache_refused(vlm, spec)


# ------------------------------------------------------------------------------------------------ re-packing
def _capture_lm_inputs(model):
    seen = []

    def hook(mod, args, kw):
        seen.append({k: kw.get(k) for k in ("position_ids", "attention_mask", "inputs_embeds")})
    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _kept_columns(inputs, model, report_vision_kept):
    """Original columns of each row that survive (text + kept placeholders), from the session's kept masks."""
    ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
    keep = am.clone()
    img = ids == model.config.image_token_id
    keep[img] = report_vision_kept
    return [keep[b].nonzero()[:, 0] for b in range(ids.shape[0])]


@pytest.mark.parametrize("spec", ["random(keep_ratio=0.5)", "pool(keep_ratio=0.5)"])
def test_repacked_prompt_keeps_original_mrope_positions(vlm, spec):
    """The LLM gets fewer placeholders; every kept token carries its position from get_rope_index on the FULL
    prompt; the text row is contiguous; padding only on the left; model.model.rope_deltas matches."""
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())
    full_pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    seen, h = _capture_lm_inputs(model)
    try:
        with tokcomp.compress(model, vision=spec) as s:
            with torch.no_grad():
                out = model(**inputs)
            kept = s.adapter._results[-1].kept
            deltas = model.model.rope_deltas.clone()
    finally:
        h.remove()
    assert kept is not None and 0 < int(kept.sum()) < kept.numel()
    pos = seen[0]["position_ids"]
    am = seen[0]["attention_mask"]
    assert pos.shape[0] == 4 and pos.shape[2] == out.logits.shape[1] < inputs["input_ids"].shape[1]
    cols = _kept_columns(inputs, model, kept)
    for b, c in enumerate(cols):
        n = c.numel()
        assert torch.equal(pos[1:, b, -n:], full_pos[:, b, c])                # original t/h/w positions
        assert torch.equal(pos[0, b, -n:], torch.arange(n))                   # contiguous text row
        if am is not None:
            assert am[b, -n:].all() and not am[b, :-n].any()                  # left padding
        assert int(deltas[b]) == int(full_pos[:, b, c].max()) + 1 - n
    per_row = [int(kept[:12].sum()), int(kept[12:].sum()), 0]      # images of 12 | 8 + 4 units | text only
    assert s.report.prefill[-1].llm_in == per_row


def test_report_counts_and_repacked_placeholders(tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-qwen2.5-vl")
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())          # images of 12, 8 and 4 units; a text row
    with tokcomp.compress(model, "random(keep_ratio=0.5,layer=1)+random(keep_ratio=0.5,layer=2)") as s:
        with torch.no_grad():
            model(**inputs)
    rec = s.report.prefill[-1]
    assert rec.vision_in == 96 and rec.vision_blocks == {0: 96, 1: 48, 2: 48, 3: 48}
    assert rec.vision_out == [6, 4, 2]
    assert rec.llm_in == [6, 6, 0]
    assert rec.llm_layers[0] == [6, 6, 0] and rec.llm_layers[1] == [6, 6, 0] and rec.llm_layers[2] == [3, 3, 0]
    assert s.report.vision[-1].vision_out == [6, 4, 2]


def test_decode_positions_continue_after_unpruned_length(vlm):
    """generate(): decode steps get M-RoPE positions max(original)+1+t, masks of the re-packed length."""
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())
    full_pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    top = full_pos.amax(dim=(0, 2))
    seen, h = _capture_lm_inputs(model)
    try:
        with tokcomp.compress(model, "random(keep_ratio=0.5)+random(keep_ratio=0.5)"):
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    prefill_len = seen[0]["position_ids"].shape[-1]
    for t, step in enumerate(seen[1:]):
        pos = step["position_ids"]
        assert torch.equal(pos[1:, :, 0], (top + 1 + t).expand(3, -1))
        assert step["attention_mask"].shape[1] == prefill_len + t + 1


def test_manual_decode_loop_uses_rope_deltas(tiny_vlm_factory):
    """A hand-written cached loop (no position_ids, no mask, batch 1) decodes like generate()."""
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    model = vlm.model
    inputs = make_inputs(vlm, [default_images()[0]])
    with tokcomp.compress(model, "random(keep_ratio=0.5)+random(keep_ratio=0.5)"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        out = model(**inputs, use_cache=True)
        cache, logits = hf.output_cache(out), [out.logits[:, -1]]
        for _ in range(2):
            nxt = logits[-1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, **hf.cache_kwargs(cache), use_cache=True)
            logits.append(out.logits[:, -1])
    for a, b in zip(logits, g.logits):
        assert torch.allclose(a, b, atol=inv.LOGIT_ATOL, rtol=0)


def test_precomputed_mm_encoder_outputs_are_matched(tiny_vlm_factory):
    """Features computed by the user with get_image_features inside the session are re-packed like pixels."""
    vlm = tiny_vlm_factory("tiny-qwen2.5-vl")
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())
    with tokcomp.compress(model, vision="random(keep_ratio=0.5)"), torch.no_grad():
        ref = model(**inputs).logits
        enc = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        kw = {k: v for k, v in inputs.items() if k != "pixel_values"}
        out = model(**kw, mm_encoder_outputs={"image": enc}).logits
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ video
def _frames_as_images_inputs(vinputs):
    """The video's vision input as separate still frames: same patch rows, grid (1, h, w) per frame."""
    t, h, w = vinputs["video_grid_thw"][0].tolist()
    return vinputs["pixel_values_videos"], torch.tensor([[1, h, w]] * t)


def test_video_frames_are_separate_segments(vlm):
    """Inside the session, a video's tower output equals that of its frames given as separate images (each
    frame its own segment, same random choice per segment), and dropped units are zero rows."""
    model = vlm.model
    vin = make_video_inputs(vlm, frames=4, size=(56, 84))
    pv, grid_frames = _frames_as_images_inputs(vin)
    with tokcomp.compress(model, vision="random(keep_ratio=0.5)") as s, torch.no_grad():
        video = model.model.get_video_features(vin["pixel_values_videos"], vin["video_grid_thw"]).pooler_output
        frames = model.model.get_image_features(pv, grid_frames).pooler_output
        kept = s.adapter._results[0].kept
    video, frames = torch.cat(video), torch.cat(frames)
    assert torch.allclose(video, frames, atol=1e-5, rtol=0)
    assert int(kept.sum()) == kept.numel() // 2
    assert bool((video[~kept] == 0).all()) and bool((video[kept].abs().sum(-1) > 0).all())
    assert s.report.vision[0].vision_blocks[0] == 2 * 4 * 6 // 2


@pytest.mark.parametrize("spec", ["random(keep_ratio=0.5)+random(keep_ratio=0.5)", "pool(keep_ratio=0.5)+none"])
def test_video_and_images_in_a_batch(vlm, spec):
    """A video row (pixel_values_videos + video_grid_thw, built without torchvision) next to an image row and a
    text row: cached decoding equals recompute, and every row equals itself alone."""
    video = Video(procedural_video(4, 56, 56, seed=1))
    ims = default_images()
    prompts = [[ims[0], video], [ims[3]], None]
    inv.check_cached_decoding_matches_recompute(vlm, spec, prompts)
    inv.check_rows_match_alone(vlm, spec, prompts)


# ------------------------------------------------------------------------------------------------ refusals
class _NeedsRows(ViTCompressor):
    name = "needs_rows_test"
    granularity = "unit"
    needs_attention_rows = True


class _TokenGranularity(ViTCompressor):
    name = "token_gran_test"
    granularity = "token"


class _NotFlash(ViTCompressor):
    name = "not_flash_test"
    flash_compatible = False


def test_unmet_needs_refused_before_any_forward(tiny_vlm_factory):
    model = tiny_vlm_factory("tiny-qwen2-vl").model
    hooks = inv.hook_count(model)
    with pytest.raises(AdapterError, match="attention rows"):
        tokcomp.compress(model, vision=_NeedsRows(keep_ratio=0.5))
    with pytest.raises(AdapterError, match="granularity"):
        tokcomp.compress(model, vision=_TokenGranularity(keep_ratio=0.5))
    assert inv.hook_count(model) == hooks


def test_non_flash_strategy_refused_under_flash_vision(tiny_vlm_factory):
    model = tiny_vlm_factory("tiny-qwen2-vl", fresh=True).model
    cfg = model.config.vision_config
    hf.set_config_attn(cfg, "flash_attention_2")   # only the name is read by check(); no kernel is loaded
    with pytest.raises(AdapterError, match="flash"):
        tokcomp.compress(model, vision=_NotFlash(keep_ratio=0.5))


def test_adapter_resolution_and_depths(tiny_vlm_factory):
    from tokcomp.registry import default_registry
    for name in MODELS:
        model = tiny_vlm_factory(name).model
        cls = default_registry().resolve_adapter(model)
        assert cls.name == "qwen2_vl" and cls.supports(model)
        assert cls(model).depths() == {"vision": 4, "llm": 4}
    assert not cls.supports(tiny_vlm_factory("tiny-internvl").model)


def test_bypassing_the_top_level_model_is_refused(tiny_vlm_factory):
    """model.model(...) with pixels under a unit strategy would feed zero vectors for dropped units: refused."""
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    inputs = make_inputs(vlm, inv.default_prompts())
    with tokcomp.compress(vlm.model, vision="random(keep_ratio=0.5)"):
        with pytest.raises(AdapterError, match="model.model"):
            vlm.model.model(**inputs)


def test_new_images_on_a_filled_cache_are_refused(tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    model = vlm.model
    inputs = make_inputs(vlm, [default_images()[3]])
    with tokcomp.compress(model, vision="random(keep_ratio=0.5)"), torch.no_grad():
        cache = hf.output_cache(model(**inputs, use_cache=True))
        with pytest.raises(AdapterError, match="non-empty cache"):
            model(**inputs, **hf.cache_kwargs(cache))


@pytest.mark.parametrize("name", MODELS)
def test_beam_search_with_expanded_features(tiny_vlm_factory, name):
    """generate() expands the encoder outputs for beams / num_return_sequences (the same split views repeated):
    keep 1.0 is still identical, and at 0.5 every row's beams equal the row's own beam search."""
    vlm = tiny_vlm_factory(name)
    model = vlm.model
    prompts = inv.default_prompts()
    inputs = make_inputs(vlm, prompts)
    kw = dict(max_new_tokens=3, min_new_tokens=3, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with tokcomp.compress(model, "random(keep_ratio=1.0)+random(keep_ratio=1.0)"):
            assert torch.equal(model.generate(**inputs, **kw), ref)
        with tokcomp.compress(model, "random(keep_ratio=0.5)+random(keep_ratio=0.5)"):
            out = model.generate(**inputs, **kw)[:, -3:]
            for b, p in enumerate(prompts):
                alone = model.generate(**make_inputs(vlm, [p]), **kw)[:, -3:]
                assert torch.equal(out[2 * b:2 * b + 2], alone)


def test_labels_follow_the_repacked_prompt(tiny_vlm_factory):
    """Training-style forward: labels are gathered with the prompt (dropped placeholders removed)."""
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss
        with tokcomp.compress(model, vision="random(keep_ratio=1.0)"):
            assert torch.equal(model(**inputs, labels=labels).loss, ref)
        seen, h = _capture_lm_inputs(model)
        try:
            with tokcomp.compress(model, vision="random(keep_ratio=0.5)"):
                out = model(**inputs, labels=labels)
        finally:
            h.remove()
    assert torch.isfinite(out.loss) and out.logits.shape[1] == seen[0]["inputs_embeds"].shape[1] < labels.shape[1]
