"""Conformance tests of the ``abs-mean`` reconstructor, written only against ``lqframe.testing``.

Run them from this folder once lqframe (with its ``test`` extra) and this plugin are installed::

    python -m pytest

They find ``abs-mean`` through the registry, so they test the installed distribution (its entry
point included), not a module that happens to be importable from here.
"""

from __future__ import annotations

import torch

import lqframe
from lqframe import testing


def test_registered_from_this_distribution():
    info = lqframe.registry().info("reconstructor", "abs-mean")
    assert info.distribution == "lqframe-example-reconstructor"
    assert len(testing.component_cases("reconstructor", names=["abs-mean"])) == 3


@testing.parametrize_devices()
@testing.parametrize_pairs(reconstructors=["abs-mean"])
def test_with_every_quantizer(quantizer_case, reconstructor_case, device):
    """Shapes, exact storage of Q and of L·R (``lowrank_bits``), serialisation, determinism, NaN/Inf,
    empty matrices; and Eckart–Young in the (E|x|)^alpha-weighted norm for the one-shot configs."""
    testing.check_reconstructor(reconstructor_case, quantizer=quantizer_case, device=device)


@testing.parametrize_devices()
def test_reaches_the_weighted_optimum(device):
    testing.check_eckart_young("abs-mean", {"alpha": 0.5}, quantizer="nf", device=device, max_examples=30)


def test_alpha_zero_is_plain_svd():
    reg = lqframe.registry()
    w = testing.make_matrix(24, 70, "heavy", "float32", seed=5)
    stats = testing.synthetic_stats(24, 70, {"abs_sum"}, seed=1)
    q = reg.create("quantizer", "rtn", bits=3, group_size=16)
    ours = reg.create("reconstructor", "abs-mean", rank=4, alpha=0.0, factor_dtype="float32").decompose(w, q, stats)
    svd = reg.create("reconstructor", "svd", rank=4, factor_dtype="float32").decompose(w, q)
    torch.testing.assert_close(ours.dense(), svd.dense(), rtol=0, atol=1e-6)
