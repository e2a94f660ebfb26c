"""Building blocks for blockwise quantizers (shared by the built-in plugins, public for third-party
ones): splitting rows into blocks, storing scales in a float format without clipping, and
nearest-value rounding onto a codebook."""

from __future__ import annotations

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
