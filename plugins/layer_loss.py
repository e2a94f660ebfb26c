"""The ``layer-loss`` objective: the output error of every decoder block, each block's student
output against the float model's output of that block on the same windows (both run on their own
model's inputs, so errors of earlier blocks count where they propagate).

With ``normalize`` (the default) each block's mean squared error is divided by the mean square of
the teacher's output of that block, so that the deep blocks, whose residual stream is larger, do
not drown the early ones; the loss is the mean of those relative errors over the blocks.
"""

from __future__ import annotations

import attrs
import torch

from lqframe import LossObjective, hookimpl


@attrs.frozen
class LayerLoss(LossObjective):
    """Mean over blocks of each block's (relative) mean squared output error."""

    normalize: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    needs = frozenset({"blocks"})

    def loss(self, student, teacher, batch) -> torch.Tensor:
        s = student["blocks"].float()
        t = teacher["blocks"].to(device=s.device, dtype=torch.float32)
        dims = tuple(range(1, s.dim()))  # one value per block (the first dimension)
        err = (s - t).pow(2).mean(dim=dims) if dims else (s - t).pow(2)
        if self.normalize:
            scale = t.pow(2).mean(dim=dims) if dims else t.pow(2)
            err = err / scale.clamp_min(torch.finfo(torch.float32).tiny)
        return err.mean()


@hookimpl
def lqframe_register(registry):
    registry.add_objective("layer-loss", LayerLoss)
