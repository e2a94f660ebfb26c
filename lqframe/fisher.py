"""The empirical diagonal Fisher information of the target weights: the producer of the built-in
``fisher`` gradient statistic (LQ-LoRA's data-aware weighting, METHODS.md §1.3)::

    F = Σ_windows (∂ loss_window / ∂W)²       loss_window = the causal-LM loss of one window

One forward and backward pass per calibration window (batch size 1, as in the reference: the
square of a sum of per-sequence gradients is not their sum of squares). Only the target weights
require gradients; each weight's gradient is squared into its accumulator the moment it is
complete and then freed (``register_post_accumulate_grad_hook``), so the pass holds one float64
accumulator per target weight (twice the size of the weights) plus one weight's gradient at a time,
never a second full set of gradients. Each window's square is taken in float32 and added to its
accumulator in float64: the float32 squares are exact in float64, so the sum
is exact — and therefore the same in any order, which is what lets several processes each sum a
share of the windows and merge the shares into the one-process result (lqframe.distributed) —
whenever one element's squares span less than 2^29; otherwise it is within float64 rounding.

The model runs in eval mode (dropout off, so the pass is deterministic); the reference uses train
mode, which for the LLaMA family (no dropout) is the same. With ``offload`` the whole model is
moved to the CPU for the pass and back afterwards: a backward pass through blocks that leave the
device after their forward is not supported yet.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["empirical_fisher"]


def empirical_fisher(ctx: Any) -> dict[str, torch.Tensor]:
    """``{layer: Σ grad(W)²}`` over ``ctx.calibration`` for every layer in ``ctx.layers`` (a
    :class:`~lqframe.engine.GradientContext`)."""
    model = ctx.model
    windows = ctx.calibration
    if windows is None or len(windows) == 0:
        return {}
    params = {name: model.get_submodule(name).weight for name in ctx.layers}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = next(iter(params.values())).device
    acc = {name: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for name, p in params.items()}
    hooks = []

    def collect(name):
        def hook(p: torch.Tensor) -> None:
            acc[name].add_(p.grad.detach().float().square())  # float32 square, float64 sum
            p.grad = None

        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in params.items():
            p.requires_grad_(True)
            hooks.append(p.register_post_accumulate_grad_hook(collect(name)))
        model.eval()
        for window in tqdm(windows, desc="fisher (gradient pass)", unit="window", disable=not ctx.progress):
            ids = window.reshape(1, -1).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return acc
