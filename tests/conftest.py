"""Test configuration: Triton runs in its CPU interpreter (set before any kernel module is
imported), hypothesis is deterministic on CI (its built-in 'ci' profile loads when CI is set)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
