"""The third-party example plugin (examples/tokcomp-example-plugin), installed by the test setup like any plugin."""
import importlib.metadata as md

import pytest
import torch

import tokcomp
from tokcomp.cli import main
from tokcomp.tokens import VisionContext
from toymodel import ToyVLM, toy_layout, toy_tokens


def _installed():
    return any(ep.name == "l2norm" for ep in md.entry_points(group="tokcomp"))


pytestmark = pytest.mark.skipif(not _installed(), reason="example plugin not installed "
                                "(pip install -e examples/tokcomp-example-plugin; scripts/test.sh does)")


def test_listed_by_the_cli(capsys):
    assert main(["list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("l2norm"))
    assert "vision" in line and "unit" in line


def test_registered_from_its_own_distribution():
    cls = tokcomp.default_registry().strategy_class("l2norm")
    assert cls.__module__ == "tokcomp_example_plugin"
    assert tuple(md.distribution("tokcomp-example-plugin").entry_points)[0].group == "tokcomp"


def test_selects_largest_norm_units_per_segment():
    layout = toy_layout([(4, 4), (2, 4)])
    h = torch.randn(layout.n_tokens, 4, generator=torch.Generator().manual_seed(0))
    out = tokcomp.get("l2norm", keep_ratio=0.5).after_block(0, toy_tokens(h, layout), VisionContext(layout, 1))
    ids, _ = out.units()
    norms = h[layout.unit_patches].norm(dim=-1).mean(-1)
    expected = sorted(norms[:4].topk(2).indices.tolist() + (4 + norms[4:].topk(1).indices).tolist())
    assert ids.tolist() == expected


def test_usable_by_name_in_a_session(registry):
    m = ToyVLM(c=8, depth=2).eval()
    x = torch.randn(16 + 8, 8)
    with tokcomp.compress(m, "l2norm(keep_ratio=0.5)", registry=registry) as s:
        m(x, [(4, 4), (2, 4)])
    assert s.report.vision[-1].vision_out == [3]


def test_a_one_shot_llm_pruner_plugin_is_one_small_file():
    """The ScorePruner template: the whole third-party LLM pruner (module docstring, class, registration) is <= 20
    lines, and it is in the invariant matrix because it is registered (tests/plugins/test_llm_pruners_invariants)."""
    import tokcomp_example_plugin.hidden_norm as mod
    from tokcomp.testing import matrix
    assert len(open(mod.__file__).read().splitlines()) <= 20
    assert tokcomp.default_registry().strategy_class("hidden_norm") is mod.HiddenNorm
    assert mod.HiddenNorm in matrix.strategies("llm", "tiny-qwen2-vl")


def test_the_llm_pruner_keeps_the_largest_norms_before_layer_k(tiny_vlm_factory):
    """Against a hand-made check on a real tiny model: the kept visual tokens are the row's largest-norm ones of
    layer K-1's output (the template's budget, ties and prune point)."""
    from tokcomp.testing import default_images, make_inputs
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    inputs = make_inputs(vlm, [default_images()[0]])
    p = tokcomp.get("hidden_norm", keep_ratio=0.25, layer=2)
    seen = {}
    lm = vlm.model.model.language_model
    h1 = lm.layers[1].register_forward_hook(lambda m, a, out: seen.setdefault("out1", out))
    h2 = lm.layers[2].register_forward_pre_hook(lambda m, a: seen.setdefault("in2", a[0]))
    try:
        with tokcomp.compress(vlm.model, llm=p) as s, torch.no_grad():
            vlm.model(**inputs)
    finally:
        h1.remove(), h2.remove()
    vis = inputs["input_ids"][0] == vlm.model.config.image_token_id
    n = int(vis.sum())
    norms = seen["out1"][0, vis].norm(dim=-1)
    keep = ~vis
    keep[vis.nonzero()[:, 0][norms.topk(round(n * 0.25)).indices]] = True     # all text + the largest norms
    assert s.report.last.llm_layers[2] == [round(n * 0.25)]
    assert torch.equal(seen["in2"][0], seen["out1"][0, keep])                # layer 2 runs on exactly those
