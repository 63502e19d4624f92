"""Inputs users pass that used to fail inside a session: labels with an LLM pruner, two threads on one model,
``copy.deepcopy``, ``tome(prop_attn=false)`` on flash, ``use_cache=False`` with a text-conditioned pruner, DART on a
padded InternVL batch, and every spec form (paths, dicts, booleans, letter case).

Truths: the unmodified model, a hand-computed cross-entropy over the kept positions, the same calls made one after
the other, the same row alone, a fresh prefill of the longer prompt."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tokcomp
from tokcomp.adapters import _hf as hf
from tokcomp.errors import AdapterError, ConfigError, SpecError
from tokcomp.testing import default_images, make_inputs
from tokcomp.testing import invariants as inv


def _labels(inputs):
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


# -- labels and output positions ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-llava"])
def test_labels_with_an_llm_pruner_give_the_loss_over_the_kept_positions(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())
    labels = _labels(inputs)
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss
        with tokcomp.compress(model, "none+fastv(keep_ratio=1.0)"):
            assert torch.equal(model(**inputs, labels=labels).loss, ref)
        with tokcomp.compress(model, "random(keep_ratio=0.5)+fastv(keep_ratio=0.5)") as s:
            out = model(**inputs, labels=labels)
    pos = s.report.last.positions                                    # [B, L']: input column of each output slot
    assert pos.shape == out.logits.shape[:2] and pos.shape[1] < labels.shape[1]
    kept = torch.where(pos >= 0, labels.gather(1, pos.clamp(min=0)), torch.full_like(pos, -100))
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), kept[:, 1:].reshape(-1),
                           ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-6, rtol=0)
    assert torch.equal(pos[:, -1], (inputs["attention_mask"].shape[1] - 1) * torch.ones_like(pos[:, -1]))
    ids = inputs["input_ids"]
    for b in range(ids.shape[0]):                                   # every text token is still there, in order
        row = pos[b][pos[b] >= 0]
        text = (inputs["attention_mask"][b].bool() & (ids[b] != model.config.image_token_id)).nonzero()[:, 0]
        assert torch.equal(row[torch.isin(row, text)], text) and bool((row[1:] > row[:-1]).all())


# -- concurrency -----------------------------------------------------------------------------------------------
def test_two_threads_generating_in_one_session_get_what_they_would_alone(tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    model = vlm.model
    prompts = [make_inputs(vlm, [default_images()[i]], t) for i, t in ((0, "describe the image"),
                                                                          (2, "what is in this picture?"))]
    with tokcomp.compress(model, "pool(keep_ratio=0.5)+fastv(keep_ratio=0.5)"), torch.no_grad():
        want = [model.generate(**p, max_new_tokens=4, do_sample=False) for p in prompts]
        got, errors = {}, []

        def work(k):
            try:
                for _ in range(5):
                    got.setdefault(k, []).append(model.generate(**prompts[k], max_new_tokens=4, do_sample=False))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    for k in (0, 1):
        assert len(got[k]) == 5 and all(torch.equal(g, want[k]) for g in got[k])


# -- deepcopy ----------------------------------------------------------------------------------------------------
def test_deepcopy_inside_a_session_is_the_unmodified_model(tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-internvl", fresh=True)
    model = vlm.model
    inputs = make_inputs(vlm, inv.default_prompts())
    with torch.no_grad():
        ref = model(**inputs).logits
    before = inv.model_state(model)
    with tokcomp.compress(model, "tome(keep_ratio=0.5)+dart(keep_ratio=0.5)") as s, torch.no_grad():
        twin = copy.deepcopy(model)
        assert torch.equal(twin(**inputs).logits, ref)               # no session on the copy
        assert inv.hook_count(twin) == before["hooks"] and inv.model_state(twin)["attn"] == before["attn"]
        model(**inputs)
        assert s.report.last.llm_layers[3] < s.report.last.llm_layers[0]   # the original still compresses
    assert inv.model_state(model) == before


# -- flash and ToMe ------------------------------------------------------------------------------------------------
def test_tome_without_proportional_attention_runs_on_a_flash_tower(tiny_vlm_factory):
    model = tiny_vlm_factory("tiny-qwen2-vl", fresh=True).model
    hf.set_config_attn(model.config.vision_config, "flash_attention_2")   # only the name is read when checking
    tokcomp.compress(model, vision="tome(keep_ratio=0.5,prop_attn=false)")
    with pytest.raises(AdapterError, match="tome\\(keep_ratio=0.5\\)' is not flash-attention compatible"):
        tokcomp.compress(model, vision="tome(keep_ratio=0.5)")


# -- use_cache=False: every step is a prefill ----------------------------------------------------------------------
def test_use_cache_false_prunes_every_step_as_a_fresh_prefill(tiny_vlm_factory):
    """Documented behaviour: without a cache, generate() runs the whole sequence at every step, so a text-conditioned
    pruner (FastV) chooses again with the text generated so far; each step equals a fresh prefill of the longer
    prompt in the same session."""
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    model = vlm.model
    inputs = make_inputs(vlm, [default_images()[0]])
    n = 3
    with tokcomp.compress(model, "none+fastv(keep_ratio=0.25)") as s, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=False,
                             output_logits=True, return_dict_in_generate=True)
        assert len(s.report.prefill) == n
        L = inputs["input_ids"].shape[1]
        for t in range(n):
            fresh = model(**inv.extend_inputs(inputs, out.sequences[:, L:L + t]), use_cache=False).logits[:, -1]
            assert torch.allclose(fresh, out.logits[t], atol=inv.LOGIT_ATOL, rtol=0)


# -- DART on a padded InternVL batch ---------------------------------------------------------------------------------
def test_dart_rows_of_a_padded_internvl_batch_equal_each_row_alone(tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-internvl")
    inv.check_rows_match_alone(vlm, "none+dart(keep_ratio=0.5)")
    inputs = make_inputs(vlm, inv.default_prompts())
    with tokcomp.compress(vlm.model, "none+dart(keep_ratio=0.5)"), torch.no_grad():
        last = vlm.model(**inputs).logits[:, -1]                      # a plain forward, no position_ids
        for b, p in enumerate(inv.default_prompts()):
            alone = vlm.model(**make_inputs(vlm, [p])).logits[0, -1]
            assert torch.allclose(last[b], alone, atol=inv.LOGIT_ATOL, rtol=0)


# -- every spec form -----------------------------------------------------------------------------------------------
def test_spec_forms_paths_dicts_files(tiny_vlm_factory, tmp_path):
    model = tiny_vlm_factory("tiny-qwen2-vl").model
    f = tmp_path / "pair.yaml"
    f.write_text("vision: {name: pool, keep_ratio: 0.5}\nllm: fastv(keep_ratio=0.5)\n")
    for spec in (f, str(f), Path(str(f))):
        assert tokcomp.compress(model, spec).spec == "pool(keep_ratio=0.5)+fastv(keep_ratio=0.5)"
    cases = [({"vision": {"name": None}}, SpecError, "'name' key holding a strategy name"),
             ({"vision": {"keep_ratio": 0.5}}, SpecError, "'name' key"),
             (str(tmp_path / "missing.yaml"), SpecError, "does not exist"),
             (tmp_path / "missing.json", SpecError, "does not exist"),
             (str(tmp_path) + "/x.yaml/", SpecError, "does not exist"),
             ("fastv(keep_ratio=true)", ConfigError, "keep_ratio=true holds a boolean"),
             ("fastv(num_tokens=true)", ConfigError, "num_tokens=true holds a boolean"),
             ("fastv(layer=true)", ConfigError, "layer=true holds a boolean"),
             ("IPCV(keep_ratio=0.5)", ConfigError, "Did you mean 'ipcv'"),
             (3.5, ConfigError, "cannot use float as a spec")]
    d = tmp_path / "folder.yaml"
    d.mkdir()
    cases.append((d, SpecError, "is not a file"))
    before = inv.model_state(model)
    for spec, err, msg in cases:
        with pytest.raises(err, match=msg.replace("(", "\\(").replace(")", "\\)")):
            tokcomp.compress(model, spec)
    assert inv.model_state(model) == before
