"""Test configuration: without a CUDA GPU, Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``,
set before any kernel module is imported; with a GPU the kernels run compiled, and an explicit
``TRITON_INTERPRET`` in the environment wins either way); hypothesis is deterministic on CI (its
built-in 'ci' profile loads when CI is set)."""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _cost_cache(tmp_path_factory):
    """Allocation cost caches in a fresh folder: tests never read or fill the user's cache."""
    old = os.environ.get("LQFRAME_CACHE")
    os.environ["LQFRAME_CACHE"] = str(tmp_path_factory.mktemp("lqframe-cache"))
    yield
    if old is None:
        os.environ.pop("LQFRAME_CACHE", None)
    else:
        os.environ["LQFRAME_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def interrupt_after(monkeypatch):
    """``interrupt_after(n)``: the run's sink raises KeyboardInterrupt right after committing its n-th
    block (a killed run); ``interrupt_after(None)`` puts the sink back."""
    from lqframe import run as run_mod

    original = run_mod.CheckpointSink.write

    def arm(n):
        if n is None:
            monkeypatch.setattr(run_mod.CheckpointSink, "write", original)
            return
        calls = {"n": 0}

        def write(self, *args, **kwargs):
            original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt

        monkeypatch.setattr(run_mod.CheckpointSink, "write", write)

    return arm
