"""The ``fisher`` gradient statistic: the empirical diagonal Fisher of the target weights."""

from __future__ import annotations

import copy

import pytest
import torch

import lqframe
from lqframe.data import make_windows
from lqframe.engine import GradientContext
from lqframe.fisher import empirical_fisher
from lqframe.recipe import parse_recipe
from tests.tiny import byte_tokenizer, tiny_llama

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


@pytest.fixture(scope="module")
def windows():
    return make_windows(byte_tokenizer(), "pydoc", 40, 4, 0, 0)


def _reference(model, windows, names):
    """Σ over windows of the squared per-window gradient, by plain autograd in float64 sums."""
    params = [model.get_submodule(n).weight for n in names]
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for window in windows:
        ids = window[None]
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, params)
        for t, g in zip(total, grads, strict=True):
            t += g.double() ** 2
    return total


def test_fisher_equals_per_sequence_autograd(windows):
    model = tiny_llama(layers=2)
    reference = _reference(copy.deepcopy(model), windows.calibration, TARGETS)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = empirical_fisher(GradientContext(model, windows.calibration, torch.device("cpu"), TARGETS, False))
    assert list(got) == TARGETS
    for name, ref in zip(TARGETS, reference, strict=True):
        assert got[name].dtype == torch.float64 and got[name].shape == ref.shape
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-12)
        assert float(got[name].min()) >= 0 and float(got[name].max()) > 0
    # the model is left as it was: no gradients kept, requires_grad restored, eval mode
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # one window's Fisher is not the sum of squares of a batch gradient: per-sequence matters
    half = empirical_fisher(GradientContext(model, windows.calibration[:2], torch.device("cpu"), TARGETS[:1], False))
    assert not torch.allclose(half[TARGETS[0]], got[TARGETS[0]])


def test_the_engine_runs_fisher_weighted_lqlora(windows):
    """A recipe with ``lqlora weighting: fisher`` makes the engine run the gradient pass once and
    hand each layer its own Fisher; the result is deterministic."""
    doc = {"data": {"seq_len": 40, "calibration_windows": 4, "evaluation_windows": 0},
           "quantize_stage": {"quantizer": {"name": "rtn", "bits": 3, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "lqlora", "rank": 4, "weighting": "fisher",
                                                   "iterations": 3}}}
    base = tiny_llama(layers=2)
    runs = []
    for offload in (False, True):
        model = copy.deepcopy(base)
        results = lqframe.compress(model, parse_recipe(doc, "<fisher>"), windows.calibration, device="cpu",
                                   offload=offload, progress=False)
        runs.append((results, model.state_dict()))
        assert len(results) == 14
        for r in results:
            assert r.reconstructor == "lqlora" and r.info["final_error"] <= r.info["one_shot_error"] * (1 + 1e-9)
    (ra, sa), (rb, sb) = runs
    assert [r.info["final_error"] for r in ra] == [r.info["final_error"] for r in rb]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
