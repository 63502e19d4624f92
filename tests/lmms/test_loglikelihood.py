"""Scoring requests (lmms-eval's ``loglikelihood``, what multiple-choice tasks send) under a session."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("lmms_eval")


def _requests(docs, conts):
    from lmms_eval.api.instance import Instance

    def visual(doc):
        return [doc["image"].convert("RGB")]
    return [Instance(request_type="loglikelihood", arguments=(d["question"], c, visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, (d, c) in enumerate(zip(docs, conts))]


def _reference(vlm, doc, cont: str) -> tuple[float, bool]:
    """``(mean NLL of cont after the prompt, is cont the greedy continuation)``, with plain transformers."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
    text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = vlm.processor(text=[text], images=[doc["image"].convert("RGB")], return_tensors="pt")
    ids = vlm.tokenizer(cont, add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ids], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1))
    with torch.inference_mode():
        logits = vlm.model(**full).logits[0, -ids.shape[1] - 1:-1]
    return float(torch.nn.functional.cross_entropy(logits.float(), ids[0])), bool((logits.argmax(-1) == ids[0]).all())


def test_scores_at_keep_one_equal_the_unmodified_model_and_compression_changes_them(demo_task, lmms_home):
    from datasets import load_from_disk

    from tokcomp.lmms.model import TokcompChat
    from tokcomp.testing import build_model
    paths = demo_task("tiny-qwen2-vl")
    docs = list(load_from_disk(str(paths["data"]))["test"])[:3]
    conts = [" a red square", "yes", docs[2]["answer"]]
    vlm = build_model("tiny-qwen2-vl")
    ref = [_reference(vlm, d, c) for d, c in zip(docs, conts)]
    scores = {}
    for spec in ("none", "pool(keep_ratio=1.0)+fastv(keep_ratio=1.0)", "pool(keep_ratio=0.5)+fastv(keep_ratio=0.5)"):
        lm = TokcompChat(pretrained=str(paths["model"]), compress=spec)
        lm.task_dict = {"t": {"test": docs}}
        scores[spec] = lm.loglikelihood(_requests(docs, conts))
        assert sorted(lm._records) == [("t", 0), ("t", 1), ("t", 2)]
        assert all(r["new_tokens"] == 0 for r in lm._records.values())
    for spec in ("none", "pool(keep_ratio=1.0)+fastv(keep_ratio=1.0)"):
        assert [s for s, _ in scores[spec]] == pytest.approx([r for r, _ in ref], abs=1e-5)
        assert [g for _, g in scores[spec]] == [g for _, g in ref]
    assert [s for s, _ in scores["pool(keep_ratio=0.5)+fastv(keep_ratio=0.5)"]] != pytest.approx([r for r, _ in ref],
                                                                                               abs=1e-5)
