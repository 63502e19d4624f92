"""``tokcomp run``: one prompt answered with and without a spec, with achieved token counts and timings.

Timings are adapter-agnostic: time to first token (vision tower + prefill, from ``generate(max_new_tokens=1)``),
the whole ``generate``, and decode time per token derived from the two; each is the median of ``repeats`` runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokcomp.metrics.timers import median_time


@dataclass
class Run:
    """One side of the comparison (baseline or with the spec)."""

    answer: str
    ttft_s: float
    total_s: float
    new_tokens: int
    record: Any = None            # tokcomp.session.ForwardRecord of the prefill (None for the baseline)
    vision: Any = None            # the vision ForwardRecord
    extra: dict = field(default_factory=dict)

    @property
    def decode_s_per_token(self) -> float:
        return (self.total_s - self.ttft_s) / max(1, self.new_tokens - 1)


def check_model(model: str) -> None:
    """Refuse, before anything is built, a ``--model`` that is neither a preset nor a local checkpoint folder."""
    from pathlib import Path

    from tokcomp.errors import ConfigError
    from tokcomp.testing.models import MODEL_PRESETS
    if model in MODEL_PRESETS:
        return
    p = Path(model)
    if not p.is_dir() or not (p / "config.json").is_file():
        why = "does not exist" if not p.exists() else "is not a checkpoint folder (no config.json)"
        raise ConfigError(f"--model {model!r} {why}; give a preset ({', '.join(MODEL_PRESETS)}) or a folder saved "
                          "with save_pretrained")


def load(model: str, attn: str = "sdpa", dtype: str = "float32"):
    """``(model, processor, family)`` for a preset name of :mod:`tokcomp.testing` or a local checkpoint path."""
    from tokcomp.errors import ConfigError
    from tokcomp.testing import MODEL_PRESETS, build_model
    check_model(model)
    torch_dtype = getattr(torch, dtype)
    if model in MODEL_PRESETS:
        vlm = build_model(model, attn=attn, dtype=torch_dtype)
        return vlm.model, vlm.processor, vlm
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        m = AutoModelForImageTextToText.from_pretrained(model, attn_implementation=attn, dtype=torch_dtype).eval()
        return m, AutoProcessor.from_pretrained(model), None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--model {model!r} could not be loaded as an image-text-to-text model: "
                          f"{str(exc).splitlines()[0]}") from None


def build_inputs(model, processor, vlm, image, prompt: str):
    """Processor inputs for one image and one user text (chat template applied)."""
    if vlm is not None:
        from tokcomp.testing import make_inputs
        return make_inputs(vlm, [image], prompt)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt").to(model.device)


def extend_inputs(inputs: dict, tokens: torch.Tensor) -> dict:
    """Prompt + ``tokens`` [B, N] as one input dict (teacher forcing / no-cache recompute): ``input_ids``,
    ``attention_mask`` and ``mm_token_type_ids`` (the new tokens are text) extended; everything else as given."""
    ext = dict(inputs)
    ext["input_ids"] = torch.cat([inputs["input_ids"], tokens], 1)
    if inputs.get("attention_mask") is not None:
        ext["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1)
    if inputs.get("mm_token_type_ids") is not None:
        ext["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], 1)
    return ext


def generate_greedy(model, inputs, n: int):
    """Exactly ``n`` greedy new tokens (``[B, L + n]``)."""
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def measure(model, processor, inputs, max_new_tokens: int, repeats: int) -> Run:
    """Answer + timings of the current model state (inside or outside a session)."""
    out = generate_greedy(model, inputs, max_new_tokens)
    prompt_len = inputs["input_ids"].shape[1]
    answer = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)[0]
    ttft = median_time(lambda: generate_greedy(model, inputs, 1), repeats)
    total = median_time(lambda: generate_greedy(model, inputs, max_new_tokens), repeats)
    return Run(answer, ttft, total, int(out.shape[1] - prompt_len))


def compare(model, processor, inputs, spec: str, max_new_tokens: int = 16, repeats: int = 3):
    """``(baseline Run, compressed Run, session)`` for ``spec`` on ``inputs``."""
    import tokcomp
    base = measure(model, processor, inputs, max_new_tokens, repeats)
    session = tokcomp.compress(model, spec)
    with session:
        comp = measure(model, processor, inputs, max_new_tokens, repeats)
    rep = session.report
    comp.record = rep.prefill[-1] if rep.prefill else None
    comp.vision = rep.vision[-1] if rep.vision else None
    return base, comp, session
