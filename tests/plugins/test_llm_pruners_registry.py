"""The five LLM pruners are registered (in code), with papers, flags, schemas, specs and docs pages."""
from pathlib import Path

import pytest

import tokcomp

ROOT = Path(__file__).resolve().parents[2]
FLAGS = {  # name: (needs_attention_rows, needs_keys)
    "fastv": (True, False), "dart": (False, True), "v2drop": (False, False), "sparsevlm": (True, False),
    "luvc_spu": (False, False),
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_registered_with_flags_schema_spec_and_docs(name):
    reg = tokcomp.default_registry()
    assert name not in reg.failed
    cls = reg.strategy_class(name, "llm")
    assert cls.stage == "llm" and cls.paper.startswith("https://arxiv.org/abs/") and cls.summary
    assert (cls.needs_attention_rows, cls.needs_keys) == FLAGS[name] and cls.flash_compatible
    schema = cls.Config.model_json_schema()
    assert "keep_ratio" in schema["properties"]
    s = tokcomp.get(name, keep_ratio=0.25)
    assert tokcomp.parse_spec(s.spec).llm.spec == s.spec == f"{name}(keep_ratio=0.25)"
    assert tokcomp.get(name).config.keep_ratio is not None  # every pruner has a documented default budget
    assert (ROOT / "docs" / "methods" / f"{name}.md").is_file()


def test_progressive_schedule_round_trips_through_a_spec():
    pair = tokcomp.parse_spec("none+sparsevlm(schedule=[[3,0.5],[7,0.2]],recycle=false)")
    assert pair.llm.config.schedule == [(3, 0.5), (7, 0.2)] and not pair.llm.config.recycle
    assert tokcomp.parse_spec(pair.spec).llm.config == pair.llm.config


def test_one_instance_serves_models_of_different_depths():
    """Pruners keep no per-model state: the depth arrives with every step (``LLMStep.n_layers``), so one configured
    instance gives each depth exactly its own plan, in any order."""
    from llm_fakes import FakeLLM, layer_counts_from_plan
    row = ([("t", 3), ("v", (1, 4, 5)), ("t", 4)], 7)
    for name in ("v2drop", "sparsevlm", "luvc_spu"):
        p = tokcomp.get(name, keep_ratio=0.4)
        for depth in (8, 14, 8, 20):
            res = FakeLLM([row], depth).run(p)
            assert [c[0] for _, c in sorted(res.counts.items())] == layer_counts_from_plan(p, 20, depth), (name, depth)
