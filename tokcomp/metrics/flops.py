"""Analytic FLOPs from the *achieved* token counts, split into vision tower / LLM prefill / decode.

Conventions (stated so comparisons are honest; 1 multiply-add = 2 FLOPs):
- Linear ``[n, a] @ [a, b]``: ``2·n·a·b``.
- Attention over a segment of ``q`` queries and ``k`` keys: ``4·q·k·H·d`` (QKᵀ and AV, no causal discount —
  the convention of the IPCV paper's meter; causal kernels do about half of it during prefill).
- Vision block: QKV ``2·q·C·3C`` (keys/values of extra kv tokens add ``2·kv_extra·C·2C``), out-proj ``2·q·C·C``,
  MLP ``2·m·C·I·k`` with ``k = 2`` (GELU: fc1, fc2) or ``3`` (SwiGLU: gate, up, down), over the ``m`` tokens whose MLP ran.
- LLM layer (GQA-aware): q ``2·L·D·H·d``, k and v ``2·2·L·D·H_kv·d``, o ``2·L·H·d·D``, SwiGLU MLP ``3·2·L·D·I``.
- Prefill ends with the LM head on the last position of each row (``generate`` keeps one logit row): ``2·D·V``.
- Merger / projector: Qwen2-VL ``2·U·(4C·4C + 4C·D)``; InternVL ``2·U·(4C·D + D·D)`` (given as ``merger_in``/``merger_hidden``).
Norms, activations, softmax and RoPE are ignored (a few percent at most).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionDims:
    """Vision tower shape: width ``C``, heads ``H`` (head dim ``C/H``), MLP width ``I`` with ``mlp_mats`` matrices."""

    width: int
    heads: int
    mlp: int
    mlp_mats: int = 2           # 2: fc1+fc2 (GELU / QuickGELU), 3: SwiGLU
    merger_in: int = 0          # features per unit entering the merger (4C)
    merger_hidden: int = 0      # merger hidden width (4C for Qwen2-VL, D for InternVL)
    out: int = 0                # LLM width the merger produces


@dataclass(frozen=True)
class LLMDims:
    """Decoder shape: width ``D``, ``H`` query heads, ``H_kv`` key/value heads, head dim ``d``, MLP width ``I``, vocab ``V``."""

    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    layers: int


def linear(n: int, a: int, b: int) -> int:
    """FLOPs of ``[n, a] @ [a, b]``."""
    return 2 * n * a * b


def attention(q: int, k: int, heads: int, head_dim: int) -> int:
    """FLOPs of one attention segment: ``4·q·k·H·d``."""
    return 4 * q * k * heads * head_dim


def vision_block(d: VisionDims, q_seg: list[int], kv_seg: list[int] | None = None, mlp_tokens: int | None = None) -> int:
    """One vision block. ``q_seg``: query tokens per attention segment; ``kv_seg``: key/value tokens per segment
    (default = ``q_seg``; larger for IPCV's attention stabilization); ``mlp_tokens``: tokens whose MLP ran
    (default = all queries)."""
    kv_seg = q_seg if kv_seg is None else kv_seg
    q, kv = sum(q_seg), sum(kv_seg)
    m = q if mlp_tokens is None else mlp_tokens
    head_dim = d.width // d.heads
    f = linear(q, d.width, 3 * d.width) + linear(max(0, kv - q), d.width, 2 * d.width)
    f += sum(attention(a, b, d.heads, head_dim) for a, b in zip(q_seg, kv_seg))
    f += linear(q, d.width, d.width) + d.mlp_mats * linear(m, d.width, d.mlp)
    return f


def merger(d: VisionDims, units: int) -> int:
    """The merger / projector on ``units`` LLM tokens."""
    return linear(units, d.merger_in, d.merger_hidden) + linear(units, d.merger_hidden, d.out)


def llm_layer(d: LLMDims, q: int, k: int) -> int:
    """One decoder layer for ``q`` new tokens attending to ``k`` keys (one row)."""
    f = linear(q, d.width, d.heads * d.head_dim) + 2 * linear(q, d.width, d.kv_heads * d.head_dim)
    f += attention(q, k, d.heads, d.head_dim) + linear(q, d.heads * d.head_dim, d.width)
    return f + 3 * linear(q, d.width, d.mlp)


def prefill(d: LLMDims, tokens_per_layer: list[int]) -> int:
    """Prefill of one row: ``tokens_per_layer[i]`` tokens (text + visual) enter layer ``i``; plus the LM head on the
    last position. Queries and keys are the same set (the layer's own cache)."""
    if len(tokens_per_layer) != d.layers:
        raise ValueError(f"need one count per layer ({d.layers}), got {len(tokens_per_layer)}")
    return sum(llm_layer(d, n, n) for n in tokens_per_layer) + linear(1, d.width, d.vocab)


def decode_step(d: LLMDims, cache_per_layer: list[int]) -> int:
    """One decode step of one row; ``cache_per_layer[i]`` = keys already cached in layer ``i`` (the new token adds one)."""
    return sum(llm_layer(d, 1, k + 1) for k in cache_per_layer) + linear(1, d.width, d.vocab)


def kv_bytes_formula(d: LLMDims, cache_per_layer: list[int], bytes_per_elem: int) -> int:
    """Bytes a KV cache of these per-layer lengths holds for one row (GQA-aware): ``Σ 2·L_i·H_kv·d·bytes``."""
    return sum(2 * n * d.kv_heads * d.head_dim * bytes_per_elem for n in cache_per_layer)


def kv_bytes(cache) -> int:
    """Bytes held by a transformers ``Cache`` (measured from its tensors; works for any per-layer lengths)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total
