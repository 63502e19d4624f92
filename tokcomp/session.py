"""``tokcomp.compress(model, spec | vision=..., llm=...)``: a reversible session (context manager).

Everything is validated before the first forward: names, configs, layer indices against the model's depth,
the adapter's ability to serve the strategies. On exit, also after an exception, every hook, attribute and
attention-backend change is removed. A session's state lives on the session object, never on the model
after exit; a second concurrent session on one model is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokcomp.adapter import check_capabilities
from tokcomp.adapters._hf import check_version
from tokcomp.errors import ConfigError, SessionError
from tokcomp.spec import Pair

_MARK = "_tokcomp_session"  # set on the model only while a session is open


@dataclass
class ForwardRecord:
    """Achieved visual-token counts of one model call.

    Attributes:
        vision_blocks: tokens in the vision tower after each block ``{block: N}`` (all images of the call).
        vision_in: tokens entering the vision tower (all images of the call, CLS included).
        vision_segments: initial tokens of each attention segment (image / frame / tile), for the FLOPs model.
        vision_block_runs: optional exact cost inputs per block ``{block: (q per segment, kv per segment, mlp
            tokens)}`` for blocks that ran a variant (extra keys/values, MLP subset).
        vision_out: visual tokens leaving the vision side per image (LLM tokens, after the merger).
        llm_layers: visual tokens per batch row entering each decoder layer ``{layer: [n_row0, ...]}``.
        llm_in: visual tokens per row entering the LLM.
        llm_text: non-visual, non-padding tokens per row entering the LLM.
        kv_bytes: bytes of the KV cache right after this prefill (measured from the cache's tensors).
        positions: LongTensor[B, L'] (CPU): the column of the caller's ``input_ids`` each position of the language
            model's output (logits, hidden states) came from, -1 at padding; None where the adapter does not track
            it. Inside a session outputs are shorter than ``input_ids`` when tokens were dropped.
    """

    vision_blocks: dict[int, int] = field(default_factory=dict)
    vision_in: int = 0
    vision_segments: list[int] = field(default_factory=list)
    vision_block_runs: dict[int, tuple] = field(default_factory=dict)
    vision_out: list[int] = field(default_factory=list)
    llm_in: list[int] = field(default_factory=list)
    llm_text: list[int] = field(default_factory=list)
    llm_layers: dict[int, list[int]] = field(default_factory=dict)
    kv_bytes: int | None = None
    positions: Any = None


@dataclass
class Report:
    """What a session measured.

    Attributes:
        vision: one record per vision-tower call; prefill: one record per prefill forward (with its vision part).
        times: wall time of vision-tower calls, prefills and decode steps (CUDA-synchronised on GPU).
        dims: ``(VisionDims, LLMDims)`` of the model when the adapter describes them, for :meth:`cost`.
    """

    spec: str
    adapter: str
    vision: list[ForwardRecord] = field(default_factory=list)
    prefill: list[ForwardRecord] = field(default_factory=list)
    times: Any = None
    dims: Any = None
    vision_depth: int = 0

    @property
    def last(self) -> ForwardRecord | None:
        """The most recent prefill record (merged with its vision call), or None."""
        return self.prefill[-1] if self.prefill else (self.vision[-1] if self.vision else None)

    def cost(self, new_tokens: int = 1, record: ForwardRecord | None = None):
        """Analytic FLOPs (:class:`tokcomp.metrics.cost.Cost`: vision / prefill / decode) of ``record`` (default:
        the last prefill) followed by ``new_tokens`` generated tokens, from the achieved counts."""
        from tokcomp.metrics.cost import record_cost
        rec = record or self.last
        if rec is None or self.dims is None:
            return None
        return record_cost(self.dims, rec, self.vision_depth, rec.llm_text or [0] * len(rec.llm_in), new_tokens)

    def summary(self, new_tokens: int = 1) -> dict:
        """Counts, FLOPs split, KV bytes and timings of the last prefill, as plain numbers."""
        rec = self.last
        out: dict[str, Any] = {"spec": self.spec, "adapter": self.adapter}
        if rec is not None:
            out.update(vision_in=rec.vision_in, vision_blocks=dict(rec.vision_blocks), vision_out=list(rec.vision_out),
                       llm_in=list(rec.llm_in), llm_layers=dict(rec.llm_layers), kv_bytes=rec.kv_bytes)
        c = self.cost(new_tokens)
        if c is not None:
            out.update(c.as_dict())
        if self.times is not None:
            out.update(self.times.as_dict())
        return out


def _resolve_pair(spec: Any, vision: Any, llm: Any, registry) -> Pair:
    from tokcomp.registry import default_registry
    from tokcomp.spec import build_pair, resolve_spec
    from tokcomp.strategy import Strategy
    reg = registry or default_registry()
    if spec is not None and (vision is not None or llm is not None):
        raise ConfigError("give either a spec or vision=/llm=, not both")
    if spec is not None:
        return resolve_spec(spec, reg)
    slots = {}
    for stage, value in (("vision", vision), ("llm", llm)):
        if value is None:
            continue
        if isinstance(value, str):
            pair = build_pair([_one_part(value)], reg, value, [stage])
            s = pair.vision or pair.llm
        elif isinstance(value, Strategy):
            s = value
        else:
            raise ConfigError(f"{stage}= takes a strategy name, a spec part like 'tome(keep_ratio=0.5)' or a "
                              f"strategy from tokcomp.get(...), not {type(value).__name__}")
        if s is not None and s.stage != stage:
            want = "vision compressor" if stage == "vision" else "LLM pruner"
            raise ConfigError(f"{s.name!r} is a {s.stage} strategy but was given as {stage}=; {stage}= takes a "
                              f"{want}. Fix: pass it as {s.stage}={s.name!r}.")
        slots[stage] = s
    return Pair(slots.get("vision"), slots.get("llm"))


def _one_part(text: str):
    from tokcomp.spec import _parse_part
    return _parse_part(text, text)


class Session:
    """A configured pair bound to one model. Use as a context manager (see :func:`compress`)."""

    def __init__(self, model, pair: Pair, registry=None):
        from tokcomp.registry import default_registry
        self.model = model
        self.pair = pair
        self.registry = registry or default_registry()
        self._check_model(model)
        adapter_cls = self.registry.resolve_adapter(model)
        check_version()                             # warns once outside the tested transformers range
        self.adapter = adapter_cls(model)
        for s in (pair.vision, pair.llm):             # needs first: "no language model" beats "layer out of range"
            if s is not None:
                check_capabilities(self.adapter, s)
        self.adapter.check(pair.vision, pair.llm)
        depths = self.adapter.depths()
        for s in (pair.vision, pair.llm):
            if s is not None:
                s.validate(depths, family=adapter_cls.name)
        self.report = Report(spec=pair.spec, adapter=adapter_cls.name)
        self._open = False

    @staticmethod
    def _check_model(model) -> None:
        try:
            from torch._dynamo.eval_frame import OptimizedModule
        except Exception:  # noqa: BLE001
            OptimizedModule = ()  # type: ignore[assignment]
        if OptimizedModule and isinstance(model, OptimizedModule):
            raise SessionError("torch.compile'd models are not supported: token compression changes sequence "
                               "lengths between layers. Fix: open the session on the uncompiled model "
                               "(model._orig_mod).")

    @property
    def vision(self):
        return self.pair.vision

    @property
    def llm(self):
        return self.pair.llm

    @property
    def spec(self) -> str:
        return self.pair.spec

    def __repr__(self) -> str:
        return f"<tokcomp.Session {self.spec!r} on {type(self.model).__name__} ({'open' if self._open else 'closed'})>"

    def __enter__(self) -> "Session":
        if self._open:
            raise SessionError("this session is already open; a session is entered once at a time")
        other = getattr(self.model, _MARK, None)
        if other is not None:
            raise SessionError(f"a tokcomp session is already active on this model ({other.spec!r}); two sessions "
                               "on one model at once are refused. Fix: exit the other session first, or compose "
                               "both strategies in one spec ('vision+llm').")
        try:
            self.adapter.attach(self)
            self._attach_measurement()
            self._attach_guards()
        except BaseException:
            self.adapter.detach()  # nothing half-patched
            raise
        self.model.__dict__[_MARK] = self
        self._open = True
        self.registry.pm.hook.tokcomp_session_opened(session=self)
        return self

    def _attach_measurement(self) -> None:
        """Stage timers on the adapter's modules and a KV-bytes probe after each prefill (all undone on exit)."""
        from tokcomp.adapters._hf import output_cache
        from tokcomp.metrics.flops import kv_bytes
        from tokcomp.metrics.timers import StageTimer
        mods = self.adapter.stage_modules()
        timer = StageTimer()
        timer.attach(self.adapter.surgery, mods.get("vision"), mods.get("llm"))
        self.report.times = timer.times
        try:
            self.report.dims = self.adapter.dims()
            self.report.vision_depth = self.adapter.depths().get("vision", 0)
        except NotImplementedError:
            self.report.dims = None

        def probe(module, args, kwargs, out):
            rec = self.report.prefill[-1] if self.report.prefill else None
            cache = output_cache(out)
            if rec is not None and rec.kv_bytes is None and cache is not None:
                rec.kv_bytes = kv_bytes(cache)
        self.adapter.surgery.post_hook(self.model, probe)

    def _attach_guards(self) -> None:
        """One forward at a time per session: the adapter's per-forward state then belongs to one call. A pre-hook
        (first of all) takes a re-entrant lock on the model and on the vision tower, a forward hook (last of all,
        also on exceptions) releases it, so a second thread's generate() waits instead of corrupting the first.
        ``copy.deepcopy(model)`` inside the session copies the unmodified model (the session's hooks and switches
        taken out for the copy)."""
        import copy
        import threading
        lock = threading.RLock()
        s = self.adapter.surgery
        mods = [self.model] + [m for m in [self.adapter.stage_modules().get("vision")] if m is not None]

        def acquire(module, args, kwargs):
            lock.acquire()

        def release(module, args, kwargs, output):
            lock.release()
        for m in mods:
            s.pre_hook(m, acquire, prepend=True)
            s.post_hook(m, release, always_call=True)
        model = self.model

        def deepcopy(memo):
            with s.suspended():
                held = {k: model.__dict__.pop(k) for k in (_MARK, "__deepcopy__") if k in model.__dict__}
                try:
                    return copy.deepcopy(model, memo)
                finally:
                    model.__dict__.update(held)
        s.set_attr(model, "__deepcopy__", deepcopy)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove everything the session added (idempotent)."""
        if not self._open:
            return
        try:
            self.adapter.detach()
        finally:
            self.model.__dict__.pop(_MARK, None)
            self._open = False
            self.registry.pm.hook.tokcomp_session_closed(session=self)


def compress(model, spec: Any = None, *, vision: Any = None, llm: Any = None, registry=None) -> Session:
    """Bind a vision compressor and/or an LLM pruner to ``model``; returns a :class:`Session` to use in ``with``.

    ``spec`` is a string (``"ipcv(keep_ratio=0.35)+dart(layer=2,keep_ratio=0.35)"``), a JSON/YAML file path,
    a dict, or omitted in favour of ``vision=`` / ``llm=`` (names, spec parts, or ``tokcomp.get(...)`` objects).
    Everything is validated here, before any forward.
    """
    pair = _resolve_pair(spec, vision, llm, registry)
    return Session(model, pair, registry)
