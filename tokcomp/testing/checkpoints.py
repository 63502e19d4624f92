"""Tiny presets saved as real checkpoints: ``from_pretrained`` loads them like a hub model, offline.

``save_checkpoint("tiny-qwen2-vl", dir)`` writes the model (safetensors, config, generation config) and its processor
under the stock processor class (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``InternVLProcessor``,
``LlavaProcessor``), so code that loads checkpoints by their saved class names (lmms-eval wrappers, tokcomp's own
loader) meets the tiny model exactly as it meets a real one; only the weights are random and the vocabulary tiny.
"""
from __future__ import annotations

import json
from pathlib import Path

#: preset family / arch -> the processor class a real checkpoint of that family names
STOCK_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                    "internvl": "InternVLProcessor", "llava": "LlavaProcessor"}


def save_checkpoint(name: str, path: str | Path, **build_kwargs) -> Path:
    """Build preset ``name`` (:func:`tokcomp.testing.build_model`, ``build_kwargs`` passed on) and save it to
    ``path`` as a checkpoint folder; returns the folder."""
    from .models import build_model
    vlm = build_model(name, **build_kwargs)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vlm.model.save_pretrained(out)
    vlm.processor.save_pretrained(out)
    stock = STOCK_PROCESSORS[vlm.arch]
    for fname in ("processor_config.json", "tokenizer_config.json"):
        f = out / fname
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg["processor_class"] = stock
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
