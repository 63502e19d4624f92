"""The shared LLM-side engine: drives an :class:`~tokcomp.strategy.LLMPruner` inside a decoder stack with hooks.

Model-agnostic: it works on any transformers 5.x decoder stack whose layers are called as
``layer(h[B, L, D], attention_mask=..., position_embeddings=(cos, sin), position_ids=..., <cache>=...,
use_cache=...)`` and return a Tensor (``Qwen2VLTextModel``, ``Qwen2_5_VLTextModel``, InternVL's ``Qwen2Model``).
The Qwen2-VL and InternVL adapters build one :class:`LLMEngine` per session and call :meth:`LLMEngine.begin`
from their top-level forward pre-hook.

How a prefill is pruned (all through hooks registered with ``adapter.surgery``; no ``forward`` is patched):

* a pre-hook on the decoder stack decides prefill vs decode and resets the per-forward state;
* the pre-hook of every layer records the visual count entering it, captures the layer-0 input (``embeds``) and
  the prune layers' inputs (``hidden_in``), and, once a prune stage exists, swaps in the stage's ``(cos, sin)``
  (gathered per row by original index: M-RoPE is already mixed in, so this is model-agnostic),
  ``position_ids=None`` (flash-attention's packed-sequence detection would misread the gaps) and a mask rebuilt
  with transformers' ``create_causal_mask(..., layer_idx=i)`` from the compressed 2-D padding mask, memoised
  per (stage, mask type, q_len, kv_len);
* the forward hook of every prune layer builds an :class:`~tokcomp.tokens.LLMStep`, asks the pruner, keeps all
  text plus the selected visual tokens of each row in original order, re-pads the rows on the LEFT to the longest
  row (masked pad slots) and returns the gathered hidden states, which the stack feeds to the next layer;
* attention rows and keys come from an ``AttentionInterface`` wrapper around the text tower's own kernel
  (sdpa / eager / flash_*), computed for the requested query rows only, never an L x L matrix.

Decode steps are never re-pruned: the cache layers after a prune stage hold the compressed prompt, and every later
forward on that cache gets masks rebuilt from the stage's compressed padding mask plus the decode part. Cache
layer 0 is never shortened (pruning happens after a layer ran), so ``get_seq_length()`` and positions stay right.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from tokcomp.adapter import Surgery
from tokcomp.errors import AdapterError
from tokcomp.strategy import LLMPruner
from tokcomp.tokens import LLMContext, LLMStep, Selection, VisualSpan

from . import _hf as hf

__all__ = ["LLMEngine", "spans_from_ids", "repad_left", "attention_rows", "query_positions", "grid_cells"]


# ------------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------------
def grid_cells(grid: tuple[int, int, int], device=None) -> Tensor:
    """LongTensor[t*h*w, 3]: the (t, h, w) cells of a unit grid in row-major (t, then h, then w) order."""
    t, h, w = (int(x) for x in grid)
    axes = [torch.arange(n, device=device) for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def spans_from_ids(input_ids: Tensor, attention_mask: Tensor | None, token_ids: int | Iterable[int],
                   grids: Sequence[Sequence[int]] | Tensor | None = None) -> list[list[VisualSpan]]:
    """Per-row visual spans of a prompt batch.

    Args:
        input_ids: LongTensor[B, L].
        attention_mask: [B, L] (1 = token, 0 = padding) or None; padding is never visual.
        token_ids: the placeholder id(s) of visual tokens (e.g. ``<|image_pad|>`` and ``<|video_pad|>``).
        grids: the (t, h, w) unit grid of every image / video in prompt order, row-major over (B, L) (the order
            ``masked_scatter`` fills placeholders in); or None: every maximal run of one placeholder id is one
            span with grid ``(1, 1, n)``.

    Returns:
        ``spans[b]``: the :class:`VisualSpan` of row ``b`` in order, ``positions`` on ``input_ids``' device.
        A run of placeholders holding several consecutive images is split by the grids' sizes.

    Raises:
        ValueError: the grids do not tile the placeholder runs exactly.
    """
    ids = input_ids.detach().cpu()
    B, L = ids.shape
    valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    tids = torch.tensor([token_ids] if isinstance(token_ids, int) else list(token_ids), dtype=ids.dtype)
    vis = torch.isin(ids, tids) & valid
    queue = None if grids is None else [tuple(int(x) for x in g) for g in (grids.tolist() if torch.is_tensor(grids) else grids)]
    used = 0
    dev = input_ids.device
    out: list[list[VisualSpan]] = []
    for b in range(B):
        row: list[VisualSpan] = []
        pos = vis[b].nonzero()[:, 0]
        if pos.numel():
            brk = (pos[1:] != pos[:-1] + 1) | (ids[b, pos[1:]] != ids[b, pos[:-1]])
            starts = torch.cat([torch.zeros(1, dtype=torch.long), brk.nonzero()[:, 0] + 1]).tolist()
            ends = starts[1:] + [pos.numel()]
            for s, e in zip(starts, ends):
                run = pos[s:e]
                off = 0
                while off < run.numel():
                    left = run.numel() - off
                    if queue is None:
                        grid = (1, 1, left)
                    elif used >= len(queue):
                        raise ValueError(f"spans_from_ids: row {b} has more visual tokens than the {len(queue)} "
                                         "grids given describe")
                    else:
                        grid = queue[used]
                        used += 1
                    n = grid[0] * grid[1] * grid[2]
                    if n > left or n <= 0:
                        raise ValueError(f"spans_from_ids: grid {grid} ({n} tokens) does not fit the run of {left} "
                                         f"visual tokens left at row {b}, position {int(run[off])}")
                    row.append(VisualSpan(row=b, positions=run[off:off + n].to(dev), grid=grid,
                                          cells=grid_cells(grid, dev)))
                    off += n
        out.append(row)
    if queue is not None and used != len(queue):
        raise ValueError(f"spans_from_ids: {len(queue)} grids given but only {used} images/videos found")
    return out


def repad_left(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Compact the kept slots of every row to the right end of a rectangular batch (left padding).

    Args:
        keep: BoolTensor[B, L] slots to keep.

    Returns:
        ``(idx LongTensor[B, L'], valid BoolTensor[B, L'])`` with ``L' = max_b keep[b].sum()``: ``idx[b]`` lists row
        ``b``'s kept slots in ascending order in its last ``keep[b].sum()`` columns; the columns before them are pad
        slots (``valid`` False; their ``idx`` points at some non-kept slot).
    """
    L = keep.shape[1]
    n = int(keep.sum(1).max()) if keep.numel() else 0
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
    idx = order[:, L - n:]
    return idx, keep.gather(1, idx)


def query_positions(kind: str, visual: Tensor, valid: Tensor) -> Tensor:
    """Query rows an LLM pruner asks attention for.

    Args:
        kind: ``"last"`` (the last valid token of each row) or ``"text"`` (every valid text token after the row's
            first visual token; a row with none uses its last token).
        visual, valid: BoolTensor[B, L].

    Returns:
        LongTensor[B, R] positions; shorter rows are padded by repeating their last entry.
    """
    B, L = valid.shape
    ar = torch.arange(L, device=valid.device).expand(B, -1)
    last = torch.where(valid, ar, -1).amax(1).clamp(min=0)  # [B]
    if kind == "last":
        return last[:, None]
    if kind != "text":
        raise AdapterError(f"attention_queries() returned {kind!r}; the engine serves 'last', 'text' or None")
    first_vis = torch.where(visual & valid, ar, L).amin(1)  # [B]
    want = valid & ~visual & (ar > first_vis[:, None])
    counts = want.sum(1)
    R = max(1, int(counts.max()))
    rows = []
    for b in range(B):
        p = want[b].nonzero()[:, 0]
        if p.numel() == 0:
            p = last[b:b + 1]
        rows.append(torch.cat([p, p[-1:].expand(R - p.numel())]))
    return torch.stack(rows)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Tensor[B, H_kv, K, d] -> Tensor[B, H_kv * n_rep, K, d] (each kv head repeated for its query heads)."""
    if n_rep == 1:
        return x
    B, H, K, d = x.shape
    return x[:, :, None].expand(B, H, n_rep, K, d).reshape(B, H * n_rep, K, d)


def attention_rows(query: Tensor, key: Tensor, rows: Tensor, key_valid: Tensor, scaling: float) -> Tensor:
    """Softmax attention of chosen query rows, in float32, beside the real kernel (never an L x L matrix).

    Args:
        query: Tensor[B, H, Lq, d] post-RoPE queries the kernel got.
        key: Tensor[B, H_kv, K, d] post-RoPE keys the kernel got (cache included; GQA heads are repeated here).
        rows: LongTensor[B, R] query indices into ``Lq``.
        key_valid: BoolTensor[B, K] non-padding keys.
        scaling: the kernel's softmax scale.

    Returns:
        Tensor[B, H, R, K] float32: ``softmax(q_rows . K^T * scaling + mask)`` with key ``j`` visible to query ``q``
        iff ``j <= q + (K - Lq)`` (causal, bottom-right aligned) and ``key_valid[j]``.
    """
    B, H, Lq, d = query.shape
    K = key.shape[2]
    q = query.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], d)).float()
    k = _repeat_kv(key, H // key.shape[1]).float()
    s = torch.matmul(q, k.transpose(2, 3)) * scaling  # [B, H, R, K]
    qpos = rows + (K - Lq)
    seen = torch.arange(K, device=key.device)[None, None, :] <= qpos[:, :, None]  # [B, R, K]
    seen = seen & key_valid[:, None, :].to(seen.device)
    s = s.masked_fill(~seen[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def _eager_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, **_: Any) -> tuple[Tensor, Tensor]:
    """The standard eager attention (the same op sequence as transformers' Qwen2 / Qwen2-VL eager kernel).

    query Tensor[B, H, Lq, d], key/value Tensor[B, H_kv, K, d], mask float [B, 1, Lq, K] or None
    -> (Tensor[B, Lq, H, d], weights Tensor[B, H, Lq, K])."""
    n_rep = getattr(module, "num_key_value_groups", query.shape[1] // key.shape[1])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, v).transpose(1, 2).contiguous()
    return out, w


class _ModuleView:
    """An attention module as seen by the wrapped kernel: the same module, but its config names the real kernel.

    transformers' flash path loads its kernel from the module config's implementation name; under the wrapper that
    name is the wrapper's own, so the kernel gets this view (everything else is the real module)."""

    def __init__(self, module, impl: str):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "config", hf.ConfigView(module.config, impl))

    def __getattr__(self, name):
        return getattr(self._module, name)


def _letters(n: int) -> str:
    """A digit-free tag for registry names (flash version checks match digits after 'flash')."""
    return "".join(chr(ord("a") + int(c)) for c in str(n))


# ------------------------------------------------------------------------------------------------------
# per-forward state
# ------------------------------------------------------------------------------------------------------
@dataclass
class _Stage:
    """The current sequence after ``after_layer`` (or the original one, ``after_layer = -1``).

    Attributes:
        index: LongTensor[B, L'] original position of each slot (pad slots: any position; see ``valid``).
        valid: BoolTensor[B, L'] non-padding slots.
        visual: BoolTensor[B, L'] visual slots (a subset of ``valid``).
    """

    after_layer: int
    index: Tensor
    valid: Tensor
    visual: Tensor
    uid: int = 0
    rope: tuple[Tensor, Tensor] | None = None
    spans: list[list[VisualSpan]] | None = None


@dataclass
class _Prefill:
    """State of one prefill forward (lives on the engine until the stack's forward hook runs)."""

    L0: int
    valid0: Tensor
    spans0: list[list[VisualSpan]]
    n_vis0: Tensor
    stage: _Stage
    pruning: bool
    stages: list[_Stage] = field(default_factory=list)
    layer_stage: dict[int, _Stage] = field(default_factory=dict)
    ctx: LLMContext | None = None
    embeds: Tensor | None = None
    hidden_in: Tensor | None = None
    capture: dict[int, Tensor | None] = field(default_factory=dict)  # layer -> query rows (None: keys only)
    attn: Tensor | None = None
    queries: Tensor | None = None
    keys: Tensor | None = None


@dataclass
class _Decode:
    """What later forwards on a pruned prefill's cache need (kept per cache object, weakly).

    Attributes:
        L0: prompt length of the prefill (cache layer 0 holds all of it).
        stage_of: decoder layer -> stage number, for layers that ran on a compressed sequence.
        valid: stage number -> BoolTensor[B, L'] padding mask of that stage's compressed prompt.
        first: the first layer of each stage (its cache length is checked against ``valid``).
    """

    L0: int
    stage_of: dict[int, int]
    valid: dict[int, Tensor]
    first: set[int]


@dataclass
class _DecodeForward:
    """One forward on a pruned prefill's cache: ``extra`` tokens after the prompt were cached before it;
    ``tail`` is the 2-D mask of the part after the prompt (this forward's tokens included), or None (all ones)."""

    dec: _Decode
    extra: int
    tail: Tensor | None


@dataclass
class _Pending:
    input_ids: Tensor | None
    attention_mask: Tensor | None
    spans: list[list[VisualSpan]] | None
    visual: Tensor | None


# ------------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------------
class LLMEngine:
    """Drives an :class:`LLMPruner` inside a decoder stack through hooks (see the module docstring).

    Per-forward state lives on this object, never on modules. Everything :meth:`attach` adds goes through
    ``surgery`` and is removed by ``surgery.undo()``.
    """

    def __init__(self, *, model, language_model, pruner: LLMPruner | None, surgery: Surgery,
                 on_prefill: Callable[[dict[int, list[int]]], None] | None = None, family: str = ""):
        """model: the top-level VLM (for set_attn_implementation); language_model: the decoder stack (.layers, .norm,
        .config); pruner: an LLMPruner or None (None = engine only tracks spans, prunes nothing); surgery:
        tokcomp.adapter.Surgery; on_prefill: callable(dict[int, list[int]]) receiving achieved visual-token counts
        per row entering each layer."""
        self.model = model
        self.lm = language_model
        self.pruner = pruner
        self.surgery = surgery
        self.on_prefill = on_prefill
        self.family = family
        self.n_layers = len(language_model.layers)
        self.prune_at: list[int] = self._prune_layers()
        self.attn_name: str | None = None
        self._pending: _Pending | None = None
        self._fw: _Prefill | None = None
        self._dec: _DecodeForward | None = None  # the current forward on a pruned prompt's cache, if any
        self._decodes: "weakref.WeakKeyDictionary[Any, _Decode]" = weakref.WeakKeyDictionary()
        self._masks: dict[tuple, Any] = {}       # memoised attention masks of the current forward
        #: ``(index LongTensor[B, L'], valid BoolTensor[B, L'])`` of the last prefill's output sequence: the LLM-input
        #: column each output position came from, and which positions are not padding
        self.last_stage: tuple[Tensor, Tensor] | None = None

    # -- setup --------------------------------------------------------------------------------------------
    def _prune_layers(self) -> list[int]:
        if self.pruner is None:
            return []
        layers = [int(i) for i in self.pruner.prune_layers(self.n_layers)]
        if any(b <= a for a, b in zip(layers, layers[1:])) or any(not 0 <= i < self.n_layers for i in layers):
            raise AdapterError(f"{self.pruner.name}: prune_layers({self.n_layers}) returned {layers}; they must be "
                               f"strictly increasing decoder-layer indices in 0..{self.n_layers - 1}")
        return layers

    @property
    def needs_attention(self) -> bool:
        """True if the pruner needs attention rows or keys (then :meth:`attach` installs the wrapper)."""
        p = self.pruner
        if p is None or not self.prune_at:
            return False
        return bool(p.needs_keys or any(p.attention_queries(i) is not None for i in self.prune_at))

    def attach(self) -> None:
        """Register every hook (through surgery) and, if needed, the attention wrapper for the text tower."""
        s = self.surgery
        s.pre_hook(self.lm, self._lm_pre)
        s.post_hook(self.lm, self._lm_post)
        if not self.prune_at:
            return
        for i, layer in enumerate(self.lm.layers):
            s.pre_hook(layer, self._make_layer_pre(i))
            if i in self.prune_at:
                s.post_hook(layer, self._make_layer_post(i))
        if self.needs_attention:
            self._install_attention()
        s.on_undo(self._reset)

    def _reset(self) -> None:
        """Drop every per-forward and per-cache state (run on undo, so a closed session holds no tensors)."""
        self._pending = self._fw = self._dec = self.last_stage = None
        self._masks = {}
        self._decodes = weakref.WeakKeyDictionary()

    def _install_attention(self) -> None:
        base = hf.attn_impl(self.lm.config) or "sdpa"
        kernel = _eager_attention if base == "eager" else hf.registered_kernel(base)
        if kernel is None:
            raise AdapterError(f"the text tower's attention implementation {base!r} is not registered in "
                               "transformers' AttentionInterface; use 'sdpa', 'eager' or 'flash_attention_2'")
        name = f"tokcomp_{_letters(id(self))}_{base}"  # keeps 'flash' (and 'sdpa') in the name: same code paths
        view = "flash" in base

        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            out = kernel(_ModuleView(module, base) if view else module, query, key, value, attention_mask,
                         *args, **kwargs)
            self._capture(module, query, key, kwargs.get("scaling"))
            return out

        wrapper.__name__ = name
        self.surgery.on_undo(hf.register_attention(name, wrapper, mask_like=base))
        hf.set_text_attention(self.model, name)
        self.surgery.on_undo(lambda: hf.set_text_attention(self.model, base))
        self.surgery.switch(lambda: hf.set_text_attention(self.model, base),
                            lambda: hf.set_text_attention(self.model, name))
        if hf.attn_impl(self.lm.config) != name:
            raise AdapterError(f"could not switch the text tower to the attention wrapper {name!r} "
                               f"(it reports {hf.attn_impl(self.lm.config)!r})")
        self.attn_name = name

    # -- per forward --------------------------------------------------------------------------------------
    def begin(self, *, input_ids: Tensor | None, attention_mask: Tensor | None,
              spans: list[list[VisualSpan]] | None, visual: Tensor | None) -> None:
        """Called by the adapter's top-level forward pre-hook for EVERY forward, after any prompt re-packing.

        input_ids: LongTensor[B, L] or None; attention_mask: [B, L_total] 2-D or None (exactly what the LLM will
        receive); visual: BoolTensor[B, L] visual-token positions of this forward's input (all False in decode
        steps); spans: list (per row) of list[VisualSpan] for prefill, None for decode."""
        self._pending = _Pending(input_ids, attention_mask, spans, visual)

    def _lm_pre(self, module, args, kwargs):
        pending, self._pending = self._pending, None
        self._fw, self._dec, self._masks = None, None, {}
        if not self.prune_at and self.on_prefill is None:
            return None
        cache = hf.get_cache(kwargs)
        self._refuse_static(cache)
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            q_len = None if ids is None else ids.shape[1]
        else:
            q_len = emb.shape[1]
        past = hf.cache_length(cache)
        if past > 0:
            self._start_decode(cache, past, q_len, pending, kwargs)
            return None
        if cache is not None:
            self._decodes.pop(cache, None)                # a new prompt on a reused (reset) cache
        if pending is None or pending.spans is None or pending.visual is None or q_len is None:
            return None
        visual = pending.visual.bool()
        if visual.shape[1] != q_len or not bool(visual.any()):
            return None
        am = self._padding_mask(pending, kwargs)
        if am is not None and (not torch.is_tensor(am) or am.dim() != 2):
            if self.prune_at:
                raise AdapterError("the language model received a prepared (4-D or per-type) attention mask; "
                                   "LLM pruning rebuilds masks from the 2-D padding mask. Fix: pass the 2-D "
                                   "attention_mask (or none) and a DynamicCache")
            am = None
        dev = visual.device
        valid = torch.ones_like(visual) if am is None else am[:, -q_len:].to(dev).bool()
        visual = visual & valid
        B = visual.shape[0]
        stage = _Stage(-1, torch.arange(q_len, device=dev).expand(B, -1), valid, visual)
        fw = _Prefill(L0=q_len, valid0=valid, spans0=pending.spans, n_vis0=visual.sum(1),
                      stage=stage, pruning=bool(self.prune_at))
        self._fw = fw
        if fw.pruning:
            fw.ctx = LLMContext(n_layers=self.n_layers, prune_layers=list(self.prune_at), family=self.family)
            self.pruner.begin(fw.ctx)
        return None

    @staticmethod
    def _padding_mask(pending: _Pending | None, kwargs):
        """The 2-D mask the decoder stack itself received (authoritative), else the one given to :meth:`begin`."""
        if "attention_mask" in kwargs:
            return kwargs["attention_mask"]
        return pending.attention_mask if pending is not None else None

    def _lm_post(self, module, args, kwargs, output):
        fw, self._fw = self._fw, None
        self._dec, self._masks = None, {}
        if fw is None:
            return None
        self.last_stage = (fw.stage.index, fw.stage.valid)
        counts = {}
        for i in range(self.n_layers):
            st = fw.layer_stage.get(i, fw.stage if not fw.pruning else None)
            counts[i] = (st.visual.sum(1) if st is not None else fw.n_vis0).tolist()
        cache = hf.output_cache(output)
        if cache is not None:
            if fw.stages:
                stage_of = {i: st.uid for i, st in fw.layer_stage.items() if st.after_layer >= 0}
                first = {min(i for i, u in stage_of.items() if u == st.uid) for st in fw.stages
                         if st.uid in stage_of.values()}
                self._decodes[cache] = _Decode(fw.L0, stage_of, {st.uid: st.valid for st in fw.stages}, first)
            else:
                self._decodes.pop(cache, None)
        if self.on_prefill is not None:
            self.on_prefill(counts)
        return None

    def check_cache(self, cache) -> None:
        """Raise :class:`AdapterError` if this forward cannot be pruned with ``cache`` (a StaticCache or any
        compileable cache) or runs under torch.compile. The engine checks this itself before layer 0 runs;
        adapters may call it earlier (top-level pre-hook) to fail before the vision tower runs."""
        self._refuse_static(cache)

    def _refuse_static(self, cache) -> None:
        if self.prune_at and hf.is_static_cache(cache):
            raise AdapterError(f"LLM pruning cannot run with a {type(cache).__name__} (static cache): pruning "
                               "makes decoder layers hold different numbers of tokens. Fix: use DynamicCache, the "
                               "default (do not pass cache_implementation='static' / a StaticCache).")
        if self.prune_at and torch.compiler.is_compiling():
            raise AdapterError("LLM pruning cannot run under torch.compile: it changes sequence lengths between "
                               "layers. Fix: run the uncompiled model.")

    # -- layer hooks --------------------------------------------------------------------------------------
    def _make_layer_pre(self, i: int):
        def hook(module, args, kwargs):
            return self._layer_pre(i, args, kwargs)
        return hook

    def _make_layer_post(self, i: int):
        def hook(module, args, kwargs, output):
            return self._layer_post(i, args, kwargs, output)
        return hook

    def _layer_pre(self, i: int, args, kwargs):
        if i == 0:
            self._refuse_static(hf.get_cache(kwargs))
        fw = self._fw
        if fw is not None:
            return self._prefill_pre(fw, i, args, kwargs)
        if self._dec is not None:
            return self._decode_pre(self._dec, i, args, kwargs)
        return None

    def _prefill_pre(self, fw: _Prefill, i: int, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        st = fw.stage
        fw.layer_stage[i] = st
        if i == 0:
            fw.embeds = h
        if i in self.prune_at:
            fw.hidden_in = h
            if self.needs_attention:
                kind = self.pruner.attention_queries(i)
                if kind is not None or self.pruner.needs_keys:
                    fw.capture[i] = None if kind is None else query_positions(kind, st.visual, st.valid)
        if st.after_layer < 0:
            return None
        if st.rope is None:
            cos, sin = kwargs["position_embeddings"]
            st.rope = tuple(_gather_rows(t, st.index) for t in (cos, sin))
        kwargs["position_embeddings"] = st.rope
        kwargs["position_ids"] = None
        kwargs["attention_mask"] = self._mask(i, h, st.valid, hf.get_cache(kwargs), st.uid)
        return args, kwargs

    def _start_decode(self, cache, past: int, q_len: int | None, pending: _Pending | None, kwargs) -> None:
        """A forward on a non-empty cache: never pruned; if the cache comes from a pruned prefill, its compressed
        layers get masks rebuilt from the stage's padding mask plus this forward's 2-D mask tail."""
        dec = self._decodes.get(cache)
        if dec is None or q_len is None:
            return
        am = self._padding_mask(pending, kwargs)
        if am is not None and (not torch.is_tensor(am) or am.dim() != 2):
            raise AdapterError("a forward on a pruned prompt's cache received a prepared (4-D or per-type) "
                               "attention mask; pass the 2-D attention_mask (or none)")
        extra = past - dec.L0
        if extra < 0:
            raise AdapterError(f"this cache holds {past} tokens but its pruned prefill had {dec.L0}; a cache of a "
                               "pruned prompt cannot be cropped below the prompt. Fix: prefill again")
        tail = None
        if am is not None:
            if am.shape[1] != dec.L0 + extra + q_len:
                raise AdapterError(f"attention_mask covers {am.shape[1]} tokens but the cache and this forward "
                                   f"hold {dec.L0 + extra + q_len}")
            tail = am[:, dec.L0:].bool()
        self._dec = _DecodeForward(dec, extra, tail)

    def _decode_pre(self, d: _DecodeForward, i: int, args, kwargs):
        k = d.dec.stage_of.get(i)
        if k is None:
            return None
        valid = d.dec.valid[k]
        h = args[0] if args else kwargs["hidden_states"]
        cache = hf.get_cache(kwargs)
        if cache is None:
            return None
        if i in d.dec.first and hf.cache_length(cache, i) != valid.shape[1] + d.extra:
            raise AdapterError(f"cache layer {i} holds {hf.cache_length(cache, i)} tokens, expected "
                               f"{valid.shape[1] + d.extra} (pruned prompt {valid.shape[1]} + {d.extra} later); the "
                               "cache was changed outside this session. Fix: prefill again")
        if d.tail is None:
            tail = torch.ones(valid.shape[0], d.extra + h.shape[1], dtype=torch.bool, device=valid.device)
        else:
            tail = d.tail.to(valid.device)
        kwargs["attention_mask"] = self._mask(i, h, torch.cat([valid, tail], 1), cache, ("dec", k))
        return args, kwargs

    def _mask(self, i: int, h: Tensor, valid: Tensor, cache, tag):
        """The attention mask layer ``i`` needs for hidden states ``h`` [B, q, D] whose keys (cache + this forward)
        have the 2-D padding mask ``valid`` [B, kv]; built with transformers' own mask functions, once per
        (tag, mask type, q, kv)."""
        types = getattr(self.lm.config, "layer_types", None)
        kind = types[i] if types is not None and i < len(types) else "full_attention"
        key = (tag, kind, h.shape[1], valid.shape[1])
        if key not in self._masks:
            am = None if bool(valid.all()) else valid.to(h.device)
            self._masks[key] = hf.causal_mask(self.lm.config, h, am, cache, i, sliding=kind == "sliding_attention")
        return self._masks[key]

    def _layer_post(self, i: int, args, kwargs, output):
        fw = self._fw
        if fw is None or not fw.pruning:
            return None
        h = output if torch.is_tensor(output) else output[0]
        st = fw.stage
        step = LLMStep(layer=i, hidden=h, hidden_in=fw.hidden_in, visual=st.visual, valid=st.valid,
                       spans=self._spans(fw, st), n_visual_original=fw.n_vis0, n_layers=self.n_layers,
                       attn=fw.attn, queries=fw.queries, keys=fw.keys, embeds=fw.embeds, embeds_index=st.index,
                       norm=self.lm.norm)
        fw.attn = fw.queries = fw.keys = fw.hidden_in = None
        sel = self.pruner.select(step, fw.ctx)
        keep = self._keep_mask(sel, st, i)
        if bool((keep == st.valid).all()):              # nothing dropped: no re-indexing at all
            if not sel.replace or all(r is None for r in sel.replace):
                return None
            h = h.clone()
            pos = torch.where(st.valid, torch.arange(h.shape[1], device=h.device), -1)
            self._replace(h, sel, pos, i)
            return _with_hidden(output, h)
        idx, valid = repad_left(keep)
        new = _Stage(i, st.index.gather(1, idx), valid, st.visual.gather(1, idx) & valid, uid=len(fw.stages) + 1)
        D, hi, hv = h.shape[-1], idx.to(h.device), valid.to(h.device)
        h = h.gather(1, hi[..., None].expand(-1, -1, D)).masked_fill(~hv[..., None], 0)
        if sel.replace:
            slots = torch.where(valid, torch.arange(idx.shape[1], device=idx.device), -1)
            pos = torch.full_like(st.valid, -1, dtype=torch.long).scatter_(1, idx, slots)
            self._replace(h, sel, pos, i)
        fw.stage = new
        fw.stages.append(new)
        return _with_hidden(output, h)

    def _keep_mask(self, sel: Selection, st: _Stage, layer: int) -> Tensor:
        """BoolTensor[B, L]: every valid text slot plus the selected visual slots."""
        B, L = st.valid.shape
        if len(sel.keep) != B:
            raise AdapterError(f"{self.pruner.name}: select() at layer {layer} returned {len(sel.keep)} rows for a "
                               f"batch of {B}")
        keep = st.valid & ~st.visual
        for b, k in enumerate(sel.keep):
            k = torch.as_tensor(k, device=keep.device)
            if k.dtype == torch.bool:
                k = k.nonzero()[:, 0]
            k = k.long().reshape(-1)
            if k.numel() == 0:
                continue
            if bool((k < 0).any() | (k >= L).any()) or not bool(st.visual[b, k].all()):
                raise AdapterError(f"{self.pruner.name}: select() at layer {layer} kept positions of row {b} that "
                                   "are not visual tokens of the current sequence; Selection.keep holds current "
                                   "indices of VISUAL tokens only (text is always kept)")
            keep[b, k] = True
        return keep

    def _replace(self, h: Tensor, sel: Selection, pos: Tensor, layer: int) -> None:
        """Write ``sel.replace`` into ``h`` [B, L', D] in place; ``pos`` [B, L] maps current slots to new ones."""
        for b, r in enumerate(sel.replace or []):
            if r is None:
                continue
            ind, vals = r
            ind = torch.as_tensor(ind, device=pos.device).long().reshape(-1)
            new = pos[b, ind]
            if bool((new < 0).any()):
                raise AdapterError(f"{self.pruner.name}: Selection.replace at layer {layer} names row-{b} slots "
                                   "that are not kept")
            h[b, new.to(h.device)] = vals.to(device=h.device, dtype=h.dtype)

    def _spans(self, fw: _Prefill, st: _Stage) -> list[list[VisualSpan]]:
        """The prompt's visual spans at the current positions of stage ``st`` (pruned tokens left out)."""
        if st.after_layer < 0:
            return fw.spans0
        if st.spans is None:
            B, L0 = fw.valid0.shape
            slots = torch.where(st.valid, torch.arange(st.valid.shape[1], device=st.valid.device), -1)
            pos = torch.full((B, L0), -1, dtype=torch.long, device=st.valid.device).scatter_(1, st.index, slots)
            out = []
            for row in fw.spans0:
                spans = []
                for sp in row:
                    cur = pos[sp.row, sp.positions.to(pos.device)]
                    m = cur >= 0
                    spans.append(VisualSpan(sp.row, cur[m].to(sp.positions.device), sp.grid, sp.cells[m.to(sp.cells.device)]))
                out.append(spans)
            st.spans = out
        return st.spans

    def _capture(self, module, query: Tensor, key: Tensor, scaling: float | None) -> None:
        """Inside the attention wrapper: store this prune layer's attention rows / keys for the pruner."""
        fw = self._fw
        if fw is None or not fw.capture:
            return
        i = getattr(module, "layer_idx", None)
        if i not in fw.capture:
            return
        rows = fw.capture.pop(i)
        st = fw.stage
        if query.shape[2] != st.valid.shape[1] or key.shape[2] != query.shape[2]:
            raise AdapterError(f"attention wrapper at layer {i}: query/key lengths {query.shape[2]}/{key.shape[2]} "
                               f"do not match the prefill sequence ({st.valid.shape[1]})")
        if self.pruner.needs_keys:
            fw.keys = key
        if rows is not None:
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            fw.attn = attention_rows(query, key, rows.to(query.device), st.valid, scaling)
            fw.queries = rows


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """Tensor[B or 1, L, d] gathered along L per row: -> Tensor[B, L', d] (index LongTensor[B, L'])."""
    B = index.shape[0]
    t = t.expand(B, -1, -1)
    return t.gather(1, index.to(t.device)[..., None].expand(-1, -1, t.shape[-1]))


def _with_hidden(output, h: Tensor):
    """A layer's output with its hidden states replaced (layers return a Tensor in transformers 5.x)."""
    if torch.is_tensor(output):
        return h
    return (h, *output[1:])
