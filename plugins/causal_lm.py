"""The ``causal-lm`` objective: next-token cross-entropy of the student on the data itself (the
task loss of fine-tuning, RILQ's "GT loss"). Position t predicts token t+1; positions whose label is
``-100`` or whose attention mask is 0 are not counted. It needs no teacher.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from lqframe import LossObjective, hookimpl


@attrs.frozen
class CausalLM(LossObjective):
    """Mean next-token cross-entropy over the predicted tokens."""

    needs = frozenset()
    outputs = frozenset({"logits"})

    def loss(self, student, teacher, batch) -> torch.Tensor:
        logits = student["logits"]
        labels = batch.get("labels", batch["input_ids"]).to(logits.device)
        mask = batch.get("attention_mask")
        targets = labels[:, 1:].clone()
        if mask is not None:
            targets[mask[:, 1:].to(logits.device) == 0] = -100
        pred = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
        if not bool((targets != -100).any()):
            return pred.sum() * 0.0  # nothing to predict (one-token windows): a zero that keeps the graph
        return F.cross_entropy(pred, targets.reshape(-1), ignore_index=-100)


@hookimpl
def lqframe_register(registry):
    registry.add_objective("causal-lm", CausalLM)
