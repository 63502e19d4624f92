"""One hooked-tower driver for every vision engine: a ViTCompressor runs inside a tower's own block loop.

An architecture describes how its blocks take and give token sets with a :class:`TowerIO`; :class:`HookedTower`
registers a pre-hook and a forward hook on every block it drives (through the adapter's ``Surgery``) and, per
tower call (state on the driver, created per session; nothing on modules)::

    block 0 pre-hook   io.begin(args, kw) -> (layout, tokens); a new VisionRun; strategy.start
    block i pre-hook   variant = strategy.block_variant(i); q_seg = io.segments(i, tokens)
                       - no variant, nothing changed yet: the native block runs untouched (exact no-op)
                       - no variant: io.native feeds the current token set to the native block (None when it
                         cannot, e.g. tiles holding different counts: then the block runs here as an empty variant)
                       - a variant: the block runs here from io.ops(i) (run_block_variant); the native forward
                         is skipped (the block's ``forward`` returns io.dummy's one-token placeholder)
    block i fwd-hook   tokens = the variant's output, or io.read(native output); strategy.after_block
                       - the last driven block: io.after_last(out) (a full grid, or the token set itself)
    finish()           strategy.finish, validated (check_finish), recorded; called by io.after_last or by the
                       architecture's merger / projector hook

Every vision compressor, on every adapter, goes through this one loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from torch import Tensor

from tokcomp.errors import AdapterError
from tokcomp.session import ForwardRecord
from tokcomp.tokens import BlockVariant, VisionLayout, VisionTokens

from ._vision import BlockOps, Finished, VisionRun, run_block_variant, tower_order


class TowerIO(Protocol):
    """How one architecture's blocks take and give token sets (shapes: N current tokens, C width)."""

    def begin(self, args: tuple, kw: dict) -> tuple[VisionLayout, VisionTokens]:
        """At block 0: the call's layout and full token set from block 0's input."""

    def segments(self, i: int, tokens: VisionTokens) -> Tensor:
        """LongTensor[N] attention segment of each token in block ``i`` (frame / window / tile / image)."""

    def native(self, i: int, tokens: VisionTokens, q_seg: Tensor, args: tuple, kw: dict) -> tuple | None:
        """``(args, kw)`` that make the native block run on ``tokens``; None if it cannot."""

    def dummy(self, i: int, tokens: VisionTokens, args: tuple, kw: dict) -> tuple:
        """``(args, kw)`` of a one-token native call (the block already ran here)."""

    def read(self, out: Any, tokens: VisionTokens) -> Tensor:
        """Tensor[N, C] from the native block's output on ``tokens``."""

    def ops(self, i: int, block) -> BlockOps:
        """The parts of block ``i`` for :func:`run_block_variant`."""

    def after_last(self, driver: "HookedTower", out: Any) -> Any:
        """What the last driven block returns (None: its output unchanged)."""

    # optional: adjust(variant) -> variant, applied to every block variant before it runs


@dataclass
class TowerCall:
    """One tower call in flight: the run, whether block ``i`` ran natively, the achieved counts."""

    run: VisionRun
    record: ForwardRecord
    native: bool = False
    done: Finished | None = None


class HookedTower:
    """Drives a ViTCompressor through ``blocks`` with hooks (see the module docstring).

    Args:
        blocks: the blocks to drive, in order (for LLaVA: up to the feature layer).
        io: the architecture's :class:`TowerIO`.
        strategy: the ViTCompressor (an identity strategy measures an unmodified tower).
        family: adapter family name, for ``VisionContext.family``.
        step: optional wrapper ``step(fn, tokens, where) -> tokens`` around every strategy step (the plain-ViT
            adapter tracks merge sources through it); default: ``fn(tokens)``.
    """

    def __init__(self, blocks, io: TowerIO, strategy, family: str,
                 step: Callable[[Callable, VisionTokens, str], VisionTokens] | None = None):
        self.blocks = list(blocks)
        self.io, self.strategy, self.family = io, strategy, family
        self.step = step or (lambda fn, tokens, where: fn(tokens))
        self.call: TowerCall | None = None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def attach(self, surgery) -> None:
        for i, block in enumerate(self.blocks):
            surgery.pre_hook(block, lambda m, a, k, i=i: self._pre(i, m, a, k))
            surgery.post_hook(block, lambda m, a, k, out, i=i: self._post(i, out), prepend=True)
            self._skip_native(surgery, block)

    def _skip_native(self, surgery, block) -> None:
        """When the pre-hook has run the block itself, its native forward is skipped: the instance's ``forward``
        returns the (one-token) placeholder it was given, which the forward hook replaces. Even a one-token native
        call reads every weight of the block (~1 ms per DINOv2-S block on a CPU, 10 % of a small tower).
        Taken out by :meth:`Surgery.suspended` (so a deep copy never carries it) and on undo."""
        missing = object()
        old = block.__dict__.get("forward", missing)             # e.g. accelerate's device-placement forward
        native = block.forward

        def forward(*args, **kw):
            call = self.call
            if call is not None and not call.native:
                return args[0] if args else kw["hidden_states"]
            return native(*args, **kw)

        def off():
            if old is missing:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old
        surgery.set_attr(block, "forward", forward)
        surgery.switch(off, lambda: setattr(block, "forward", forward))

    # -- the loop -----------------------------------------------------------------------------------------
    def _pre(self, i: int, block, args: tuple, kw: dict):
        if i == 0:
            layout, tokens = self.io.begin(args, kw)
            run = VisionRun(self.strategy, layout, self.depth, self.family)
            self.call = TowerCall(run=run, record=ForwardRecord(vision_in=layout.n_tokens))
            run.tokens = self.step(run.start, tokens, "after start")
        call = self.call
        if call is None:
            raise AdapterError("a vision block ran outside a call of the whole tower; call the vision tower (or the "
                               "model) as a whole inside a compression session")
        run = call.run
        tokens = run.tokens
        variant = run.variant(i)
        if variant is not None and hasattr(self.io, "adjust"):
            variant = self.io.adjust(variant)
        q_seg = self.io.segments(i, tokens)
        extra = None if variant is None or variant.extra_kv is None else self.io.segments(i, variant.extra_kv)
        if variant is None:
            run.record_block(i, q_seg)
            call.native = True
            if not run.changed:
                return None
            fed = self.io.native(i, tokens, q_seg, args, kw)
            if fed is not None:
                return fed
            variant = BlockVariant()
        else:
            run.record_block(i, q_seg, extra, None if variant.mlp_on is None else variant.mlp_on.numel())
        call.native = False
        run.stash = run_block_variant(self.io.ops(i, block), tokens, variant, q_seg, extra)
        return self.io.dummy(i, tokens, args, kw)

    def _post(self, i: int, out: Any):
        call = self.call
        if call is None:
            return None
        run = call.run
        if call.native:
            tokens = run.tokens.with_hidden(self.io.read(out, run.tokens))
        else:
            tokens, run.stash = tower_order(run.stash), None            # mid() may have reordered
        run.tokens = self.step(lambda t: run.after_block(i, t), tokens, f"after block {i}")
        call.record.vision_blocks[i] = run.tokens.n
        if i == self.depth - 1:
            return self.io.after_last(self, out)
        return run.tokens.hidden if run.changed else None

    def finish(self) -> Finished:
        """``strategy.finish`` of the call in flight, validated (see :func:`adapters._vision.check_finish`); the
        call's record gets its block runs."""
        call = self.call
        holder = {}

        def fin(tokens: VisionTokens) -> VisionTokens:
            call.run.tokens = tokens
            holder["done"] = done = call.run.finish()
            return done.tokens
        tokens = self.step(fin, call.run.tokens, "after finish")
        done = holder["done"]
        if tokens is not done.tokens:
            done = Finished(tokens, done.units, done.rows)
        call.done = done
        call.record.vision_block_runs = dict(call.run.block_runs)
        return done

    def end(self) -> TowerCall:
        """Close the call in flight and return it (its record, its finished tokens)."""
        call, self.call = self.call, None
        return call
