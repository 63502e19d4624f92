import json

import pytest

import tokcomp
from tokcomp.errors import ConfigError, SpecError, UnknownStrategyError
from tokcomp.spec import load_spec_file, parse_spec


@pytest.mark.parametrize("spec", [
    "pool(keep_ratio=0.5)+random(keep_ratio=0.35,layer=2)",
    "random(num_tokens=16,seed=3)+random(keep_ratio=0.5)",
    "pool(keep_ratio=0.25)",
    "random(keep_ratio=0.5)+none",
    "random(layer=none,keep_ratio=0.5)+none",
])
def test_spec_round_trip(spec, registry):
    pair = parse_spec(spec, registry)
    expected = spec
    # printing normalises field order to declaration order; parsing the print gives the same pair again
    again = parse_spec(pair.spec, registry)
    assert again.spec == pair.spec
    assert {k: v for k, v in pair.vision.config.model_dump().items()} == again.vision.config.model_dump()
    if "layer=2" not in spec and "layer=none" not in spec:
        assert pair.spec == expected


def test_order_of_parts_and_stage_by_position(registry):
    p = parse_spec("random(keep_ratio=0.5)+pool(keep_ratio=0.25)", registry)
    assert p.vision.name == "pool" and p.llm.name == "random" and p.llm.stage == "llm"
    p = parse_spec("random(keep_ratio=0.5)+random(keep_ratio=0.25)", registry)
    assert (p.vision.stage, p.vision.config.keep_ratio, p.llm.stage, p.llm.config.keep_ratio) == \
        ("vision", 0.5, "llm", 0.25)
    p = parse_spec("none+random(keep_ratio=0.5)", registry)
    assert p.vision is None and p.llm.stage == "llm"
    assert parse_spec("none", registry).spec == "none"


@pytest.mark.parametrize("spec, err, needle", [
    ("randm(keep_ratio=0.5)", UnknownStrategyError, "Did you mean 'random'"),
    ("pool(keep_ratio=0.5)+pool(keep_ratio=0.3)", ConfigError, "two vision compressors"),
    ("pool(keep_ratio=0.5", SpecError, "unclosed"),
    ("pool(keep_ratio=0.5))", SpecError, "unbalanced"),
    ("pool(keep_ratio)", SpecError, "key=value"),
    ("pool keep", SpecError, "expected name or name(key=value"),
    ("pool(keep_ratio=0.5)+", SpecError, "empty part"),
    ("pool(keep_ratio=0.5,keep_ratio=0.4)", SpecError, "given twice"),
    ("pool(keep_ratio=@)", SpecError, "cannot read the value"),
    ("random(keep_ratio=0.5)", ConfigError, "both a vision compressor and an LLM pruner"),
    ("a+b+c", ConfigError, "3 parts"),
    ("", SpecError, "empty spec"),
])
def test_malformed_specs(spec, err, needle, registry):
    with pytest.raises(err) as e:
        parse_spec(spec, registry)
    assert needle in str(e.value)


def test_json_and_yaml_files(tmp_path, registry):
    data = {"vision": {"name": "pool", "keep_ratio": 0.25}, "llm": {"name": "random", "keep_ratio": 0.5, "layer": 1}}
    j = tmp_path / "s.json"
    j.write_text(json.dumps(data))
    y = tmp_path / "s.yaml"
    y.write_text("vision:\n  name: pool\n  keep_ratio: 0.25\nllm:\n  name: random\n  keep_ratio: 0.5\n  layer: 1\n")
    s = tmp_path / "str.yaml"
    s.write_text("pool(keep_ratio=0.25)+random(keep_ratio=0.5,layer=1)\n")
    specs = {load_spec_file(p, registry).spec for p in (j, y, s)}
    assert specs == {"pool(keep_ratio=0.25)+random(keep_ratio=0.5,layer=1)"}


def test_config_file_stage_mismatch(tmp_path, registry):
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"llm": {"name": "pool", "keep_ratio": 0.5}}))
    with pytest.raises(ConfigError, match="is a vision compressor, not an LLM pruner"):
        load_spec_file(j, registry)
    j.write_text(json.dumps({"vision": [1, 2]}))
    with pytest.raises(SpecError, match="'name' key"):
        load_spec_file(j, registry)


def test_public_get_and_listing():
    s = tokcomp.get("pool", keep_ratio=0.5)
    assert s.spec == "pool(keep_ratio=0.5)"
    assert tokcomp.get("random", stage="llm", keep_ratio=0.5).stage == "llm"
    names = {(c.stage, c.name) for c in tokcomp.list_strategies()}
    assert {("vision", "random"), ("llm", "random"), ("vision", "pool")} <= names
    assert all(c.stage == "vision" for c in tokcomp.list_strategies(stage="vision"))
    assert [c.name for c in tokcomp.list_strategies(pattern="poo*")] == ["pool"]
    with pytest.raises(ConfigError, match="stage must be"):
        tokcomp.list_strategies(stage="vit")


def test_with_budget_adds_to_a_parts_own_arguments(registry):
    from tokcomp.spec import split_top, with_budget
    assert with_budget("tome", keep_ratio=0.35) == "tome(keep_ratio=0.35)"
    assert with_budget(" ipcv(stabilize_layers=3) ", keep_ratio=0.2) == "ipcv(stabilize_layers=3,keep_ratio=0.2)"
    assert with_budget("none", keep_ratio=0.5) == "none"
    assert with_budget("dart(layer=2)") == "dart(layer=2)"
    pair = parse_spec("+".join(with_budget(p, keep_ratio=0.5)
                               for p in split_top("ipcv(prune_layer=2,stabilize_layers=1)+dart", "+")), registry)
    assert pair.vision.config.stabilize_layers == 1 and pair.vision.config.keep_ratio == 0.5
    assert pair.llm.config.keep_ratio == 0.5
    with pytest.raises(SpecError, match="already sets keep_ratio"):
        with_budget("tome(keep_ratio=0.5)", keep_ratio=0.35)
    assert split_top("ipcv(a=1,b=2),tome", ",") == ["ipcv(a=1,b=2)", "tome"]


def test_bench_pairs_may_carry_arguments(registry):
    from tokcomp.bench import specs_for
    got = specs_for("ipcv(prune_layer=2,stabilize_layers=1)+dart, tome ,none", [0.5, 0.2], registry)
    assert got == [("none", None, None),
                   ("ipcv(prune_layer=2,stabilize_layers=1)+dart", 0.5,
                    "ipcv(prune_layer=2,stabilize_layers=1,keep_ratio=0.5)+dart(keep_ratio=0.5)"),
                   ("ipcv(prune_layer=2,stabilize_layers=1)+dart", 0.2,
                    "ipcv(prune_layer=2,stabilize_layers=1,keep_ratio=0.2)+dart(keep_ratio=0.2)"),
                   ("tome", 0.5, "tome(keep_ratio=0.5)"), ("tome", 0.2, "tome(keep_ratio=0.2)")]
