"""The data a strategy sees: vision token sets with metadata, block variants, LLM pruning steps.

Adapters build these from a model; strategies only read tensors from them and return decisions.
Nothing here knows a model class.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor


# ------------------------------------------------------------------------------------------------------
# vision side
# ------------------------------------------------------------------------------------------------------
@dataclass
class VisionLayout:
    """Static description of one vision-tower call (all images, frames and tiles of the batch).

    Attributes:
        n_tokens: N, tokens in the full (uncompressed) sequence, CLS included.
        unit_size: u, patches per LLM token (4 for a 2x2 merge / pixel shuffle).
        segment_grid: LongTensor[S, 3] (t, h, w) patch grid of each attention segment (image, frame or tile).
        segment_image: LongTensor[S] which image / video (0..I-1) a segment belongs to.
        unit_patches: LongTensor[U, u] full-sequence indices of each unit's patches, ordered TL, TR, BL, BR.
        unit_segment: LongTensor[U] segment of each unit.
        unit_grid: LongTensor[U, 3] (t, h, w) position of each unit on its segment's unit grid.
        has_cls: True if each segment starts with a CLS token (InternViT).
    """

    n_tokens: int
    unit_size: int
    segment_grid: Tensor
    segment_image: Tensor
    unit_patches: Tensor
    unit_segment: Tensor
    unit_grid: Tensor
    has_cls: bool = False

    @property
    def n_segments(self) -> int:
        return int(self.segment_grid.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.unit_patches.shape[0])


@dataclass
class VisionTokens:
    """The current token set inside a vision tower, one row per token, in the tower's own order.

    Attributes:
        hidden: Tensor[N, C] hidden states.
        segment: LongTensor[N] attention segment of each token (0..S-1); attention never crosses segments.
        pos: LongTensor[N, 3] (t, h, w) patch-grid position in its segment (CLS: -1).
        unit: LongTensor[N] unit id (0..U-1) of the LLM token the patch belongs to (CLS: -1).
        size: Tensor[N] float32, original patches represented (1 unless merged).
        origin: LongTensor[N] index in the full uncompressed sequence.
        cls: BoolTensor[N] CLS flag.
        rope: (cos, sin) each Tensor[N, head_dim] gathered with the tokens, or None (absolute positions).
    """

    hidden: Tensor
    segment: Tensor
    pos: Tensor
    unit: Tensor
    size: Tensor
    origin: Tensor
    cls: Tensor
    rope: tuple[Tensor, Tensor] | None = None

    @property
    def n(self) -> int:
        return int(self.hidden.shape[0])

    def select(self, idx: Tensor, hidden: Tensor | None = None) -> "VisionTokens":
        """Rows ``idx`` (LongTensor[K] or BoolTensor[N]) of every field, in the given order; ``hidden``
        (Tensor[K, C]) replaces the selected rows' hidden states without gathering the old ones (a merge's output)."""
        if idx.dtype == torch.bool:
            idx = idx.nonzero()[:, 0]
        idx = idx.to(self.hidden.device)
        rope = None if self.rope is None else (self.rope[0][idx], self.rope[1][idx])
        meta = idx.to(self.segment.device)
        if hidden is not None and hidden.shape[0] != idx.shape[0]:
            raise ValueError(f"VisionTokens.select: hidden has {hidden.shape[0]} rows for {idx.shape[0]} selected")
        return VisionTokens(self.hidden[idx] if hidden is None else hidden, self.segment[meta], self.pos[meta],
                            self.unit[meta], self.size[meta], self.origin[meta], self.cls[meta], rope)

    def with_hidden(self, hidden: Tensor, **changes: Any) -> "VisionTokens":
        """Same tokens with new hidden states (Tensor[N, C]) and optionally other fields replaced."""
        return replace(self, hidden=hidden, **changes)

    @staticmethod
    def cat(parts: list["VisionTokens"]) -> "VisionTokens":
        """Concatenate token sets row-wise (all parts must agree on having rope or not)."""
        rope = None
        if parts[0].rope is not None:
            rope = (torch.cat([p.rope[0] for p in parts]), torch.cat([p.rope[1] for p in parts]))
        f = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return VisionTokens(f("hidden"), f("segment"), f("pos"), f("unit"), f("size"), f("origin"), f("cls"), rope)

    def units(self) -> tuple[Tensor, Tensor]:
        """Group non-CLS tokens by unit: ``(unit_ids LongTensor[U'], rows LongTensor[U', u])``.

        ``rows[j]`` are the row indices of unit ``unit_ids[j]``'s tokens ordered by origin (TL, TR, BL, BR for
        a complete unit). Requires every present unit to have the same number of tokens."""
        rows = (~self.cls).nonzero()[:, 0]
        key = self.unit[rows] * (int(self.origin.max()) + 1) + self.origin[rows]
        rows = rows[torch.argsort(key)]
        ids, counts = torch.unique_consecutive(self.unit[rows], return_counts=True)
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise ValueError("VisionTokens.units(): units have different numbers of tokens")
        u = int(counts[0]) if counts.numel() else 0
        return ids, rows.view(-1, u) if u else rows.view(0, 0)


@dataclass
class BlockVariant:
    """How to run one vision block differently from the plain ``block(tokens)``.

    Attributes:
        extra_kv: tokens that act as extra keys/values only (no query, no output), attended within their own
            segment: IPCV's attention stabilization (queries = kept tokens, keys/values = kept + reconstructed).
        mlp_on: LongTensor[M] rows of the query tokens whose MLP runs; the others pass the MLP residual unchanged.
        size_bias: proportional attention: add ``log(size)`` of each key to the attention logits (ToMe).
        mid: called between attention (+residual) and MLP as ``mid(tokens, keys) -> tokens``; ``keys`` is
            Tensor[N, head_dim], this block's keys averaged over heads (ToMe's matching metric). The MLP then runs
            on the tokens ``mid`` returned (merging before the MLP, as ToMe does).
    """

    extra_kv: VisionTokens | None = None
    mlp_on: Tensor | None = None
    size_bias: bool = False
    mid: Callable[[VisionTokens, Tensor], VisionTokens] | None = None


@dataclass
class VisionContext:
    """Per-forward context handed to a vision compressor.

    Attributes:
        layout: the static layout of this tower call.
        depth: number of blocks in the tower.
        family: adapter family name ("qwen2_vl", "internvl", ...), for reports only; strategies must not branch
            on it except through ``defaults`` lookups.
        state: scratch space for this forward (cleared by the adapter for every tower call).
        counts: achieved token count after each block, filled by the adapter: ``{block index: N}``.
    """

    layout: VisionLayout
    depth: int
    family: str = ""
    state: dict[str, Any] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# LLM side
# ------------------------------------------------------------------------------------------------------
@dataclass
class VisualSpan:
    """One image / video inside one row of the LLM input.

    Attributes:
        row: batch row.
        positions: LongTensor[n] current sequence indices of the span's visual tokens (ascending).
        grid: (t, h, w) unit grid of the image / video (t = 1 for images); n == t*h*w before any pruning.
        cells: LongTensor[n, 3] (t, h, w) grid cell of each current token (kept tokens keep their cell).
    """

    row: int
    positions: Tensor
    grid: tuple[int, int, int]
    cells: Tensor


@dataclass
class LLMStep:
    """What an LLM pruner sees after decoder layer ``layer`` during prefill.

    Attributes:
        layer: index of the decoder layer that just ran.
        hidden: Tensor[B, L, D] output of the layer (current, possibly already pruned sequence).
        hidden_in: Tensor[B, L, D] input of the layer (V2Drop's variation = ||hidden - hidden_in||).
        visual: BoolTensor[B, L] visual tokens.
        valid: BoolTensor[B, L] non-padding tokens.
        spans: visual spans per row (``spans[b]`` is a list of VisualSpan).
        n_visual_original: LongTensor[B] visual tokens per row before any LLM pruning (budgets are fractions of it).
        n_layers: decoder layers of the language model (progressive schedules scale to it).
        attn: Tensor[B, H, R, L] float32 softmax attention rows of ``queries`` at this layer, or None.
        queries: LongTensor[B, R] the query positions of ``attn`` (same R for each row; padded rows repeat).
        keys: Tensor[B, H_kv, L, head_dim] post-RoPE keys of this layer, or None.
        embeds: Tensor[B, L0, D] the layer-0 input embeddings (original sequence), for text raters.
        embeds_index: LongTensor[B, L] original index of each current token (to index ``embeds``).
        norm: the LLM's final norm module (DART compares normed hidden states).
    """

    layer: int
    hidden: Tensor
    hidden_in: Tensor
    visual: Tensor
    valid: Tensor
    spans: list[list[VisualSpan]]
    n_visual_original: Tensor
    n_layers: int
    attn: Tensor | None = None
    queries: Tensor | None = None
    keys: Tensor | None = None
    embeds: Tensor | None = None
    embeds_index: Tensor | None = None
    norm: Callable[[Tensor], Tensor] | None = None


@dataclass
class LLMContext:
    """Per-prefill context handed to an LLM pruner (``begin`` and every ``select`` of one prefill).

    Attributes:
        n_layers: decoder layers of the language model.
        prune_layers: the layers after which ``select`` is called in this prefill (what ``prune_layers`` returned).
        family: adapter family name ("qwen2_vl", "internvl", ...), for reports only.
        state: scratch space for this prefill (e.g. SparseVLM's text raters, computed once).
    """

    n_layers: int
    prune_layers: list[int] = field(default_factory=list)
    family: str = ""
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """An LLM pruner's decision for one prune point.

    Attributes:
        keep: per row, LongTensor of current sequence indices of the VISUAL tokens to keep (any order; the
            adapter sorts them). Text tokens are always kept by the adapter.
        replace: optional per row ``(indices, values Tensor[k, D])``: new hidden states for kept visual tokens
            (SparseVLM's recycled, merged tokens take the slot of their cluster centre).
    """

    keep: list[Tensor]
    replace: list[tuple[Tensor, Tensor] | None] | None = None
