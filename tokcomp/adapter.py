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

from contextlib import contextmanager
from typing import Any, Callable, ClassVar

from tokcomp.errors import AdapterError


class Surgery:
    """An undo log of everything done to a model: hooks, attributes, attention-backend changes.

    ``undo()`` reverts in reverse order, keeps going if one step fails, and is idempotent. ``suspended()`` takes
    everything out for a moment and puts it back exactly (``copy.deepcopy`` of a model inside a session)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._handles: list = []
        self._switches: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def _hook(self, handle) -> None:
        self._handles.append(handle)
        self._undo.append(handle.remove)

    def pre_hook(self, module, fn, *, with_kwargs: bool = True, prepend: bool = False) -> None:
        """A forward pre-hook; ``prepend``: before hooks registered earlier."""
        self._hook(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend))

    def post_hook(self, module, fn, *, with_kwargs: bool = True, prepend: bool = False,
                  always_call: bool = False) -> None:
        """A forward hook; ``prepend``: before hooks registered earlier (e.g. transformers' output capture, which
        then records what this hook returns); ``always_call``: also when the forward raises."""
        self._hook(module.register_forward_hook(fn, with_kwargs=with_kwargs, prepend=prepend,
                                                always_call=always_call))

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

    def switch(self, off: Callable[[], None], on: Callable[[], None]) -> None:
        """A change that :meth:`suspended` must switch ``off`` and back ``on`` (e.g. an attention backend)."""
        self._switches.append((off, on))

    @contextmanager
    def suspended(self):
        """Everything this log added is out of the model for the duration (hooks popped from their dicts, switches
        off) and back afterwards, in the same order, also after an exception."""
        saved = {}
        for h in self._handles:
            for ref in (h.hooks_dict_ref, *h.extra_dict_ref):
                d = ref()
                if d is not None and id(d) not in saved:
                    saved[id(d)] = (d, list(d.items()))
        ids = {h.id for h in self._handles}
        for d, items in saved.values():
            for k in [k for k, _ in items if k in ids]:
                del d[k]
        done = []
        try:
            for off, on in self._switches:
                off()
                done.append(on)
            yield
        finally:
            for on in reversed(done):
                on()
            for d, items in saved.values():
                d.clear()
                d.update(items)

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def undo(self) -> None:
        self._handles, self._switches = [], []
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                errors.append(exc)
        if errors:
            raise AdapterError(f"restoring the model raised {len(errors)} error(s); first: {errors[0]!r}")


#: what an adapter can provide, and what a strategy's ``requires()`` may ask for
CAPABILITIES = {
    "vision.blocks": "a vision tower whose blocks the adapter drives",
    "vision.unit": "unit-granularity output (whole LLM tokens dropped or merged, prompts re-packed)",
    "vision.patch": "patch-granularity output (the full grid restored before the merger)",
    "vision.attention_rows": "attention rows from the vision tower",
    "vision.keys": "keys from the vision tower",
    "llm.layers": "a language model (decoder layers to prune between)",
    "llm.attention_rows": "attention rows from the language model",
    "llm.keys": "keys from the language model",
}


def check_capabilities(adapter: "Adapter", strategy) -> None:
    """Refuse, before any forward, a strategy whose needs the adapter does not provide, or a strategy that cannot
    run with flash-attention on a stage that runs it."""
    from tokcomp.adapters._hf import is_flash
    missing = sorted(strategy.requires() - frozenset(adapter.provides))
    kind = "an LLM pruner" if strategy.stage == "llm" else "a vision compressor"
    model = type(adapter.model).__name__
    if missing:
        needs = "; ".join(CAPABILITIES.get(m, f"{m.partition('.')[2]}-granularity output") for m in missing)
        raise AdapterError(f"{strategy.name!r} is {kind} that needs {needs} ({', '.join(missing)}), which the "
                           f"{adapter.name!r} adapter for {model} does not provide. Fix: choose a strategy that "
                           f"`tokcomp list` shows as running on {adapter.name!r}")
    impl = adapter.attention_implementation(strategy.stage)
    if impl is not None and not strategy.flash_ok() and is_flash(impl):
        config = "vision_config" if strategy.stage == "vision" else "text_config"
        raise AdapterError(f"{strategy.spec!r} is not flash-attention compatible (it needs an additive attention "
                           f"bias or a full attention matrix) but the {strategy.stage} stage of {model} runs "
                           f"{impl!r}. Fix: model.set_attn_implementation({{{config!r}: 'sdpa'}}), or a "
                           "flash-compatible config (e.g. tome(prop_attn=false))")


class Adapter:
    """Base class of architecture adapters (see the module docstring for the protocol)."""

    #: registry name (the family), e.g. "qwen2_vl"
    name: ClassVar[str] = ""
    #: model class names it supports, for listings and error messages
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: capabilities it provides; the session checks them against every strategy's ``requires()`` before any
    #: forward (see :data:`CAPABILITIES`)
    provides: ClassVar[frozenset[str]] = frozenset()

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
        """Raise :class:`AdapterError` for model-specific limits (capabilities and flash compatibility are checked
        by the session from ``provides`` and :meth:`attention_implementation`)."""

    def attention_implementation(self, stage: str) -> str | None:
        """The attention implementation ``stage`` ("vision" / "llm") runs (None: unknown or absent)."""
        return None

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
