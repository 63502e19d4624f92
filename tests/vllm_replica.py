"""vLLM's arithmetic for the number of image placeholders, written again here (vLLM is not installed).

vLLM (0.33) sizes an image's placeholders before the encoder runs:

* Qwen2-VL / Qwen2.5-VL (``Qwen2VLProcessingInfo._get_vision_info``): ``smart_resize(height, width,
  factor=patch_size * merge_size, min_pixels, max_pixels)``, then ``grid = (max(padded_frames // temporal_patch, 1),
  resized_h // patch, resized_w // patch)`` with ``padded_frames = frames + frames % temporal_patch``, and
  ``grid.prod() // merge**2`` placeholders (EVS lowers that number for videos);
* InternVL "-hf" (``InternS1ProcessingInfo.get_num_image_tokens``): transformers' own
  ``GotOcr2ImageProcessor.get_number_of_image_patches(height, width, {})`` tiles of ``image_seq_length`` each;
* LLaVA-1.5: ``(image_size // patch_size) ** 2``.

``smart_resize`` is the rounding transformers' Qwen2-VL image processor and vLLM share: round each side to the
factor, then scale down (floor) past ``max_pixels`` or up (ceil) below ``min_pixels``, keeping the aspect ratio.
"""
from __future__ import annotations

import math


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(resized_height, resized_width)``, both multiples of ``factor``, area within the pixel bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("aspect ratio above 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_grid_thw(height: int, width: int, *, patch: int, merge: int, temporal_patch: int, min_pixels: int,
                  max_pixels: int, frames: int = 1) -> tuple[int, int, int]:
    """vLLM's ``(grid_t, grid_h, grid_w)`` in patches for an image (``frames=1``) or a video."""
    rh, rw = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    padded = frames + frames % temporal_patch
    return max(padded // temporal_patch, 1), rh // patch, rw // patch


def qwen_placeholders(grid_thw: tuple[int, int, int], merge: int) -> int:
    """vLLM's placeholder count of an unpruned Qwen item."""
    t, h, w = grid_thw
    return t * h * w // (merge * merge)


def qwen_pixel_bounds(image_processor) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of a transformers 5 Qwen2-VL image processor (kept in ``size``)."""
    size = image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])
