"""Visual spans of an LLM prompt: which columns of each row are visual, of which image, at which grid cell."""
from __future__ import annotations

import torch
from torch import Tensor

from tokcomp.tokens import VisualSpan

from ._repack import Repacked


def _runs(row: Tensor, token_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(token id, start, end)`` of the maximal runs of equal placeholder tokens in one row ``LongTensor[L]``."""
    is_vis = torch.isin(row, torch.tensor(token_ids, device=row.device))
    cols = is_vis.nonzero()[:, 0].tolist()
    vals = row[is_vis].tolist()
    runs: list[tuple[int, int, int]] = []
    for c, v in zip(cols, vals):
        if runs and runs[-1][0] == v and runs[-1][2] == c:
            runs[-1] = (v, runs[-1][1], c + 1)
        else:
            runs.append((v, c, c + 1))
    return runs


def _cells(grid: tuple[int, int, int], device) -> Tensor:
    """LongTensor[t*h*w, 3] (t, h, w) cells of a unit grid in raster (placeholder) order."""
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], -1).to(device)


def new_columns(rp: Repacked, length: int) -> Tensor:
    """LongTensor[B, L] new column of every original column after :func:`left_repack` (-1: dropped)."""
    b, new_len = rp.index.shape
    out = torch.full((b, length), -1, dtype=torch.long, device=rp.index.device)
    rows = torch.arange(b, device=rp.index.device)[:, None].expand(-1, new_len)
    cols = torch.arange(new_len, device=rp.index.device).expand(b, -1)
    out[rows[rp.valid], rp.index[rp.valid]] = cols[rp.valid]
    return out


def visual_spans(input_ids: Tensor, grids: dict[int, list[tuple[int, int, int]]], keep: Tensor | None = None,
                 repacked: Repacked | None = None) -> list[list[VisualSpan]]:
    """One :class:`VisualSpan` per image / video per row.

    Args:
        input_ids: LongTensor[B, L] the ORIGINAL prompt (every placeholder present).
        grids: ``{placeholder token id: [(t, h, w) unit grid of each item, in order of appearance]}``; items of
            one id are numbered row-major over the batch (the processor's order). A run of consecutive equal
            placeholders is one item and has ``t*h*w`` tokens.
        keep: BoolTensor[B, L] surviving tokens (None: all), with ``repacked`` the re-padding they went through.
    Returns:
        ``spans[b]``: the row's items in order; ``positions`` are columns of the (re-packed) prompt and ``cells``
        the original grid cells of the surviving tokens.
    """
    b_size, length = input_ids.shape
    cols = new_columns(repacked, length) if repacked is not None else None
    iters = {tok: iter(g) for tok, g in grids.items()}
    spans: list[list[VisualSpan]] = []
    for b in range(b_size):
        row_spans = []
        for tok, start, end in _runs(input_ids[b], list(grids)):
            try:
                grid = next(iters[tok])
            except StopIteration:
                raise ValueError(f"more runs of placeholder {tok} than grids") from None
            n = end - start
            if grid[0] * grid[1] * grid[2] != n:
                raise ValueError(f"a run of {n} placeholders {tok} does not match its grid {grid}")
            cells = _cells(grid, input_ids.device)
            pos = torch.arange(start, end, device=input_ids.device)
            if keep is not None:
                k = keep[b, start:end].to(input_ids.device)
                cells, pos = cells[k], pos[k]
                if cols is not None:
                    pos = cols[b, pos]
            row_spans.append(VisualSpan(row=b, positions=pos, grid=grid, cells=cells))
        spans.append(row_spans)
    return spans
