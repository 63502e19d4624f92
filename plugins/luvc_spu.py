"""LUVC-SPU, the Spectrum Pruning Unit of LUVC (Zheng et al., "Towards Lossless Ultimate Vision Token
Compression for VLMs", arXiv 2512.09010): progressive, attention-free LLM pruning by spatial frequency content.

NO REFERENCE CODE EXISTS. This is the project's interpretation of the published description ("an
attention/similarity-free low-pass filter that gradually prunes redundant visual tokens", cascaded over the LLM
layers "until complete elimination at the final layer"), see docs/methods/luvc_spu.md:

- At a stage, every image / video span of a row is placed on its (t, h, w) unit grid: current tokens at their
  cells (``VisualSpan.cells``), ZEROS at the cells of tokens already pruned. Each frame is low-pass filtered per
  channel with a 2-D FFT (radial ``cutoff`` as a fraction of Nyquist, periodic boundary;
  :func:`tokcomp.ops.spectral.lowpass_residual_energy`).
- A token's score is the energy the low-pass version misses at its cell, ``||x - lowpass(x)||^2``: tokens the
  smooth version explains well are redundant and dropped first; high-frequency detail survives longest.
- A row's stage budget is split over its spans in proportion to their current token counts (largest remainder,
  ties to the earlier span), so no image is starved by another image's energy scale.
- Cascade: ``stages`` prune points evenly spaced from ``start`` to the last layer, and by default the last layer
  sees zero visual tokens (``floor = 0``). The per-stage fractions follow ``plugins/_progressive.py``: between
  "floor everywhere", a linear ramp from the first stage down to the floor at the last one, "keep all but the last
  stage" and "keep all", so the layer-averaged count equals a one-shot K=2 pruner's. A budget above what a cascade
  ending at the floor can give raises the last stage just enough.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from tokcomp.config import LayerField
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.schedule import evenly_spaced
from tokcomp.ops.select import topk_per_segment
from tokcomp.ops.spectral import lowpass_residual_energy
from tokcomp.plugins._progressive import ProgressiveConfig, ProgressivePruner
from tokcomp.tokens import LLMContext, LLMStep, Selection, VisualSpan


class SPUConfig(ProgressiveConfig):
    """SPU (paper-only): default keep_ratio 0.5 is a project choice (the paper publishes no budget; it reports about
    2x faster LLM inference, i.e. roughly half the visual token-layers)."""

    default_keep_ratio: ClassVar[float] = 0.5

    start: int = LayerField(2, tower="llm", ge=1,
                            description="first stage: prune before this decoder layer (project choice: 2, FastV's K)")
    stages: int = Field(4, ge=1, le=256, description="prune points, evenly spaced from `start` to the last layer "
                                                     "(project choice)")
    floor: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the original visual tokens left for the last "
                                                          "layer (paper: 0, complete elimination)")
    cutoff: float = Field(0.5, ge=0.0, le=1.5, description="radial low-pass cutoff as a fraction of Nyquist "
                                                           "(project choice)")


def spectral_scores(hidden: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int, int],
                    cutoff: float) -> torch.Tensor:
    """High-frequency energy of each current token of one span.

    Args:
        hidden: Tensor[n, C] the span's current tokens.
        cells: LongTensor[n, 3] their (t, h, w) grid cells.
        grid: (t, h, w) the span's full unit grid.
        cutoff: radial cutoff (fraction of Nyquist).
    Returns:
        float32 Tensor[n]: ``||x - lowpass(x)||^2`` at each token's cell, where x is the frame's grid with zeros
        at empty (pruned) cells.
    """
    t, h, w = (int(v) for v in grid)
    n, c = hidden.shape
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    cells = cells.to(hidden.device)
    x = torch.zeros(t, h, w, c, dtype=torch.float32, device=hidden.device)
    x[cells[:, 0], cells[:, 1], cells[:, 2]] = hidden.float()
    energy = torch.zeros(t, h, w, dtype=torch.float32, device=hidden.device)
    for f in torch.unique(cells[:, 0]).tolist():
        energy[f] = lowpass_residual_energy(x[f], cutoff)
    return energy[cells[:, 0], cells[:, 1], cells[:, 2]]


def proportional_split(counts: list[int], total: int) -> list[int]:
    """Split ``total`` over groups in proportion to ``counts`` (largest remainder, ties to the lower index).

    Returns one int per group, each ``<= counts[j]``, summing to ``min(total, sum(counts))``."""
    s = sum(counts)
    if total >= s:
        return list(counts)
    base = [total * c // s for c in counts]
    rem = [total * c % s for c in counts]
    extra = total - sum(base)
    for j in sorted(range(len(counts)), key=lambda j: (-rem[j], j))[:extra]:
        base[j] += 1
    return base


class SPU(ProgressivePruner):
    """Cascade of spectral (FFT low-pass residual) pruning stages down to the floor at the last layer."""

    name = "luvc_spu"
    paper = "https://arxiv.org/abs/2512.09010"
    summary = ("LUVC-SPU (interpreted, no reference code): FFT low-pass over each image's grid, drops tokens it "
               "explains best, cascading to zero at the last layer")
    Config = SPUConfig
    needs_attention_rows = False
    needs_keys = False
    flash_compatible = True
    minimum = 0

    def default_layers(self, n_layers: int) -> list[int]:
        return evenly_spaced(self.config.start, n_layers, self.config.stages)

    def anchors(self, layers: list[int], n_layers: int) -> list[list[float]]:
        m, f = len(layers), self.config.floor
        ramp = [f + (1.0 - f) * (m - i) / m for i in range(1, m + 1)]
        return [[f] * m, ramp, [1.0] * (m - 1) + [f], [1.0] * m]

    def select(self, step: LLMStep, ctx: LLMContext) -> Selection:
        budgets = self.stage_budget(step, ctx)
        cutoff = self.config.cutoff
        keep = []
        with torch.no_grad():
            for b, budget in enumerate(budgets):
                spans: list[VisualSpan] = [s for s in step.spans[b] if s.positions.numel()]
                pos = step.visual[b].nonzero()[:, 0]
                if budget >= pos.numel() or not spans:  # nothing to drop (or nothing visual): no FFT
                    keep.append(pos if budget >= pos.numel() else pos[:0])
                    continue
                alloc = proportional_split([int(s.positions.numel()) for s in spans], min(budget, pos.numel()))
                dev = step.hidden.device
                span_pos = torch.cat([s.positions.to(dev) for s in spans])
                score = torch.cat([spectral_scores(step.hidden[b][s.positions.to(dev)], s.cells, s.grid, cutoff)
                                   for s in spans])
                seg = torch.cat([torch.full((int(s.positions.numel()),), j, dtype=torch.long, device=dev)
                                 for j, s in enumerate(spans)])
                chosen = topk_per_segment(score, seg, torch.tensor(alloc, dtype=torch.long, device=dev))
                keep.append(torch.sort(span_pos[chosen]).values.to(pos.device))
        return Selection(keep=keep)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(SPU)
