"""The ``model-loss`` objective: RILQ's model-level discrepancy, the mean squared error between the
student's and the teacher's final hidden state (after the last norm, before the head).

Matching the last hidden state rather than every layer's output lets the adapters of all layers
cooperate: an error one layer leaves can be cancelled by another, which is what makes low-rank
compensation of 2-bit weights work at small ranks (RILQ, AAAI 2025). RILQ pairs it with the
next-token loss on the same text (``causal-lm``), half and half.
"""

from __future__ import annotations

import attrs
import torch

from lqframe import LossObjective, hookimpl


@attrs.frozen
class ModelLoss(LossObjective):
    """``mean((h_student − h_teacher)²)`` over every token and feature of the final hidden state."""

    needs = frozenset({"hidden"})

    def loss(self, student, teacher, batch) -> torch.Tensor:
        s = student["hidden"]
        t = teacher["hidden"].to(device=s.device, dtype=torch.float32)
        return (s.float() - t).pow(2).mean()


@hookimpl
def lqframe_register(registry):
    registry.add_objective("model-loss", ModelLoss)
