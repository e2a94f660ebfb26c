"""The ``logit-kl`` objective: knowledge distillation on the next-token distributions,
``KL(p_teacher ‖ p_student)`` per token, averaged over tokens, at a softmax ``temperature``
(scaled by ``temperature²`` so that gradients keep their size as the temperature changes).

The teacher's logits are not cached as such when the head stays uncompressed: the tune stage keeps
the teacher's final hidden state and applies the (frozen, float) head to it, which gives the same
logits for a fraction of the memory (d instead of the vocabulary per token).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from lqframe import LossObjective, hookimpl


def _positive(instance, attribute, value) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class LogitKL(LossObjective):
    """Token-mean KL divergence of the student's next-token distribution from the teacher's."""

    temperature: float = attrs.field(default=1.0, converter=float, validator=_positive)

    needs = frozenset({"logits"})

    def loss(self, student, teacher, batch) -> torch.Tensor:
        s = student["logits"].float()
        t = teacher["logits"].to(device=s.device, dtype=torch.float32)
        tau = self.temperature
        log_p_s = F.log_softmax(s / tau, dim=-1).reshape(-1, s.shape[-1])
        log_p_t = F.log_softmax(t / tau, dim=-1).reshape(-1, t.shape[-1])
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * tau * tau


@hookimpl
def lqframe_register(registry):
    registry.add_objective("logit-kl", LogitKL)
