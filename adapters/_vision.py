"""Model-agnostic pieces of a vision-tower adapter (shared by the Qwen2-VL and InternVL adapters).

An adapter drives a :class:`~tokcomp.strategy.ViTCompressor` through the tower's own block loop with forward
(pre-)hooks. What is the same for every architecture lives here:

* :class:`VisionRun` - the per-tower-call state (layout, context, current token set) and the strategy call
  sequence ``start -> (block_variant, block, after_block) * depth -> finish``, with the bookkeeping each step needs
  (tower order, achieved counts, validation of ``finish``).
* :func:`segment_attention` - attention of query tokens over key/value tokens restricted to equal segment ids,
  one attention call per segment (never an N x N matrix beyond one segment), with an optional per-key additive
  bias (proportional attention), and :func:`varlen_segment_attention` for flash-attention's varlen kernels.
* :class:`BlockOps` + :func:`run_block_variant` - a pre-norm ViT block ``x + attn(norm1(x)); x + mlp(norm2(x))``
  rebuilt from its submodules, so a :class:`~tokcomp.tokens.BlockVariant` (extra key/value tokens, MLP on a
  subset, proportional attention, ``mid`` between attention and MLP) can run on any token subset.
* :func:`check_finish` - validates what ``finish`` returned (patch: the full grid; unit: whole units) and puts it
  in the order the merger / projector expects.

Conventions: tokens are kept in *tower order* (ascending ``origin``, the order of the unmodified tower's packed
sequence), so every attention segment (image, frame, tile, window) is a contiguous run; segment ids are any
integers that are equal exactly for tokens that may attend to each other. Shapes are in the docstrings:
N query tokens, M key tokens, H heads, d head_dim, C width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.errors import AdapterError
from tokcomp.tokens import BlockVariant, VisionContext, VisionLayout, VisionTokens


#: ``attend(q [1, H, n, d], k [1, H, m, d], v [1, H, m, d], mask [1, 1, 1, m] float | None) -> [1, n, H, d]``:
#: one dense, non-causal attention call (e.g. a closure over transformers' ``ALL_ATTENTION_FUNCTIONS`` entry).
AttendFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
#: ``attend_varlen(q [1, H, N, d], k [1, H, M, d], v, cu_q int32[S+1], cu_k int32[S+1], max_q, max_k)
#: -> [1, N, H, d]``: one packed varlen call (flash-attention), segments given by cumulative lengths.
VarlenFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int], Tensor]


# ------------------------------------------------------------------------------------------------------
# segments and order
# ------------------------------------------------------------------------------------------------------
def cu_seqlens_of(seg: Tensor) -> tuple[Tensor, int]:
    """Cumulative run lengths of a segment-id sequence (empty segments simply do not appear).

    Args:
        seg: LongTensor[N] segment id per token, each segment a contiguous run (tower order).
    Returns:
        ``(cu int32[R+1] on seg's device, max run length)`` with R the number of runs.
    """
    if seg.numel() == 0:
        return torch.zeros(1, dtype=torch.int32, device=seg.device), 0
    _, counts = torch.unique_consecutive(seg, return_counts=True)
    cu = F.pad(counts.cumsum(0).to(torch.int32), (1, 0))
    return cu, int(counts.max())


def is_sorted(x: Tensor) -> bool:
    """True if the 1-D tensor ``x`` is non-decreasing."""
    return x.numel() < 2 or bool((x[1:] >= x[:-1]).all())


def tower_order(tokens: VisionTokens) -> VisionTokens:
    """``tokens`` sorted by ``origin`` (tower order); returned unchanged if already sorted."""
    if is_sorted(tokens.origin):
        return tokens
    return tokens.select(torch.argsort(tokens.origin, stable=True))


def head_mean_keys(k: Tensor) -> Tensor:
    """Keys averaged over heads (ToMe's matching metric): ``k [N, H, d] -> [N, d]``."""
    return k.mean(dim=1)


# ------------------------------------------------------------------------------------------------------
# attention restricted to segments
# ------------------------------------------------------------------------------------------------------
def sdpa_attend(scaling: float) -> AttendFn:
    """An :data:`AttendFn` using ``torch.nn.functional.scaled_dot_product_attention`` with ``scale=scaling``."""
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2)
    return attend


def _group(seg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(order LongTensor[N], ids LongTensor[S], counts LongTensor[S])``: a stable sort by segment id."""
    order = torch.argsort(seg, stable=True)
    ids, counts = torch.unique_consecutive(seg[order], return_counts=True)
    return order, ids, counts


def segment_attention(q: Tensor, k: Tensor, v: Tensor, q_seg: Tensor, k_seg: Tensor,
                      key_bias: Tensor | None, attend: AttendFn) -> Tensor:
    """Each query attends to the keys of its own segment only; one ``attend`` call per segment.

    Args:
        q: Tensor[N, H, d] queries (rotary already applied).
        k, v: Tensor[M, H, d] keys and values (M >= N when extra key/value tokens are appended).
        q_seg: LongTensor[N] segment id of each query; k_seg: LongTensor[M] of each key. Any order.
        key_bias: Tensor[M] additive logit bias per key (proportional attention: ``log(size)``), or None.
        attend: the dense attention call (see :data:`AttendFn`); it receives ``mask [1, 1, 1, m]`` = the bias.
    Returns:
        Tensor[N, H, d] attention output in the order of ``q``. Queries whose segment has no key get zeros.
    """
    n, h, d = q.shape
    if q_seg.numel() and k_seg.numel() and bool((q_seg == q_seg[0]).all()) and bool((k_seg == q_seg[0]).all()):
        mask = None if key_bias is None else key_bias.to(q.dtype).view(1, 1, 1, -1)   # one segment: one call
        return attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)[0]
    out = q.new_zeros(n, h, v.shape[-1])
    q_order, q_ids, q_counts = _group(q_seg)
    k_order, k_ids, k_counts = _group(k_seg)
    k_start = F.pad(k_counts.cumsum(0), (1, 0)).tolist()
    k_index = {int(s): j for j, s in enumerate(k_ids.tolist())}
    q_start = 0
    for s, nq in zip(q_ids.tolist(), q_counts.tolist()):
        qi = q_order[q_start:q_start + nq]
        q_start += nq
        j = k_index.get(int(s))
        if j is None:
            continue
        ki = k_order[k_start[j]:k_start[j + 1]]
        mask = None
        if key_bias is not None:
            mask = key_bias[ki].to(q.dtype).view(1, 1, 1, -1)
        o = attend(q[qi].transpose(0, 1)[None], k[ki].transpose(0, 1)[None], v[ki].transpose(0, 1)[None], mask)
        out[qi] = o[0].to(out.dtype)
    return out


def varlen_segment_attention(q: Tensor, k: Tensor, v: Tensor, q_seg: Tensor, k_seg: Tensor,
                             attend_varlen: VarlenFn) -> Tensor:
    """:func:`segment_attention` as one packed varlen call (flash-attention), no bias.

    Queries and keys are stably sorted by segment id, segments without queries are dropped from the keys, and
    ``cu_seqlens_q`` / ``cu_seqlens_k`` describe the same segment list. Shapes as in :func:`segment_attention`.
    """
    q_order, q_ids, q_counts = _group(q_seg)
    keep_k = torch.isin(k_seg, q_ids)
    k_rows = keep_k.nonzero()[:, 0]
    k_order_local, k_ids, k_counts = _group(k_seg[k_rows])
    if not torch.equal(k_ids, q_ids):
        raise AdapterError("varlen attention: every query segment needs at least one key (its own token)")
    k_order = k_rows[k_order_local]
    cu_q = F.pad(q_counts.cumsum(0).to(torch.int32), (1, 0))
    cu_k = F.pad(k_counts.cumsum(0).to(torch.int32), (1, 0))
    o = attend_varlen(q[q_order].transpose(0, 1)[None], k[k_order].transpose(0, 1)[None],
                      v[k_order].transpose(0, 1)[None], cu_q, cu_k, int(q_counts.max()), int(k_counts.max()))
    out = torch.empty_like(o[0])
    out[q_order] = o[0]
    return out


# ------------------------------------------------------------------------------------------------------
# a pre-norm ViT block rebuilt from its parts
# ------------------------------------------------------------------------------------------------------
@dataclass
class BlockOps:
    """The parts of one pre-norm vision block, as the adapter exposes them.

    The block computes ``x = x + attn_out(attention(qkv(norm1(x)))); x = x + mlp(norm2(x))``.

    Attributes:
        norm1, norm2: ``Tensor[n, C] -> Tensor[n, C]``.
        qkv: ``Tensor[n, C] -> (q, k, v)`` each Tensor[n, H, d], before rotary embedding.
        kv: ``Tensor[n, C] -> (k, v)``, keys/values only (for extra key/value tokens); None: use ``qkv``.
        rotary: ``(q, k, rope) -> (q, k)`` applies the rotary embedding ``rope = (cos, sin)`` gathered with the
            tokens, exactly as the model does; None for absolute positions.
        attn_out: ``Tensor[n, H*d] -> Tensor[n, C]`` output projection (and layer scale, if any).
        mlp: ``Tensor[n, C] -> Tensor[n, C]`` the MLP (and layer scale, if any).
        attend: dense attention per segment (:data:`AttendFn`), the model's own backend.
        attend_varlen: packed varlen attention (flash), used instead of ``attend`` when given.
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    attn_out: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    attend: AttendFn
    kv: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    rotary: Callable[[Tensor, Tensor, tuple[Tensor, Tensor]], tuple[Tensor, Tensor]] | None = None
    attend_varlen: VarlenFn | None = None


def _keys_values(ops: BlockOps, tokens: VisionTokens) -> tuple[Tensor, Tensor]:
    """Post-rotary keys and values ``[n, H, d]`` of key/value-only tokens."""
    h = ops.norm1(tokens.hidden)
    if ops.kv is not None:
        k, v = ops.kv(h)
    else:
        _, k, v = ops.qkv(h)
    if ops.rotary is not None and tokens.rope is not None:
        _, k = ops.rotary(k, k, tokens.rope)
    return k, v


def run_block_variant(ops: BlockOps, tokens: VisionTokens, variant: BlockVariant, q_seg: Tensor,
                      extra_seg: Tensor | None = None) -> VisionTokens:
    """Run one block on ``tokens`` as ``variant`` says.

    Args:
        ops: the block's parts.
        tokens: the query tokens (N rows, tower order).
        variant: extra key/value tokens, MLP subset, proportional attention, ``mid`` hook.
        q_seg: LongTensor[N] attention segment of each query for this block (frame / window / tile ids).
        extra_seg: LongTensor[E] segment of each ``variant.extra_kv`` token in the same id space.
    Returns:
        The block's output tokens: ``tokens`` with new hidden states, or what ``variant.mid`` returned (then
        with the MLP applied). With an empty variant the result equals the plain block's output.
    """
    x = tokens.hidden
    n = x.shape[0]
    q, k, v = ops.qkv(ops.norm1(x))
    k_raw = k
    if ops.rotary is not None and tokens.rope is not None:
        q, k = ops.rotary(q, k, tokens.rope)
    keys, vals, k_seg, sizes = k, v, q_seg, tokens.size
    if variant.extra_kv is not None and variant.extra_kv.n:
        if extra_seg is None:
            raise AdapterError("run_block_variant: extra_kv given without its segment ids")
        ke, ve = _keys_values(ops, variant.extra_kv)
        keys, vals = torch.cat([k, ke]), torch.cat([v, ve])
        k_seg = torch.cat([q_seg, extra_seg.to(q_seg.device)])
        sizes = torch.cat([tokens.size, variant.extra_kv.size.to(tokens.size.device)])
    bias = sizes.to(device=x.device, dtype=torch.float32).clamp_min(1e-6).log() if variant.size_bias else None
    if ops.attend_varlen is not None:
        if bias is not None:
            raise AdapterError("proportional attention (size_bias) needs a float attention bias, which "
                               "flash-attention cannot take; run the vision tower with sdpa or eager")
        o = varlen_segment_attention(q, keys, vals, q_seg, k_seg, ops.attend_varlen)
    else:
        o = segment_attention(q, keys, vals, q_seg, k_seg, bias, ops.attend)
    out = tokens.with_hidden(x + ops.attn_out(o.reshape(n, -1)))
    if variant.mid is not None:
        out = variant.mid(out, head_mean_keys(k_raw))
    h = out.hidden
    if variant.mlp_on is not None:
        idx = variant.mlp_on.to(h.device)
        h = h.clone()
        h[idx] = h[idx] + ops.mlp(ops.norm2(h[idx]))
    else:
        h = h + ops.mlp(ops.norm2(h))
    return out.with_hidden(h)


# ------------------------------------------------------------------------------------------------------
# finish validation
# ------------------------------------------------------------------------------------------------------
@dataclass
class Finished:
    """What a valid ``finish`` returned, in the order the merger / projector needs.

    Attributes:
        tokens: the final tokens in tower order (CLS rows first within their segment, as in the tower).
        units: LongTensor[U'] ids of the present units in tower order (unit granularity), or None (patch:
            every unit present).
        rows: LongTensor[U', u] row indices into ``tokens`` of each present unit's patches, TL, TR, BL, BR.
    """

    tokens: VisionTokens
    units: Tensor | None
    rows: Tensor


def check_finish(tokens: VisionTokens, layout: VisionLayout, granularity: str, strategy: str = "") -> Finished:
    """Validate ``finish``'s output and bring it into tower order.

    * ``patch``: every original token (origin ``0..N-1``) exactly once.
    * ``unit``: whole units only: for every present unit ``u``, exactly the tokens at origins
      ``layout.unit_patches[u]`` (one row each), each unit at most once; CLS tokens (if the layout has them) pass.

    Raises :class:`AdapterError` naming the strategy and what is wrong.
    """
    who = f"vision strategy {strategy!r}" if strategy else "the vision strategy"
    tokens = tower_order(tokens)
    patches = layout.unit_patches.to(tokens.origin.device)
    if granularity == "patch":
        if tokens.n != layout.n_tokens or not torch.equal(
                tokens.origin, torch.arange(layout.n_tokens, device=tokens.origin.device)):
            raise AdapterError(f"{who} has granularity 'patch' and must return every original token exactly once "
                               f"from finish() (got {tokens.n} tokens for {layout.n_tokens}; duplicates or gaps "
                               "in origin). Restore the full grid before the merger, or declare granularity 'unit'.")
        rows = patches
        return Finished(tokens, None, rows)
    if granularity != "unit":
        raise AdapterError(f"{who} has granularity {granularity!r}; vision strategies must be 'patch' or 'unit'")
    body = (~tokens.cls).nonzero()[:, 0]
    unit = tokens.unit[body]
    if unit.numel() and int(unit.min()) < 0:
        raise AdapterError(f"{who} returned non-CLS tokens without a unit id from finish()")
    if body.numel() % layout.unit_size:
        raise AdapterError(f"{who} must return whole units from finish() ({layout.unit_size} tokens each); "
                           f"got {body.numel()} non-CLS tokens")
    # group by unit (a unit's patches need not be consecutive in tower order: InternVL's pixel-shuffle units span
    # two patch rows), TL, TR, BL, BR by origin inside each unit; units ordered by their first patch's tower
    # position, so a complete set of units comes out in the order the merger / projector expects
    first = patches[:, 0][tokens.unit[body].clamp(min=0)]
    key = first * (layout.n_tokens + 1) + tokens.origin[body]
    rows = body[torch.argsort(key)].view(-1, layout.unit_size)
    ids = tokens.unit[rows[:, 0]]
    expect = patches[ids]                                # [U', u] origins each unit must have
    if not torch.equal(tokens.origin[rows], expect) or not bool((tokens.unit[rows] == ids[:, None]).all()):
        raise AdapterError(f"{who} returned partial or mixed units from finish(): every present unit must have "
                           f"exactly its {layout.unit_size} patches (origins layout.unit_patches[unit]); keep or "
                           "drop whole units, or declare granularity 'patch' and restore the full grid")
    if ids.numel() > 1 and not bool((ids[1:] != ids[:-1]).all()):
        raise AdapterError(f"{who} returned a unit twice from finish()")
    return Finished(tokens, ids, rows)


def check_prefix(tokens: VisionTokens, n_segments: int, per_segment: int, where: str, strategy: str) -> None:
    """Raise :class:`AdapterError` unless every segment still holds exactly its ``per_segment`` prefix tokens (CLS,
    registers: ``cls=True``), which strategies must never drop or merge."""
    have = torch.bincount(tokens.segment[tokens.cls], minlength=n_segments)
    if have.numel() != n_segments or not bool((have == per_segment).all()):
        raise AdapterError(f"the CLS / register tokens of every image or tile must be kept ({where}): strategy "
                           f"{strategy!r} returned {int(have.sum())} of {n_segments * per_segment}. Fix the strategy: "
                           "never drop or merge tokens with cls=True.")


def to_grid(done: Finished, layout: VisionLayout) -> tuple[Tensor, Tensor]:
    """A validated ``finish`` output on the full token grid: ``(full Tensor[N, C] with every token at its origin and
    zero rows at dropped units, kept BoolTensor[U] (CPU) present units)``."""
    tokens = done.tokens
    kept = torch.ones(layout.n_units, dtype=torch.bool)
    if done.units is not None:
        kept = torch.zeros(layout.n_units, dtype=torch.bool)
        kept[done.units.cpu()] = True
    full = tokens.hidden.new_zeros(layout.n_tokens, tokens.hidden.shape[-1])
    full[tokens.origin.to(full.device)] = tokens.hidden
    return full, kept


# ------------------------------------------------------------------------------------------------------
# the per-call driver
# ------------------------------------------------------------------------------------------------------
class VisionRun:
    """State of one vision-tower call and the strategy call sequence (all per call; nothing on modules).

    Typical use from an adapter's hooks::

        run = VisionRun(strategy, layout, depth, family)          # tower pre-hook
        run.start(initial_tokens)                                  # first block's pre-hook
        variant = run.variant(i)                                   # block i pre-hook: None -> native block
        run.after_block(i, run.tokens.with_hidden(native_out))     # block i forward hook (or the variant's out)
        done = run.finish()                                        # merger / projector pre-hook

    Attributes:
        strategy: the ViTCompressor; ctx: its :class:`VisionContext`; tokens: the current token set (tower order).
        stash: the output tokens of a block variant run by the adapter, consumed by its forward hook.
    """

    def __init__(self, strategy, layout: VisionLayout, depth: int, family: str) -> None:
        self.strategy = strategy
        self.ctx = VisionContext(layout=layout, depth=depth, family=family)
        self.tokens: VisionTokens | None = None
        self.stash: VisionTokens | None = None
        self.changed = False
        #: ``{block: (q tokens per attention segment, kv tokens per segment, MLP tokens)}`` for the FLOPs model
        self.block_runs: dict[int, tuple[list[int], list[int], int]] = {}
        self._record_memo: tuple | None = None

    @property
    def layout(self) -> VisionLayout:
        return self.ctx.layout

    def start(self, tokens: VisionTokens) -> VisionTokens:
        """Hand the initial token set (after patch embedding) to ``strategy.start``; keep the result."""
        out = tower_order(self.strategy.start(tokens, self.ctx))
        self.changed = out is not tokens
        self.tokens = out
        return out

    def variant(self, i: int) -> BlockVariant | None:
        """``strategy.block_variant(i, tokens, ctx)`` (None: run the model's own block)."""
        v = self.strategy.block_variant(i, self.tokens, self.ctx)
        if v is not None:
            self.changed = True
        return v

    def after_block(self, i: int, tokens: VisionTokens) -> VisionTokens:
        """``strategy.after_block`` on block ``i``'s output; tower order restored; count recorded in ctx."""
        out = self.strategy.after_block(i, tokens, self.ctx)
        if out is not tokens:
            self.changed = True
            out = tower_order(out)
        self.tokens = out
        self.ctx.counts[i] = out.n
        return out

    def record_block(self, i: int, q_seg: Tensor, kv_seg: Tensor | None = None, mlp: int | None = None) -> None:
        """Record what block ``i`` ran on: segment ids (tower order, contiguous runs) of its queries and of its
        extra key/value tokens, and the number of tokens whose MLP ran (default: every query)."""
        memo = self._record_memo
        if kv_seg is None and mlp is None and memo is not None and memo[0] is q_seg:
            self.block_runs[i] = memo[1]                   # an unchanged token set: no host sync per block
            return
        q = torch.unique_consecutive(q_seg, return_counts=True)
        qc = dict(zip(q[0].tolist(), q[1].tolist()))
        kc = dict(qc)
        if kv_seg is not None and kv_seg.numel():
            for sid, n in zip(*[t.tolist() for t in torch.unique(kv_seg, return_counts=True)]):
                kc[sid] = kc.get(sid, 0) + n
        keys = sorted(set(qc) | set(kc))
        self.block_runs[i] = ([qc.get(k, 0) for k in keys], [kc.get(k, 0) for k in keys],
                              sum(qc.values()) if mlp is None else int(mlp))
        if kv_seg is None and mlp is None:
            self._record_memo = (q_seg, self.block_runs[i])

    def finish(self) -> Finished:
        """``strategy.finish`` then :func:`check_finish` with the strategy's granularity."""
        out = self.strategy.finish(self.tokens, self.ctx)
        if out is not self.tokens:
            self.changed = True
        s = self.strategy
        return check_finish(out, self.layout, s.granularity, s.name)
