"""The Qwen2-VL / Qwen2.5-VL vision tower under a compression session (the qwen2_vl adapter's vision side).

Hooks (through the adapter's ``Surgery``):

* the tower's pre-hook builds the call's packing metadata from ``grid_thw`` (:mod:`adapters._qwen_layout`);
* :class:`~adapters._tower.HookedTower` drives every block: the native block gets the current token set as one
  packed sequence (``cu_seqlens`` per frame, or per Qwen2.5-VL window, ``max_seqlen`` for flash, gathered rotary
  ``cos``/``sin``), or, when a block variant ran here from the block's submodules, nothing (the native forward is skipped);
* the merger's pre-hook runs ``finish`` and feeds the merger only the surviving units (whole 2x2 groups); its
  forward hook scatters the merged units back to full size (zeros at dropped units, Qwen2.5-VL window order kept,
  so the model's own reverse permutation and split still work);
* the tower's forward hook hands the call (features in raster = placeholder order, kept units, counts) to the
  adapter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.errors import AdapterError

from . import _hf as hf
from ._qwen_layout import QwenVisionMeta, block_segments, initial_tokens, qwen_vision_meta
from ._tower import HookedTower
from ._vision import BlockOps, cu_seqlens_of
from ._vlm import VisionResult


def block_ops(blk) -> BlockOps:
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
    if hf.is_flash(attn.config):
        def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
            return fn(attn, q, k, v, attention_mask=None, scaling=attn.scaling, dropout=0.0, is_causal=False,
                      cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=max_q, max_length_k=max_k)[0]
    return BlockOps(norm1=blk.norm1, qkv=qkv, kv=kv, rotary=rotary, attn_out=attn.proj, norm2=blk.norm2,
                    mlp=blk.mlp, attend=attend, attend_varlen=varlen)


class QwenVision:
    """The vision side of one session on a Qwen2-VL / Qwen2.5-VL tower (also the tower's :class:`TowerIO`)."""

    def __init__(self, adapter, strategy):
        self.adapter = adapter
        self.visual = adapter.model.model.visual
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")
        self.merge = int(self.visual.spatial_merge_size)
        self.driver = HookedTower(self.visual.blocks, self, strategy, adapter.name)
        self.meta: QwenVisionMeta | None = None       # the call in flight
        self.kept: Tensor | None = None
        self._segments: dict = {}

    def attach(self, surgery) -> None:
        surgery.pre_hook(self.visual, self._tower_pre)
        self.driver.attach(surgery)
        surgery.pre_hook(self.visual.merger, self._merger_pre)
        surgery.post_hook(self.visual.merger, self._merger_post)
        surgery.post_hook(self.visual, self._tower_post)

    def _window(self) -> tuple[int, int] | None:
        return (int(self.visual.window_size), int(self.visual.patch_size)) if self.windowed else None

    def _windowed_block(self, i: int) -> bool:
        return self.windowed and i not in self.visual.fullatt_block_indexes

    # -- tower ----------------------------------------------------------------------------------------------
    def _tower_pre(self, mod, args, kw):
        grid = kw.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise AdapterError("the Qwen vision tower was called without grid_thw")
        self.meta = qwen_vision_meta(grid, self.merge, self._window(), device=mod.patch_embed.proj.weight.device)
        self.kept, self._segments = None, {}
        return None

    def _tower_post(self, mod, args, kw, out):
        call = self.driver.end()
        if call is None or self.meta is None:
            return None
        meta, self.meta = self.meta, None
        t, h, w = meta.grid_thw.unbind(-1)
        grids = [(int(a), int(b) // self.merge, int(c) // self.merge) for a, b, c in zip(t, h, w)]
        self.adapter.vision_done(VisionResult(features=out.pooler_output, sizes=meta.units_per_image(), kept=self.kept,
                                              record=call.record, grids=grids))
        return None

    # -- TowerIO --------------------------------------------------------------------------------------------
    def begin(self, args, kw):
        if self.meta is None:
            raise AdapterError("a Qwen vision block ran outside a call of the whole tower; call model.model.visual "
                               "(or get_image_features) as a whole")
        return self.meta.layout, initial_tokens(self.meta, args[0], kw.get("position_embeddings"))

    def segments(self, i, tokens):
        key = (id(tokens.unit), self._windowed_block(i))
        memo = self._segments.get(key)
        if memo is None or memo[0] is not tokens.unit:
            memo = self._segments[key] = (tokens.unit, block_segments(self.meta, tokens, key[1]))
        return memo[1]

    def _substitute(self, args, kw, hidden: Tensor, seg: Tensor, rope):
        cu, longest = cu_seqlens_of(seg)
        kw = dict(kw)
        kw["cu_seqlens"] = cu.to(hidden.device)
        kw["max_seqlen"] = longest if hf.is_flash(self.visual.config) else None
        kw["position_embeddings"] = rope
        return (hidden, *args[1:]), kw

    def native(self, i, tokens, q_seg, args, kw):
        return self._substitute(args, kw, tokens.hidden, q_seg, tokens.rope)

    def dummy(self, i, tokens, args, kw):
        rope = None if tokens.rope is None else (tokens.rope[0][:1], tokens.rope[1][:1])
        seg = torch.zeros(1, dtype=torch.long, device=tokens.hidden.device)
        return self._substitute(args, kw, tokens.hidden[:1], seg, rope)       # the native call costs ~nothing

    def read(self, out, tokens):
        return out

    def ops(self, i, block):
        return block_ops(block)

    def after_last(self, driver, out):
        run = driver.call.run
        return run.tokens.hidden if run.changed else None

    # -- merger -------------------------------------------------------------------------------------------
    def _merger_pre(self, mod, args, kw):
        call = self.driver.call
        if call is None:
            return None
        done = self.driver.finish()
        if not call.run.changed:
            return None
        x = done.tokens.hidden if done.units is None else done.tokens.hidden[done.rows.reshape(-1)]
        return (x, *args[1:]), kw

    def _merger_post(self, mod, args, kw, out):
        call = self.driver.call
        if call is None or call.done is None:
            return None
        meta, units = self.meta, call.done.units
        call.record.vision_out = meta.units_per_image(units)
        n_units = meta.layout.n_units
        if units is None or units.numel() == n_units:
            return None
        full = out.new_zeros(n_units, out.shape[-1])
        full[meta.unit_block.to(out.device)[units.to(out.device)]] = out
        self.kept = torch.zeros(n_units, dtype=torch.bool, device=units.device)
        self.kept[units] = True
        return full
