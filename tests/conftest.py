"""Shared test setup: one thread, fixed seeds, and a float64-by-default fixture.

``float64_default`` is opt-in (``pytestmark = pytest.mark.usefixtures("float64_default")``) so that test modules
written for other dtypes are not affected; the seed is reset before every test.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_models.py, tests/graphs.py and tests/reference/


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64_default():
    """float64 as the default dtype for the test; the previous default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
