"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout), on the shared VLM base (:mod:`adapters._vlm`).

What is LLaVA's own: the vision tower is a plain ViT (CLIP / SigLIP / DINOv2, driven like the ``vit`` adapter's,
:mod:`adapters._vit_engine`) whose ``vision_feature_layer`` output feeds the projector, with the CLS dropped
(``vision_feature_select_strategy="default"``); units are single patches (one patch = one LLM token); the vision
strategy drives the blocks up to the feature layer (``depths()["vision"]``) and the full grid is restored there,
zero rows at dropped patches, before transformers' output capture reads it; the projector then runs on the kept
patches only. The LLM (Llama / Qwen2 / Mistral) has plain 1-D positions: kept tokens keep their original, gappy
positions. Several images per prompt and left-padded batches work. SigLIP towers (no CLS,
``vision_feature_select_strategy="full"``) work the same way. See ``docs/adapters/llava.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokcomp.errors import AdapterError
from tokcomp.hookspecs import hookimpl

from . import _hf as hf
from ._vit_engine import ViTEngine
from ._vlm import VisionResult, VLMAdapter
from .vit import find_parts


class LlavaAdapter(VLMAdapter):
    """LLaVA (``LlavaForConditionalGeneration``): every vision compressor and every LLM pruner, by hooks."""

    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @classmethod
    def supports(cls, model) -> bool:
        from transformers import LlavaForConditionalGeneration
        return isinstance(model, LlavaForConditionalGeneration)

    def __init__(self, model) -> None:
        super().__init__(model)
        self.parts = find_parts(self.inner.vision_tower)
        self._pending = None                  # (tower call, kept units) until the projector ran

    @property
    def feature_depth(self) -> int:
        """Blocks up to the feature layer: ``hidden_states[k]`` is block ``k - 1``'s output (0: the embeddings)."""
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            return 0
        n = len(self.parts.layers)
        return layer % (n + 1) if -(n + 1) <= layer <= n else 0

    def depths(self) -> dict[str, int]:
        return {"vision": self.feature_depth, "llm": len(self.lm.layers)}

    def attention_implementation(self, stage: str) -> str | None:
        return hf.attn_impl(self.parts.config if stage == "vision" else self.lm.config)

    def dims(self):
        from ._dims import llm_dims, vit_vision_dims
        return vit_vision_dims(self.parts, self.inner.multi_modal_projector), \
            llm_dims(self.lm, self.model.lm_head.out_features)

    def vision_module(self):
        return self.inner.vision_tower

    def image_features(self, inputs) -> Tensor:
        """Visual tokens entering the LLM (all images, placeholder order); zero rows at dropped patches."""
        out = self.inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        return torch.cat(list(out.pooler_output), 0)

    def check(self, vision, llm) -> None:
        cfg = self.model.config
        if vision is not None:
            if self.feature_depth < 1:
                raise AdapterError(f"the llava adapter compresses inside the vision tower up to its feature layer; "
                                   f"vision_feature_layer={cfg.vision_feature_layer!r} selects no single tower layer "
                                   "(supported: one int layer, e.g. -2 as in LLaVA-1.5, or -1)")
            if (cfg.vision_feature_select_strategy, self.parts.n_prefix) not in (("default", 1), ("full", 0)):
                raise AdapterError("the llava adapter needs every LLM token to be one patch: "
                                   "vision_feature_select_strategy='default' with one CLS token (CLIP, DINOv2), or "
                                   f"'full' with none (SigLIP); this model: {cfg.vision_feature_select_strategy!r} "
                                   f"with {self.parts.n_prefix} prefix tokens")

    def check_forward(self, kw: dict) -> None:
        cfg = self.model.config
        if self.session.vision is None:
            return
        if kw.get("vision_feature_layer") not in (None, cfg.vision_feature_layer) or \
                kw.get("vision_feature_select_strategy") not in (None, cfg.vision_feature_select_strategy):
            raise AdapterError("inside a tokcomp session LLaVA reads the configured vision_feature_layer / "
                               "vision_feature_select_strategy; do not override them per call")
        if kw.get("image_sizes") is not None:
            raise AdapterError("image_sizes (variable-resolution backbones) is not supported by the llava adapter "
                               "with a vision compressor")

    # -- vision side ----------------------------------------------------------------------------------------
    def attach_vision(self, strategy) -> None:
        engine = ViTEngine(self, strategy, self.parts, family=self.name, blocks=self.parts.layers[:self.feature_depth],
                           rule="zeros", on_done=self._tower_done)
        engine.attach(self.surgery)
        projector = self.inner.multi_modal_projector
        self.surgery.pre_hook(projector, self._projector_pre)
        self.surgery.post_hook(projector, self._projector_post)

    def _tower_done(self, call, kept) -> None:
        self._pending = (call, None if kept is None or bool(kept.all()) else kept)

    def _projector_pre(self, mod, args, kw):
        if self._pending is None or self._pending[1] is None:
            return None
        x = args[0]                                                     # [B, h*w, C]
        keep = self._pending[1].nonzero()[:, 0].to(x.device)
        return (x.reshape(-1, x.shape[-1])[keep][None], *args[1:]), kw   # [1, U', C]

    def _projector_post(self, mod, args, kw, out):
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        call, kept = pending
        layout = call.run.layout
        B, n = layout.n_segments, layout.n_units // layout.n_segments
        if kept is not None:
            full = out.new_zeros(B * n, out.shape[-1])
            full[kept.nonzero()[:, 0].to(out.device)] = out[0]
            out = full.view(B, n, -1)
        _, h, w = (int(x) for x in layout.segment_grid[0])
        self.vision_done(VisionResult(features=out, sizes=[n] * B, kept=kept, record=call.record,
                                      grids=[(1, h, w)] * B))
        return out if kept is not None else None

    def item_grids(self, kw: dict, mm: dict, matched: dict) -> dict[int, list[tuple[int, int, int]]]:
        out = super().item_grids(kw, mm, matched)
        tok = int(self.model.config.image_token_id)
        if tok in out or kw.get("input_ids") is None:
            return out
        px = kw.get("pixel_values")                 # the tower runs inside forward: the grid from the pixels
        ph, pw = self.parts.patch_size
        if px is not None:
            h, w = int(px.shape[-2]) // ph, int(px.shape[-1]) // pw
        else:
            side = int(round(int(self.model.config.image_seq_length) ** 0.5))
            h = w = side
        n = int(((kw["input_ids"] == tok) & (kw["attention_mask"].bool() if kw.get("attention_mask") is not None
                                             else True)).sum())
        return {tok: [(1, h, w)] * (n // (h * w))} if n and n % (h * w) == 0 else out


@hookimpl
def tokcomp_register(registry):
    registry.add_adapter(LlavaAdapter)
