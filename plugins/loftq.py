"""The ``loftq`` reconstructor (LoftQ, METHODS.md §3.3): data-free alternating minimisation of the
weight error ``‖W − Q − L·R‖_F`` over both the quantized part and the low-rank part::

    Q_1 = q(W)
    for t = 1 … iterations:
        L_t R_t = svd_r(W − Q_t)                 iterate t: (Q_t, L_t R_t)
        Q_{t+1} = q(W − L_t R_t)

Iteration 1 is the ``svd`` reconstructor (LoRC) with the same quantizer. Unlike the reference
code, which returns the last iterate, the iterate with the smallest error is returned (METHODS.md
§9.4), and the loop stops early when ``Q`` reaches a fixed point (later iterates would repeat it).

Inside the loop ``Q`` comes from ``quantizer.roundtrip`` and errors are measured with the factors
as stored (``factor_dtype``). At the end the best iterate's input is quantized once with
``quantizer.quantize``; should the packed ``Q`` not dequantize to exactly the values the loop used,
``L·R`` is fitted again to the packed ``Q`` and kept when it is not worse. ``final_error`` is the
error of the returned decomposition, ``‖W − dense()‖_F``.

``info``: ``iterations_run``, ``best_iteration`` (1-based), ``initial_error`` (iteration 1, i.e.
``svd``), ``final_error``, and ``errors`` (the list of per-iteration errors, not a scalar, so
reports leave it out)."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from lqframe import Decomposition, hookimpl
from lqframe.lowrank import LowRankReconstructor
from lqframe.quantization import integer


def _error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖W − approx‖_F`` (the difference in float32, as ``Decomposition.dense`` gives it)."""
    return float(torch.linalg.vector_norm((w - approx).to(torch.float64)))


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

    def decompose(self, weight, quantizer, stats=None) -> Decomposition:
        w, _ = self._prepare(weight, stats)
        if self._rank(w.shape) == 0:  # no low-rank term: Q = q(W) is already the fixed point
            qweight = quantizer.quantize(w, stats)
            err = _error(w, qweight.dequantize(torch.float32))
            info = {"iterations_run": 1, "best_iteration": 1, "initial_error": err, "final_error": err,
                    "errors": [err]}
            return self._finish(w, qweight, info=info)

        source = w  # what the current Q was quantized from
        q_dense = quantizer.roundtrip(source, stats)
        errors: list[float] = []
        best = None
        for t in range(1, self.iterations + 1):
            lowrank, _ = self._solve(w - q_dense)
            lr = lowrank.to_dense()
            err = _error(w, q_dense + lr)
            errors.append(err)
            if best is None or err < best[1]:
                best = (t, err, source, q_dense, lowrank)
            if t == self.iterations:
                break
            source = w - lr
            q_next = quantizer.roundtrip(source, stats)
            if torch.equal(q_next, q_dense):
                break
            q_dense = q_next

        best_t, best_err, best_source, best_q, lowrank = best
        qweight = quantizer.quantize(best_source, stats)
        q_packed = qweight.dequantize(torch.float32)
        info = {
            "iterations_run": len(errors),
            "best_iteration": best_t,
            "initial_error": errors[0],
            "errors": errors,
        }
        if torch.equal(q_packed, best_q):
            return Decomposition(qweight, lowrank, {"rank": lowrank.rank, **info, "final_error": best_err,
                                                       "refit": False})
        # the packed Q differs (in rounding) from the loop's: refit L·R to it, keep the better
        kept = Decomposition(qweight, lowrank, {"rank": lowrank.rank, **info})
        refit = self._finish(w, qweight, info=info)
        kept_err, refit_err = _error(w, kept.dense()), _error(w, refit.dense())
        chosen, final_err = (refit, refit_err) if refit_err <= kept_err else (kept, kept_err)
        return attrs.evolve(chosen, info={**chosen.info, "final_error": final_err, "refit": chosen is refit})


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("loftq", LoftQReconstructor)
