"""Wall-clock timers on modules, installed as forward (pre-)hooks through an adapter's :class:`~tokcomp.adapter.Surgery`.

A stage's time is measured from its module's pre-hook to its forward hook; on CUDA both ends synchronise first,
so the number is the GPU time of that stage, not the launch time. LLM calls are split into prefill (more than one
new token per row) and decode steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn()`` (CUDA-synchronised after each call when CUDA is present)."""
    import statistics
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _sync(module) -> None:
    p = next(module.parameters(), None)
    if p is not None and p.is_cuda:
        torch.cuda.synchronize(p.device)


@dataclass
class StageTimes:
    """Seconds per call: ``vision`` (tower calls), ``prefill`` and ``decode`` (LLM calls)."""

    vision: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)

    @property
    def decode_per_token(self) -> float:
        return sum(self.decode) / len(self.decode) if self.decode else 0.0

    def as_dict(self) -> dict:
        return {"vision_s": sum(self.vision), "prefill_s": sum(self.prefill),
                "decode_s_per_token": self.decode_per_token, "decode_steps": len(self.decode)}


class StageTimer:
    """Times the vision tower and the language model of one model (attach through a Surgery)."""

    def __init__(self) -> None:
        self.times = StageTimes()
        self._t0: dict[str, float] = {}

    def attach(self, surgery, vision=None, llm=None) -> None:
        if vision is not None:
            surgery.pre_hook(vision, lambda m, a, k: self._start("vision", m))
            surgery.post_hook(vision, lambda m, a, k, o: self._stop("vision", m))
        if llm is not None:
            surgery.pre_hook(llm, lambda m, a, k: self._start("llm", m))
            surgery.post_hook(llm, lambda m, a, k, o: self._stop_llm(m, a, k))

    def _start(self, key: str, module) -> None:
        _sync(module)
        self._t0[key] = time.perf_counter()

    def _stop(self, key: str, module) -> None:
        _sync(module)
        self.times.vision.append(time.perf_counter() - self._t0.pop(key))

    def _stop_llm(self, module, args, kwargs) -> None:
        _sync(module)
        dt = time.perf_counter() - self._t0.pop("llm")
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        q = x.shape[1] if x is not None and x.dim() >= 2 else 1
        (self.times.prefill if q > 1 else self.times.decode).append(dt)
