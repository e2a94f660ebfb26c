"""NormalFloat-k quantization (QLoRA NF4, LQ-LoRA's NF-k), blockwise absmax, with optional double
quantization of the block scales in either the QLoRA (bitsandbytes) or the LQ-LoRA style.

Code values (METHODS.md §0.1): with ``δ = 0.9677083`` and ``σ`` such that ``Φ_σ(δ) = 1``, the
quantiles ``linspace(1-δ, ½, 2^{k-1})[:-1] ∪ linspace(½, δ, 2^{k-1}+1)`` of ``N(0, σ)``; for k = 4
these are bitsandbytes' NF4 values. The codebook and the plain (not double-quantized) format live in
:mod:`lqframe.quantization`, shared with ``gptq grid: nf``.

Double quantization (``double_quant``):

* ``qlora`` (bitsandbytes, §0.2): subtract the mean of the block absmaxes, quantize the rest with
  the signed 8-bit dynamic tree map in blocks of ``dq_group_size`` (256) with a float32 absmax
  each. NF4 g64: ``4 + 8/64 + 32/(64·256) = 4.127`` bits per parameter.
* ``lqlora`` (LQ-LoRA, §0.3): subtract the minimum, quantize to unsigned ``dq_bits``-bit integers
  with one ``dq_scale_dtype`` step per ``dq_group_size`` scales:
  ``k + b0/B0 + b1/(B0·B1)`` bits per parameter.

Each matrix also stores one float32 offset (32 bits) when double-quantized; it is counted.
"""

from __future__ import annotations

import functools

import attrs
import torch
from attrs import validators as v

from lqframe import QuantizedWeight, Quantizer, hookimpl
from lqframe.numerics import check_weight
from lqframe.quantization import (  # noqa: F401 - NF_OFFSET, NF4_VALUES, normal_float_formula: re-exported
    NF4_VALUES,
    NF_OFFSET,
    SCALE_DTYPES,
    codebook_quantize,
    integer,
    nf_format,
    nf_grid,
    nf_storage_bits,
    normal_float_codebook,
    normal_float_formula,
    packed_code_bits,
    scale_bits,
    scale_dtype,
    store_scales,
)


@functools.cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic tree map (256 values in [-1, 1], increasing).

    For each of 7 decades ``10^{i-6}``, ``2^i`` magnitudes at the midpoints of ``linspace(0.1, 1,
    2^i + 1)``, with both signs; plus 0 and 1.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float64, device="cpu")
        mids = ((edges[:-1] + edges[1:]) / 2) * (10.0 ** (i - 6))
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@attrs.frozen
class NormalFloat(Quantizer):
    """NF-k blockwise quantizer (``nf``)."""

    bits: int = attrs.field(default=4, validator=integer(2, 8))
    group_size: int = attrs.field(default=64, validator=integer(1))
    double_quant: str = attrs.field(default="none", validator=v.in_(("none", "qlora", "lqlora")))
    scale_dtype: str = attrs.field(default="float16", validator=v.in_(tuple(SCALE_DTYPES)))
    dq_bits: int = attrs.field(default=8, validator=integer(2, 8))
    dq_group_size: int = attrs.field(default=256, validator=integer(1))
    dq_scale_dtype: str = attrs.field(default="float32", validator=v.in_(tuple(SCALE_DTYPES)))

    def __attrs_post_init__(self) -> None:
        if self.double_quant == "qlora" and self.dq_bits != 8:
            raise ValueError("double_quant 'qlora' uses the 8-bit dynamic map: dq_bits must be 8")

    @classmethod
    def test_configs(cls):
        return [
            {"bits": 4, "group_size": 64, "double_quant": "qlora"},
            {"bits": 3, "group_size": 16},
            {"bits": 2, "group_size": 32, "double_quant": "lqlora", "dq_bits": 3, "dq_group_size": 16,
             "dq_scale_dtype": "bfloat16"},
            {"bits": 8, "group_size": 16, "scale_dtype": "float32"},
        ]

    @property
    def format_name(self) -> str:
        return nf_format(self.bits)

    # ------------------------------------------------------------------ scales
    def _encode_scales(self, absmax: torch.Tensor) -> tuple[torch.Tensor | QuantizedWeight, torch.Tensor]:
        """Block absmaxes → (what is stored, the decoded float32 scales the codes are rounded with)."""
        if self.double_quant == "none":
            return nf_grid(absmax, scale_dtype(self.scale_dtype))
        flat = absmax.reshape(1, -1)
        outer = scale_dtype(self.dq_scale_dtype)
        if self.double_quant == "qlora":
            offset = (flat.mean() if flat.numel() else flat.new_zeros(())).reshape(1)

            def encode_outer(a: torch.Tensor):
                s = store_scales(a, outer, "double-quant absmax")
                return s, s.to(torch.float32)

            codes, s2, _ = codebook_quantize(flat - offset, dynamic_map(flat.device), self.dq_group_size, encode_outer)
            nested = QuantizedWeight.from_codes(
                codes.reshape(-1), 8, self.dq_group_size, s2.reshape(-1), codebook=dynamic_map(flat.device),
                offset=offset, format="dynamic8",
            )
        else:  # lqlora: unsigned dq_bits-bit integers above the minimum
            offset = (flat.min() if flat.numel() else flat.new_zeros(())).reshape(1)
            maxq = (1 << self.dq_bits) - 1
            shifted = (flat - offset).reshape(-1)
            pad = (-shifted.numel()) % self.dq_group_size
            groups = torch.nn.functional.pad(shifted, (0, pad)).reshape(-1, self.dq_group_size)
            step = store_scales(groups.amax(dim=1) / maxq, outer, "double-quant step")
            step_f = step.to(torch.float32)
            safe = torch.where(step_f == 0, torch.ones_like(step_f), step_f)
            codes = torch.clamp(torch.round(groups / safe[:, None]), 0, maxq).to(torch.int64)
            nested = QuantizedWeight.from_codes(
                codes.reshape(-1)[: shifted.numel()], self.dq_bits, self.dq_group_size, step, zero=0,
                offset=offset, format=f"uint{self.dq_bits}",
            )
        return nested, nested.dequantize().reshape(absmax.shape)

    # ------------------------------------------------------------------ quantize
    def _encode(self, weight: torch.Tensor):
        w = check_weight(weight, f"nf{self.bits} quantizer")
        return w, codebook_quantize(w, normal_float_codebook(self.bits, w.device), self.group_size,
                                    self._encode_scales)

    def quantize(self, weight, stats=None) -> QuantizedWeight:
        _, (codes, stored, _) = self._encode(weight)
        return QuantizedWeight.from_codes(
            codes, self.bits, self.group_size, stored, codebook=normal_float_codebook(self.bits, codes.device),
            format=self.format_name, meta={"double_quant": self.double_quant},
        )

    def roundtrip(self, weight, stats=None) -> torch.Tensor:
        w, (codes, _, decoded) = self._encode(weight)
        scale = decoded.repeat_interleave(self.group_size, dim=1)[:, : w.shape[1]]
        return normal_float_codebook(self.bits, codes.device)[codes] * scale

    # ------------------------------------------------------------------ storage
    def storage_bits(self, shape) -> int:
        if self.double_quant == "none":
            return nf_storage_bits(shape, self.bits, self.group_size, self.scale_dtype)
        n, m = shape
        nscales = n * (-(-m // self.group_size) if m else 0)
        ngroups = -(-nscales // self.dq_group_size)
        dq_code_bits = 8 if self.double_quant == "qlora" else self.dq_bits
        bits = packed_code_bits(n * m, self.bits) + packed_code_bits(nscales, dq_code_bits)
        bits += ngroups * scale_bits(self.dq_scale_dtype)
        return bits + 32  # the float32 offset


@hookimpl
def lqframe_register(registry):
    registry.add_quantizer("nf", NormalFloat)
