"""pytest-benchmark suites (not part of the default test run: `testpaths` is tests/).

Run:   .venv/bin/python -m pytest benchmarks/test_pairs.py --benchmark-only --benchmark-autosave
Compare saved runs:   .venv/bin/python -m pytest benchmarks/test_pairs.py --benchmark-only --benchmark-compare
       (or `pytest-benchmark compare 0001 0002 --columns=median,iqr`)
Library and GPU versions go into machine_info; FLOPs, KV bytes, achieved counts and fidelity into extra_info.
"""
import platform

import pytest
import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    import transformers
    machine_info["torch"] = torch.__version__
    machine_info["transformers"] = transformers.__version__
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["python"] = platform.python_version()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--bench-shaped", action="store_true", default=False,
                     help="also run the headline pairs on bench-shaped models (real depths, ~1,000 visual tokens)")
