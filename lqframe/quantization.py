"""Building blocks for blockwise quantizers (shared by the built-in plugins, public for third-party
ones): splitting rows into blocks, storing scales in a float format without clipping, nearest-value
rounding onto a codebook, the two standard grids (uniform int-k with a zero point, NormalFloat-k)
with their exact storage, and the table of storage formats of the low-rank factors.

The grids live here, not in the plugins that use them, so that every quantizer emitting a format
(``rtn`` and ``gptq`` the int-k one, ``nf`` and ``gptq`` the NF-k one) computes it with the same
code and none has to reach another plugin through the registry.

This module depends on nothing in lqframe but :mod:`lqframe.errors`, so that the value types
(:mod:`lqframe.types`) can use it."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from lqframe.errors import OptionError, WeightError

__all__ = [
    "SCALE_DTYPES",
    "scale_dtype",
    "scale_bits",
    "integer",
    "blockify",
    "unblockify",
    "store_scales",
    "nearest_code",
    "codebook_quantize",
    "ScaleEncoder",
    "packed_code_bits",
    "int_format",
    "int_grid",
    "int_storage_bits",
    "NF_OFFSET",
    "NF4_VALUES",
    "nf_format",
    "nf_grid",
    "normal_float_codebook",
    "normal_float_formula",
    "nf_storage_bits",
    "FLOAT_FACTOR_DTYPES",
    "FACTOR_FORMATS",
    "INT8_BLOCK",
    "check_format",
    "is_quantized",
    "factor_bits",
]

SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def scale_bits(name: str) -> int:
    """Bits of one scale stored as ``name`` (a key of :data:`SCALE_DTYPES`)."""
    return torch.finfo(scale_dtype(name)).bits


def integer(min_value: int | None = None, max_value: int | None = None):
    """attrs validator: an ``int`` (not a ``bool``) within ``[min_value, max_value]``."""

    def check(instance, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an integer, got {value!r}")
        if min_value is not None and value < min_value:
            raise ValueError(f"{attribute.name} must be >= {min_value}, got {value}")
        if max_value is not None and value > max_value:
            raise ValueError(f"{attribute.name} must be <= {max_value}, got {value}")

    return check


def scale_dtype(name: str, who: str = "scale_dtype") -> torch.dtype:
    try:
        return SCALE_DTYPES[name]
    except KeyError:
        raise OptionError(f"{who} must be one of {sorted(SCALE_DTYPES)}, got {name!r}") from None


def blockify(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(rows, cols)`` → ``(rows, nblocks, block_size)``, the last block of each row zero-padded."""
    rows, cols = w.shape
    nblocks = -(-cols // block_size) if cols else 0
    pad = nblocks * block_size - cols
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, nblocks, block_size)


def unblockify(blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`blockify`."""
    rows, nblocks, block_size = blocks.shape
    return blocks.reshape(rows, nblocks * block_size)[:, :cols]


def store_scales(values: torch.Tensor, dtype: torch.dtype, who: str = "scale") -> torch.Tensor:
    """Cast non-negative scales to ``dtype``, rounding *up* so that a block's absmax never exceeds
    its stored scale (no clipping from the cast). Raises if a value overflows the format."""
    values = values.to(torch.float32)
    out = values.to(dtype)
    if dtype == torch.float32:
        return out
    low = out.to(torch.float32) < values
    if bool(low.any()):
        # for positive finite values the next representable number is the next bit pattern
        bits = out.view(torch.int16)
        bits = torch.where(low, bits + 1, bits)
        out = bits.view(dtype)
    if not bool(torch.isfinite(out).all()):  # checked after rounding up: the step may overflow
        big = float(values.max())
        raise WeightError(
            f"{who} {big:.6g} does not fit in {str(dtype).removeprefix('torch.')}; "
            "use scale_dtype: float32 for this weight"
        )
    return out


def nearest_code(normalized: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an increasing ``codebook`` for every element (ties go up)."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(normalized.contiguous(), mids.to(normalized.dtype), right=True)


#: ``absmax (rows, nblocks) float32 → (stored scales, decoded float32 scales of the same shape)``
ScaleEncoder = Callable[[torch.Tensor], tuple[object, torch.Tensor]]


def codebook_quantize(
    x: torch.Tensor, codebook: torch.Tensor, block_size: int, encode_scales: ScaleEncoder
) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Blockwise absmax quantization of a 2-D float32 tensor onto a codebook in [-1, 1].

    Each block is divided by its *decoded* (stored) scale and every element rounded to the nearest
    codebook value, so ``codebook[q] * decoded`` is exactly what a reader reconstructs. Blocks whose
    decoded scale is 0 get the code nearest 0. Returns ``(codes int64 (rows, cols), stored scales,
    decoded scales (rows, nblocks))``.
    """
    rows, cols = x.shape
    blocks = blockify(x, block_size)
    absmax = blocks.abs().amax(dim=2) if blocks.numel() else blocks.new_zeros(rows, blocks.shape[1])
    stored, decoded = encode_scales(absmax)
    decoded = decoded.to(torch.float32)
    safe = torch.where(decoded == 0, torch.ones_like(decoded), decoded)
    codes = nearest_code(blocks / safe.unsqueeze(2), codebook)
    zero_code = int(torch.argmin(codebook.abs()))
    codes = torch.where((decoded == 0).unsqueeze(2), torch.full_like(codes, zero_code), codes)
    return unblockify(codes, cols), stored, decoded


def packed_code_bits(numel: int, bits: int) -> int:
    """Bits of ``numel`` codes of ``bits`` bits packed densely, rounded up to whole bytes."""
    return -(-numel * bits // 8) * 8


# --------------------------------------------------------------------------- uniform int-k grid
# ``value = (q − zero) · scale`` per group (``rtn``, ``gptq grid: int``):
#   asymmetric: scale = (max − min)/(2^b − 1) with min ≤ 0 ≤ max, zero = round(−min/scale) stored as a
#               packed b-bit integer per group;
#   symmetric:  scale = 2·absmax/(2^b − 1), zero the constant 2^{b−1} (not stored).


def int_format(bits: int, symmetric: bool) -> str:
    """The format name of the int-k grid: ``int{k}-sym`` or ``int{k}-asym``."""
    return f"int{bits}-{'sym' if symmetric else 'asym'}"


def int_grid(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int-k grid of groups with minimum ``lo`` and maximum ``hi`` (float32, any shape).

    Returns ``(stored scales in dtype, decoded float32 scales, zero points as float32)``, all of
    ``lo``'s shape; a group's codes are ``clamp(round(x / scale) + zero, 0, 2^b − 1)`` (a zero scale
    gives the code ``zero``)."""
    maxq = (1 << bits) - 1
    hi = hi.clamp_min(0)
    lo = lo.clamp_max(0)
    raw = 2 * torch.maximum(hi, -lo) / maxq if symmetric else (hi - lo) / maxq
    stored = store_scales(raw, dtype, "group scale")
    scale = stored.to(torch.float32)
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / safe), 0, maxq)
    return stored, scale, zero


def int_storage_bits(shape: tuple[int, int], bits: int, group_size: int, symmetric: bool, scale_dtype_name: str) -> int:
    """Exact storage of an ``n × m`` weight on the int-k grid with groups of ``group_size`` columns:
    packed codes, one scale per group and (asymmetric) one packed zero point per group."""
    n, m = shape
    groups = n * (-(-m // group_size) if m else 0)
    total = packed_code_bits(n * m, bits) + groups * scale_bits(scale_dtype_name)
    if not symmetric:
        total += packed_code_bits(groups, bits)
    return total


# --------------------------------------------------------------------------- NormalFloat-k grid
# Code values (METHODS.md §0.1): with ``δ = 0.9677083`` and ``σ`` such that ``Φ_σ(δ) = 1``, the quantiles
# ``linspace(1-δ, ½, 2^{k-1})[:-1] ∪ linspace(½, δ, 2^{k-1}+1)`` of ``N(0, σ)``; for k = 4 these are
# bitsandbytes' NF4 values. One absmax scale per block: ``value = codebook[q] · absmax``.

NF_OFFSET = 0.9677083

#: bitsandbytes' NF4 values as published (float32). The formula reproduces them to one ulp; using the
#: published constants keeps NF4 codes bit-compatible with bitsandbytes checkpoints.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf_format(bits: int) -> str:
    """The format name of the NormalFloat-k grid: ``nf{k}``."""
    return f"nf{bits}"


@functools.cache
def normal_float_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2^bits NormalFloat values in increasing order, from -1 to 1 (float32), on ``device``
    (default: the CPU, whatever the default device is)."""
    key = (bits, str(torch.device(device if device is not None else "cpu")))
    if key not in _CODEBOOKS:
        with torch.device("cpu"):
            values = torch.tensor(NF4_VALUES, dtype=torch.float32) if bits == 4 else normal_float_formula(bits)
        _CODEBOOKS[key] = values.to(key[1])
    return _CODEBOOKS[key].clone()


_CODEBOOKS: dict[tuple[int, str], torch.Tensor] = {}


def normal_float_formula(bits: int) -> torch.Tensor:
    """NF-k from the quantile formula (computed in float64)."""
    half = 2 ** (bits - 1)
    sigma = 1.0 / (math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(2 * NF_OFFSET - 1, dtype=torch.float64))))
    neg = torch.linspace(1 - NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]
    pos = torch.linspace(0.5, NF_OFFSET, half + 1, dtype=torch.float64)
    q = torch.cat([neg, pos])
    values = sigma * math.sqrt(2.0) * torch.special.erfinv(2 * q - 1)
    values[half - 1] = 0.0  # the 0.5 quantile, exactly
    return values.to(torch.float32)


def nf_grid(absmax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF-k scales of blocks with absolute maximum ``absmax``: ``(stored in dtype, decoded float32)``;
    a block's codes are the nearest codebook entries of ``x / decoded`` (:func:`nearest_code`)."""
    stored = store_scales(absmax, dtype, "block absmax")
    return stored, stored.to(torch.float32)


def nf_storage_bits(shape: tuple[int, int], bits: int, group_size: int, scale_dtype_name: str) -> int:
    """Exact storage of an ``n × m`` weight on the NF-k grid with one plainly stored absmax scale per
    block of ``group_size`` (no double quantization; the codebook is a format constant, not counted)."""
    n, m = shape
    nscales = n * (-(-m // group_size) if m else 0)
    return packed_code_bits(n * m, bits) + nscales * scale_bits(scale_dtype_name)


# --------------------------------------------------------------------------- low-rank factor formats
# Storage formats of the low-rank factors L and R (what :mod:`lqframe.factors` encodes and decodes): a
# float dtype, or ``int8`` — symmetric 8-bit codes with one power-of-two bfloat16 scale per INT8_BLOCK
# values along the rank. Kept here (not in lqframe.factors) because the value types account storage
# with them, while the encoders need the value types.

#: float formats and their torch dtypes
FLOAT_FACTOR_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: every factor format, by option value
FACTOR_FORMATS: tuple[str, ...] = (*FLOAT_FACTOR_DTYPES, "int8")
#: values per int8 scale (along the rank)
INT8_BLOCK = 64


def check_format(name: str, who: str = "factor_dtype") -> str:
    """``name`` if it is a factor format, else an :class:`~lqframe.OptionError` naming ``who``."""
    if name not in FACTOR_FORMATS:
        raise OptionError(f"{who} must be one of {list(FACTOR_FORMATS)}, got {name!r}")
    return name


def is_quantized(fmt: str) -> bool:
    """True for factor formats stored as a :class:`~lqframe.QuantizedWeight` (not a plain tensor)."""
    return check_format(fmt) not in FLOAT_FACTOR_DTYPES


def factor_bits(shape: tuple[int, int], fmt: str, side: str = "left") -> int:
    """Exact storage bits of one factor of ``shape`` (``L``: n×r, ``R``: r×m) in ``fmt``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rows, cols = shape if side == "left" else tuple(reversed(shape))
    if not is_quantized(fmt):
        return rows * cols * torch.finfo(FLOAT_FACTOR_DTYPES[fmt]).bits
    return rows * cols * 8 + rows * (-(-cols // INT8_BLOCK)) * 16
