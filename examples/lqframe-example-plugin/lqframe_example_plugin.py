"""An example third-party lqframe plugin: the ``binary`` quantizer.

1-bit sign quantization with one scale per group of ``group_size`` consecutive input columns,
in the style of XNOR-Net and BitNet: every element of a group becomes ``+s`` or ``−s`` with
``s = mean |x|`` over the group, the scale that minimises the group's squared error for a fixed
sign pattern.

Storage format (lqframe's generic codebook rule ``value = codebook[q] · scale[group]``):

* codes: 1 bit per element, ``0 → −1`` and ``1 → +1`` (codebook ``[-1.0, 1.0]``, float32), packed
  in lqframe's dense LSB-first layout; elements equal to zero (including ``-0.0``) get code 1;
* scales: one per group in ``scale_dtype``, rounded *up* to the next representable value by
  :func:`lqframe.quantization.store_scales`; a row's last group may be shorter than
  ``group_size`` and its mean is taken over its real elements only.

Storage per matrix of shape ``(n, m)``: ``ceil(n·m / 8) · 8`` bits of codes plus
``n · ceil(m / group_size)`` scales of 16 or 32 bits (float16 g64: 1.25 bits per parameter).

The module only uses lqframe's public API, so it doubles as a template for new plugins.
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v

import lqframe
from lqframe.numerics import check_weight
from lqframe.quantization import SCALE_DTYPES, blockify, scale_dtype, store_scales, unblockify

__all__ = ["BinaryQuantizer", "CODEBOOK", "lqframe_register"]

#: the two code values, indexed by the code: 0 → −1, 1 → +1
CODEBOOK = torch.tensor([-1.0, 1.0], dtype=torch.float32)


def _positive_int(instance: object, attribute: attrs.Attribute, value: object) -> None:
    # bool is a subclass of int; reject it explicitly so ``group_size: true`` is an error
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen
class BinaryQuantizer(lqframe.Quantizer):
    """Sign quantizer (``binary``): ``±mean|x|`` per group of ``group_size`` input columns."""

    group_size: int = attrs.field(default=64, validator=_positive_int)
    scale_dtype: str = attrs.field(default="float16", validator=v.in_(tuple(SCALE_DTYPES)))

    # Every decoded value is the nearer of the group's two grid points ±s, so the framework's
    # rounding-error property test (``QuantizedWeight.error_bound``) applies.
    rounds_to_nearest = True

    @classmethod
    def test_configs(cls):
        return [{"group_size": 16}, {"group_size": 64, "scale_dtype": "float32"}]

    def _encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (int64, logical shape), stored scales and decoded float32 scales (rows, groups)."""
        w = check_weight(weight, "binary quantizer")
        rows, cols = w.shape
        blocks = blockify(w, self.group_size)  # (rows, groups, group_size), zero-padded
        ngroups = blocks.shape[1]
        # Elements per group: group_size, except a shorter last group when cols is not a multiple.
        starts = torch.arange(ngroups, dtype=torch.float32) * self.group_size
        counts = torch.clamp(cols - starts, max=self.group_size)
        mean_abs = blocks.abs().sum(dim=2) / counts  # the zero padding adds nothing to the sum
        stored = store_scales(mean_abs, scale_dtype(self.scale_dtype), "binary group scale")
        codes = unblockify((blocks >= 0).to(torch.int64), cols)
        return codes, stored, stored.to(torch.float32)

    def quantize(self, weight, stats=None) -> lqframe.QuantizedWeight:
        codes, stored, _ = self._encode(weight)
        return lqframe.QuantizedWeight.from_codes(
            codes, 1, self.group_size, stored, codebook=CODEBOOK.clone(), format="binary"
        )

    def roundtrip(self, weight, stats=None) -> torch.Tensor:
        # Same numbers as quantize(...).dequantize(), without packing and unpacking the codes.
        codes, _, decoded = self._encode(weight)
        scale = decoded.repeat_interleave(self.group_size, dim=1)[:, : codes.shape[1]]
        return CODEBOOK[codes] * scale

    def storage_bits(self, shape) -> int:
        n, m = shape
        ngroups = n * (-(-m // self.group_size))
        code_bits = -(-n * m // 8) * 8
        return code_bits + ngroups * torch.finfo(SCALE_DTYPES[self.scale_dtype]).bits


@lqframe.hookimpl
def lqframe_register(registry):
    registry.add_quantizer("binary", BinaryQuantizer)
