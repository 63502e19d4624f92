"""Synthetic vision layouts and a tiny pure-torch "fake tower" that drives a ViTCompressor's callbacks.

* :func:`make_tokens` builds a :class:`VisionLayout` plus the full :class:`VisionTokens` of several segments with
  given patch grids, in Qwen2-VL order (2x2 units consecutive, 2-D rotary cos/sin, no CLS) or InternVL order
  (CLS first in every tile, raster patches, no rotary).
* :class:`FakeTower` is a pre-norm transformer tower (float64) whose blocks execute every :class:`BlockVariant`
  field (extra_kv, mlp_on, size_bias, mid) with a plain reference attention restricted to each segment, and
  :meth:`FakeTower.run` drives ``start -> (block_variant, block, after_block) x depth -> finish`` like an adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokcomp.tokens import BlockVariant, VisionContext, VisionLayout, VisionTokens

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------------
def _rope(pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D axial rotary cos/sin [N, head_dim] from (t, h, w) positions (Qwen2-VL layout [h|w|h|w])."""
    quarter = head_dim // 4
    inv = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    fh = pos[:, 1:2].double() * inv
    fw = pos[:, 2:3].double() * inv
    f = torch.cat([fh, fw], -1)
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def make_tokens(grids, order: str = "qwen", images=None, c: int = 16, head_dim: int = 8, seed: int = 0,
                dtype=torch.float64) -> tuple[VisionLayout, VisionTokens]:
    """A layout of ``len(grids)`` segments with patch grids ``(h, w)`` (even) and its full token set.

    Args:
        grids: list of (h, w) patch grids, one per attention segment (image, video frame or tile).
        order: "qwen" (units of 4 consecutive rows TL, TR, BL, BR, rotary) or "internvl" (CLS + raster, no rotary).
        images: image/video id of each segment (default: one image per segment).
    Returns:
        (layout, tokens) with random hidden states [N, c].
    """
    images = list(range(len(grids))) if images is None else list(images)
    has_cls = order == "internvl"
    seg_l, pos_l, unit_l, cls_l = [], [], [], []
    unit_patches, unit_seg, unit_grid = [], [], []
    n = 0
    for s, (h, w) in enumerate(grids):
        assert h % 2 == 0 and w % 2 == 0
        if has_cls:
            seg_l.append(s), pos_l.append((-1, -1, -1)), unit_l.append(-1), cls_l.append(True)
            n += 1
        base_unit = len(unit_patches)
        if order == "qwen":
            for uh in range(h // 2):
                for uw in range(w // 2):
                    rows = []
                    for dh in range(2):
                        for dw in range(2):
                            seg_l.append(s), pos_l.append((0, 2 * uh + dh, 2 * uw + dw))
                            unit_l.append(len(unit_patches)), cls_l.append(False)
                            rows.append(n)
                            n += 1
                    unit_patches.append(rows), unit_seg.append(s), unit_grid.append((0, uh, uw))
        else:
            start = n
            for ph in range(h):
                for pw in range(w):
                    seg_l.append(s), pos_l.append((0, ph, pw))
                    unit_l.append(base_unit + (ph // 2) * (w // 2) + pw // 2), cls_l.append(False)
                    n += 1
            for uh in range(h // 2):
                for uw in range(w // 2):
                    tl = start + 2 * uh * w + 2 * uw
                    unit_patches.append([tl, tl + 1, tl + w, tl + w + 1])
                    unit_seg.append(s), unit_grid.append((0, uh, uw))
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    layout = VisionLayout(n, 4, t([(1, h, w) for h, w in grids]), t(images), t(unit_patches), t(unit_seg),
                          t(unit_grid), has_cls)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    pos = t(pos_l)
    rope = None if has_cls else tuple(x.to(dtype) for x in _rope(pos.clamp_min(0), head_dim))
    tokens = VisionTokens(hidden, t(seg_l), pos, t(unit_l), torch.ones(n), torch.arange(n),
                          torch.tensor(cls_l, dtype=torch.bool), rope)
    return layout, tokens


# ------------------------------------------------------------------------------------------------------
# the fake tower
# ------------------------------------------------------------------------------------------------------
def _ln(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:])


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """x [N, H, d] rotated by per-token cos/sin [N, d]."""
    cos, sin = rope[0][:, None, :], rope[1][:, None, :]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@dataclass
class _Params:
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor


class FakeTower:
    """``depth`` pre-norm blocks (attention within segments, then a tanh MLP), float64, seeded."""

    def __init__(self, depth: int = 6, c: int = 16, heads: int = 2, seed: int = 1, dtype=torch.float64):
        self.depth, self.c, self.heads, self.dtype = depth, c, heads, dtype
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[0])).to(dtype)  # noqa
        self.params = [_Params(r(c, c), r(c, c), r(c, c), r(c, c), r(c, 2 * c), r(2 * c, c)) for _ in range(depth)]

    # -- primitives --------------------------------------------------------------------------------------
    def attention(self, i: int, q_tok: VisionTokens, kv_tok: VisionTokens, size_bias: bool = False):
        """Attention output [n, C] of the queries ``q_tok`` over ``kv_tok`` (same segment only) and the
        post-rotary keys [m, H, d]."""
        p, h = self.params[i], self.heads
        n, m = q_tok.n, kv_tok.n
        q = (_ln(q_tok.hidden) @ p.wq).view(n, h, -1)
        k = (_ln(kv_tok.hidden) @ p.wk).view(m, h, -1)
        v = (_ln(kv_tok.hidden) @ p.wv).view(m, h, -1)
        if q_tok.rope is not None:
            q, k = _rotate(q, q_tok.rope), _rotate(k, kv_tok.rope)
        logits = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
        if size_bias:
            logits = logits + kv_tok.size.to(logits.dtype).log()[None, None, :]
        same = q_tok.segment[:, None] == kv_tok.segment[None, :]
        logits = logits.masked_fill(~same[None], float("-inf"))
        out = torch.einsum("hnm,mhd->nhd", logits.softmax(-1), v).reshape(n, -1) @ p.wo
        return out, k

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = self.params[i]
        return torch.tanh(_ln(x) @ p.w1) @ p.w2

    def block(self, i: int, tok: VisionTokens, var: BlockVariant | None = None) -> VisionTokens:
        """Block ``i`` on ``tok``, executing a :class:`BlockVariant` as documented in tokcomp/tokens.py."""
        var = var or BlockVariant()
        kv = tok if var.extra_kv is None else VisionTokens.cat([tok, var.extra_kv])
        out, k = self.attention(i, tok, kv, var.size_bias)
        tok = tok.with_hidden(tok.hidden + out)
        if var.mid is not None:
            tok = var.mid(tok, k[: tok.n].mean(1))
        h = tok.hidden.clone()
        rows = torch.arange(tok.n) if var.mlp_on is None else var.mlp_on
        h[rows] = h[rows] + self.mlp(i, h[rows])
        return tok.with_hidden(h)

    # -- the adapter-like driver -------------------------------------------------------------------------
    def run(self, strategy, tokens: VisionTokens, layout: VisionLayout, family: str = ""):
        """Drive the callbacks like an adapter; returns (finish output, ctx, calls).

        ``calls`` lists ("start", n), ("variant", i, kinds), ("after", i, n), ("finish", n) in call order, where
        ``kinds`` names the BlockVariant fields that were set."""
        ctx = VisionContext(layout, self.depth, family)
        calls = []
        t = tokens if strategy is None else strategy.start(tokens, ctx)
        calls.append(("start", t.n))
        for i in range(self.depth):
            var = None if strategy is None else strategy.block_variant(i, t, ctx)
            kinds = () if var is None else tuple(
                f for f in ("extra_kv", "mlp_on", "size_bias", "mid") if getattr(var, f) not in (None, False))
            calls.append(("variant", i, kinds))
            t = self.block(i, t, var)
            if strategy is not None:
                t = strategy.after_block(i, t, ctx)
            ctx.counts[i] = t.n
            calls.append(("after", i, t.n))
        if strategy is not None:
            t = strategy.finish(t, ctx)
        calls.append(("finish", t.n))
        return t, ctx, calls


# ------------------------------------------------------------------------------------------------------
# contract checks
# ------------------------------------------------------------------------------------------------------
def assert_metadata_follows_origin(out: VisionTokens, full: VisionTokens) -> None:
    """Every row's metadata (segment, pos, unit, cls, rotary) is that of the original token ``origin``."""
    o = out.origin
    assert torch.equal(out.segment, full.segment[o])
    assert torch.equal(out.pos, full.pos[o])
    assert torch.equal(out.unit, full.unit[o])
    assert torch.equal(out.cls, full.cls[o])
    if full.rope is not None:
        assert torch.equal(out.rope[0], full.rope[0][o]) and torch.equal(out.rope[1], full.rope[1][o])


def assert_full_grid(out: VisionTokens, full: VisionTokens) -> None:
    """Patch-granularity finish contract: every original token exactly once, in the original order."""
    assert torch.equal(out.origin, torch.arange(full.n))
    assert_metadata_follows_origin(out, full)


def assert_whole_units(out: VisionTokens, full: VisionTokens, layout: VisionLayout) -> torch.Tensor:
    """Unit-granularity finish contract: whole units only, CLS kept, rows in original order; returns the present
    unit ids."""
    assert torch.equal(out.origin, torch.sort(out.origin).values), "rows must stay in the original order"
    assert len(set(out.origin.tolist())) == out.n
    assert_metadata_follows_origin(out, full)
    assert int(out.cls.sum()) == int(full.cls.sum())
    ids, rows = out.units()
    assert rows.shape[1] == layout.unit_size
    assert torch.equal(out.origin[rows], layout.unit_patches[ids]), "each unit's patches, in TL, TR, BL, BR order"
    return ids

