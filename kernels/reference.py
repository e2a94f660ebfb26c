"""Torch reference implementations. Triton kernels must reproduce these exactly (within float32
rounding) and read the same packed layout."""

from __future__ import annotations

import torch

__all__ = ["expand_blocks", "decode_blocks", "lq_linear"]


def expand_blocks(per_block: torch.Tensor, block_size: int, cols: int) -> torch.Tensor:
    """``(rows, nblocks)`` per-block values → ``(rows, cols)`` per-element values."""
    return per_block.repeat_interleave(block_size, dim=1)[:, :cols]


def decode_blocks(
    codes: torch.Tensor,
    block_size: int,
    scale: torch.Tensor,
    codebook: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """``value = lut(q) · scale[block] + offset`` for unpacked codes of shape ``(rows, cols)``.

    ``scale`` and ``zero`` are float32 ``(rows, nblocks)``; ``lut(q)`` is ``codebook[q]`` when a
    codebook is given, else ``q − zero[block]``.
    """
    rows, cols = codes.shape
    if cols % block_size == 0 and rows * cols:  # whole blocks: broadcast per block, no expanded copies
        blocks = (rows, cols // block_size, block_size)
        lut = codebook.to(torch.float32)[codes] if codebook is not None else codes.to(torch.float32)
        lut = lut.reshape(blocks)
        if codebook is None:
            lut = lut - zero.reshape(*blocks[:2], 1)
        values = (lut * scale.reshape(*blocks[:2], 1)).reshape(rows, cols)
    elif codebook is not None:
        values = codebook.to(torch.float32)[codes] * expand_blocks(scale, block_size, cols)
    else:
        s = expand_blocks(scale, block_size, cols)
        values = (codes.to(torch.float32) - expand_blocks(zero, block_size, cols)) * s
    if offset is not None:
        values = values + offset.to(torch.float32)
    return values


def lq_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + (x·Rᵀ)·Lᵀ + b`` with ``W`` the dequantized weight (out × in), ``L`` out × r and
    ``R`` r × in. Computed in the weight's dtype; the result has ``x``'s dtype."""
    if weight.device != x.device:
        raise ValueError(f"lq_linear: activations on {x.device}, weight on {weight.device}")
    dtype = weight.dtype
    xc = x.to(dtype)
    y = torch.nn.functional.linear(xc, weight, None)
    if left is not None and right is not None and left.shape[1] > 0:
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(xc, right.to(dtype)), left.to(dtype))
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)
