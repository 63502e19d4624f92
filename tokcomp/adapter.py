"""The adapter protocol: what the core asks of an architecture adapter, and :class:`Surgery`, the undo log
every adapter uses so that leaving a session restores the model exactly.

An adapter binds strategies to one model family. It is the only code that knows module paths, packing,
positions, masks and caches. The session calls, in order::

    cls.supports(model) -> bool                 # resolution (after the tokcomp_resolve_adapter hook)
    adapter = cls(model)
    adapter.depths() -> {"vision": int, "llm": int}
    adapter.check(vision, llm)                  # raise AdapterError for needs it cannot meet
    adapter.attach(session)                     # add hooks through adapter.surgery
    ...                                         # user forwards / generate()
    adapter.detach()                            # surgery.undo(): every hook, attribute, backend change
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

from tokcomp.errors import AdapterError


class Surgery:
    """An undo log of everything done to a model: hooks, attributes, attention-backend changes.

    ``undo()`` reverts in reverse order, keeps going if one step fails, and is idempotent."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def pre_hook(self, module, fn, *, with_kwargs: bool = True) -> None:
        self._undo.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs).remove)

    def post_hook(self, module, fn, *, with_kwargs: bool = True) -> None:
        self._undo.append(module.register_forward_hook(fn, with_kwargs=with_kwargs).remove)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` that is reverted (or deleted if the attribute did not exist) on undo."""
        missing = object()
        old = obj.__dict__.get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)

        def restore():
            if old is missing:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        setattr(obj, name, value)
        self._undo.append(restore)

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when undoing (e.g. restore an attention implementation)."""
        self._undo.append(fn)

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def undo(self) -> None:
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                errors.append(exc)
        if errors:
            raise AdapterError(f"restoring the model raised {len(errors)} error(s); first: {errors[0]!r}")


class Adapter:
    """Base class of architecture adapters (see the module docstring for the protocol)."""

    #: registry name (the family), e.g. "qwen2_vl"
    name: ClassVar[str] = ""
    #: model class names it supports, for listings and error messages
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: hook points it provides, for `tokcomp list` and docs
    provides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model) -> None:
        self.model = model
        self.surgery = Surgery()

    @classmethod
    def supports(cls, model) -> bool:
        """True if this adapter can bind to ``model``."""
        raise NotImplementedError

    def depths(self) -> dict[str, int]:
        """``{"vision": number of vision blocks, "llm": number of decoder layers}``."""
        raise NotImplementedError

    def check(self, vision, llm) -> None:
        """Raise :class:`AdapterError` if this adapter cannot serve the strategies' declared needs."""

    def attach(self, session) -> None:
        """Add every hook the pair needs, through ``self.surgery``."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove everything :meth:`attach` added."""
        self.surgery.undo()

    # -- optional: measurement ----------------------------------------------------------------------------
    def dims(self):
        """``(tokcomp.metrics.flops.VisionDims, LLMDims)`` of the model, for the FLOPs model."""
        raise NotImplementedError(f"adapter {self.name!r} does not describe its dimensions")

    def stage_modules(self) -> dict:
        """``{"vision": tower module, "llm": decoder stack}`` to time (see tokcomp.metrics.timers)."""
        return {}

    def image_features(self, inputs) -> "object":
        """Visual tokens entering the LLM for ``inputs`` (Tensor[U, D], placeholder order). Inside a session,
        dropped units are zero rows; used for vision-side fidelity."""
        raise NotImplementedError(f"adapter {self.name!r} cannot return image features")
