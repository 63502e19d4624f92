"""adapters/_vision.check_finish with units whose patches are not consecutive in tower order (pixel shuffle)."""
import pytest
import torch

from tokcomp.errors import AdapterError
from tokcomp.tokens import VisionLayout, VisionTokens

from tokcomp.adapters._vision import check_finish


def _raster_layout(g=4):
    """One 4x4 tile in raster order: unit (i, j) = patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)."""
    units, grid = [], []
    for i in range(g // 2):
        for j in range(g // 2):
            r, c = 2 * i, 2 * j
            units.append([r * g + c, r * g + c + 1, (r + 1) * g + c, (r + 1) * g + c + 1])
            grid.append([0, i, j])
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return VisionLayout(g * g, 4, t([[1, g, g]]), t([0]), t(units), t([0] * len(units)), t(grid))


def _tokens(layout, keep_units):
    unit = torch.empty(layout.n_tokens, dtype=torch.long)
    for u, rows in enumerate(layout.unit_patches.tolist()):
        unit[rows] = u
    rows = torch.cat([layout.unit_patches[u] for u in keep_units]).sort().values
    n = layout.n_tokens
    full = VisionTokens(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n, dtype=torch.long),
                        torch.zeros(n, 3, dtype=torch.long), unit, torch.ones(n), torch.arange(n),
                        torch.zeros(n, dtype=torch.bool))
    return full.select(rows)


def test_units_spanning_two_patch_rows_are_accepted_and_grouped():
    layout = _raster_layout()
    done = check_finish(_tokens(layout, [3, 0, 2]), layout, "unit", "demo")
    assert done.units.tolist() == [0, 2, 3]
    got = done.tokens.origin[done.rows]
    assert torch.equal(got, layout.unit_patches[[0, 2, 3]])          # TL, TR, BL, BR of each kept unit


def test_partial_unit_is_refused():
    layout = _raster_layout()
    t = _tokens(layout, [0, 1])
    with pytest.raises(AdapterError, match="partial or mixed units|whole units"):
        check_finish(t.select(torch.arange(t.n - 1)), layout, "unit", "demo")
