"""InternViT side of the InternVL adapter: layout, token sets, the block runner and the per-call engine.

InternViT runs every tile as one row of a batch ``[T, 1 + g*g, C]`` (CLS at index 0, patches in raster order,
absolute position embeddings already added, no mask). Pixel shuffle then concatenates the 2x2 patch blocks
``(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)`` (TL, TR, BL, BR, in that channel order) into LLM token
``(i, j)`` of the ``(g/2) x (g/2)`` output raster; these blocks are the *units*. Unit ids follow the placeholder
order: tile-major, then the output raster. Segments are tiles (the thumbnail is an ordinary tile).

Everything here is driven by forward (pre-)hooks that :class:`InternVLVision` registers through the adapter's
``Surgery`` (the block loop is the shared :class:`~adapters._tower.HookedTower`); per-call state lives on that
object (created per session), never on modules.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokcomp.errors import AdapterError
from tokcomp.tokens import VisionLayout, VisionTokens

from . import _hf as hf
from ._tower import HookedTower
from ._vision import BlockOps, check_prefix, to_grid
from ._vlm import VisionResult


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
# the per-session vision side (hooks)
# ------------------------------------------------------------------------------------------------------
class InternVLVision:
    """Drives a ViTCompressor through InternViT (also the tower's :class:`~adapters._tower.TowerIO`).

    The native layer runs on ``[T, K, C]`` whenever every tile holds the same count K and no variant is asked
    for; otherwise the block runs here on any per-tile counts and the native layer's forward is skipped. After
    the last layer ``finish`` is validated and scattered back to the full ``[T, 1 + g*g, C]`` grid (zero rows at
    dropped units) so the model's pixel shuffle still works; for unit strategies that dropped units the projector
    runs on the kept units only (``[1, U', 4C]``) and its output is scattered back to ``[T, (g/2)^2, D]``. The
    projector's forward hook hands the call (features, kept units, counts) to the adapter.
    """

    def __init__(self, adapter, strategy):
        self.adapter, self.strategy = adapter, strategy
        self.tower = adapter.model.model.vision_tower
        self.projector = adapter.model.model.multi_modal_projector
        self.driver = HookedTower(self.tower.encoder.layer, self, strategy, adapter.name, step=self._step)
        self.n1 = 0                                    # tokens per tile (1 + g*g) of the call in flight
        self.kept: Tensor | None = None
        self.call = None                               # the finished tower call, until the projector ran
        self._per_tile: tuple | None = None

    def attach(self, surgery) -> None:
        surgery.pre_hook(self.tower, self._tower_pre)
        self.driver.attach(surgery)
        surgery.pre_hook(self.projector, self._projector_pre)
        surgery.post_hook(self.projector, self._projector_post)

    def _impl(self) -> str:
        return hf.attn_impl(self.tower.config) or "eager"

    def _tower_pre(self, mod, args, kw):
        if kw.get("bool_masked_pos") is not None:
            raise AdapterError("InternVL adapter: bool_masked_pos (masked image modelling) is not supported inside "
                               "a compression session")
        # get_image_features passes output_hidden_states=vision_feature_layer (-1) to select what it reads
        if self.strategy.name != "none" and (kw.get("output_hidden_states") is True or kw.get("output_attentions")):
            raise AdapterError("InternVL adapter: the vision tower's hidden_states / attentions are not available "
                               "while a vision compressor changes its token set; call the tower outside the session")
        self.kept, self.call, self._per_tile = None, None, None
        return None

    def _step(self, fn, tokens: VisionTokens, where: str) -> VisionTokens:
        out = fn(tokens)
        if out.cls is not tokens.cls:
            check_prefix(out, self.driver.call.run.layout.n_segments, 1, where, self.strategy.name)
        return out

    # -- TowerIO --------------------------------------------------------------------------------------------
    def begin(self, args, kw):
        emb = args[0] if args else kw["hidden_states"]                 # [T, 1 + g*g, C]
        T, self.n1, _ = emb.shape
        g = int(round((self.n1 - 1) ** 0.5))
        return tile_layout(T, g), tile_tokens(emb, g)

    def segments(self, i, tokens):
        return tokens.segment

    def native(self, i, tokens, q_seg, args, kw):
        T = self.driver.call.run.layout.n_segments
        memo = self._per_tile
        if memo is None or memo[0] is not tokens.segment:             # one host sync per token-set change
            counts = torch.bincount(tokens.segment, minlength=T)
            memo = self._per_tile = (tokens.segment, int(counts[0]) if bool((counts == counts[0]).all()) else 0)
        if not memo[1]:
            return None
        return (tokens.hidden.reshape(T, memo[1], tokens.hidden.shape[-1]), *args[1:]), kw

    def dummy(self, i, tokens, args, kw):
        return (tokens.hidden[:1][None], *args[1:]), kw                # [1, 1, C]: the native call costs ~0

    def read(self, out, tokens):
        return out.reshape(-1, out.shape[-1])

    def ops(self, i, block):
        return block_ops(block, self._impl())

    def after_last(self, driver, out):
        done = driver.finish()
        run = driver.call.run
        layout = run.layout
        self.call = driver.end()
        if not run.changed:
            self.call.record.vision_out = [layout.n_units // layout.n_segments] * layout.n_segments
            return None
        check_prefix(done.tokens, layout.n_segments, 1, "after finish", self.strategy.name)
        full, kept = to_grid(done, layout)
        self.call.record.vision_out = kept.view(layout.n_segments, -1).sum(1).tolist()
        self.kept = None if bool(kept.all()) else kept
        return full.view(layout.n_segments, self.n1, -1)

    # -- projector ------------------------------------------------------------------------------------------
    def _projector_pre(self, mod, args, kw):
        if self.kept is None:
            return None
        x = args[0]                                                     # [T, n, 4C] after pixel shuffle
        keep = self.kept.nonzero()[:, 0].to(x.device)
        return (x.reshape(-1, x.shape[-1])[keep][None], *args[1:]), kw   # [1, U', 4C]

    def _projector_post(self, mod, args, kw, out):
        call, self.call = self.call, None
        if call is None:
            return None
        T = call.run.layout.n_segments
        n = call.run.layout.n_units // T
        if self.kept is not None:
            full = out.new_zeros(T * n, out.shape[-1])
            full[self.kept.nonzero()[:, 0].to(out.device)] = out[0]
            out = full.view(T, n, -1)
        side = int(round(n ** 0.5))
        self.adapter.vision_done(VisionResult(features=out, sizes=[n] * T, kept=self.kept, record=call.record,
                                              grids=[(1, side, side)] * T))
        return out if self.kept is not None else None
