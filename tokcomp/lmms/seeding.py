"""Per-document seeds: a document's answer never depends on which rank ran it or on what ran before it.

lmms-eval seeds the global generators once per process and then deals documents to ranks round-robin, so with
global seeding a sampled answer (or a strategy drawing random numbers) would change with the number of ranks. Here
every document gets its own seed, derived from the run's seed, the task and the document id, and:

* every ``seed`` field of the pair's strategies (``random``, third-party strategies following the convention) is
  replaced by ``mix(field value, task, doc_id)``: each document draws its own subset, reproducibly;
* generation runs inside :func:`torch.random.fork_rng` seeded with ``mix(run seed, task, doc_id)``, so sampling
  (``temperature > 0``) and any strategy using torch's global generator are per-document too, and the harness'
  own generator state is left as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator


def mix(seed: int, task: str, doc_id: int | str) -> int:
    """A 31-bit seed from ``(seed, task, doc_id)``; the same in every process (no Python ``hash``)."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{task}\x1f{doc_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seeded_pair(pair, task: str, doc_id: int | str):
    """``pair`` with every strategy's ``seed`` config field re-derived for this document (same object when no
    strategy has one)."""
    from tokcomp.spec import Pair
    parts, changed = [], False
    for s in (pair.vision, pair.llm):
        if s is not None and "seed" in type(s.config).model_fields:
            s = type(s)(s.config.model_copy(update={"seed": mix(s.config.seed, task, doc_id)}))
            changed = True
        parts.append(s)
    return Pair(*parts) if changed else pair


@contextlib.contextmanager
def document_rng(seed: int, device=None) -> Iterator[None]:
    """torch's global generators (CPU and ``device``'s accelerator) seeded with ``seed`` inside the block and
    restored after it."""
    import torch
    dev = torch.device(device) if device is not None else torch.device("cpu")
    accel = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=accel):
        torch.manual_seed(seed)
        yield
