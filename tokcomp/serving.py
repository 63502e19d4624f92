"""The serving contract: what an engine must know to serve a tokcomp vision compressor (docs/serving.md).

A serving engine (vLLM) decides how many placeholder tokens an image takes *before* the vision encoder runs: it
reserves KV blocks and schedules chunked prefill from that number. A vision compressor whose budget is known in
advance fits that model: the count depends only on the image's grid and the spec, never on the pixels. What the
pixels decide (which units are kept) is known when the encoder has run, in time to place the kept tokens at their
original positions before the language model sees them.

Pure functions of that contract (no model, no torch module, no transformers):

* :func:`llm_tokens` / :func:`llm_tokens_per_segment`: the number of LLM tokens of one image (or video) item under a
  spec, from its unit grid; what the engine's processor inserts as placeholders.
* :func:`kept_positions`: the original ``(t, h, w)`` grid positions of the kept tokens, from the encoder's keep
  mask; :func:`kept_offsets`: their original 1-D offsets in the item.
* :func:`mrope_positions` / :func:`text_after`: Qwen's M-RoPE positions of the kept tokens and of the text that
  follows the item (unchanged by compression: tokcomp keeps every position of the unmodified prompt).
* :func:`qwen_unit_grid`, :func:`internvl_unit_grid`, :func:`llava_unit_grid`, :func:`vision_depth`: the unit grid
  and the vision depth from what an engine knows before encoding (grids, tile counts, configs).

A *unit grid* ``(t, h, w)`` counts LLM tokens: Qwen ``(grid_t, grid_h / merge, grid_w / merge)``; InternVL
``(tiles, s, s)`` with ``s * s = image_seq_length``; LLaVA ``(1, side, side)``. Every ``t``-slice is one attention
segment of the vision tower (a Qwen video frame, an InternVL tile), and budgets apply per segment, as in the
tower. Units are numbered in placeholder order, row-major over ``(t, h, w)``. ``tests/serving`` checks every
function against what the transformers path achieves, for many image sizes and specs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from tokcomp.errors import ConfigError

Grid = Sequence[int]


def _vision(spec: Any):
    """The configured vision compressor of ``spec`` (a spec string, a Pair, a strategy, or None)."""
    from tokcomp.spec import Pair, parse_spec
    from tokcomp.strategy import Strategy
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if isinstance(spec, Pair):
        return spec.vision
    if isinstance(spec, Strategy):
        return spec if spec.stage == "vision" else None
    raise ConfigError(f"cannot read {type(spec).__name__} as a spec; give a spec string, a Pair or a strategy")


# ------------------------------------------------------------------------------------------------------------
# units per segment: one rule per vision compressor with a budget known in advance
# ------------------------------------------------------------------------------------------------------------
def _random(s, h: int, w: int, depth: int | None) -> int:
    """``keep_count(units)`` per segment: random, DART-ViT, pool (exactly that many windows)."""
    return s.config.keep_count(h * w)


def _tome(s, h: int, w: int, depth: int | None) -> int:
    from tokcomp.ops.matching import r_schedule
    if depth is None:
        raise ConfigError(f"{s.name}: the number of LLM tokens depends on the vision tower's depth (merges per "
                          "block); pass vision_depth= (tokcomp.serving.vision_depth(config)).")
    u = h * w
    blocks = max(0, depth - s.config.start_layer)
    return u - sum(r_schedule(u, s.config.keep_count(u), blocks, s.config.schedule))


def _luvc_oim(s, h: int, w: int, depth: int | None) -> int:
    from tokcomp.plugins.luvc_oim import grid_after, steps_for
    hh, ww = grid_after(h, w, steps_for(h, w, s.config.keep_count(h * w), s.config.max_steps))
    return hh * ww


def _rules() -> list[tuple[type, Callable]]:
    from tokcomp.plugins.baselines import Pool, RandomVision
    from tokcomp.plugins.dart_vit import DartViT
    from tokcomp.plugins.luvc_oim import LuvcOIM
    from tokcomp.plugins.tome import ToMe          # ToFu is a ToMe: same matching, same counts
    return [(RandomVision, _random), (DartViT, _random), (Pool, _random), (ToMe, _tome), (LuvcOIM, _luvc_oim)]


def units_per_segment(strategy, h: int, w: int, vision_depth: int | None = None) -> int:
    """LLM tokens one ``h x w`` segment keeps under a configured vision compressor (None: all of them).

    Patch-granularity compressors (IPCV) restore the full grid; keep-everything budgets keep it; a strategy with
    its own rule implements ``units_per_segment(h, w, vision_depth) -> int``.

    Raises:
        ConfigError: the strategy's count depends on the pixels (no budget known in advance).
    """
    if strategy is None or strategy.granularity == "patch" or strategy.config.is_noop_budget:
        return h * w
    own = getattr(strategy, "units_per_segment", None)
    if callable(own):
        return int(own(h, w, vision_depth))
    for cls, rule in _rules():
        if isinstance(strategy, cls):
            return rule(strategy, h, w, vision_depth)
    raise ConfigError(f"{strategy.name}: no budget known in advance (the number of LLM tokens it keeps is not a "
                      f"function of the image grid), so an engine cannot size its placeholders before encoding. "
                      f"Fix: give {type(strategy).__name__} a units_per_segment(h, w, vision_depth) method, or "
                      "serve without a vision compressor (LLM pruners run after the placeholders are fixed).")


def llm_tokens_per_segment(spec: Any, grid: Grid, *, vision_depth: int | None = None) -> list[int]:
    """LLM tokens of each segment (``t``-slice) of an item with unit grid ``grid = (t, h, w)``."""
    t, h, w = (int(x) for x in grid)
    return [units_per_segment(_vision(spec), h, w, vision_depth)] * t


def llm_tokens(spec: Any, grid: Grid, *, vision_depth: int | None = None) -> int:
    """LLM tokens (placeholders) of one item with unit grid ``grid = (t, h, w)`` under ``spec``'s vision
    compressor. ``vision_depth``: blocks of the vision tower (needed by merging schedules: ToMe, ToFu)."""
    return sum(llm_tokens_per_segment(spec, grid, vision_depth=vision_depth))


# ------------------------------------------------------------------------------------------------------------
# positions of the kept tokens
# ------------------------------------------------------------------------------------------------------------
def _mask(grid: Grid, kept):
    import torch
    t, h, w = (int(x) for x in grid)
    if kept is None:
        return torch.ones(t * h * w, dtype=torch.bool)
    kept = torch.as_tensor(kept).reshape(-1).to("cpu")
    if kept.dtype != torch.bool or kept.numel() != t * h * w:
        raise ValueError(f"kept must be a bool mask over the item's {t * h * w} units (grid {t}x{h}x{w}), "
                         f"got {kept.dtype} of {kept.numel()}")
    return kept


def kept_offsets(grid: Grid, kept=None):
    """LongTensor[n_kept]: the original placeholder offsets (0-based, within the item) of the kept units, in
    placeholder order. ``kept``: BoolTensor over the item's units (None: all)."""
    return _mask(grid, kept).nonzero().squeeze(1)


def kept_positions(grid: Grid, kept=None):
    """LongTensor[n_kept, 3]: the original ``(t, h, w)`` grid position of every kept unit, in placeholder order."""
    import torch
    _, h, w = (int(x) for x in grid)
    off = kept_offsets(grid, kept)
    return torch.stack([off // (h * w), (off // w) % h, off % w], dim=1)


def mrope_positions(grid: Grid, kept=None, start: int = 0, t_scale: float = 1.0):
    """LongTensor[3, n_kept]: Qwen M-RoPE positions ``(t, h, w)`` of the kept units of an item whose first unit
    sits at ``start`` (the position after the text before it); ``t_scale``: Qwen2.5-VL's
    ``tokens_per_second * second_per_grid_t`` for videos (1 for Qwen2-VL; images have ``t = 1``)."""
    import torch
    p = kept_positions(grid, kept)
    t = (torch.arange(int(grid[0]), dtype=torch.float64) * t_scale).long()[p[:, 0]]
    return torch.stack([t, p[:, 1], p[:, 2]]) + int(start)


def text_after(grid: Grid, start: int = 0) -> int:
    """Position of the first text token after the item, ``start + max(h, w)``: the unmodified prompt's, whatever
    is kept (transformers' Qwen2-VL / Qwen2.5-VL convention, 5.19 to 5.24; for images it is also vLLM's, the
    largest position plus one; for videos vLLM counts the scaled time positions too, see docs/serving.md)."""
    _, h, w = (int(x) for x in grid)
    return int(start) + max(h, w)


# ------------------------------------------------------------------------------------------------------------
# unit grids and depths from what an engine knows before encoding
# ------------------------------------------------------------------------------------------------------------
def qwen_unit_grid(grid_thw: Grid, merge: int = 2) -> tuple[int, int, int]:
    """Qwen2-VL / Qwen2.5-VL: the processor's ``image_grid_thw`` / ``video_grid_thw`` (patches) -> unit grid."""
    t, h, w = (int(x) for x in grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"grid {t}x{h}x{w} is not divisible by the merge size {merge}")
    return t, h // merge, w // merge


def internvl_unit_grid(tiles: int, image_seq_length: int) -> tuple[int, int, int]:
    """InternVL: ``tiles`` (crops plus thumbnail) of ``image_seq_length`` tokens each -> unit grid."""
    s = math.isqrt(int(image_seq_length))
    if s * s != int(image_seq_length):
        raise ValueError(f"image_seq_length={image_seq_length} is not a square number of units per tile")
    return int(tiles), s, s


def llava_unit_grid(image_size: int, patch_size: int) -> tuple[int, int, int]:
    """LLaVA-1.5 layout: one ``image_size / patch_size`` square grid of patches per image."""
    return 1, int(image_size) // int(patch_size), int(image_size) // int(patch_size)


def vision_depth(config) -> int:
    """The vision blocks tokcomp's adapter drives for a model config (what merging schedules spread over): Qwen
    ``vision_config.depth``; InternVL and LLaVA the tower's layers up to ``vision_feature_layer``."""
    vc = config.vision_config
    if hasattr(vc, "depth"):
        return int(vc.depth)
    n = int(vc.num_hidden_layers)
    if getattr(config, "model_type", "") == "internvl":     # InternVL's adapter drives the whole encoder
        return n
    layer = getattr(config, "vision_feature_layer", -1)
    layer = layer[-1] if isinstance(layer, (list, tuple)) else int(layer)
    return n + 1 + layer if layer < 0 else layer
