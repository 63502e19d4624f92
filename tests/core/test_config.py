import pytest

from tokcomp.config import LayerField, StrategyConfig, build_config
from tokcomp.errors import ConfigError


class Cfg(StrategyConfig):
    layer: int = LayerField(2, tower="llm")
    layers: list[int] | None = LayerField(None, tower="vision")


class Defaulted(StrategyConfig):
    default_keep_ratio = 0.35


def make(**kw):
    return build_config(Cfg, "demo", kw)


@pytest.mark.parametrize("kw, needle", [
    ({"keep_ratio": 0.5, "num_tokens": 10}, "not both"),
    ({}, "needs a budget"),
    ({"keep_ratio": 0}, "greater than 0"),
    ({"keep_ratio": -0.5}, "greater than 0"),
    ({"keep_ratio": 1.5}, "less than or equal to 1"),
    ({"num_tokens": 0}, "greater than or equal to 1"),
    ({"keep_ratio": 0.5, "bogus": 1}, "unknown field 'bogus'"),
])
def test_bad_budgets_and_fields_name_the_problem_and_the_fix(kw, needle):
    with pytest.raises(ConfigError) as e:
        make(**kw)
    assert needle in str(e.value) and "tokcomp schema demo" in str(e.value)


def test_default_budget_is_applied_but_not_printed():
    c = build_config(Defaulted, "d", {})
    assert c.keep_ratio == 0.35 and c.spec_args() == ""
    assert build_config(Defaulted, "d", {"num_tokens": 5}).keep_ratio is None


@pytest.mark.parametrize("n, r, expected", [(10, 0.5, 5), (10, 0.35, 4), (7, 0.5, 4), (10, 0.25, 3), (3, 0.01, 1), (0, 0.5, 0),
                                            (576, 1.0, 576)])
def test_keep_count_rounds_and_clamps(n, r, expected):
    assert make(keep_ratio=r).keep_count(n) == expected


def test_keep_count_absolute():
    assert make(num_tokens=64).keep_count(100) == 64
    assert make(num_tokens=64).keep_count(10) == 10


def test_noop_budget():
    assert make(keep_ratio=1.0).is_noop_budget and not make(keep_ratio=0.99).is_noop_budget
    assert not make(num_tokens=5).is_noop_budget


def test_layers_are_checked_against_depth_with_the_fix():
    c = make(keep_ratio=0.5, layer=28, layers=[0, 31])
    c.check_layers("demo", {"llm": 29, "vision": 32})
    with pytest.raises(ConfigError, match=r"layer=28 .* 28 layers .*0\.\.27.*choose layer < 28"):
        c.check_layers("demo", {"llm": 28, "vision": 32})
    with pytest.raises(ConfigError, match=r"layers=\[0, 31\] .*vision tower"):
        c.check_layers("demo", {"llm": 29, "vision": 16})


def test_spec_args_keep_declaration_order_of_set_fields():
    assert make(layer=3, keep_ratio=0.25).spec_args() == "keep_ratio=0.25,layer=3"


def test_config_is_immutable():
    c = make(keep_ratio=0.5)
    with pytest.raises(Exception):
        c.keep_ratio = 0.2
