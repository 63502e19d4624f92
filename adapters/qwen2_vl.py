"""Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` (transformers 5.x),
on the shared VLM base (:mod:`adapters._vlm`).

What is Qwen's own: the tower packs every image and video frame into one sequence (frames, or Qwen2.5-VL windows,
as attention segments; units are the 2x2 merge groups; :mod:`adapters._qwen_vision`); images and videos are two
modalities; the LLM uses M-RoPE, so a re-packed prompt carries ``[text; t; h; w]`` positions (the kept tokens at
their ``get_rope_index`` positions on the FULL prompt, the text row contiguous) and ``model.model.rope_deltas``,
and decode steps shift generate()'s text row by the removed tokens. See ``docs/adapters/qwen2_vl.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokcomp.hookspecs import hookimpl

from . import _hf as hf
from ._qwen_vision import QwenVision, block_ops
from ._repack import Repacked
from ._vlm import RepackState, VLMAdapter

_GRID = {"image": "image_grid_thw", "video": "video_grid_thw"}


class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL and Qwen2.5-VL: every vision compressor and every LLM pruner, by hooks."""

    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    modalities = {"image": "pixel_values", "video": "pixel_values_videos"}
    gappy_positions = False          # the text row of the M-RoPE positions stays contiguous

    @classmethod
    def supports(cls, model) -> bool:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
        return isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration))

    @property
    def visual(self):
        return self.inner.visual

    def depths(self) -> dict[str, int]:
        return {"vision": len(self.visual.blocks), "llm": len(self.lm.layers)}

    def attention_implementation(self, stage: str) -> str | None:
        return hf.attn_impl(self.visual.config if stage == "vision" else self.lm.config)

    def dims(self):
        from ._dims import llm_dims, qwen_vision_dims
        return qwen_vision_dims(self.visual), llm_dims(self.lm, self.model.lm_head.out_features)

    def vision_module(self):
        return self.visual

    def image_features(self, inputs) -> Tensor:
        """Visual tokens entering the LLM (all images, placeholder order); zero rows at dropped units."""
        out = self.inner.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        return torch.cat(list(out.pooler_output), 0)

    def _block_ops(self, blk):
        return block_ops(blk)

    def placeholder_ids(self) -> dict[str, int]:
        cfg = self.model.config
        return {"image": int(cfg.image_token_id), "video": int(cfg.video_token_id)}

    def attach(self, session) -> None:
        self.surgery.set_attr(self.inner, "rope_deltas", getattr(self.inner, "rope_deltas", None))
        super().attach(session)

    def attach_vision(self, strategy) -> None:
        QwenVision(self, strategy).attach(self.surgery)

    def encode(self, modality: str, pixels: Tensor, kw: dict):
        fn = self.inner.get_image_features if modality == "image" else self.inner.get_video_features
        return fn(pixels, kw.get(_GRID[modality]), return_dict=True)

    def item_grids(self, kw: dict, mm: dict, matched: dict) -> dict[int, list[tuple[int, int, int]]]:
        out, merge, token_of = super().item_grids(kw, mm, matched), int(self.visual.spatial_merge_size), \
            self.placeholder_ids()
        for m, key in _GRID.items():
            if kw.get(key) is not None:        # the prompt's own grids (generate() expands them with the rows)
                out[token_of[m]] = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in kw[key].tolist()]
        return out

    def _grid_thw(self, kw: dict, matched: dict, modality: str) -> Tensor | None:
        if kw.get(_GRID[modality]) is not None or matched.get(modality) is None:
            return kw.get(_GRID[modality])
        mt, merge = matched[modality], int(self.visual.spatial_merge_size)
        return torch.tensor([[t, h * merge, w * merge] for t, h, w in (mt.result.grids[j] for j in mt.index)])

    def _token_types(self, ids: Tensor) -> Tensor:
        t = torch.zeros_like(ids)
        for kind, tok in enumerate(self.placeholder_ids().values(), start=1):
            t[ids == tok] = kind                                    # 1: image, 2: video
        return t

    def positions(self, kw: dict, matched: dict) -> Tensor:
        """M-RoPE positions ``[3, B, L]`` of the FULL prompt (given by generate(), else ``get_rope_index``)."""
        pos = kw.get("position_ids")
        if pos is not None:
            return (pos[1:] if pos.shape[0] == 4 else pos) if pos.ndim == 3 else pos[None].expand(3, -1, -1)
        ids = kw["input_ids"]
        types = kw.get("mm_token_type_ids")
        extra = {}
        if hasattr(self.visual, "fullatt_block_indexes") and kw.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kw["second_per_grid_ts"]
        pos3, _ = self.inner.get_rope_index(ids, types if types is not None else self._token_types(ids),
                                            image_grid_thw=self._grid_thw(kw, matched, "image"),
                                            video_grid_thw=self._grid_thw(kw, matched, "video"),
                                            attention_mask=kw.get("attention_mask"), **extra)
        return pos3

    def pack_positions(self, kw: dict, rp: Repacked, pos: Tensor, mask: Tensor, ids: Tensor) -> None:
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        pos3 = rp.gather(pos, 0)
        kw["position_ids"] = torch.cat([text[None].to(pos3), pos3], 0)
        types = kw.get("mm_token_type_ids")
        kw["mm_token_type_ids"] = rp.gather(types if types is not None else self._token_types(ids), 0)
        top = pos3.masked_fill(~rp.valid.to(pos3.device), -1).amax(dim=(0, 2))
        self.inner.rope_deltas = (top + 1 - rp.lengths.to(pos3.device)).view(-1, 1)

    def decode_positions(self, kw: dict, state: RepackState, extra: int, q: int) -> None:
        pos = kw.get("position_ids")     # generate()'s [text; t; h; w]: its text row counts the dropped tokens
        if pos is not None and pos.ndim == 3 and pos.shape[0] == 4:
            pos = pos.clone()
            pos[0] -= state.removed.to(pos)[:, None]
            kw["position_ids"] = pos
        # without positions the model continues from rope_deltas + cache length (set at the prefill)


@hookimpl
def tokcomp_register(registry):
    registry.add_adapter(Qwen2VLAdapter)
