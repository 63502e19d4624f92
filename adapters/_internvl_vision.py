"""InternViT side of the InternVL adapter: layout, token sets, the block runner and the per-call engine.

InternViT runs every tile as one row of a batch ``[T, 1 + g*g, C]`` (CLS at index 0, patches in raster order,
absolute position embeddings already added, no mask). Pixel shuffle then concatenates the 2x2 patch blocks
``(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)`` (TL, TR, BL, BR, in that channel order) into LLM token
``(i, j)`` of the ``(g/2) x (g/2)`` output raster; these blocks are the *units*. Unit ids follow the placeholder
order: tile-major, then the output raster. Segments are tiles (the thumbnail is an ordinary tile).

Everything here is driven by forward (pre-)hooks that :class:`VisionEngine` registers through the adapter's
``Surgery``; per-call state lives on the engine (created per session), never on modules.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokcomp.errors import AdapterError
from tokcomp.session import ForwardRecord
from tokcomp.tokens import BlockVariant, VisionLayout, VisionTokens

from . import _hf as hf
from ._vision import BlockOps, VisionRun, run_block_variant, tower_order


# ------------------------------------------------------------------------------------------------------
# layout and token sets (pure functions)
# ------------------------------------------------------------------------------------------------------
def tile_layout(n_tiles: int, grid: int) -> VisionLayout:
    """The layout of ``n_tiles`` tiles of ``grid x grid`` patches, each preceded by a CLS token.

    Returns a VisionLayout with ``n_tokens = T * (1 + g*g)``, ``unit_size = 4``, segments = tiles
    (``segment_grid[s] = (1, g, g)``, ``segment_image[s] = s``), ``unit_patches[U = T*(g/2)^2, 4]`` the flat
    token indices (CLS offset included) of each unit's patches ordered TL, TR, BL, BR, ``unit_grid[U, 3] =
    (0, i, j)``. Unit ``u = t*(g/2)^2 + i*(g/2) + j`` feeds the ``u``-th ``<IMG_CONTEXT>`` placeholder.
    """
    if grid % 2:
        raise AdapterError(f"InternViT patch grid {grid}x{grid} is not divisible by 2; pixel shuffle needs it")
    T, g, h = int(n_tiles), int(grid), int(grid) // 2
    n1 = 1 + g * g
    i = torch.arange(h).repeat_interleave(h)          # [h*h] output row
    j = torch.arange(h).repeat(h)                     # [h*h] output col
    tl = 1 + (2 * i) * g + 2 * j                      # [h*h] TL patch index inside a tile (CLS offset 1)
    quad = torch.stack([tl, tl + 1, tl + g, tl + g + 1], -1)          # [h*h, 4]
    base = (torch.arange(T) * n1)[:, None, None]                       # [T, 1, 1]
    unit_patches = (base + quad[None]).reshape(-1, 4)                  # [T*h*h, 4]
    unit_segment = torch.arange(T).repeat_interleave(h * h)
    cell = torch.stack([torch.zeros_like(i), i, j], -1)                # [h*h, 3]
    return VisionLayout(
        n_tokens=T * n1, unit_size=4,
        segment_grid=torch.tensor([[1, g, g]], dtype=torch.long).repeat(T, 1),
        segment_image=torch.arange(T), unit_patches=unit_patches, unit_segment=unit_segment,
        unit_grid=cell.repeat(T, 1), has_cls=True)


def tile_tokens(hidden: Tensor, grid: int) -> VisionTokens:
    """The full token set of an embedding output ``hidden[T, 1 + g*g, C]`` (rows tile-major, CLS first).

    Metadata lives on ``hidden``'s device: ``segment`` = tile, ``pos = (0, r, c)`` (CLS: -1), ``unit`` as in
    :func:`tile_layout` (CLS: -1), ``size = 1``, ``origin = arange(N)``, ``cls`` flags, ``rope = None``."""
    T, n1, C = hidden.shape
    g, h, dev = int(grid), int(grid) // 2, hidden.device
    if n1 != 1 + g * g:
        raise AdapterError(f"InternViT returned {n1} tokens per tile; expected 1 CLS + {g}x{g} patches")
    p = torch.arange(g * g, device=dev)
    r, c = p // g, p % g
    local_unit = torch.cat([torch.full((1,), -1, device=dev), (r // 2) * h + c // 2])        # [n1]
    tiles = torch.arange(T, device=dev)
    unit = torch.where(local_unit[None] >= 0, tiles[:, None] * h * h + local_unit[None], -1).reshape(-1)
    pos1 = torch.cat([torch.full((1, 3), -1, device=dev),
                      torch.stack([torch.zeros_like(r), r, c], -1)])                        # [n1, 3]
    cls1 = torch.zeros(n1, dtype=torch.bool, device=dev)
    cls1[0] = True
    return VisionTokens(
        hidden=hidden.reshape(T * n1, C), segment=tiles.repeat_interleave(n1), pos=pos1.repeat(T, 1),
        unit=unit, size=torch.ones(T * n1, dtype=torch.float32, device=dev),
        origin=torch.arange(T * n1, device=dev), cls=cls1.repeat(T), rope=None)


def check_cls(tokens: VisionTokens, n_tiles: int, where: str) -> None:
    """Raise AdapterError unless every tile still has exactly its CLS token."""
    seg = tokens.segment[tokens.cls]
    if seg.numel() != n_tiles or not bool((torch.sort(seg).values == torch.arange(n_tiles, device=seg.device)).all()):
        raise AdapterError(f"InternVL: the CLS token of every tile must be kept ({where}); the strategy returned "
                           f"{seg.numel()} CLS tokens for {n_tiles} tiles. Fix the strategy: never drop or merge "
                           "tokens with cls=True.")


def finish_to_grid(tokens: VisionTokens, layout: VisionLayout, granularity: str, name: str) -> tuple[Tensor, Tensor]:
    """Validate a strategy's ``finish`` output and scatter it back to the full token grid.

    Returns ``(full[N, C], kept[U] bool)``: every token at its origin (dropped units are zero rows) and which
    units are present. ``patch``: every original token exactly once. ``unit``: whole units (each present unit
    with exactly its 4 patches) plus every CLS."""
    N, dev = layout.n_tokens, tokens.hidden.device
    n_tiles = layout.n_segments
    check_cls(tokens, n_tiles, "after finish")
    kept = torch.zeros(layout.n_units, dtype=torch.bool)
    origin = tokens.origin
    if granularity == "patch":
        ok = origin.numel() == N and bool((torch.sort(origin).values == torch.arange(N, device=origin.device)).all())
        if not ok:
            raise AdapterError(f"{name}: a patch-granularity compressor must return every original token exactly "
                               f"once from finish() (the full grid restored before pixel shuffle); got "
                               f"{origin.numel()} tokens for {N}.")
        kept[:] = True
    else:
        try:
            ids, rows = tokens.units()
        except ValueError as exc:
            raise AdapterError(f"{name}: a unit-granularity compressor must keep whole 2x2 units ({exc})") from None
        want = layout.unit_patches.to(origin.device)[ids] if ids.numel() else rows
        if (rows.shape[-1] != 4 and ids.numel()) or not torch.equal(origin[rows], want) \
                or torch.unique(ids).numel() != ids.numel() or tokens.n != ids.numel() * 4 + n_tiles:
            raise AdapterError(f"{name}: finish() must return whole units (each present unit with exactly its 4 "
                               "patches, TL/TR/BL/BR) plus every tile's CLS token, each once.")
        kept[ids.cpu()] = True
    full = tokens.hidden.new_zeros(N, tokens.hidden.shape[-1])
    full[origin.to(dev)] = tokens.hidden
    return full, kept


# ------------------------------------------------------------------------------------------------------
# the block as parts (for adapters/_vision.run_block_variant)
# ------------------------------------------------------------------------------------------------------
def block_ops(layer, impl: str) -> BlockOps:
    """The parts of one ``InternVLVisionLayer`` for :func:`adapters._vision.run_block_variant`.

    Same arithmetic as ``InternVLVisionLayer.forward``: ``x + lambda_1 * proj(attn(layernorm_before(x)))``, then
    ``+ lambda_2 * mlp(layernorm_after(.))``; q/k get the optional q_norm/k_norm over the full width before the
    head split; attention runs through the model's own backend (``impl``), per tile, or packed varlen for flash.
    """
    att = layer.attention
    H, d = att.num_heads, att.head_dim
    fn = hf.attention_kernel(att, impl)

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (att.q_norm(att.q_proj(h)).view(-1, H, d), att.k_norm(att.k_proj(h)).view(-1, H, d),
                att.v_proj(h).view(-1, H, d))

    def kv(h: Tensor) -> tuple[Tensor, Tensor]:
        return att.k_norm(att.k_proj(h)).view(-1, H, d), att.v_proj(h).view(-1, H, d)

    def attn_out(o: Tensor) -> Tensor:
        return layer.lambda_1 * att.projection_dropout(att.projection_layer(o))

    def mlp(h: Tensor) -> Tensor:
        z = layer.dropout(layer.mlp(h))
        return layer.lambda_2 * z if layer.lambda_2 is not None else z

    def attend(q, k, v, mask):                         # [1, H, n, d] x [1, H, m, d] -> [1, n, H, d]
        return fn(att, q, k, v, mask, dropout=0.0, scaling=att.scale, is_causal=False)[0]

    def attend_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        return fn(att, q, k, v, None, dropout=0.0, scaling=att.scale, is_causal=False, cu_seq_lens_q=cu_q,
                  cu_seq_lens_k=cu_k, max_length_q=max_q, max_length_k=max_k)[0]

    flash = hf.is_flash(impl)
    return BlockOps(norm1=layer.layernorm_before, qkv=qkv, attn_out=attn_out, norm2=layer.layernorm_after,
                    mlp=mlp, attend=attend, kv=kv, rotary=None, attend_varlen=attend_varlen if flash else None)


# ------------------------------------------------------------------------------------------------------
# the per-session engine (hooks)
# ------------------------------------------------------------------------------------------------------
class VisionEngine:
    """Drives a ViTCompressor through InternViT with hooks; one per session.

    Hooks (through ``surgery``): a pre-hook on ``vision_tower.encoder`` builds the layout and the full token set
    from the embeddings and calls ``start``; a pre-hook on every layer substitutes the current token set (the
    native layer runs on ``[T, K, C]`` when every tile has the same count K and no variant is asked for, else
    the block runs here on any per-tile counts and the native layer gets a ``[1, 1, C]`` dummy); a forward hook
    on every layer calls ``after_block``; after the last layer ``finish`` runs, its output is validated and
    scattered back to the full ``[T, 1 + g*g, C]`` grid (zero rows at dropped units) so the model's pixel
    shuffle still works. For unit strategies that dropped units, a pre-hook on ``multi_modal_projector`` projects
    only the kept units (``[1, U', 4C]``) and its forward hook scatters them back to ``[T, (g/2)^2, D]``.

    After a call, :attr:`last_kept` (BoolTensor[U], CPU, placeholder order) and :attr:`last_record` (the call's
    achieved counts; ``vision_out`` per tile) tell the adapter which placeholders survive.
    """

    def __init__(self, adapter, strategy, family: str = "internvl"):
        self.adapter, self.strategy, self.family = adapter, strategy, family
        self.tower = adapter.model.model.vision_tower
        self.layers = list(self.tower.encoder.layer)
        self.projector = adapter.model.model.multi_modal_projector
        self.run: VisionRun | None = None          # the vision call in flight
        self.call: dict[str, Any] = {}
        self.project: Tensor | None = None         # kept unit ids awaiting the projector
        self.last_kept: Tensor | None = None
        self.last_record: ForwardRecord | None = None

    def attach(self, surgery) -> None:
        surgery.pre_hook(self.tower, self._tower_pre)
        surgery.pre_hook(self.tower.encoder, self._encoder_pre)
        for i, layer in enumerate(self.layers):
            surgery.pre_hook(layer, lambda m, a, k, i=i: self._layer_pre(i, m, a, k))
            surgery.post_hook(layer, lambda m, a, k, out, i=i: self._layer_post(i, out))
        surgery.pre_hook(self.projector, self._projector_pre)
        surgery.post_hook(self.projector, self._projector_post)

    def _impl(self) -> str:
        return hf.attn_impl(self.tower.config) or "eager"

    # -- hooks ------------------------------------------------------------------------------------------
    def _tower_pre(self, mod, args, kw):
        if kw.get("bool_masked_pos") is not None:
            raise AdapterError("InternVL adapter: bool_masked_pos (masked image modelling) is not supported inside "
                               "a compression session")
        # get_image_features passes output_hidden_states=vision_feature_layer (-1) to select what it reads
        if kw.get("output_hidden_states") is True or kw.get("output_attentions"):
            raise AdapterError("InternVL adapter: the vision tower's hidden_states / attentions are not available "
                               "while a vision compressor changes its token set; call the tower outside the session")
        self.run, self.call, self.project = None, {}, None
        return None

    def _encoder_pre(self, mod, args, kw):
        emb = args[0] if args else kw["hidden_states"]                 # [T, 1 + g*g, C]
        T, n1, _ = emb.shape
        g = int(round((n1 - 1) ** 0.5))
        layout = tile_layout(T, g)
        self.run = VisionRun(self.strategy, layout, len(self.layers), self.family)
        self.run.start(tile_tokens(emb, g))
        check_cls(self.run.tokens, T, "after start")
        self.call = dict(n1=n1, record=ForwardRecord(vision_in=layout.n_tokens), native=False)
        return None

    def _layer_pre(self, i, mod, args, kw):
        run = self.run
        if run is None:
            raise AdapterError("InternVL adapter: a vision layer ran outside a vision-tower call; call "
                               "model.model.vision_tower(...) (or get_image_features) as a whole")
        tokens = run.tokens                                             # tower order: tiles are contiguous
        variant = run.variant(i)
        T = run.layout.n_segments
        run.record_block(i, tokens.segment, None if variant is None or variant.extra_kv is None
                         else variant.extra_kv.segment,
                         None if variant is None or variant.mlp_on is None else variant.mlp_on.numel())
        if variant is None and (K := self._per_tile(tokens, T)):
            self.call["native"] = True
            return (tokens.hidden.reshape(T, K, tokens.hidden.shape[-1]),), kw
        self.call["native"] = False
        run.stash = run_block_variant(block_ops(mod, self._impl()), tokens, variant or BlockVariant(),
                                      tokens.segment, None if variant is None or variant.extra_kv is None
                                      else variant.extra_kv.segment)
        return (tokens.hidden[:1][None],), kw                          # [1, 1, C]: the native call costs ~0

    def _per_tile(self, tokens: VisionTokens, T: int) -> int:
        """K if every tile holds K tokens, else 0 (memoised per token set: one host sync per change)."""
        memo = self.call.get("per_tile")
        if memo is not None and memo[0] is tokens.segment:
            return memo[1]
        counts = torch.bincount(tokens.segment, minlength=T)
        K = int(counts[0]) if bool((counts == counts[0]).all()) else 0
        self.call["per_tile"] = (tokens.segment, K)
        return K

    def _layer_post(self, i, out):
        run = self.run
        before = run.tokens
        if self.call["native"]:
            tokens = before.with_hidden(out.reshape(-1, out.shape[-1]))
        else:
            tokens, run.stash = tower_order(run.stash), None           # mid() may have reordered
        tokens = run.after_block(i, tokens)
        if tokens.cls is not before.cls:
            check_cls(tokens, run.layout.n_segments, f"after block {i}")
        self.call["record"].vision_blocks[i] = tokens.n
        if i < len(self.layers) - 1:
            return out
        return self._finish()

    def _finish(self) -> Tensor:
        run, st = self.run, self.call
        layout = run.layout
        tokens = self.strategy.finish(run.tokens, run.ctx)
        full, kept = finish_to_grid(tokens, layout, self.strategy.granularity, self.strategy.name)
        T = layout.n_segments
        st["record"].vision_out = kept.view(T, -1).sum(1).tolist()
        st["record"].vision_block_runs = dict(run.block_runs)
        self.adapter.session.report.vision.append(st["record"])
        self.last_kept, self.last_record = kept, st["record"]
        self.project = None if bool(kept.all()) else kept.nonzero()[:, 0]
        self.run = None
        return full.view(T, st["n1"], -1)

    def _projector_pre(self, mod, args, kw):
        if self.project is None:
            return None
        x = args[0]                                                     # [T, n, 4C] after pixel shuffle
        self.call["shape"] = x.shape
        return (x.reshape(-1, x.shape[-1])[self.project.to(x.device)][None],), kw   # [1, U', 4C]

    def _projector_post(self, mod, args, kw, out):
        if self.project is None:
            return None
        T, n, _ = self.call["shape"]
        full = out.new_zeros(T * n, out.shape[-1])
        full[self.project.to(out.device)] = out[0]
        self.project = None
        return full.view(T, n, -1)
