"""The three performance figures of docs/performance.md, each a ratio measured in one run.

    .venv/bin/python benchmarks/performance.py overhead   [--model bench-qwen2-vl-2b] [--repeats 5]
    .venv/bin/python benchmarks/performance.py speedup    [--dtype bfloat16] [--pixels 1300] [--repeats 2]
    .venv/bin/python benchmarks/performance.py selection  [--sizes 1024,4096,16384]

overhead:  a session at keep 1.0 against no session (prefill = generate(max_new_tokens=1)), on a bench-shaped model.
speedup:   realised prefill speedup against the FLOPs-model speedup for ipcv+dart (0.35/0.35), fastv and dart alone,
           on the Qwen2-VL-2B-shaped model (real widths, random weights), ~1,300 visual tokens (IPCV's min_pixels).
selection: time of the selection step alone (IPCV's per-segment kNN + NGR, ToMe's bipartite matching, SparseVLM's
           density-peak clustering) from 1k to 16k tokens, memory bounded by chunking (no N x N matrix).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _model(name, dtype, pixels=None):
    from tokcomp.cli import BENCH_MODELS
    from tokcomp.run import build_inputs
    from tokcomp.testing import build_model
    from tokcomp.testing.images import procedural_image
    if name in BENCH_MODELS:
        preset, over, sizes = BENCH_MODELS[name]
    else:
        preset, over, sizes = name, {}, [(448, 448)]
    vlm = build_model(preset, dtype=getattr(torch, dtype), **over)
    if pixels:  # an image of ~pixels visual tokens (28x28 px each)
        side = int(round((pixels ** 0.5))) * 28
        sizes = [(side, side)]
    h, w = sizes[0]
    inputs = build_inputs(vlm.model, vlm.processor, vlm, procedural_image(h, w, seed=0), "describe the image")
    return vlm.model, inputs


def _prefill(model, inputs):
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)


def overhead(args):
    import tokcomp
    model, inputs = _model(args.model, args.dtype)
    _prefill(model, inputs)
    rows = []
    for spec in ("none", "random(keep_ratio=1.0)+random(keep_ratio=1.0)", "ipcv(keep_ratio=1.0)+dart(keep_ratio=1.0)"):
        base = _median(lambda: _prefill(model, inputs), args.repeats)
        with tokcomp.compress(model, spec):
            _prefill(model, inputs)
            t = _median(lambda: _prefill(model, inputs), args.repeats)
        rows.append((spec, base, t))
    print(f"| session (keep 1.0) | no session, s | in session, s | ratio |\n|---|---|---|---|")
    for spec, base, t in rows:
        print(f"| `{spec}` | {base:.3f} | {t:.3f} | {t / base:.3f} |")


def speedup(args):
    import tokcomp
    from tokcomp.metrics.cost import record_cost
    model, inputs = _model("qwen2-vl-2b-shaped", args.dtype, pixels=args.pixels)
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text = [int(inputs["attention_mask"][0].sum()) - n_vis]
    print(f"visual tokens: {n_vis}, dtype {args.dtype}, threads {torch.get_num_threads()}")
    _prefill(model, inputs)
    base_t = _median(lambda: _prefill(model, inputs), args.repeats)
    with tokcomp.compress(model, "none") as s, torch.inference_mode():
        model(**inputs)
    depth = s.adapter.depths()["vision"]
    base_f = record_cost(s.adapter.dims(), s.report.prefill[-1], depth, text, 1)
    print("| spec | prefill s | realised speedup | FLOPs-model speedup | realised / predicted saving |")
    print("|---|---|---|---|---|")
    print(f"| unmodified | {base_t:.2f} | 1.00 | 1.00 | - |")
    for spec in args.specs.split(";"):
        with tokcomp.compress(model, spec) as s:
            _prefill(model, inputs)
            t = _median(lambda: _prefill(model, inputs), args.repeats)
            with torch.inference_mode():
                model(**inputs)
        f = record_cost(s.adapter.dims(), s.report.prefill[-1], depth, text, 1)
        real, pred = base_t / t, base_f.total / f.total
        saving = (1 - t / base_t) / (1 - f.total / base_f.total) if f.total < base_f.total else float("nan")
        print(f"| `{spec}` | {t:.2f} | {real:.2f} | {pred:.2f} | {saving:.0%} |")


def selection(args):
    from tokcomp.ops import dpc_knn, knn, matching_per_segment, neighbor_guided_reconstruction
    C = args.width
    print(f"| tokens | IPCV kNN+NGR (keep 0.35), s | ToMe matching (r = N/4), s | SparseVLM DPC (30% of 65% dropped), s |")
    print("|---|---|---|---|")
    for n in [int(x) for x in args.sizes.split(",")]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, C, generator=g)
        k = int(n * 0.35)
        kept, rem = x[:k], x[k:]

        def ipcv():
            nn = knn(rem, kept, 10, chunk=1024)
            neighbor_guided_reconstruction(rem, kept - kept.roll(1, 0), nn)

        def tome():
            matching_per_segment(x, torch.zeros(n, dtype=torch.long), n // 4)

        m = int(0.3 * (n - k)) + 1

        def sparse():
            dpc_knn(x[:m], max(1, m // 10), max(1, m // 10), chunk=1024)

        print(f"| {n} | {_median(ipcv, args.repeats):.3f} | {_median(tome, args.repeats):.3f} | "
              f"{_median(sparse, args.repeats):.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("overhead")
    s.add_argument("--model", default="bench-qwen2-vl-2b")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--repeats", type=int, default=5)
    s.set_defaults(fn=overhead)
    s = sub.add_parser("speedup")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--pixels", type=int, default=1300, help="visual tokens wanted (image side = sqrt * 28 px)")
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--specs", default="ipcv(keep_ratio=0.35)+dart(keep_ratio=0.35);none+fastv(keep_ratio=0.35);"
                                      "none+dart(keep_ratio=0.35)")
    s.set_defaults(fn=speedup)
    s = sub.add_parser("selection")
    s.add_argument("--sizes", default="1024,4096,16384")
    s.add_argument("--width", type=int, default=1280)
    s.add_argument("--repeats", type=int, default=1)
    s.set_defaults(fn=selection)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    args.fn(args)


if __name__ == "__main__":
    main()
