"""The ``loftq`` reconstructor (LoftQ, METHODS.md §3.3): data-free alternating minimisation of the
weight error ``‖W − Q − L·R‖_F`` over both the quantized part and the low-rank part::

    Q_1 = q(W)
    for t = 1 … iterations:
        L_t R_t = svd_r(W − Q_t)                 iterate t: (Q_t, L_t R_t)
        Q_{t+1} = q(W − L_t R_t)

The loop itself is the shared one of :class:`~lqframe.lowrank.LowRankReconstructor` (any
low-rank reconstructor alternates with ``iterations > 1``, in its own weighting); ``loftq`` is that
loop with no weighting and ``iterations: 5`` by default. Iteration 1 is the ``svd`` reconstructor
(LoRC) with the same quantizer. Unlike the reference code, which returns the last iterate, the
iterate with the smallest error is returned (METHODS.md §9.4), and the loop stops early when ``Q``
reaches a fixed point (later iterates would repeat it).

Inside the loop ``Q`` comes from ``quantizer.roundtrip`` and errors are measured with the factors
as stored (``factor_dtype``). At the end the best iterate's input is quantized once with
``quantizer.quantize``; should the packed ``Q`` not dequantize to exactly the values the loop used,
``L·R`` is fitted again to the packed ``Q`` and kept when it is not worse. ``final_error`` is the
error of the returned decomposition, ``‖W − dense()‖_F``.

``info``: ``iterations_run``, ``best_iteration`` (1-based), ``initial_error`` (iteration 1, i.e.
``svd``), ``final_error``, ``refit``, and ``errors`` (the list of per-iteration errors, not a
scalar, so reports leave it out)."""

from __future__ import annotations

from typing import ClassVar

import attrs

from lqframe import hookimpl
from lqframe.lowrank import LowRankReconstructor
from lqframe.quantization import integer


@attrs.frozen
class LoftQReconstructor(LowRankReconstructor):
    """Alternating ``Q = q(W − LR)`` / ``LR = svd_r(W − Q)``; returns the best of ``iterations``."""

    label: ClassVar[str] = "loftq"

    iterations: int = attrs.field(default=5, validator=integer(1))

    @classmethod
    def test_configs(cls):
        return [
            {"rank": 4, "iterations": 3, "factor_dtype": "float32"},
            {"rank": 2, "iterations": 2, "method": "randomized"},
        ]


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("loftq", LoftQReconstructor)
