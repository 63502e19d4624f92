"""The registry: a pluggy plugin manager, entry-point loading, lookup by name, listing, clear errors."""
from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib.metadata as md
import warnings
from typing import Any

import pluggy

from tokcomp import hookspecs
from tokcomp.errors import AdapterError, ConfigError, UnknownStrategyError

ENTRY_POINT_GROUP = "tokcomp"
#: the built-in strategies and adapters, registered in code before any entry point (datasette's DEFAULT_PLUGINS):
#: a source checkout needs no install, and a new built-in is one file plus one line here
DEFAULT_PLUGINS = (
    "tokcomp.plugins.baselines", "tokcomp.plugins.ipcv", "tokcomp.plugins.tome", "tokcomp.plugins.tofu",
    "tokcomp.plugins.dart_vit", "tokcomp.plugins.luvc_oim", "tokcomp.plugins.fastv", "tokcomp.plugins.dart",
    "tokcomp.plugins.v2drop", "tokcomp.plugins.sparsevlm", "tokcomp.plugins.luvc_spu",
    "tokcomp.adapters.qwen2_vl", "tokcomp.adapters.internvl", "tokcomp.adapters.llava", "tokcomp.adapters.vit",
)
#: names that mean "no strategy for this stage" in specs
NONE_NAMES = ("none",)


def _distribution_of(obj: Any) -> str:
    """The installed distribution that provides ``obj``'s top-level package (or the package name)."""
    top = getattr(obj, "__module__", "") .split(".")[0]
    dists = md.packages_distributions().get(top) or []
    return dists[0] if dists else top or "<unknown>"


class Registry:
    """Strategies and adapters by name. Build one with :meth:`load` (entry points) or by hand in tests."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._strategies: dict[tuple[str, str], type] = {}   # (stage, name) -> class
        self._adapters: dict[str, type] = {}
        self.failed: dict[str, str] = {}   # plugin name -> reason its import failed

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, group: str = ENTRY_POINT_GROUP, extra_plugins: tuple = (),
             builtins: tuple[str, ...] = DEFAULT_PLUGINS) -> "Registry":
        """Register the built-ins (:data:`DEFAULT_PLUGINS`, in code), then every plugin of the entry-point ``group``
        (third parties), plus ``extra_plugins``, and run their registration hooks.

        A plugin whose import fails is skipped with a warning naming it; every other plugin still loads."""
        import importlib
        reg = cls()
        for module in builtins:
            plugin = reg._import(module, lambda: importlib.import_module(module), "built-in")
            if plugin is not None and not reg.pm.is_registered(plugin):
                reg.pm.register(plugin, name=module)
        for ep in sorted(md.entry_points(group=group), key=lambda e: (e.dist.name if e.dist else "", e.name)):
            dist = ep.dist.name if ep.dist else "?"
            plugin = reg._import(ep.name, ep.load, f"distribution {dist!r}, {ep.value}")
            if plugin is None or reg.pm.is_registered(plugin) or reg.pm.get_plugin(ep.name) is not None:
                continue
            reg.pm.register(plugin, name=ep.name)
        for p in extra_plugins:
            reg.pm.register(p)
        reg.pm.check_pending()
        reg.pm.hook.tokcomp_register(registry=reg)
        return reg

    def _import(self, name: str, load, origin: str):
        """``load()`` or, if it raises, None with a warning naming the plugin (the other plugins still load)."""
        try:
            return load()
        except Exception as exc:  # noqa: BLE001 - any import failure of a plugin must not break the rest
            self.failed[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"tokcomp plugin {name!r} ({origin}) failed to import and was skipped: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
            return None

    def register_plugin(self, plugin: Any, name: str | None = None) -> None:
        """Register one more plugin object/module after loading and run its registration hook."""
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        caller = self.pm.subset_hook_caller("tokcomp_register",
                                            [p for p in self.pm.get_plugins() if p is not plugin])
        caller(registry=self)

    # -- adding ---------------------------------------------------------------------------------------------
    def add_strategy(self, cls: type) -> type:
        """Add a strategy class (a :class:`~tokcomp.strategy.ViTCompressor` or :class:`LLMPruner` subclass)."""
        from tokcomp.strategy import LLMPruner, ViTCompressor
        if not (isinstance(cls, type) and issubclass(cls, (ViTCompressor, LLMPruner))):
            raise TypeError(f"{cls!r} is not a ViTCompressor or LLMPruner subclass")
        name = cls.name
        if not name or not name.replace("_", "").replace("-", "").isalnum() or name in NONE_NAMES:
            raise ConfigError(f"strategy class {cls.__qualname__} has an invalid name {name!r}; "
                              "fix: set a lowercase identifier as its `name`")
        key = (cls.stage, name)
        if key in self._strategies and self._strategies[key] is not cls:
            other = self._strategies[key]
            raise ConfigError(
                f"two plugins register the strategy name {name!r}: {other.__module__}.{other.__qualname__} "
                f"(distribution {_distribution_of(other)!r}) and {cls.__module__}.{cls.__qualname__} "
                f"(distribution {_distribution_of(cls)!r}); fix: uninstall one of them or rename one strategy")
        self._strategies[key] = cls
        return cls

    def add_adapter(self, cls: type) -> type:
        """Add an adapter class (see :class:`tokcomp.adapter.Adapter`)."""
        name = getattr(cls, "name", "")
        if name in self._adapters and self._adapters[name] is not cls:
            other = self._adapters[name]
            raise ConfigError(f"two plugins register the adapter name {name!r}: {other.__module__} "
                              f"({_distribution_of(other)!r}) and {cls.__module__} ({_distribution_of(cls)!r})")
        self._adapters[name] = cls
        return cls

    # -- lookup ---------------------------------------------------------------------------------------------
    def stages_of(self, name: str) -> list[str]:
        """The stages (``"vision"``, ``"llm"``) that have a strategy called ``name``."""
        return [st for st in ("vision", "llm") if (st, name) in self._strategies]

    def strategy_class(self, name: str, stage: str | None = None) -> type:
        """The strategy class registered as ``name`` (in ``stage`` if given).

        A name registered for both stages (``random``) needs ``stage``; unknown names list the closest ones."""
        stages = self.stages_of(name)
        if stage is not None and stage not in ("vision", "llm"):
            raise ConfigError(f"stage must be 'vision' or 'llm', not {stage!r}")
        if stage is not None and stage in stages:
            return self._strategies[(stage, name)]
        if stage is None and len(stages) == 1:
            return self._strategies[(stages[0], name)]
        if stage is None and len(stages) == 2:
            raise ConfigError(f"{name!r} names both a vision compressor and an LLM pruner; say which: "
                              f"vision={name!r} / llm={name!r}, tokcomp.get({name!r}, stage='vision'), or in a "
                              f"spec put it first for vision and second for llm ('{name}+none', 'none+{name}')")
        if stages:  # exists, but not in the requested stage
            other = stages[0]
            kinds = {"vision": "a vision compressor", "llm": "an LLM pruner"}
            raise ConfigError(f"{name!r} is {kinds[other]}, not {kinds[stage]}; it was given where {kinds[stage]} "
                              f"belongs. Fix: pass it as {other}={name!r}.")
        known = sorted({n for _, n in self._strategies})
        close = [n for n in known if n.lower() == str(name).lower()]           # 'IPCV' -> 'ipcv'
        close += [n for n in difflib.get_close_matches(str(name).lower(), known, n=3, cutoff=0.5) if n not in close]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownStrategyError(
            f"unknown strategy {name!r}.{hint} Known strategies: {', '.join(known) or '(none)'}. "
            "See `tokcomp list`.")

    def get(self, name: str, stage: str | None = None, **config: Any):
        """A configured strategy instance: ``registry.get("fastv", layer=2, keep_ratio=0.25)``."""
        return self.strategy_class(name, stage)(**config)

    def strategies(self, stage: str | None = None, pattern: str = "*") -> list[type]:
        """Registered strategy classes, sorted by (name, stage), filtered by stage and a glob pattern."""
        if stage not in (None, "vision", "llm"):
            raise ConfigError(f"stage must be 'vision', 'llm' or None, not {stage!r}")
        return [c for (st, n), c in sorted(self._strategies.items(), key=lambda kv: (kv[0][1], kv[0][0]))
                if (stage is None or st == stage) and fnmatch.fnmatch(n, pattern)]

    def adapters(self) -> list[type]:
        """Registered adapter classes, sorted by name."""
        return [c for _, c in sorted(self._adapters.items())]

    def runs_on(self, strategy: type) -> list[str]:
        """Names of the adapters that provide every capability ``strategy`` requires."""
        need = strategy.requires()
        return [a.name for a in self.adapters() if need <= frozenset(a.provides)]

    def resolve_adapter(self, model: Any) -> type:
        """The adapter class for ``model`` (``tokcomp_resolve_adapter`` hook first, then ``supports``)."""
        found = self.pm.hook.tokcomp_resolve_adapter(model=model, registry=self)
        if found is not None:
            return found
        for cls in self.adapters():
            if cls.supports(model):
                return cls
        supported = "; ".join(f"{c.name}: {', '.join(c.model_classes)}" for c in self.adapters()) or "(none)"
        raise AdapterError(f"no tokcomp adapter supports {type(model).__name__}. Supported models: {supported}. "
                           "Fix: use one of those classes, or install/write an adapter plugin "
                           "(docs/writing-a-plugin.md).")


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry of every installed plugin (loaded once, on first use)."""
    return Registry.load()


def list_strategies(stage: str | None = None, pattern: str = "*") -> list[type]:
    """Registered strategy classes (``stage``: None, "vision" or "llm"; ``pattern``: a glob)."""
    return default_registry().strategies(stage, pattern)


def list_adapters() -> list[type]:
    """Registered adapter classes."""
    return default_registry().adapters()


def get(name: str, stage: str | None = None, **config: Any):
    """A configured strategy instance from the default registry (``stage`` only for names used by both)."""
    return default_registry().get(name, stage, **config)
