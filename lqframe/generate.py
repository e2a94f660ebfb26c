"""Text from a compressed model (``lqframe generate DIR "prompt"``): users judge a compressed model by
reading it before they trust a perplexity.

:func:`generate` runs transformers' ``generate`` on the model — greedy by default, sampled with a
``temperature`` (and ``top_p``) from a fixed ``seed`` — and hands every piece of decoded text to
``on_text`` as soon as it is produced (the command streams it to the terminal). Compressed layers
dequantize their weights once for the whole generation (``set_weight_cache``), so decoding on a
CPU costs what the float model costs. With ``--compare`` the command generates with the float model
the checkpoint was made from (its ``report.json`` names it, or ``--model``) under the same settings
and says after how many tokens the two continuations part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from lqframe.errors import LqframeError

__all__ = ["generate", "agreement"]


class _Streamer:
    """transformers' streamer protocol (``put`` token ids, ``end``): decodes the new tokens and hands
    each new piece of text to ``on_text`` (the prompt, which ``generate`` puts first, is skipped)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens += [int(t) for t in value.reshape(-1).tolist()]
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > self.shown:
            self.on_text(text[self.shown:])
            self.shown = len(text)


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
             device: torch.device | str = "cpu", on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The continuation of ``prompt`` (see module doc): ``{"text", "tokens", "seconds",
    "tokens_per_second"}``. ``chat``: wrap the prompt in the tokenizer's chat template as one user
    turn (instruction-tuned models). Greedy when ``temperature`` is 0."""
    from lqframe.lqlinear import set_weight_cache

    if tokenizer is None:
        raise LqframeError("this model has no tokenizer to turn the prompt into tokens (save one with it, or pass "
                           "--model with a tokenizer)")
    if max_new_tokens < 1:
        raise LqframeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LqframeError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LqframeError("--chat: the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
    if ids.numel() == 0:
        raise LqframeError("the prompt is empty after tokenization")
    model = model.to(device).eval()
    streamer = _Streamer(tokenizer, on_text) if on_text is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = temperature > 0
    options = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad, "streamer": streamer,
               "attention_mask": torch.ones_like(ids).to(device)}
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # greedy: no sampling options, so the model's generation config cannot turn sampling on
        options.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    set_weight_cache(model, True)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids.to(device), **options)
    finally:
        set_weight_cache(model, False)
    seconds = time.perf_counter() - t0
    new = [int(t) for t in out[0, ids.shape[1]:].tolist()]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new, "seconds": seconds,
            "tokens_per_second": len(new) / seconds if seconds > 0 else None}


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
