"""Storage formats of the low-rank factors ``L`` and ``R`` (one table for reconstructors, ``LowRank``
and ``LQLinear``).

``float32`` / ``float16`` / ``bfloat16``
    the factor is stored as a tensor of that dtype;
``int8``
    symmetric 8-bit integers with one power-of-two scale per 64 values *along the rank*: per row
    of ``L`` (n×r) and per column of ``R`` (r×m, stored transposed as ``Rᵀ``, m×r). Every output
    row and every input channel thus gets its own scale, which matters for the data-aware methods:
    ``R = [ΔT]_r T⁻¹`` carries the inverse activation scaling ``T⁻¹``, whose per-channel range
    spans orders of magnitude, and a scale shared along a row of ``R`` would let one channel set
    the step for 63 others. ``value = (q − 128) · 2^e`` (codes 1…255), ``2^e`` the smallest power
    of two with ``absmax ≤ 127 · 2^e`` (the shared-exponent idea of MX formats), kept as a
    bfloat16 (exact for any exponent): ``8 + 16/r`` bits per value for r ≤ 64. A power-of-two
    scale makes encoding idempotent — re-encoding decoded values gives the same codes and scales —
    so factors can be re-encoded on every save without drifting. The stored factor is an ordinary
    :class:`~lqframe.QuantizedWeight` (format ``int8-sym``), so the packed-weight decode rule,
    serialisation and exact ``storage_bits`` apply unchanged, and a kernel reads it like Q
    (``x·Rᵀ`` reads ``Rᵀ`` row-major, as stored).

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


def _check_side(side: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return side


def _oriented(t: torch.Tensor, side: str) -> torch.Tensor:
    """The matrix whose rows run along the rank: ``L`` itself, ``Rᵀ`` for the right factor."""
    return t if _check_side(side) == "left" else t.T


def factor_bits(shape: tuple[int, int], fmt: str, side: str = "left") -> int:
    """Exact storage bits of one factor of ``shape`` (``L``: n×r, ``R``: r×m) in ``fmt``."""
    rows, cols = shape if _check_side(side) == "left" else tuple(reversed(shape))
    if not is_quantized(fmt):
        return rows * cols * torch.finfo(FLOAT_FACTOR_DTYPES[fmt]).bits
    return rows * cols * 8 + rows * (-(-cols // INT8_BLOCK)) * 16


def encode_factor(t: torch.Tensor, fmt: str, side: str = "left") -> torch.Tensor | QuantizedWeight:
    """The factor as stored: a tensor of the float dtype (same orientation), or a packed ``int8-sym``
    weight of ``L`` / ``Rᵀ`` (blocks along the rank)."""
    if not is_quantized(fmt):
        _check_side(side)
        return t.detach().to(FLOAT_FACTOR_DTYPES[fmt])
    x = _oriented(t.detach().to(torch.float32), side).contiguous()
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


def decode_factor(stored: torch.Tensor | QuantizedWeight, side: str = "left") -> torch.Tensor:
    """float32 values of a stored factor, in its natural orientation (``L``: n×r, ``R``: r×m)."""
    if isinstance(stored, QuantizedWeight):
        return _oriented(stored.dequantize(torch.float32), side).contiguous()
    return stored.to(torch.float32)


def round_factor(t: torch.Tensor, fmt: str, side: str = "left") -> torch.Tensor:
    """``t`` rounded to what ``fmt`` stores: the float dtype itself, or float32 values on the int8 grid."""
    stored = encode_factor(t, fmt, side)
    return stored if isinstance(stored, torch.Tensor) else decode_factor(stored, side)
