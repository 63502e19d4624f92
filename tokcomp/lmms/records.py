"""The per-document tokcomp record, its de-duplicated gathering across ranks, and the summary next to the scores.

One record per (task, doc_id): what the session measured for that document's prefill and generation. Records are
flat (the "tokcomp columns", docs/evaluation.md); lists are per layer / per block. Counts are achieved counts,
FLOPs the analytic model of :mod:`tokcomp.metrics.flops` from those counts, the ``*_unmodified`` columns the same
model and formulas at the original counts (the unmodified model, computed, not run).
"""
from __future__ import annotations

from typing import Any, Iterable

#: scalar columns averaged by :func:`summarize` (in this order in tables)
SCALARS = ("prompt_tokens", "llm_prompt_tokens", "effective_prompt_tokens", "visual_tokens",
           "visual_tokens_vision", "visual_tokens_llm", "visual_tokens_last", "vision_tokens_in", "new_tokens",
           "tflops_vision", "tflops_prefill", "tflops_decode", "tflops_total", "tflops_unmodified", "kv_bytes",
           "kv_bytes_unmodified", "vision_s", "prefill_s", "ttft_s", "decode_s_per_token", "generate_s")


def document_record(session, input_ids, new_tokens: int, generate_s: float, elem_bytes: int) -> dict[str, Any]:
    """The record of one document (one row, no padding) after ``generate`` (or one forward) in ``session``.

    Args:
        session: the closed :class:`tokcomp.session.Session` the document ran in.
        input_ids: ``[1, L]`` the processor's prompt (the unmodified prompt).
        new_tokens: tokens generated (0 for a scoring forward).
        generate_s: wall time of the ``generate`` call (synchronised).
        elem_bytes: bytes per element of the KV cache (the model's compute dtype).
    """
    from tokcomp.metrics.cost import record_cost
    from tokcomp.metrics.flops import kv_bytes_formula
    from tokcomp.session import ForwardRecord

    ids = input_ids[0]
    placeholders = list(session.adapter.placeholder_ids().values())
    prompt = int(ids.numel())
    visual = int(sum(int((ids == p).sum()) for p in placeholders))
    text = prompt - visual
    report = session.report
    rec = report.prefill[0] if report.prefill else None
    if rec is None or not rec.llm_in:          # a prompt without images: nothing was compressed
        rec = ForwardRecord(llm_in=[visual], llm_text=[text])
    dims = report.dims
    n_layers = dims[1].layers if dims is not None else max(rec.llm_layers, default=-1) + 1
    per_layer = [int(rec.llm_layers[i][0]) if i in rec.llm_layers else int(rec.llm_in[0]) for i in range(n_layers)]
    llm_text = int(rec.llm_text[0]) if rec.llm_text else text
    out: dict[str, Any] = {
        "spec": session.spec,
        "prompt_tokens": prompt,
        "llm_prompt_tokens": llm_text + int(rec.llm_in[0]),
        "effective_prompt_tokens": llm_text + (sum(per_layer) / len(per_layer) if per_layer else 0.0),
        "visual_tokens": visual,
        "visual_tokens_vision": int(rec.llm_in[0]),
        "visual_tokens_llm": sum(per_layer) / len(per_layer) if per_layer else 0.0,
        "visual_tokens_last": per_layer[-1] if per_layer else 0,
        "visual_tokens_per_layer": per_layer,
        "vision_tokens_in": int(rec.vision_in),
        "vision_tokens_per_block": [int(rec.vision_blocks[i]) for i in sorted(rec.vision_blocks)],
        "new_tokens": int(new_tokens),
    }
    if dims is not None:
        cost = report.cost(max(1, new_tokens), rec)
        base = ForwardRecord(vision_in=rec.vision_in, vision_segments=list(rec.vision_segments),
                             vision_out=[visual] if rec.vision_in else [], llm_in=[visual], llm_text=[text])
        unmod = record_cost(dims, base, report.vision_depth, [text], max(1, new_tokens))
        out.update(tflops_vision=cost.vision / 1e12, tflops_prefill=cost.prefill / 1e12,
                   tflops_decode=cost.decode / 1e12, tflops_total=cost.total / 1e12,
                   tflops_unmodified=unmod.total / 1e12,
                   kv_bytes_unmodified=kv_bytes_formula(dims[1], [prompt] * n_layers, elem_bytes))
    if rec.kv_bytes is not None:
        out["kv_bytes"] = int(rec.kv_bytes)
    t = report.times
    if t is not None:
        out.update(vision_s=sum(t.vision), prefill_s=sum(t.prefill), ttft_s=sum(t.vision) + sum(t.prefill),
                   decode_s_per_token=t.decode_per_token)
    out["generate_s"] = float(generate_s)
    return out


def gather(records: dict[tuple[str, Any], dict], dist=None) -> dict[tuple[str, Any], dict] | None:
    """Every rank's records on rank 0, one per (task, doc_id) (the first rank's wins: lmms-eval pads short ranks
    with copies of their last request, and ``repeats`` run a document several times); None on other ranks.

    ``dist``: ``torch.distributed`` when a process group is up, else None (one process)."""
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(records)
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(list(records.items()), parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged: dict[tuple[str, Any], dict] = {}
    for part in parts:
        for key, rec in part:
            merged.setdefault(tuple(key), rec)
    return merged


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(records: Iterable[dict]) -> dict[str, float]:
    """Means of the scalar columns over documents, plus the run's ratios (sums over documents, so long documents
    weigh more): ``visual_keep`` (layer-averaged LLM visual tokens / original), ``tflops_ratio``, ``kv_ratio``."""
    recs = list(records)
    out: dict[str, float] = {"docs": float(len(recs))}
    for key in SCALARS:
        vals = [float(r[key]) for r in recs if r.get(key) is not None]
        if vals:
            out[key] = _mean(vals)

    def ratio(num: str, den: str) -> float | None:
        d = sum(float(r.get(den) or 0) for r in recs)
        return sum(float(r.get(num) or 0) for r in recs) / d if d else None
    for name, num, den in (("visual_keep", "visual_tokens_llm", "visual_tokens"),
                           ("tflops_ratio", "tflops_total", "tflops_unmodified"),
                           ("kv_ratio", "kv_bytes", "kv_bytes_unmodified")):
        r = ratio(num, den)
        if r is not None:
            out[name] = r
    return out


def by_task(records: dict[tuple[str, Any], dict]) -> dict[str, dict[str, float]]:
    """:func:`summarize` per task, plus ``"all"``."""
    tasks: dict[str, list[dict]] = {}
    for (task, _), rec in sorted(records.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        tasks.setdefault(task, []).append(rec)
    out = {t: summarize(rs) for t, rs in tasks.items()}
    if len(tasks) != 1:
        out["all"] = summarize(records.values())
    return out


def table(summaries: dict[str, dict[str, float]], spec: str) -> str:
    """A markdown table of per-task summaries (what ``--model tokcomp`` prints after the run)."""
    head = ("| task | docs | visual tokens: prompt -> LLM (avg over layers) | keep | prompt tokens -> effective | "
            "TFLOPs (x unmodified) | KV MB (x unmodified) | TTFT ms | generate s |")
    rows = [f"tokcomp `{spec}`", "", head, "|" + "---|" * 9]
    for task, s in summaries.items():
        def g(k, scale=1.0, fmt="{:.1f}"):
            return fmt.format(s[k] * scale) if k in s else "-"
        rows.append(f"| {task} | {int(s['docs'])} | {g('visual_tokens')} -> {g('visual_tokens_llm')} | "
                    f"{g('visual_keep', fmt='{:.3f}')} | {g('prompt_tokens')} -> {g('effective_prompt_tokens')} | "
                    f"{g('tflops_total', fmt='{:.4g}')} ({g('tflops_ratio', fmt='{:.3f}')}) | "
                    f"{g('kv_bytes', 1 / 2**20, '{:.3f}')} ({g('kv_ratio', fmt='{:.3f}')}) | "
                    f"{g('ttft_s', 1e3)} | {g('generate_s', fmt='{:.3f}')} |")
    return "\n".join(rows)
