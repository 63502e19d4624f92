"""Spatial low-pass filtering of a token grid (LUVC-SPU, the project's interpretation).

LUVC has no public code; see DESIGN.md section 3. A token's score is the energy of what a
radial low-pass version of the grid fails to explain (its high-frequency content).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lowpass_mask", "lowpass_residual_energy"]


def lowpass_mask(h: int, w: int, cutoff: float, *, device=None) -> Tensor:
    """Radial low-pass mask for ``rfft2`` spectra: BoolTensor[H, W//2 + 1].

    Frequency ``(fy, fx)`` in cycles/token (``|f| <= 0.5``, Nyquist = 0.5) passes when
    ``2 * sqrt(fy^2 + fx^2) <= cutoff``, i.e. ``cutoff`` is the radius as a fraction of
    Nyquist: 0 keeps only the mean (DC), ``>= sqrt(2)`` keeps everything.
    """
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)
    rho = 2.0 * torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return rho <= cutoff + 1e-12


def lowpass_residual_energy(grid: Tensor, cutoff: float) -> Tensor:
    """Per-token energy of the high-pass residual of a 2-D token grid.

    Args:
        grid: [H, W, C] tokens on their spatial grid (any float dtype; float32 internally).
        cutoff: radial cutoff as a fraction of Nyquist (see :func:`lowpass_mask`).
    Returns:
        float32 [H, W]: ``||x - lowpass(x)||^2`` over channels, where ``lowpass`` zeroes
        every 2-D DFT coefficient (per channel, periodic boundary) above the cutoff.
    """
    h, w, _ = grid.shape
    x = grid.float()
    if h == 0 or w == 0:
        return x.new_zeros(h, w)
    spec = torch.fft.rfft2(x, dim=(0, 1))  # [H, W//2+1, C]
    mask = lowpass_mask(h, w, cutoff, device=x.device)
    low = torch.fft.irfft2(spec * mask[:, :, None], s=(h, w), dim=(0, 1))
    return ((x - low) ** 2).sum(-1)
