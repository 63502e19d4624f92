"""Offline tiny models and inputs for testing visual-token compressors and adapters.

    from tokcomp.testing import build_model, make_inputs, default_images
    vlm = build_model("tiny-qwen2-vl")                    # TinyVLM(model, processor, tokenizer, family, name)
    inputs = make_inputs(vlm, [default_images()[0], None])  # 2 rows, left padded: image prompt + text-only
    out = vlm.model.generate(**inputs, max_new_tokens=6)

Names are imported lazily (PEP 562), so `import tokcomp.testing` (and the pytest plugin) does not import
transformers until a model or input builder is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # models
    "TinyVLM": "models",
    "PresetSpec": "models",
    "MODEL_PRESETS": "models",
    "build_model": "models",
    "build_config": "models",
    "Qwen2VLImageOnlyProcessor": "models",
    "Qwen2_5_VLImageOnlyProcessor": "models",
    "InternVLImageOnlyProcessor": "models",
    # tokenizers
    "build_qwen_vl_tokenizer": "tokenizers",
    "build_llava_tokenizer": "tokenizers",
    "build_internvl_tokenizer": "tokenizers",
    # images
    "IMAGE_KINDS": "images",
    "procedural_image": "images",
    "procedural_video": "images",
    "default_images": "images",
    # inputs
    "Video": "inputs",
    "make_inputs": "inputs",
    "make_video_inputs": "inputs",
    "patchify_video": "inputs",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .images import IMAGE_KINDS, default_images, procedural_image, procedural_video
    from .inputs import Video, make_inputs, make_video_inputs, patchify_video
    from .models import (
        MODEL_PRESETS,
        InternVLImageOnlyProcessor,
        PresetSpec,
        Qwen2_5_VLImageOnlyProcessor,
        Qwen2VLImageOnlyProcessor,
        TinyVLM,
        build_config,
        build_model,
    )
    from .tokenizers import build_internvl_tokenizer, build_qwen_vl_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
