"""tokcomp: interchangeable visual-token compression for multimodal LLMs.

Public API::

    import tokcomp
    tokcomp.list_strategies(stage=None, pattern="*")   # registered strategy classes
    tokcomp.list_adapters()                            # registered adapter classes
    tokcomp.get("fastv", layer=2, keep_ratio=0.25)     # a configured strategy instance
    with tokcomp.compress(model, "pool(keep_ratio=0.5)+random(keep_ratio=0.5)") as session:
        model.generate(**inputs)
    session.report

Writing a strategy: ``tokcomp.ScorePruner`` (one-shot LLM pruner: write ``score``), ``tokcomp.LLMPruner``,
``tokcomp.ViTCompressor``, ``@tokcomp.hookimpl def tokcomp_register(registry)``; see docs/writing-a-plugin.md.
"""
from tokcomp.errors import TokcompError, ConfigError, SpecError, UnknownStrategyError, AdapterError, SessionError

__version__ = "0.1.0"

__all__ = ["compress", "get", "list_strategies", "list_adapters", "parse_spec", "default_registry",
           "ScorePruner", "LLMPruner", "ViTCompressor", "hookimpl",
           "TokcompError", "ConfigError", "SpecError", "UnknownStrategyError", "AdapterError", "SessionError"]


def _serve_source_folders() -> None:
    """In a source checkout that was never pip-installed, ``plugins/`` and ``adapters/`` lie beside ``tokcomp/``:
    serve them as ``tokcomp.plugins`` / ``tokcomp.adapters``, as pyproject's package-dir mapping does for an
    install. A no-op for an installed tokcomp."""
    import importlib.util
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for name in ("plugins", "adapters"):
        full = f"{__name__}.{name}"
        init = root / name / "__init__.py"
        if full in sys.modules or not init.is_file() or (Path(__file__).parent / name).exists():
            continue
        if importlib.util.find_spec(full) is not None:
            continue
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)


_serve_source_folders()


def __getattr__(name):  # lazy: importing tokcomp stays cheap (no torch/transformers import at top level)
    if name in ("ScorePruner", "LLMPruner", "ViTCompressor"):
        from tokcomp import strategy
        return getattr(strategy, name)
    if name == "hookimpl":
        from tokcomp.hookspecs import hookimpl
        return hookimpl
    if name in ("list_strategies", "list_adapters", "get", "default_registry"):
        from tokcomp import registry
        return getattr(registry, name)
    if name == "compress":
        from tokcomp.session import compress
        return compress
    if name == "parse_spec":
        from tokcomp.spec import parse_spec
        return parse_spec
    raise AttributeError(f"module 'tokcomp' has no attribute {name!r}")
