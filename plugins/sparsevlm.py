"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML'25; code ``Gumpest/SparseVLMs`` v1.5): progressive, text-guided LLM pruning with recycling.

1. Text raters, once per prefill, from the layer-0 input embeddings: with V the row's visual embeddings and T
   the text tokens after the row's first visual token, ``s = softmax(V @ T^T over T).mean over V``; the raters
   are the text tokens with ``s > mean(s)`` (raw dot products, as the reference).
2. At each stage (after layer ``l - 1``, i.e. on that layer's OUTPUT, so its own KV cache stays full), every
   visual token is scored by the rater -> visual attention of layer ``l - 1``, averaged over heads and raters.
   The adapter serves the rows of every text query (``attention_queries == "text"``); only rater rows are used.
3. The best-scored visual tokens are kept. With ``recycle`` the best ``recycle_fraction`` of the dropped ones
   (``int(0.3 * |dropped|) + 1``) are clustered by density peaks (DPC-kNN, ``int(p / cluster_size) + 1`` clusters)
   and each cluster's mean hidden state replaces the hidden state of its centre token, which stays at its
   original position (the reference appends merged tokens after the kept ones and renumbers positions).

Budget (``count="schedule"``, default): stages before layers {3, 7, 16} of 32 (the reference's ``pruning_loc =
[2, 6, 15]``, which prunes the OUTPUT of those layers), scaled to the depth. The v1.5 fixed schedules (``score.py``,
of 576 visual tokens: "192" -> 300/200/110, "128" -> 303/110/36, "96" -> 238/48/26, "64" -> 66/30/17) are the
anchors of the budget interpolation in ``plugins/_progressive.py``; the default keep_ratio (≈0.3088) reproduces the
"192" schedule on a 32-layer LLM.

``count="rank"`` is the paper's (and v1.0's, commit ``91fb6d9``) rank-adaptive count instead: stages before layers
{3, 7, 16, 20} of 32 (v1.0's ``pruning_loc = [2, 6, 15, 19]``), and at each stage, with ``R`` the head-averaged
attention of the raters over the row's current visual tokens, ``n_keep = min(int(rank(R) * rank_scale +
rank_bias), n - 1)`` (v1.0: scale 13.5, bias 0; ``torch.linalg.matrix_rank`` with its default tolerance); a stage
where ``rank(R) == n`` keeps everything and recycles nothing. No keep_ratio applies: the count follows the image.

``recycled="inside"`` (default): recycled tokens count toward a stage's count, so the achieved counts equal the
schedule exactly. ``recycled="extra"``: as the official code, the top ``n_keep`` are kept and the recycled cluster
tokens come on top (v1.5 at 576 tokens: 309 / 204 / 113 instead of 300 / 200 / 110).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tokcomp.hookspecs import hookimpl
from tokcomp.ops.cluster import dpc_knn, merge_clusters
from tokcomp.ops.schedule import scale_layers
from tokcomp.ops.select import stable_order
from tokcomp.plugins._progressive import ProgressiveConfig, ProgressivePruner, paper_keep_ratio, scaled_paper_anchors
from tokcomp.plugins._rows import text_after_first_visual
from tokcomp.tokens import LLMContext, LLMStep, Selection

PAPER_DEPTH = 32
#: pruning_loc [2, 6, 15] prunes after those layers = before 3, 7, 16
PAPER_LAYERS = (3, 7, 16)
#: v1.5 fixed budgets (score.py) as fractions of LLaVA's 576 visual tokens, keyed by RETAIN_TOKN
PAPER_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
PAPER_FRACTIONS = [tuple(v / 576 for v in s) for s in PAPER_SCHEDULES.values()]
#: v1.0 (rank-adaptive) pruning_loc [2, 6, 15, 19] prunes after those layers = before 4 stages
RANK_LAYERS = (3, 7, 16, 20)


class SparseVLMConfig(ProgressiveConfig):
    """SparseVLM: budget matched to a one-shot K=2 pruner (default: the v1.5 "192" schedule), or ``schedule``."""

    default_keep_ratio: ClassVar[float] = paper_keep_ratio(PAPER_LAYERS, PAPER_FRACTIONS[0], PAPER_DEPTH)

    recycle: bool = Field(True, description="merge the best dropped tokens into a few cluster tokens (v1.x)")
    recycle_fraction: float = Field(0.3, gt=0.0, le=1.0,
                                    description="share of the dropped tokens (best scores first) that is recycled "
                                                "(reference: 0.3)")
    cluster_size: int = Field(10, ge=1, description="recycled tokens per cluster: int(p / cluster_size) + 1 "
                                                    "clusters (reference: 10)")
    recycled: Literal["inside", "extra"] = Field(
        "inside", description="'inside': recycled cluster tokens count toward the stage's count (achieved = schedule); "
                              "'extra': they come on top of it, as the official code")
    count: Literal["schedule", "rank"] = Field(
        "schedule", description="'schedule': v1.5's fixed schedules fitted to the budget; 'rank': v1.0's rank-adaptive "
                                "count min(int(rank(R) * rank_scale + rank_bias), n - 1) at v1.0's layers (no budget)")
    rank_scale: float = Field(13.5, gt=0.0, description="count='rank': tokens kept per unit of rank (v1.0: 13.5)")
    rank_bias: float = Field(0.0, description="count='rank': added to rank * rank_scale (v1.0: 0)")

    @model_validator(mode="after")
    def _rank_has_no_budget(self):
        if self.count == "rank" and ({"keep_ratio", "num_tokens", "schedule"} & self.model_fields_set):
            raise ValueError("count='rank' sets each stage's count from the attention rank; it takes no keep_ratio, "
                             "num_tokens or schedule; fix: drop them, or use count='schedule'")
        return self


def rank_count(relation: torch.Tensor, scale: float = 13.5, bias: float = 0.0) -> int:
    """SparseVLM v1.0's rank-adaptive count for one row (``score.py:attn_postprocess_rank``).

    Args:
        relation: Tensor[R, n] head-averaged attention of the R raters over the n current visual tokens.
    Returns:
        ``n`` when ``rank(relation) == n`` (no pruning), else ``min(int(rank * scale + bias), n - 1)`` clamped at 0;
        the rank is ``torch.linalg.matrix_rank`` in float32 with its default tolerance, as the reference.
    """
    n = relation.shape[-1]
    if n == 0 or relation.shape[0] == 0:
        return n
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if rank == n:
        return n
    return max(0, min(int(rank * scale + bias), n - 1))


def text_raters(visual: torch.Tensor, text: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """SparseVLM's text raters of one row.

    Args:
        visual: Tensor[V, D] layer-0 embeddings of the row's visual tokens.
        text: Tensor[T, D] layer-0 embeddings of the text tokens after the first visual token.
    Returns:
        BoolTensor[T]: ``s > s.mean()`` with ``s = softmax(visual @ text^T, dim=T).mean(0)`` (float32, chunked
        over V so memory stays O(chunk * T)).
    """
    n_t = text.shape[0]
    if n_t == 0 or visual.shape[0] == 0:
        return torch.zeros(n_t, dtype=torch.bool, device=text.device)
    t = text.float()
    acc = torch.zeros(n_t, dtype=torch.float32, device=text.device)
    for s in range(0, visual.shape[0], chunk):
        acc += (visual[s:s + chunk].float().to(t.device) @ t.T).softmax(-1).sum(0)
    score = acc / visual.shape[0]
    return score > score.mean()


def recycle_select(score: torch.Tensor, n_keep: int, hidden: torch.Tensor | None, fraction: float = 0.3,
                   cluster_size: int = 10, extra: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-scored tokens plus recycled cluster tokens for one row.

    Args:
        score: Tensor[n] scores of the row's current visual tokens.
        n_keep: the stage's count, clamped to ``[0, n]``: tokens after this stage, recycled included (``extra``
            False), or top-scored tokens kept with the recycled ones on top (``extra`` True, the official code).
        hidden: Tensor[n, D] their hidden states, or None (no recycling).
        fraction / cluster_size: recycling parameters (module docstring).
    Returns:
        ``(kept LongTensor[k], centres LongTensor[c], merged Tensor[c, D] or None)``; indices into the n tokens,
        ``kept`` ascending. With m = n - n_keep nominally dropped tokens: ``p = min(int(fraction * m) + 1, m)``,
        ``c = min(int(p / cluster_size) + 1, p)`` (and at most ``n_keep`` when not ``extra``). Not ``extra``: the
        top ``k = n_keep - c`` are kept and the best ``p`` of the rest are recycled; ``extra``: the top ``k =
        n_keep`` are kept and the best ``p`` of the m dropped ones are recycled (``n_keep + c`` in all). Recycled
        tokens (score order, ties by lower index) are clustered with ``dpc_knn(k = c)`` and merged by mean, each
        cluster in the slot of its centre (one cluster: in the slot of the best-scored one; DPC's centre would be a
        tie there).
    """
    n = score.shape[0]
    n_keep = max(0, min(int(n_keep), n))
    order = stable_order(score)
    empty = order[:0]
    m = n - n_keep
    if hidden is None or m == 0 or (n_keep == 0 and not extra):
        return torch.sort(order[:n_keep]).values, empty, None
    p = min(int(fraction * m) + 1, m)
    c = min(p // cluster_size + 1, p) if extra else min(p // cluster_size + 1, p, n_keep)
    top = n_keep if extra else n_keep - c
    pool = order[top:][:p]
    x = hidden.index_select(0, pool.to(hidden.device))
    if c == 1:  # one cluster: DPC's k=1 density is constant and its centre a tie; take the best-scored token
        return torch.sort(order[:top]).values, pool[:1], merge_clusters(x, torch.zeros_like(pool), 1)
    centers, assign = dpc_knn(x, c, c)
    merged = merge_clusters(x, assign, c)
    return torch.sort(order[:top]).values, pool[centers.to(pool.device)], merged


class SparseVLM(ProgressivePruner):
    """Text-rater attention at a layer schedule, with recycling of the best pruned tokens."""

    name = "sparsevlm"
    paper = "https://arxiv.org/abs/2410.04417"
    summary = "progressive: text-rater attention ranks visual tokens; best dropped ones recycled into merged tokens"
    Config = SparseVLMConfig
    needs_attention_rows = True
    needs_keys = False
    flash_compatible = True  # rater rows are computed beside the kernel, only at the prune layers
    minimum = 1

    _RATERS = "sparsevlm.raters"  # ctx key: per row, LongTensor of the raters' original indices

    def default_layers(self, n_layers: int) -> list[int]:
        layers = RANK_LAYERS if self.config.count == "rank" else PAPER_LAYERS
        return scale_layers(layers, PAPER_DEPTH, n_layers)

    def anchors(self, layers: list[int], n_layers: int) -> list[list[float]]:
        return scaled_paper_anchors(layers, PAPER_FRACTIONS)

    def attention_queries(self, layer: int) -> str | None:
        return "text"           # asked only at the prune points: every stage rates with the text rows

    # -- raters -------------------------------------------------------------------------------------------
    @staticmethod
    def _index(step: LLMStep) -> torch.Tensor:
        if step.embeds_index is not None:
            return step.embeds_index
        return torch.arange(step.visual.shape[1], device=step.visual.device).expand(step.visual.shape[0], -1)

    def raters(self, step: LLMStep, ctx: LLMContext) -> list[torch.Tensor]:
        """Per row, the original indices of the text raters (computed once per prefill, kept in ``ctx.state``)."""
        if self._RATERS in ctx.state:
            return ctx.state[self._RATERS]
        if step.embeds is None:
            raise ValueError("sparsevlm needs the layer-0 input embeddings (step.embeds is None)")
        index = self._index(step)
        out = []
        with torch.no_grad():
            for b in range(step.visual.shape[0]):
                vis = index[b, step.visual[b].nonzero()[:, 0]]
                txt = index[b, text_after_first_visual(step.visual[b], step.valid[b])]
                emb = step.embeds[b]
                mask = text_raters(emb[vis.to(emb.device)], emb[txt.to(emb.device)])
                out.append(txt[mask.to(txt.device)])
        ctx.state[self._RATERS] = out
        return out

    def rater_rows(self, step: LLMStep, ctx: LLMContext, b: int) -> torch.Tensor:
        """Row ``b``'s indices into ``step.queries[b]`` (R) of rater queries, each position once; all distinct
        query rows if the row has no rater among them."""
        q = step.queries[b]
        first = torch.ones_like(q, dtype=torch.bool)
        if q.numel() > 1:  # padded query lists repeat positions: use each position once
            _, inv = torch.unique(q, return_inverse=True)
            seen = torch.full((int(inv.max()) + 1,), q.numel(), dtype=torch.long, device=q.device)
            seen.scatter_reduce_(0, inv, torch.arange(q.numel(), device=q.device), reduce="amin")
            first = seen[inv] == torch.arange(q.numel(), device=q.device)
        orig = self._index(step)[b, q]
        is_rater = torch.isin(orig, self.raters(step, ctx)[b].to(orig.device)) & first
        return is_rater.nonzero()[:, 0] if bool(is_rater.any()) else first.nonzero()[:, 0]

    # -- selection ----------------------------------------------------------------------------------------
    def select(self, step: LLMStep, ctx: LLMContext) -> Selection:
        if step.attn is None or step.queries is None:
            raise ValueError("sparsevlm needs attention rows of the text queries (step.attn is None); the adapter "
                             "must serve attention_queries(layer) == 'text'")
        cfg = self.config
        rank = cfg.count == "rank"
        budgets = [None] * step.visual.shape[0] if rank else self.stage_budget(step, ctx)
        keep, replace = [], []
        with torch.no_grad():
            self.raters(step, ctx)
            for b, budget in enumerate(budgets):
                pos = step.visual[b].nonzero()[:, 0]
                rows = self.rater_rows(step, ctx, b)
                if rows.numel():
                    relation = step.attn[b][:, rows.to(step.attn.device)].float().mean(0)          # [R, L]
                    score = relation.mean(0)
                else:
                    relation = None
                    score = torch.zeros(step.visual.shape[1], device=step.attn.device)
                vis_score = score[pos.to(score.device)]
                if rank:
                    budget = pos.numel() if relation is None else rank_count(
                        relation[:, pos.to(relation.device)], cfg.rank_scale, cfg.rank_bias)
                hidden = step.hidden[b].index_select(0, pos.to(step.hidden.device)) if cfg.recycle else None
                kept, centres, merged = recycle_select(vis_score, min(budget, pos.numel()), hidden,
                                                       cfg.recycle_fraction, cfg.cluster_size,
                                                       extra=cfg.recycled == "extra")
                kept, centres = pos[kept.to(pos.device)], pos[centres.to(pos.device)]
                keep.append(torch.sort(torch.cat([kept, centres])).values)
                replace.append((centres, merged) if merged is not None and centres.numel() else None)
        return Selection(keep=keep, replace=replace if any(r is not None for r in replace) else None)


@hookimpl
def tokcomp_register(registry):
    registry.add_strategy(SparseVLM)
