"""Accuracy retention: how much answer accuracy each compression keeps, for how much speed.

Every configuration answers the same VQA questions with stock ``model.generate()`` inside a session (exact match,
scored by the caller's ``score`` function) and is compared with the unmodified model on them:

* accuracy, absolute and retained (``acc / acc_unmodified``), and an exact McNemar p-value against the unmodified
  model on the same questions (paired: one configuration's own interval is wide, a paired test is not);
* prefill time ratio: ``generate(max_new_tokens=1)`` on a fixed batch, each repeat timing the unmodified model and
  the configuration back to back (machine drift hits both), the median of the per-repeat ratios;
* FLOPs ratio (vision tower + prefill) from the achieved counts of that batch, and the visual tokens entering the
  LLM (per row, averaged over the decoder layers: what an LLM pruner saves);
* a matched baseline per method: ``random`` at the same budget and the same pruning point (a method that cannot beat
  it is not worth its cost).

Questions are duck-typed: anything with ``.text``, ``.answer`` and an image (see :mod:`tokcomp.tinyllava` for
easy-VQA); ``answer(model, processor, questions) -> list[str]`` and ``score(questions, predictions) -> list[bool]``
are given by the caller.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["Config", "AccuracyRow", "matched_baseline", "configs_for", "run", "table", "write", "mcnemar"]


@dataclass
class Config:
    """One row to measure: ``label`` for the table, ``spec`` (None: the unmodified model), the budget ``keep``, and
    ``baseline_of``: the label of the method this row is the matched baseline of."""

    label: str
    spec: str | None
    keep: float | None = None
    baseline_of: str | None = None


@dataclass
class AccuracyRow:
    label: str
    spec: str | None
    keep: float | None
    baseline_of: str | None = None
    accuracy: float = 0.0
    by_kind: dict = field(default_factory=dict)
    retained: float = 1.0
    p_value: float = 1.0
    prefill_ratio: float = 1.0
    flops_ratio: float = 1.0
    visual_tokens: float = 0.0        # per row, averaged over decoder layers
    llm_visual_in: float = 0.0        # per row, entering the LLM
    seconds: float = 0.0
    error: str | None = None
    hits: list = field(default_factory=list, repr=False)


# ------------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------------
def matched_baseline(spec: str, depths: dict[str, int], registry=None) -> str | None:
    """``random`` at the same budget and pruning point as the configured strategy in ``spec`` (one stage), or None
    where no such baseline exists (patch-granularity compressors: the LLM still sees every token).

    Vision: units dropped at random after the block where the method acts (IPCV-style ``prune_layer`` P: after
    block P-1; ``layer``: after that block; progressive mergers (ToMe, ToFu, LUVC-OIM): after the last block, where
    their budget is reached). LLM: ``random(layer=K)`` with the method's K, or K=2 for progressive pruners (their
    layer-averaged budget equals a one-shot pruner's at K=2)."""
    from tokcomp.spec import parse_spec
    pair = parse_spec(spec, registry)
    s = pair.vision or pair.llm
    keep = s.config.keep_ratio
    budget = f"keep_ratio={keep}" if s.config.num_tokens is None else f"num_tokens={s.config.num_tokens}"
    if s.stage == "llm":
        layer = getattr(s.config, "layer", None) or 2
        return f"none+random({budget},layer={int(layer)})"
    if s.granularity == "patch":
        return None
    cfg = s.config
    if getattr(cfg, "prune_layer", None):
        at = int(cfg.prune_layer) - 1
    elif isinstance(getattr(cfg, "layer", None), int):
        at = int(cfg.layer)
    else:
        at = depths["vision"] - 1
    return f"random({budget},layer={at})+none"


def configs_for(methods: Sequence[str], keeps: Sequence[float], depths: dict[str, int], registry=None,
                baselines: bool = True) -> list[Config]:
    """The unmodified model, then each method spec part (``"tome"``, ``"none+fastv"``, ``"ipcv+dart"``,
    ``"ipcv(stabilize_layers=3)"``: the keep ratio is added to a part's own arguments) at each budget, each single-stage method followed by its matched baseline (once per budget and pruning point)."""
    from tokcomp.spec import parse_spec, split_top, with_budget
    out, seen = [Config("unmodified", None)], set()
    for m in methods:
        names = [n.strip() for n in split_top(m, "+")]
        for k in keeps:
            spec = "+".join(with_budget(n, keep_ratio=k) for n in names)
            pair = parse_spec(spec, registry)                       # names and configs, before any model work
            if len(names) == 1:
                spec = spec + "+none" if pair.vision is not None else "none+" + spec
            label = "+".join(n for n in names if n != "none") or "none"
            out.append(Config(label, spec, k))
            if baselines and sum(n != "none" for n in names) == 1:
                base = matched_baseline(spec, depths, registry)
                if base is not None and base not in seen:
                    seen.add(base)
                    out.append(Config(base.replace("+none", "").replace("none+", ""), base, k, baseline_of=label))
    return out


# ------------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------------
def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value of paired outcomes ``a`` vs ``b`` (binomial test on the discordant pairs)."""
    n01 = sum(1 for x, y in zip(a, b) if x and not y)
    n10 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# ------------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------------
def _prefill(model, batch) -> None:
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=1, do_sample=False)


def _cost(model, batch, spec: str | None, registry):
    """``(vision + prefill FLOPs, visual tokens per row averaged over layers, visual tokens per row into the LLM)``
    of one forward of ``batch`` (the unmodified model is measured in a session of ``none``)."""
    import tokcomp
    with tokcomp.compress(model, spec or "none", registry=registry) as s, torch.inference_mode():
        model(**batch)
    rec = s.report.last
    cost = s.report.cost(new_tokens=1)
    rows = max(1, len(rec.llm_in))
    layers = rec.llm_layers or {0: rec.llm_in}
    per_layer = [sum(v) / rows for v in layers.values()]
    return cost.vision + cost.prefill, sum(per_layer) / len(per_layer), sum(rec.llm_in) / rows


def run(model, processor, questions: Sequence, configs: Sequence[Config], *,
        answer: Callable[[Any, Any, Sequence], list[str]], score: Callable[[Sequence, Sequence[str]], list[bool]],
        kinds: Callable[[Any], str] | None = None, timing_batch: dict, repeats: int = 3, registry=None,
        progress: Callable[[str], None] | None = None) -> list[AccuracyRow]:
    """Measure every configuration (see the module docstring); the first must be the unmodified model. A
    configuration that fails gets a row with ``error`` set (the others still run)."""
    import time

    import tokcomp
    from tokcomp.metrics.timers import median_time
    if not configs or configs[0].spec is not None:
        raise ValueError("the first configuration must be the unmodified model (spec None)")
    rows: list[AccuracyRow] = []
    base_row = None
    for cfg in configs:
        row = AccuracyRow(cfg.label, cfg.spec, cfg.keep, cfg.baseline_of)
        t0 = time.perf_counter()
        try:
            if cfg.spec is None:
                preds = answer(model, processor, questions)
            else:
                with tokcomp.compress(model, cfg.spec, registry=registry):
                    preds = answer(model, processor, questions)
            row.hits = list(score(questions, preds))
            row.accuracy = sum(row.hits) / max(1, len(row.hits))
            if kinds is not None:
                for kind in sorted({kinds(q) for q in questions}):
                    sel = [h for q, h in zip(questions, row.hits) if kinds(q) == kind]
                    row.by_kind[kind] = sum(sel) / len(sel)
            flops, row.visual_tokens, row.llm_visual_in = _cost(model, timing_batch, cfg.spec, registry)
            if cfg.spec is None:
                base_row, base_flops = row, flops
            else:
                row.retained = row.accuracy / base_row.accuracy if base_row.accuracy else float("nan")
                row.p_value = mcnemar(base_row.hits, row.hits)
                row.flops_ratio = flops / base_flops
                ratios = []
                for _ in range(repeats):              # interleaved: unmodified, then this configuration
                    _prefill(model, timing_batch)     # warm-up
                    b = median_time(lambda: _prefill(model, timing_batch), 1)
                    with tokcomp.compress(model, cfg.spec, registry=registry):
                        _prefill(model, timing_batch)
                        c = median_time(lambda: _prefill(model, timing_batch), 1)
                    ratios.append(c / b)
                row.prefill_ratio = statistics.median(ratios)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
            if cfg.spec is None:
                raise
            row.error = f"{type(exc).__name__}: {exc}"
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        if progress is not None:
            progress(cfg.label if cfg.keep is None else f"{cfg.label} {cfg.keep}")
    return rows


# ------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------
def table(rows: Sequence[AccuracyRow], kinds: Sequence[str] = ()) -> str:
    """A markdown table: accuracy (absolute and retained), p vs unmodified, prefill and FLOPs ratios, tokens."""
    head = ["config", "keep", "accuracy", "retained", "p vs unmod.", *kinds, "prefill time", "FLOPs",
            "visual tokens (layer avg)", "into LLM"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        keep = "-" if r.keep is None else f"{r.keep:g}"
        label = r.label if r.baseline_of is None else f"  {r.label} (baseline of {r.baseline_of})"
        if r.error:
            out.append(f"| {label} | {keep} | error: {r.error[:70]} |" + " |" * (len(head) - 3))
            continue
        cells = [label, keep, f"{100 * r.accuracy:.1f} %", f"{100 * r.retained:.1f} %",
                 "-" if r.spec is None else f"{r.p_value:.3g}"]
        cells += [f"{100 * r.by_kind[k]:.1f} %" if k in r.by_kind else "-" for k in kinds]
        cells += [f"{r.prefill_ratio:.2f}x", f"{r.flops_ratio:.2f}x", f"{r.visual_tokens:.1f}", f"{r.llm_visual_in:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write(rows: Sequence[AccuracyRow], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """``accuracy.json`` (rows with per-question hits, and ``meta``), ``accuracy.md`` and ``accuracy.png``
    (accuracy against prefill time ratio) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "accuracy.json", "md": out / "accuracy.md", "png": out / "accuracy.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    paths["md"].write_text(table(rows, meta.get("kinds", ())) + "\n")
    _plot(rows, paths["png"])
    return paths


def _plot(rows: Sequence[AccuracyRow], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    groups: dict[str, list[AccuracyRow]] = {}
    for r in rows:
        if r.error is None:
            groups.setdefault(r.label, []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r.prefill_ratio)
        style = "o--" if rs[0].baseline_of else ("*" if rs[0].spec is None else "o-")
        ax.plot([r.prefill_ratio for r in rs], [100 * r.accuracy for r in rs], style, label=label, ms=8)
    ax.set_xlabel("prefill time (ratio to the unmodified model)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
