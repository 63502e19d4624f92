"""The llava adapter on tiny random LLaVA models (CLIP with features of layer -2, as LLaVA-1.5; SigLIP without CLS;
DINOv2 with layer -1, as the real-weights tiny LLaVA). The shared invariant matrix runs on ``tiny-llava`` through
tests/plugins/*; here: what is LLaVA's own.

Truths: the unmodified model (keep 1.0, features of untouched patches), the prompt's own placeholders and
positions, the same row alone, a no-cache recompute."""
from __future__ import annotations

import pytest
import torch

import tokcomp
from tokcomp.errors import AdapterError
from tokcomp.strategy import ViTCompressor
from tokcomp.testing import default_images, make_inputs
from tokcomp.testing import invariants as inv

TOWERS = {"clip": -2, "siglip": -1, "dinov2": -1}


@pytest.fixture(params=sorted(TOWERS))
def vlm(request, tiny_vlm_factory):
    return tiny_vlm_factory("tiny-llava", llava_tower=request.param, vision_feature_layer=TOWERS[request.param])


def test_resolution_and_depth_up_to_the_feature_layer(tiny_vlm_factory):
    for layer, depth in ((-2, 3), (-1, 4), (2, 2)):
        model = tiny_vlm_factory("tiny-llava", vision_feature_layer=layer).model
        s = tokcomp.compress(model, "ipcv(keep_ratio=0.5,prune_layer=1)+fastv")
        assert s.adapter.name == "llava" and s.adapter.depths() == {"vision": depth, "llm": 4}


def test_keep_one_is_identity_and_every_tower_keeps_the_invariants(vlm):
    inv.check_keep_one_is_identity(vlm, "tome(keep_ratio=1.0)+dart(keep_ratio=1.0)")
    spec = "tome(keep_ratio=0.5)+dart(keep_ratio=0.5)"
    inv.check_restores_model(vlm, spec)
    inv.check_rows_match_alone(vlm, spec)
    inv.check_cached_decoding_matches_recompute(vlm, "pool(keep_ratio=0.5)+v2drop(keep_ratio=0.5)")


def test_features_of_kept_patches_are_exact_and_dropped_ones_never_projected(vlm):
    """Dropping after the last driven block: the kept patches' features equal the unmodified model's exactly, the
    dropped ones are zero rows, and the projector ran on the kept patches only."""
    model = vlm.model
    inputs = make_inputs(vlm, [default_images()[0], default_images()[2]])
    px = inputs["pixel_values"]
    with torch.no_grad():
        ref = torch.cat(list(model.model.get_image_features(pixel_values=px).pooler_output))   # also installs capture
    depth = tokcomp.compress(model, "none").adapter.depths()["vision"]
    rows = []
    with tokcomp.compress(model, vision=f"random(keep_ratio=0.5,layer={depth - 1})") as s, torch.no_grad():
        # registered after the session's own pre-hook, so it sees what the projector really receives
        h = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape))
        try:
            got = torch.cat(list(model.model.get_image_features(pixel_values=px).pooler_output))
        finally:
            h.remove()
        kept = s.adapter._results[-1].kept
    assert kept is not None and int(kept.sum()) == kept.numel() // 2
    assert torch.equal(got[kept], ref[kept]) and bool((got[~kept] == 0).all())
    assert rows[-1][:-1] == (1, int(kept.sum()))


def test_the_llm_gets_fewer_placeholders_at_their_original_positions(vlm):
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())          # 1 image | 2 images | text only, left padded
    seen = []
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        with tokcomp.compress(model, vision="random(keep_ratio=0.5)") as s, torch.no_grad():
            model(**inputs)
            kept = s.adapter._results[-1].kept
    finally:
        h.remove()
    am = inputs["attention_mask"]
    full_pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    vis = inputs["input_ids"] == model.config.image_token_id
    keep = am.bool().clone()
    keep[vis] = kept.to(keep.device)
    pos, mask = seen[0]["position_ids"], seen[0]["attention_mask"]
    assert seen[0]["inputs_embeds"].shape[1] == int(keep.sum(1).max()) < inputs["input_ids"].shape[1]
    for b in range(keep.shape[0]):
        n = int(keep[b].sum())
        assert torch.equal(pos[b, -n:], full_pos[b, keep[b]])               # original (gappy) 1-D positions
        assert mask[b, -n:].all() and not mask[b, :-n].any()                # left padding
    assert s.report.last.llm_in == (vis & keep).sum(1).tolist()
    assert s.report.last.vision_out == kept.view(inputs["pixel_values"].shape[0], -1).sum(1).tolist()


class _TokenGranularity(ViTCompressor):
    name = "token_test"
    granularity = "token"


def test_refusals_before_any_forward(tiny_vlm_factory):
    model = tiny_vlm_factory("tiny-llava", fresh=True).model
    before = inv.model_state(model)
    with pytest.raises(AdapterError, match="granularity"):
        tokcomp.compress(model, vision=_TokenGranularity(keep_ratio=0.5))
    model.config.vision_feature_layer = [-2, -1]                          # a multi-layer feature: no single block
    with pytest.raises(AdapterError, match="vision_feature_layer"):
        tokcomp.compress(model, vision="tome(keep_ratio=0.5)")
    with tokcomp.compress(model, llm="fastv(keep_ratio=0.5)"):              # LLM pruners do not care
        pass
    model.config.vision_feature_layer = -2
    model.config.vision_feature_select_strategy = "full"                   # the CLS would be an LLM token
    with pytest.raises(AdapterError, match="one patch"):
        tokcomp.compress(model, vision="tome(keep_ratio=0.5)")
    model.config.vision_feature_select_strategy = "default"
    assert inv.model_state(model) == before
    inputs = make_inputs(tiny_vlm_factory("tiny-llava"), [default_images()[0]])
    with tokcomp.compress(model, vision="tome(keep_ratio=0.5)"), torch.no_grad():
        with pytest.raises(AdapterError, match="vision_feature_layer"):
            model(**inputs, vision_feature_layer=-1)
    assert inv.model_state(model) == before


def test_every_strategy_with_its_paper_defaults_at_llava_1_5_depths(tiny_vlm_factory):
    """LLaVA-1.5 depths at tiny widths (CLIP-L: 24 layers, features of layer -2; Vicuna-7B: 32 layers): every
    registered strategy with its DEFAULT config (the paper's layers and budget) prunes, and the session restores."""
    from tokcomp.testing import matrix
    vlm = tiny_vlm_factory("tiny-llava", vision_layers=24, text_layers=32)
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())
    with torch.no_grad():
        model(**inputs)                            # transformers installs its output-capture hooks on first use
    before = inv.model_state(model)
    for cls in matrix.strategies("vision", "tiny-llava") + matrix.strategies("llm", "tiny-llava"):
        try:
            strategy = cls()                                        # the paper's defaults
        except tokcomp.ConfigError:
            strategy = cls(keep_ratio=0.5)                          # baselines have no default budget
        spec = strategy.spec
        with tokcomp.compress(model, **{cls.stage: strategy}) as s, torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        rec = s.report.last
        changed = (rec.vision_blocks[22] < rec.vision_in if cls.granularity == "patch" else
                   sum(rec.vision_out) < 3 * 36 or max(rec.llm_layers[31]) < max(rec.llm_layers[0]))
        assert changed or cls.name in ("dart_vit", "pool", "l2norm"), (spec, rec.vision_blocks, rec.llm_layers[31])
    assert inv.model_state(model) == before
