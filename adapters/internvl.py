"""Adapter for ``InternVLForConditionalGeneration`` (the InternVL3 "-hf" port: InternViT + pixel shuffle + MLP
projector + Qwen2 LLM), on the shared VLM base (:mod:`adapters._vlm`).

What is InternVL's own: tiles are the attention segments (CLS kept in every tile) and units are the 2x2 patch
blocks pixel shuffle concatenates into one LLM token (:mod:`adapters._internvl_vision`); the LLM has plain 1-D
positions, so kept tokens keep gappy original positions; an image's tiles are found from the prompt (a run of
``<IMG_CONTEXT>`` placeholders is one image of ``run / image_seq_length`` tiles: ``generate()`` encodes the pixels
before any prompt reaches the model, so on the vision side every tile is its own image). See
``docs/adapters/internvl.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokcomp.errors import AdapterError
from tokcomp.hookspecs import hookimpl

from . import _hf as hf
from ._internvl_vision import InternVLVision
from ._vlm import VLMAdapter


class InternVLAdapter(VLMAdapter):
    """InternVL3 (``InternVLForConditionalGeneration``): every vision compressor and every LLM pruner, by hooks."""

    name = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    images_from_prompt = True        # the tower sees tiles; which tiles form an image only the prompt tells

    @classmethod
    def supports(cls, model) -> bool:
        from transformers import InternVLForConditionalGeneration
        return isinstance(model, InternVLForConditionalGeneration)

    @property
    def tower(self):
        return self.inner.vision_tower

    def depths(self) -> dict[str, int]:
        return {"vision": len(self.tower.encoder.layer), "llm": len(self.lm.layers)}

    def attention_implementation(self, stage: str) -> str | None:
        return hf.attn_impl(self.tower.config if stage == "vision" else self.lm.config)

    def dims(self):
        from ._dims import internvl_vision_dims, llm_dims
        return internvl_vision_dims(self.tower, self.inner.multi_modal_projector), \
            llm_dims(self.lm, self.model.lm_head.out_features)

    def vision_module(self):
        return self.tower

    def image_features(self, inputs) -> Tensor:
        """Visual tokens entering the LLM (all tiles, placeholder order); zero rows at dropped units."""
        feats = self.inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        return feats.reshape(-1, feats.shape[-1])

    def check(self, vision, llm) -> None:
        cfg = self.model.config
        if vision is not None:
            if cfg.vision_feature_layer != -1 or cfg.vision_feature_select_strategy != "default":
                raise AdapterError("the internvl adapter compresses the last InternViT layer's tokens; this model "
                                   f"reads vision_feature_layer={cfg.vision_feature_layer!r} with "
                                   f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
                                   "(supported: -1 and 'default', as in every InternVL3 checkpoint)")
            if abs(float(cfg.downsample_ratio) - 0.5) > 1e-9:
                raise AdapterError(f"the internvl adapter needs pixel shuffle with downsample_ratio=0.5 (2x2 units); "
                                   f"this model uses {cfg.downsample_ratio}")

    def check_forward(self, kw: dict) -> None:
        if self.session.vision is not None and (kw.get("vision_feature_layer") not in (None, -1) or
                                                kw.get("vision_feature_select_strategy") not in (None, "default")):
            raise AdapterError("inside a tokcomp session InternVL reads the last vision layer "
                               "(vision_feature_layer=-1, vision_feature_select_strategy='default')")

    def attach_vision(self, strategy) -> None:
        InternVLVision(self, strategy).attach(self.surgery)

    def item_grids(self, kw: dict, mm: dict, matched: dict) -> dict[int, list[tuple[int, int, int]]]:
        """``{<IMG_CONTEXT> id: [(tiles, h, w) of every image, prompt order]}`` from the runs of placeholders."""
        cfg = self.model.config
        tok, seq = int(cfg.image_token_id), int(cfg.image_seq_length)
        side = int(round(seq ** 0.5))
        if side * side != seq:
            raise AdapterError(f"image_seq_length={seq} is not a square number of units per tile")
        out = []
        for row in kw["input_ids"].detach().cpu():
            is_img = (row == tok).to(torch.int8)
            if not bool(is_img.any()):
                continue
            edges = torch.diff(torch.nn.functional.pad(is_img, (1, 1)))
            starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
            for n in (ends - starts).tolist():
                if n % seq:
                    raise AdapterError(f"a run of {n} <IMG_CONTEXT> placeholders is not a whole number of tiles of "
                                       f"{seq} tokens; build prompts with the InternVL processor")
                out.append((n // seq, side, side))
        return {tok: out} if out else {}

    def filter_features(self, modality: str, enc, flags: list[Tensor]):
        feats = enc.pooler_output
        flat = feats.reshape(-1, feats.shape[-1])
        return hf.pooled_output(flat[torch.cat(flags).to(flat.device)][None])


@hookimpl
def tokcomp_register(registry):
    registry.add_adapter(InternVLAdapter)
