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

from collections.abc import Mapping
from typing import Any

import torch

from lqframe.quantization import (
    FACTOR_FORMATS,
    FLOAT_FACTOR_DTYPES,
    INT8_BLOCK,
    blockify,
    check_format,
    factor_bits,
    is_quantized,
    unblockify,
)
from lqframe.types import QuantizedWeight

# The format table (FACTOR_FORMATS, FLOAT_FACTOR_DTYPES, INT8_BLOCK, check_format, is_quantized,
# factor_bits) lives in lqframe.quantization, which the value types use for storage accounting; it is
# re-exported here, next to the encoders.
__all__ = ["FACTOR_FORMATS", "FLOAT_FACTOR_DTYPES", "INT8_BLOCK", "check_format", "factor_bits", "round_factor",
           "encode_factor", "decode_factor", "is_quantized", "layer_factor_dtype"]

_ZERO = 128


def _check_side(side: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return side


def _oriented(t: torch.Tensor, side: str) -> torch.Tensor:
    """The matrix whose rows run along the rank: ``L`` itself, ``Rᵀ`` for the right factor."""
    return t if _check_side(side) == "left" else t.T


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


def layer_factor_dtype(layer_config: Mapping[str, Any]) -> str:
    """The factor format recorded in a compressed layer's entry of ``quantization_config["layers"]``:
    its ``factor_dtype``; checkpoints written before the rename say ``lowrank_dtype``; a layer that
    names neither (rank 0) is ``float32``."""
    if "factor_dtype" in layer_config:
        return layer_config["factor_dtype"]
    return layer_config.get("lowrank_dtype", "float32")
