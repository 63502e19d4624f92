"""Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` (transformers 5.x).

Hooks only (all through ``self.surgery``, all removed on exit):

* vision tower ``model.model.visual``: a pre-hook builds the call's layout from ``grid_thw``; a pre-hook on every
  block substitutes the current token set (hidden, ``cu_seqlens`` per frame or per Qwen2.5-VL window,
  ``max_seqlen``, gathered rotary ``cos``/``sin``) or runs a :class:`~tokcomp.tokens.BlockVariant` itself and
  feeds the native block a 1-token dummy; a forward hook on every block hands the output to the strategy; the
  merger's pre-hook validates ``finish`` and feeds only surviving units; its forward hook scatters the merged
  units back to full size (zeros at dropped units, Qwen2.5-VL window order kept) and remembers the kept units.
* top-level pre-hook on the model: computes the visual features itself when needed (so the kept units are known
  before the LLM runs), re-packs the prompt with fewer placeholders, keeping every kept token's original M-RoPE
  position, maps generate()'s full-length masks during decoding, and starts the LLM engine for the forward.

See ``docs/adapters/qwen2_vl.md``.
"""
from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.adapter import Adapter
from tokcomp.errors import AdapterError
from tokcomp.hookspecs import hookimpl
from tokcomp.session import ForwardRecord

from . import _hf as hf
from ._qwen_layout import QwenVisionMeta, block_segments, initial_tokens, qwen_vision_meta
from ._llm import LLMEngine
from ._repack import Repacked, left_repack, token_keep_mask
from ._vision import (BlockOps, Finished, VisionRun, cu_seqlens_of, is_flash,
                      run_block_variant)
from ._spans import visual_spans


def _has_visual_inputs(kw: dict) -> bool:
    """True if a forward's kwargs carry images or videos (raw pixels or pre-computed features)."""
    return (kw.get("pixel_values") is not None or kw.get("pixel_values_videos") is not None
            or any(v is not None for v in (kw.get("mm_encoder_outputs") or {}).values()))


def _meta_only_tokens(meta):
    """A hidden-less token view of a call's metadata (enough for :func:`block_segments`)."""
    from types import SimpleNamespace
    return SimpleNamespace(segment=meta.segment, unit=meta.unit)


# ------------------------------------------------------------------------------------------------------
# per-call / per-forward state (lives on the adapter, created per session)
# ------------------------------------------------------------------------------------------------------
@dataclass
class _TowerCall:
    """One call of the vision tower."""

    grid: Tensor
    meta: QwenVisionMeta | None = None
    run: VisionRun | None = None
    done: Finished | None = None
    kept: Tensor | None = None          # BoolTensor[U] raster order; None: every unit kept
    record: ForwardRecord | None = None


@dataclass
class _TowerResult:
    """A finished tower call, matched later to ``mm_encoder_outputs`` by object identity."""

    output: Any
    grid: Tensor
    kept: Tensor | None
    record: ForwardRecord | None
    pooled_ptr: int = 0                 # data_ptr of the tower's pooler_output (to place split views)
    row_bytes: int = 0
    starts: list[int] = field(default_factory=list)     # first unit of each image / video

    def item_index(self, feats) -> list[int]:
        """Which image / video of this tower call each of ``feats`` (the per-item features a forward received)
        is: the tower's own split, or generate()'s expanded list (``num_return_sequences`` / beams repeat the
        same split views, recognised by their storage offset)."""
        sizes = [b - a for a, b in zip(self.starts, self.starts[1:])]
        if [int(f.shape[0]) for f in feats] == sizes:
            return list(range(len(sizes)))
        out = []
        for f in feats:
            offset, rem = divmod(f.data_ptr() - self.pooled_ptr, self.row_bytes) if self.row_bytes else (-1, 1)
            if rem or offset not in self.starts[:-1] or sizes[self.starts.index(offset)] != f.shape[0]:
                raise AdapterError("cannot tell which visual features a forward received (they are not views of "
                                   "the vision tower's output); pass the features get_image_features returned")
            out.append(self.starts.index(offset))
        return out

    def item_flags(self, feats) -> list[Tensor]:
        """Keep flags (BoolTensor per item) aligned with ``feats``."""
        return [self.kept[self.starts[i]:self.starts[i + 1]] for i in self.item_index(feats)]


@dataclass
class _Prefill:
    """What one prefill forward looked like before/after re-packing (for spans and records)."""

    ids: Tensor | None                      # LongTensor[B, L] original prompt
    grids: dict[int, list[tuple[int, int, int]]]   # placeholder id -> unit grids of its items
    keep: Tensor | None = None              # BoolTensor[B, L] surviving tokens (None: nothing re-packed)
    repacked: Repacked | None = None


@dataclass
class _RepackState:
    """How the last prefill was re-packed, to map generate()'s full-length decode inputs."""

    cache: Any                      # weakref to the cache the prefill wrote, or None
    len_orig: int
    len_new: int
    mask_new: Tensor                # LongTensor[B, L'] re-packed prefill mask
    shift: Tensor                   # LongTensor[B] real tokens removed per row (text-position shift)
    needs_mask: bool


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL and Qwen2.5-VL: every vision compressor and every LLM pruner, by hooks."""

    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    provides = frozenset({"vision.blocks", "vision.unit", "vision.patch", "llm.layers", "llm.attention_rows",
                          "llm.keys"})

    @classmethod
    def supports(cls, model) -> bool:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
        return isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration))

    def __init__(self, model) -> None:
        super().__init__(model)
        self.visual = model.model.visual
        self.lm = model.model.language_model
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")
        self.merge = int(self.visual.spatial_merge_size)
        self.session = None
        self.engine = None
        self._call: _TowerCall | None = None
        self._results: deque[_TowerResult] = deque(maxlen=8)
        self._repack: _RepackState | None = None
        self._vision_seen = 0      # report.vision records already merged into a prefill record

    # -- protocol ---------------------------------------------------------------------------------------
    def depths(self) -> dict[str, int]:
        return {"vision": len(self.visual.blocks), "llm": len(self.lm.layers)}

    def attention_implementation(self, stage: str) -> str | None:
        return hf.attn_impl(self.visual.config if stage == "vision" else self.lm.config)

    def attach(self, session) -> None:
        self.session = session
        mm = self.model.model
        self.surgery.set_attr(mm, "rope_deltas", getattr(mm, "rope_deltas", None))
        self.surgery.on_undo(self._clear)
        self.surgery.pre_hook(self.visual, self._tower_pre)
        self.surgery.post_hook(self.visual, self._tower_post)
        if session.vision is not None:
            for i, blk in enumerate(self.visual.blocks):
                self.surgery.pre_hook(blk, lambda m, a, k, i=i: self._block_pre(i, m, a, k))
                self.surgery.post_hook(blk, lambda m, a, k, o, i=i: self._block_post(i, o))
            self.surgery.pre_hook(self.visual.merger, self._merger_pre)
            self.surgery.post_hook(self.visual.merger, self._merger_post)
        self.surgery.pre_hook(self.model, self._model_pre)
        self.surgery.pre_hook(self.model.model, self._base_pre)
        # the engine also runs without a pruner: it then only reports the visual tokens entering each layer
        self.engine = LLMEngine(model=self.model, language_model=self.lm, pruner=session.llm,
                                      surgery=self.surgery, on_prefill=self._on_prefill)
        self.engine.attach()

    # -- measurement --------------------------------------------------------------------------------------
    def dims(self):
        from ._dims import llm_dims, qwen_vision_dims
        return qwen_vision_dims(self.visual), llm_dims(self.lm, self.model.lm_head.out_features)

    def stage_modules(self) -> dict:
        return {"vision": self.visual, "llm": self.lm}

    def image_features(self, inputs) -> Tensor:
        """Visual tokens entering the LLM (all images, placeholder order); zero rows at dropped units."""
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_grid_thw=inputs["image_grid_thw"])
        return torch.cat(list(out.pooler_output), 0)

    def _clear(self) -> None:
        self._call, self._repack, self.engine = None, None, None
        self._results.clear()

    # -- vision tower -----------------------------------------------------------------------------------
    def _tower_pre(self, mod, args, kw):
        grid = kw.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise AdapterError("the Qwen vision tower was called without grid_thw")
        call = _TowerCall(grid=grid)
        strategy = self.session.vision
        if strategy is not None:
            window = (int(mod.window_size), int(mod.patch_size)) if self.windowed else None
            call.meta = qwen_vision_meta(grid, self.merge, window, device=mod.patch_embed.proj.weight.device)
            call.run = VisionRun(strategy, call.meta.layout, len(mod.blocks), self.name)
        self._call = call

    def _tower_post(self, mod, args, kw, out):
        call, self._call = self._call, None
        if call is not None:
            if call.record is None:          # no vision strategy: still report the (full) counts and block shapes
                call.record = self._full_record(mod, call.grid)
            pooled = out.pooler_output
            sizes = (call.grid.prod(-1) // self.merge ** 2).tolist()
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + int(n))
            self._results.append(_TowerResult(output=out, grid=call.grid, kept=call.kept, record=call.record,
                                              pooled_ptr=pooled.data_ptr(),
                                              row_bytes=pooled.stride(0) * pooled.element_size(), starts=starts))

    def _full_record(self, mod, grid: Tensor) -> ForwardRecord:
        """The record of an unmodified tower call: every token in every block (frames or windows as segments)."""
        window = (int(mod.window_size), int(mod.patch_size)) if self.windowed else None
        meta = qwen_vision_meta(grid, self.merge, window, device=torch.device("cpu"))
        n = meta.layout.n_tokens
        view = _meta_only_tokens(meta)
        seg = {w: block_segments(meta, view, w) for w in {False, self.windowed}}
        runs = {}
        for i in range(len(mod.blocks)):
            counts = torch.unique_consecutive(seg[self._windowed_block(i)], return_counts=True)[1].tolist()
            runs[i] = (counts, counts, n)
        rec = ForwardRecord(vision_blocks={i: n for i in range(len(mod.blocks))}, vision_in=n,
                            vision_block_runs=runs, vision_out=meta.units_per_image())
        self.session.report.vision.append(rec)
        return rec

    def _windowed_block(self, i: int) -> bool:
        return self.windowed and i not in self.visual.fullatt_block_indexes

    def _substitute(self, args, kw, hidden: Tensor, seg: Tensor, rope):
        cu, longest = cu_seqlens_of(seg)
        kw = dict(kw)
        kw["cu_seqlens"] = cu.to(hidden.device)
        kw["max_seqlen"] = longest if is_flash(self.visual.config) else None
        kw["position_embeddings"] = rope
        return (hidden, *args[1:]), kw

    def _block_pre(self, i: int, mod, args, kw):
        call = self._call
        if call is None or call.run is None:
            return None
        run = call.run
        if run.tokens is None:
            run.start(initial_tokens(call.meta, args[0], kw.get("position_embeddings")))
        tokens = run.tokens
        variant = run.variant(i)
        windowed = self._windowed_block(i)
        q_seg = block_segments(call.meta, tokens, windowed)
        if variant is None:
            run.record_block(i, q_seg)
            if not run.changed:
                return None
            return self._substitute(args, kw, tokens.hidden, q_seg, tokens.rope)
        extra_seg = None
        if variant.extra_kv is not None:
            extra_seg = block_segments(call.meta, variant.extra_kv, windowed)
        run.record_block(i, q_seg, extra_seg, None if variant.mlp_on is None else variant.mlp_on.numel())
        run.stash = run_block_variant(self._block_ops(mod), tokens, variant, q_seg, extra_seg)
        rope = None if tokens.rope is None else (tokens.rope[0][:1], tokens.rope[1][:1])
        dummy_seg = torch.zeros(1, dtype=torch.long, device=tokens.hidden.device)
        return self._substitute(args, kw, tokens.hidden[:1], dummy_seg, rope)    # native call costs ~nothing

    def _block_post(self, i: int, out):
        call = self._call
        if call is None or call.run is None:
            return None
        run = call.run
        if run.stash is not None:
            tokens, run.stash = run.stash, None
        else:
            tokens = run.tokens.with_hidden(out)
        tokens = run.after_block(i, tokens)
        return tokens.hidden if run.changed else None

    def _merger_pre(self, mod, args, kw):
        call = self._call
        if call is None or call.run is None:
            return None
        run = call.run
        call.done = done = run.finish()
        if not run.changed:
            return None
        if done.units is None:
            x = done.tokens.hidden
        else:
            x = done.tokens.hidden[done.rows.reshape(-1).to(done.tokens.hidden.device)]
        return (x, *args[1:]), kw

    def _merger_post(self, mod, args, kw, out):
        call = self._call
        if call is None or call.run is None or call.done is None:
            return None
        meta, done = call.meta, call.done
        n_units = meta.layout.n_units
        units = done.units
        full = out
        if units is not None and units.numel() != n_units:
            full = out.new_zeros(n_units, out.shape[-1])
            full[meta.unit_block.to(out.device)[units.to(out.device)]] = out
            call.kept = torch.zeros(n_units, dtype=torch.bool, device=units.device)
            call.kept[units] = True
        call.record = ForwardRecord(vision_blocks=dict(call.run.ctx.counts), vision_in=meta.layout.n_tokens,
                                    vision_block_runs=dict(call.run.block_runs),
                                    vision_out=meta.units_per_image(units))
        self.session.report.vision.append(call.record)
        return None if full is out else full

    def _block_ops(self, blk) -> BlockOps:
        """The parts of a Qwen2-VL / Qwen2.5-VL vision block (attention through the model's own backend)."""
        attn = blk.attn
        heads = attn.num_heads
        fn = hf.attention_kernel(attn)
        rotate = hf.module_function(attn, "apply_rotary_pos_emb_vision")
        weight, bias = attn.qkv.weight, attn.qkv.bias
        dim = weight.shape[0] // 3

        def qkv(x):
            return attn.qkv(x).reshape(x.shape[0], 3, heads, -1).unbind(1)

        def kv(x):
            y = F.linear(x, weight[dim:], None if bias is None else bias[dim:])
            return y.reshape(x.shape[0], 2, heads, -1).unbind(1)

        def rotary(q, k, rope):
            return rotate(q, k, rope[0], rope[1])

        def attend(q, k, v, mask):
            return fn(attn, q, k, v, attention_mask=mask, scaling=attn.scaling, dropout=0.0, is_causal=False)[0]

        varlen = None
        if is_flash(attn.config):
            def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
                return fn(attn, q, k, v, attention_mask=None, scaling=attn.scaling, dropout=0.0, is_causal=False,
                          cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=max_q, max_length_k=max_k)[0]
        return BlockOps(norm1=blk.norm1, qkv=qkv, kv=kv, rotary=rotary, attn_out=attn.proj, norm2=blk.norm2,
                        mlp=blk.mlp, attend=attend, attend_varlen=varlen)

    # -- top level: features, re-packing, decode mapping, LLM engine ------------------------------------
    def _match(self, enc) -> _TowerResult | None:
        for r in reversed(self._results):
            if r.output is enc:
                return r
        return None

    def _model_pre(self, mod, args, kw):
        self._vision_seen = len(self.session.report.vision)   # tower calls from here on belong to this forward
        kw = dict(kw)
        if args:
            kw["input_ids"], args = args[0], args[1:]
            if args:
                raise AdapterError("the qwen2_vl adapter needs keyword arguments after input_ids "
                                   "(call model(input_ids=..., attention_mask=..., ...))")
        cache = hf.get_cache(kw)
        if hf.is_static_cache(cache) and self._changes_llm_length():
            raise AdapterError(f"{type(cache).__name__} (a static, pre-allocated cache) is not supported inside a "
                               "tokcomp session that changes the LLM sequence: compressed layers hold fewer keys. "
                               "Fix: use the default DynamicCache (do not pass cache_implementation='static').")
        past = hf.cache_length(cache)
        prefill = None
        if past > 0:
            if self._unit_vision() and _has_visual_inputs(kw):
                raise AdapterError("new images/videos on a non-empty cache (continuing a conversation) are not "
                                   "supported with a unit-granularity vision strategy: the prompt cannot be "
                                   "re-packed behind cached tokens. Fix: prefill the whole conversation again")
            kw = self._decode_inputs(kw, cache, past)
        else:
            kw, prefill = self._prefill_inputs(kw)
        if self.engine is not None:
            self._begin_engine(kw, prefill)
        return (), kw

    def _unit_vision(self) -> bool:
        v = self.session.vision
        return v is not None and v.granularity == "unit"

    def _changes_llm_length(self) -> bool:
        return self.session.llm is not None or self._unit_vision()

    def _base_pre(self, mod, args, kw):
        """Guard on ``model.model``: raw pixels there mean the top-level hook was bypassed (``model.model(...)``
        called directly), so dropped units could not be re-packed and would enter the LLM as zero vectors."""
        if self._unit_vision() and any(kw.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
            raise AdapterError("inside a session with a unit-granularity vision strategy, call the "
                               f"{type(self.model).__name__} itself (model(...) / model.generate(...)), not "
                               "model.model(...): only the top-level call re-packs the prompt")
        return None

    def _prefill_inputs(self, kw: dict) -> tuple[dict, _Prefill]:
        mm = dict(kw.get("mm_encoder_outputs") or {})
        raw = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
        if self.session.vision is not None:
            base = self.model.model
            for modality, (px_key, grid_key) in raw.items():
                if kw.get(px_key) is not None and mm.get(modality) is None:
                    fn = base.get_image_features if modality == "image" else base.get_video_features
                    mm[modality] = fn(kw.pop(px_key), kw.get(grid_key), return_dict=True)
            if mm:
                kw["mm_encoder_outputs"] = mm
        results = {m: self._match(enc) for m, enc in mm.items() if enc is not None}
        dropped = {m: r for m, r in results.items() if r is not None and r.kept is not None}
        self._repack = None
        ids = kw.get("input_ids")
        info = _Prefill(ids=ids, grids=self._unit_grids(kw, mm, results))
        if dropped:
            if ids is None:
                raise AdapterError("a unit-granularity vision strategy dropped visual tokens, which needs input_ids "
                                   "to re-pack the prompt; inputs_embeds alone are not supported")
            kw = self._repack_prompt(kw, mm, results, dropped, info)
        self._prefill_record(kw, results)
        return kw, info

    def _unit_grids(self, kw: dict, mm: dict, results: dict) -> dict[int, list[tuple[int, int, int]]]:
        """Unit grid of every image / video in prompt order, per placeholder id (for the visual spans)."""
        cfg = self.model.config
        grids = self._grids(kw, results)
        out = {}
        for m, tok in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
            if grids[m] is None:
                continue
            g = [(int(t), int(h) // self.merge, int(w) // self.merge) for t, h, w in grids[m].tolist()]
            r = results.get(m)
            if r is not None and kw.get(("image_grid_thw" if m == "image" else "video_grid_thw")) is None:
                g = [g[i] for i in r.item_index(mm[m].pooler_output)]    # generate() may have expanded them
            out[tok] = g
        return out

    def _grids(self, kw: dict, results: dict) -> dict[str, Tensor | None]:
        out = {}
        for m, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            g = kw.get(key)
            if g is None and results.get(m) is not None:
                g = results[m].grid
            out[m] = g
        return out

    def _token_types(self, ids: Tensor) -> Tensor:
        cfg = self.model.config
        t = torch.zeros_like(ids)
        t[ids == cfg.image_token_id] = 1
        t[ids == cfg.video_token_id] = 2
        return t

    def _full_positions(self, kw: dict, results: dict) -> Tensor:
        """M-RoPE positions ``[3, B, L]`` of the FULL prompt (given by generate(), else get_rope_index)."""
        pos = kw.get("position_ids")
        if pos is not None and pos.ndim == 3:
            return pos[1:] if pos.shape[0] == 4 else pos
        if pos is not None:
            return pos[None].expand(3, -1, -1)
        ids, am = kw["input_ids"], kw.get("attention_mask")
        types = kw.get("mm_token_type_ids")
        grids = self._grids(kw, results)
        extra = {}
        if self.windowed and kw.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kw["second_per_grid_ts"]
        pos3, _ = self.model.model.get_rope_index(ids, types if types is not None else self._token_types(ids),
                                                  image_grid_thw=grids["image"], video_grid_thw=grids["video"],
                                                  attention_mask=am, **extra)
        return pos3

    def _repack_prompt(self, kw: dict, mm: dict, results: dict, dropped: dict, info: _Prefill) -> dict:
        cfg = self.model.config
        ids, am = kw["input_ids"], kw.get("attention_mask")
        pos3 = self._full_positions(kw, results)
        token_of = {"image": cfg.image_token_id, "video": cfg.video_token_id}
        flags = {m: r.item_flags(mm[m].pooler_output) for m, r in dropped.items()}
        keep = token_keep_mask(ids, am, {token_of[m]: torch.cat(f) for m, f in flags.items()})
        rp = left_repack(keep)
        pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
        new_ids = rp.gather(ids, pad)
        mask = rp.valid.to(am.dtype if am is not None else torch.long)
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        new_pos3 = rp.gather(pos3, 0)
        kw["input_ids"] = new_ids
        kw["attention_mask"] = mask if (am is not None or rp.needs_mask) else None
        kw["position_ids"] = torch.cat([text[None].to(new_pos3), new_pos3], 0)
        types = kw.get("mm_token_type_ids")
        kw["mm_token_type_ids"] = rp.gather(types if types is not None else self._token_types(ids), 0)
        if kw.get("labels") is not None:
            kw["labels"] = rp.gather(kw["labels"], -100)
        new_mm = dict(mm)
        for m in dropped:
            new_mm[m] = hf.pooled_output(tuple(f[k.to(f.device)] for f, k in zip(mm[m].pooler_output, flags[m])))
        kw["mm_encoder_outputs"] = new_mm
        lengths = rp.lengths.to(new_pos3.device)
        top = new_pos3.masked_fill(~rp.valid.to(new_pos3.device), -1).amax(dim=(0, 2))
        deltas = (top + 1 - lengths).view(-1, 1)
        self.model.model.rope_deltas = deltas
        cache = hf.get_cache(kw)
        if cache is None and hf.wants_cache(kw, self.lm.config):
            cache = hf.new_cache(self.lm.config)
            hf.set_cache(kw, cache)
        valid_orig = am.sum(1) if am is not None else torch.full_like(rp.lengths, ids.shape[1])
        self._repack = _RepackState(cache=weakref.ref(cache) if cache is not None else None, len_orig=ids.shape[1],
                                    len_new=new_ids.shape[1], mask_new=mask, needs_mask=rp.needs_mask,
                                    shift=(valid_orig.to(rp.lengths.device) - rp.lengths))
        info.keep, info.repacked = keep, rp
        return kw

    def _decode_inputs(self, kw: dict, cache, past: int) -> dict:
        state = self._repack
        if state is None or (state.cache is not None and state.cache() is not cache):
            return kw
        ids = kw.get("input_ids")
        q = ids.shape[1] if ids is not None else kw["inputs_embeds"].shape[1]
        total = past + q
        am = kw.get("attention_mask")
        if am is not None and am.ndim == 2 and am.shape[1] != total:
            if am.shape[1] != state.len_orig + (past - state.len_new) + q:
                raise AdapterError(f"decode step: attention_mask has {am.shape[1]} columns; expected {total} "
                                   f"(re-packed) or {state.len_orig + past - state.len_new + q} (original prompt "
                                   "length + new tokens)")
            am = torch.cat([state.mask_new.to(am), am[:, state.len_orig:]], 1)
        elif am is None and state.needs_mask:
            b = state.mask_new.shape[0]
            am = torch.cat([state.mask_new, state.mask_new.new_ones(b, total - state.len_new)], 1)
        if am is not None:
            kw["attention_mask"] = am
        pos = kw.get("position_ids")
        if pos is not None and pos.ndim == 3 and pos.shape[0] == 4:
            pos = pos.clone()
            pos[0] -= state.shift.to(pos)[:, None]
            kw["position_ids"] = pos
        return kw

    # -- records and the LLM engine ---------------------------------------------------------------------
    def _prefill_record(self, kw: dict, results: dict) -> ForwardRecord:
        rec = ForwardRecord()
        for m in ("image", "video"):
            r = results.get(m)
            if r is None or r.record is None:
                continue
            for b, n in r.record.vision_blocks.items():
                rec.vision_blocks[b] = rec.vision_blocks.get(b, 0) + n
            for b, (q, kv, mlp) in r.record.vision_block_runs.items():   # image and video calls add up
                q0, kv0, mlp0 = rec.vision_block_runs.get(b, ([], [], 0))
                rec.vision_block_runs[b] = (q0 + q, kv0 + kv, mlp0 + mlp)
            rec.vision_in += r.record.vision_in
            rec.vision_out.extend(r.record.vision_out)
        ids = kw.get("input_ids")
        if ids is not None:
            vis = self._visual_mask(ids)
            am = kw.get("attention_mask")
            valid = am.bool() if am is not None else torch.ones_like(vis)
            vis = vis & valid
            rec.llm_in = vis.sum(1).tolist()
            rec.llm_text = (valid.sum(1) - vis.sum(1)).tolist()
        self.session.report.prefill.append(rec)
        return rec

    def _visual_mask(self, ids: Tensor) -> Tensor:
        cfg = self.model.config
        return (ids == cfg.image_token_id) | (ids == cfg.video_token_id)

    def _on_prefill(self, layers: dict[int, list[int]]) -> None:
        rep = self.session.report
        if rep.prefill:
            rec = rep.prefill[-1]
            rec.llm_layers = dict(layers)
            if not rec.vision_in:   # the tower ran inside forward(), after the pre-hook made this record
                for v in rep.vision[self._vision_seen:]:
                    rec.vision_in += v.vision_in
                    rec.vision_out.extend(v.vision_out)
                    for b, n in v.vision_blocks.items():
                        rec.vision_blocks[b] = rec.vision_blocks.get(b, 0) + n
                    for b, (q, kv, mlp) in v.vision_block_runs.items():
                        q0, kv0, m0 = rec.vision_block_runs.get(b, ([], [], 0))
                        rec.vision_block_runs[b] = (q0 + q, kv0 + kv, m0 + mlp)

    def _begin_engine(self, kw: dict, prefill: _Prefill | None) -> None:
        ids = kw.get("input_ids")
        am = kw.get("attention_mask")
        spans = visual = None
        if prefill is not None and ids is not None:
            visual = self._visual_mask(ids)
            if am is not None:
                visual = visual & am.bool()
            spans = visual_spans(prefill.ids, prefill.grids, prefill.keep, prefill.repacked)
        self.engine.begin(input_ids=ids, attention_mask=am, spans=spans, visual=visual)


@hookimpl
def tokcomp_register(registry):
    registry.add_adapter(Qwen2VLAdapter)
