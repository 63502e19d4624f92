"""The accuracy-retention harness (tokcomp.accuracy) on the tiny random LLaVA, with questions whose "right answer" is
the unmodified model's own greedy answer (so the unmodified accuracy is 100 % by construction and a compressed
configuration's accuracy is its agreement with it). The real-weights table lives in docs/benchmarks/accuracy.md."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from tokcomp import accuracy as acc
from tokcomp.testing import make_inputs
from tokcomp.testing.images import procedural_image


@dataclass(frozen=True)
class Q:
    text: str
    image: object
    answer: str
    kind: str


def _answer(vlm):
    def answer(model, processor, questions):
        out = []
        for q in questions:
            inputs = make_inputs(vlm, [q.image], q.text)
            with torch.no_grad():
                seq = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            out.append(vlm.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:]))
        return out
    return answer


def _score(questions, preds):
    return [p == q.answer for q, p in zip(questions, preds)]


def test_mcnemar_against_hand_computed_values():
    assert acc.mcnemar([True] * 5, [True] * 5) == 1.0
    assert acc.mcnemar([True, True, False, False], [False, True, True, True]) == 1.0    # 1 vs 2 discordant
    assert acc.mcnemar([False] * 6, [True] * 6) == pytest.approx(2 / 64)               # 0 vs 6: 2 * (1/2)^6
    assert acc.mcnemar([True] * 3 + [False] * 7, [False] * 3 + [True] * 7) == pytest.approx(
        2 * (1 + 10 + 45 + 120) / 1024)                                                  # 3 vs 7


def test_matched_baselines_share_budget_and_pruning_point():
    depths = {"vision": 12, "llm": 30}
    assert acc.matched_baseline("none+fastv(keep_ratio=0.35)", depths) == "none+random(keep_ratio=0.35,layer=2)"
    assert acc.matched_baseline("none+dart(keep_ratio=0.2,layer=3)", depths) == "none+random(keep_ratio=0.2,layer=3)"
    assert acc.matched_baseline("none+v2drop(keep_ratio=0.5)", depths) == "none+random(keep_ratio=0.5,layer=2)"
    assert acc.matched_baseline("tome(keep_ratio=0.35)+none", depths) == "random(keep_ratio=0.35,layer=11)+none"
    assert acc.matched_baseline("dart_vit(keep_ratio=0.5,layer=1)+none", depths) == \
        "random(keep_ratio=0.5,layer=1)+none"
    assert acc.matched_baseline("ipcv(keep_ratio=0.35)+none", depths) is None         # patch: LLM sees every token
    configs = acc.configs_for(["fastv", "tome", "ipcv+dart"], [0.5], depths)
    assert [c.label for c in configs] == ["unmodified", "fastv", "random(keep_ratio=0.5,layer=2)", "tome",
                                          "random(keep_ratio=0.5,layer=11)", "ipcv+dart"]
    assert configs[2].baseline_of == "fastv" and configs[-1].spec == "ipcv(keep_ratio=0.5)+dart(keep_ratio=0.5)"
    own = acc.configs_for(["ipcv(stabilize_layers=3)", "tome(order=spatial)+fastv(layer=3)"], [0.35], depths)
    assert [c.spec for c in own[1:]] == ["ipcv(stabilize_layers=3,keep_ratio=0.35)+none",
                                         "tome(order=spatial,keep_ratio=0.35)+fastv(layer=3,keep_ratio=0.35)"]


def test_the_harness_on_a_tiny_llava(tiny_vlm_factory, tmp_path):
    vlm = tiny_vlm_factory("tiny-llava")
    model = vlm.model
    answer = _answer(vlm)
    qs = [Q(t, procedural_image(84, 84, seed=i), "", "k%d" % (i % 2)) for i, t in
          enumerate(["describe the image", "what is in this picture?", "the quick brown fox", "describe"])]
    qs = [Q(q.text, q.image, a, q.kind) for q, a in zip(qs, answer(model, vlm.processor, qs))]
    batch = dict(make_inputs(vlm, [q.image for q in qs[:2]], [q.text for q in qs[:2]]))
    depths = {"vision": 3, "llm": 4}
    configs = [acc.Config("unmodified", None), acc.Config("noop", "pool(keep_ratio=1.0)+fastv(keep_ratio=1.0)", 1.0),
               *acc.configs_for(["fastv"], [0.25], depths)[1:]]
    seen = []
    rows = acc.run(model, vlm.processor, qs, configs, answer=answer, score=_score, kinds=lambda q: q.kind,
                   timing_batch=batch, repeats=1, progress=seen.append)
    base, noop, fastv, rnd = rows
    assert base.accuracy == 1.0 and base.hits == [True] * 4 and set(base.by_kind) == {"k0", "k1"}
    assert noop.accuracy == 1.0 and noop.p_value == 1.0 and noop.flops_ratio == pytest.approx(1.0)
    assert noop.visual_tokens == base.visual_tokens == base.llm_visual_in == 36.0
    assert fastv.error is None and fastv.flops_ratio < 1 and fastv.visual_tokens < base.visual_tokens
    assert fastv.llm_visual_in == 36.0 and rnd.baseline_of == "fastv" and rnd.visual_tokens == fastv.visual_tokens
    assert fastv.retained == fastv.accuracy and fastv.p_value == acc.mcnemar(base.hits, fastv.hits)
    assert len(seen) == 4
    paths = acc.write(rows, tmp_path, {"kinds": ["k0", "k1"]})
    data = json.loads(paths["json"].read_text())
    assert [r["label"] for r in data["rows"]] == ["unmodified", "noop", "fastv", "random(keep_ratio=0.25,layer=2)"]
    assert "| fastv | 0.25 |" in paths["md"].read_text() and paths["png"].stat().st_size > 1000
    broken = acc.run(model, vlm.processor, qs[:1], [acc.Config("unmodified", None),
                                                    acc.Config("bad", "ipcv(keep_ratio=0.5,prune_layer=9)+none")],
                     answer=answer, score=_score, timing_batch=batch, repeats=1)
    assert broken[1].error and "prune_layer" in broken[1].error
