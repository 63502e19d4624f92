"""``tokcomp bench``: every pair × budget against the unmodified model, in one run.

For each configuration (``none`` = the unmodified model, measured without any session):

- latency: median wall time of ``generate(max_new_tokens)``; prefill: median time to first token
  (``generate(max_new_tokens=1)``: vision tower + prefill);
- TFLOPs from the achieved counts (vision / prefill / decode split, :mod:`tokcomp.metrics.cost`);
- KV cache MB measured from the real cache after prefill;
- fidelity against the unmodified model on the same inputs: the unmodified model's greedy continuation is
  teacher-forced through the compressed model; top-1 agreement and KL(p_unmodified || p_compressed) of the
  next-token distributions over those positions; greedy agreement = fraction of positions where the compressed
  model's own greedy tokens equal the unmodified ones; vision cosine = mean cosine of the visual tokens entering the
  LLM, where both sides have them.

All numbers are averaged over the images (each a batch of one). Ratios are against the ``none`` row.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokcomp.adapters._hf import output_cache
from tokcomp.metrics.cost import record_cost
from tokcomp.metrics.flops import kv_bytes
from tokcomp.metrics.timers import median_time
from tokcomp.run import extend_inputs, generate_greedy


@dataclass
class Row:
    """One configuration's measurements (means over images)."""

    pair: str
    keep: float | None
    spec: str
    latency_s: float = 0.0
    prefill_s: float = 0.0
    tflops: float = 0.0
    vision_tflops: float = 0.0
    prefill_tflops: float = 0.0
    decode_tflops: float = 0.0
    kv_mb: float = 0.0
    visual_tokens: float = 0.0
    top1: float = 1.0
    kl: float = 0.0
    greedy: float = 1.0
    vision_cos: float | None = None
    counts: dict = field(default_factory=dict)
    error: str | None = None


def specs_for(pairs: str, keeps: list[float], registry) -> list[tuple[str, float | None, str | None]]:
    """``[(pair, keep, spec or None)]``: ``"ipcv+dart,tome,none"`` × keeps; ``none`` appears once (keep None). A part
    may carry its own arguments (``"ipcv(stabilize_layers=3)+dart"``): the keep ratio is added to them."""
    from tokcomp.spec import parse_spec, split_top, with_budget
    out = [("none", None, None)]
    for pair in [p.strip() for p in split_top(pairs, ",") if p.strip()]:
        if pair == "none":
            continue
        names = [n.strip() for n in split_top(pair, "+")]
        for k in keeps:
            spec = "+".join(with_budget(n, keep_ratio=k) for n in names)
            parse_spec(spec, registry)  # validate names / stages before any model work
            out.append((pair, k, spec))
    return out


@dataclass
class _Base:
    tokens: torch.Tensor          # [1, N] greedy continuation
    logp: torch.Tensor            # [N, V] log-probs at those positions
    feats: torch.Tensor | None    # [U, D] visual tokens entering the LLM


def _logp(model, inputs, cont) -> torch.Tensor:
    """Log-probs [N, V] of the positions predicting ``cont`` [1, N] (indexed from the end: a session may re-pack
    the prompt to fewer tokens)."""
    n = cont.shape[1]
    with torch.inference_mode():
        logits = model(**extend_inputs(inputs, cont), use_cache=False).logits
    return F.log_softmax(logits[0, -(n + 1):-1].float(), -1)


def _features(adapter, inputs):
    try:
        with torch.inference_mode():
            return adapter.image_features(inputs).float()
    except NotImplementedError:
        return None


def _measure_state(model, inputs, new_tokens, repeats):
    """Timings, KV bytes and the greedy continuation of the model in its current state (session or not)."""
    L = inputs["input_ids"].shape[1]
    lat = median_time(lambda: generate_greedy(model, inputs, new_tokens), repeats)
    ttft = median_time(lambda: generate_greedy(model, inputs, 1), repeats)
    with torch.inference_mode():
        kv = kv_bytes(output_cache(model(**inputs, use_cache=True)))
    return lat, ttft, kv, generate_greedy(model, inputs, new_tokens)[:, L:]


def measure(model, inputs_list, spec, bases, *, new_tokens, repeats, registry, adapter_cls) -> Row:
    """Measure one configuration (``spec`` None = the unmodified model, timed outside any session) over
    ``inputs_list``; for ``spec`` None, ``bases`` receives the reference continuation of every input."""
    import tokcomp
    row = Row(pair="", keep=None, spec=spec or "none")
    agg: dict[str, list[float]] = {}
    for j, inputs in enumerate(inputs_list):
        text = [int(inputs["attention_mask"][0].sum()) - int(_n_visual(model, inputs))]
        if spec is None:
            lat, ttft, kv, gen = _measure_state(model, inputs, new_tokens, repeats)
            bases.append(_Base(gen, _logp(model, inputs, gen), _features(adapter_cls(model), inputs)))
            vals = {"top1": 1.0, "kl": 0.0, "greedy": 1.0}
            session = tokcomp.compress(model, "none", registry=registry)   # only to record the full counts
            with session, torch.inference_mode():
                model(**inputs)
        else:
            base = bases[j]
            session = tokcomp.compress(model, spec, registry=registry)
            with session:
                lat, ttft, kv, gen = _measure_state(model, inputs, new_tokens, repeats)
                lp = _logp(model, inputs, base.tokens)
                vals = {"top1": float((lp.argmax(-1) == base.logp.argmax(-1)).float().mean()),
                        "kl": float((base.logp.exp() * (base.logp - lp)).sum(-1).mean()),
                        "greedy": float((gen == base.tokens).float().mean())}
                feats = _features(session.adapter, inputs)
                with torch.inference_mode():
                    model(**inputs)                     # the prefill whose counts the row reports
            if feats is not None and base.feats is not None and feats.shape == base.feats.shape:
                have = feats.abs().sum(-1) > 0
                vals["vision_cos"] = float(F.cosine_similarity(feats[have], base.feats[have], -1).mean())
        rec = session.report.prefill[-1] if session.report.prefill else None
        if rec is not None:
            try:
                cost = record_cost(session.adapter.dims(), rec, session.adapter.depths()["vision"], text,
                                   new_tokens)
                vals.update(tflops=cost.total / 1e12, vision_tflops=cost.vision / 1e12,
                            prefill_tflops=cost.prefill / 1e12, decode_tflops=cost.decode / 1e12)
            except NotImplementedError:
                pass
            per_layer = [sum(v) for v in rec.llm_layers.values()] or [sum(rec.llm_in)]
            vals["visual_tokens"] = float(statistics.mean(per_layer))   # layer-averaged ("equal tokens")
            if j == 0:
                row.counts = {"vision_blocks": rec.vision_blocks, "vision_out": rec.vision_out, "llm_in": rec.llm_in,
                              "llm_layers": {str(k): v for k, v in rec.llm_layers.items()}}
        vals.update(latency_s=lat, prefill_s=ttft, kv_mb=kv / 2 ** 20)
        for k, v in vals.items():
            agg.setdefault(k, []).append(v)
    for k, v in agg.items():
        setattr(row, k, sum(v) / len(v))
    return row


def _n_visual(model, inputs) -> int:
    ids = inputs["input_ids"][0]
    toks = {getattr(model.config, a, None) for a in ("image_token_id", "video_token_id")} - {None}
    return int(sum((ids == t).sum() for t in toks))


def run(model, inputs_list, pairs: str, keeps: list[float], *, new_tokens: int = 8, repeats: int = 3,
        registry=None, progress: bool = True) -> list[Row]:
    """Every configuration of ``pairs`` × ``keeps`` plus the unmodified model; see the module docstring."""
    from tokcomp.registry import default_registry
    reg = registry or default_registry()
    configs = specs_for(pairs, keeps, reg)
    adapter_cls = reg.resolve_adapter(model)
    rows, bases = [], []
    bar = progress_bar(len(configs), progress)
    for pair, keep, spec in configs:
        try:
            r = measure(model, inputs_list, spec, bases, new_tokens=new_tokens, repeats=repeats, registry=reg,
                        adapter_cls=adapter_cls)
        except Exception as exc:  # noqa: BLE001 - one failing pair must not hide the others
            if spec is None:
                raise
            r = Row(pair="", keep=keep, spec=spec, error=f"{type(exc).__name__}: {exc}")
        r.pair, r.keep = pair, keep
        rows.append(r)
        bar(f"{pair} {keep if keep is not None else ''}")
    return rows


def progress_bar(total: int, enabled: bool):
    """``step(label)``: a one-line progress bar on stderr (nothing when disabled)."""
    import sys
    state = {"i": 0}

    def step(label: str) -> None:
        state["i"] += 1
        if enabled:
            done = int(30 * state["i"] / total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {state['i']}/{total} {label:<28}")
            if state["i"] == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return step


def table(rows: list[Row]) -> str:
    """The IPCV-paper-style efficiency table (each value also relative to the unmodified model)."""
    base = rows[0]
    rel = lambda v, b: f"{v / b:.2f}x" if b else "-"  # noqa: E731
    head = ("pair", "keep", "latency ms", "prefill ms", "TFLOPs", "KV MB", "vis tok (layer avg)", "top-1", "KL", "greedy",
            "vis cos")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.pair} | {r.keep} | error: {r.error[:80]} |" + " |" * (len(head) - 3))
            continue
        lines.append("| " + " | ".join([
            r.pair, "-" if r.keep is None else f"{r.keep:g}",
            f"{r.latency_s * 1e3:.1f} ({rel(r.latency_s, base.latency_s)})",
            f"{r.prefill_s * 1e3:.1f} ({rel(r.prefill_s, base.prefill_s)})",
            f"{r.tflops:.4g} ({rel(r.tflops, base.tflops)})",
            f"{r.kv_mb:.3g} ({rel(r.kv_mb, base.kv_mb)})",
            f"{r.visual_tokens:.0f}", f"{r.top1:.2f}", f"{r.kl:.3f}", f"{r.greedy:.2f}",
            "-" if r.vision_cos is None else f"{r.vision_cos:.3f}"]) + " |")
    return "\n".join(lines)


def write(rows: list[Row], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` (fidelity vs relative latency) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    paths["md"].write_text(table(rows) + "\n")
    _plot(rows, paths["png"])
    return paths


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pairs = sorted({r.pair for r in rows if r.error is None})
    markers = "os^vD<>pP*hX"
    for i, pair in enumerate(pairs):
        rs = [r for r in rows if r.pair == pair and r.error is None]
        x = [r.latency_s / base.latency_s for r in rs]
        y = [r.top1 for r in rs]
        ax.plot(x, y, marker=markers[i % len(markers)], linestyle="-" if len(rs) > 1 else "", label=pair)
        for r, xi, yi in zip(rs, x, y):
            if r.keep is not None:
                ax.annotate(f"{r.keep:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("latency relative to the unmodified model")
    ax.set_ylabel("top-1 agreement with the unmodified model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def exit_status(rows) -> int:
    """1 (with one line on stderr) when every compressed row failed (the first row is the unmodified model), else 0:
    a benchmark that compared nothing must not look like a success. Works for any rows with an ``error`` field."""
    import sys
    failed = [r for r in rows if r.error is not None]
    if failed and len(failed) == len(rows) - 1:
        print(f"tokcomp: error: every compressed configuration failed ({len(failed)}); see the table", file=sys.stderr)
        return 1
    return 0
