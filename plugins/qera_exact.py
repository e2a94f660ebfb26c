"""The ``qera-exact`` reconstructor (QERA, METHODS.md §2.1): the rank-r term that minimises the
expected output error of the layer for a fixed ``Q``,

    min_C  E_x ‖x (Δ − C)ᵀ‖²  =  ‖(Δ − C) S‖_F²,      Δ = W − Q,  S = E[xxᵀ]^{1/2},

solved in closed form by ``C = [Δ S]_r S⁻¹`` with an optimum of ``Σ_{i>r} σ_i(Δ S)²``. ``S`` and
``S⁻¹`` come from one ``eigh`` of the second moment, eigenvalues below ``eig_floor · λ_max`` raised
to that floor (rank-deficient statistics: dead channels, fewer tokens than input features).

``root: cholesky`` uses a Cholesky factor ``F`` (``E[xxᵀ] = F Fᵀ``, ridge ``eig_floor · max diag``)
instead of the symmetric root: ``‖(Δ − C) F‖_F = ‖(Δ − C) S‖_F`` for every ``C``, so the optimum
``C = [ΔF]_r F⁻¹`` and its error are the same (up to the different regularisation of
rank-deficient statistics), at a small fraction of the cost for wide layers
(benchmarks/sqrtm_speed.py: 0.69 s instead of 12.8 s at 4096²). The ridge shifts *every*
eigenvalue, which matters when activations have outlier channels: on the default model gptq 4-bit
+ qera-exact r32 gives 12.74 with ``cholesky`` against 12.61 with ``eigh``, so ``eigh`` stays the
default and ``cholesky`` is for layers wide enough that the eigh dominates.

``damp`` (default 0) fits to the shrunk second moment ``E[xxᵀ] + damp · mean(diag E[xxᵀ]) · I``, the
ridge GPTQ's ``damp`` puts on its Hessian: a few thousand calibration tokens estimate the small
eigenvalues of ``E[xxᵀ]`` poorly, and ``S⁻¹`` amplifies exactly those directions, so a little
shrinkage trades in-sample error for error on text unlike the calibration text
(benchmarks/results/calibration.md).

``info``: ``tail_energy`` (exact method: the optimum ``Σ_{i>r} σ_i(ΔS)²``), ``output_error``
(``E‖x(W − Q − LR)ᵀ‖²`` of the stored factors) and ``output_error_none`` (``E‖xΔᵀ‖²``), all per
token, from the ``rxx`` statistic."""

from __future__ import annotations

from typing import ClassVar

import attrs

from lqframe import hookimpl
from lqframe.lowrank import LowRankReconstructor, output_root, real


@attrs.frozen
class QERAExactReconstructor(LowRankReconstructor):
    """Rank-``rank`` fit of ``W − Q`` weighted by the full ``E[xxᵀ]^{1/2}``."""

    label: ClassVar[str] = "qera-exact"
    needs = frozenset({"rxx"})

    eig_floor: float = attrs.field(default=1e-6, validator=real(0.0, 1.0, max_exclusive=True))
    root: str = attrs.field(default="eigh", validator=attrs.validators.in_(("eigh", "cholesky")))
    damp: float = attrs.field(default=0.0, validator=real(0.0, 1e3))

    @classmethod
    def test_configs(cls):
        return [*super().test_configs(), {"rank": 3, "root": "cholesky"}, {"rank": 3, "damp": 0.1}]

    def column_scaling(self, stats):
        return output_root(stats, self.eig_floor, self.root, self.damp)


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("qera-exact", QERAExactReconstructor)
