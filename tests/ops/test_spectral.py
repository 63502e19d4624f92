import math

import pytest
import torch

from tokcomp.ops.spectral import lowpass_mask, lowpass_residual_energy

torch.set_num_threads(1)


def dft_matrix(n):
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n)  # [n, n] complex128


def brute_residual_energy(grid, cutoff):
    """Explicit DFT by matrix products; mask from a plain loop over frequency indices."""
    h, w, _ = grid.shape
    x = grid.double().to(torch.complex128)
    fh, fw = dft_matrix(h), dft_matrix(w)
    spec = torch.einsum("uh,hwc,vw->uvc", fh, x, fw)
    mask = torch.zeros(h, w, dtype=torch.float64)
    for u in range(h):
        for v in range(w):
            fy = min(u, h - u) / h  # |frequency| in cycles per token
            fx = min(v, w - v) / w
            if 2 * math.sqrt(fy * fy + fx * fx) <= cutoff + 1e-12:
                mask[u, v] = 1.0
    spec = spec * mask[:, :, None]
    low = torch.einsum("uh,uvc,vw->hwc", fh.conj(), spec, fw.conj()) / (h * w)
    return ((grid.double() - low.real) ** 2).sum(-1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("h,w,c", [(1, 1, 3), (4, 4, 2), (5, 7, 3), (6, 9, 4), (8, 3, 1), (1, 6, 2)])
@pytest.mark.parametrize("cutoff", [0.0, 0.25, 0.5, 0.7, 1.0, 1.5])
def test_residual_energy_matches_explicit_dft(seed, h, w, c, cutoff):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(h, w, c, generator=g) + 2.0
    got = lowpass_residual_energy(grid, cutoff)
    assert got.shape == (h, w) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), brute_residual_energy(grid, cutoff), rtol=1e-4, atol=1e-4)


def test_residual_energy_limits_and_bf16():
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(6, 8, 5, generator=g)
    # cutoff 0 keeps only the mean: residual = x - mean over the grid
    want = ((grid - grid.mean((0, 1), keepdim=True)) ** 2).sum(-1)
    torch.testing.assert_close(lowpass_residual_energy(grid, 0.0), want, rtol=1e-5, atol=1e-5)
    # above sqrt(2) everything passes
    assert float(lowpass_residual_energy(grid, 1.5).abs().max()) < 1e-8
    # a constant grid has no high frequencies at any cutoff
    assert float(lowpass_residual_energy(torch.ones(5, 5, 3), 0.1).abs().max()) < 1e-10
    got16 = lowpass_residual_energy(grid.bfloat16(), 0.5)
    torch.testing.assert_close(got16, lowpass_residual_energy(grid.bfloat16().float(), 0.5))
    assert lowpass_residual_energy(torch.zeros(0, 4, 3), 0.5).shape == (0, 4)


def test_lowpass_mask_radial():
    m = lowpass_mask(8, 8, 0.5)
    assert m.shape == (8, 5)
    # radius 0.5 of Nyquist = 0.25 cycles/token = 2 bins on an 8-grid
    assert m[0, :3].all() and not m[0, 3] and m[2, 0] and m[6, 0] and not m[2, 1]
    assert lowpass_mask(4, 4, 0.0).sum() == 1
    assert lowpass_mask(4, 4, math.sqrt(2)).all()
