import pytest
import torch

import tokcomp
from tokcomp.errors import AdapterError, ConfigError, SessionError
from toymodel import ToyVLM

GRIDS = [(4, 4), (2, 6)]           # two segments: 4 + 3 units


def _model():
    torch.manual_seed(0)
    return ToyVLM(c=8, depth=3, llm_layers=2).eval()


def _inputs():
    torch.manual_seed(1)
    return torch.randn(sum(h * w for h, w in GRIDS), 8), GRIDS


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_keep_ratio_one_is_exact_noop_and_exit_restores(registry):
    m = _model()
    x, g = _inputs()
    ref = m(x, g)
    with tokcomp.compress(m, "pool(keep_ratio=1.0)", registry=registry) as s:
        assert _all_hooks(m) > 0
        assert torch.equal(m(x, g), ref)
    assert _all_hooks(m) == 0 and not hasattr(m, "_tokcomp_session")
    assert s.report.vision[-1].vision_out == [7]
    assert torch.equal(m(x, g), ref)


def test_vision_strategy_drops_units_and_scatters_back(registry):
    m = _model()
    x, g = _inputs()
    ref = m(x, g)
    with tokcomp.compress(m, vision="random(keep_ratio=0.5)", registry=registry) as s:
        out = m(x, g)
    kept = (out.abs().sum(-1) > 0)
    assert s.report.vision[-1].vision_out == [int(kept.sum())] == [2 + 2]   # round(4*.5) + round(3*.5)
    assert s.report.vision[-1].vision_blocks[0] == 16                      # 4 units x 4 patches after block 0
    # later blocks saw fewer tokens, so kept rows differ from the uncompressed run only through the blocks
    assert out.shape == ref.shape


def test_exception_inside_with_restores(registry):
    m = _model()
    with pytest.raises(RuntimeError, match="boom"):
        with tokcomp.compress(m, "pool(keep_ratio=0.5)", registry=registry):
            raise RuntimeError("boom")
    assert _all_hooks(m) == 0 and not hasattr(m, "_tokcomp_session")


def test_second_concurrent_session_is_refused(registry):
    m = _model()
    with tokcomp.compress(m, "pool(keep_ratio=0.5)", registry=registry):
        with pytest.raises(SessionError, match="already active"):
            with tokcomp.compress(m, "pool(keep_ratio=0.25)", registry=registry):
                pass
        assert _all_hooks(m) > 0
    assert _all_hooks(m) == 0
    with tokcomp.compress(m, "pool(keep_ratio=0.25)", registry=registry):   # sequential sessions are fine
        pass


def test_attach_failure_leaves_nothing_half_patched(registry, monkeypatch):
    from toymodel import ToyAdapter
    m = _model()
    orig = ToyAdapter.attach

    def failing(self, session):
        orig(self, session)
        raise RuntimeError("attach broke")
    monkeypatch.setattr(ToyAdapter, "attach", failing)
    with pytest.raises(RuntimeError, match="attach broke"):
        with tokcomp.compress(m, "pool(keep_ratio=0.5)", registry=registry):
            pass
    assert _all_hooks(m) == 0 and not hasattr(m, "_tokcomp_session")


@pytest.mark.parametrize("kwargs, err, needle", [
    ({"vision": "random(keep_ratio=0.5,layer=7)"}, ConfigError, "layer=7 is out of range"),
    ({"llm": "random(keep_ratio=0.5,layer=2)"}, ConfigError, "2 layers"),
    ({"vision": "pool"}, ConfigError, "needs a budget"),
    ({"llm": "pool(keep_ratio=0.5)"}, ConfigError, "is a vision compressor, not an LLM pruner"),
    ({"vision": "fastv(keep_ratio=0.5)"}, ConfigError, "is an LLM pruner, not a vision compressor"),
    ({"vision": 3}, ConfigError, "vision= takes"),
    ({"spec": "pool(keep_ratio=0.5)", "vision": "pool(keep_ratio=0.5)"}, ConfigError, "not both"),
])
def test_bad_input_fails_before_any_forward(registry, kwargs, err, needle):
    m = _model()
    calls = []
    m.register_forward_pre_hook(lambda *a: calls.append(1))
    spec = kwargs.pop("spec", None)
    with pytest.raises(err) as e:
        tokcomp.compress(m, spec, registry=registry, **kwargs)
    assert needle in str(e.value) and not calls


def test_vision_strategy_given_as_llm_pruner_via_get(registry):
    m = _model()
    with pytest.raises(ConfigError, match="pass it as vision="):
        tokcomp.compress(m, llm=registry.get("pool", keep_ratio=0.5), registry=registry)


def test_needs_the_adapter_cannot_meet_are_refused(registry):
    from tokcomp.strategy import LLMPruner

    class NeedsRows(LLMPruner):
        name = "needs_rows"
        needs_attention_rows = True
    with pytest.raises(AdapterError, match="'needs_rows' is an LLM pruner that needs attention rows from the "
                                           "language model .* 'toy' adapter for ToyVLM does not provide"):
        tokcomp.compress(_model(), llm=NeedsRows(keep_ratio=0.5), registry=registry)


def test_unsupported_model_lists_supported(registry):
    with pytest.raises(AdapterError, match="Supported models: .*toy: ToyVLM"):
        tokcomp.compress(torch.nn.Linear(2, 2), "pool(keep_ratio=0.5)", registry=registry)


def test_compiled_model_is_refused(registry):
    m = _model()
    compiled = torch.compile(m)
    with pytest.raises(SessionError, match="torch.compile"):
        tokcomp.compress(compiled, "pool(keep_ratio=0.5)", registry=registry)


def test_session_repr_and_spec(registry):
    s = tokcomp.compress(_model(), vision="pool(keep_ratio=0.5)", registry=registry)
    assert s.spec == "pool(keep_ratio=0.5)" and "closed" in repr(s)
