"""Spec strings and config files <-> configured strategy pairs.

Grammar::

    spec   := part ("+" part)?          at most one vision compressor and one LLM pruner, in any order
    part   := NAME | NAME "(" args? ")" | "none"
    args   := NAME "=" value ("," NAME "=" value)*
    value  := number | true | false | none | "string" | bare_word | "[" value ("," value)* "]"

``"ipcv(keep_ratio=0.35)+dart(layer=2,keep_ratio=0.35)"`` parses to an (ipcv, dart) pair and prints back to the
same string. A JSON or YAML file holds either such a string or ``{"vision": {"name": ..., ...}, "llm": {...}}``.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokcomp.errors import ConfigError, SpecError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Pair:
    """A configured vision compressor and/or LLM pruner (either may be None)."""

    vision: Any = None
    llm: Any = None

    @property
    def spec(self) -> str:
        """``vision+llm``; a lone strategy whose name exists on both stages keeps a ``none`` for its position."""
        if self.vision is None and self.llm is None:
            return "none"
        if self.vision is not None and self.llm is not None:
            return f"{self.vision.spec}+{self.llm.spec}"
        s = self.vision or self.llm
        from tokcomp.registry import default_registry
        try:
            ambiguous = len(default_registry().stages_of(s.name)) == 2
        except ConfigError:
            ambiguous = False
        if not ambiguous:
            return s.spec
        return f"{s.spec}+none" if s is self.vision else f"none+{s.spec}"

    def __str__(self) -> str:
        return self.spec


def format_value(v: Any) -> str:
    """A config value as it appears in a spec string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, str):
        return v if _NAME.match(v) and v.lower() not in ("true", "false", "none") else json.dumps(v)
    if hasattr(v, "value"):  # enums
        return format_value(v.value)
    return repr(v)


def split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets/parentheses/quotes; raise SpecError on unbalanced input."""
    out, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise SpecError(f"malformed spec {text!r}: unbalanced {ch!r}")
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise SpecError(f"malformed spec {text!r}: unclosed bracket or quote")
    out.append("".join(cur))
    return out


def _parse_value(raw: str, where: str) -> Any:
    s = raw.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if s.startswith("["):
        if not s.endswith("]"):
            raise SpecError(f"malformed list value {raw!r} in {where}")
        inner = s[1:-1].strip()
        return [_parse_value(x, where) for x in split_top(inner, ",")] if inner else []
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        if _NAME.match(s):
            return s  # bare word -> string (e.g. schedule=decreasing)
        raise SpecError(f"cannot read the value {raw!r} in {where}; use a number, true/false, none, a [list] "
                        "or a quoted string") from None


def _parse_part(part: str, spec: str) -> tuple[str, dict[str, Any]]:
    p = part.strip()
    if not p:
        raise SpecError(f"malformed spec {spec!r}: empty part (a stray '+'?); example: "
                        "'ipcv(keep_ratio=0.35)+dart(layer=2,keep_ratio=0.35)'")
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_\-]*)\s*(?:\((.*)\))?", p, flags=re.S)
    if not m:
        raise SpecError(f"malformed spec part {p!r} in {spec!r}; expected name or name(key=value,...), "
                        "e.g. 'dart(layer=2,keep_ratio=0.35)'")
    name, body = m.group(1), m.group(2)
    args: dict[str, Any] = {}
    if body is not None and body.strip():
        for item in split_top(body, ","):
            if "=" not in item:
                raise SpecError(f"malformed argument {item.strip()!r} in {p!r}: expected key=value")
            k, v = item.split("=", 1)
            k = k.strip()
            if not _NAME.match(k):
                raise SpecError(f"malformed argument name {k!r} in {p!r}")
            if k in args:
                raise SpecError(f"argument {k!r} given twice in {p!r}")
            args[k] = _parse_value(v, p)
    return name, args


def with_budget(part: str, **budget: Any) -> str:
    """One spec part with ``budget`` arguments added: ``"tome"`` -> ``"tome(keep_ratio=0.35)"``,
    ``"ipcv(stabilize_layers=3)"`` -> ``"ipcv(stabilize_layers=3,keep_ratio=0.35)"``; ``"none"`` stays ``"none"``.
    A budget argument the part already sets raises :class:`SpecError`."""
    name, args = _parse_part(part, part)
    if name == "none" or not budget:
        return part.strip()
    twice = sorted(set(args) & set(budget))
    if twice:
        raise SpecError(f"{part.strip()!r} already sets {', '.join(twice)}; give the budget once (in the part or "
                        "through the budget option, not both)")
    extra = ",".join(f"{k}={format_value(v)}" for k, v in budget.items())
    p = part.strip()
    return f"{p[:-1]},{extra})" if args else f"{name}({extra})"


def build_pair(parts: list[tuple[str, dict[str, Any]]], registry=None, source: str = "",
               stages: list[str | None] | None = None) -> Pair:
    """Configured strategies from ``[(name, config), ...]``: at most one per stage, names resolved.

    A name registered for both stages (``random``) takes the stage its position implies: with two parts the
    first is the vision compressor and the second the LLM pruner; ``stages`` may force a stage per part."""
    from tokcomp.registry import NONE_NAMES, default_registry
    reg = registry or default_registry()
    stages = list(stages or [None] * len(parts))
    if len(parts) == 2:
        fixed = [reg.stages_of(n)[0] if len(reg.stages_of(n)) == 1 else None for n, _ in parts]
        for i, (n, _) in enumerate(parts):
            if stages[i] is None and n.lower() not in NONE_NAMES and len(reg.stages_of(n)) == 2:
                other = fixed[1 - i]
                stages[i] = ("llm" if other == "vision" else "vision") if other else ("vision", "llm")[i]
    slots: dict[str, Any] = {}
    for (name, cfg), stage in zip(parts, stages):
        if name.lower() in NONE_NAMES:
            if cfg:
                raise SpecError(f"'none' takes no arguments (in {source!r})")
            continue
        cls = reg.strategy_class(name, stage)
        if cls.stage in slots:
            kind = "vision compressors" if cls.stage == "vision" else "LLM pruners"
            raise ConfigError(f"{source!r} names two {kind} ({slots[cls.stage].name!r} and {name!r}); a session "
                              "composes at most one vision compressor with one LLM pruner. Fix: keep one of them.")
        slots[cls.stage] = cls(**cfg)
    return Pair(slots.get("vision"), slots.get("llm"))


def parse_spec(spec: str, registry=None) -> Pair:
    """Parse ``"ipcv(keep_ratio=0.35)+dart(layer=2,keep_ratio=0.35)"`` into a :class:`Pair`."""
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise SpecError("empty spec; example: 'pool(keep_ratio=0.5)+random(keep_ratio=0.5)' or 'none'")
    parts = [_parse_part(p, spec) for p in split_top(spec, "+")]
    if len(parts) > 2:
        raise ConfigError(f"spec {spec!r} has {len(parts)} parts; at most one vision compressor and one LLM pruner")
    return build_pair(parts, registry, spec)


def resolve_spec(spec: Any, registry=None) -> Pair:
    """Any spec form a user may give: a :class:`Pair`, a spec string, a JSON / YAML file path (a ``str`` ending in
    ``.json``/``.yaml``/``.yml`` or holding a ``/``, or a ``pathlib`` path), or a dict (``{"vision": {...}, ...}``)."""
    from pathlib import PurePath
    if isinstance(spec, Pair):
        return spec
    if isinstance(spec, PurePath):
        return load_spec_file(spec, registry)
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower().endswith((".json", ".yaml", ".yml")) or ("/" in text and "(" not in text):
            return load_spec_file(text, registry)                  # a file path (spec strings hold no '/')
        return parse_spec(spec, registry)
    if isinstance(spec, dict):
        return spec_from_data(spec, registry)
    raise ConfigError(f"cannot use {type(spec).__name__} as a spec; give a string like "
                      "'pool(keep_ratio=0.5)+random(keep_ratio=0.5)', a JSON/YAML file path, a dict, or vision=/llm=")


def load_spec_file(path: str | Path, registry=None) -> Pair:
    """Read a JSON or YAML file holding a spec string or ``{"vision": {...}, "llm": {...}}``."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec file {str(p)!r} does not exist; give an existing .json / .yaml file or a spec string "
                        "like 'pool(keep_ratio=0.5)+random(keep_ratio=0.5)'")
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} is not a file (a directory?); give a .json / .yaml file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {str(p)!r}: {exc}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"cannot read spec file {p}: {exc}") from None
    return spec_from_data(data, registry, str(p))


def spec_from_data(data: Any, registry=None, source: str = "config") -> Pair:
    """A :class:`Pair` from a loaded JSON/YAML object (see :func:`load_spec_file`)."""
    if isinstance(data, str):
        return parse_spec(data, registry)
    if isinstance(data, dict) and "spec" in data and len(data) == 1:
        return parse_spec(data["spec"], registry)
    if not isinstance(data, dict) or not set(data) <= {"vision", "llm"}:
        raise SpecError(f"{source}: expected a spec string or a mapping with keys 'vision' and/or 'llm', "
                        f"e.g. {{'vision': {{'name': 'ipcv', 'keep_ratio': 0.35}}, 'llm': {{'name': 'dart'}}}}")
    parts, stages = [], []
    for stage in ("vision", "llm"):
        entry = data.get(stage)
        if entry is None:
            continue
        if isinstance(entry, str):
            parts.append(_parse_part(entry, entry))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"].strip():
            parts.append((entry["name"].strip(), {k: v for k, v in entry.items() if k != "name"}))
        else:
            raise SpecError(f"{source}: {stage!r} must be a spec string or a mapping with a 'name' key holding a "
                            f"strategy name (got {entry!r}); e.g. {{'name': 'tome', 'keep_ratio': 0.5}}")
        stages.append(stage)
    return build_pair(parts, registry, source, stages)
