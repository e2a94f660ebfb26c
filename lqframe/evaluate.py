"""Token perplexity of a causal language model on fixed token windows.

The protocol is the one GPTQ and most weight-compression papers report: each window of ``L`` tokens
is run on its own (no padding, attention only inside the window, no state carried between windows),
the model predicts tokens ``1 .. L-1`` of the window from the ones before them, and the perplexity is
``exp(total NLL / number of predicted tokens)`` over all windows. This is a token-level mean: every
predicted token weighs the same, whichever window it sits in.

Only one batch of logits exists at any time: each batch is reduced to its NLL sum before the next
one runs, so memory stays at ``batch_size × L × vocab`` floats whatever the number of windows.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lqframe.errors import DataError

__all__ = ["perplexity", "perplexity_from", "nll_sum", "window_nlls", "next_token_nll"]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _check_windows(windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor):
        raise DataError(f"windows must be a torch.LongTensor of shape (n, seq_len), got {type(windows).__name__}")
    if windows.dim() != 2:
        raise DataError(f"windows must have shape (n, seq_len), got shape {tuple(windows.shape)}")
    if windows.dtype not in (torch.int64, torch.int32):
        raise DataError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    if windows.shape[0] == 0:
        raise DataError("no evaluation windows: cannot compute a perplexity from zero windows")
    if windows.shape[1] < 2:
        raise DataError(f"windows of {windows.shape[1]} token(s) have no token to predict (need at least 2)")


def _forward_kwargs(model: torch.nn.Module) -> dict:
    # Hugging Face models would otherwise build a KV cache that evaluation never reads.
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None) is not None:
        return {"use_cache": False}
    return {}


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum (float64, 0-dim) of the next-token NLL of ``logits`` (batch × L × vocab) over positions
    1..L-1 of every row of ``ids``."""
    # Position t predicts token t+1; the last position predicts nothing inside the window.
    logits = logits[:, :-1, :].float()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.double().sum()


def _batch_nll(model: torch.nn.Module, batch: torch.Tensor, extra: dict) -> torch.Tensor:
    """Sum (float64, 0-dim) of next-token NLL over positions 1..L-1 of every row of ``batch``."""
    out = model(input_ids=batch, **extra)
    return next_token_nll(out.logits if hasattr(out, "logits") else out[0], batch)


def nll_sum(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> tuple[float, int]:
    """Total next-token negative log-likelihood (nats, accumulated in float64) over all windows and
    the number of predicted tokens, ``n × (seq_len - 1)``.

    ``model`` is any causal LM called as ``model(input_ids=...)`` whose output has ``.logits`` of
    shape ``(batch, seq_len, vocab)``. It runs under ``torch.inference_mode()`` in eval mode; its
    training flag is restored afterwards.
    """
    _check_windows(windows)
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = int(batch_size)
    n, seq_len = windows.shape
    device = _model_device(model)
    extra = _forward_kwargs(model)
    was_training = model.training
    total = torch.zeros((), dtype=torch.float64)
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=n, desc=desc, unit="win", disable=not progress, file=sys.stderr, leave=False) as bar,
        ):
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
                total += _batch_nll(model, batch, extra).cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return float(total), n * (seq_len - 1)


def window_nlls(model: torch.nn.Module, windows: torch.Tensor, progress: bool = False,
                desc: str = "perplexity") -> list[torch.Tensor]:
    """Each window's next-token NLL sum (float64, 0-dim, on the CPU), one window at a time as
    :func:`nll_sum` computes them: added in window order they give its total bit for bit."""
    device = _model_device(model)
    extra = _forward_kwargs(model)
    was_training = model.training
    out = []
    model.eval()
    try:
        with torch.inference_mode():
            for window in tqdm(windows, desc=desc, unit="win", disable=not progress, file=sys.stderr, leave=False):
                out.append(_batch_nll(model, window[None].to(device=device, dtype=torch.long), extra).cpu())
    finally:
        model.train(was_training)
    return out


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Token perplexity ``exp(sum NLL / predicted tokens)`` of ``model`` on ``windows`` (n, seq_len).

    A model with non-finite logits gives ``nan`` (or ``inf`` when the mean NLL overflows ``exp``)
    rather than an exception, so that a broken compression shows up in the report.
    """
    total, count = nll_sum(model, windows, batch_size=batch_size, progress=progress, desc=desc)
    return perplexity_from(total, count)


def perplexity_from(total: float, count: int) -> float:
    """``exp(total / count)``: ``nan`` for a NaN mean, ``inf`` when it overflows."""
    mean = total / count
    if math.isnan(mean):
        return float("nan")
    try:
        return math.exp(mean)
    except OverflowError:
        return float("inf")
