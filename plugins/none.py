"""The ``none`` reconstructor: quantization only, no low-rank term (W ≈ Q)."""

from __future__ import annotations

import attrs

from lqframe import Decomposition, ErrorReconstructor, hookimpl


@attrs.frozen
class NoReconstruction(ErrorReconstructor):
    """``W ≈ Q``: the quantizer's output and nothing else."""

    def decompose(self, weight, quantizer, stats=None) -> Decomposition:
        return Decomposition(quantizer.quantize(weight, stats))


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("none", NoReconstruction)
