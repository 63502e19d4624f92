"""Adapter for ``InternVLForConditionalGeneration`` (the InternVL3 "-hf" port: InternViT + pixel shuffle + MLP
projector + Qwen2 LLM), transformers 5.x.

Hooks only (all through ``self.surgery``, all removed on exit, also after an exception):

* vision side (:mod:`._internvl_vision`): tiles are the attention segments (CLS kept in every tile), units are
  the 2x2 patch blocks that pixel shuffle concatenates into one LLM token; the block loop runs natively on
  ``[T, K, C]`` whenever it can, the full square grid is restored before pixel shuffle and, for unit strategies,
  the projector runs on the kept units only.
* top-level pre-hook on the model: computes the visual features itself when pixels are given (so the kept
  units are known before the LLM runs), re-packs the prompt with fewer ``<IMG_CONTEXT>`` placeholders keeping
  every token's original 1-D position, maps generate()'s full-length masks during decoding, and starts the
  shared LLM engine (:mod:`._llm`) for the forward.

Tiles of an image are found from the prompt: a run of ``<IMG_CONTEXT>`` placeholders is one image of
``run / image_seq_length`` tiles. The vision side cannot know that grouping (``generate()`` encodes the pixels
before any prompt reaches the model), so on the vision side every tile is its own image. See
``docs/adapters/internvl.md``.
"""
from __future__ import annotations

import inspect
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokcomp.adapter import Adapter
from tokcomp.errors import AdapterError
from tokcomp.hookspecs import hookimpl
from tokcomp.session import ForwardRecord

from . import _hf as hf
from ._internvl_vision import VisionEngine
from ._llm import LLMEngine
from ._repack import Repacked, left_repack, token_keep_mask
from ._spans import visual_spans


@dataclass
class _TowerResult:
    """A finished vision-tower call, matched to ``mm_encoder_outputs["image"]`` by object identity."""

    output: Any                      # the tower's output object (get_image_features sets its pooler_output)
    kept: Tensor                     # BoolTensor[U] placeholder order
    record: ForwardRecord


@dataclass
class _Repack:
    """How the last prefill was re-packed, to map later forwards on its cache."""

    cache: Any                       # weakref to the cache the prefill wrote, or None
    len_orig: int                    # L: prompt length before re-packing
    len_new: int                     # L': after
    mask_new: Tensor                 # LongTensor[B, L'] re-packed prompt mask
    next_pos: Tensor                 # LongTensor[B] first position after the ORIGINAL prompt (real tokens per row)


class InternVLAdapter(Adapter):
    """InternVL3 (``InternVLForConditionalGeneration``): every vision compressor and every LLM pruner, by hooks."""

    name = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    provides = frozenset({"vision.blocks", "vision.unit", "vision.patch", "llm.layers", "llm.attention_rows",
                          "llm.keys"})

    @classmethod
    def supports(cls, model) -> bool:
        from transformers import InternVLForConditionalGeneration
        return isinstance(model, InternVLForConditionalGeneration)

    def __init__(self, model) -> None:
        super().__init__(model)
        self.tower = model.model.vision_tower
        self.lm = model.model.language_model
        self.session = None
        self.vision: VisionEngine | None = None
        self.engine = None
        self._results: deque[_TowerResult] = deque(maxlen=8)
        self._repack: _Repack | None = None
        self._params = [n for n, p in inspect.signature(type(model).forward).parameters.items()
                        if n != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    # -- protocol ---------------------------------------------------------------------------------------
    def depths(self) -> dict[str, int]:
        return {"vision": len(self.tower.encoder.layer), "llm": len(self.lm.layers)}

    # -- measurement --------------------------------------------------------------------------------------
    def dims(self):
        from ._dims import internvl_vision_dims, llm_dims
        return (internvl_vision_dims(self.tower, self.model.model.multi_modal_projector),
                llm_dims(self.lm, self.model.lm_head.out_features))

    def stage_modules(self) -> dict:
        return {"vision": self.tower, "llm": self.lm}

    def image_features(self, inputs) -> Tensor:
        """Visual tokens entering the LLM (all tiles, placeholder order); zero rows at dropped units."""
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        feats = out.pooler_output
        return feats.reshape(-1, feats.shape[-1])

    def attention_implementation(self, stage: str) -> str | None:
        return hf.attn_impl(self.tower.config if stage == "vision" else self.lm.config)

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

    def attach(self, session) -> None:
        self.session = session
        self.surgery.on_undo(self._clear)
        if session.vision is not None:
            self.vision = VisionEngine(self, session.vision, self.name)
            self.vision.attach(self.surgery)
            self.surgery.post_hook(self.tower, self._tower_post)
        self.surgery.pre_hook(self.model, self._model_pre)
        if self._changes_llm_length():
            for layer in self.lm.layers:     # gappy positions must not look like packed sequences (flash, B=1)
                self.surgery.pre_hook(layer, self._layer_positions)
        self.engine = LLMEngine(model=self.model, language_model=self.lm, pruner=session.llm,
                                      surgery=self.surgery, on_prefill=self._on_prefill)
        self.engine.attach()

    def _clear(self) -> None:
        self.vision, self.engine, self._repack = None, None, None
        self._results.clear()

    def _changes_llm_length(self) -> bool:
        v = self.session.vision
        return self.session.llm is not None or (v is not None and v.granularity == "unit")

    # -- vision tower -----------------------------------------------------------------------------------
    def _tower_post(self, mod, args, kw, out):
        v = self.vision
        if v is not None and v.last_kept is not None and v.last_record is not None:
            self._results.append(_TowerResult(output=out, kept=v.last_kept, record=v.last_record))
            v.last_record = None
        return None

    def _match(self, enc) -> _TowerResult | None:
        for r in reversed(self._results):
            if r.output is enc:
                return r
        return None

    # -- top level ----------------------------------------------------------------------------------------
    def _model_pre(self, mod, args, kw):
        kw = dict(kw)
        if len(args) > len(self._params):
            raise AdapterError("too many positional arguments for InternVLForConditionalGeneration.forward")
        for name, value in zip(self._params, args):
            if name in kw:
                raise AdapterError(f"forward() got {name!r} twice")
            kw[name] = value
        if self.vision is not None and (kw.get("vision_feature_layer") not in (None, -1) or
                                        kw.get("vision_feature_select_strategy") not in (None, "default")):
            raise AdapterError("inside a tokcomp session InternVL reads the last vision layer "
                               "(vision_feature_layer=-1, vision_feature_select_strategy='default')")
        cache = hf.get_cache(kw)
        if hf.is_static_cache(cache) and self._changes_llm_length():
            raise AdapterError(f"{type(cache).__name__} (a static, pre-allocated cache) is not supported inside a "
                               "tokcomp session that changes the LLM sequence: compressed prompts and layers hold "
                               "fewer keys. Fix: use the default DynamicCache (do not pass "
                               "cache_implementation='static').")
        past = hf.cache_length(cache)
        if past > 0:
            kw = self._decode_inputs(kw, cache, past)
            self._begin_engine(kw, None)
        else:
            kw, spans = self._prefill_inputs(kw)
            self._begin_engine(kw, spans)
        return (), kw

    def _layer_positions(self, mod, args, kw):
        if self._repack is not None and kw.get("position_ids") is not None:
            kw["position_ids"] = None            # RoPE is already computed; the ids only feed flash's packing test
            return args, kw
        return None

    def _prefill_inputs(self, kw: dict) -> tuple[dict, list | None]:
        self._repack = None
        mm = dict(kw.get("mm_encoder_outputs") or {})
        if self.vision is not None and kw.get("pixel_values") is not None:
            if mm.get("image") is not None:
                raise AdapterError("pass either pixel_values or mm_encoder_outputs['image'], not both")
            mm["image"] = self.model.model.get_image_features(pixel_values=kw.pop("pixel_values"), return_dict=True)
            kw["mm_encoder_outputs"] = mm
        enc = mm.get("image")
        result = self._match(enc) if enc is not None else None
        ids = kw.get("input_ids")
        kept = self._kept(enc, result) if enc is not None else None
        if ids is None:
            if kept is not None and not bool(kept.all()):
                raise AdapterError("a unit-granularity vision strategy dropped visual tokens, which needs input_ids "
                                   "to re-pack the prompt; inputs_embeds alone are not supported")
            self._record(kw, result, None)
            return kw, None
        orig_ids, keep, rp = ids, None, None
        grids = self._grids(ids)
        if kept is not None and not bool(kept.all()):
            keep, rp = self._repack_prompt(kw, kept)
            feats = enc.pooler_output
            flat = feats.reshape(-1, feats.shape[-1])
            mm["image"] = hf.pooled_output(flat[kept.to(flat.device)][None])
            kw["mm_encoder_outputs"] = mm
        spans = visual_spans(orig_ids, grids, keep, rp) if grids else None
        self._record(kw, result, spans)
        return kw, spans

    def _kept(self, enc, result: _TowerResult | None) -> Tensor | None:
        """BoolTensor[P] keep flag of every placeholder (None: the features did not come from a compressed call)."""
        if result is None or bool(result.kept.all()):
            return None
        feats = enc.pooler_output
        if not torch.is_tensor(feats):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        flat = feats.reshape(-1, feats.shape[-1])
        if flat.shape[0] == result.kept.numel():
            return result.kept
        # generate(num_return_sequences>1) repeats the features per prompt: dropped units are the zero rows
        return flat.detach().abs().amax(-1).cpu() > 0

    def _grids(self, ids: Tensor) -> dict[int, list[tuple[int, int, int]]]:
        """``{<IMG_CONTEXT> id: [(tiles, h, w) of every image, prompt order]}`` from the runs of placeholders."""
        cfg = self.model.config
        tok, seq = int(cfg.image_token_id), int(cfg.image_seq_length)
        side = int(round(seq ** 0.5))
        if side * side != seq:
            raise AdapterError(f"image_seq_length={seq} is not a square number of units per tile")
        out = []
        for row in ids.detach().cpu():
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

    def _repack_prompt(self, kw: dict, kept: Tensor) -> tuple[Tensor, Repacked]:
        """Drop the placeholders of dropped units, left re-pad, keep original positions. Updates ``kw``."""
        cfg = self.model.config
        ids, am = kw["input_ids"], kw.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise AdapterError("re-packing a prompt needs the 2-D attention_mask (or none), not a prepared one")
        try:
            keep = token_keep_mask(ids, am, {int(cfg.image_token_id): kept})
        except ValueError as exc:
            raise AdapterError(f"the prompt's <IMG_CONTEXT> placeholders do not match the image features: {exc}. "
                               "Build prompts with the InternVL processor (one placeholder per visual token)") from None
        rp = left_repack(keep)
        full_mask = am if am is not None else torch.ones_like(ids)
        pos = kw.get("position_ids")
        if pos is None:
            pos = (full_mask.long().cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
        pos = pos.expand(ids.shape[0], -1) if pos.shape[0] != ids.shape[0] else pos
        pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
        mask = rp.valid.to(am.dtype if am is not None else torch.long)
        kw["input_ids"] = rp.gather(ids, pad)
        kw["attention_mask"] = mask                    # always explicit: gappy positions + no mask = "packed"
        kw["position_ids"] = rp.gather(pos, 0)
        if kw.get("labels") is not None:
            kw["labels"] = rp.gather(kw["labels"], -100)
        cache = hf.get_cache(kw)
        if cache is None and hf.wants_cache(kw, self.lm.config):
            cache = hf.new_cache(self.lm.config)
            hf.set_cache(kw, cache)
        self._repack = _Repack(cache=weakref.ref(cache) if cache is not None else None, len_orig=ids.shape[1],
                               len_new=rp.index.shape[1], mask_new=mask,
                               next_pos=pos.masked_fill(full_mask == 0, -1).amax(1) + 1)
        return keep, rp

    def _decode_inputs(self, kw: dict, cache, past: int) -> dict:
        """A forward on a cache whose prefill was re-packed: map the full-length 2-D mask (or build one) and,
        when no positions are given, continue after the ORIGINAL prompt length."""
        if kw.get("pixel_values") is not None or (kw.get("mm_encoder_outputs") or {}).get("image") is not None:
            if self.vision is not None:
                raise AdapterError("continuing a non-empty cache with new images is not supported inside a tokcomp "
                                   "session with a vision compressor; start a new prefill (empty cache)")
        state = self._repack
        if state is None or state.cache is None or state.cache() is not cache:
            self._repack = None
            return kw
        ids = kw.get("input_ids")
        q = ids.shape[1] if ids is not None else kw["inputs_embeds"].shape[1]
        extra = past - state.len_new                     # tokens cached after the prompt
        if extra < 0:
            raise AdapterError(f"this cache holds {past} tokens but its re-packed prompt had {state.len_new}; the "
                               "cache of a re-packed prompt cannot be cropped below the prompt. Fix: prefill again")
        am = kw.get("attention_mask")
        if am is not None:
            if am.dim() != 2:
                raise AdapterError("a forward on a re-packed prompt's cache needs the 2-D attention_mask (or none)")
            full, packed = state.len_orig + extra + q, state.len_new + extra + q
            if am.shape[1] == full:
                am = torch.cat([state.mask_new.to(am), am[:, state.len_orig:]], 1)
            elif am.shape[1] != packed:
                raise AdapterError(f"attention_mask has {am.shape[1]} columns; expected {full} (original prompt + "
                                   f"new tokens) or {packed} (re-packed prompt + new tokens)")
        else:
            b = state.mask_new.shape[0]
            am = torch.cat([state.mask_new, state.mask_new.new_ones(b, extra + q)], 1)
        kw["attention_mask"] = am
        if kw.get("position_ids") is None:
            steps = torch.arange(extra, extra + q, device=state.next_pos.device)
            kw["position_ids"] = (state.next_pos[:, None] + steps[None]).to(am.device)
        return kw

    # -- records and the LLM engine ---------------------------------------------------------------------
    def _record(self, kw: dict, result: _TowerResult | None, spans) -> None:
        rec = ForwardRecord()
        if result is not None:
            rec.vision_blocks = dict(result.record.vision_blocks)
            rec.vision_in = result.record.vision_in
            rec.vision_block_runs = dict(result.record.vision_block_runs)
        if spans is not None:
            rec.vision_out = [int(sp.positions.numel()) for row in spans for sp in row]
            rec.llm_in = [sum(int(sp.positions.numel()) for sp in row) for row in spans]
            if result is None and sum(rec.llm_in):   # unmodified tower: every tile, CLS included, in every layer
                seq = int(self.model.config.image_seq_length)
                tiles, per_tile = sum(rec.llm_in) // seq, 1 + 4 * seq
                rec.vision_in = tiles * per_tile
                for i in range(len(self.tower.encoder.layer)):
                    rec.vision_blocks[i] = rec.vision_in
                    rec.vision_block_runs[i] = ([per_tile] * tiles, [per_tile] * tiles, rec.vision_in)
        elif kw.get("input_ids") is not None:
            rec.llm_in = [0] * kw["input_ids"].shape[0]
        ids, am = kw.get("input_ids"), kw.get("attention_mask")
        if ids is not None:
            valid = am.bool().sum(1) if am is not None else torch.full((ids.shape[0],), ids.shape[1])
            rec.llm_text = [int(v) - n for v, n in zip(valid.tolist(), rec.llm_in)]
        self.session.report.prefill.append(rec)

    def _on_prefill(self, layers: dict[int, list[int]]) -> None:
        if self.session.report.prefill:
            self.session.report.prefill[-1].llm_layers = dict(layers)

    def _begin_engine(self, kw: dict, spans) -> None:
        ids, am = kw.get("input_ids"), kw.get("attention_mask")
        visual = None
        if spans is not None and ids is not None:
            visual = ids == int(self.model.config.image_token_id)
            if am is not None and torch.is_tensor(am) and am.dim() == 2:
                visual = visual & am[:, -ids.shape[1]:].bool()
        elif ids is not None:
            visual = torch.zeros_like(ids, dtype=torch.bool)
        self.engine.begin(input_ids=ids, attention_mask=am, spans=spans, visual=visual)


@hookimpl
def tokcomp_register(registry):
    registry.add_adapter(InternVLAdapter)
