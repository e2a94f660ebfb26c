"""Conformance tests of the ``binary`` quantizer, written only against ``lqframe.testing``.

Run them from this folder once lqframe (with its ``test`` extra) and this plugin are installed::

    python -m pytest

They find ``binary`` through the registry, so they test the installed distribution (its entry
point included), not a module that happens to be importable from here.
"""

from __future__ import annotations

import lqframe
from lqframe import testing


def test_registered_from_this_distribution():
    info = lqframe.registry().info("quantizer", "binary")
    assert info.distribution == "lqframe-example-plugin"
    assert [c.id for c in testing.component_cases("quantizer", names=["binary"])] == [
        "binary[group_size=16]",
        "binary[group_size=64,scale_dtype=float32]",
    ]


@testing.parametrize_devices()
@testing.parametrize_components("quantizer", names=["binary"])
def test_quantizer(quantizer_case, device):
    """Packing, exact storage, serialisation, determinism, the rounding bound (``rounds_to_nearest``
    stays True: ±mean|x| are the two grid points), the fast ``roundtrip``, NaN/Inf, empty inputs."""
    testing.check_quantizer(quantizer_case, device=device)


@testing.parametrize_devices()
@testing.parametrize_pairs(quantizers=["binary"], reconstructors=["none", "svd", "qera-exact"])
def test_with_builtin_reconstructors(quantizer_case, reconstructor_case, device):
    testing.check_reconstructor(reconstructor_case, quantizer=quantizer_case, device=device)


@testing.parametrize_components("quantizer", names=["binary"])
def test_svd_correction_is_optimal(quantizer_case):
    testing.check_eckart_young("svd", quantizer=quantizer_case)
