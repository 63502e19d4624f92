"""Shared tensor kernels: pure functions on tensors, no model code.

Every kernel is device/dtype-agnostic, deterministic (ties by lower index) and documents
its tensor shapes.
"""

from .cluster import dpc_knn, merge_clusters
from .dart import dart_quotas, dart_select
from .knn import knn, knn_where, neighbor_guided_reconstruction, smallest_k, unique_rows
from .matching import (
    Match,
    bipartite_soft_matching,
    matching_per_segment,
    merge_mlerp,
    merge_weighted,
    prune_matched,
    r_schedule,
)
from .select import keep_count, segment_of, stable_order, topk_per_segment
from .spectral import lowpass_mask, lowpass_residual_energy

from .units import unit_features, unit_keep_rows, unit_match_rows

__all__ = [
    "unit_features",
    "unit_keep_rows",
    "unit_match_rows",
    "Match",
    "bipartite_soft_matching",
    "dart_quotas",
    "dart_select",
    "dpc_knn",
    "keep_count",
    "knn",
    "knn_where",
    "lowpass_mask",
    "lowpass_residual_energy",
    "matching_per_segment",
    "merge_clusters",
    "merge_mlerp",
    "merge_weighted",
    "neighbor_guided_reconstruction",
    "prune_matched",
    "r_schedule",
    "segment_of",
    "smallest_k",
    "stable_order",
    "topk_per_segment",
    "unique_rows",
]
