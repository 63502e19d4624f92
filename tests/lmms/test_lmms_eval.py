"""``--model tokcomp`` inside lmms-eval's own ``simple_evaluate``, through the ``lmms_eval.models`` entry point.

Truths are independent of the integration: the demo task's targets are the unmodified model's answers computed
with plain transformers (``tokcomp.lmms.demo.unmodified_answer``), and the compressed counts are re-measured by a
tokcomp session opened directly on an in-memory build of the same preset.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("lmms_eval")


def _samples(results: dict) -> list[dict]:
    return sorted(results["samples"]["tokcomp_demo"], key=lambda s: s["doc_id"])


_TIMES = {"vision_s", "prefill_s", "ttft_s", "decode_s_per_token", "generate_s"}


def _counts(rec: dict) -> dict:
    """A record without its timings (everything else is deterministic)."""
    return {k: v for k, v in rec.items() if k not in _TIMES}


def _docs(paths):
    from datasets import load_from_disk
    return load_from_disk(str(paths["data"]))["test"]


def test_the_entry_point_gives_lmms_eval_both_interfaces():
    from lmms_eval.models import get_model
    from tokcomp.lmms.model import TokcompChat, TokcompSimple
    assert get_model("tokcomp") is TokcompChat
    assert get_model("tokcomp", force_simple=True) is TokcompSimple


@pytest.mark.parametrize("compress", ["none", "ipcv(keep_ratio=1.0)+dart(keep_ratio=1.0)",
                                      "pool(keep_ratio=1.0)+fastv(keep_ratio=1.0)"])
def test_none_and_keep_one_give_the_unmodified_answers(demo_task, evaluate, compress):
    paths = demo_task("tiny-qwen2-vl")
    res = evaluate(paths, compress)
    docs = _docs(paths)
    got = _samples(res)
    assert [s["resps"][0][0] for s in got] == list(docs["answer"])           # the unmodified model's answers
    assert res["results"]["tokcomp_demo"]["exact_match,none"] == 1.0
    for s in got:
        tc = s["token_counts"][0]
        rec = tc["tokcomp"]
        assert tc["input_tokens"] == rec["prompt_tokens"] == rec["llm_prompt_tokens"]
        assert rec["visual_tokens_per_layer"] == [rec["visual_tokens"]] * 4
        assert rec["kv_bytes"] == rec["kv_bytes_unmodified"]
        assert rec["tflops_total"] == pytest.approx(rec["tflops_unmodified"], rel=1e-12)
    assert res["throughput"]["avg_tokcomp_tflops_ratio"] == pytest.approx(1.0)
    assert res["throughput"]["avg_tokcomp_docs"] == len(docs)


def test_a_compressed_spec_changes_the_counts_as_the_report_says(demo_task, evaluate):
    import tokcomp
    from tokcomp.lmms.demo import MAX_NEW_TOKENS
    from tokcomp.testing import build_model
    spec = "pool(keep_ratio=0.5)+dart(keep_ratio=0.5)"
    paths = demo_task("tiny-qwen2-vl")
    got = _samples(evaluate(paths, spec))
    vlm = build_model("tiny-qwen2-vl")
    for s, doc in zip(got, _docs(paths)):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
        text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = vlm.processor(text=[text], images=[doc["image"].convert("RGB")], return_tensors="pt")
        with tokcomp.compress(vlm.model, spec) as session, torch.inference_mode():
            out = vlm.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        rec = session.report.prefill[0]
        new = out.shape[1] - inputs["input_ids"].shape[1]
        per_layer = [rec.llm_layers[i][0] for i in range(4)]
        text_tokens = rec.llm_text[0]
        tc = s["token_counts"][0]
        mine = tc["tokcomp"]
        assert s["resps"][0][0] == vlm.tokenizer.decode(out[0, -new:], skip_special_tokens=True)
        assert tc["input_tokens"] == round(text_tokens + sum(per_layer) / 4)
        assert tc["output_tokens"] == mine["new_tokens"] == new
        assert mine["visual_tokens_per_layer"] == per_layer
        assert mine["visual_tokens_vision"] == rec.llm_in[0] < mine["visual_tokens"]
        assert per_layer[2] < per_layer[1]                                    # dart before layer 2
        assert mine["kv_bytes"] == rec.kv_bytes < mine["kv_bytes_unmodified"]
        assert mine["tflops_total"] == pytest.approx(session.report.cost(new).total / 1e12, rel=1e-12)
        assert mine["tflops_total"] < mine["tflops_unmodified"]
        assert tc["input_tokens"] < mine["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_the_simple_interface_gives_the_same_answers(demo_task, evaluate):
    paths = demo_task("tiny-qwen2-vl")
    chat = _samples(evaluate(paths, "random(keep_ratio=0.5)+random(keep_ratio=0.5)"))
    simple = _samples(evaluate(paths, "random(keep_ratio=0.5)+random(keep_ratio=0.5)", force_simple=True))
    assert [s["resps"] for s in chat] == [s["resps"] for s in simple]
    for c, s in zip(chat, simple):
        a, b = c["token_counts"][0]["tokcomp"], s["token_counts"][0]["tokcomp"]
        assert _counts(a) == _counts(b)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-internvl", "tiny-llava"])
def test_every_vlm_adapter_runs_through_lmms_eval(demo_task, evaluate, preset):
    paths = demo_task(preset, docs=2)
    docs = _docs(paths)
    none = evaluate(paths, "none")
    assert [s["resps"][0][0] for s in _samples(none)] == list(docs["answer"])
    comp = _samples(evaluate(paths, "random(keep_ratio=0.5)+dart(keep_ratio=0.5)"))
    for s in comp:
        rec = s["token_counts"][0]["tokcomp"]
        assert rec["visual_tokens_vision"] < rec["visual_tokens"]
        assert rec["visual_tokens_per_layer"][-1] < rec["visual_tokens_vision"]
        assert s["token_counts"][0]["input_tokens"] < rec["prompt_tokens"]
