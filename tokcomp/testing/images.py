"""Deterministic procedural test images and videos (PIL RGB), no files and no global randomness.

Every function takes a `seed`; the only randomness is a `numpy.random.default_rng(seed)` local to the call, so the
same arguments always give the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["IMAGE_KINDS", "procedural_image", "procedural_video", "default_images"]

IMAGE_KINDS: tuple[str, ...] = ("shapes", "gradient", "checker", "noise")


def _gradient(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] uint8 linear gradient between two random colours along a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (c0 + t[..., None] * (c1 - c0)).astype(np.uint8)


def _checker(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] uint8 checkerboard with a random cell size (4..20 px) and two random colours."""
    cell = int(rng.integers(4, 21))
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy // cell + xx // cell) % 2).astype(bool)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return np.where(mask[..., None], c1, c0).astype(np.uint8)


def _shapes(h: int, w: int, rng: np.random.Generator, n: int = 6) -> Image.Image:
    """A gradient background with `n` random filled rectangles and ellipses."""
    img = Image.fromarray(_gradient(h, w, rng))
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        box = (x0, y0, max(x1, x0 + 3), max(y1, y0 + 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=color)
    return img


def procedural_image(h: int, w: int, kind: str = "shapes", seed: int = 0) -> Image.Image:
    """A deterministic RGB test image.

    Args:
        h, w: height and width in pixels.
        kind: `"shapes"` (rectangles and ellipses on a gradient), `"gradient"`, `"checker"` or `"noise"` (uniform).
        seed: seed of the local RNG.

    Returns:
        `PIL.Image.Image` in mode RGB, size `(w, h)` (PIL order).
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    rng = np.random.default_rng(seed)
    if kind == "shapes":
        return _shapes(h, w, rng)
    if kind == "gradient":
        return Image.fromarray(_gradient(h, w, rng))
    if kind == "checker":
        return Image.fromarray(_checker(h, w, rng))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    raise ValueError(f"unknown kind {kind!r}; expected one of {IMAGE_KINDS}")


def procedural_video(frames: int, h: int, w: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic frames of a square moving across a gradient, so consecutive frames differ slightly.

    Returns:
        `frames` RGB images of size `(w, h)`.
    """
    rng = np.random.default_rng(seed)
    background = _gradient(h, w, rng)
    side = max(4, min(h, w) // 4)
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    y = int(rng.integers(0, max(1, h - side)))
    out = []
    for i in range(frames):
        img = Image.fromarray(background.copy())
        x = (i * max(1, w // max(frames, 1))) % max(1, w - side)
        ImageDraw.Draw(img).rectangle((x, y, x + side - 1, y + side - 1), fill=color)
        out.append(img)
    return out


def default_images() -> list[Image.Image]:
    """Four small images with different visual-token counts (h x w, kind).

    | image | Qwen tiny presets (grid -> tokens) | tiny-internvl (tiles -> tokens) |
    |---|---|---|
    | 112x84 shapes   | 8x6 patches -> 12 | 2x2 + thumbnail = 5 -> 20 |
    | 56x112 gradient | 4x8 patches -> 8  | 2x1 + thumbnail = 3 -> 12 |
    | 84x84 checker   | 6x6 patches -> 9  | 2x2 + thumbnail = 5 -> 20 |
    | 56x56 noise     | 4x4 patches -> 4  | 1 tile, no thumbnail -> 4 |
    """
    return [
        procedural_image(112, 84, "shapes", seed=0),
        procedural_image(56, 112, "gradient", seed=1),
        procedural_image(84, 84, "checker", seed=2),
        procedural_image(56, 56, "noise", seed=3),
    ]
