"""Qwen2-VL / Qwen2.5-VL vision packing: which patch of which image/frame/unit/window sits where in the tower.

The processor packs every image and video frame of a call into one sequence, 2x2 merge groups (units) as 4
consecutive patches (TL, TR, BL, BR), units row-major per frame, frames and images one after another ("raster"
order = the order of the LLM placeholders). Qwen2.5-VL's tower permutes whole units into window order before
block 0 ("block" order); Qwen2-VL's block order is the raster order. Everything here is computed from
``grid_thw`` with transformers' own helpers, on the device given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokcomp.tokens import VisionLayout, VisionTokens

from ._hf import vision_window_index


@dataclass
class QwenVisionMeta:
    """Static metadata of one tower call, per token in BLOCK order (the order inside the blocks).

    Attributes:
        layout: the :class:`VisionLayout` (``unit_patches`` hold block-order indices; unit ids are raster ids).
        segment: LongTensor[N] frame segment (one per image / video frame) of each token.
        pos: LongTensor[N, 3] (0, h, w) patch position in its frame.
        unit: LongTensor[N] raster unit id (= LLM placeholder index within the call) of each token.
        unit_block: LongTensor[U] block-order position of each raster unit (identity for Qwen2-VL).
        unit_window: LongTensor[U] attention-window id of each unit (Qwen2.5-VL), else None.
        unit_image: LongTensor[U] image / video (row of ``grid_thw``) of each unit.
        grid_thw: LongTensor[I, 3] the call's patch grids.
    """

    layout: VisionLayout
    segment: Tensor
    pos: Tensor
    unit: Tensor
    unit_block: Tensor
    unit_window: Tensor | None
    unit_image: Tensor
    grid_thw: Tensor

    def units_per_image(self, units: Tensor | None = None) -> list[int]:
        """Number of units per image/video among ``units`` (LongTensor of raster ids; None: all)."""
        img = self.unit_image if units is None else self.unit_image[units.to(self.unit_image.device)]
        return torch.bincount(img, minlength=int(self.grid_thw.shape[0])).tolist()


def _raster(grid_thw: Tensor, merge: int) -> dict[str, Tensor]:
    """Per-unit and per-patch metadata in raster order (all CPU LongTensors)."""
    u = merge * merge
    seg_grid, seg_image, unit_seg, unit_grid, unit_image = [], [], [], [], []
    seg = 0
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        mh, mw = h // merge, w // merge
        bh, bw = torch.meshgrid(torch.arange(mh), torch.arange(mw), indexing="ij")
        cells = torch.stack([torch.zeros(mh * mw, dtype=torch.long), bh.flatten(), bw.flatten()], -1)
        for _ in range(t):
            seg_grid.append((1, h, w))
            seg_image.append(i)
            unit_seg.append(torch.full((mh * mw,), seg, dtype=torch.long))
            unit_grid.append(cells)
            unit_image.append(torch.full((mh * mw,), i, dtype=torch.long))
            seg += 1
    unit_seg_t = torch.cat(unit_seg) if unit_seg else torch.zeros(0, dtype=torch.long)
    unit_grid_t = torch.cat(unit_grid) if unit_grid else torch.zeros(0, 3, dtype=torch.long)
    j = torch.arange(u)
    patch_pos = torch.stack([torch.zeros(u, dtype=torch.long), j // merge, j % merge], -1)   # [u, 3]
    pos = (unit_grid_t[:, None, :] * torch.tensor([0, merge, merge]) + patch_pos).reshape(-1, 3)
    return dict(segment_grid=torch.tensor(seg_grid, dtype=torch.long).view(-1, 3),
                segment_image=torch.tensor(seg_image, dtype=torch.long),
                unit_segment=unit_seg_t, unit_grid=unit_grid_t,
                unit_image=torch.cat(unit_image) if unit_image else torch.zeros(0, dtype=torch.long),
                pos=pos)


def qwen_vision_meta(grid_thw: Tensor, merge: int, window: tuple[int, int] | None = None,
                     device: torch.device | str | None = None) -> QwenVisionMeta:
    """Build the metadata of one tower call.

    Args:
        grid_thw: LongTensor[I, 3] (t, h, w) patch grid of each image / video.
        merge: spatial merge size (2).
        window: ``(window_size, patch_size)`` in pixels for Qwen2.5-VL window attention, or None (Qwen2-VL).
        device: where the returned tensors live (the tower's device).
    """
    thw = grid_thw.detach().to("cpu", torch.long)
    r = _raster(thw, merge)
    u = merge * merge
    n_units = int(r["unit_segment"].numel())
    unit_window = None
    if window is not None:
        window_index, cu_window = vision_window_index(thw, merge, window[0], window[1])
        window_index = window_index.long()
        cu_units = (cu_window.long() // u)[1:]
        win_of_block = torch.searchsorted(cu_units, torch.arange(n_units), right=True)
        unit_block = torch.argsort(window_index)
        unit_window = win_of_block[unit_block]
    else:
        window_index = torch.arange(n_units)
        unit_block = torch.arange(n_units)
    # block order: block position p holds raster unit window_index[p]
    tok_unit = window_index.repeat_interleave(u)
    raster_tok = (window_index[:, None] * u + torch.arange(u)).reshape(-1)
    pos = r["pos"][raster_tok]
    segment = r["unit_segment"][tok_unit]
    unit_patches = unit_block[:, None] * u + torch.arange(u)
    layout = VisionLayout(n_tokens=n_units * u, unit_size=u, segment_grid=r["segment_grid"],
                          segment_image=r["segment_image"], unit_patches=unit_patches,
                          unit_segment=r["unit_segment"], unit_grid=r["unit_grid"], has_cls=False)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    mv = lambda x: None if x is None else x.to(dev)  # noqa: E731
    layout = VisionLayout(layout.n_tokens, u, *(mv(getattr(layout, f)) for f in
                                                ("segment_grid", "segment_image", "unit_patches",
                                                 "unit_segment", "unit_grid")), has_cls=False)
    return QwenVisionMeta(layout=layout, segment=mv(segment), pos=mv(pos), unit=mv(tok_unit),
                          unit_block=mv(unit_block), unit_window=mv(unit_window), unit_image=mv(r["unit_image"]),
                          grid_thw=mv(thw))


def initial_tokens(meta: QwenVisionMeta, hidden: Tensor, rope: tuple[Tensor, Tensor] | None) -> VisionTokens:
    """The full token set entering block 0: ``hidden [N, C]`` and ``rope (cos, sin) [N, hd]`` in block order."""
    n = hidden.shape[0]
    dev = hidden.device
    return VisionTokens(hidden=hidden, segment=meta.segment.to(dev), pos=meta.pos.to(dev), unit=meta.unit.to(dev),
                        size=torch.ones(n, dtype=torch.float32, device=dev),
                        origin=torch.arange(n, device=dev), cls=torch.zeros(n, dtype=torch.bool, device=dev),
                        rope=rope)


def block_segments(meta: QwenVisionMeta, tokens: VisionTokens, windowed: bool) -> Tensor:
    """Attention segment id of each token for one block: its window (Qwen2.5-VL window blocks) or its frame.

    Windows nest inside frames, so either id sequence is made of contiguous runs in tower order."""
    if windowed and meta.unit_window is not None:
        return meta.unit_window.to(tokens.unit.device)[tokens.unit]
    return tokens.segment
