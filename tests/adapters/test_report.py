"""session.report on real tiny models: KV bytes vs the real cache, FLOPs vs an independent sum, timings."""
import pytest
import torch

import tokcomp
from tokcomp.adapters import _hf as hf
from tokcomp.metrics import flops as F
from tokcomp.testing import make_inputs
from tokcomp.testing.images import procedural_image

SPECS = {"tiny-qwen2-vl": "ipcv(keep_ratio=0.35)+dart(keep_ratio=0.35)",
         "tiny-internvl": "tome(keep_ratio=0.5)+fastv(keep_ratio=0.35)"}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_report_counts_kv_flops_and_times(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    model = vlm.model
    inputs = make_inputs(vlm, [procedural_image(112, 112)])
    with tokcomp.compress(model, SPECS[name]) as s, torch.inference_mode():
        out = model(**inputs, use_cache=True)
        rec = s.report.last
        cache = hf.output_cache(out)
        # KV bytes: the report's number is the real cache's, and the cache's per-layer lengths are the counts
        assert rec.kv_bytes == sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values))
        lengths = [l.keys.shape[-2] for l in cache.layers]
        assert lengths == [rec.llm_text[0] + rec.llm_layers[i][0] for i in range(len(lengths))]
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    vd, ld = s.report.dims
    # FLOPs of the last prefill, summed independently from the counts
    rec = s.report.last
    expect_prefill = sum(F.llm_layer(ld, rec.llm_text[0] + n[0], rec.llm_text[0] + n[0])
                         for _, n in sorted(rec.llm_layers.items())) + 2 * ld.width * ld.vocab
    cost = s.report.cost(new_tokens=1)
    assert cost.prefill == expect_prefill and cost.decode == 0 and cost.vision > 0
    with tokcomp.compress(model, "none") as base, torch.inference_mode():
        model(**inputs)
    assert base.report.cost().total > cost.total
    assert base.report.cost().vision > cost.vision or name == "tiny-qwen2-vl"   # ipcv restores the grid
    # timings: one vision call and one prefill per forward, 3 decode steps for 4 new tokens
    t = s.report.times
    assert len(t.vision) == 2 and len(t.prefill) == 2 and len(t.decode) == 3
    assert all(x > 0 for x in t.vision + t.prefill + t.decode)
    summary = s.report.summary(new_tokens=4)
    assert summary["kv_bytes"] > 0 and summary["total_tflops"] > 0 and summary["decode_steps"] == 3
