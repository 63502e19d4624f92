"""A small pure-torch "VLM" and a minimal test-only adapter, to test sessions without transformers.

The toy tower embeds S square segments of ``g x g`` patches ([N, C] packed, units = 2x2 patch groups stored
consecutively like Qwen2-VL), runs ``depth`` residual MLP blocks, then a merger that concatenates each unit's 4 patches.
The adapter drives a ViTCompressor's callbacks with forward (pre-)hooks only and scatters the merger output back to
full size, exactly the mechanism the real adapters use; LLM pruners are accepted only if they need nothing special.
"""
from __future__ import annotations

import torch
from torch import nn

from tokcomp.adapter import Adapter
from tokcomp.session import ForwardRecord
from tokcomp.tokens import VisionContext, VisionLayout, VisionTokens


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, h):
        return h + torch.tanh(self.fc(h))


class ToyTower(nn.Module):
    def __init__(self, c=8, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c) for _ in range(depth))
        self.merger = nn.Linear(4 * c, c)

    def forward(self, h):            # h: [N, C], N divisible by 4
        for b in self.blocks:
            h = b(h)
        return self.merger(h.reshape(-1, 4 * h.shape[-1]))


class ToyVLM(nn.Module):
    def __init__(self, c=8, depth=3, llm_layers=2):
        super().__init__()
        self.visual = ToyTower(c, depth)
        self.llm = nn.ModuleList(nn.Linear(c, c) for _ in range(llm_layers))

    def forward(self, patches, grids):   # patches [N, C]; grids: list of (h, w) patch grids, units block-major
        return self.visual(patches)


def toy_layout(grids, unit_size=4) -> VisionLayout:
    seg_grid, unit_patches, unit_seg, unit_grid, start = [], [], [], [], 0
    for s, (h, w) in enumerate(grids):
        seg_grid.append((1, h, w))
        for uh in range(h // 2):
            for uw in range(w // 2):
                unit_patches.append(list(range(start, start + 4)))
                unit_seg.append(s)
                unit_grid.append((0, uh, uw))
                start += 4
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return VisionLayout(start, unit_size, t(seg_grid), t(list(range(len(grids)))), t(unit_patches), t(unit_seg),
                        t(unit_grid))


def toy_tokens(h: torch.Tensor, layout: VisionLayout) -> VisionTokens:
    n = h.shape[0]
    unit = torch.empty(n, dtype=torch.long)
    pos = torch.zeros(n, 3, dtype=torch.long)
    for u, rows in enumerate(layout.unit_patches.tolist()):
        unit[rows] = u
        _, uh, uw = layout.unit_grid[u].tolist()
        for j, r in enumerate(rows):
            pos[r] = torch.tensor([0, 2 * uh + j // 2, 2 * uw + j % 2])
    seg = layout.unit_segment[unit]
    return VisionTokens(h, seg, pos, unit, torch.ones(n), torch.arange(n), torch.zeros(n, dtype=torch.bool))


class ToyAdapter(Adapter):
    name = "toy"
    model_classes = ("ToyVLM",)
    provides = frozenset({"vision.blocks", "vision.unit", "vision.patch", "llm.layers"})   # no attention rows / keys

    @classmethod
    def supports(cls, model) -> bool:
        return isinstance(model, ToyVLM)

    def depths(self):
        return {"vision": len(self.model.visual.blocks), "llm": len(self.model.llm)}

    def attach(self, session):
        self.session, v, tower = session, session.vision, self.model.visual
        self.kept_units = None
        if v is None:
            return
        self.surgery.pre_hook(self.model, self._begin)
        for i, blk in enumerate(tower.blocks):
            self.surgery.pre_hook(blk, self._before)
            self.surgery.post_hook(blk, lambda m, a, k, out, i=i: self._after(i, out))
        self.surgery.pre_hook(tower.merger, self._merger_in)
        self.surgery.post_hook(tower.merger, self._merger_out)

    def _begin(self, mod, args, kw):
        grids = kw.get("grids", args[1] if len(args) > 1 else None)
        self.layout = toy_layout(grids)
        self.ctx = VisionContext(self.layout, len(self.model.visual.blocks), "toy")
        self.tokens = None
        self.record = ForwardRecord(vision_in=self.layout.n_tokens)

    def _before(self, mod, args, kw):
        if self.tokens is None:
            self.tokens = self.session.vision.start(toy_tokens(args[0], self.layout), self.ctx)
        return (self.tokens.hidden,), kw

    def _after(self, i, out):
        self.tokens = self.session.vision.after_block(i, self.tokens.with_hidden(out), self.ctx)
        self.record.vision_blocks[i] = self.tokens.n
        return self.tokens.hidden

    def _merger_in(self, mod, args, kw):
        t = self.session.vision.finish(self.tokens, self.ctx)
        ids, rows = t.units()
        self.kept_units = ids
        return (t.hidden[rows.reshape(-1)].reshape(-1, 4 * t.hidden.shape[-1]),), kw

    def _merger_out(self, mod, args, kw, out):
        full = out.new_zeros(self.layout.n_units, out.shape[-1])
        full[self.kept_units] = out
        self.record.vision_out = [int(self.kept_units.numel())]
        self.session.report.vision.append(self.record)
        return full
