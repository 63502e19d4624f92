"""Model inputs for `TinyVLM` bundles: batched, left-padded chat prompts with 0..n images (and videos for Qwen).

Images go through the real processor (chat template -> placeholder expansion -> tokenizer -> image processor).
Videos are patchified here, in the exact order of `Qwen2VLVideoProcessor.patchify`, because the stock video
processors need torchvision; the processor is still used for the text, the images and `mm_token_type_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .images import procedural_video

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BatchFeature

    from .models import TinyVLM

__all__ = ["Video", "make_inputs", "make_video_inputs", "patchify_video"]


@dataclass(frozen=True, eq=False)
class Video:
    """A video given as its frames (PIL images of one size). Qwen family only.

    An odd number of frames is padded by repeating the last one (temporal patch size 2), as the processor does.
    """

    frames: tuple[Image.Image, ...]

    def __init__(self, frames: Sequence[Image.Image]):
        if not frames:
            raise ValueError("a Video needs at least one frame")
        object.__setattr__(self, "frames", tuple(frames))


Item = Union[Image.Image, Video]
Row = Union[Item, Sequence[Item], None]


def _row_items(row: Row) -> list[Item]:
    if row is None:
        return []
    if isinstance(row, (Image.Image, Video)):
        return [row]
    items = list(row)
    for it in items:
        if not isinstance(it, (Image.Image, Video)):
            raise TypeError(f"prompt items must be PIL images or Video, got {type(it).__name__}")
    return items


def patchify_video(frames: Sequence[Image.Image], image_processor) -> tuple[torch.Tensor, list[int]]:
    """Qwen2-VL video patches, in the order of `Qwen2VLVideoProcessor.patchify`.

    Frames are resized with `smart_resize` (factor 28, the image processor's min/max pixels), rescaled and
    normalised like images, padded to an even count, then grouped as
    `[t, tp, C, gh/2, 2, p, gw/2, 2, p] -> [t, gh/2, gw/2, 2, 2, C, tp, p, p]`: block-major 2x2 merge groups, each
    frame pair's groups after the previous pair's. A video of two identical frames equals the image patches.

    Args:
        frames: T RGB frames of one size.
        image_processor: a `Qwen2VLImageProcessorPil` (patch size, merge size, temporal patch size, mean/std, size).

    Returns:
        pixel_values_videos `[t*gh*gw, 3*tp*p*p]` float32 (`[t*gh*gw, 1176]` for p=14, tp=2) and
        video_grid_thw `[t, gh, gw]` with `t = ceil(T / tp)`.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = image_processor
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    w0, h0 = frames[0].size
    if any(f.size != (w0, h0) for f in frames):
        raise ValueError("all frames of a video must have the same size")
    h, w = smart_resize(h0, w0, factor=p * m, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    arr = np.stack([
        np.asarray((f if (w, h) == (w0, h0) else f.resize((w, h), Image.BICUBIC)).convert("RGB"), dtype=np.float32)
        for f in frames
    ])  # [T, H, W, 3]
    mean = np.asarray(ip.image_mean, dtype=np.float32)
    std = np.asarray(ip.image_std, dtype=np.float32)
    arr = ((arr * ip.rescale_factor - mean) / std).transpose(0, 3, 1, 2)  # [T, 3, H, W]
    video = torch.from_numpy(np.ascontiguousarray(arr))
    if pad := -video.shape[0] % tp:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)], dim=0)
    t, c = video.shape[0] // tp, video.shape[1]
    gh, gw = h // p, w // p
    patches = video.view(t, tp, c, gh // m, m, p, gw // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, gh/m, gw/m, m, m, C, tp, p, p]
    return patches.reshape(t * gh * gw, c * tp * p * p).contiguous(), [t, gh, gw]


def _render(vlm: "TinyVLM", items: list[Item], text: str) -> str:
    content = [{"type": "video" if isinstance(it, Video) else "image"} for it in items]
    content.append({"type": "text", "text": text})
    return vlm.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _expand(text: str, token: str, counts) -> str:
    """Replace each occurrence of `token` in `text` by `token * next(counts)`."""
    parts = text.split(token)
    return parts[0] + "".join(token * next(counts) + rest for rest in parts[1:])


def _qwen_inputs_with_videos(vlm, rendered: list[str], images, videos, fps: float):
    """Qwen prompts with videos: the processor's steps done by hand (expand placeholders, tokenize, type ids)."""
    from transformers import BatchFeature

    proc = vlm.processor
    ip = proc.image_processor
    merge = ip.merge_size**2
    data: dict[str, torch.Tensor] = {}
    if images:
        image_inputs = ip(images=images, return_tensors="pt")
        image_counts = iter((image_inputs["image_grid_thw"].prod(-1) // merge).tolist())
        rendered = [_expand(s, proc.image_token, image_counts) for s in rendered]
    patched = [patchify_video(v.frames, ip) for v in videos]
    video_counts = iter(int(np.prod(g)) // merge for _, g in patched)
    rendered = [_expand(s, proc.video_token, video_counts) for s in rendered]

    text_inputs = proc.tokenizer(rendered, padding=True, return_tensors="pt")
    data["input_ids"] = text_inputs["input_ids"]
    data["attention_mask"] = text_inputs["attention_mask"]
    data["mm_token_type_ids"] = torch.tensor(proc.create_mm_token_type_ids(text_inputs["input_ids"]), dtype=torch.long)
    if images:
        data["pixel_values"] = image_inputs["pixel_values"]
        data["image_grid_thw"] = image_inputs["image_grid_thw"]
    data["pixel_values_videos"] = torch.cat([pv for pv, _ in patched])
    data["video_grid_thw"] = torch.tensor([g for _, g in patched], dtype=torch.long)
    if vlm.arch == "qwen2_5_vl":
        data["second_per_grid_ts"] = torch.tensor([ip.temporal_patch_size / fps] * len(videos))
    return BatchFeature(data)


def make_inputs(
    vlm: "TinyVLM",
    prompts: Sequence[Row] | Image.Image,
    texts: Sequence[str] | str = "describe the image",
    *,
    fps: float = 2.0,
) -> "BatchFeature":
    """Batched chat prompts, one row per prompt, left padded, on the model's device.

    Args:
        vlm: a `TinyVLM`.
        prompts: one entry per row: `None` (text only), a PIL image, a `Video` (Qwen only), or a list of them
            (several images / videos in one prompt, in that order before the text). A bare image means one row.
        texts: the user text of each row, or one string for all rows.
        fps: sampling rate assumed for videos (Qwen2.5-VL `second_per_grid_ts = 2 / fps`).

    Returns:
        `BatchFeature` with
        * Qwen: `input_ids [B, L]`, `attention_mask [B, L]`, `mm_token_type_ids [B, L]` (0 text, 1 image, 2 video),
          and when present `pixel_values [sum t*h*w, 1176]`, `image_grid_thw [n_img, 3]`,
          `pixel_values_videos [sum t*h*w, 1176]`, `video_grid_thw [n_vid, 3]`, `second_per_grid_ts [n_vid]`
          (Qwen2.5-VL only). Each image takes `h*w/4` `<|image_pad|>` tokens between `<|vision_start|>` and
          `<|vision_end|>`.
        * InternVL: `input_ids`, `attention_mask`, and `pixel_values [sum tiles, 3, T, T]`. Each image becomes
          `<img>` + `<IMG_CONTEXT>` x (image_seq_length * tiles) + `</img>`, tiles = the crop grid plus a
          thumbnail when the grid has more than one tile.
    """
    rows = [prompts] if isinstance(prompts, (Image.Image, Video)) else list(prompts)
    if not rows:
        raise ValueError("make_inputs needs at least one prompt")
    items = [_row_items(r) for r in rows]
    if isinstance(texts, str):
        texts = [texts] * len(rows)
    texts = list(texts)
    if len(texts) != len(rows):
        raise ValueError(f"got {len(texts)} texts for {len(rows)} prompts")

    videos = [it for row in items for it in row if isinstance(it, Video)]
    if videos and vlm.family != "qwen2_vl":
        raise NotImplementedError("video inputs are only built for the Qwen2-VL / Qwen2.5-VL family")

    rendered = [_render(vlm, row, t) for row, t in zip(items, texts)]
    images = [it for row in items for it in row if isinstance(it, Image.Image)]
    if videos:
        # The processor rejects video placeholders without a video processor, so expand and tokenize here.
        out = _qwen_inputs_with_videos(vlm, rendered, images, videos, fps)
    else:
        kwargs = dict(text=rendered, return_tensors="pt", padding=True)
        if images:
            kwargs["images"] = images
        out = vlm.processor(**kwargs)
    return out.to(vlm.model.device)


def make_video_inputs(
    vlm: "TinyVLM",
    frames: int = 4,
    size: tuple[int, int] = (56, 56),
    text: str = "describe the video",
    *,
    images: Sequence[Image.Image] | None = None,
    seed: int = 0,
    fps: float = 2.0,
) -> "BatchFeature":
    """One prompt holding a procedural video (and optionally images before it), Qwen family only.

    Args:
        vlm: a Qwen2-VL or Qwen2.5-VL `TinyVLM`.
        frames: number of frames (padded to even; `video_grid_thw[0] = ceil(frames / 2)`).
        size: `(h, w)` of each frame in pixels (resized to multiples of 28 within the processor's pixel bounds).
        text: the user text after the video.
        images: optional images placed before the video in the same prompt (mixed image + video).
        seed: seed of `procedural_video`.
        fps: Qwen2.5-VL `second_per_grid_ts = 2 / fps`.

    Returns:
        `BatchFeature` as in `make_inputs`, with `pixel_values_videos [t*h*w, 1176]`, `video_grid_thw [[t, h, w]]`,
        `t*h*w/4` `<|video_pad|>` tokens (type id 2) and, for Qwen2.5-VL, `second_per_grid_ts [1]`.
        With 4 frames of 56x56: t=2, h=w=4, 32 patches, 8 video tokens.
    """
    video = Video(procedural_video(frames, size[0], size[1], seed=seed))
    return make_inputs(vlm, [[*(images or []), video]], text, fps=fps)
