"""The one seam between tokcomp and transformers' conventions.

Every keyword, registry and private name of transformers that tokcomp touches is read or written here and nowhere
else, so a new transformers release is a change to this file (and to ``TESTED_RANGE``). What lives here:

* the cache keyword: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (forwards, outputs, mask functions);
* cache facts: length per layer, static (pre-allocated) caches, a new ``DynamicCache``;
* mask creation (``create_causal_mask`` / ``create_sliding_window_causal_mask`` with ``layer_idx``);
* attention: the configured implementation, flash detection, kernels of the ``AttentionInterface`` registry, and
  registering / removing a wrapper kernel together with its mask function;
* small model facts read through private names (``_attn_implementation``, ``_from_config``, module-level
  ``eager_attention_forward`` / rotary helpers) and the output classes tokcomp builds;
* the tested version range and the warning a session gives outside it.

transformers is imported lazily, inside the functions, so ``import tokcomp`` stays light.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata as md
import inspect
import sys
import warnings
from typing import Any, Callable

#: the transformers versions the whole suite passed on (CI runs both ends); must equal pyproject.toml's range.
TESTED_RANGE = ">=5.19,<5.25"
#: the two ends CI installs (scripts/test.sh); the newest is what a fresh ``pip install`` resolves to today.
LOWEST, NEWEST = "5.19.0", "5.24.0"

#: every name transformers has used for the decoder cache keyword, newest first
_CACHE_NAMES = ("cache", "past_key_values")


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the range tokcomp's suite passed on."""


# ------------------------------------------------------------------------------------------------------
# versions
# ------------------------------------------------------------------------------------------------------
def installed_version() -> str | None:
    """The installed transformers version string, or None when it is not installed (no import happens)."""
    try:
        return md.version("transformers")
    except md.PackageNotFoundError:
        return None


def in_tested_range(version: str) -> bool:
    """True if ``version`` lies in :data:`TESTED_RANGE`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    return Version(version) in SpecifierSet(TESTED_RANGE)


def check_version() -> None:
    """Warn (once per process and version) when the installed transformers is outside :data:`TESTED_RANGE`."""
    v = installed_version()
    if v is not None and not in_tested_range(v):
        _warn_untested(v)


@functools.lru_cache(maxsize=None)
def _warn_untested(version: str) -> None:
    warnings.warn(f"tokcomp was tested with transformers {TESTED_RANGE} (CI runs {LOWEST} and {NEWEST}); "
                  f"transformers {version} is installed, so sessions may fail or give wrong results. Fix: "
                  f"pip install 'transformers{TESTED_RANGE}'", UntestedTransformersWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------------
# the cache keyword
# ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cache_keyword() -> str:
    """The keyword the installed transformers' forwards and mask functions take the cache under."""
    from transformers.masking_utils import create_causal_mask
    params = inspect.signature(inspect.unwrap(create_causal_mask)).parameters
    return next(n for n in _CACHE_NAMES if n in params)


def get_cache(kwargs: dict) -> Any:
    """The cache a forward (or a hook's kwargs) received, under either name; None if none."""
    for name in _CACHE_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def set_cache(kwargs: dict, cache: Any) -> None:
    """Give a forward's kwargs ``cache``, under the name the caller already used (else the installed one)."""
    name = next((n for n in _CACHE_NAMES if n in kwargs), cache_keyword())
    kwargs[name] = cache


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to pass a cache to a forward: ``model(**inputs, **cache_kwargs(cache))``."""
    return {cache_keyword(): cache}


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``.cache`` or ``.past_key_values``), read without deprecation warnings."""
    if isinstance(output, dict):            # asking for the other name warns on 5.24
        return output.get(cache_keyword())
    return None


def cache_length(cache: Any, layer: int = 0) -> int:
    """Tokens held by ``cache`` at decoder layer ``layer`` (0 for None)."""
    return int(cache.get_seq_length(layer)) if cache is not None else 0


def cache_lengths(cache: Any) -> list[int]:
    """Tokens held per decoder layer."""
    return [int(cache.get_seq_length(i)) for i in range(len(cache.layers))]


def is_static_cache(cache: Any) -> bool:
    """True for a pre-allocated (compileable) cache such as ``StaticCache``."""
    return bool(getattr(cache, "is_compileable", False))


def new_cache(config) -> Any:
    """A fresh ``DynamicCache`` for a decoder stack's ``config``."""
    from transformers import DynamicCache
    return DynamicCache(config=config)


def new_static_cache(config, max_cache_len: int) -> Any:
    """A ``StaticCache`` (only to test that sessions refuse it)."""
    from transformers import StaticCache
    return StaticCache(config=config, max_cache_len=max_cache_len)


def wants_cache(kwargs: dict, config) -> bool:
    """True if a forward with ``kwargs`` will build and return a cache (``use_cache`` or the config's default)."""
    use = kwargs.get("use_cache")
    return bool(use) if use is not None else bool(getattr(config, "use_cache", True))


# ------------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------------
def causal_mask(config, inputs_embeds, attention_mask, cache, layer_idx: int, sliding: bool = False):
    """transformers' own mask for decoder layer ``layer_idx`` (its kv length read from THAT layer's cache), for
    whatever backend ``config`` names: a 4-D bool/float mask, a 2-D padding mask (flash), a BlockMask or None."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    fn = create_sliding_window_causal_mask if sliding else create_causal_mask
    return fn(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, layer_idx=layer_idx,
              **{cache_keyword(): cache})


def is_prepared_mask(mask: Any) -> bool:
    """True for a mask transformers already prepared (4-D, or a per-layer-type dict), not a 2-D padding mask."""
    return mask is not None and not (hasattr(mask, "dim") and mask.dim() == 2)


# ------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------
def attn_impl(config) -> str | None:
    """The attention implementation a (sub-)config runs (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...)."""
    return getattr(config, "_attn_implementation", None)


def is_flash(config_or_impl) -> bool:
    """True when a config (or an implementation name) asks for a flash-attention kernel."""
    from transformers.utils.generic import is_flash_attention_requested
    if isinstance(config_or_impl, str) or config_or_impl is None:
        return bool(is_flash_attention_requested(requested_attention_implementation=config_or_impl))
    return bool(is_flash_attention_requested(config_or_impl))


def module_function(module, name: str) -> Callable:
    """A function defined next to ``module``'s class (e.g. ``eager_attention_forward``,
    ``apply_rotary_pos_emb_vision`` in its ``modeling_*.py``)."""
    fn = getattr(sys.modules[type(module).__module__], name, None)
    if fn is None:
        from tokcomp.errors import AdapterError
        raise AdapterError(f"{type(module).__module__} has no {name!r} (transformers {installed_version()}); this "
                           f"tokcomp supports transformers {TESTED_RANGE}")
    return fn


def attention_kernel(module, impl: str | None = None) -> Callable:
    """The kernel ``module`` (an attention module) runs: its config's implementation from transformers'
    ``AttentionInterface``, or its modeling file's own eager function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    impl = impl if impl is not None else attn_impl(module.config)
    eager = module_function(module, "eager_attention_forward")
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


def registered_kernel(impl: str) -> Callable | None:
    """The kernel registered under ``impl`` in transformers' ``AttentionInterface`` (None if absent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None


def register_attention(name: str, kernel: Callable, mask_like: str) -> Callable[[], None]:
    """Register ``kernel`` as attention implementation ``name`` with the mask function of ``mask_like``
    (without one transformers silently builds NO mask for an unknown name). Returns the undo function."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(name, kernel)
    with_mask = mask_like in ALL_MASK_ATTENTION_FUNCTIONS
    if with_mask:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])

    def undo() -> None:
        AttentionInterface._global_mapping.pop(name, None)
        if with_mask:
            AttentionMaskInterface._global_mapping.pop(name, None)
    return undo


def registry_names() -> dict[str, list[str]]:
    """Names in transformers' global attention and mask registries (to check a session left none behind)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return {"attention": sorted(ALL_ATTENTION_FUNCTIONS._global_mapping),
            "mask": sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}


def set_text_attention(model, impl: str) -> None:
    """Switch a VLM's language model to attention implementation ``impl`` (the vision tower keeps its own)."""
    model.set_attn_implementation({"text_config": impl})


class ConfigView:
    """A config that reports ``_attn_implementation = impl`` and delegates everything else (transformers' flash
    path loads its kernel from ``module.config._attn_implementation``)."""

    def __init__(self, config, impl: str):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_attn_implementation", impl)

    def __getattr__(self, name):
        return getattr(self._config, name)


# ------------------------------------------------------------------------------------------------------
# models and outputs
# ------------------------------------------------------------------------------------------------------
def from_config(cls, config, attn: str | None = None, dtype=None):
    """``cls._from_config``: a model with random weights from ``config`` (no download)."""
    kw = {} if dtype is None else {"dtype": dtype}
    if attn is not None:
        kw["attn_implementation"] = attn
    return cls._from_config(config, **kw)


def set_config_attn(config, impl: str) -> None:
    """Ask for attention implementation ``impl`` on a config before a model is built from it."""
    config._attn_implementation = impl


def causal_lm_loss(model, logits, labels):
    """The model's own causal-LM loss (labels shifted inside, -100 ignored), as its forward computes it."""
    return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.get_text_config().vocab_size)


def pooled_output(pooler_output) -> Any:
    """A vision-encoder output object carrying ``pooler_output`` (what ``mm_encoder_outputs`` values are)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    return BaseModelOutputWithPooling(pooler_output=pooler_output)


def vision_window_index(grid_thw, merge: int, window_size: int, patch_size: int):
    """Qwen2.5-VL's window permutation and window ``cu_seqlens`` (``transformers.vision_utils``)."""
    from transformers.vision_utils import get_vision_window_index
    return get_vision_window_index(grid_thw, merge, window_size, patch_size)


#: progress bars transformers draws with a bare tqdm, which ``disable_progress_bar`` does not reach
_BARE_BARS = ("Converting and de-quantizing GGUF tensors",)


@contextlib.contextmanager
def quiet_loading():
    """transformers' loading progress bars (weight loading, shard writing, GGUF de-quantising) off inside the
    block, restored after (for commands whose own output is a table). Anything else written to stderr inside the
    block is passed on when it ends."""
    import io

    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        kept = ("\r".join(p for p in line.split("\r") if p and not any(bar in p for bar in _BARE_BARS))
                for line in err.getvalue().split("\n"))
        sys.stderr.write("".join(line + "\n" for line in kept if line))
