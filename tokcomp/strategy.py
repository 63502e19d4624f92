"""Strategy base classes: :class:`ViTCompressor` (inside the vision tower) and :class:`LLMPruner` (inside the LLM).

Strategies are pure algorithms: they receive tensors (:mod:`tokcomp.tokens`) and return decisions. They never
touch a model, a hook, a mask or a cache; adapters do. Per-forward state goes into the context objects the
adapter passes in, never onto ``self``, so one configured strategy can serve any number of forwards.

Vision call order, for every tower call (the adapter drives it)::

    tokens = s.start(tokens, ctx)                       # after patch embedding, before block 0
    for i in range(depth):
        variant = s.block_variant(i, tokens, ctx)       # None: the plain block
        tokens = <block i on tokens, per variant>
        tokens = s.after_block(i, tokens, ctx)          # keep / merge / restore between blocks
    tokens = s.finish(tokens, ctx)                      # before the merger / projector

``finish`` must return, for ``granularity="patch"``, every original token exactly once (the full grid), and for
``granularity="unit"``, whole units only (every present unit with all its patches).

LLM call order, for every prefill (decode steps are never re-pruned)::

    s.begin(ctx)                                        # optional; ctx: LLMContext (per prefill)
    for i in s.prune_layers(n_layers):                  # after decoder layer i (= before layer i + 1)
        selection = s.select(step, ctx)                 # step: LLMStep

Most LLM pruners are one-shot and only rank tokens: subclass :class:`ScorePruner` and write ``score``; the template
does the rest (the conventions are in its docstring).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from tokcomp.config import PruneLayer, StrategyConfig
from tokcomp.tokens import BlockVariant, LLMContext, LLMStep, Selection, VisionContext, VisionTokens

Stage = Literal["vision", "llm"]
Granularity = Literal["patch", "unit", "token"]


class Strategy:
    """Common base. Subclasses set the class attributes below and a nested ``Config``.

    Capability flags are checked when a session is built, so an impossible pairing fails before any forward.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage]
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: link to the paper (or "" for baselines) and one line of what it does
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    granularity: ClassVar[Granularity] = "token"
    #: needs softmax attention rows of chosen queries (served by the adapter beside SDPA/flash, never L x L)
    needs_attention_rows: ClassVar[bool] = False
    #: needs this layer's post-RoPE keys (served by the adapter's attention wrapper)
    needs_keys: ClassVar[bool] = False
    #: runs with flash-attention (no additive float bias, no full attention matrix)
    flash_compatible: ClassVar[bool] = True
    supports_video: ClassVar[bool] = True
    supports_batch: ClassVar[bool] = True
    #: example configs without a budget (keyword dicts) that the registry-drawn test matrix
    #: (:mod:`tokcomp.testing.matrix`) runs on every tiny preset, at keep 1.0 and 0.5 (kvpress's ``default_presses``);
    #: they must fit a 4-block tower and a 4-layer LLM; the first is composed with every strategy of the other stage
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def __init__(self, config: StrategyConfig | None = None, **values: Any):
        from tokcomp.config import build_config
        if config is None:
            config = build_config(self.Config, self.name, values)
        elif values:
            raise TypeError("pass either a config object or keyword values, not both")
        self.config = config

    # -- description ------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The spec string of this configured strategy, e.g. ``dart(layer=2,keep_ratio=0.35)``."""
        args = self.config.spec_args()
        return f"{self.name}({args})" if args else self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"

    def validate(self, depths: dict[str, int], family: str = "") -> None:
        """Check the config against the model before any forward: ``depths`` = ``{"vision": blocks, "llm":
        layers}``, ``family`` = the adapter's name (for strategies whose defaults depend on it); raise ConfigError."""
        self.config.check_layers(self.name, depths)

    @classmethod
    def requires(cls) -> frozenset[str]:
        """Capabilities an adapter must provide (``Adapter.provides``); checked once, by the session."""
        raise NotImplementedError

    def flash_ok(self) -> bool:
        """True if this configured strategy runs with a flash-attention backend (no additive float bias, no full
        attention matrix). Defaults to the class flag; configs may relax it (ToMe without proportional attention)."""
        return self.flash_compatible

    @classmethod
    def flags(cls) -> dict[str, Any]:
        """Capability flags, as shown by ``tokcomp list``."""
        return {"stage": cls.stage, "granularity": cls.granularity,
                "attention_rows": cls.needs_attention_rows, "keys": cls.needs_keys,
                "flash": cls.flash_compatible, "video": cls.supports_video, "batch": cls.supports_batch}


class ViTCompressor(Strategy):
    """A compressor acting inside the vision encoder. Override any of the four callbacks."""

    stage: ClassVar[Stage] = "vision"
    granularity: ClassVar[Granularity] = "unit"

    @classmethod
    def requires(cls) -> frozenset[str]:
        need = {"vision.blocks", f"vision.{cls.granularity}"}
        if cls.needs_attention_rows:
            need.add("vision.attention_rows")
        if cls.needs_keys:
            need.add("vision.keys")
        return frozenset(need)

    def start(self, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        """After patch embedding, before block 0. Return the token set block 0 runs on."""
        return tokens

    def block_variant(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> BlockVariant | None:
        """How block ``i`` runs on ``tokens``: None for the plain block (the model's own module)."""
        return None

    def after_block(self, i: int, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        """After block ``i``: return the token set block ``i + 1`` (or ``finish``) sees."""
        return tokens

    def finish(self, tokens: VisionTokens, ctx: VisionContext) -> VisionTokens:
        """After the last block, before the merger/projector (patch: full grid; unit: whole units)."""
        return tokens


class LLMPruner(Strategy):
    """A pruner acting inside the language model at prefill. Override ``prune_layers`` and ``select``, or use
    :class:`ScorePruner` (one-shot, score only) or ``tokcomp.plugins._progressive.ProgressivePruner``.

    Conventions every LLM pruner follows (the templates implement them):

    * ``layer`` (and schedule layers) mean **K: prune before decoder layer K** (:func:`tokcomp.config.PruneLayer`),
      so ``prune_layers`` returns ``K - 1``: ``select`` runs on layer K-1's output;
    * budgets are fractions of the row's ORIGINAL visual count, ``step.n_visual_original`` (not of what is left);
    * a keep-everything budget prunes nowhere: ``prune_layers`` returns ``[]`` (an exact no-op);
    * ties are broken by the lower position (:func:`tokcomp.ops.select.stable_order`);
    * selection runs under ``torch.no_grad()``; per-prefill state goes in ``ctx.state``, never on ``self``.
    """

    stage: ClassVar[Stage] = "llm"
    granularity: ClassVar[Granularity] = "token"

    @classmethod
    def requires(cls) -> frozenset[str]:
        need = {"llm.layers"}
        if cls.needs_attention_rows:
            need.add("llm.attention_rows")
        if cls.needs_keys:
            need.add("llm.keys")
        return frozenset(need)

    def prune_layers(self, n_layers: int) -> list[int]:
        """Strictly increasing decoder-layer indices after which :meth:`select` is called (0-based)."""
        raise NotImplementedError

    def attention_queries(self, layer: int) -> str | None:
        """Which attention rows :meth:`select` needs at ``layer`` (asked only for layers ``prune_layers`` returned):
        ``"last"`` (the last prompt token), ``"text"`` (every text token after the first visual token), or None."""
        return None

    def begin(self, ctx: LLMContext) -> None:
        """Called once per prefill before layer 0 runs."""

    def select(self, step: LLMStep, ctx: LLMContext) -> Selection:
        """Choose the visual tokens kept after ``step.layer``."""
        raise NotImplementedError


class ScorePrunerConfig(StrategyConfig):
    """A one-shot pruner's config: the budget and K (``layer``: prune before decoder layer K)."""

    layer: int = PruneLayer(2)


class ScorePruner(LLMPruner):
    """Template of a one-shot LLM pruner (kvpress's ``ScorerPress``): write ``score(step, ctx) -> Tensor[B, L]``.

    The template prunes once, before decoder layer ``config.layer`` = K (``prune_layers`` returns ``[K - 1]``, or
    ``[]`` for a keep-everything budget); keeps per row ``config.keep_count(step.n_visual_original[b])`` visual
    tokens with the highest score (:func:`tokcomp.ops.select.top_visual`: ties by lower position); calls ``score``
    under ``torch.no_grad()``; and asks the adapter for the attention rows named by the class attribute
    ``attention`` (``"last"`` / ``"text"``) at layer K-1, which then arrive as ``step.attn`` [B, H, R, L].
    A complete plugin::

        class HiddenNorm(ScorePruner):
            name = "hidden_norm"
            def score(self, step, ctx):
                return step.hidden.float().norm(dim=-1)       # [B, L]: larger = kept
    """

    Config: ClassVar[type[StrategyConfig]] = ScorePrunerConfig
    #: attention rows ``score`` needs at layer K-1: "last", "text" or None
    attention: ClassVar[str | None] = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "attention" in cls.__dict__ and "needs_attention_rows" not in cls.__dict__:
            cls.needs_attention_rows = cls.attention is not None

    def prune_layers(self, n_layers: int) -> list[int]:
        return [] if self.config.is_noop_budget else [self.config.layer - 1]

    def attention_queries(self, layer: int) -> str | None:
        return self.attention if layer == self.config.layer - 1 else None

    def budgets(self, step: LLMStep, ctx: LLMContext) -> list[int]:
        """Visual tokens kept per row: the budget applied to the row's original visual count."""
        return [self.config.keep_count(int(n)) for n in step.n_visual_original.tolist()]

    def score(self, step: LLMStep, ctx: LLMContext) -> Tensor:
        """Tensor[B, L]: how much each current token deserves to stay (only visual entries are read)."""
        raise NotImplementedError

    def select(self, step: LLMStep, ctx: LLMContext) -> Selection:
        from tokcomp.ops.select import top_visual
        with torch.no_grad():
            score = self.score(step, ctx)
        return Selection(keep=top_visual(score, step.visual, self.budgets(step, ctx)))
