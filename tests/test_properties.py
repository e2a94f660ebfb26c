"""Property tests over every registered component, through the public conformance suite
:mod:`lqframe.testing`.

The cases come from the live registry, each component contributing its ``test_configs()``, so an
installed third-party plugin is covered without editing this file: every quantizer on its own,
every quantizer × reconstructor pair, the built-in ``svd`` against every quantizer (Eckart–Young),
every allocator; each on the CPU and, where one is available, on a CUDA device. The last tests
check that the checks themselves catch broken components.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import pytest
import torch
from hypothesis import Phase, settings

import lqframe
from lqframe import testing
from lqframe.lowrank import LowRankReconstructor
from lqframe.numerics import DiagonalScaling
from lqframe.registry import Registry

REG = lqframe.registry()
QUANTIZERS = testing.component_cases("quantizer", REG)
RECONSTRUCTORS = testing.component_cases("reconstructor", REG)

# Examples per case, as before the suite moved to lqframe.testing. The pair suite grows as
# (quantizers × reconstructors): fewer examples per pair, still every pair.
QUANTIZER_EXAMPLES = 60
PAIR_EXAMPLES = 15
EY_EXAMPLES = 60

on_devices = testing.parametrize_devices()


@on_devices
@testing.parametrize_components("quantizer", registry=REG)
def test_quantizer_properties(quantizer_case, device):
    """Packing, exact storage, serialisation, determinism, the rounding bound, the fast roundtrip,
    low-precision inputs, NaN/Inf and empty matrices."""
    testing.check_quantizer(quantizer_case, registry=REG, device=device, max_examples=QUANTIZER_EXAMPLES)


@on_devices
@testing.parametrize_pairs(registry=REG)
def test_pair_properties(quantizer_case, reconstructor_case, device):
    """Shapes, packing and exact storage of both parts, serialisation, determinism, Eckart–Young
    where it applies, NaN/Inf and empty matrices, for one quantizer × reconstructor pair."""
    testing.check_reconstructor(reconstructor_case, quantizer=quantizer_case, registry=REG, device=device,
                                max_examples=PAIR_EXAMPLES)


@testing.parametrize_pairs(registry=REG)
def test_pair_creates_tensors_on_the_weights_device(quantizer_case, reconstructor_case):
    """No stray CPU tensors on a GPU: checked on the CPU with the meta device as the default."""
    testing.check_device_placement(reconstructor_case, quantizer=quantizer_case, registry=REG)


@on_devices
@testing.parametrize_components("quantizer", registry=REG)
def test_svd_reaches_the_eckart_young_tail(quantizer_case, device):
    """For the Q the quantizer produced, ‖W − Q − LR‖_F² equals Σ_{i>r} σ_i(W − Q)²."""
    testing.check_eckart_young("svd", quantizer=quantizer_case, registry=REG, device=device,
                               max_examples=EY_EXAMPLES)


@on_devices
@testing.parametrize_components("allocator", registry=REG)
def test_allocator_properties(allocator_case, device):
    testing.check_allocator(allocator_case, registry=REG, device=device)


def test_every_builtin_is_covered():
    names = {c.name for c in QUANTIZERS}, {c.name for c in RECONSTRUCTORS}
    assert {"nf", "rtn", "gptq"} <= names[0]
    assert {"svd", "none", "lqer", "qera-exact", "qera-approx", "loftq"} <= names[1]
    assert "uniform" in {c.name for c in testing.component_cases("allocator", REG)}
    pairs = testing.pair_params(REG)
    assert len(pairs) == len(QUANTIZERS) * len(RECONSTRUCTORS)
    assert len({p.id for p in pairs}) == len(pairs)


def test_case_ids_and_devices():
    case = testing.ComponentCase("reconstructor", "svd", {"rank": 4, "factor_dtype": "float32"})
    assert case.id == str(case) == "svd[rank=4,factor_dtype=float32]"
    assert testing.component_id("none", {}) == "none"
    assert "rtn[bits=4,group_size=64]+svd[rank=4,factor_dtype=float32]" in {p.id for p in testing.pair_params(REG)}
    assert testing.devices()[0] == "cpu"
    assert ("cuda" in testing.devices()) == torch.cuda.is_available()
    assert [p.id for p in testing.device_params()] == ["cpu", "cuda"]
    with pytest.raises(lqframe.UnknownComponentError):
        testing.component_cases("quantizer", REG, names=["no-such-quantizer"])


# --------------------------------------------------------------------------- objectives
# check_objective on small objectives defined here (the built-in ones: tests/test_objectives.py).


@attrs.frozen
class MeanSquaredError(lqframe.LossObjective):
    """Mean squared error between student and teacher outputs, summed over ``needs``."""

    needs: ClassVar[frozenset[str]] = frozenset({"hidden", "logits"})

    def loss(self, student, teacher, batch):
        return sum(torch.mean((student[k] - teacher[k]) ** 2) for k in sorted(self.needs))


@attrs.frozen
class SoftCrossEntropy(lqframe.LossObjective):
    """Cross-entropy against the teacher's softmax: minimal (the teacher's entropy) at equality."""

    needs: ClassVar[frozenset[str]] = frozenset({"logits"})

    def loss(self, student, teacher, batch):
        target = torch.softmax(teacher["logits"], dim=-1)
        return -(target * torch.log_softmax(student["logits"], dim=-1)).sum(-1).mean()


@on_devices
def test_objective_check_on_a_small_objective(device):
    testing.check_objective(MeanSquaredError(), device=device)
    testing.check_objective(SoftCrossEntropy(), expect_zero=False, device=device)


def test_objective_check_through_a_registry():
    class _Plugin:
        @lqframe.hookimpl
        def lqframe_register(self, registry):
            registry.add_objective("mse", MeanSquaredError)

    reg = Registry(load_entry_points=False)
    assert reg.register_plugin(_Plugin(), "test-mse"), reg.failures
    cases = testing.component_cases("objective", reg)
    assert [c.id for c in cases] == ["mse"]
    testing.check_objective(cases[0], registry=reg, max_examples=5)


# --------------------------------------------------------------------------- the checks catch bugs

FAST_FAIL = settings(phases=[Phase.generate], database=None)


def _fails(check, *args, match: str | None = None, **kwargs) -> None:
    with pytest.raises(AssertionError, match=match):
        check(*args, hypothesis_settings=FAST_FAIL, **kwargs)


@attrs.frozen
class _OffByOneBits(lqframe.Quantizer):
    inner: lqframe.Quantizer = attrs.field(factory=lambda: REG.create("quantizer", "rtn"))

    def quantize(self, weight, stats=None):
        return self.inner.quantize(weight, stats)

    def storage_bits(self, shape):
        return self.inner.storage_bits(shape) + 1


@attrs.frozen
class _NoisyRoundtrip(_OffByOneBits):
    def storage_bits(self, shape):
        return self.inner.storage_bits(shape)

    def roundtrip(self, weight, stats=None):
        return self.inner.roundtrip(weight, stats) * 1.001


@attrs.frozen
class _HalfCorrection(lqframe.ErrorReconstructor):
    """Half of the optimal rank-1 correction: valid storage, not Eckart–Young optimal."""

    def decompose(self, weight, quantizer, stats=None):
        dec = REG.create("reconstructor", "svd", rank=1, factor_dtype="float32").decompose(weight, quantizer)
        if dec.lowrank is None:
            return dec
        return attrs.evolve(dec, lowrank=lqframe.LowRank(dec.lowrank.left * 0.5, dec.lowrank.right))

    def lowrank_bits(self, shape):
        return 0


@attrs.frozen
class _HalfSVD(LowRankReconstructor):
    """Half of the optimal low-rank term, exactly accounted: Eckart–Young fails."""

    def _solve(self, residual, row_scaling=None, col_scaling=None):
        lowrank, sol = super()._solve(residual, row_scaling, col_scaling)
        return lqframe.LowRank(lowrank.left * 0.5, lowrank.right, lowrank.format), sol


@attrs.frozen
class _ClaimsScaling(LowRankReconstructor):
    """Declares an activation scaling but solves unscaled: optimal in the wrong norm."""

    needs = frozenset({"sq_sum"})

    def column_scaling(self, stats):
        return DiagonalScaling(stats.rms())

    def decompose(self, weight, quantizer, stats=None):
        w, stats = self._prepare(weight, stats)
        return self._finish(w, quantizer.quantize(w, stats))


@attrs.frozen
class _RandomTerm(LowRankReconstructor):
    """A seeded random rank-r term of the optimal one's size, exactly accounted and deterministic, in
    an alternating reconstructor (where the Eckart–Young check does not apply)."""

    def _solve(self, residual, row_scaling=None, col_scaling=None):
        lowrank, sol = super()._solve(residual, row_scaling, col_scaling)
        g = torch.Generator().manual_seed(residual.numel())
        left = torch.randn(lowrank.left.shape, generator=g)
        right = torch.randn(lowrank.right.shape, generator=g)
        size = float(torch.linalg.matrix_norm(lowrank.to_dense())) / max(float(torch.linalg.matrix_norm(left @ right)),
                                                                          1e-30)
        return lqframe.LowRank(left * size, right, lowrank.format), sol


@attrs.frozen
class _OverBudget(lqframe.BudgetAllocator):
    def allocate(self, table, budget_bits):
        return {name: table.choice(i, int(np.argmax(table.bits[i]))) for i, name in enumerate(table.layers)}


@attrs.frozen
class _Detached(lqframe.LossObjective):
    needs: ClassVar[frozenset[str]] = frozenset({"hidden"})

    def loss(self, student, teacher, batch):
        return torch.mean((student["hidden"].detach() - teacher["hidden"]) ** 2)


def test_checks_catch_broken_components():
    _fails(testing.check_quantizer, _OffByOneBits(), match="storage_bits")
    _fails(testing.check_quantizer, _NoisyRoundtrip())
    _fails(testing.check_reconstructor, _HalfCorrection(), match="lowrank_bits")
    _fails(testing.check_reconstructor, _HalfSVD(rank=2), match="Eckart-Young")
    _fails(testing.check_eckart_young, _HalfSVD(rank=2), match="Eckart-Young")
    _fails(testing.check_reconstructor, _RandomTerm(rank=2, iterations=2, factor_dtype="float32"),
           match="further from W than Q alone")
    _fails(testing.check_eckart_young, _ClaimsScaling(rank=2), match="Eckart-Young")
    _fails(testing.check_allocator, _OverBudget())
    _fails(testing.check_objective, _Detached(), match="differentiable")
    _fails(testing.check_objective, SoftCrossEntropy(), match="not 0")  # its minimum is the entropy
    with pytest.raises(ValueError, match="Eckart-Young"):
        testing.check_eckart_young("svd", {"iterations": 2}, registry=REG)
