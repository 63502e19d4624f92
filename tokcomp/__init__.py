"""tokcomp: interchangeable visual-token compression for multimodal LLMs.

Public API::

    import tokcomp
    tokcomp.list_strategies(stage=None, pattern="*")   # registered strategy classes
    tokcomp.list_adapters()                            # registered adapter classes
    tokcomp.get("fastv", layer=2, keep_ratio=0.25)     # a configured strategy instance
    with tokcomp.compress(model, "pool(keep_ratio=0.5)+random(keep_ratio=0.5)") as session:
        model.generate(**inputs)
    session.report
"""
from tokcomp.errors import TokcompError, ConfigError, SpecError, UnknownStrategyError, AdapterError, SessionError

__version__ = "0.1.0"

__all__ = ["compress", "get", "list_strategies", "list_adapters", "parse_spec", "default_registry",
           "TokcompError", "ConfigError", "SpecError", "UnknownStrategyError", "AdapterError", "SessionError"]


def __getattr__(name):  # lazy: importing tokcomp stays cheap (no torch/transformers import at top level)
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
