"""pytest plugin `tokcomp` (entry point `pytest11: tokcomp = tokcomp.testing.pytest_plugin`).

* Limits torch to one CPU thread (`OMP_NUM_THREADS=1` at configure time, `torch.set_num_threads(1)` at session
  start). Change it with the ini option `tokcomp_num_threads` (0 leaves torch's default).
* Session-scoped fixtures `tiny_qwen2_vl`, `tiny_qwen2_5_vl`, `tiny_internvl` (sdpa, seed 0) and the factory
  `tiny_vlm_factory(name, attn="sdpa", seed=0, fresh=False, **overrides) -> TinyVLM`, cached by its arguments.
  Cached models are shared across tests: remove any hooks you register (or pass `fresh=True`).
* `procedural_images`: `default_images()` (a new list for each test).

transformers is imported lazily inside the fixtures, so `pytest --help` stays fast.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

_THREADS_INI = "tokcomp_num_threads"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(_THREADS_INI, "torch CPU threads for the test session (0 = leave the default)", default="1")


def _num_threads(config: pytest.Config) -> int:
    try:
        return int(config.getini(_THREADS_INI))
    except (ValueError, KeyError):
        return 1


def pytest_configure(config: pytest.Config) -> None:
    n = _num_threads(config)
    if n > 0:
        # Affects torch if it is imported later; an already imported torch is set directly.
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
        import sys

        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(n)


def _set_torch_threads(config: pytest.Config) -> None:
    n = _num_threads(config)
    if n > 0:
        import torch

        torch.set_num_threads(n)


def pytest_sessionstart(session: pytest.Session) -> None:
    _set_torch_threads(session.config)


@pytest.fixture(scope="session")
def tiny_vlm_factory(pytestconfig: pytest.Config) -> Callable[..., Any]:
    """`factory(name, attn="sdpa", seed=0, fresh=False, **overrides) -> TinyVLM`, cached per argument set."""
    _set_torch_threads(pytestconfig)  # also covers a plugin registered after session start
    cache: dict[tuple, Any] = {}

    def factory(name: str, attn: str = "sdpa", seed: int = 0, fresh: bool = False, **overrides: Any):
        from tokcomp.testing.models import build_model

        key = (name, repr(attn), seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if fresh:
            return build_model(name, attn=attn, seed=seed, **overrides)
        if key not in cache:
            cache[key] = build_model(name, attn=attn, seed=seed, **overrides)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_vlm_factory):
    """`tiny-qwen2-vl` (sdpa), shared by the session."""
    return tiny_vlm_factory("tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tiny_vlm_factory):
    """`tiny-qwen2.5-vl` (sdpa), shared by the session."""
    return tiny_vlm_factory("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_internvl(tiny_vlm_factory):
    """`tiny-internvl` (sdpa), shared by the session."""
    return tiny_vlm_factory("tiny-internvl")


@pytest.fixture
def procedural_images():
    """`tokcomp.testing.default_images()`: 112x84, 56x112, 84x84 and 56x56 RGB images."""
    from tokcomp.testing.images import default_images

    return default_images()
