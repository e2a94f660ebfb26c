"""The compute layout the Triton kernels read, built once per packed weight.

The stored layout (:mod:`lqframe.kernels.packing`) is one dense LSB-first bit stream over the
whole matrix: right for storage, awkward for a kernel (a 3-bit code may straddle two bytes, and a
row need not start on a byte). :func:`compute_layout` rewrites it once, at the first call on a
device, into row-aligned 32-bit words:

* ``words`` — int32 ``(rows, ceil(cols / cpw))`` with ``cpw = 32 // bits`` codes per word
  (16 × 2-bit, 10 × 3-bit, 8 × 4-bit, 4 × 8-bit): code ``(n, k)`` is bits
  ``[(k % cpw)·bits, (k % cpw + 1)·bits)`` of word ``(n, k // cpw)``. No code crosses a word. For
  1, 2, 4 and 8 bits with rows of whole words (``cols·bits`` a multiple of 32: every LLM layer)
  the words *are* the stored bytes, viewed as int32 — no copy; otherwise (3-bit: 2 bits wasted per
  30) they are a copy, built once.
* ``scale`` — ``(rows, blocks_per_row)``: the stored scale tensor as it is (float16, bfloat16 or
  float32) or, for double-quantized scales, their float32 decoding (done here, once).
* ``zero`` — uint8 ``(rows, blocks_per_row)`` when zero points are packed per block, else the
  constant ``zero_value``; ``codebook`` — float32 ``(2**bits,)`` for lookup formats.
* ``offset`` — the scalar offset of the top level, or None.

Decoding a code with these gives bit for bit what :meth:`QuantizedWeight.dequantize` gives in
float32 (``(q − zero)·scale`` or ``codebook[q]·scale``, plus the offset): the kernels and the torch
reference agree on ``Q`` exactly and differ only in how they sum.
"""

from __future__ import annotations

import weakref
from typing import Any

import attrs
import torch

from lqframe.kernels.reference import decode_blocks

__all__ = ["ComputeLayout", "compute_layout", "codes_per_word", "layout_supported"]


def codes_per_word(bits: int) -> int:
    return 32 // bits


@attrs.frozen(eq=False)
class ComputeLayout:
    rows: int
    cols: int
    bits: int
    block_size: int
    words: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    zero_value: float
    codebook: torch.Tensor | None
    offset: float | None

    @property
    def cpw(self) -> int:
        return codes_per_word(self.bits)

    def codes(self) -> torch.Tensor:
        """The codes (int64, ``rows × cols``) read from the words as the kernels read them."""
        k = torch.arange(self.cols, device=self.words.device)
        w = self.words[:, k // self.cpw].to(torch.int64) & 0xFFFFFFFF
        return (w >> ((k % self.cpw) * self.bits)) & ((1 << self.bits) - 1)

    def dequantize(self) -> torch.Tensor:
        """Q as float32 from this layout (its codes, scales, zero points), through the shared
        decoding rule :func:`~lqframe.kernels.reference.decode_blocks` (for tests)."""
        zero = None
        if self.codebook is None:
            zero = (self.zero.to(torch.float32) if self.zero is not None
                    else torch.full(self.scale.shape, self.zero_value, device=self.scale.device))
        offset = None if self.offset is None else torch.tensor(self.offset, dtype=torch.float32)
        return decode_blocks(self.codes(), self.block_size, self.scale.to(torch.float32), codebook=self.codebook,
                             zero=zero, offset=offset)


def layout_supported(qweight: Any) -> str | None:
    """None when the kernels can read ``qweight``; otherwise why not (one line)."""
    if len(qweight.shape) != 2:
        return f"a {len(qweight.shape)}-d weight (the kernels read matrices)"
    if qweight.offset is not None and qweight.offset.numel() != 1:
        return "a per-element offset"
    return None


def _stored_words(qweight: Any) -> torch.Tensor | None:
    """The stored codes viewed as row-aligned words, when they already are (see module doc)."""
    rows, cols = qweight.shape
    codes = qweight.codes
    if 32 % qweight.bits or (cols * qweight.bits) % 32 or codes.data_ptr() % 4 or not codes.is_contiguous():
        return None
    return codes.view(torch.int32).view(rows, cols * qweight.bits // 32)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, cols)`` int64 codes → int32 ``(rows, ceil(cols / cpw))`` row-aligned words."""
    rows, cols = codes.shape
    cpw = codes_per_word(bits)
    nwords = -(-cols // cpw)
    padded = torch.zeros(rows, nwords * cpw, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes
    shifts = torch.arange(cpw, dtype=torch.int64, device=codes.device) * bits
    words = (padded.view(rows, nwords, cpw) << shifts).sum(dim=2)  # < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compute_layout(qweight: Any) -> ComputeLayout:
    """The compute layout of ``qweight`` (built on its device at the first call, then cached for
    as long as the packed weight lives)."""
    layout = _CACHE.get(qweight)
    if layout is None:
        reason = layout_supported(qweight)
        if reason is not None:
            raise ValueError(f"the Triton kernels cannot read {reason}")
        rows, cols = qweight.shape
        scale = qweight.scale
        if isinstance(scale, torch.Tensor):
            scale = scale.reshape(rows, qweight.blocks_per_row).contiguous()
        else:  # double quantization: decode the scales once
            scale = qweight.block_scales().contiguous()
        zero, zero_value = None, 0.0
        if qweight.codebook is None:
            if isinstance(qweight.zero, torch.Tensor):
                zero = qweight.block_zeros().to(torch.uint8).contiguous()
            else:
                zero_value = float(qweight.zero or 0)
        layout = ComputeLayout(
            rows=rows, cols=cols, bits=qweight.bits, block_size=qweight.block_size,
            words=_words if (_words := _stored_words(qweight)) is not None
            else _pack_words(qweight.unpacked_codes().reshape(rows, cols), qweight.bits),
            scale=scale, zero=zero, zero_value=zero_value,
            codebook=None if qweight.codebook is None else qweight.codebook.to(torch.float32).contiguous(),
            offset=None if qweight.offset is None else float(qweight.offset.reshape(()).item()),
        )
        _CACHE[qweight] = layout
    return layout
