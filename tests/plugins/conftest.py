"""Fixtures for the vision-compressor tests; the helpers themselves live in ``vision_fakes.py``."""
import pytest
import torch

from vision_fakes import FakeTower, make_tokens

torch.set_num_threads(1)


@pytest.fixture
def fake_tower():
    """A 6-block float64 fake tower (see vision_fakes.FakeTower)."""
    return FakeTower(depth=6)


@pytest.fixture
def synthetic_tokens():
    """``make_tokens(grids, order, ...)``: a layout of several segments and its full token set."""
    return make_tokens
