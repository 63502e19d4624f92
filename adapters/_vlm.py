"""The VLM adapter base: everything a vision-language adapter does that is not specific to its architecture.

A concrete adapter (``qwen2_vl.py``, ``internvl.py``, ``llava.py``) names its modules and answers a few questions
(template methods, below); :class:`VLMAdapter` does the rest, through hooks only:

* the vision side: the architecture attaches a :class:`~adapters._tower.HookedTower` (every vision call runs a
  strategy, the identity one when the session has none, so the achieved counts are always recorded) and hands each
  finished call to :meth:`VLMAdapter.vision_done` as a :class:`VisionResult`;
* a top-level pre-hook on the model: computes the visual features itself when a vision compressor is active (so
  the kept units are known before the LLM runs), matches the features a forward receives to the vision call that
  made them, re-packs the prompt with fewer placeholders at the ORIGINAL positions, maps ``generate()``'s
  full-length masks and positions during decoding, refuses what cannot work (static caches, new images behind a
  re-packed prompt) before anything runs, and starts the shared LLM engine (:mod:`adapters._llm`);
* records: one :class:`~tokcomp.session.ForwardRecord` per prefill, with its vision part.

Template methods (see each docstring): ``modules``, ``placeholder_ids``, ``encode``, ``item_grids``,
``positions``, ``pack_positions``, ``decode_positions``, ``filter_features``, ``attach_vision`` and optionally
``check_forward``.
"""
from __future__ import annotations

import inspect
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokcomp.adapter import Adapter
from tokcomp.errors import AdapterError
from tokcomp.session import ForwardRecord
from tokcomp.strategy import ViTCompressor

from . import _hf as hf
from ._llm import LLMEngine
from ._repack import Repacked, left_repack, token_keep_mask
from ._spans import visual_spans


class Identity(ViTCompressor):
    """The vision strategy of a session without one: changes nothing, so the driver only records counts."""

    name = "none"
    granularity = "unit"

    def __init__(self):
        from tokcomp.config import StrategyConfig

        class _Config(StrategyConfig):
            needs_budget = False
        super().__init__(_Config())


# ------------------------------------------------------------------------------------------------------
# vision results and how a forward's features are matched to them
# ------------------------------------------------------------------------------------------------------
@dataclass
class VisionResult:
    """A finished vision call, as the language model will consume it.

    Attributes:
        features: the producer's output the model splits into per-item features (Qwen: merger ``[U, D]``;
            InternVL: projector ``[T, n, D]``; LLaVA: projector ``[I, N, D]``), dropped units as zero rows.
        sizes: units (LLM tokens) per item, in placeholder order (images / video frames / tiles).
        kept: BoolTensor[U] kept units in placeholder order, or None (every unit kept).
        record: the call's achieved counts.
        grids: the (t, h, w) unit grid of each item, or None (the adapter derives them from the prompt).
    """

    features: Tensor
    sizes: list[int]
    kept: Tensor | None
    record: ForwardRecord
    grids: list[tuple[int, int, int]] | None = None
    starts: list[int] = field(init=False)

    def __post_init__(self):
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + int(n))

    def items(self) -> list[Tensor]:
        """The per-item features ``[n_i, D]`` (views of ``features``)."""
        flat = self.features.reshape(-1, self.features.shape[-1])
        return [flat[a:b] for a, b in zip(self.starts, self.starts[1:])]

    def item_index(self, received: list[Tensor]) -> list[int] | None:
        """Which item of this call each received per-item feature is (generate() may repeat items for beams /
        ``num_return_sequences``: as views of the same storage, or as copies); None if they are not this call's."""
        flat = self.features.reshape(-1, self.features.shape[-1])
        base, row = flat.data_ptr(), flat.stride(0) * flat.element_size()
        mine, out = self.items(), []
        for f in received:
            f = f.reshape(-1, f.shape[-1])
            offset, rem = divmod(f.data_ptr() - base, row) if row else (-1, 1)
            if f.numel() and not rem and offset in self.starts[:-1] and f.data_ptr() >= base:
                j = self.starts.index(offset)
                if mine[j].shape == f.shape:
                    out.append(j)
                    continue
            j = next((k for k, m in enumerate(mine) if m.shape == f.shape and torch.equal(m, f)), None)
            if j is None:
                return None
            out.append(j)
        return out

    def flags(self, index: list[int]) -> list[Tensor]:
        """Keep flags (BoolTensor per item) of the items ``index``."""
        kept = self.kept if self.kept is not None else torch.ones(self.starts[-1], dtype=torch.bool)
        return [kept[self.starts[j]:self.starts[j + 1]] for j in index]


@dataclass
class _Match:
    """A forward's features of one modality, matched to the vision call that made them."""

    result: VisionResult
    index: list[int]

    @property
    def flags(self) -> list[Tensor]:
        return self.result.flags(self.index)

    @property
    def dropped(self) -> bool:
        return self.result.kept is not None and not all(bool(f.all()) for f in self.flags)


@dataclass
class Prefill:
    """One prefill before / after re-packing (for the visual spans)."""

    ids: Tensor | None                                   # LongTensor[B, L] the original prompt
    grids: dict[int, list[tuple[int, int, int]]]          # placeholder id -> unit grid of each item
    keep: Tensor | None = None                           # BoolTensor[B, L] surviving tokens (None: no re-pack)
    repacked: Repacked | None = None


@dataclass
class RepackState:
    """How the last prefill was re-packed, to map later forwards on its cache."""

    cache: Any                       # weakref to the cache the prefill wrote, or None
    len_orig: int                    # L: prompt length before re-packing
    len_new: int                     # L': after
    mask_new: Tensor                 # LongTensor[B, L'] re-packed prompt mask
    removed: Tensor                  # LongTensor[B] real tokens removed per row
    next_pos: Tensor                 # LongTensor[B] first 1-D position after the ORIGINAL prompt


def _items(pooled) -> list[Tensor]:
    """Per-item features of a ``pooler_output``: a list / tuple of ``[n, D]``, or a tensor ``[I, n, D]`` / ``[U, D]``."""
    if torch.is_tensor(pooled):
        return list(pooled) if pooled.dim() == 3 else [pooled]
    return list(pooled)


# ------------------------------------------------------------------------------------------------------
# the base
# ------------------------------------------------------------------------------------------------------
class VLMAdapter(Adapter):
    """Base of the vision-language adapters (see the module docstring)."""

    provides = frozenset({"vision.blocks", "vision.unit", "vision.patch", "llm.layers", "llm.attention_rows",
                          "llm.keys"})
    #: modality -> the forward keyword carrying its pixels
    modalities: ClassVar[dict[str, str]] = {"image": "pixel_values"}
    #: True where kept tokens carry gappy 1-D positions: the LLM then always gets an explicit mask, and layers get
    #: ``position_ids=None`` (flash-attention would read gaps as packed sequences)
    gappy_positions: ClassVar[bool] = True
    #: True where an image spans several vision segments the tower cannot group (InternVL tiles): the record's
    #: per-image ``vision_out`` then comes from the prompt's visual spans
    images_from_prompt: ClassVar[bool] = False

    def __init__(self, model) -> None:
        super().__init__(model)
        self.inner, self.lm = self.modules()
        self.session = None
        self.engine: LLMEngine | None = None
        self._results: deque[VisionResult] = deque(maxlen=16)
        self._repacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # cache -> its re-packed prefill
        self._repack: RepackState | None = None       # the forward in flight (forwards are serialised per session)
        self._prefill: Prefill | None = None
        self._labels: Tensor | None = None
        self._vision_seen = 0
        self._params = [n for n, p in inspect.signature(type(model).forward).parameters.items()
                        if n != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    # -- template methods ---------------------------------------------------------------------------------
    def modules(self) -> tuple[Any, Any]:
        """``(inner model (model.model), decoder stack)``."""
        return self.model.model, self.model.model.language_model

    def placeholder_ids(self) -> dict[str, int]:
        """``{modality: placeholder token id}``."""
        return {"image": int(self.model.config.image_token_id)}

    def attach_vision(self, strategy) -> None:
        """Attach the vision side (a HookedTower driving ``strategy``) through ``self.surgery``; every finished call
        goes to :meth:`vision_done`."""
        raise NotImplementedError

    def encode(self, modality: str, pixels: Tensor, kw: dict) -> Any:
        """The model's own feature call for ``pixels`` (``get_image_features(..., return_dict=True)``)."""
        return self.inner.get_image_features(pixel_values=pixels, return_dict=True)

    def item_grids(self, kw: dict, mm: dict, matched: dict) -> dict[int, list[tuple[int, int, int]]]:
        """``{placeholder id: [(t, h, w) unit grid of each item, prompt order]}`` for the visual spans; default:
        the matched vision calls' own grids (adapters add what the forward's inputs tell when nothing matched)."""
        token_of = self.placeholder_ids()
        return {token_of[m]: [mt.result.grids[j] for j in mt.index] for m, mt in matched.items()
                if mt is not None and mt.result.grids is not None}

    def positions(self, kw: dict, matched: dict) -> Tensor:
        """Positions of the FULL prompt, ``[..., B, L]`` (1-D: given or ``cumsum(mask) - 1``)."""
        ids, am = kw["input_ids"], kw.get("attention_mask")
        pos = kw.get("position_ids")
        if pos is None:
            full = am if am is not None else torch.ones_like(ids)
            pos = (full.long().cumsum(-1) - 1).masked_fill(full == 0, 0)
        return pos.expand(ids.shape[0], -1) if pos.shape[0] != ids.shape[0] else pos

    def pack_positions(self, kw: dict, rp: Repacked, pos: Tensor, mask: Tensor, ids: Tensor) -> None:
        """Set the re-packed prompt's positions in ``kw`` (kept tokens keep their original positions)."""
        kw["position_ids"] = rp.gather(pos, 0)

    def decode_positions(self, kw: dict, state: RepackState, extra: int, q: int) -> None:
        """Positions of a later forward on a re-packed prompt's cache (``extra`` tokens cached after the prompt,
        ``q`` in this forward); default: continue after the ORIGINAL prompt when none are given."""
        if kw.get("position_ids") is None:
            steps = torch.arange(extra, extra + q, device=state.next_pos.device)
            kw["position_ids"] = state.next_pos[:, None] + steps[None]

    def filter_features(self, modality: str, enc: Any, flags: list[Tensor]) -> Any:
        """``enc`` with the dropped units' features removed (``flags``: keep flags per received item)."""
        items = [f.reshape(-1, f.shape[-1])[k.to(f.device)] for f, k in zip(_items(enc.pooler_output), flags)]
        return hf.pooled_output(tuple(items))

    def check_forward(self, kw: dict) -> None:
        """Refuse forward arguments this architecture cannot serve inside a session (default: none)."""

    # -- protocol -----------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        self.session = session
        self.surgery.on_undo(self._clear)
        self.attach_vision(session.vision if session.vision is not None else Identity())
        self.surgery.pre_hook(self.model, self._model_pre)
        self.surgery.post_hook(self.model, self._model_post, always_call=True)
        self.surgery.pre_hook(self.inner, self._inner_pre)
        if self.gappy_positions and self._changes_llm_length():
            for layer in self.lm.layers:
                self.surgery.pre_hook(layer, self._layer_positions)
        self.engine = LLMEngine(model=self.model, language_model=self.lm, pruner=session.llm,
                                surgery=self.surgery, on_prefill=self._on_prefill, family=self.name)
        self.engine.attach()

    def stage_modules(self) -> dict:
        return {"vision": self.vision_module(), "llm": self.lm}

    def vision_module(self):
        """The module timed as the vision stage."""
        raise NotImplementedError

    def _clear(self) -> None:
        self._repack, self.engine, self._prefill, self._labels = None, None, None, None
        self._repacks = weakref.WeakKeyDictionary()
        self._results.clear()

    def _unit_vision(self) -> bool:
        v = self.session.vision
        return v is not None and v.granularity == "unit"

    def _changes_llm_length(self) -> bool:
        return self.session.llm is not None or self._unit_vision()

    def vision_done(self, result: VisionResult) -> None:
        """A finished vision call: recorded in the report, kept for matching."""
        self.session.report.vision.append(result.record)
        self._results.append(result)

    # -- hooks ----------------------------------------------------------------------------------------------
    def _inner_pre(self, mod, args, kw):
        """Raw pixels reaching ``model.model`` directly under a unit strategy would bypass re-packing."""
        if self._unit_vision() and any(kw.get(k) is not None for k in self.modalities.values()):
            raise AdapterError("inside a session with a unit-granularity vision strategy, call the "
                               f"{type(self.model).__name__} itself (model(...) / model.generate(...)), not "
                               "model.model(...): only the top-level call re-packs the prompt")
        return None

    def _layer_positions(self, mod, args, kw):
        if self._repack is not None and kw.get("position_ids") is not None:
            kw["position_ids"] = None            # RoPE is already computed; the ids only feed flash's packing test
            return args, kw
        return None

    def _kwargs(self, args: tuple, kw: dict) -> dict:
        kw = dict(kw)
        if len(args) > len(self._params):
            raise AdapterError(f"too many positional arguments for {type(self.model).__name__}.forward")
        for name, value in zip(self._params, args):
            if name in kw:
                raise AdapterError(f"forward() got {name!r} twice")
            kw[name] = value
        return kw

    def _model_pre(self, mod, args, kw):
        self._vision_seen = len(self.session.report.vision)   # vision calls from here on belong to this forward
        kw = self._kwargs(args, kw)
        self.check_forward(kw)
        if kw.get("labels") is not None and self.engine.prune_at and kw.get("logits_to_keep") not in (None, 0):
            raise AdapterError("labels with an LLM pruner need logits at every kept position; do not pass "
                               "logits_to_keep together with labels")
        cache = hf.get_cache(kw)
        if hf.is_static_cache(cache) and self._changes_llm_length():
            raise AdapterError(f"{type(cache).__name__} (a static, pre-allocated cache) is not supported inside a "
                               "tokcomp session that changes the LLM sequence: compressed prompts and layers hold "
                               "fewer keys. Fix: use the default DynamicCache (do not pass "
                               "cache_implementation='static').")
        past = hf.cache_length(cache)
        prefill = None
        self._repack, self._prefill, self._labels = None, None, None
        if past > 0:
            if self._unit_vision() and self._has_visual_inputs(kw):
                raise AdapterError("new images/videos on a non-empty cache (continuing a conversation) are not "
                                   "supported with a unit-granularity vision strategy: the prompt cannot be "
                                   "re-packed behind cached tokens. Fix: prefill the whole conversation again")
            kw = self._decode_inputs(kw, cache, past)
        else:
            kw, prefill = self._prefill_inputs(kw)
            if kw.get("labels") is not None and self.engine.prune_at:
                self._labels = kw.pop("labels")   # the loss is computed over the kept positions, after the forward
        self._prefill = prefill
        self._begin_engine(kw, prefill)
        return (), kw

    def _model_post(self, mod, args, kw, output):
        """After a prefill: the output positions in the report; with LLM pruning and ``labels``, the loss over the
        kept positions (the model's own loss function, labels gathered to the positions the logits have)."""
        labels, self._labels = self._labels, None
        if self._prefill is None or self.engine is None or self.engine.last_stage is None:
            return None
        index, valid = self.engine.last_stage
        rp = self._prefill.repacked
        cols = index if rp is None else rp.index.to(index.device).gather(1, index)
        positions = cols.masked_fill(~valid.to(cols.device), -1).cpu()
        if self.session.report.prefill:
            self.session.report.prefill[-1].positions = positions
        self._prefill = None
        if labels is None or getattr(output, "logits", None) is None:
            return None
        logits = output.logits
        kept = labels.gather(1, index.to(labels.device)).masked_fill(~valid.to(labels.device), -100)
        output.loss = hf.causal_lm_loss(self.model, logits, kept)
        return output

    def _has_visual_inputs(self, kw: dict) -> bool:
        return (any(kw.get(k) is not None for k in self.modalities.values())
                or any(v is not None for v in (kw.get("mm_encoder_outputs") or {}).values()))

    # -- prefill --------------------------------------------------------------------------------------------
    def _match(self, enc) -> _Match | None:
        received = _items(enc.pooler_output)
        for r in reversed(self._results):
            index = r.item_index(received)
            if index is not None:
                return _Match(r, index)
        return None

    def _prefill_inputs(self, kw: dict) -> tuple[dict, Prefill]:
        mm = dict(kw.get("mm_encoder_outputs") or {})
        if self.session.vision is not None:       # encode now: the kept units must be known before the LLM runs
            for modality, px in self.modalities.items():
                if kw.get(px) is not None:
                    if mm.get(modality) is not None:
                        raise AdapterError(f"pass either {px} or mm_encoder_outputs[{modality!r}], not both")
                    mm[modality] = self.encode(modality, kw.pop(px), kw)
            if mm:
                kw["mm_encoder_outputs"] = mm
        matched = {m: self._match(enc) for m, enc in mm.items() if enc is not None}
        self._repack = None
        ids = kw.get("input_ids")
        info = Prefill(ids=ids, grids=self.item_grids(kw, mm, matched) if ids is not None else {})
        dropped = {m: mt for m, mt in matched.items() if mt is not None and mt.dropped}
        if dropped:
            if ids is None:
                raise AdapterError("a unit-granularity vision strategy dropped visual tokens, which needs input_ids "
                                   "to re-pack the prompt; inputs_embeds alone are not supported")
            kw = self._repack_prompt(kw, mm, matched, dropped, info)
        elif self.gappy_positions and self.engine.prune_at and kw.get("position_ids") is None:
            am = kw.get("attention_mask")    # a padded row gets generate()'s positions, as when it runs alone, so
            if am is not None and am.dim() == 2 and not bool(am.bool().all()):   # position-sensitive scores match
                kw["position_ids"] = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)
        self._prefill_record(kw, matched)
        return kw, info

    def _repack_prompt(self, kw: dict, mm: dict, matched: dict, dropped: dict, info: Prefill) -> dict:
        ids, am = kw["input_ids"], kw.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise AdapterError("re-packing a prompt needs the 2-D attention_mask (or none), not a prepared one")
        pos = self.positions(kw, matched)
        token_of = self.placeholder_ids()
        try:
            keep = token_keep_mask(ids, am, {token_of[m]: torch.cat(mt.flags) for m, mt in dropped.items()})
        except ValueError as exc:
            raise AdapterError(f"the prompt's placeholders do not match the visual features: {exc}. Build prompts "
                               "with the model's processor (one placeholder per visual token)") from None
        rp = left_repack(keep)
        pad = self.model.config.get_text_config().pad_token_id
        mask = rp.valid.to(am.dtype if am is not None else torch.long)
        kw["input_ids"] = rp.gather(ids, pad if pad is not None else 0)
        kw["attention_mask"] = mask if (am is not None or rp.needs_mask or self.gappy_positions) else None
        self.pack_positions(kw, rp, pos, mask, ids)
        if kw.get("labels") is not None:
            kw["labels"] = rp.gather(kw["labels"], -100)
        new_mm = dict(mm)
        for m, mt in dropped.items():
            new_mm[m] = self.filter_features(m, mm[m], mt.flags)
        kw["mm_encoder_outputs"] = new_mm
        cache = hf.get_cache(kw)
        if cache is None and hf.wants_cache(kw, self.lm.config):
            cache = hf.new_cache(self.lm.config)
            hf.set_cache(kw, cache)
        full = am if am is not None else torch.ones_like(ids)
        text = pos if pos.dim() == 2 else (full.long().cumsum(-1) - 1)
        self._repack = RepackState(cache=weakref.ref(cache) if cache is not None else None, len_orig=ids.shape[1],
                                   len_new=rp.index.shape[1], mask_new=mask,
                                   removed=full.sum(1).to(rp.lengths.device) - rp.lengths,
                                   next_pos=text.masked_fill(full == 0, -1).amax(1) + 1)
        if cache is not None:
            self._repacks[cache] = self._repack
        info.keep, info.repacked = keep, rp
        return kw

    # -- later forwards on a re-packed prompt's cache -------------------------------------------------------
    def _decode_inputs(self, kw: dict, cache, past: int) -> dict:
        state = self._repacks.get(cache)
        if state is None:
            return kw
        self._repack = state
        ids = kw.get("input_ids")
        q = ids.shape[1] if ids is not None else kw["inputs_embeds"].shape[1]
        extra = past - state.len_new                     # tokens cached after the prompt
        if extra < 0:
            raise AdapterError(f"this cache holds {past} tokens but its re-packed prompt had {state.len_new}; the "
                               "cache of a re-packed prompt cannot be cropped below the prompt. Fix: prefill again")
        am = kw.get("attention_mask")
        full, packed = state.len_orig + extra + q, state.len_new + extra + q
        if am is not None:
            if am.dim() != 2:
                raise AdapterError("a forward on a re-packed prompt's cache needs the 2-D attention_mask (or none)")
            if am.shape[1] == full:
                am = torch.cat([state.mask_new.to(am), am[:, state.len_orig:]], 1)
            elif am.shape[1] != packed:
                raise AdapterError(f"attention_mask has {am.shape[1]} columns; expected {full} (original prompt + "
                                   f"new tokens) or {packed} (re-packed prompt + new tokens)")
            kw["attention_mask"] = am
        elif self.gappy_positions or not bool(state.mask_new.bool().all()):
            b = state.mask_new.shape[0]
            kw["attention_mask"] = torch.cat([state.mask_new, state.mask_new.new_ones(b, extra + q)], 1)
        self.decode_positions(kw, state, extra, q)
        return kw

    # -- records and the LLM engine -------------------------------------------------------------------------
    def _visual_mask(self, ids: Tensor) -> Tensor:
        return torch.isin(ids, torch.tensor(sorted(self.placeholder_ids().values()), device=ids.device))

    def _prefill_record(self, kw: dict, matched: dict) -> None:
        rec = ForwardRecord()
        seen = []
        for mt in matched.values():
            if mt is not None and not any(mt.result is r for r in seen):
                seen.append(mt.result)
                _merge_vision(rec, mt.result.record, with_out=not self.images_from_prompt)
        ids = kw.get("input_ids")
        if ids is not None:
            am = kw.get("attention_mask")
            valid = am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)
            vis = self._visual_mask(ids) & valid
            rec.llm_in = vis.sum(1).tolist()
            rec.llm_text = (valid.sum(1) - vis.sum(1)).tolist()
        self.session.report.prefill.append(rec)

    def _on_prefill(self, layers: dict[int, list[int]]) -> None:
        rep = self.session.report
        if rep.prefill:
            rec = rep.prefill[-1]
            rec.llm_layers = dict(layers)
            if not rec.vision_in:   # the tower ran inside forward(), after the pre-hook made this record
                for v in rep.vision[self._vision_seen:]:
                    _merge_vision(rec, v, with_out=not self.images_from_prompt)

    def _begin_engine(self, kw: dict, prefill: Prefill | None) -> None:
        ids, am = kw.get("input_ids"), kw.get("attention_mask")
        spans = visual = None
        if prefill is not None and ids is not None:
            visual = self._visual_mask(ids)
            if am is not None and am.dim() == 2:
                visual = visual & am[:, -ids.shape[1]:].bool()
            if prefill.grids:
                spans = visual_spans(prefill.ids, prefill.grids, prefill.keep, prefill.repacked)
                if self.images_from_prompt:
                    self.session.report.prefill[-1].vision_out = [int(sp.positions.numel()) for r in spans for sp in r]
        self.engine.begin(input_ids=ids, attention_mask=am, spans=spans, visual=visual)


def _merge_vision(rec: ForwardRecord, v: ForwardRecord, with_out: bool = True) -> None:
    """Add vision record ``v`` (one vision call) to ``rec`` (several calls of one forward add up)."""
    rec.vision_in += v.vision_in
    if with_out:
        rec.vision_out.extend(v.vision_out)
    for b, n in v.vision_blocks.items():
        rec.vision_blocks[b] = rec.vision_blocks.get(b, 0) + n
    for b, (q, kv, mlp) in v.vision_block_runs.items():
        q0, kv0, m0 = rec.vision_block_runs.get(b, ([], [], 0))
        rec.vision_block_runs[b] = (q0 + q, kv0 + kv, m0 + mlp)
