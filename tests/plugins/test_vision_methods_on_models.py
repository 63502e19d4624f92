"""IPCV, ToMe, ToFu, DART-ViT and LUVC-OIM through the real adapters on the tiny models: the adapter invariant matrix
(keep 1.0 exact no-op, the session restores the model, also after an exception, row b == the prompt alone, cached
decoding == no-cache recompute; several images per prompt, padding, a text-only row; Qwen videos), alone and
composed with the LLM baseline, plus the achieved per-image counts and IPCV's family defaults."""
from __future__ import annotations

import math

import pytest
import torch

import tokcomp
from tokcomp.errors import ConfigError
from tokcomp.plugins.luvc_oim import grid_after, steps_for
from tokcomp.testing import Video, default_images, make_inputs, procedural_video
from tokcomp.testing import invariants as inv
from tokcomp.testing import matrix

torch.set_num_threads(1)

MODELS = matrix.presets()
#: every registered vision compressor with its first example config (the registry is the list)
VISION = {c.name: c for c in matrix.strategies("vision")}
#: the methods whose achieved counts test_report_counts_per_image derives by hand
METHODS = {"ipcv": "ipcv(keep_ratio={r},prune_layer=2)", "tome": "tome(keep_ratio={r})",
           "tofu": "tofu(keep_ratio={r})", "dart_vit": "dart_vit(keep_ratio={r},layer=1)",
           "luvc_oim": "luvc_oim(keep_ratio={r})"}
LLM = "random(keep_ratio=0.5)"


def _spec(method: str, r: float, llm: str | None = None) -> str:
    cls = VISION[method]
    return matrix.spec_part(cls, cls.examples[0], keep_ratio=r) + "+" + (llm or "none")


def _cases(models=None):
    reg = tokcomp.default_registry()
    return [pytest.param(m, name, id=f"{m}-{name}") for name, cls in VISION.items() for m in (models or MODELS)
            if matrix.family(m) in reg.runs_on(cls)]


@pytest.fixture(params=MODELS)
def vlm(request, tiny_vlm_factory):
    return tiny_vlm_factory(request.param)


# ------------------------------------------------------------------------------------------------------
# the invariant matrix
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,method", _cases())
def test_keep_one_is_identity(tiny_vlm_factory, model, method):
    vlm = tiny_vlm_factory(model)
    inv.check_keep_one_is_identity(vlm, _spec(method, 1.0))
    inv.check_keep_one_is_identity(vlm, _spec(method, 1.0, "random(keep_ratio=1.0)"))


@pytest.mark.parametrize("llm", [None, LLM])
@pytest.mark.parametrize("model,method", _cases())
def test_invariants_at_half_budget(tiny_vlm_factory, model, method, llm):
    vlm = tiny_vlm_factory(model)
    spec = _spec(method, 0.5, llm)
    inv.check_restores_model(vlm, spec)
    inv.check_rows_match_alone(vlm, spec)
    inv.check_cached_decoding_matches_recompute(vlm, spec)


@pytest.mark.parametrize("method", list(VISION))
def test_restores_after_exception(tiny_vlm_factory, method):
    inv.check_restores_after_exception(tiny_vlm_factory("tiny-qwen2.5-vl"), _spec(method, 0.5, LLM))


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("method", list(VISION))
def test_video_next_to_images(tiny_vlm_factory, name, method):
    """A video row (each frame its own ViT segment) next to an image row and a text-only row."""
    vlm = tiny_vlm_factory(name)
    prompts = [[default_images()[0], Video(procedural_video(4, 56, 56, seed=1))], [default_images()[3]], None]
    spec = _spec(method, 0.5, LLM)
    inv.check_rows_match_alone(vlm, spec, prompts)
    inv.check_cached_decoding_matches_recompute(vlm, spec, prompts)


# ------------------------------------------------------------------------------------------------------
# achieved counts through the adapters
# ------------------------------------------------------------------------------------------------------
def _keep(n: int, r: float) -> int:
    return max(min(1, n), min(math.floor(n * r + 0.5), n))   # round half up, clamped to [1, n]


def _segments_per_image(vlm, inputs) -> list[list[tuple[int, int]]]:
    """Per image, the unit grid (rows, cols) of each of its ViT segments (Qwen: the image; InternVL: its tiles)."""
    if vlm.family == "qwen2_vl":
        return [[(int(h) // 2, int(w) // 2)] for _, h, w in inputs["image_grid_thw"].tolist()]
    if vlm.family == "llava":                    # one segment per image, one unit per patch
        side = vlm.spec.image_size // vlm.spec.patch_size
        return [[(side, side)] for _ in range(inputs["pixel_values"].shape[0])]
    seq = vlm.spec.image_seq_length
    side = int(round(seq ** 0.5))
    out = []
    for row in inputs["input_ids"].tolist():
        n, spans = 0, []
        for tok in row:
            if tok == vlm.image_token_id:
                n += 1
            elif n:
                spans.append(n)
                n = 0
        out += [[(side, side)] * (k // seq) for k in spans]
    return out


@pytest.mark.parametrize("method,r", [("tome", 0.5), ("tofu", 0.25), ("dart_vit", 0.5), ("luvc_oim", 0.25),
                                      ("luvc_oim", 0.5), ("ipcv", 0.25)])
def test_report_counts_per_image(vlm, method, r):
    inputs = make_inputs(vlm, inv.default_prompts())
    with tokcomp.compress(vlm.model, METHODS[method].format(r=r)) as s, torch.no_grad():
        vlm.model(**inputs)
    rec = s.report.last
    want = []
    for segs in _segments_per_image(vlm, inputs):
        if method == "ipcv":                       # patch granularity: the LLM sees every unit
            want.append(sum(h * w for h, w in segs))
        elif method == "luvc_oim":
            want.append(sum(grid_after(h, w, steps_for(h, w, _keep(h * w, r)))[0]
                            * grid_after(h, w, steps_for(h, w, _keep(h * w, r)))[1] for h, w in segs))
        else:
            want.append(sum(_keep(h * w, r) for h, w in segs))
    assert rec.vision_out == want
    if method == "ipcv":             # inside the tower: top-K patches per segment (+ CLS) after block prune_layer-1
        segs = [seg for image in _segments_per_image(vlm, inputs) for seg in image]
        n_cls = len(segs) if vlm.family in ("internvl", "llava") else 0
        u = 1 if vlm.family == "llava" else 4    # patches per LLM token
        last = s.adapter.depths()["vision"] - 1
        assert rec.vision_in == n_cls + sum(u * h * w for h, w in segs) == rec.vision_blocks[0]
        assert rec.vision_blocks[1] == n_cls + sum(_keep(u * h * w, r) for h, w in segs) == rec.vision_blocks[last]


def test_ipcv_family_defaults_through_the_adapters(tiny_vlm_factory):
    """ctx.family picks the paper defaults: Qwen2-VL prunes before block 3, InternVL3 before block 7."""
    qwen = tiny_vlm_factory("tiny-qwen2-vl")
    inputs = make_inputs(qwen, inv.default_prompts())
    with tokcomp.compress(qwen.model, "ipcv(keep_ratio=0.5)") as s, torch.no_grad():
        qwen.model(**inputs)
    blocks = s.report.last.vision_blocks
    assert blocks[1] == s.report.last.vision_in and blocks[2] < blocks[1]
    deep = tiny_vlm_factory("tiny-internvl", vision_layers=9)
    inputs = make_inputs(deep, inv.default_prompts())
    with tokcomp.compress(deep.model, "ipcv(keep_ratio=0.5)") as s, torch.no_grad():
        deep.model(**inputs)
    blocks = s.report.last.vision_blocks
    assert blocks[5] == s.report.last.vision_in and blocks[6] < blocks[5]
    shallow = tiny_vlm_factory("tiny-internvl")
    inputs = make_inputs(shallow, inv.default_prompts())
    before = inv.model_state(shallow.model)
    with pytest.raises(ConfigError, match="prune_layer=7"):       # refused when the session is built,
        tokcomp.compress(shallow.model, "ipcv(keep_ratio=0.5)")   # before any forward
    assert inv.model_state(shallow.model) == before
