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

    s.begin(ctx)                                        # optional
    for i in s.prune_layers(n_layers):                  # after decoder layer i
        selection = s.select(step, ctx)
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from tokcomp.config import StrategyConfig
from tokcomp.tokens import BlockVariant, LLMStep, Selection, VisionContext, VisionTokens

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
    #: adapters (family names) the test matrix runs this strategy on
    tested_adapters: ClassVar[tuple[str, ...]] = ("qwen2_vl", "internvl")

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
    def flags(cls) -> dict[str, Any]:
        """Capability flags, as shown by ``tokcomp list``."""
        return {"stage": cls.stage, "granularity": cls.granularity,
                "attention_rows": cls.needs_attention_rows, "keys": cls.needs_keys,
                "flash": cls.flash_compatible, "video": cls.supports_video, "batch": cls.supports_batch}


class ViTCompressor(Strategy):
    """A compressor acting inside the vision encoder. Override any of the four callbacks."""

    stage: ClassVar[Stage] = "vision"
    granularity: ClassVar[Granularity] = "unit"
    tested_adapters: ClassVar[tuple[str, ...]] = ("qwen2_vl", "internvl", "vit")

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
    """A pruner acting inside the language model at prefill. Override ``prune_layers`` and ``select``."""

    stage: ClassVar[Stage] = "llm"
    granularity: ClassVar[Granularity] = "token"

    def prune_layers(self, n_layers: int) -> list[int]:
        """Strictly increasing decoder-layer indices after which :meth:`select` is called (0-based)."""
        raise NotImplementedError

    def attention_queries(self, layer: int) -> str | None:
        """Which attention rows :meth:`select` needs at ``layer``: ``"last"`` (the last prompt token),
        ``"text"`` (every text token after the first visual token), or None."""
        return None

    def begin(self, ctx: dict[str, Any]) -> None:
        """Called once per prefill before layer 0 runs; ``ctx`` is per-forward scratch space."""

    def select(self, step: LLMStep, ctx: dict[str, Any]) -> Selection:
        """Choose the visual tokens kept after ``step.layer``."""
        raise NotImplementedError
