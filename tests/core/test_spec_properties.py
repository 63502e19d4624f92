"""Property: whatever spec a user writes (strings, dicts, odd values, wrong names), tokcomp either refuses it with a
TokcompError that says something, before any forward and with the model untouched, or builds a session whose keep-1.0
output is bit-identical to the unmodified model's. Every generated configuration carries ``keep_ratio``, so a valid
one is always a keep-1.0 session."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tokcomp
from tokcomp.errors import TokcompError
from tokcomp.spec import format_value
from tokcomp.testing import default_images, make_inputs
from tokcomp.testing import invariants as inv

REG = tokcomp.default_registry()
NAMES = sorted({c.name for c in REG.strategies()})
FIELDS = sorted({f for c in REG.strategies() for f in c.Config.model_fields} | {"foo", "Keep_Ratio"})
BAD_NAMES = ["IPCV", "nope", "none", "fast-v", "random_"]

values = st.one_of(st.integers(0, 3), st.integers(-3, 40), st.floats(-1.0, 3.0, allow_nan=False), st.booleans(), st.none(),
                   st.sampled_from(["constant", "decreasing", "x", "rank", ""]),
                   st.lists(st.integers(-1, 6), max_size=3),
                   st.lists(st.tuples(st.integers(-1, 6), st.floats(0.0, 1.0)), max_size=3))
keeps = st.one_of(st.just(1.0), st.just(1.0), st.sampled_from([1, True, 0, -0.5, 1.5, "1.0", None]))
OWN = {c.name: sorted(set(c.Config.model_fields) - {"keep_ratio", "num_tokens"}) for c in REG.strategies()}


@st.composite
def configs(draw):
    name = draw(st.sampled_from(NAMES + BAD_NAMES))
    own = OWN.get(name) or ["seed"]
    fields = draw(st.one_of(st.just([]), st.lists(st.sampled_from(own), max_size=2),
                            st.lists(st.sampled_from(FIELDS), max_size=3)))
    args = {f: draw(values) for f in fields}
    args["keep_ratio"] = draw(keeps)
    return name, args


def _part(name, args) -> str:
    return f"{name}({','.join(f'{k}={format_value(v)}' for k, v in args.items())})"


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(["string", "string", "dict", "junk"]))
    parts = draw(st.lists(configs(), min_size=1, max_size=draw(st.sampled_from([1, 1, 2, 2, 3]))))
    if kind == "string":
        return "+".join(_part(n, a) for n, a in parts)
    if kind == "dict":
        stages = draw(st.permutations(["vision", "llm"]))
        return {s: {"name": n, **a} for s, (n, a) in zip(stages, parts)}
    return draw(st.text(alphabet="abcdefipqrstuvw_()=+,.[]0123456789 ", max_size=30))


@pytest.fixture(scope="module")
def setup(tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    inputs = make_inputs(vlm, [default_images()[3], None])
    with torch.no_grad():
        ref = vlm.model(**inputs).logits
    return vlm.model, inputs, ref, inv.model_state(vlm.model)


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=specs())
def test_any_spec_is_refused_clearly_or_is_an_exact_no_op(setup, spec):
    model, inputs, ref, state = setup
    try:
        session = tokcomp.compress(model, spec)
    except TokcompError as exc:
        event(f"refused: {type(exc).__name__}")
        assert str(exc).strip(), spec
        assert inv.model_state(model) == state
        return
    with session, torch.no_grad():
        out = model(**inputs).logits
    assert inv.model_state(model) == state
    if all(p == "none" or "keep_ratio=1.0" in p for p in session.spec.split("+")):
        event("an exact no-op session")
        assert torch.equal(out, ref), (spec, session.spec)
    else:   # keep_ratio=none is "not given": the method's own default budget, never a silent other value
        event("keep_ratio=none: the method's default budget")
        assert _passes_none(spec), (spec, session.spec)


def _passes_none(spec) -> bool:
    """Whether ``spec`` gave some part ``keep_ratio=None`` (a string's ``keep_ratio=none`` or a dict's ``None``)."""
    if isinstance(spec, dict):
        return any(isinstance(p, dict) and "keep_ratio" in p and p["keep_ratio"] is None for p in spec.values())
    return "keep_ratio=none" in spec.lower()
