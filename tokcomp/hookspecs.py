"""pluggy hook specifications of the ``tokcomp`` namespace.

A plugin is a module (or object) with ``@tokcomp.hookimpl`` functions, announced through the ``tokcomp``
entry-point group. Built-in strategies and adapters are registered exactly like third-party ones.
"""
from __future__ import annotations

import pluggy

PROJECT = "tokcomp"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tokcomp_register(registry):
    """Called once when the registry loads: add strategies with ``registry.add_strategy(cls)`` and adapters with
    ``registry.add_adapter(cls)``. Returns nothing."""


@hookspec(firstresult=True)
def tokcomp_resolve_adapter(model, registry):
    """Called when a session opens: return the adapter class for ``model`` or None to pass. The first non-None
    answer wins, so a plugin marked ``tryfirst=True`` can take priority over the built-in adapters."""


@hookspec
def tokcomp_session_opened(session):
    """Called after a session attached its hooks to the model (before the user's first forward)."""


@hookspec
def tokcomp_session_closed(session):
    """Called after a session removed every hook and restored the model (also after an exception)."""
