"""Vision features for projector training: exactly what the LLaVA model feeds its projector, computed once.

:func:`image_features` runs the model's own ``get_image_features`` and captures the projector's INPUT with a
forward pre-hook, so the cached features are bit-identical to what inference uses (whatever layer selection and
CLS dropping the installed transformers applies). :func:`feature_cache` stores them per image id in one fp32
tensor file outside the repository (4,000 train images: 1.6 GB).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .data import load_image


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projector inputs of a LLaVA model: ``pixel_values`` [B, 3, H, W] -> [B, N, vision width] (N = 256)."""
    captured: list[torch.Tensor] = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixel_values)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one projector call, saw {len(captured)}")
    return captured[0]


def compute_features(model, processor, image_paths: dict[int, str], batch_size: int = 16,
                     log=print) -> dict[int, torch.Tensor]:
    """``{image id: Tensor[N, vision width]}`` for every image in ``image_paths``, in image-id order."""
    ids = sorted(image_paths)
    out: dict[int, torch.Tensor] = {}
    t0 = time.time()
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        pixels = processor.image_processor([load_image(image_paths[i]) for i in chunk],
                                           return_tensors="pt")["pixel_values"]
        feats = image_features(model, pixels)
        out.update({i: f for i, f in zip(chunk, feats)})
        if (start // batch_size) % 25 == 0:
            log(f"features: {len(out)}/{len(ids)} images, {time.time() - t0:.0f} s")
    return out


def feature_cache(path: str | Path, model, processor, image_paths: dict[int, str], log=print) -> dict[int, torch.Tensor]:
    """Features of ``image_paths`` from ``path`` if it holds exactly these image ids, else computed and saved."""
    path = Path(path)
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if sorted(cached["ids"].tolist()) == sorted(image_paths):
            log(f"features: loaded {len(image_paths)} images from {path}")
            return dict(zip(cached["ids"].tolist(), cached["features"]))
    feats = compute_features(model, processor, image_paths, log=log)
    ids = sorted(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"ids": torch.tensor(ids), "features": torch.stack([feats[i] for i in ids])}, tmp)
    tmp.replace(path)
    log(f"features: saved {len(ids)} images to {path}")
    return feats
