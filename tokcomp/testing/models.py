"""Named presets of randomly initialised VLMs (Qwen2-VL, Qwen2.5-VL, InternVL3-style), built fully offline.

`build_model(name, **overrides)` returns a `TinyVLM` bundle: the model (eval mode), an image-only processor that
needs no torchvision, and the in-process tokenizer from `tokcomp.testing.tokenizers`. Presets:

* `tiny-qwen2-vl`, `tiny-qwen2.5-vl`, `tiny-internvl`: width 64, 4 vision blocks, 4 LLM layers. Forward takes a
  few ms on one CPU thread. Use them for unit tests of adapters and compressors.
* `qwen2-vl-2b-shaped`, `internvl3-1b-shaped`: real depths and widths with random weights and the tiny vocabulary,
  for benchmarks. Build them with `device="cuda"` (or `"meta"` to inspect shapes without allocating).

Overrides: `vision_layers=`, `text_layers=`, `width=` (both towers' hidden sizes; head counts are refitted so that
head_dim stays valid, intermediate sizes scale with the width) and any other `PresetSpec` field by name, e.g.
`build_model("tiny-qwen2-vl", vision_layers=32, text_layers=28)` for real depths with tiny widths.

Random weights are made non-degenerate on purpose: the LLM uses `initializer_range = 0.2 * sqrt(64 / width)`
(0.2 at width 64) and untied embeddings for the tiny presets, so greedy decoding does not repeat one token. The
vision placeholder tokens are suppressed in `model.generation_config.suppress_tokens`, as a real checkpoint never
emits them.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from transformers import (
    CLIPImageProcessorPil,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from tokcomp.adapters._hf import from_config

from .tokenizers import build_internvl_tokenizer, build_llava_tokenizer, build_qwen_vl_tokenizer

__all__ = [
    "PresetSpec",
    "TinyVLM",
    "MODEL_PRESETS",
    "build_model",
    "build_config",
    "Qwen2VLImageOnlyProcessor",
    "Qwen2_5_VLImageOnlyProcessor",
    "InternVLImageOnlyProcessor",
]

_ARCH_TO_FAMILY = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "internvl": "internvl", "llava": "llava"}


# --------------------------------------------------------------------------------------------------------------
# Processors without the torchvision-only video sub-processor
# --------------------------------------------------------------------------------------------------------------
class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor (the stock one needs torchvision). Images only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor (the stock one needs torchvision). Images only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """`InternVLProcessor` without a video processor (the stock one needs torchvision). Images only."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(
            image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template, **kwargs
        )


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PresetSpec:
    """Shape of one preset. Every field can be overridden by name through `build_model(name, field=value)`."""

    arch: str  # "qwen2_vl" | "qwen2_5_vl" | "internvl" | "llava"
    description: str
    # vision tower (ViT width = `vision_width`; MLP width = vision_width * vision_mlp_ratio)
    vision_layers: int
    vision_width: int
    vision_heads: int
    vision_mlp_ratio: int
    # language model
    text_layers: int
    text_width: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] = (2, 3, 3)  # Qwen only; rescaled to sum to head_dim // 2 if it does not
    text_init_range: float | None = None  # None -> 0.2 * sqrt(64 / text_width)
    vision_init_range: float | None = None  # None -> 0.02 (the transformers default)
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    patch_size: int = 14
    # Qwen image processor (pixels of the resized image)
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 64
    # Qwen2.5-VL window attention (window_size in pixels; None -> every max(2, depth // 4)-th block is full)
    window_size: int = 56
    fullatt_block_indexes: tuple[int, ...] | None = None
    tokens_per_second: int = 2
    # InternVL tiling
    tile_size: int = 56
    min_patches: int = 1
    max_patches: int = 4
    downsample_ratio: float = 0.5
    vision_norm: str = "layer_norm"
    vision_qk_norm: bool = False
    # LLaVA: a vision tower ("clip", "siglip": no CLS, features "full", or "dinov2") at image_size x image_size
    # (square resize), features of vision_feature_layer
    image_size: int = 84
    vision_feature_layer: int = -2
    llava_tower: str = "clip"

    @property
    def family(self) -> str:
        """Adapter family: `"qwen2_vl"` (also for Qwen2.5-VL), `"internvl"` or `"llava"`."""
        return _ARCH_TO_FAMILY[self.arch]

    @property
    def image_seq_length(self) -> int:
        """InternVL: LLM tokens per tile, (tile_size / patch_size)^2 * downsample_ratio^2."""
        return int(round((self.tile_size // self.patch_size) ** 2 * self.downsample_ratio**2))

    @property
    def resolved_text_init_range(self) -> float:
        return self.text_init_range if self.text_init_range is not None else 0.2 * math.sqrt(64 / self.text_width)

    @property
    def resolved_vision_init_range(self) -> float:
        return self.vision_init_range if self.vision_init_range is not None else 0.02

    @property
    def resolved_fullatt_block_indexes(self) -> tuple[int, ...]:
        """Qwen2.5-VL full-attention blocks: given, or every `max(2, depth // 4)`-th block ending at a multiple of it.

        4 blocks -> (1, 3); 32 blocks -> (7, 15, 23, 31) as in the real checkpoints.
        """
        if self.fullatt_block_indexes is not None:
            return tuple(self.fullatt_block_indexes)
        step = max(2, self.vision_layers // 4)
        return tuple(range(step - 1, self.vision_layers, step))


_TINY_COMMON = dict(
    vision_layers=4, vision_width=64, vision_heads=4, vision_mlp_ratio=2,
    text_layers=4, text_width=64, text_heads=4, text_kv_heads=2, text_intermediate=128,
)

_PRESETS: dict[str, PresetSpec] = {
    "tiny-qwen2-vl": PresetSpec(
        arch="qwen2_vl", description="Qwen2-VL, 4 ViT blocks + 4 LLM layers, width 64", **_TINY_COMMON
    ),
    "tiny-qwen2.5-vl": PresetSpec(
        arch="qwen2_5_vl",
        description="Qwen2.5-VL, 4 ViT blocks (56-px windows = 2x2 merged tokens; full attention in blocks 1, 3)"
        " + 4 LLM layers",
        **_TINY_COMMON,
    ),
    "tiny-internvl": PresetSpec(
        arch="internvl",
        description="InternVL3-style, 56-px tiles (4 LLM tokens per tile, up to 4 tiles + thumbnail), 4 + 4 layers",
        **_TINY_COMMON,
    ),
    "tiny-llava": PresetSpec(
        arch="llava",
        description="LLaVA-1.5 layout: CLIP tower at 84 px (36 patches, features of layer -2, CLS dropped), "
        "2-layer MLP projector, Llama LLM; 4 + 4 layers",
        **_TINY_COMMON,
    ),
    "llava-1.5-7b-shaped": PresetSpec(
        arch="llava",
        description="LLaVA-1.5-7B shapes (CLIP ViT-L/14 at 336 px: 24x1024, features of layer -2, 576 tokens; "
        "Vicuna-7B: 32x4096), random weights",
        vision_layers=24, vision_width=1024, vision_heads=16, vision_mlp_ratio=4,
        text_layers=32, text_width=4096, text_heads=32, text_kv_heads=32, text_intermediate=11008,
        image_size=336,
    ),
    "qwen2-vl-2b-shaped": PresetSpec(
        arch="qwen2_vl",
        description="Qwen2-VL-2B shapes (ViT 32x1280, LLM 28x1536), random weights, tiny vocab",
        vision_layers=32, vision_width=1280, vision_heads=16, vision_mlp_ratio=4,
        text_layers=28, text_width=1536, text_heads=12, text_kv_heads=2, text_intermediate=8960,
        rope_theta=1000000.0, mrope_section=(16, 24, 24), tie_embeddings=True,
        min_pixels=56 * 56, max_pixels=28 * 28 * 16384,
    ),
    "internvl3-1b-shaped": PresetSpec(
        arch="internvl",
        description="InternVL3-1B shapes (InternViT-300M 24x1024 at 448 px, Qwen2.5-0.5B LLM 24x896), random weights",
        vision_layers=24, vision_width=1024, vision_heads=16, vision_mlp_ratio=4,
        text_layers=24, text_width=896, text_heads=14, text_kv_heads=2, text_intermediate=4864,
        rope_theta=1000000.0, tie_embeddings=True, tile_size=448, max_patches=12,
    ),
}

#: Read-only mapping of preset name -> `PresetSpec`.
MODEL_PRESETS: Mapping[str, PresetSpec] = types.MappingProxyType(_PRESETS)


@dataclass
class TinyVLM:
    """A model with its processor and tokenizer.

    Attributes:
        model: `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` /
            `InternVLForConditionalGeneration`, in eval mode.
        processor: image-only processor (`*ImageOnlyProcessor`); call it or use `tokcomp.testing.make_inputs`.
        tokenizer: the processor's tokenizer (left padding).
        family: `"qwen2_vl"` (Qwen2-VL and Qwen2.5-VL) or `"internvl"`.
        name: preset name.
        spec: the resolved `PresetSpec` (after overrides).
    """

    model: Any = field(repr=False)
    processor: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    family: str
    name: str
    spec: PresetSpec | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def arch(self) -> str:
        """`"qwen2_vl"`, `"qwen2_5_vl"` or `"internvl"`."""
        return self.spec.arch if self.spec is not None else self.family

    @property
    def image_token_id(self) -> int:
        """Id of the per-visual-token placeholder (`<|image_pad|>` or `<IMG_CONTEXT>`)."""
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int | None:
        """Id of `<|video_pad|>` (Qwen family), None for InternVL."""
        return getattr(self.model.config, "video_token_id", None)


# --------------------------------------------------------------------------------------------------------------
# Spec resolution
# --------------------------------------------------------------------------------------------------------------
_FIELDS = {f.name for f in dataclasses.fields(PresetSpec)}


def _valid_heads(width: int, heads: int, multiple: int, min_head_dim: int) -> bool:
    return heads >= 1 and width % heads == 0 and (width // heads) % multiple == 0 and width // heads >= min_head_dim


def _fit_heads(width: int, preferred: int, multiple: int, min_head_dim: int) -> int:
    """The head count closest to `preferred` giving an integer head_dim that is a multiple of `multiple`."""
    for delta in range(0, width + 1):
        for h in (preferred - delta, preferred + delta):
            if _valid_heads(width, h, multiple, min_head_dim):
                return h
    raise ValueError(f"no valid head count for width {width} (head_dim multiple of {multiple}, >= {min_head_dim})")


def _head_rules(arch: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((vision multiple, min head_dim), (text multiple, min head_dim)) for an architecture."""
    # Qwen ViT 2-D RoPE splits head_dim/2 into h and w halves -> head_dim % 4 == 0.
    # Qwen LLM M-RoPE needs head_dim/2 >= 3 (three non-empty sections).
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        return (4, 4), (2, 6)
    return (1, 1), (2, 2)


def _rescale_mrope(section: tuple[int, ...], head_dim: int) -> tuple[int, ...]:
    """Rescale an M-RoPE section `(t, h, w)` so it sums to `head_dim // 2`."""
    half = head_dim // 2
    if sum(section) == half:
        return tuple(section)
    total = sum(section)
    out = [max(1, round(s * half / total)) for s in section[:-1]]
    out.append(half - sum(out))
    if out[-1] < 1:
        raise ValueError(f"cannot fit mrope_section {section} to head_dim {head_dim}")
    return tuple(out)


def _resolve_spec(name: str, overrides: dict[str, Any]) -> PresetSpec:
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}")
    base = _PRESETS[name]
    ov = dict(overrides)
    if "width" in ov:
        width = ov.pop("width")
        ov.setdefault("vision_width", width)
        ov.setdefault("text_width", width)
    unknown = set(ov) - _FIELDS
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: width, {', '.join(sorted(_FIELDS))}")
    if "text_width" in ov and "text_intermediate" not in ov:
        ov["text_intermediate"] = max(2, int(round(base.text_intermediate * ov["text_width"] / base.text_width)))
    for key in ("mrope_section", "fullatt_block_indexes"):
        if ov.get(key) is not None:
            ov[key] = tuple(ov[key])
    spec = dataclasses.replace(base, **ov)

    (v_mult, v_min), (t_mult, t_min) = _head_rules(spec.arch)
    fixes: dict[str, Any] = {}
    towers = (("vision", spec.vision_width, v_mult, v_min), ("text", spec.text_width, t_mult, t_min))
    for tower, width, mult, mind in towers:
        heads = getattr(spec, f"{tower}_heads")
        if not _valid_heads(width, heads, mult, mind):
            if f"{tower}_heads" in ov:
                raise ValueError(f"{tower}_heads={heads} is invalid for {tower}_width={width}")
            fixes[f"{tower}_heads"] = _fit_heads(width, heads, mult, mind)
    text_heads = fixes.get("text_heads", spec.text_heads)
    kv = min(spec.text_kv_heads, text_heads)
    while text_heads % kv:
        kv -= 1
    if kv != spec.text_kv_heads:
        if "text_kv_heads" in ov:
            raise ValueError(f"text_kv_heads={spec.text_kv_heads} does not divide text_heads={text_heads}")
        fixes["text_kv_heads"] = kv
    if spec.family == "qwen2_vl":
        fixes["mrope_section"] = _rescale_mrope(tuple(spec.mrope_section), spec.text_width // text_heads)
    spec = dataclasses.replace(spec, **fixes)

    if spec.arch == "qwen2_5_vl":
        bad = [i for i in spec.resolved_fullatt_block_indexes if not 0 <= i < spec.vision_layers]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} out of range for {spec.vision_layers} vision blocks")
        if spec.window_size < spec.patch_size * 2:
            raise ValueError(f"window_size must be >= {spec.patch_size * 2} px")
    if spec.arch == "internvl":
        grid = spec.tile_size // spec.patch_size
        if spec.tile_size % spec.patch_size or (grid * spec.downsample_ratio) % 1:
            raise ValueError(f"tile_size {spec.tile_size} must give a patch grid divisible by 1/downsample_ratio")
    return spec


# --------------------------------------------------------------------------------------------------------------
# Config / processor / model construction
# --------------------------------------------------------------------------------------------------------------
#: LLaVA vision towers of the tiny preset: ``llava_tower`` -> the vision config's model_type
_LLAVA_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "dinov2": "dinov2"}


def _tokenizer_for(spec: PresetSpec):
    if spec.family == "llava":
        return build_llava_tokenizer()
    return build_internvl_tokenizer() if spec.family == "internvl" else build_qwen_vl_tokenizer()


def _text_config(spec: PresetSpec, tok) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(spec.rope_theta)}
    if spec.family == "qwen2_vl":
        rope["mrope_section"] = list(spec.mrope_section)
    return dict(
        vocab_size=len(tok),
        hidden_size=spec.text_width,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=rope,
        initializer_range=spec.resolved_text_init_range,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=spec.tie_embeddings,
    )


def _config_from_spec(spec: PresetSpec, tok):
    text = _text_config(spec, tok)
    vir = spec.resolved_vision_init_range
    if spec.family == "qwen2_vl":
        ids = dict(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        common = dict(
            depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=spec.patch_size,
            spatial_merge_size=2, temporal_patch_size=2, initializer_range=vir,
        )
        if spec.arch == "qwen2_vl":
            # Qwen2-VL vision: embed_dim = ViT width, hidden_size = merger output = LLM width
            vision = dict(
                embed_dim=spec.vision_width, hidden_size=spec.text_width, mlp_ratio=spec.vision_mlp_ratio, **common
            )
            return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_embeddings, **ids)
        # Qwen2.5-VL vision: hidden_size = ViT width, out_hidden_size = LLM width; window_size in pixels
        vision = dict(
            hidden_size=spec.vision_width, intermediate_size=spec.vision_width * spec.vision_mlp_ratio,
            out_hidden_size=spec.text_width, window_size=spec.window_size,
            fullatt_block_indexes=list(spec.resolved_fullatt_block_indexes),
            tokens_per_second=spec.tokens_per_second, **common,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_embeddings, **ids)

    if spec.family == "llava":
        vision = dict(
            model_type=_LLAVA_TOWERS[spec.llava_tower], hidden_size=spec.vision_width,
            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
            intermediate_size=spec.vision_width * spec.vision_mlp_ratio, image_size=spec.image_size,
            patch_size=spec.patch_size, initializer_range=vir,
        )
        return LlavaConfig(
            vision_config=vision, text_config=dict(model_type="llama", **text),
            image_token_id=tok.image_token_id, image_seq_length=(spec.image_size // spec.patch_size) ** 2,
            projector_hidden_act="gelu", vision_feature_layer=spec.vision_feature_layer,
            vision_feature_select_strategy="full" if spec.llava_tower == "siglip" else "default",
            tie_word_embeddings=spec.tie_embeddings,
        )
    vision = dict(
        hidden_size=spec.vision_width, num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        intermediate_size=spec.vision_width * spec.vision_mlp_ratio,
        image_size=(spec.tile_size, spec.tile_size), patch_size=(spec.patch_size, spec.patch_size),
        norm_type=spec.vision_norm, use_qk_norm=spec.vision_qk_norm, use_mean_pooling=True, initializer_range=vir,
    )
    return InternVLConfig(
        vision_config=vision, text_config=dict(model_type="qwen2", **text),
        image_token_id=tok.context_image_token_id, image_seq_length=spec.image_seq_length,
        downsample_ratio=spec.downsample_ratio, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=spec.tie_embeddings,
    )


def _processor_from_spec(spec: PresetSpec, tok):
    if spec.family == "llava":
        ip = CLIPImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size}, do_center_crop=False)
        cls_token = spec.llava_tower != "siglip"
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=spec.patch_size,
                              vision_feature_select_strategy="default" if cls_token else "full",
                              num_additional_image_tokens=int(cls_token), chat_template=tok.chat_template)
    if spec.family == "internvl":
        ip = GotOcr2ImageProcessorPil(
            size={"height": spec.tile_size, "width": spec.tile_size}, crop_to_patches=True,
            min_patches=spec.min_patches, max_patches=spec.max_patches,
        )
        return InternVLImageOnlyProcessor(
            image_processor=ip, tokenizer=tok, image_seq_length=spec.image_seq_length, chat_template=tok.chat_template
        )
    ip = Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=spec.patch_size)
    cls = Qwen2_5_VLImageOnlyProcessor if spec.arch == "qwen2_5_vl" else Qwen2VLImageOnlyProcessor
    return cls(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)


def _model_class(arch: str):
    return {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
        "llava": LlavaForConditionalGeneration,
    }[arch]


def _vision_placeholder_ids(spec: PresetSpec, tok) -> list[int]:
    names = {
        "internvl": ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
        "llava": ("<image>",),
    }.get(spec.family, ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"))
    return [tok.convert_tokens_to_ids(n) for n in names]


def build_config(name: str, **overrides):
    """Model config of a preset, without building weights.

    Args:
        name: a key of `MODEL_PRESETS`.
        **overrides: `vision_layers`, `text_layers`, `width` or any `PresetSpec` field.

    Returns:
        `Qwen2VLConfig` / `Qwen2_5_VLConfig` / `InternVLConfig` with the token ids of the tiny tokenizer.
    """
    spec = _resolve_spec(name, overrides)
    return _config_from_spec(spec, _tokenizer_for(spec))


def build_model(
    name: str,
    *,
    attn: str | dict = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **overrides,
) -> TinyVLM:
    """Build a preset with deterministic random weights.

    Args:
        name: a key of `MODEL_PRESETS` (`tiny-qwen2-vl`, `tiny-qwen2.5-vl`, `tiny-internvl`, `qwen2-vl-2b-shaped`,
            `internvl3-1b-shaped`).
        attn: attention implementation for both towers (`"sdpa"`, `"eager"`, ...), or a per-sub-config dict such
            as `{"vision_config": "eager", "text_config": "sdpa"}`.
        seed: weights are drawn after `torch.manual_seed(seed)` inside `torch.random.fork_rng`, so the caller's
            RNG state is left untouched and equal seeds give equal weights (on the same device type).
        dtype: parameter dtype.
        device: where to allocate the parameters (default CPU). `"meta"` builds shapes only.
        **overrides: `vision_layers`, `text_layers`, `width` or any `PresetSpec` field.

    Returns:
        `TinyVLM(model, processor, tokenizer, family, name, spec)`; the model is in eval mode.
    """
    spec = _resolve_spec(name, overrides)
    tok = _tokenizer_for(spec)
    cfg = _config_from_spec(spec, tok)
    processor = _processor_from_spec(spec, tok)
    cls = _model_class(spec.arch)

    dev = torch.device(device) if device is not None else torch.device("cpu")
    on_accel = dev.type not in ("cpu", "meta")
    fork = dict(devices=None, device_type=dev.type) if on_accel else dict(devices=[])
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        with dev:
            model = from_config(cls, cfg, attn=attn, dtype=dtype)
    model.eval()

    gen = model.generation_config
    gen.bos_token_id = cfg.get_text_config().bos_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.do_sample = False
    gen.suppress_tokens = _vision_placeholder_ids(spec, tok)

    c = model.config
    assert c.image_token_id == processor.image_token_id, (c.image_token_id, processor.image_token_id)
    if spec.family == "qwen2_vl":
        assert c.video_token_id == processor.video_token_id
        assert c.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    return TinyVLM(model=model, processor=processor, tokenizer=tok, family=spec.family, name=name, spec=spec)
