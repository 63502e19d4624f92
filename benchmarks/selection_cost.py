"""Cost of every selection kernel, against one unmodified vision-tower forward, as ratios measured in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/selection_cost.py [--sizes 1024,4096,16384] [--repeats 3]
        [--kinds random,flat,half-flat,near-flat] [--tower 4096] [--tower-repeats 1] [--kernels knn,dpc,...]

Each kernel runs on N tokens for every N in ``--sizes``, on four kinds of input (``--kinds``): ``random`` (Gaussian
plus a shared offset, as ViT states have), ``flat`` (every token identical: a blank page), ``half-flat`` (60 % of the
tokens identical, the rest random: a chart on a white background) and ``near-flat`` (60 % one token plus 1e-4
relative noise: a flat region after position-dependent blocks). Printed per kernel and kind: the median time at each
size, the growth exponent ``log(t(16k) / t(4k)) / log 4`` (2.0 = quadratic) and, at 4k, the share of one forward of
the unmodified Qwen2-VL-2B-shaped vision tower (32 blocks, width 1280, bf16, random weights) on an image of
``--tower`` patches, timed in the same process (``--tower 0`` skips it).

Kernels (what N is for each):
  knn        IPCV's kNN (k = 10) of the 0.65 N pruned patches among the 0.35 N kept ones, then NGR (C = 1280)
  dpc        SparseVLM's recycling clustering: DPC-kNN on p = int(0.3 * 0.65 N) + 1 LLM states, c = k = p // 10
             (C = 1536; the benchmark of ``performance.py selection``)
  matching   ToMe's bipartite matching of N tokens (r = N / 4) on head-averaged keys (C = 80)
  dart       DART-ViT's selection of 0.222 N of N units (C = 1280)
  assign     the ViT adapter's merge-source inference for an untraced step (``update_sources`` without gradient
             trace, pool keep 0.25 on a sqrt(N) x sqrt(N) grid: 0.75 N vanished tokens, C = 384)
  nearest    the ViT adapter's nearest-present restoration after random pruning to 0.5 N (grid kNN)
  spu        LUVC-SPU's low-pass residual energy on a sqrt(N) x sqrt(N) grid (C = 1536)
  raters     SparseVLM's text raters: N visual tokens against 64 text tokens (C = 1536)
"""
from __future__ import annotations

import argparse
import math

import torch

KINDS = ("random", "flat", "half-flat", "near-flat")


def tokens(n: int, c: int, kind: str, seed: int = 0) -> torch.Tensor:
    """[n, c] float32 states of one ``kind`` (see the module docstring), rows in a random spatial order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) + 5.0
    flat = torch.zeros(n, dtype=torch.bool)
    if kind == "flat":
        flat[:] = True
    elif kind in ("half-flat", "near-flat"):
        flat[torch.randperm(n, generator=g)[: int(0.6 * n)]] = True
    x[flat] = x[0].clone()
    if kind == "near-flat":
        x[flat] += 1e-4 * x[0].clone().norm() / math.sqrt(c) * torch.randn(int(flat.sum()), c, generator=g)
    return x


def _side(n: int) -> int:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"grid kernels need a square N, got {n}")
    return s


def kernel(name: str, n: int, kind: str):
    """A zero-argument callable running kernel ``name`` on N = ``n`` tokens of ``kind``."""
    from tokcomp.ops import dart_select, dpc_knn, knn, lowpass_residual_energy, matching_per_segment
    from tokcomp.ops import neighbor_guided_reconstruction
    g = torch.Generator().manual_seed(1)
    if name == "knn":
        x = tokens(n, 1280, kind)
        perm = torch.randperm(n, generator=g)
        k = int(0.35 * n)
        kept, rem = x[perm[:k]], x[perm[k:]]
        drift = torch.randn(k, 1280, generator=g) * 0.01

        def run():
            nn = knn(rem, kept, 10)
            neighbor_guided_reconstruction(rem, drift, nn)
        return run
    if name == "dpc":
        m = int(0.3 * (n - int(0.35 * n))) + 1
        x = tokens(m, 1536, kind)
        c = max(1, m // 10)
        return lambda: dpc_knn(x, c, c)
    if name == "matching":
        x = tokens(n, 80, kind)
        seg = torch.zeros(n, dtype=torch.long)
        return lambda: matching_per_segment(x, seg, n // 4)
    if name == "dart":
        x = tokens(n, 1280, kind)
        cand = torch.arange(n)
        l1 = x.abs().sum(1)
        return lambda: dart_select(l1, x, cand, cand[:0], int(0.222 * n), 4, 0)
    if name in ("assign", "nearest"):
        from tokcomp.adapters._vit_restore import (grid_layout, grid_tokens, initial_sources, restore_full_grid,
                                                   update_sources)
        from tokcomp.plugins.baselines import Pool
        from tokcomp.tokens import VisionContext
        s = _side(n)
        layout = grid_layout(1, s, s, 1)
        before = grid_tokens(torch.cat([tokens(1, 384, "random"), tokens(n, 384, kind)])[None], s, s, 1)
        if name == "assign":
            after = Pool(keep_ratio=0.25).after_block(0, before, VisionContext(layout, 1))
            src = initial_sources(layout.n_tokens)
            return lambda: update_sources(src, before, after)
        keep = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n, generator=g)[: n // 2]]).sort()
        kept = before.select(keep.values)
        return lambda: restore_full_grid(kept, layout, "nearest")
    if name == "spu":
        s = _side(n)
        grid = tokens(n, 1536, kind).view(s, s, 1536)
        return lambda: lowpass_residual_energy(grid, 0.5)
    if name == "raters":
        from tokcomp.plugins.sparsevlm import text_raters
        x = tokens(n, 1536, kind)
        t = torch.randn(64, 1536, generator=g)
        return lambda: text_raters(x, t)
    raise ValueError(f"unknown kernel {name!r}")


def median_time(fn, repeats: int) -> float:
    """:func:`tokcomp.metrics.timers.median_time` after one warm-up call (allocations, first-call dispatch)."""
    from tokcomp.metrics.timers import median_time as timed
    fn()
    return timed(fn, repeats)


def tower_time(patches: int, repeats: int) -> float:
    """Seconds of one unmodified forward of the Qwen2-VL-2B-shaped vision tower (bf16) on ``patches`` patches."""
    from tokcomp.testing import build_model, make_inputs
    from tokcomp.testing.images import procedural_image
    side = _side(patches) * 14
    vlm = build_model("qwen2-vl-2b-shaped", dtype=torch.bfloat16, text_layers=1)
    inputs = make_inputs(vlm, [procedural_image(side, side, seed=0)])
    pv, grid = inputs["pixel_values"].to(torch.bfloat16), inputs["image_grid_thw"]
    assert int(grid.prod()) == patches, f"the processor gave {int(grid.prod())} patches"

    def run():
        with torch.inference_mode():
            vlm.model.model.get_image_features(pixel_values=pv, image_grid_thw=grid)
    return median_time(run, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,4096,16384")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--kernels", default="knn,dpc,matching,dart,assign,nearest,spu,raters")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tower", type=int, default=4096, help="patches of the tower forward (0: skip)")
    p.add_argument("--tower-repeats", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    sizes = [int(x) for x in args.sizes.split(",")]
    tower = tower_time(args.tower, args.tower_repeats) if args.tower else float("nan")
    print(f"threads {torch.get_num_threads()}, repeats {args.repeats} (median), unmodified tower forward "
          f"({args.tower} patches, bf16): {tower:.2f} s", flush=True)
    cols = " | ".join(f"{n} s" for n in sizes)
    print(f"| kernel | input | {cols} | exponent {sizes[-2]}->{sizes[-1]} | % of tower at {args.tower} |")
    print("|---|---|" + "---|" * len(sizes) + "---|---|")
    for name in args.kernels.split(","):
        for kind in args.kinds.split(","):
            ts = [median_time(kernel(name, n, kind), args.repeats) for n in sizes]
            expo = math.log(ts[-1] / ts[-2]) / math.log(sizes[-1] / sizes[-2]) if len(sizes) > 1 else float("nan")
            at = ts[sizes.index(args.tower)] / tower * 100 if args.tower in sizes else float("nan")
            cells = " | ".join(f"{t:.4f}" for t in ts)
            print(f"| {name} | {kind} | {cells} | {expo:.2f} | {at:.2f} % |", flush=True)


if __name__ == "__main__":
    main()
