"""IPCV: Information-Preserving Compression for MLLM Visual encoders (Chen, Wen, ..., Zhang; arXiv 2512.18747).

Inside the vision tower, at ``prune_layer`` P:

1. **Score** every patch by the update magnitude of block P-1, ``||h_P - h_{P-1}||_2`` (output minus input of
   block P-1), and keep the top-K patches of every attention segment (image, video frame, InternVL tile). CLS
   tokens are always kept and never scored; every segment keeps at least one patch.
2. **Neighbor-Guided Reconstruction (NGR, Eq. 3-5):** each pruned token's ``k`` nearest kept patches (L2 at the
   pruning layer, same segment) are fixed once; later, a pruned token is rebuilt as its pruning-time state plus the
   mean drift of those neighbours since pruning.
3. **Attention Stabilization (AS):** for ``stabilize_layers`` blocks after pruning, the kept tokens (the only
   queries) attend to kept + NGR-reconstructed tokens (``BlockVariant.extra_kv``); the MLP runs on kept tokens only.
4. **Reintegration:** after the last block, NGR rebuilds every pruned token and the full grid (each original token
   exactly once, in the original order) goes to the merger. The LLM sees every visual token.

Deviation from the reference code, on purpose: top-K and kNN are per segment (the reference does a global top-K over
all frames of a call, which can empty a frame, and a cross-tile kNN on InternVL), so the result for an image does not
depend on what else is in the batch (row b of a batch == the same prompt alone) and no image's features leak into
another's. The reference's ``searchsorted(right=False)`` frame-boundary bug has no counterpart here: segments are
carried per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from tokcomp.config import LayerField, StrategyConfig
from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.knn import knn, neighbor_average, neighbor_guided_reconstruction
from tokcomp.ops.select import topk_per_segment
from tokcomp.strategy import ViTCompressor
from tokcomp.tokens import BlockVariant, VisionContext, VisionTokens


class IPCVConfig(StrategyConfig):
    """IPCV's fields. ``keep_ratio`` (default 0.35, i.e. the paper's r_v = 0.65) is the fraction of patches of each
    segment kept through the blocks after ``prune_layer``; ``num_tokens`` is a patch count per segment."""

    default_keep_ratio: ClassVar[float] = 0.35

    prune_layer: int | None = LayerField(
        None, tower="vision", ge=1,
        description="prune before this vision block P, scoring with the input and output of block P-1 "
                    "(>= 1; None: the paper default of the model family, Qwen2-VL 3, InternVL3 7)")
    stabilize_layers: int | None = Field(
        None, ge=0,
        description="number of Attention Stabilization blocks from P on (None: the paper default of the model "
                    "family, Qwen2-VL 7, InternVL3 3); clipped at the last block")
    neighbors: int = Field(10, ge=1, description="k of the kNN used by Neighbor-Guided Reconstruction (paper: 10)")
    stabilize: bool = Field(True, description="run Attention Stabilization (False: plain pruned blocks)")
    reintegrate: bool = Field(
        True, description="rebuild pruned tokens by NGR after the last block (False: each pruned token becomes a "
                          "copy of its nearest kept token's final state)")


@dataclass
class _Pruned:
    """What IPCV remembers between pruning and ``finish`` (lives in ``ctx.state``).

    removed: the pruned tokens with their pruning-time states (H0) and metadata, R rows.
    nb: LongTensor[M] rows of the candidate neighbours (kept, non-CLS) in the kept token set.
    h0_nb: Tensor[M, C] the neighbours' pruning-time states.
    nn: LongTensor[R, k] neighbour indices into ``nb`` (nearest first; -1 = none).
    n_kept: rows of the kept token set (sanity check).
    average: the NGR averaging operator of ``nn`` (built once, used by every stabilised block and ``finish``).
    """

    removed: VisionTokens
    nb: Tensor
    h0_nb: Tensor
    nn: Tensor
    n_kept: int
    average: Tensor | None = None


def update_score(h_out: Tensor, h_in: Tensor) -> Tensor:
    """IPCV's score: ``||h_out - h_in||_2`` per token, float32. ``h_out``, ``h_in``: [N, C] -> [N]."""
    return (h_out.float() - h_in.float()).norm(dim=-1)


def keep_mask(score: Tensor, segment: Tensor, cls: Tensor, k_per_segment: Tensor) -> Tensor:
    """Tokens kept at the pruning layer: every CLS, plus the top ``k_s`` non-CLS scores of each segment.

    Args:
        score: [N] float; segment: LongTensor[N] in ``[0, S)``; cls: BoolTensor[N];
        k_per_segment: LongTensor[S] patches kept per segment (ties: lower row wins).
    Returns:
        BoolTensor[N].
    """
    patches = (~cls).nonzero().squeeze(1)
    chosen = patches[topk_per_segment(score[patches], segment[patches], k_per_segment)]
    keep = cls.clone()
    keep[chosen] = True
    return keep


def ngr(removed_h0: Tensor, h_nb_now: Tensor, h0_nb: Tensor, nn: Tensor, average: Tensor | None = None) -> Tensor:
    """NGR (Eq. 3-5): ``removed_h0 + mean_j (h_nb_now - h0_nb)[nn[:, j]]``; [R, C], [M, C], [M, C], [R, k] -> [R, C]."""
    return neighbor_guided_reconstruction(removed_h0, h_nb_now - h0_nb, nn, average)


class IPCV(ViTCompressor):
    """IPCV (see the module docstring). Patch granularity: ``finish`` returns the full grid."""

    name = "ipcv"
    paper = "https://arxiv.org/abs/2512.18747"
    summary = ("prune ViT patches by update magnitude, keep the pruned ones alive by neighbour-guided "
               "reconstruction, restore the full grid before the merger")
    granularity = "patch"
    Config = IPCVConfig
    examples = ({"prune_layer": 2},)             # the family defaults (3 / 7) need deeper towers than the tiny ones

    #: paper defaults per adapter family (``ctx.family``), used where a field is None; other families get
    #: ``defaults[fallback_family]``. Sources: the IPCV repository's eval scripts (Qwen2-VL/eval_scripts/
    #: lmms_eval_multi.sh: 3 / 7; InternVL2/eval_scripts/lmms_eval_multi.sh for InternVL3: 7 / 3).
    defaults: ClassVar[dict[str, dict[str, int]]] = {
        "qwen2_vl": {"prune_layer": 3, "stabilize_layers": 7},
        "internvl": {"prune_layer": 7, "stabilize_layers": 3},
    }
    fallback_family: ClassVar[str] = "qwen2_vl"

    _KEY: ClassVar[str] = "ipcv"

    # -- configuration ----------------------------------------------------------------------------------
    def validate(self, depths: dict[str, int], family: str = "") -> None:
        """Also check the family's default ``prune_layer`` against the tower, when the session is built."""
        super().validate(depths, family)
        if not self.config.is_noop_budget and "vision" in depths:
            self.resolve(VisionContext(layout=None, depth=depths["vision"], family=family))  # type: ignore[arg-type]

    def resolve(self, ctx: VisionContext) -> tuple[int, int]:
        """``(prune_layer, stabilize_layers)`` for this tower: config values, or the family's paper defaults."""
        fam = self.defaults.get(ctx.family, self.defaults[self.fallback_family])
        p = self.config.prune_layer if self.config.prune_layer is not None else fam["prune_layer"]
        a = self.config.stabilize_layers if self.config.stabilize_layers is not None else fam["stabilize_layers"]
        if not 1 <= p < ctx.depth:
            origin = ("the configured value" if self.config.prune_layer is not None
                      else f"the paper default for family {ctx.family or self.fallback_family!r}")
            raise ConfigError(f"ipcv: prune_layer={p} ({origin}) is out of range for this vision tower with "
                              f"{ctx.depth} blocks (valid 1..{ctx.depth - 1}); "
                              f"fix: pass prune_layer=<1..{ctx.depth - 1}>")
        return p, a

    def _k_per_segment(self, tokens: VisionTokens, ctx: VisionContext) -> Tensor:
        n_seg = max(ctx.layout.n_segments, int(tokens.segment.max()) + 1 if tokens.n else 0)
        counts = torch.bincount(tokens.segment[~tokens.cls], minlength=n_seg).tolist()
        return torch.tensor([self.config.keep_count(n) for n in counts], dtype=torch.long,
                            device=tokens.segment.device)

    # -- callbacks --------------------------------------------------------------------------------------
    def start(self, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        if not self.config.is_noop_budget:
            self.resolve(ctx)  # fail before block 0 if the layer does not fit the tower
        return tokens

    def block_variant(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> BlockVariant | None:
        if self.config.is_noop_budget:
            return None
        p, a = self.resolve(ctx)
        if i == p - 1:
            ctx.state[self._KEY + ".h_in"] = tokens.hidden  # input of block P-1 (blocks never modify it in place)
            return None
        st: _Pruned | None = ctx.state.get(self._KEY)
        if st is None or not self.config.stabilize or not p <= i < p + a:
            return None
        return BlockVariant(extra_kv=self._reconstructed(tokens, st))

    def after_block(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        if self.config.is_noop_budget:
            return tokens
        p, _ = self.resolve(ctx)
        if i != p - 1:
            return tokens
        h_in = ctx.state.pop(self._KEY + ".h_in")
        keep = keep_mask(update_score(tokens.hidden, h_in), tokens.segment, tokens.cls,
                         self._k_per_segment(tokens, ctx))
        if bool(keep.all()):
            return tokens  # nothing pruned (budget keeps every patch): exact no-op
        kept, removed = tokens.select(keep), tokens.select(~keep)
        nb = (~kept.cls).nonzero().squeeze(1)  # CLS is no spatial neighbour
        nn = knn(removed.hidden, kept.hidden[nb], self.config.neighbors,
                 query_group=removed.segment, key_group=kept.segment[nb])
        ctx.state[self._KEY] = _Pruned(removed, nb, kept.hidden[nb], nn, kept.n,
                                       neighbor_average(nn.to(kept.hidden.device), nb.numel()))
        return kept

    def finish(self, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        st: _Pruned | None = ctx.state.get(self._KEY)
        if st is None:
            return tokens
        if self.config.reintegrate:
            restored = self._reconstructed(tokens, st)
        else:  # plain pruning with nearest-kept restoration
            first = st.nn[:, 0]
            rows = st.nb[first.clamp_min(0)]
            restored = st.removed.with_hidden(tokens.hidden[rows.to(tokens.hidden.device)])
        full = VisionTokens.cat([tokens, restored])
        return full.select(torch.argsort(full.origin))

    # -- helpers ----------------------------------------------------------------------------------------
    @staticmethod
    def _reconstructed(tokens: VisionTokens, st: _Pruned) -> VisionTokens:
        """The pruned tokens rebuilt by NGR from the kept tokens' current states (``tokens``, the kept set)."""
        if tokens.n != st.n_kept:
            raise RuntimeError(f"ipcv: the kept token set changed size ({st.n_kept} -> {tokens.n}) after pruning; "
                               "IPCV must be the only compressor acting on the tower")
        nb_rows = st.nb.to(tokens.hidden.device)
        return st.removed.with_hidden(ngr(st.removed.hidden, tokens.hidden[nb_rows], st.h0_nb, st.nn, st.average))


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(IPCV)
