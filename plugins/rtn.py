"""Round-to-nearest uniform integer quantization, per group of ``group_size`` input columns.

* asymmetric (default, GPTQ's convention): ``scale = (max − min)/(2^b − 1)`` with ``min ≤ 0 ≤ max``,
  zero point ``round(−min/scale)`` stored as a packed b-bit integer per group;
* symmetric: ``scale = 2·absmax/(2^b − 1)``, zero point the constant ``2^{b−1}`` (not stored).

``value = (q − zero) · scale``. Storage per parameter: ``b + (s + b)/G`` asymmetric,
``b + s/G`` symmetric, with ``s`` the bits of ``scale_dtype`` (float16: W4 g64 asym = 4.3125).
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v

from lqframe import QuantizedWeight, Quantizer, hookimpl
from lqframe.numerics import check_weight
from lqframe.quantization import (
    SCALE_DTYPES,
    blockify,
    int_format,
    int_grid,
    int_storage_bits,
    integer,
    scale_dtype,
    unblockify,
)


@attrs.frozen
class RoundToNearest(Quantizer):
    """Uniform int-k quantizer (``rtn``). ``group_size: -1`` means one group per row."""

    bits: int = attrs.field(default=4, validator=integer(1, 8))
    group_size: int = attrs.field(default=64, validator=integer())
    symmetric: bool = attrs.field(default=False, validator=v.instance_of(bool))
    scale_dtype: str = attrs.field(default="float16", validator=v.in_(tuple(SCALE_DTYPES)))

    def __attrs_post_init__(self) -> None:
        if self.group_size < 1 and self.group_size != -1:
            raise ValueError(f"group_size must be >= 1, or -1 for one group per row; got {self.group_size}")

    @classmethod
    def test_configs(cls):
        return [
            {"bits": 4, "group_size": 64},
            {"bits": 3, "group_size": 16, "symmetric": True},
            {"bits": 2, "group_size": 32, "scale_dtype": "bfloat16"},
            {"bits": 8, "group_size": -1, "scale_dtype": "float32"},
        ]

    def _group(self, cols: int) -> int:
        return max(cols, 1) if self.group_size == -1 else self.group_size

    def _encode(self, weight: torch.Tensor):
        w = check_weight(weight, f"rtn int{self.bits} quantizer")
        group = self._group(w.shape[1])
        blocks = blockify(w, group)
        maxq = (1 << self.bits) - 1
        if blocks.numel():
            hi, lo = blocks.amax(dim=2), blocks.amin(dim=2)
        else:
            hi = lo = blocks.new_zeros(blocks.shape[:2])
        stored, scale, zero = int_grid(lo, hi, self.bits, self.symmetric, scale_dtype(self.scale_dtype))
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.clamp(torch.round(blocks / safe[..., None]) + zero[..., None], 0, maxq)
        return w, group, unblockify(codes, w.shape[1]).to(torch.int64), stored, zero

    def quantize(self, weight, stats=None) -> QuantizedWeight:
        _, group, codes, stored, zero = self._encode(weight)
        return QuantizedWeight.from_codes(
            codes, self.bits, group, stored,
            zero=(1 << (self.bits - 1)) if self.symmetric else zero.to(torch.int64),
            format=int_format(self.bits, self.symmetric),
        )

    def roundtrip(self, weight, stats=None) -> torch.Tensor:
        w, group, codes, stored, zero = self._encode(weight)
        expand = lambda t: t.repeat_interleave(group, dim=1)[:, : w.shape[1]]  # noqa: E731
        return (codes.to(torch.float32) - expand(zero)) * expand(stored.to(torch.float32))

    def storage_bits(self, shape) -> int:
        return int_storage_bits(shape, self.bits, self._group(shape[1]), self.symmetric, self.scale_dtype)


@hookimpl
def lqframe_register(registry):
    registry.add_quantizer("rtn", RoundToNearest)
