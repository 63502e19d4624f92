"""Every vision strategy x LLM strategy x budget on the tiny models (and the headline pairs on bench-shaped models).

Each benchmark times ``generate(max_new_tokens=8)`` inside the session and stores in ``extra_info``: the spec, the
achieved counts, FLOPs split (vision / prefill / decode), KV-cache MB after prefill, and fidelity against the
unmodified model (top-1 agreement, KL, greedy agreement) from :mod:`tokcomp.bench`.
Bench-shaped models (real depths, reduced widths, ~1,000 visual tokens) run only with ``--bench-shaped``.
"""
from __future__ import annotations

import functools

import pytest

import tokcomp
from tokcomp import bench

KEEPS = (0.5, 0.35, 0.2)
HEADLINE = ("ipcv+dart", "ipcv+fastv", "tome+none", "none+fastv", "none+dart", "pool+random")


def _names(stage):
    return ["none"] + sorted({c.name for c in tokcomp.list_strategies(stage=stage)})


@functools.lru_cache(maxsize=None)
def _model(name):
    from tokcomp.cli import BENCH_MODELS
    from tokcomp.run import build_inputs
    from tokcomp.testing import build_model
    from tokcomp.testing.images import procedural_image
    preset, over, sizes = BENCH_MODELS[name]
    vlm = build_model(preset, **over)
    inputs = [build_inputs(vlm.model, vlm.processor, vlm, procedural_image(h, w, seed=i), "describe the image")
              for i, (h, w) in enumerate(sizes)]
    reg = tokcomp.default_registry()
    bases = []
    bench.measure(vlm.model, inputs, None, bases, new_tokens=8, repeats=1, registry=reg,
                  adapter_cls=reg.resolve_adapter(vlm.model))
    return vlm.model, inputs, bases


def _pairs():
    out = []
    for model in ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-internvl"):
        for v in _names("vision"):
            for l in _names("llm"):
                if v == l == "none":
                    continue
                for k in KEEPS:
                    out.append(pytest.param(model, v, l, k, id=f"{model}-{v}+{l}-{k}"))
    return out


def _spec(v, l, k):
    return "+".join("none" if n == "none" else f"{n}(keep_ratio={k})" for n in (v, l))


def _run(benchmark, model_name, v, l, k):
    model, inputs, bases = _model(model_name)
    reg = tokcomp.default_registry()
    spec = _spec(v, l, k)
    row = bench.measure(model, inputs, spec, bases, new_tokens=8, repeats=1, registry=reg,
                        adapter_cls=reg.resolve_adapter(model))
    with tokcomp.compress(model, spec):
        benchmark(lambda: model.generate(**inputs[0], max_new_tokens=8, min_new_tokens=8, do_sample=False))
    benchmark.extra_info.update(spec=spec, tflops=row.tflops, vision_tflops=row.vision_tflops,
                                prefill_tflops=row.prefill_tflops, decode_tflops=row.decode_tflops, kv_mb=row.kv_mb,
                                visual_tokens=row.visual_tokens, top1=row.top1, kl=row.kl, greedy=row.greedy,
                                counts=row.counts)


@pytest.mark.parametrize("model_name, vision, llm, keep", _pairs())
def test_tiny_pairs(benchmark, model_name, vision, llm, keep):
    _run(benchmark, model_name, vision, llm, keep)


@pytest.mark.parametrize("pair", HEADLINE)
@pytest.mark.parametrize("keep", KEEPS)
def test_bench_shaped_headline(benchmark, pair, keep, request):
    if not request.config.getoption("--bench-shaped", default=False):
        pytest.skip("bench-shaped models are slow on CPU: pass --bench-shaped")
    v, l = pair.split("+")
    _run(benchmark, "bench-qwen2-vl-2b", v, l, keep)
