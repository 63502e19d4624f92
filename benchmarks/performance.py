"""The three performance figures of docs/performance.md, each a ratio measured in one run.

    .venv/bin/python benchmarks/performance.py overhead   [--model bench-qwen2-vl-2b] [--repeats 5]
    .venv/bin/python benchmarks/performance.py speedup    [--dtype bfloat16] [--pixels 1300] [--repeats 2]
    .venv/bin/python benchmarks/performance.py selection  [--sizes 1024,4096,16384]
    .venv/bin/python benchmarks/performance.py vision-table [--shape qwen2-vl-2b|llava-small]  (tower time vs FLOPs)
    .venv/bin/python benchmarks/performance.py llm-table    [--shape qwen2-vl-2b|llava-small]  (LLM prefill vs FLOPs)
    .venv/bin/python benchmarks/performance.py merge-ceiling [--shape llava-small]  (ToMe vs its schedule, merging free)

overhead:  a session at keep 1.0 against no session (prefill = generate(max_new_tokens=1)), on a bench-shaped model.
speedup:   realised prefill speedup against the FLOPs-model speedup for ipcv+dart (0.35/0.35), fastv and dart alone,
           on the Qwen2-VL-2B-shaped model (real widths, random weights), ~1,300 visual tokens (IPCV's min_pixels).
selection: time of the selection step alone (IPCV's per-segment kNN + NGR, ToMe's bipartite matching, SparseVLM's
           density-peak clustering) from 1k to 16k tokens, memory bounded by chunking (no N x N matrix).
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from tokcomp.metrics.timers import median_time
from tokcomp.spec import with_budget


def _model(name, dtype, pixels=None, side=None):
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
    if side:
        sizes = [(side, side)]
    h, w = sizes[0]
    inputs = build_inputs(vlm.model, vlm.processor, vlm, procedural_image(h, w, seed=0), "describe the image")
    return vlm.model, inputs


def _prefill(model, inputs):
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)


def overhead(args):
    """Interleaved: each repeat times the unmodified model, then the same prefill inside a keep-1.0 session, so
    machine noise hits both sides alike; the figure is the median of the per-repeat ratios."""
    import tokcomp
    model, inputs = _model(args.model, args.dtype, side=args.side)
    _prefill(model, inputs)
    print("| session (keep 1.0) | no session, s (median) | in session, s (median) | median ratio |")
    print("|---|---|---|---|")
    for spec in ("none", "random(keep_ratio=1.0)+random(keep_ratio=1.0)", "ipcv(keep_ratio=1.0)+dart(keep_ratio=1.0)"):
        base, sess = [], []
        for _ in range(args.repeats):
            base.append(median_time(lambda: _prefill(model, inputs), 1))
            with tokcomp.compress(model, spec):
                sess.append(median_time(lambda: _prefill(model, inputs), 1))
        ratio = statistics.median(s / b for s, b in zip(sess, base))
        print(f"| `{spec}` | {statistics.median(base):.3f} | {statistics.median(sess):.3f} | {ratio:.3f} |",
              flush=True)


def speedup(args):
    """Each spec is timed interleaved with the unmodified model (repeat: base, then spec), so drift on a shared
    machine hits both; realised speedup = median(base) / median(spec)."""
    import tokcomp
    from tokcomp.metrics.cost import record_cost
    model, inputs = _model("qwen2-vl-2b-shaped", args.dtype, pixels=args.pixels)
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text = [int(inputs["attention_mask"][0].sum()) - n_vis]
    print(f"visual tokens: {n_vis}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeat(s)")
    base_f = None
    print("| spec | unmodified prefill s | prefill s | realised speedup | FLOPs-model speedup | realised / predicted saving |")
    print("|---|---|---|---|---|---|")
    for spec in args.specs.split(";"):
        base, comp = [], []
        for _ in range(args.repeats):
            base.append(median_time(lambda: _prefill(model, inputs), 1))
            with tokcomp.compress(model, spec) as s:
                comp.append(median_time(lambda: _prefill(model, inputs), 1))
        if base_f is None:
            with tokcomp.compress(model, "none") as b:
                _prefill(model, inputs)
            depth = b.adapter.depths()["vision"]
            base_f = record_cost(b.adapter.dims(), b.report.prefill[-1], depth, text, 1)
        f = record_cost(s.adapter.dims(), s.report.prefill[-1], depth, text, 1)
        bt, t = statistics.median(base), statistics.median(comp)
        real, pred = bt / t, base_f.total / f.total
        saving = (1 - t / bt) / (1 - f.total / base_f.total) if f.total < base_f.total else float("nan")
        print(f"| `{spec}` | {bt:.2f} | {t:.2f} | {real:.2f} | {pred:.2f} | {saving:.0%} |", flush=True)


def selection(args):
    from tokcomp.ops import (
        dpc_knn,
        knn,
        matching_per_segment,
        neighbor_guided_reconstruction,
    )
    C = args.width
    print("| tokens | IPCV kNN+NGR (keep 0.35), s | ToMe matching (r = N/4), s | SparseVLM DPC (30% of 65% dropped), s |")
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

        print(f"| {n} | {median_time(ipcv, args.repeats):.3f} | {median_time(tome, args.repeats):.3f} | "
              f"{median_time(sparse, args.repeats):.3f} |")



#: the real-weights tiny LLaVA's shapes (random weights): DINOv2-S/14 at 224 px (256 patches, 12 blocks, width 384)
#: and SmolLM2-135M (30 layers, width 576, 9 heads / 3 KV heads)
LLAVA_SMALL = dict(llava_tower="dinov2", vision_feature_layer=-1, vision_layers=12, vision_width=384, vision_heads=6,
                   vision_mlp_ratio=4, image_size=224, text_layers=30, text_width=576, text_heads=9, text_kv_heads=3,
                   text_intermediate=1536)


def _shape(name: str, dtype: str, llm: bool):
    """(vlm, tower(images) -> None, one image) for ``qwen2-vl-2b`` (real widths) or ``llava-small`` (the real tiny
    LLaVA's shapes); without ``llm`` the language model is cut to one layer (only the tower is timed)."""
    from tokcomp.testing import build_model
    from tokcomp.testing.images import procedural_image
    dt = getattr(torch, dtype)
    if name == "qwen2-vl-2b":
        vlm = build_model("qwen2-vl-2b-shaped", dtype=dt, **({} if llm else {"text_layers": 1}))
        return vlm, procedural_image(448, 448, seed=0)
    if name == "llava-small":
        over = dict(LLAVA_SMALL, **({} if llm else {"text_layers": 1}))
        return build_model("tiny-llava", dtype=dt, **over), procedural_image(224, 224, seed=0)
    raise SystemExit(f"unknown --shape {name!r}; use qwen2-vl-2b or llava-small")


def _alternate(base, other, pairs: int) -> tuple[float, tuple[float, float], float]:
    """Time ``other()`` against ``base()``, one call each, back to back, ``pairs`` times (after one warm-up of each),
    so the drift of a shared machine hits both sides of every pair. Returns (median of the pair ratios
    other / base, (first, third) quartile of the ratios, median base s)."""
    from time import perf_counter
    base()
    other()
    ratios, bases = [], []
    for _ in range(pairs):
        t0 = perf_counter()
        base()
        t1 = perf_counter()
        other()
        t2 = perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        bases.append(t1 - t0)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), (q[0], q[2]), statistics.median(bases)


def _paired(call, model, ref, pairs: int, session) -> tuple[float, tuple[float, float], float, object]:
    """:func:`_alternate` of ``call(model)`` inside ``session()`` against ``call(ref)`` on ``ref``, an unmodified deep
    copy. Returns (median pair ratio, its IQR, median unmodified s, the session)."""
    with session() as s:
        ratio, iqr, base = _alternate(lambda: call(ref), lambda: call(model), pairs)
    return ratio, iqr, base, s


def _tower_bench(args):
    """The tower to time for ``args.shape`` / ``args.dtype``: ``(model, unmodified deep copy, tower(m) -> None, FLOPs
    of the unmodified tower, vision dims, depth, pairs, the unmodified record)``."""
    import tokcomp
    from tokcomp.metrics.cost import vision_cost
    from tokcomp.testing import make_inputs
    vlm, image = _shape(args.shape, args.dtype, llm=False)
    model = vlm.model
    inputs = make_inputs(vlm, [image])
    dt = getattr(torch, args.dtype)
    kw = {k: (v.to(dt) if k == "pixel_values" else v) for k, v in inputs.items()
          if k in ("pixel_values", "image_grid_thw")}

    def tower(m):
        with torch.inference_mode():
            m.model.get_image_features(**kw)
    ref = copy.deepcopy(model)
    with tokcomp.compress(model, "none") as s:
        tower(model)
    vd, depth = s.adapter.dims()[0], s.adapter.depths()["vision"]
    base_f = vision_cost(vd, s.report.vision[-1], depth)
    pairs = args.pairs or (30 if args.shape == "llava-small" else 7)
    return model, ref, tower, base_f, vd, depth, pairs, s.report.vision[-1]


def vision_table(args):
    """Vision-tower time relative to the unmodified tower (interleaved), next to the FLOPs-model ratio."""
    import tokcomp
    from tokcomp.metrics.cost import vision_cost
    model, ref, tower, base_f, vd, depth, pairs, rec0 = _tower_bench(args)
    print(f"{args.shape}: {rec0.vision_in} patches, dtype {args.dtype}, threads "
          f"{torch.get_num_threads()}, {pairs} alternating (unmodified, compressed) call pairs per row")
    print("| method | keep | unmodified tower s | tower time ratio (median pair) | pair ratios IQR | FLOPs-model ratio "
          "| realised / predicted saving |")
    print("|---|---|---|---|---|---|---|")
    for name in args.methods.split(";"):
        for k in [float(x) for x in args.keep.split(",")]:
            spec = with_budget(name, keep_ratio=k)
            ratio, (q1, q3), base, s = _paired(tower, model, ref, pairs, lambda: tokcomp.compress(model, vision=spec))
            f = vision_cost(vd, s.report.vision[-1], depth) / base_f
            saving = (1 - ratio) / (1 - f) if f < 1 else float("nan")
            print(f"| `{name}` | {k:g} | {base:.3f} | {ratio:.3f} | {q1:.3f}-{q3:.3f} | {f:.3f} | {saving:.0%} |",
                  flush=True)


def _drop_last_units(strategy, tokens, keys, *, i, r, ctx):
    """A stand-in for ToMe's ``mid``: each segment drops its last ``r[s]`` units (no matching, no merge)."""
    ids, rows = tokens.units()
    seg = tokens.segment[rows[:, 0]]
    counts = torch.bincount(seg, minlength=r.numel())
    rank = torch.arange(seg.numel()) - (torch.cumsum(counts, 0) - counts)[seg]
    gone = rows[rank >= counts[seg] - r.to(seg.device)[seg]].reshape(-1)
    keep = torch.ones(tokens.n, dtype=torch.bool)
    keep[gone] = False
    ctx.state[strategy._KEY + ".merged"] = True
    return tokens.select(keep)


def merge_ceiling(args):
    """ToMe's tower time next to the same schedule with matching and merging made free (each merging block drops its
    last r units instead, same counts, proportional attention on): the time any implementation of ToMe's per-block
    merging can reach on this tower, hence the best realised/predicted saving it can show."""
    import contextlib
    import functools

    import tokcomp
    from tokcomp.metrics.cost import vision_cost
    model, ref, tower, base_f, vd, depth, pairs, rec0 = _tower_bench(args)

    @contextlib.contextmanager
    def free(spec):
        with tokcomp.compress(model, vision=spec) as sess:
            sess.vision._mid = functools.partial(_drop_last_units, sess.vision)
            yield sess
    print(f"{args.shape}: {pairs} alternating call pairs per row, threads {torch.get_num_threads()}")
    print("| method | keep | tower time ratio (median pair) | pair ratios IQR | FLOPs-model ratio | realised / predicted "
          "saving |")
    print("|---|---|---|---|---|---|")
    for k in [float(x) for x in args.keep.split(",")]:
        spec = f"tome(keep_ratio={k})"
        for label, factory in (("`tome`", lambda: tokcomp.compress(model, vision=spec)),
                               ("same schedule, merging free", lambda: free(spec))):
            ratio, (q1, q3), _, sess = _paired(tower, model, ref, pairs, factory)
            f = vision_cost(vd, sess.report.vision[-1], depth) / base_f
            print(f"| {label} | {k:g} | {ratio:.3f} | {q1:.3f}-{q3:.3f} | {f:.3f} | {(1 - ratio) / (1 - f):.0%} |",
                  flush=True)
        if args.shape == "llava-small":                 # plain ViT layers: timeable alone, without tokcomp
            rec = sess.report.vision[-1]
            post = [rec.vision_blocks[i] for i in range(depth)]
            pre = [rec.vision_in] + post[:-1]
            for label, counts in (("model's own layers only, at the post-merge counts", post),
                                  ("model's own layers only, at the pre-merge counts", pre)):
                ratio, (q1, q3) = _layers_ratio(ref, counts, rec.vision_in, pairs)
                print(f"| {label} | {k:g} | {ratio:.3f} | {q1:.3f}-{q3:.3f} | | |", flush=True)


def _layers_ratio(vlm, counts, n, pairs):
    """(median, IQR) of the time of a plain ViT's own layers on ``counts[i]`` tokens at layer ``i`` against all
    layers on ``n`` tokens, alternating call by call (no tokcomp involved)."""
    layers = vlm.model.vision_tower.encoder.layer
    x = torch.randn(1, n, vlm.config.vision_config.hidden_size, dtype=next(vlm.parameters()).dtype)

    def run(cs):
        with torch.inference_mode():
            for layer, c in zip(layers, cs):
                out = layer(x[:, :c])
                _ = out[0] if isinstance(out, tuple) else out
    full = [n] * len(counts)
    ratio, iqr, _ = _alternate(lambda: run(full), lambda: run(counts), pairs)
    return ratio, iqr


def llm_table(args):
    """LLM prefill time relative to the unmodified model (interleaved), next to the FLOPs-model ratio (vision
    features computed once and passed in, so only the language model is timed)."""
    import tokcomp
    from tokcomp.metrics.cost import llm_cost
    from tokcomp.testing import make_inputs
    vlm, image = _shape(args.shape, args.dtype, llm=True)
    model = vlm.model
    dt = getattr(torch, args.dtype)
    if args.shape == "qwen2-vl-2b":
        from tokcomp.testing.images import procedural_image
        image = procedural_image(args.side, args.side, seed=0)
    inputs = make_inputs(vlm, [image] * args.images, "what color is the shape?")
    inputs["pixel_values"] = inputs["pixel_values"].to(dt)
    with torch.inference_mode():
        enc = model.model.get_image_features(**{k: v for k, v in inputs.items()
                                                if k in ("pixel_values", "image_grid_thw")}, return_dict=True)
    kw = {k: v for k, v in inputs.items() if k != "pixel_values"}
    kw["mm_encoder_outputs"] = {"image": enc}
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())

    def prefill(m):
        with torch.inference_mode():
            m(**kw, use_cache=True, logits_to_keep=1)
    ref = copy.deepcopy(model)
    with tokcomp.compress(model, "none") as s:
        prefill(model)
    ld = s.adapter.dims()[1]
    text = s.report.last.llm_text
    base_f = llm_cost(ld, s.report.last, text, 1)[0]
    print(f"{args.shape}: {n_vis} visual tokens ({args.images} image(s)), text {text[0]}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, {args.pairs} alternating (unmodified, compressed) call pairs per row")
    print("| pruner | keep | unmodified prefill s | prefill time ratio (median pair) | pair ratios IQR | FLOPs-model ratio "
          "| realised / predicted saving | layer-avg visual |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        for k in [float(x) for x in args.keep.split(",")]:
            spec = f"{name}(keep_ratio={k})"
            ratio, (q1, q3), base, s = _paired(prefill, model, ref, args.pairs,
                                               lambda: tokcomp.compress(model, llm=spec))
            rec = s.report.last
            f = llm_cost(ld, rec, text, 1)[0] / base_f
            avg = statistics.mean(v[0] for v in rec.llm_layers.values())
            saving = (1 - ratio) / (1 - f) if f < 1 else float("nan")
            print(f"| {name} | {k:g} | {base:.2f} | {ratio:.3f} | {q1:.3f}-{q3:.3f} | {f:.3f} | {saving:.0%} "
                  f"| {avg:.0f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("overhead")
    s.add_argument("--model", default="bench-qwen2-vl-2b")
    s.add_argument("--side", type=int, default=448, help="image side in px")
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
    s = sub.add_parser("vision-table")
    s.add_argument("--shape", default="qwen2-vl-2b", help="qwen2-vl-2b (448 px: 1,024 patches) or llava-small "
                                                         "(DINOv2-S at 224 px: 256 patches)")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--methods", default="ipcv;tome;tofu;dart_vit;luvc_oim;pool;random",
                   help='";"-separated names or spec parts, e.g. "ipcv;dart_vit(layer=2)"')
    s.add_argument("--keep", default="0.35,0.2")
    s.add_argument("--pairs", type=int, default=None,
                   help="alternating (unmodified copy, compressed) call pairs per row (default 7; llava-small 30)")
    s.set_defaults(fn=vision_table)
    s = sub.add_parser("llm-table")
    s.add_argument("--shape", default="qwen2-vl-2b", help="qwen2-vl-2b or llava-small (SmolLM2-135M shape)")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--side", type=int, default=896, help="qwen2-vl-2b image side in px (896: 1,024 visual tokens)")
    s.add_argument("--images", type=int, default=1, help="images in the prompt (llava-small: 256 tokens each)")
    s.add_argument("--methods", default="fastv,dart,v2drop,sparsevlm,luvc_spu,random")
    s.add_argument("--keep", default="0.35,0.2")
    s.add_argument("--pairs", type=int, default=5,
                   help="alternating (unmodified copy, compressed) call pairs per row")
    s.set_defaults(fn=llm_table)
    s = sub.add_parser("merge-ceiling")
    s.add_argument("--shape", default="llava-small", help="llava-small or qwen2-vl-2b")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--keep", default="0.35,0.2")
    s.add_argument("--pairs", type=int, default=None)
    s.set_defaults(fn=merge_ceiling)
    s = sub.add_parser("selection")
    s.add_argument("--sizes", default="1024,4096,16384")
    s.add_argument("--width", type=int, default=1280)
    s.add_argument("--repeats", type=int, default=1)
    s.set_defaults(fn=selection)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    args.fn(args)


if __name__ == "__main__":
    main()
