"""Tests of tokcomp.testing: offline tokenizers, tiny model presets, procedural images and input builders."""

import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)

from tokcomp.adapters import _hf as hf  # noqa: E402
from tokcomp.testing import (  # noqa: E402
    MODEL_PRESETS,
    Video,
    build_config,
    build_internvl_tokenizer,
    build_model,
    build_qwen_vl_tokenizer,
    default_images,
    make_inputs,
    make_video_inputs,
    patchify_video,
    procedural_image,
    procedural_video,
)

TINY = ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-internvl"]
QWEN = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def _visual_ids(vlm):
    return [vlm.image_token_id] + ([vlm.video_token_id] if vlm.video_token_id is not None else [])


def _generate(vlm, inputs, n):
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


# ------------------------------------------------------------------------------------------------ tokenizers
def test_tokenizers_specials_padding_and_fresh_objects():
    q, i = build_qwen_vl_tokenizer(), build_internvl_tokenizer()
    assert q is not build_qwen_vl_tokenizer()  # fresh object, cached vocabulary
    for tok, specials in ((q, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]),
                          (i, ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"])):
        assert tok.padding_side == "left"
        for s in specials + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
            tid = tok.convert_tokens_to_ids(s)
            assert tid is not None and tid != tok.unk_token_id or s == "<|endoftext|>"
            assert tok(f"a {s} b")["input_ids"].count(tid) == 1
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
        assert len(tok) == 295
    assert i.context_image_token_id == i.convert_tokens_to_ids("<IMG_CONTEXT>")
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>hi" in q.apply_chat_template(msg, tokenize=False)
    assert i.apply_chat_template(msg, tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------ presets
def test_presets_listed():
    assert set(TINY) | {"tiny-llava", "qwen2-vl-2b-shaped", "internvl3-1b-shaped", "llava-1.5-7b-shaped"} == \
        set(MODEL_PRESETS)
    assert MODEL_PRESETS["tiny-llava"].family == "llava"
    assert MODEL_PRESETS["tiny-qwen2.5-vl"].family == "qwen2_vl"
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("no-such-model")
    with pytest.raises(TypeError, match="unknown override"):
        build_config("tiny-qwen2-vl", hidden=3)


@pytest.mark.parametrize("name", TINY)
def test_build_and_forward(tiny_vlm_factory, procedural_images, name):
    vlm = tiny_vlm_factory(name)
    cfg, tok = vlm.model.config, vlm.tokenizer
    assert not vlm.model.training
    assert hf.attn_impl(cfg.get_text_config()) == "sdpa"
    assert hf.attn_impl(cfg.vision_config) == "sdpa"
    if vlm.family == "qwen2_vl":
        for key, s in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
            assert getattr(cfg, key) == tok.convert_tokens_to_ids(s)
        assert len(vlm.model.model.visual.blocks) == 4
    else:
        assert cfg.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        assert cfg.image_seq_length == 4 and len(vlm.model.model.vision_tower.encoder.layer) == 4
        assert not cfg.tie_word_embeddings
    assert len(vlm.model.model.language_model.layers) == 4
    inputs = make_inputs(vlm, [procedural_images[0]])
    with torch.no_grad():
        logits = vlm.model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_qwen2_5_window_and_full_blocks():
    cfg = build_config("tiny-qwen2.5-vl")
    assert list(cfg.vision_config.fullatt_block_indexes) == [1, 3] and cfg.vision_config.window_size == 56
    deep = build_config("tiny-qwen2.5-vl", vision_layers=32)
    assert list(deep.vision_config.fullatt_block_indexes) == [7, 15, 23, 31]


@pytest.mark.parametrize("name", TINY)
def test_generate_deterministic_and_not_degenerate(procedural_images, name):
    a, b = build_model(name, seed=0), build_model(name, seed=0)
    inputs = make_inputs(a, [procedural_images[1]])
    ga, gb = _generate(a, inputs, 6), _generate(b, inputs, 6)
    assert ga.shape == (1, 6) and torch.equal(ga, gb)
    g8 = _generate(a, inputs, 8)[0].tolist()
    assert len(set(g8)) >= 3, g8
    assert not set(g8) & set(a.model.generation_config.suppress_tokens)  # no placeholder tokens generated
    other = build_model(name, seed=1)
    w = lambda m: m.model.lm_head.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(other))


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("tiny-qwen2-vl", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY)
def test_batch_left_padded_matches_single_rows(tiny_vlm_factory, procedural_images, name):
    vlm = tiny_vlm_factory(name)
    rows = [procedural_images[0], procedural_images[1]]  # 112x84 and 56x112: different token counts
    batch = make_inputs(vlm, rows)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and mask[:, -1].all() and not mask[1, 0]  # shorter row padded on the left
    with torch.no_grad():
        last = vlm.model(**batch).logits[:, -1]
        for r, img in enumerate(rows):
            single = vlm.model(**make_inputs(vlm, [img])).logits[0, -1]
            torch.testing.assert_close(last[r], single, atol=1e-4, rtol=1e-4)
    assert _generate(vlm, batch, 4).shape == (2, 4)


@pytest.mark.parametrize("name", TINY)
def test_two_images_one_prompt_and_text_only(tiny_vlm_factory, procedural_images, name):
    vlm = tiny_vlm_factory(name)
    one = [make_inputs(vlm, [im]) for im in procedural_images[:2]]
    per_image = [int((x["input_ids"] == vlm.image_token_id).sum()) for x in one]
    both = make_inputs(vlm, [procedural_images[:2], None], ["two images", "no image"])
    counts = (both["input_ids"] == vlm.image_token_id).sum(1).tolist()
    assert counts == [sum(per_image), 0]
    assert _generate(vlm, both, 3).shape == (2, 3)
    text_only = make_inputs(vlm, [None])
    assert "pixel_values" not in text_only
    assert _generate(vlm, text_only, 3).shape == (1, 3)


@pytest.mark.parametrize("name", TINY)
def test_eager_matches_sdpa(tiny_vlm_factory, procedural_images, name):
    sdpa, eager = tiny_vlm_factory(name), tiny_vlm_factory(name, attn="eager")
    assert hf.attn_impl(eager.model.config.get_text_config()) == "eager"
    assert hf.attn_impl(eager.model.config.vision_config) == "eager"
    inputs = make_inputs(sdpa, [procedural_images[0], None])
    real = inputs["attention_mask"].bool()  # padded positions attend to nothing: backends differ there
    with torch.no_grad():
        torch.testing.assert_close(eager.model(**inputs).logits[real], sdpa.model(**inputs).logits[real],
                                   atol=1e-4, rtol=1e-4)


def test_default_image_token_counts(tiny_qwen2_vl, tiny_internvl, procedural_images):
    q = [int((make_inputs(tiny_qwen2_vl, [im])["input_ids"] == tiny_qwen2_vl.image_token_id).sum())
         for im in procedural_images]
    i = [int((make_inputs(tiny_internvl, [im])["input_ids"] == tiny_internvl.image_token_id).sum())
         for im in procedural_images]
    assert q == [12, 8, 9, 4]
    assert i == [20, 12, 20, 4]


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_build(procedural_images, name):
    vlm = build_model(name, dtype=torch.bfloat16)
    assert vlm.model.dtype == torch.bfloat16 and repr(vlm) == f"TinyVLM(family='{vlm.family}', name='{name}')"
    inputs = make_inputs(vlm, [procedural_images[3], None])
    assert _generate(vlm, inputs, 2).shape == (2, 2)


# ------------------------------------------------------------------------------------------------ InternVL tiles
@pytest.mark.parametrize("hw, tiles", [((56, 56), 1), ((56, 112), 3), ((112, 56), 3), ((112, 84), 5)])
def test_internvl_tiles_and_thumbnail(tiny_internvl, hw, tiles):
    vlm = tiny_internvl
    img = procedural_image(*hw, kind="shapes", seed=5)
    inputs = make_inputs(vlm, [img])
    assert inputs["pixel_values"].shape == (tiles, 3, 56, 56)  # grid tiles + thumbnail when grid > 1 tile
    ids = inputs["input_ids"][0]
    assert int((ids == vlm.image_token_id).sum()) == 4 * tiles
    tok = vlm.tokenizer
    assert int((ids == tok.start_image_token_id).sum()) == 1 and int((ids == tok.end_image_token_id).sum()) == 1
    assert vlm.processor.image_processor.get_number_of_image_patches(*hw, {}) == tiles
    with torch.no_grad():
        vlm.model(**inputs)


# ------------------------------------------------------------------------------------------------ video
def test_patchify_video_matches_image_processor_order(tiny_qwen2_vl):
    ip = tiny_qwen2_vl.processor.image_processor
    a, b = procedural_image(56, 84, "shapes", seed=1), procedural_image(56, 84, "checker", seed=2)
    ref_a, ref_b = (ip(images=[x], return_tensors="pt")["pixel_values"] for x in (a, b))
    pv, grid = patchify_video([a, a], ip)  # a still frame pair == the image's patches
    assert grid == [1, 4, 6]
    torch.testing.assert_close(pv, ref_a, atol=1e-5, rtol=0)
    pv, grid = patchify_video([a, a, b], ip)  # odd count: last frame repeated; temporal pairs in order
    assert grid == [2, 4, 6] and pv.shape == (48, 1176)
    torch.testing.assert_close(pv[:24], ref_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(pv[24:], ref_b, atol=1e-5, rtol=0)
    big = procedural_image(100, 130, "shapes", seed=3)  # resized by smart_resize like images
    pv, grid = patchify_video([big, big], ip)
    torch.testing.assert_close(pv, ip(images=[big], return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", QWEN)
def test_video_inputs_forward_and_generate(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    inputs = make_video_inputs(vlm, frames=4, size=(56, 56))
    assert inputs["pixel_values_videos"].shape == (2 * 4 * 4, 1176)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    assert int((ids == vlm.video_token_id).sum()) == 8
    assert torch.equal(types == 2, ids == vlm.video_token_id) and not (types == 1).any()
    assert ("second_per_grid_ts" in inputs) == (name == "tiny-qwen2.5-vl")
    with torch.no_grad():
        logits = vlm.model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert _generate(vlm, inputs, 4).shape == (1, 4)


@pytest.mark.parametrize("name", QWEN)
def test_mixed_image_and_video_batch(tiny_vlm_factory, procedural_images, name):
    vlm = tiny_vlm_factory(name)
    video = Video(procedural_video(3, 56, 84, seed=1))  # 3 frames -> t=2 (last repeated), 4x6 patches
    inputs = make_inputs(vlm, [[procedural_images[1], video], procedural_images[0], None])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]
    types = inputs["mm_token_type_ids"]
    assert (types == 2).sum(1).tolist() == [12, 0, 0] and (types == 1).sum(1).tolist() == [8, 12, 0]
    assert _generate(vlm, inputs, 3).shape == (3, 3)
    single = make_video_inputs(vlm, frames=2, images=[procedural_images[3]])
    assert (single["mm_token_type_ids"] == 1).sum() == 4 and (single["mm_token_type_ids"] == 2).sum() == 4
    with torch.no_grad():
        vlm.model(**single)


def test_video_rejected_for_internvl(tiny_internvl):
    with pytest.raises(NotImplementedError):
        make_video_inputs(tiny_internvl)


# ------------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-internvl"])
def test_real_depth_tiny_width_forward(procedural_images, name):
    vlm = build_model(name, vision_layers=32, text_layers=28)
    lm = vlm.model.model.language_model
    vis = vlm.model.model.visual.blocks if vlm.family == "qwen2_vl" else vlm.model.model.vision_tower.encoder.layer
    assert len(vis) == 32 and len(lm.layers) == 28
    with torch.no_grad():
        assert torch.isfinite(vlm.model(**make_inputs(vlm, [procedural_images[3]])).logits).all()


def test_width_override_keeps_heads_valid(procedural_images):
    cfg = build_config("tiny-qwen2-vl", width=96)
    t, v = cfg.get_text_config(), cfg.vision_config
    assert (t.hidden_size, v.embed_dim, v.hidden_size) == (96, 96, 96)
    head_dim = t.hidden_size // t.num_attention_heads
    assert sum(t.rope_parameters["mrope_section"]) == head_dim // 2
    assert (v.embed_dim // v.num_heads) % 4 == 0
    vlm = build_model("tiny-qwen2.5-vl", width=48)
    with torch.no_grad():
        vlm.model(**make_inputs(vlm, [procedural_images[3]]))


# ------------------------------------------------------------------------------------------------ real shapes
def test_qwen2_vl_2b_shaped_config_and_meta_build():
    cfg = build_config("qwen2-vl-2b-shaped")
    v, t = cfg.vision_config, cfg.get_text_config()
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.hidden_size) == (32, 1280, 16, 4, 1536)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size) == (1536, 28, 12, 2, 8960)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    vlm = build_model("qwen2-vl-2b-shaped", device="meta")  # no memory allocated
    assert vlm.model.device.type == "meta"
    n = sum(p.numel() for p in vlm.model.parameters())
    assert 1.9e9 < n < 2.1e9  # ~2.0B without the 151k-token vocabulary


def test_internvl3_1b_shaped_config_and_meta_build():
    cfg = build_config("internvl3-1b-shaped")
    v, t = cfg.vision_config, cfg.get_text_config()
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert tuple(v.image_size) == (448, 448) and tuple(v.patch_size) == (14, 14)
    assert v.norm_type == "layer_norm" and not v.use_qk_norm
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size) == (896, 24, 14, 2, 4864)
    assert cfg.image_seq_length == 256 and cfg.downsample_ratio == 0.5
    vlm = build_model("internvl3-1b-shaped", device="meta")
    assert vlm.processor.image_processor.max_patches == 12
    assert vlm.processor.image_processor.size["height"] == 448
    n_vision = sum(p.numel() for p in vlm.model.model.vision_tower.parameters())
    assert 2.9e8 < n_vision < 3.1e8  # InternViT-300M


# ------------------------------------------------------------------------------------------------ images
def test_procedural_images_deterministic():
    for kind in ("shapes", "gradient", "checker", "noise"):
        a, b = procedural_image(30, 40, kind, seed=4), procedural_image(30, 40, kind, seed=4)
        assert a.size == (40, 30) and a.mode == "RGB" and a.tobytes() == b.tobytes()
        assert a.tobytes() != procedural_image(30, 40, kind, seed=5).tobytes()
    with pytest.raises(ValueError):
        procedural_image(10, 10, "plaid")
    frames = procedural_video(4, 56, 56)
    assert len(frames) == 4 and frames[0].tobytes() != frames[1].tobytes()
    assert [im.size for im in default_images()] == [(84, 112), (112, 56), (84, 84), (56, 56)]


# ------------------------------------------------------------------------------------------------ plugin
def test_plugin_fixtures_and_factory_cache(tiny_vlm_factory, tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_internvl):
    assert tiny_vlm_factory("tiny-qwen2-vl") is tiny_qwen2_vl
    assert tiny_qwen2_5_vl.name == "tiny-qwen2.5-vl" and tiny_internvl.family == "internvl"
    assert tiny_vlm_factory("tiny-qwen2-vl", text_layers=2) is tiny_vlm_factory("tiny-qwen2-vl", text_layers=2)
    assert tiny_vlm_factory("tiny-qwen2-vl", fresh=True) is not tiny_qwen2_vl
    assert torch.get_num_threads() == 1


def test_plugin_import_is_lazy():
    code = "import sys, tokcomp.testing.pytest_plugin, tokcomp.testing; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    assert out.stdout.split() == ["False"]
