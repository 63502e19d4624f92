"""Every vision method on a bfloat16 fake tower (the production dtype): it runs through the documented callback
sequence, keeps the dtypes, and meets its finish contract (the algorithms are checked in float64 in the per-method
files)."""
import pytest
import torch

import tokcomp
from vision_fakes import FakeTower, assert_full_grid, assert_whole_units, make_tokens

SPECS = ["ipcv(keep_ratio=0.35,prune_layer=1,stabilize_layers=2)", "tome(keep_ratio=0.3)",
         "tofu(keep_ratio=0.3)", "dart_vit(keep_ratio=0.3,layer=1)", "luvc_oim(keep_ratio=0.25)"]


@pytest.mark.parametrize("order", ["qwen", "internvl"])
@pytest.mark.parametrize("spec", SPECS)
def test_bf16(spec, order):
    from tokcomp.spec import parse_spec
    s = parse_spec(spec).vision
    layout, full = make_tokens([(4, 8), (6, 6), (2, 2)], order, dtype=torch.bfloat16)
    out, ctx, calls = FakeTower(depth=4, dtype=torch.bfloat16).run(s, full, layout)
    # the documented call order: start, (block_variant, after_block) per block, finish
    assert [c[:2] if c[0] != "start" and c[0] != "finish" else c[:1] for c in calls] == \
        [("start",)] + [x for i in range(4) for x in (("variant", i), ("after", i))] + [("finish",)]
    assert [ctx.counts[i] for i in range(4)] == [c[2] for c in calls if c[0] == "after"]
    assert out.hidden.dtype == torch.bfloat16 and out.size.dtype == torch.float32
    assert bool(torch.isfinite(out.hidden.float()).all())
    if s.granularity == "patch":
        assert_full_grid(out, full)
    else:
        assert out.n < full.n
        assert_whole_units(out, full, layout)
    assert isinstance(s, type(tokcomp.get(s.name)))
