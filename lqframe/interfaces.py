"""The four plugin interfaces. A plugin implements one of them in one small class, configured by
its ``attrs`` fields (so the registry can validate options and list them), and registers it
through the ``lqframe_register`` hook.

Every component declares what it ``needs``: calibration statistics (see
``lqframe.types.STAT_NAMES``) for quantizers and reconstructors, teacher outputs for objectives.
The pipeline captures only what the chosen components declare.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch

from lqframe.types import Choice, CostTable, Decomposition, LayerStats, QuantizedWeight

__all__ = ["Component", "Quantizer", "ErrorReconstructor", "BudgetAllocator", "LossObjective"]


class Component:
    """Behaviour shared by all components: option introspection and a description for reports."""

    def options(self) -> dict[str, Any]:
        """The component's configuration (its attrs fields) as plain values."""
        if attrs.has(type(self)):
            return attrs.asdict(self, recurse=False)
        return {}

    @classmethod
    def test_configs(cls) -> list[dict[str, Any]]:
        """Option sets the framework's property tests should cover (a few small, distinct ones).

        The suite runs every registered quantizer × reconstructor pair over these, so a plugin
        that overrides this is tested automatically with the configurations that matter.
        """
        return [{}]


class Quantizer(Component, abc.ABC):
    """Turns a weight matrix into packed low-bit codes.

    Must be deterministic and cheap enough to be called inside iterative solvers (LoftQ,
    LQ-LoRA call it up to 100 times per matrix); :meth:`roundtrip` is the hook for a fast path
    that skips packing.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    #: True when every code is the nearest grid value of its input element (RTN, NF). The property
    #: tests then check the rounding error bound; error-feedback methods (GPTQ) set False.
    rounds_to_nearest: ClassVar[bool] = True

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> QuantizedWeight:
        """Quantize a 2-D (out × in) weight. Raises ``WeightError`` on non-finite input."""

    @abc.abstractmethod
    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Exact bits on disk of the :class:`QuantizedWeight` for a matrix of this shape."""

    def bits_per_param(self, shape: tuple[int, int]) -> float:
        n, m = shape
        return self.storage_bits(shape) / max(n * m, 1)

    def roundtrip(self, weight: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
        """``dequantize(quantize(weight))`` as float32; override for a faster path."""
        return self.quantize(weight, stats).dequantize(torch.float32)


class ErrorReconstructor(Component, abc.ABC):
    """Produces ``W ≈ Q + L·R`` for a weight, given a quantizer (which it may call repeatedly)."""

    needs: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def decompose(
        self, weight: torch.Tensor, quantizer: Quantizer, stats: LayerStats | None = None
    ) -> Decomposition:
        """Decompose a 2-D (out × in) weight."""

    def lowrank_bits(self, shape: tuple[int, int]) -> int:
        """Exact storage bits of the low-rank term for a matrix of this shape (0 if none)."""
        return 0

    def weighted_error(self, diff: torch.Tensor, stats: LayerStats | None = None) -> float:
        """The norm this reconstructor's ``L·R`` minimises, of a difference ``diff`` (out × in, e.g.
        ``W − Q`` or ``W − Q − L·R``), in float64: Frobenius unless overridden. ``lqframe.testing``
        holds every reconstructor to ``weighted_error(W − Q − L·R) ≤ weighted_error(W − Q)``."""
        return float(torch.linalg.vector_norm(diff.to(torch.float64)))

    def all_needs(self, quantizer: Quantizer) -> frozenset[str]:
        return frozenset(self.needs) | frozenset(quantizer.needs)


class BudgetAllocator(Component, abc.ABC):
    """Chooses one configuration per matrix from a :class:`CostTable` under a memory budget."""

    @abc.abstractmethod
    def allocate(self, table: CostTable, budget_bits: float | None) -> Mapping[str, Choice]:
        """``budget_bits`` is the allowed average storage in bits per parameter over the table's
        matrices (None: no budget). Raises ``BudgetError`` when no allocation fits."""


class LossObjective(Component, abc.ABC):
    """A training loss over the compressed model (used to tune L and R with Q frozen).

    Outputs are named (:data:`lqframe.types.OUTPUT_NAMES`): ``hidden`` the final hidden state after
    the last norm (batch × seq × d), ``logits`` the language-model head's output (batch × seq ×
    vocab), ``blocks`` every decoder block's output stacked (blocks × batch × seq × d). The tune
    stage computes the teacher's once, from the float model, and the student's on every step.
    """

    #: teacher outputs to cache before training, e.g. {"hidden"} or {"logits"}
    needs: ClassVar[frozenset[str]] = frozenset()
    #: student outputs the loss reads (None: the same as ``needs``)
    outputs: ClassVar[frozenset[str] | None] = None

    def student_needs(self) -> frozenset[str]:
        """The student outputs the tune stage must compute for this objective."""
        return frozenset(self.needs if self.outputs is None else self.outputs)

    @abc.abstractmethod
    def loss(
        self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Any
    ) -> torch.Tensor:
        """A scalar loss from the student's outputs, the cached teacher outputs and the batch."""
