"""The serving contract (tokcomp.serving) against what the transformers path achieves.

For every VLM preset, many image sizes and many vision specs: the number of LLM tokens the contract predicts from
the grid an engine computes before encoding (vLLM's arithmetic, ``vllm_replica``) equals the number the session
achieves; the kept tokens sit at the positions the contract gives for the encoder's keep mask, which are their
positions in the unmodified prompt; the text after an image keeps its unmodified positions.
"""
from __future__ import annotations

import functools

import pytest
import torch
import vllm_replica as vllm

import tokcomp
from tokcomp import serving
from tokcomp.errors import ConfigError
from tokcomp.testing import build_model, procedural_image

PRESETS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-internvl", "tiny-llava")
SPECS = ("none", "ipcv(keep_ratio=0.35,prune_layer=1,stabilize_layers=1)", "random(keep_ratio=0.5)+none",
         "random(num_tokens=3)+dart",
         "pool(keep_ratio=0.25)", "pool(keep_ratio=0.5)", "pool(num_tokens=3)", "dart_vit(keep_ratio=0.3)",
         "tome(keep_ratio=0.3)", "tome(keep_ratio=0.5,start_layer=2,schedule=decreasing)", "tofu(keep_ratio=0.4)",
         "luvc_oim(keep_ratio=0.25)", "luvc_oim(num_tokens=5)", "pool(keep_ratio=1.0)")
#: (height, width): squares, wide, tall, tiny, above the tiny Qwen processor's max_pixels, odd sides
SIZES = ((56, 56), (28, 300), (300, 28), (100, 300), (333, 77), (500, 500), (90, 90), (61, 203), (250, 140))


@functools.lru_cache(maxsize=None)
def _vlm(preset):
    return build_model(preset)


def _inputs(vlm, images):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what is in this picture?"}]
    text = vlm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    return vlm.processor(text=[text], images=list(images), return_tensors="pt")


def engine_grid(vlm, height: int, width: int) -> tuple[int, int, int]:
    """The unit grid of an image as a serving engine computes it before encoding (vLLM's arithmetic)."""
    cfg = vlm.model.config
    if vlm.family == "qwen2_vl":
        ip = vlm.processor.image_processor
        lo, hi = vllm.qwen_pixel_bounds(ip)
        thw = vllm.qwen_grid_thw(height, width, patch=ip.patch_size, merge=ip.merge_size,
                                 temporal_patch=ip.temporal_patch_size, min_pixels=lo, max_pixels=hi)
        return serving.qwen_unit_grid(thw, ip.merge_size)
    if vlm.family == "internvl":
        tiles = vlm.processor.image_processor.get_number_of_image_patches(height, width, {})
        return serving.internvl_unit_grid(tiles, cfg.image_seq_length)
    return serving.llava_unit_grid(cfg.vision_config.image_size, cfg.vision_config.patch_size)


def _run(vlm, spec, images):
    """``(session, vision results, position_ids entering the LLM)`` of one forward under ``spec``."""
    model = vlm.model
    session = tokcomp.compress(model, spec)
    results, positions = [], []
    done = session.adapter.vision_done
    session.adapter.vision_done = lambda r: (results.append(r), done(r))     # the encoder's keep masks

    def grab(mod, args, kw):
        positions.append(kw.get("position_ids"))
    handle = session.adapter.lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with session, torch.inference_mode():
            model(**_inputs(vlm, images))
    finally:
        handle.remove()
    return session, results, positions[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_engine_count_is_the_achieved_count(preset):
    vlm = _vlm(preset)
    depth = serving.vision_depth(vlm.model.config)
    for h, w in SIZES:
        img = procedural_image(h, w, "noise", seed=h * w)
        grid = engine_grid(vlm, h, w)
        for spec in SPECS:
            session, _, _ = _run(vlm, spec, [img])
            assert session.report.prefill[0].vision_out == [serving.llm_tokens(spec, grid, vision_depth=depth)], \
                (preset, (h, w), grid, spec)


@pytest.mark.parametrize("preset", PRESETS)
def test_counts_per_image_with_several_images_in_one_prompt(preset):
    vlm = _vlm(preset)
    depth = serving.vision_depth(vlm.model.config)
    sizes = ((100, 300), (56, 56), (333, 77))
    images = [procedural_image(h, w, "shapes", seed=i) for i, (h, w) in enumerate(sizes)]
    for spec in ("pool(keep_ratio=0.25)", "tome(keep_ratio=0.3)", "luvc_oim(keep_ratio=0.25)"):
        session, _, _ = _run(vlm, spec, images)
        want = [serving.llm_tokens(spec, engine_grid(vlm, h, w), vision_depth=depth) for h, w in sizes]
        assert session.report.prefill[0].vision_out == want, (preset, spec)


def _columns(pos, qwen: bool) -> list:
    """Positions of row 0 entering the LLM as hashable columns (Qwen: the (t, h, w) rows; else ints)."""
    if qwen:
        return [tuple(c) for c in pos[-3:, 0].T.tolist()]          # 5.x may prepend a text-position row
    return pos[0].tolist()


def _kept_mask(results) -> torch.Tensor:
    kept = results[-1].kept
    return kept if kept is not None else torch.ones(sum(results[-1].sizes), dtype=torch.bool)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("spec", ["random(keep_ratio=0.5)+none", "pool(keep_ratio=0.25)", "tome(keep_ratio=0.3)",
                                  "luvc_oim(keep_ratio=0.25)", "dart_vit(keep_ratio=0.3)"])
def test_kept_tokens_sit_where_the_contract_says(preset, spec):
    vlm = _vlm(preset)
    qwen = vlm.family == "qwen2_vl"
    for h, w in ((100, 300), (333, 77), (140, 140)):
        img = procedural_image(h, w, "checker", seed=w)
        grid = engine_grid(vlm, h, w)
        ids = _inputs(vlm, [img])["input_ids"][0]
        visual = ids == vlm.model.config.image_token_id
        first = int(visual.nonzero()[0])
        _, _, full_pos = _run(vlm, "none", [img])
        full = _columns(full_pos, qwen) if full_pos is not None else list(range(ids.numel()))
        start = full[first][0] if qwen else full[first]

        _, results, pos = _run(vlm, spec, [img])
        kept = _kept_mask(results)
        got = _columns(pos, qwen)
        n_kept = serving.llm_tokens(spec, grid, vision_depth=serving.vision_depth(vlm.model.config))
        assert int(kept.sum()) == n_kept
        text = [c for c, v in zip(full, visual.tolist()) if not v]
        vis = got[first:first + n_kept]
        assert got[:first] + got[first + n_kept:] == text                 # text kept, at unmodified positions
        if qwen:
            assert [tuple(c) for c in serving.mrope_positions(grid, None, start).T.tolist()] == \
                [c for c, v in zip(full, visual.tolist()) if v]          # the contract's arithmetic is HF's
            assert vis == [tuple(c) for c in serving.mrope_positions(grid, kept, start).T.tolist()]
            after = full[first + int(visual.sum())]
            assert after == (serving.text_after(grid, start),) * 3
        else:
            assert vis == (serving.kept_offsets(grid, kept) + start).tolist()
            assert full[first:first + int(visual.sum())] == list(range(start, start + grid[0] * grid[1] * grid[2]))
        p = serving.kept_positions(grid, kept)
        assert p.shape == (n_kept, 3) and bool((p[:, 1] < grid[1]).all()) and bool((p[:, 2] < grid[2]).all())


def test_the_replica_of_vllms_resize_gives_the_processors_grids():
    """vLLM's Qwen arithmetic (rewritten) against the transformers processor, tiny and real pixel bounds."""
    from transformers import Qwen2VLImageProcessorPil
    sizes = [(h, w) for h in (14, 28, 29, 55, 56, 57, 111, 224, 480, 719, 1080, 2048)
             for w in (28, 61, 224, 640, 1920)]
    for ip in (_vlm("tiny-qwen2-vl").processor.image_processor, Qwen2VLImageProcessorPil()):
        lo, hi = vllm.qwen_pixel_bounds(ip)
        for h, w in sizes:
            img = procedural_image(h, w, "gradient", seed=0)
            got = ip(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
            want = vllm.qwen_grid_thw(h, w, patch=ip.patch_size, merge=ip.merge_size,
                                      temporal_patch=ip.temporal_patch_size, min_pixels=lo, max_pixels=hi)
            assert tuple(got) == want, (h, w, hi)
            assert vllm.qwen_placeholders(want, ip.merge_size) == \
                serving.llm_tokens("none", serving.qwen_unit_grid(want, ip.merge_size))


def test_internvl_tiles_the_engine_asks_for_are_the_processors():
    vlm = _vlm("tiny-internvl")
    ip = vlm.processor.image_processor
    for h, w in SIZES + ((20, 400), (400, 20), (57, 113)):
        img = procedural_image(h, w, "gradient", seed=1)
        assert ip(images=[img], return_tensors="pt")["pixel_values"].shape[0] == \
            ip.get_number_of_image_patches(h, w, {}), (h, w)


@pytest.mark.parametrize("preset", PRESETS)
def test_vision_depth_from_the_config_is_the_adapters(preset):
    model = _vlm(preset).model
    adapter = tokcomp.default_registry().resolve_adapter(model)(model)
    assert serving.vision_depth(model.config) == adapter.depths()["vision"]


def test_a_strategy_without_a_budget_known_in_advance_is_refused_and_one_with_a_rule_is_used():
    from tokcomp.plugins.baselines import Pool
    with pytest.raises(ConfigError, match="units_per_segment"):
        serving.llm_tokens("l2norm(keep_ratio=0.5)", (1, 4, 4))          # the example plugin's compressor
    with pytest.raises(ConfigError, match="vision_depth"):
        serving.llm_tokens("tome(keep_ratio=0.5)", (1, 4, 4))

    class Fixed(Pool):
        def units_per_segment(self, h, w, depth):
            return 7
    assert serving.llm_tokens(Fixed(keep_ratio=0.5), (3, 4, 4)) == 21
    assert serving.llm_tokens("ipcv(keep_ratio=0.2)+dart", (2, 5, 6)) == 60          # patch granularity: full grid
    assert serving.llm_tokens(None, (1, 3, 3)) == 9


def test_positions_of_a_video_item():
    grid = (3, 2, 2)
    kept = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    assert serving.kept_positions(grid, kept).tolist() == [[0, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0],
                                                           [2, 0, 0], [2, 0, 1], [2, 1, 0], [2, 1, 1]]
    assert serving.mrope_positions(grid, kept, start=10, t_scale=2.0)[0].tolist() == [10, 10, 12, 12, 14, 14, 14, 14]
    assert serving.text_after(grid, 10) == 12 and serving.text_after((1, 3, 5), 10) == 15
    with pytest.raises(ValueError, match="bool mask"):
        serving.kept_positions(grid, torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_a_video_counts_per_frame_and_keeps_its_time_positions(preset):
    """Every temporal frame is a segment with its own budget; Qwen2.5-VL scales t by tokens_per_second *
    second_per_grid_t, and the kept tokens keep those positions."""
    from tokcomp.testing import make_video_inputs
    vlm = _vlm(preset)
    model, cfg = vlm.model, vlm.model.config
    ip = vlm.processor.image_processor
    depth = serving.vision_depth(cfg)
    for frames, (h, w), fps in ((6, (84, 140), 2.0), (4, (112, 56), 1.0)):
        inputs = make_video_inputs(vlm, frames=frames, size=(h, w), fps=fps)
        lo, hi = vllm.qwen_pixel_bounds(ip)
        thw = vllm.qwen_grid_thw(h, w, patch=ip.patch_size, merge=ip.merge_size,
                                 temporal_patch=ip.temporal_patch_size, min_pixels=lo, max_pixels=hi, frames=frames)
        assert tuple(inputs["video_grid_thw"][0].tolist()) == thw
        grid = serving.qwen_unit_grid(thw, ip.merge_size)
        scale = float(inputs["second_per_grid_ts"][0]) * cfg.vision_config.tokens_per_second \
            if "second_per_grid_ts" in inputs else 1.0
        ids = inputs["input_ids"][0]
        first = int((ids == cfg.video_token_id).nonzero()[0])
        for spec in ("pool(keep_ratio=0.25)", "random(keep_ratio=0.5)+none", "tome(keep_ratio=0.4)"):
            session = tokcomp.compress(model, spec)
            results, positions = [], []
            done = session.adapter.vision_done
            session.adapter.vision_done = lambda r: (results.append(r), done(r))
            handle = session.adapter.lm.register_forward_pre_hook(
                lambda m, a, kw: positions.append(kw.get("position_ids")), with_kwargs=True)
            try:
                with session, torch.inference_mode():
                    model(**inputs)
            finally:
                handle.remove()
            n = serving.llm_tokens(spec, grid, vision_depth=depth)
            assert session.report.prefill[0].vision_out == [n]
            per = serving.llm_tokens_per_segment(spec, grid, vision_depth=depth)
            kept = _kept_mask(results)
            assert kept.reshape(grid[0], -1).sum(1).tolist() == per                     # each frame its own budget
            got = _columns(positions[0], True)
            start = got[first - 1][0] + 1
            want = serving.mrope_positions(grid, kept, start, scale).T.tolist()
            assert got[first:first + n] == [tuple(c) for c in want]
            assert got[first + n] == (serving.text_after(grid, start),) * 3
