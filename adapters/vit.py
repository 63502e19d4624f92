"""Adapter ``vit``: plain vision-transformer encoders from transformers (DINOv2, ViT, CLIP vision, SigLIP vision).

Supported: ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel``,
and any model holding one of them as ``.vision_model`` (``CLIPVisionModelWithProjection``, ``CLIPModel``,
``SiglipModel``: only the vision tower is compressed).

Mapping onto the hook points every vision compressor uses (:mod:`tokcomp.tokens`):

* segments = the images of the batch; each image is ``P`` prefix tokens (CLS, DINOv2 register tokens; SigLIP:
  none) then its ``h x w`` patches in raster order, with absolute position embeddings already added;
* units: there is no 2x2 merger, so ``unit_size = 1``: every patch is its own unit and unit-granularity
  strategies act per patch; positions are ``(t=0, row, col)``;
* prefix tokens are carried with ``cls=True`` and never dropped (checked after every step);
* the encoder's output keeps its usual shape ``[B, P + h*w, C]``: patch strategies (IPCV) restore the grid
  themselves; for unit strategies the adapter restores it (merged patches copy their merge destination, pruned
  patches the nearest present token; ``session.adapter.rule = "nearest"`` for nearest-only), see
  :mod:`adapters._vit_restore`. The reduced set is ``session.adapter.last_tokens``.

There is no language model: LLM pruners are refused.
"""
from __future__ import annotations

import sys

from tokcomp.adapter import Adapter
from tokcomp.errors import AdapterError
from tokcomp.hookspecs import hookimpl

from . import _hf as hf
from ._vit_engine import Parts, ViTEngine, block_ops
from ._vit_restore import grid_layout, grid_tokens, patch_owner, restore_full_grid, update_sources

__all__ = ["ViTEncoderAdapter", "find_parts", "restore_full_grid", "update_sources", "patch_owner", "grid_layout",
           "grid_tokens", "block_ops"]

#: (module, class name, block kind) of the supported encoders
_ENCODERS = (
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Model", "dinov2"),
    ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers", "Dinov2WithRegistersModel",
     "dinov2"),
    ("transformers.models.vit.modeling_vit", "ViTModel", "vit"),
    ("transformers.models.clip.modeling_clip", "CLIPVisionModel", "clip"),
    ("transformers.models.siglip.modeling_siglip", "SiglipVisionModel", "clip"),
)


def _kind_of(module) -> str | None:
    """The block kind of ``module`` if it is one of the supported encoder classes, else None."""
    if "transformers" not in sys.modules:          # not a transformers model: do not pay for the import
        return None
    import importlib
    for mod_name, cls_name, kind in _ENCODERS:
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError):
            continue
        if isinstance(module, cls):
            return kind
    return None


def _encoder_of(model):
    """``(tower, kind)``: the supported encoder ``model`` is or holds as ``.vision_model``; ``(None, None)``."""
    kind = _kind_of(model)
    if kind is not None:
        inner = getattr(model, "vision_model", None)   # older CLIPVisionModel: a wrapper around the transformer
        return (inner if inner is not None and hasattr(inner, "embeddings") else model), kind
    inner = getattr(model, "vision_model", None)
    if inner is not None:
        kind = _kind_of(inner)
        if kind is not None:
            return _encoder_of(inner)
    return None, None


def find_parts(model) -> Parts:
    """Locate the embeddings, the layer list, the patch size and the prefix length of a supported encoder."""
    tower, kind = _encoder_of(model)
    if tower is None:
        raise AdapterError(f"the vit adapter does not support {type(model).__name__}")
    enc = getattr(tower, "encoder", None)
    layers = (getattr(enc, "layer", None) or getattr(enc, "layers", None) if enc is not None else None) \
        or getattr(tower, "layers", None)
    if layers is None or not hasattr(tower, "embeddings"):
        raise AdapterError(f"vit adapter: cannot find the embeddings and layers of {type(tower).__name__} "
                           "(transformers layout changed?)")
    cfg = tower.config
    ps = cfg.patch_size
    patch = (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))
    if kind == "clip":
        has_cls = hasattr(tower.embeddings, "class_embedding")
        n_prefix = 1 if has_cls else 0
    else:
        n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    return Parts(tower=tower, embeddings=tower.embeddings, layers=list(layers), patch_size=patch,
                 n_prefix=n_prefix, kind=kind, config=cfg)


class ViTEncoderAdapter(Adapter):
    """Plain ViT encoders (see the module docstring). One instance per session."""

    name = "vit"
    model_classes = tuple(c for _, c, _ in _ENCODERS)
    provides = frozenset({"vision.blocks", "vision.unit", "vision.patch"})

    def __init__(self, model) -> None:
        super().__init__(model)
        self.parts = find_parts(model)
        self.engine: ViTEngine | None = None
        self.session = None

    @classmethod
    def supports(cls, model) -> bool:
        return _encoder_of(model)[0] is not None

    def depths(self) -> dict[str, int]:
        return {"vision": len(self.parts.layers), "llm": 0}

    def attention_implementation(self, stage: str) -> str | None:
        return hf.attn_impl(self.parts.config) if stage == "vision" else None

    def attach(self, session) -> None:
        self.session = session
        if session.vision is None:
            return
        self.engine = ViTEngine(self, session.vision, self.parts)
        self.engine.attach(self.surgery)

    # -- what the last call left (convenience) ----------------------------------------------------------
    @property
    def rule(self) -> str:
        """Restoration rule for unit strategies: ``"sources"`` (default) or ``"nearest"``."""
        return self.engine.rule if self.engine is not None else "sources"

    @rule.setter
    def rule(self, value: str) -> None:
        if self.engine is None:
            raise AdapterError("vit adapter: no vision compressor in this session, nothing to restore")
        self.engine.rule = value

    @property
    def last_tokens(self):
        """The reduced token set ``finish`` returned in the last call (before restoration), or None."""
        return None if self.engine is None else self.engine.last_tokens

    @property
    def last_kept(self):
        """The token set the last block ran on in the last call (IPCV: the kept patches), or None."""
        return None if self.engine is None else self.engine.last_kept

    @property
    def last_sources(self):
        """LongTensor[N] merge sources of the last call (unit strategies), see ``update_sources``."""
        return None if self.engine is None else self.engine.last_sources

    @property
    def last_layout(self):
        return None if self.engine is None else self.engine.last_layout

    @property
    def last_blocks(self) -> list[dict]:
        """Per block of the last call: ``{"q": [per image], "kv": [per image], "mlp": int}`` token counts."""
        return [] if self.engine is None else self.engine.last_blocks


@hookimpl
def tokcomp_register(registry):
    registry.add_adapter(ViTEncoderAdapter)
