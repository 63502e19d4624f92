"""What ``--model tokcomp`` checks and loads before any document: the spec, the parallelism, the checkpoint.

Order matters and is the contract of :class:`tokcomp.lmms.model.TokcompChat`: the spec is parsed before any
weight is read (a typo costs nothing), the launch mode is checked before any weight is read (FSDP is refused), the
checkpoint is loaded on this rank's own device, and the spec is then validated against the model (adapter,
capabilities, layer ranges) by building, not entering, a session. lmms-eval builds the model before it loads any
dataset, so every bad input fails before any data loads.
"""
from __future__ import annotations

import os
from typing import Any

from tokcomp.errors import ConfigError, SpecError

#: how the error messages spell the quoting that lmms-eval's ``--model_args`` needs
QUOTING = "--model_args 'pretrained=PATH,compress=\"ipcv(keep_ratio=0.35)+dart(keep_ratio=0.35)\"'"


def unquote(value: Any) -> Any:
    """``"spec"`` / ``'spec'`` -> ``spec``: lmms-eval keeps the quotes that protect a spec's commas."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_compress(compress: Any, stray: dict[str, Any] | None = None):
    """The configured :class:`tokcomp.spec.Pair` of a ``compress=`` value (a spec string or a JSON/YAML file).

    ``stray``: keyword arguments the model class did not recognise. lmms-eval splits ``--model_args`` at every
    comma outside quotes and brackets, parentheses included, so an unquoted ``ipcv(keep_ratio=0.35,prune_layer=3)``
    arrives as ``compress='ipcv(keep_ratio=0.35'`` plus ``prune_layer='3)'``; that case gets its own message.

    Raises:
        SpecError / ConfigError / UnknownStrategyError: naming the problem and the fix, before any weight is read.
    """
    from tokcomp.spec import load_spec_file, parse_spec
    stray = dict(stray or {})
    spec = unquote(compress)
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"compress={compress!r} is not a spec. Fix: {QUOTING} (or compress=none for the "
                        "unmodified model with the same tokcomp columns).")
    split = spec.count("(") != spec.count(")") or any(str(v).rstrip().endswith(")") for v in stray.values())
    if split:
        pieces = ",".join([spec] + [f"{k}={v}" for k, v in stray.items()])
        raise SpecError(f"compress={spec!r} looks cut at a comma: lmms-eval splits --model_args at every comma "
                        f"outside quotes, parentheses included (it read {pieces!r}). Fix: quote the spec, "
                        f"{QUOTING}.")
    if spec.lower().endswith((".json", ".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise SpecError(f"compress={spec!r}: no such spec file. Fix: give an existing JSON/YAML file or a "
                            "spec string.")
        return load_spec_file(spec)
    try:
        return parse_spec(spec)
    except ConfigError as e:
        raise type(e)(f"compress={spec!r}: {e}") from None


def check_parallelism(distributed_type: Any = None, env: dict[str, str] | None = None) -> None:
    """Refuse launch modes other than data parallelism (one full model per rank), before any weight is read.

    ``distributed_type``: ``accelerate.DistributedType`` (or its string) of this launch; ``env``: the environment
    (default ``os.environ``), where ``accelerate launch --use_fsdp`` / ``--use_deepspeed`` leave their marks even
    when a single process makes accelerate fall back to no distribution.
    """
    env = os.environ if env is None else env
    kind = str(getattr(distributed_type, "value", distributed_type) or "NO").upper()

    def on(name: str) -> bool:
        return env.get(name, "").strip().lower() in ("1", "true", "yes")
    if kind == "FSDP" or on("ACCELERATE_USE_FSDP"):
        raise ConfigError(
            "--model tokcomp does not run under FSDP: FSDP shards every layer's weights across ranks, so every "
            "forward is a collective that all ranks must enter in lockstep, while lmms-eval hands each rank "
            "different documents (different prompt lengths, answer lengths and, with compression, different "
            "token counts per layer), and tokcomp's hooks need each decoder layer and vision block as an "
            "unsharded transformers module. Fix: launch data parallel, one full model per rank: "
            "accelerate launch --num_processes N -m lmms_eval ... (without --use_fsdp), or torchrun "
            "--nproc_per_node N -m lmms_eval ...")
    if kind == "DEEPSPEED" or on("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "--model tokcomp does not run under DeepSpeed (ZeRO shards or offloads weights: the same lockstep and "
            "unsharded-module needs as FSDP). Fix: accelerate launch --num_processes N -m lmms_eval ... without "
            "--use_deepspeed; each rank holds a full model.")
    if kind not in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                    "MULTI_SDAA", "MULTI_HPU"):
        raise ConfigError(f"--model tokcomp runs single-process or data parallel; this launch is {kind}. Fix: "
                          "accelerate launch --num_processes N -m lmms_eval ... (one full model per rank).")


def local_device(requested: Any, accelerator) -> "Any":
    """This rank's device: the accelerator's local device when several processes run (``cuda:LOCAL_RANK``, or the
    CPU), else ``requested`` (lmms-eval's ``--device``) when given, else the accelerator's device."""
    import torch
    if accelerator.num_processes > 1 or not requested:
        return torch.device(accelerator.device)
    dev = torch.device(str(requested))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={requested!r} but this machine has no CUDA device. Fix: --device cpu.")
    return dev


#: model_type -> a processor class without the video processor (the stock ones need torchvision for video)
def _image_only_processors() -> dict[str, Any]:
    from transformers import LlavaProcessor

    from tokcomp.testing.models import (
        InternVLImageOnlyProcessor,
        Qwen2_5_VLImageOnlyProcessor,
        Qwen2VLImageOnlyProcessor,
    )
    return {"qwen2_vl": Qwen2VLImageOnlyProcessor, "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
            "internvl": InternVLImageOnlyProcessor, "llava": LlavaProcessor}


def load_processor(path: str, model_type: str):
    """The checkpoint's processor for images and text (tokenizer, image processor, chat template, the processor's
    own settings such as InternVL's ``image_seq_length``), without a video processor, so neither torchvision nor
    decord is needed. The image processor is the one ``AutoImageProcessor`` picks (torchvision backend when it is
    installed, PIL otherwise), as ``AutoProcessor`` would. Other model types: ``AutoProcessor``."""
    cls = _image_only_processors().get(model_type)
    if cls is None:
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(path)
    return cls.from_pretrained(path)


def load_checkpoint(path: str, device, dtype: str = "auto", attn_implementation: str | None = None):
    """``(model, processor)`` of a local checkpoint (or hub id, when online), in eval mode on ``device``.

    The model class is ``AutoModelForImageTextToText``'s (the generating model with its LM head). ``dtype``:
    ``auto`` (the checkpoint's), ``bfloat16``, ``float16`` or ``float32``."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    if not (os.path.isdir(path) or "/" in path):
        raise ConfigError(f"pretrained={path!r} is neither a local checkpoint folder nor a hub id. Fix: "
                          "pretrained=/path/to/checkpoint (a folder with config.json).")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype={dtype!r}; use auto, bfloat16, float16 or float32.")
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
    if torch.device(device).type == "cpu":
        model.to(device)
    return model, load_processor(path, config.model_type)
