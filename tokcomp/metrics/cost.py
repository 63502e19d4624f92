"""FLOPs of one recorded forward: vision tower + merger, LLM prefill, and decoding, from achieved counts.

Uses :mod:`tokcomp.metrics.flops` with the model's dimensions (``adapter.dims()``) and a
:class:`~tokcomp.session.ForwardRecord`. Where a record lacks the per-segment split of a vision block, the block's
tokens are split over segments in the proportions of the call's initial segments (exact for per-segment budgets).
"""
from __future__ import annotations

from dataclasses import dataclass

from tokcomp.metrics import flops as F


@dataclass
class Cost:
    """FLOPs split by stage (one forward of the whole batch, ``new_tokens`` decode steps)."""

    vision: int = 0
    prefill: int = 0
    decode: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.prefill + self.decode

    def as_dict(self) -> dict:
        return {"vision_tflops": self.vision / 1e12, "prefill_tflops": self.prefill / 1e12,
                "decode_tflops": self.decode / 1e12, "total_tflops": self.total / 1e12}


def _split(n: int, shares: list[int]) -> list[int]:
    """``n`` tokens over segments proportionally to ``shares`` (largest remainder)."""
    tot = sum(shares)
    if not shares or tot == 0:
        return [n]
    raw = [n * s / tot for s in shares]
    out = [int(r) for r in raw]
    for j in sorted(range(len(raw)), key=lambda j: out[j] - raw[j])[: n - sum(out)]:
        out[j] += 1
    return out


def vision_cost(d: F.VisionDims, rec, depth: int) -> int:
    """Vision tower blocks (achieved token counts per block) + merger on the surviving units."""
    if not rec.vision_in:
        return 0
    shares = list(getattr(rec, "vision_segments", []) or [rec.vision_in])
    total, n_in = 0, rec.vision_in
    runs = getattr(rec, "vision_block_runs", {}) or {}
    for i in range(depth):
        if i in runs:
            q_seg, kv_seg, mlp = runs[i]
            total += F.vision_block(d, list(q_seg), list(kv_seg), mlp)
        else:
            total += F.vision_block(d, _split(n_in, shares))
        n_in = rec.vision_blocks.get(i, n_in)
    units = sum(rec.vision_out) if rec.vision_out else rec.vision_in // 4
    return total + F.merger(d, units)


def llm_cost(d: F.LLMDims, rec, text_per_row: list[int], new_tokens: int) -> tuple[int, int]:
    """``(prefill, decode)`` FLOPs summed over rows; ``text_per_row`` = non-visual valid prompt tokens per row."""
    prefill = decode = 0
    for b, text in enumerate(text_per_row):
        vis0 = rec.llm_in[b] if b < len(rec.llm_in) else 0
        per_layer = [text + (rec.llm_layers.get(i, [vis0] * (b + 1))[b] if rec.llm_layers else vis0)
                     for i in range(d.layers)]
        prefill += F.prefill(d, per_layer)
        for t in range(max(0, new_tokens - 1)):          # the first new token comes from the prefill's logits
            decode += F.decode_step(d, [n + t for n in per_layer])
    return prefill, decode


def record_cost(dims, rec, depth: int, text_per_row: list[int], new_tokens: int) -> Cost:
    """:class:`Cost` of one forward record given ``dims = (VisionDims, LLMDims)``."""
    vd, ld = dims
    p, dcd = llm_cost(ld, rec, text_per_row, new_tokens)
    return Cost(vision_cost(vd, rec, depth), p, dcd)
