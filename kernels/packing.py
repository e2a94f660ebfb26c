"""Dense LSB-first bit packing of unsigned integer codes (1 to 8 bits each).

Layout (the contract every kernel reads): codes are taken in row-major order of their logical
shape and concatenated into one bit stream; code ``e`` occupies bits ``[e*b, (e+1)*b)`` of the
stream, least significant bit first, and bit ``k`` of the stream is bit ``k % 8`` of byte
``k // 8``. The stream is stored as ``ceil(N*b/8)`` bytes (``torch.uint8``), nothing more.

For b in {1, 2, 4, 8} no code crosses a byte boundary (for b = 4, code 2i is the low nibble of
byte i and code 2i+1 the high nibble). For b = 3 a code may straddle two bytes; a kernel reads the
16-bit window starting at byte ``e*3//8`` and shifts by ``e*3 % 8``.

Implementation: 8 consecutive codes fill exactly ``b`` bytes, so codes are processed in groups
of 8 through one 64-bit word each, for every width alike.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "SUPPORTED_BITS"]

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width must be an integer from 1 to 8, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Number of bytes that ``count`` codes of ``bits`` bits occupy when packed."""
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


_SHIFT_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _shifts(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (bits, str(device))
    if key not in _SHIFT_CACHE:
        code_shift = torch.arange(8, dtype=torch.int64, device=device) * bits
        byte_shift = torch.arange(bits, dtype=torch.int64, device=device) * 8
        _SHIFT_CACHE[key] = (code_shift, byte_shift)
    return _SHIFT_CACHE[key]


_BYTE_SHIFT_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _byte_shifts(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, str(device))
    if key not in _BYTE_SHIFT_CACHE:
        _BYTE_SHIFT_CACHE[key] = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
    return _BYTE_SHIFT_CACHE[key]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor (see module doc)."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    count = flat.numel()
    if count and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(
            f"codes out of range for {bits}-bit packing: min {int(flat.min())}, max {int(flat.max())}"
        )
    nbytes = packed_nbytes(count, bits)
    if bits == 8:
        return flat.to(torch.uint8)
    pad = (-count) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    code_shift, byte_shift = _shifts(bits, flat.device)
    words = (flat.view(-1, 8) << code_shift).sum(dim=1)  # each word holds 8*bits <= 56 bits
    out = ((words.unsqueeze(1) >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1)
    return out[:nbytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as ``int64``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    need = packed_nbytes(count, bits)
    flat = packed.reshape(-1)
    if flat.numel() != need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {flat.numel()}")
    if bits == 8:
        return flat.to(torch.int64)
    if 8 % bits == 0:  # 1, 2, 4 bits: no code crosses a byte, shift the bytes themselves
        shifts = _byte_shifts(bits, flat.device)
        codes = (flat.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:count].to(torch.int64)
    flat = flat.to(torch.int64)
    pad = (-flat.numel()) % bits
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    code_shift, byte_shift = _shifts(bits, flat.device)
    words = (flat.view(-1, bits) << byte_shift).sum(dim=1)
    codes = (words.unsqueeze(1) >> code_shift) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]
