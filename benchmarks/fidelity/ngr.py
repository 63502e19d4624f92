"""The claim behind IPCV's Neighbor-Guided Reconstruction, measured on the unmodified encoder.

IPCV prunes patches at block P (top-K of ``||h_P - h_{P-1}||``) and later rebuilds a pruned token as its pruning-time
state plus the mean *drift* of its k nearest kept tokens (L2 at block P). That rests on one claim: a pruned token's
drift ``h_L - h_P`` is predicted by the mean drift of its feature-space neighbours among the kept tokens better
than by other kept tokens. Here every drift is the unmodified model's own (no compression anywhere), so this
isolates the claim from the rest of the method:

* predictors of a pruned token's drift ``d_j``: the mean drift of its k nearest kept tokens (**NGR**), of k random
  kept tokens, of its k spatially nearest kept patches, of its single nearest kept token, of all kept tokens, and
  zero drift (the token frozen at block P);
* reported per predictor: mean relative error ``||d_j - pred|| / ||d_j||`` and mean cosine ``cos(d_j, pred)``;
* the final features those predictions give (after the final layer norm) against the model's true final features,
  next to copying the final state of the nearest kept token (feature space at block P, or on the grid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.ops.knn import knn

PREDICTORS = ("ngr_knn", "random_k", "spatial_k", "nearest_1", "all_kept", "zero")
RECONSTRUCTIONS = ("ngr", "copy_feature_nearest", "copy_spatial_nearest", "frozen")


@torch.no_grad()
def hidden_path(model, pixel_values: Tensor) -> tuple[Tensor, ...]:
    """The unmodified model's residual stream: ``hidden_states[i]`` = input of block i, ``[-1]`` = last block's
    output (before the final layer norm). Each [B, 1 + h*w, C]."""
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states


def _spatial_knn(pruned: Tensor, kept: Tensor, w: int, k: int) -> Tensor:
    """k nearest kept patches on the grid (squared distance, ties to the lower index): [R] x [K] -> [R, k]."""
    pos = lambda i: torch.stack([i // w, i % w], -1).float()  # noqa: E731
    return knn(pos(pruned), pos(kept), k)


def _mean_rows(x: Tensor, idx: Tensor) -> Tensor:
    """Mean of ``x[idx[r]]`` per row: x [K, C], idx [R, k] -> [R, C]."""
    return x[idx].mean(1)


@torch.no_grad()
def ngr_claim(model, pixel_values: Tensor, ratios: list[float], prune_layer: int = 3, k: int = 10,
              seed: int = 0) -> dict:
    """Measure the NGR claim on every image of ``pixel_values`` for every keep ratio (see the module docstring).

    Returns ``{"per_ratio": {r: {"drift": {predictor: {"rel_err", "cos"}}, "final_cos": {reconstruction: cos}}},
    "per_photo": {r: [..per image..]}, "prune_layer", "k"}`` with means over the pruned tokens of each image, then
    over images."""
    hs = hidden_path(model, pixel_values)
    h_prev, h_p, h_last = hs[prune_layer - 1], hs[prune_layer], hs[-1]
    final_ref = model.layernorm(h_last)
    B, n1, C = h_p.shape
    hw = n1 - 1
    w = int(round(hw ** 0.5))
    gen = torch.Generator().manual_seed(seed)
    result: dict = {"prune_layer": prune_layer, "k": k, "per_ratio": {}, "per_photo": {}}
    for r in ratios:
        photos = []
        for b in range(B):
            score = (h_p[b, 1:].float() - h_prev[b, 1:].float()).norm(dim=-1)
            n_keep = max(1, int(round(hw * r)))
            order = torch.sort(score, descending=True, stable=True).indices
            kept, pruned = order[:n_keep].sort().values, order[n_keep:].sort().values
            P0, PL = h_p[b, 1:], h_last[b, 1:]
            drift = PL - P0                                                   # [hw, C]
            d_true = drift[pruned]
            nn = knn(P0[pruned], P0[kept], k)                                 # [R, k] into kept
            rand = torch.stack([torch.randperm(n_keep, generator=gen)[:min(k, n_keep)] for _ in range(len(pruned))])
            sp = _spatial_knn(pruned, kept, w, min(k, n_keep))
            dk = drift[kept]
            preds = {
                "ngr_knn": _mean_rows(dk, nn),
                "random_k": _mean_rows(dk, rand),
                "spatial_k": _mean_rows(dk, sp),
                "nearest_1": dk[nn[:, 0]],
                "all_kept": dk.mean(0, keepdim=True).expand_as(d_true),
                "zero": torch.zeros_like(d_true),
            }
            norm = d_true.norm(dim=-1).clamp_min(1e-12)
            drift_m, errs = {}, {}
            for name, p in preds.items():
                errs[name] = (d_true - p).norm(dim=-1) / norm
                cos = F.cosine_similarity(d_true, p, dim=-1).mean().item() if name != "zero" else float("nan")
                drift_m[name] = {"rel_err": errs[name].mean().item(), "cos": cos}
            # token-level win rates of NGR's neighbours
            wins = {f"ngr_beats_{o}": (errs["ngr_knn"] < errs[o]).float().mean().item()
                    for o in ("random_k", "spatial_k", "nearest_1", "all_kept")}
            ln = model.layernorm
            truth = final_ref[b, 1:][pruned]
            recon = {
                "ngr": ln(P0[pruned] + preds["ngr_knn"]),
                "copy_feature_nearest": final_ref[b, 1:][kept[nn[:, 0]]],
                "copy_spatial_nearest": final_ref[b, 1:][kept[sp[:, 0]]],
                "frozen": ln(P0[pruned]),
            }
            final_m = {name: F.cosine_similarity(truth, v, dim=-1).mean().item() for name, v in recon.items()}
            photos.append({"drift": drift_m, "final_cos": final_m, "wins": wins, "pruned": int(len(pruned))})
        result["per_photo"][r] = photos
        result["per_ratio"][r] = {
            "drift": {p: {m: sum(ph["drift"][p][m] for ph in photos) / len(photos) for m in ("rel_err", "cos")}
                      for p in PREDICTORS},
            "final_cos": {q: sum(ph["final_cos"][q] for ph in photos) / len(photos) for q in RECONSTRUCTIONS},
            # fraction of pruned tokens whose drift NGR's neighbours predict better than the other predictor
            "token_wins": {w_: sum(ph["wins"][w_] for ph in photos) / len(photos) for w_ in photos[0]["wins"]},
            # fraction of photos where NGR's mean error is below random neighbours'
            "photo_wins_vs_random": sum(ph["drift"]["ngr_knn"]["rel_err"] < ph["drift"]["random_k"]["rel_err"]
                                        for ph in photos) / len(photos),
        }
    return result
