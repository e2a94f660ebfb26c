"""Storage formats of the low-rank factors ``L`` and ``R`` (one table for reconstructors, ``LowRank``
and ``LQLinear``).

``float32`` / ``float16`` / ``bfloat16``
    the factor is stored as a tensor of that dtype;
``int8``
    symmetric 8-bit integers per row block of :data:`INT8_BLOCK` values sharing one power-of-two
    scale (``value = (q − 128) · 2^e``, codes 1…255, ``2^e`` the smallest power of two with
    ``absmax ≤ 127 · 2^e``, like the shared exponent of MX formats), kept as a bfloat16 (exact for
    any exponent): 8.25 bits per value for ``R``, ``8 + 16/r`` for ``L`` (its rows are r long).
    A power-of-two scale makes encoding idempotent — re-encoding decoded values gives the same
    codes and scales — so factors can be re-encoded on every save without drifting; the price is
    a step up to 2× the absmax/127 one (relative factor error ≈ 0.6 % instead of 0.4 %). It is an
    ordinary :class:`~lqframe.QuantizedWeight` (format ``int8-sym``), so the packed-weight decode
    rule, serialisation and exact ``storage_bits`` apply unchanged, and a kernel reads it like Q.

While a model is compressed or tuned, ``L`` and ``R`` are float32 tensors holding exactly the values
their format can represent (:func:`round_factor`); :func:`encode_factor` of such a tensor decodes
back to the same values bit for bit, so what is evaluated in memory is what a checkpoint holds.
"""

from __future__ import annotations

import torch

from lqframe.errors import OptionError
from lqframe.quantization import blockify, unblockify
from lqframe.types import QuantizedWeight

__all__ = ["FACTOR_FORMATS", "FLOAT_FACTOR_DTYPES", "INT8_BLOCK", "check_format", "factor_bits", "round_factor",
           "encode_factor", "decode_factor", "is_quantized"]

#: float formats and their torch dtypes
FLOAT_FACTOR_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: every factor format, by option value
FACTOR_FORMATS: tuple[str, ...] = (*FLOAT_FACTOR_DTYPES, "int8")
#: values per int8 scale (along a row)
INT8_BLOCK = 64
_ZERO = 128


def check_format(name: str, who: str = "factor_dtype") -> str:
    if name not in FACTOR_FORMATS:
        raise OptionError(f"{who} must be one of {list(FACTOR_FORMATS)}, got {name!r}")
    return name


def is_quantized(fmt: str) -> bool:
    """True for formats stored as a :class:`~lqframe.QuantizedWeight` (not a plain tensor)."""
    return check_format(fmt) not in FLOAT_FACTOR_DTYPES


def factor_bits(shape: tuple[int, int], fmt: str) -> int:
    """Exact storage bits of one factor of ``shape`` in ``fmt``."""
    rows, cols = shape
    if not is_quantized(fmt):
        return rows * cols * torch.finfo(FLOAT_FACTOR_DTYPES[fmt]).bits
    return rows * cols * 8 + rows * (-(-cols // INT8_BLOCK)) * 16


def encode_factor(t: torch.Tensor, fmt: str) -> torch.Tensor | QuantizedWeight:
    """The factor as stored: a tensor of the float dtype, or a packed ``int8-sym`` weight."""
    if not is_quantized(fmt):
        return t.detach().to(FLOAT_FACTOR_DTYPES[fmt])
    x = t.detach().to(torch.float32)
    rows, cols = x.shape
    blocks = blockify(x, INT8_BLOCK)
    absmax = blocks.abs().amax(dim=2) if blocks.numel() else blocks.new_zeros(blocks.shape[:2])
    mantissa, exponent = torch.frexp(absmax / 127)  # absmax/127 = m·2^x, m in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # exact powers of two stay themselves
    scale = torch.where(absmax > 0, torch.ldexp(torch.ones_like(absmax), exponent), torch.zeros_like(absmax))
    stored = scale.to(torch.bfloat16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(blocks / safe[..., None]), -127, 127) + _ZERO
    return QuantizedWeight.from_codes(unblockify(codes, cols).to(torch.int64), 8, INT8_BLOCK, stored,
                                      zero=_ZERO, format="int8-sym")


def decode_factor(stored: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """float32 values of a stored factor."""
    if isinstance(stored, QuantizedWeight):
        return stored.dequantize(torch.float32)
    return stored.to(torch.float32)


def round_factor(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """``t`` rounded to what ``fmt`` stores: the float dtype itself, or float32 values on the int8 grid."""
    stored = encode_factor(t, fmt)
    return stored if isinstance(stored, torch.Tensor) else decode_factor(stored)
