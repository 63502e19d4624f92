"""The invariant test matrix, drawn from the registry and the model presets (timm style), never hand-kept.

Every registered strategy (built-ins and installed third-party plugins alike) carries example configs
(``Strategy.examples``, kvpress's ``default_presses``); every tiny preset of :mod:`tokcomp.testing.models` names its
adapter family. The matrix is: each strategy x each of its examples x each tiny preset whose adapter provides
what the strategy requires (``Registry.runs_on``), at the budgets the invariant checks use::

    from tokcomp.testing import matrix
    for preset in matrix.presets():                       # tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-internvl, ...
        for part in matrix.spec_parts("llm", preset, keep_ratio=0.5):   # "fastv(keep_ratio=0.5)", ...
            ...

A new strategy or adapter needs no test-list edit: it appears here as soon as it is registered.
"""
from __future__ import annotations

from typing import Any

__all__ = ["presets", "family", "strategies", "spec_part", "spec_parts"]


def presets(family_name: str | None = None) -> list[str]:
    """The tiny presets CI builds (``tiny-*``), optionally only those of one adapter family."""
    from tokcomp.testing.models import MODEL_PRESETS
    return [n for n, s in MODEL_PRESETS.items() if n.startswith("tiny-") and family_name in (None, s.family)]


def family(preset: str) -> str:
    """The adapter family of a preset (``"qwen2_vl"``, ``"internvl"``, ...)."""
    from tokcomp.testing.models import MODEL_PRESETS
    return MODEL_PRESETS[preset].family


def strategies(stage: str, preset: str | None = None, registry=None) -> list[type]:
    """Registered strategy classes of ``stage``, those that run on ``preset``'s adapter if given."""
    from tokcomp.registry import default_registry
    reg = registry or default_registry()
    out = reg.strategies(stage)
    if preset is not None:
        fam = family(preset)
        out = [c for c in out if fam in reg.runs_on(c)]
    return out


def spec_part(cls: type, example: dict[str, Any], **budget: Any) -> str:
    """The spec part of ``cls`` with ``example`` and a budget, e.g. ``ipcv(prune_layer=2,keep_ratio=0.5)``."""
    from tokcomp.spec import format_value
    values = {**example, **budget}
    args = ",".join(f"{k}={format_value(v)}" for k, v in values.items())
    return f"{cls.name}({args})" if args else cls.name


def spec_parts(stage: str, preset: str | None = None, registry=None, first_only: bool = False,
               **budget: Any) -> list[str]:
    """Spec parts of every strategy of ``stage`` (that runs on ``preset``) with each example config (only the first
    with ``first_only``), and ``budget`` (e.g. ``keep_ratio=0.5``)."""
    out = []
    for cls in strategies(stage, preset, registry):
        for example in cls.examples[:1] if first_only else cls.examples:
            out.append(spec_part(cls, example, **budget))
    return out
