"""Pydantic base configs: an explicit budget (``keep_ratio`` xor ``num_tokens``) and layer fields.

A strategy's ``Config`` subclasses :class:`StrategyConfig`. Layer fields are declared with
:func:`LayerField` so a session can check them against the model's depth before any forward::

    class Config(StrategyConfig):
        layer: int = LayerField(2, tower="llm", description="prune before this layer (K)")
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokcomp.errors import ConfigError

Tower = Literal["vision", "llm"]


def LayerField(default: Any = None, *, tower: Tower, description: str = "", **kw) -> Any:
    """A config field holding a layer index (int), a list of layer indices, or None.

    ``tower`` names the stack the indices refer to; the session validates them against its depth."""
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra["layer_of"] = tower
    return Field(default, description=description, json_schema_extra=extra, **kw)


def PruneLayer(default: int = 2, *, description: str = "", **kw) -> Any:
    """The one meaning of ``layer`` for every LLM pruner: **K, prune before decoder layer K**. Layer K is the first
    layer that runs on the reduced sequence; the pruner ranks tokens with layer K-1's output (FastV's and DART's
    K). Valid values are ``1 .. n_layers - 1`` (K = n_layers would prune after the last layer, which saves
    nothing, and is refused before any forward)."""
    return LayerField(default, tower="llm", ge=1, description=description or (
        "K: prune before decoder layer K, ranking with layer K-1's output (1 .. n_layers - 1)"), **kw)


def _numeric(annotation: Any) -> bool:
    """True if a field annotation takes numbers (int / float, also inside Optional / list / tuple) and not bools."""
    import typing
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    return bool(args) and bool not in args and any(_numeric(a) for a in args)


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_bool(v) for v in value)


class StrategyConfig(BaseModel):
    """Base of every strategy config: a budget and method fields, validated, immutable, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    #: set by a subclass whose paper defines a default budget; None means the user must give one.
    default_keep_ratio: ClassVar[float | None] = None
    #: False for strategies that take no budget at all.
    needs_budget: ClassVar[bool] = True

    keep_ratio: float | None = Field(None, gt=0.0, le=1.0,
                                     description="fraction of visual tokens kept (0 < r <= 1); xor num_tokens")
    num_tokens: int | None = Field(None, ge=1, description="absolute number of visual tokens kept; xor keep_ratio")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """``keep_ratio=true`` would silently become 1.0 (and ``layer=true`` 1): booleans are refused for numbers."""
        if isinstance(data, dict):
            for name, value in data.items():
                f = cls.model_fields.get(name)
                if f is not None and _numeric(f.annotation) and _holds_bool(value):
                    from tokcomp.spec import format_value
                    example = " (e.g. keep_ratio=0.5)" if name == "keep_ratio" else ""
                    raise ValueError(f"{name}={format_value(value)} holds a boolean, but {name} takes numbers; fix: "
                                     f"give a number{example}")
        return data

    @model_validator(mode="after")
    def _budget(self) -> "StrategyConfig":
        has_r, has_n = self.keep_ratio is not None, self.num_tokens is not None
        if has_r and has_n:
            raise ValueError("give either keep_ratio or num_tokens, not both "
                             f"(got keep_ratio={self.keep_ratio}, num_tokens={self.num_tokens}); "
                             "fix: drop one of them")
        if not has_r and not has_n and self.needs_budget:
            if self.default_keep_ratio is None:
                raise ValueError("this strategy needs a budget: give keep_ratio=<0..1] or num_tokens=<n>, "
                                 "e.g. keep_ratio=0.5")
            self.__dict__["keep_ratio"] = self.default_keep_ratio  # a default, not user-set: not printed in specs
        return self

    # -- budget ---------------------------------------------------------------------------------------
    def keep_count(self, n: int, minimum: int = 1) -> int:
        """Visual tokens to keep out of ``n``: ``floor(n * keep_ratio + 0.5)`` (round half up) clamped to
        ``[minimum, n]``, or ``min(num_tokens, n)``. keep_ratio=1.0 always keeps all ``n``.
        One rounding rule for every strategy: :func:`tokcomp.ops.select.keep_count`."""
        from tokcomp.ops.select import keep_count
        if self.num_tokens is not None:
            return keep_count(max(n, 0), num_tokens=self.num_tokens)
        return keep_count(max(n, 0), keep_ratio=float(self.keep_ratio or 1.0), minimum=minimum)

    @property
    def is_noop_budget(self) -> bool:
        """True when the budget keeps everything (keep_ratio == 1.0)."""
        return self.num_tokens is None and (self.keep_ratio is None or self.keep_ratio >= 1.0)

    # -- layer fields ---------------------------------------------------------------------------------
    @classmethod
    def layer_fields(cls) -> dict[str, Tower]:
        """``{field name: tower}`` for every field declared with :func:`LayerField`."""
        out = {}
        for name, f in cls.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            if "layer_of" in extra:
                out[name] = extra["layer_of"]
        return out

    def check_layers(self, strategy: str, depths: dict[str, int]) -> None:
        """Raise :class:`ConfigError` if a layer field points beyond the model's depth.

        ``depths`` maps ``"vision"``/``"llm"`` to the number of blocks/layers of this model."""
        for name, tower in self.layer_fields().items():
            value = getattr(self, name)
            if value is None or tower not in depths:
                continue
            depth = depths[tower]
            low = min([int(m.ge) for m in type(self).model_fields[name].metadata if hasattr(m, "ge")] or [0])
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if not low <= int(v) < depth:
                    what = "vision tower" if tower == "vision" else "language model"
                    why = (f"; a prune point K={v} would prune after the last layer" if low == 1 and tower == "llm"
                           and int(v) >= depth else "")
                    raise ConfigError(
                        f"{strategy}: {name}={value} is out of range for this model's {what}, which has "
                        f"{depth} {'blocks' if tower == 'vision' else 'layers'} (valid {low}..{depth - 1}{why}); "
                        f"fix: choose {name} < {depth}")

    # -- spec round trip -------------------------------------------------------------------------------
    def spec_args(self) -> str:
        """The explicitly set fields as ``k=v,k=v`` in declaration order (what the user wrote)."""
        from tokcomp.spec import format_value
        return ",".join(f"{k}={format_value(getattr(self, k))}" for k in type(self).model_fields
                        if k in self.model_fields_set)


def build_config(config_cls: type[StrategyConfig], strategy: str, values: dict[str, Any]) -> StrategyConfig:
    """Validate ``values`` into ``config_cls``; turn pydantic errors into one clear :class:`ConfigError`."""
    try:
        return config_cls(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            if err["type"] == "extra_forbidden":
                known = ", ".join(config_cls.model_fields)
                lines.append(f"unknown field {loc!r}; known fields: {known}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"{loc}: {msg}" if loc != "config" else msg)
        raise ConfigError(f"invalid config for {strategy!r}: " + "; ".join(lines)
                          + f". See `tokcomp schema {strategy}`.") from None
