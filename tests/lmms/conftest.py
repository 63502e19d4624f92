"""Fixtures of the lmms-eval tests: tiny checkpoints saved to disk, the offline demo task, simple_evaluate.

Everything is offline: the checkpoints are tiny presets saved with ``save_pretrained`` (stock processor classes),
the task reads a dataset saved with ``save_to_disk``, and the HF caches point into a temporary folder.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional extra tokcomp[lmms] (docs/evaluation.md)")

_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="session")
def lmms_home(tmp_path_factory) -> Path:
    """A private HF home, offline, set before lmms-eval reads it."""
    home = tmp_path_factory.mktemp("hf-home")
    saved = {k: os.environ.get(k) for k in [*_OFFLINE, "HF_HOME"]}
    os.environ.update(_OFFLINE, HF_HOME=str(home))
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_BUILT: dict = {}


@pytest.fixture(scope="session")
def demo_task(tmp_path_factory, lmms_home):
    """``demo_task(preset, docs)`` -> the paths of a saved tiny checkpoint and its local task (built once)."""
    from tokcomp.lmms import demo

    def build(preset: str = "tiny-qwen2-vl", docs: int = 5) -> dict:
        key = (preset, docs)
        if key not in _BUILT:
            _BUILT[key] = demo.build(tmp_path_factory.mktemp(f"demo-{preset}"), preset, docs)
        return _BUILT[key]
    return build


_MANAGERS: dict = {}


@pytest.fixture(scope="session")
def evaluate(lmms_home):
    """``evaluate(paths, compress, **kw)``: lmms-eval's ``simple_evaluate`` on the demo task with ``--model tokcomp``
    (through the entry point), log_samples on; returns its results dict. Global RNG states are restored after."""
    import numpy as np
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    def run(paths: dict, compress: str | None, model_args: str = "", **kw) -> dict:
        """``compress=None``: ``model_args`` is the whole argument string (as a shell would hand it over)."""
        tasks = str(paths["tasks"])
        if tasks not in _MANAGERS:
            _MANAGERS[tasks] = TaskManager("WARNING", include_path=tasks)
        if compress is None:
            args = model_args
        else:
            args = f'pretrained={paths["model"]},compress="{compress}"' + (f",{model_args}" if model_args else "")
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                return simple_evaluate(model="tokcomp", model_args=args, tasks=["tokcomp_demo"],
                                       task_manager=_MANAGERS[tasks], batch_size=1, log_samples=True,
                                       bootstrap_iters=0, verbosity="WARNING", process_docs_parallel=1, **kw)
            finally:
                random.setstate(py)
                np.random.set_state(npy)
    return run

