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
