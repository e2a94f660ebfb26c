"""Core value types: packed quantized weights, low-rank terms, decompositions, statistics,
cost tables and allocation choices.

Everything a quantizer produces is a :class:`QuantizedWeight`: codes packed in their real bit
width (``lqframe.kernels.packing`` layout), one scale per block of ``block_size`` consecutive
elements along the last axis (blocks never span two rows), and either a codebook (NormalFloat and
other lookup formats) or an integer grid with a zero point. Scales may themselves be a
``QuantizedWeight`` (double quantisation). One decoding rule covers every format::

    value = lut(q) * scale[block] + offset
    lut(q) = codebook[q]            (codebook formats)
           = q - zero[block]        (integer formats; zero a constant or packed per block)

so kernels and checkpoints need to know nothing about the method that produced the codes.

A weight may carry ``perm`` (int32, one entry per column): its columns are *stored* in that order
— stored column ``j`` holds input channel ``perm[j]`` — so that groups may be any equal-sized sets
of input channels, as GPTQ's act-order (``desc_act``, ``g_idx``) makes them. Codes, scales and zero
points are in stored order; :meth:`QuantizedWeight.dequantize` returns the matrix in the input's
order. Kernels read the stored columns and take the input in stored order
(:func:`lqframe.kernels.lq_linear_packed` permutes it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from lqframe.errors import MissingStatisticError
from lqframe.kernels.packing import pack_bits, packed_nbytes, unpack_bits
from lqframe.kernels.reference import decode_blocks, expand_blocks
from lqframe.quantization import factor_bits

__all__ = [
    "QuantizedWeight",
    "LowRank",
    "Decomposition",
    "LayerStats",
    "CostTable",
    "Choice",
    "STAT_NAMES",
    "OUTPUT_NAMES",
    "average_bits",
]


def _shape(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


@attrs.frozen(eq=False)
class QuantizedWeight:
    """A tensor stored as packed low-bit codes with blockwise scales (see module doc)."""

    codes: torch.Tensor = attrs.field()
    bits: int = attrs.field(converter=int)
    shape: tuple[int, ...] = attrs.field(converter=_shape)
    block_size: int = attrs.field(converter=int)
    scale: torch.Tensor | QuantizedWeight = attrs.field()
    zero: int | torch.Tensor | None = attrs.field(default=None)
    codebook: torch.Tensor | None = attrs.field(default=None)
    offset: torch.Tensor | None = attrs.field(default=None)
    format: str = attrs.field(default="")
    meta: Mapping[str, Any] = attrs.field(factory=dict)
    perm: torch.Tensor | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be 1..8, got {self.bits}")
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 1:
            raise ValueError("codes must be a flat uint8 tensor of packed codes")
        if len(self.shape) < 1 or min(self.shape) < 0:
            raise ValueError(f"bad logical shape {self.shape}")
        if self.codes.numel() != packed_nbytes(self.numel, self.bits):
            raise ValueError(
                f"{self.numel} codes of {self.bits} bits need {packed_nbytes(self.numel, self.bits)} "
                f"bytes, got {self.codes.numel()}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        scale_numel = self.scale.numel if isinstance(self.scale, QuantizedWeight) else self.scale.numel()
        if scale_numel != self.nblocks_total:
            raise ValueError(f"expected {self.nblocks_total} scales, got {scale_numel}")
        if self.codebook is not None and self.codebook.numel() != (1 << self.bits):
            raise ValueError(f"codebook must have {1 << self.bits} entries, got {self.codebook.numel()}")
        if self.codebook is not None and self.zero is not None:
            raise ValueError("a codebook format has no zero point")
        if isinstance(self.zero, torch.Tensor):
            if self.zero.dtype != torch.uint8 or self.zero.numel() != packed_nbytes(
                self.nblocks_total, self.bits
            ):
                raise ValueError("zero points must be packed uint8, one per block")
        if self.perm is not None:
            p = self.perm
            if p.dtype != torch.int32 or p.dim() != 1 or p.numel() != self.cols:
                raise ValueError(f"perm must be a 1-d int32 tensor of {self.cols} column indices")
            if not torch.equal(torch.sort(p.to(torch.int64)).values, torch.arange(self.cols, device=p.device)):
                raise ValueError("perm must be a permutation of the columns")

    # ----------------------------------------------------------------- geometry
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def blocks_per_row(self) -> int:
        return -(-self.cols // self.block_size) if self.cols else 0

    @property
    def nblocks_total(self) -> int:
        return self.rows * self.blocks_per_row

    # ----------------------------------------------------------------- decoding
    def inverse_perm(self) -> torch.Tensor | None:
        """Where each input channel is stored (int64: ``stored[:, inverse[i]]`` is input channel i),
        or None without ``perm``."""
        return None if self.perm is None else torch.argsort(self.perm.to(torch.int64))

    def unpacked_codes(self) -> torch.Tensor:
        """Codes as int64 in the logical shape (columns in stored order, see ``perm``)."""
        return unpack_bits(self.codes, self.bits, self.numel).reshape(self.shape)

    def block_scales(self) -> torch.Tensor:
        """Decoded scales, float32, shape ``(rows, blocks_per_row)``."""
        s = self.scale.dequantize() if isinstance(self.scale, QuantizedWeight) else self.scale
        return s.to(torch.float32).reshape(self.rows, self.blocks_per_row)

    def block_zeros(self) -> torch.Tensor | None:
        """Zero points as float32, shape ``(rows, blocks_per_row)``, or None for codebook formats."""
        if self.codebook is not None:
            return None
        if isinstance(self.zero, torch.Tensor):
            z = unpack_bits(self.zero, self.bits, self.nblocks_total).to(torch.float32)
            return z.reshape(self.rows, self.blocks_per_row)
        z = float(self.zero or 0)
        return torch.full((self.rows, self.blocks_per_row), z, dtype=torch.float32, device=self.codes.device)

    def _expand(self, per_block: torch.Tensor) -> torch.Tensor:
        return expand_blocks(per_block, self.block_size, self.cols).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, *, stored: bool = False) -> torch.Tensor:
        """The dense tensor these codes represent (``stored``: its columns in stored order, see
        ``perm``; the kernels compute in that order)."""
        values = decode_blocks(
            self.unpacked_codes().reshape(self.rows, self.cols),
            self.block_size,
            self.block_scales(),
            codebook=self.codebook,
            zero=self.block_zeros(),
            offset=self.offset,
        )
        if self.perm is not None and not stored:  # back to the input's order
            values = values.index_select(1, self.inverse_perm().to(values.device))
        return values.reshape(self.shape).to(dtype)

    def error_bound(self, reference: torch.Tensor) -> torch.Tensor:
        """Per element, the distance from ``reference`` to the nearest value its block represents.

        Per block the representable values are ``lut * scale + offset``; this is exactly the error
        of rounding to the nearest of them (an element outside their range: the distance to the
        nearer end), so a quantizer that rounds to nearest never errs by more, and one that picks the
        second-nearest value anywhere does. Computed per element against the two grid values around
        it (and their neighbours, against rounding of the division), in float32 as the decoder does.
        """
        x = reference.to(torch.float32).reshape(self.rows, self.cols)
        if x.numel() == 0:
            return x.reshape(self.shape)
        if self.perm is not None:  # compare in stored order; answered in the input's order
            x = x.index_select(1, self.perm.to(device=x.device, dtype=torch.int64))
        scale = expand_blocks(self.block_scales(), self.block_size, self.cols)
        offset = self.offset.to(torch.float32) if self.offset is not None else 0.0  # broadcast as decoded
        if self.codebook is not None:
            lut = torch.sort(self.codebook.to(torch.float32)).values
            shift = torch.zeros((), device=x.device)
        else:
            lut = torch.arange(1 << self.bits, dtype=torch.float32, device=x.device)
            shift = expand_blocks(self.block_zeros(), self.block_size, self.cols)  # lut(q) = q − zero
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        position = torch.where(scale == 0, torch.zeros_like(x), (x - offset) / safe + shift)
        index = torch.searchsorted(lut, position.contiguous())
        best = torch.full_like(x, float("inf"))
        for step in (-2, -1, 0, 1):
            candidate = lut[(index + step).clamp(0, lut.numel() - 1)]
            best = torch.minimum(best, (x - ((candidate - shift) * scale + offset)).abs())
        if self.perm is not None:
            best = best.index_select(1, self.inverse_perm().to(best.device))
        return best.reshape(self.shape)

    # ----------------------------------------------------------------- storage
    def storage_bits(self) -> int:
        """Exact number of bits this weight occupies on disk: packed codes, scales (recursively),
        zero points, offsets and a column order. A codebook is a format constant shared by every
        matrix of the format and is not counted per matrix."""
        bits = self.codes.numel() * 8
        bits += self.scale.storage_bits() if isinstance(self.scale, QuantizedWeight) else _tensor_bits(
            self.scale
        )
        if isinstance(self.zero, torch.Tensor):
            bits += self.zero.numel() * 8
        if self.offset is not None:
            bits += _tensor_bits(self.offset)
        if self.perm is not None:
            bits += _tensor_bits(self.perm)
        return bits

    def bits_per_param(self) -> float:
        return self.storage_bits() / max(self.numel, 1)

    # ----------------------------------------------------------------- (de)serialisation
    def to_state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flatten into named tensors (as stored, no conversion) and a JSON-able header."""
        tensors: dict[str, torch.Tensor] = {prefix + "codes": self.codes}
        header: dict[str, Any] = {
            "bits": self.bits,
            "shape": list(self.shape),
            "block_size": self.block_size,
            "format": self.format,
            "meta": dict(self.meta),
        }
        if isinstance(self.scale, QuantizedWeight):
            sub_t, sub_h = self.scale.to_state(prefix + "scale.")
            tensors.update(sub_t)
            header["scale"] = sub_h
        else:
            tensors[prefix + "scale"] = self.scale
        if isinstance(self.zero, torch.Tensor):
            tensors[prefix + "zero"] = self.zero
        else:
            header["zero"] = self.zero
        if self.codebook is not None:
            tensors[prefix + "codebook"] = self.codebook
        if self.offset is not None:
            tensors[prefix + "offset"] = self.offset
        if self.perm is not None:
            tensors[prefix + "perm"] = self.perm
        return tensors, header

    @classmethod
    def from_state(
        cls, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any], prefix: str = ""
    ) -> QuantizedWeight:
        if "scale" in header:
            scale: torch.Tensor | QuantizedWeight = cls.from_state(tensors, header["scale"], prefix + "scale.")
        else:
            scale = tensors[prefix + "scale"]
        zero = tensors.get(prefix + "zero", header.get("zero"))
        return cls(
            codes=tensors[prefix + "codes"],
            bits=header["bits"],
            shape=header["shape"],
            block_size=header["block_size"],
            scale=scale,
            zero=zero,
            codebook=tensors.get(prefix + "codebook"),
            offset=tensors.get(prefix + "offset"),
            format=header.get("format", ""),
            meta=header.get("meta", {}),
            perm=tensors.get(prefix + "perm"),
        )

    # ----------------------------------------------------------------- construction helper
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        bits: int,
        block_size: int,
        scale: torch.Tensor | QuantizedWeight,
        **kwargs: Any,
    ) -> QuantizedWeight:
        """Build from unpacked integer codes of the logical shape (packs them)."""
        zero = kwargs.pop("zero", None)
        if isinstance(zero, torch.Tensor):
            zero = pack_bits(zero.reshape(-1), bits)
        return cls(
            codes=pack_bits(codes, bits),
            bits=bits,
            shape=tuple(codes.shape),
            block_size=block_size,
            scale=scale,
            zero=zero,
            **kwargs,
        )


@attrs.frozen(eq=False)
class LowRank:
    """The low-rank term ``L·R`` with ``left`` (n×r) and ``right`` (r×m).

    ``factor_dtype`` is the factors' storage format (:mod:`lqframe.factors`; the reconstructors'
    ``factor_dtype`` option, an ``LQLinear``'s ``factor_dtype``): by default the tensors' dtype;
    ``int8`` factors are float32 tensors holding values on the int8 grid."""

    left: torch.Tensor
    right: torch.Tensor
    factor_dtype: str = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(
                f"low-rank factors do not chain: left {tuple(self.left.shape)}, right {tuple(self.right.shape)}"
            )
        if self.factor_dtype is None:
            object.__setattr__(self, "factor_dtype", str(self.left.dtype).removeprefix("torch."))

    @property
    def format(self) -> str:
        """Deprecated alias of :attr:`factor_dtype`."""
        return self.factor_dtype

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.left.to(torch.float32) @ self.right.to(torch.float32)).to(dtype)

    def storage_bits(self) -> int:
        return (factor_bits(tuple(self.left.shape), self.factor_dtype, "left")
                + factor_bits(tuple(self.right.shape), self.factor_dtype, "right"))


@attrs.frozen(eq=False)
class Decomposition:
    """``W ≈ Q + L·R``: the packed part and an optional low-rank part, plus solver diagnostics."""

    qweight: QuantizedWeight
    lowrank: LowRank | None = None
    info: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.lowrank is not None and tuple(self.lowrank.shape) != tuple(self.qweight.shape):
            raise ValueError(f"low-rank shape {self.lowrank.shape} != quantized shape {self.qweight.shape}")

    @property
    def rank(self) -> int:
        return 0 if self.lowrank is None else self.lowrank.rank

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.qweight.dequantize(torch.float32)
        if self.lowrank is not None:
            w = w + self.lowrank.to_dense()
        return w.to(dtype)

    def storage_bits(self, include_lowrank: bool = True) -> int:
        bits = self.qweight.storage_bits()
        if include_lowrank and self.lowrank is not None:
            bits += self.lowrank.storage_bits()
        return bits


# --------------------------------------------------------------------------- statistics

#: Statistics a plugin may declare in ``needs``:
#: ``rxx`` Σ xxᵀ (m×m, float64) — QERA-exact, and GPTQ's Hessian ``2·rxx/n``;
#: ``sq_sum`` Σ x² per input channel (float64) — QERA-approx;
#: ``abs_mean_max`` running max over batches of the per-batch mean |x| per channel — LQER;
#: ``abs_sum`` Σ |x| per channel (float64);
#: ``fisher`` Σ grad² of the weight (n×m, float64) — data-aware LQ-LoRA.
STAT_NAMES = frozenset({"rxx", "sq_sum", "abs_sum", "abs_mean_max", "fisher"})

#: Model outputs a loss objective may declare (``LossObjective.needs`` / ``outputs``):
#: ``hidden`` the final hidden state after the last norm (batch × seq × d) — RILQ's model loss;
#: ``logits`` the language-model head's output (batch × seq × vocab);
#: ``blocks`` every decoder block's output, stacked (blocks × batch × seq × d) — a layer loss.
OUTPUT_NAMES = frozenset({"hidden", "logits", "blocks"})


@attrs.frozen(eq=False)
class LayerStats:
    """Calibration statistics of one linear layer's input (and optionally its weight gradient)."""

    n_tokens: int = 0
    rxx: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    abs_mean_max: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    #: statistics of kinds added by plugins (``registry.add_statistic``), by name
    extra: Mapping[str, torch.Tensor] = attrs.field(factory=dict)
    #: quantities derived from these statistics (see :meth:`cached`); never compared or copied
    memo: dict[Any, Any] = attrs.field(factory=dict, repr=False, kw_only=True)

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per ``key`` for these statistics. Linears that read the same input
        (q/k/v, gate/up) get the very same ``LayerStats``, so a quantity derived from the input's
        statistics alone — QERA's ``E[xxᵀ]^{1/2}``, GPTQ's damped inverse Hessian — is computed
        once per input instead of once per layer. ``key`` must name every option the quantity
        depends on (e.g. ``("qera-exact", root, eig_floor)``)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def available(self) -> frozenset[str]:
        return frozenset(n for n in STAT_NAMES if getattr(self, n) is not None) | frozenset(self.extra)

    def available_items(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of every statistic present."""
        return [(name, self.get(name)) for name in sorted(self.available())]

    def get(self, name: str) -> torch.Tensor | None:
        """A statistic by name, built-in or plugin-defined (None when not captured)."""
        return getattr(self, name) if name in STAT_NAMES else self.extra.get(name)

    def require(self, needs: Iterable[str], who: str) -> None:
        missing = sorted(set(needs) - self.available())
        if missing:
            raise MissingStatisticError(
                f"{who} needs calibration statistics {missing}, which were not captured "
                f"(available: {sorted(self.available()) or 'none'})"
            )

    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2/N Σ xxᵀ`` (float64)."""
        self.require({"rxx"}, "hessian()")
        return self.rxx * (2.0 / max(self.n_tokens, 1))

    def second_moment(self) -> torch.Tensor:
        """``E[xxᵀ]`` (float64)."""
        self.require({"rxx"}, "second_moment()")
        return self.rxx / max(self.n_tokens, 1)

    def rms(self) -> torch.Tensor:
        """Per-channel ``sqrt(E[x²])`` (float64), from ``sq_sum`` or the diagonal of ``rxx``."""
        if self.sq_sum is not None:
            total = self.sq_sum
        elif self.rxx is not None:
            total = torch.diagonal(self.rxx)
        else:
            self.require({"sq_sum"}, "rms()")
        return (total / max(self.n_tokens, 1)).sqrt()


# --------------------------------------------------------------------------- allocation


@attrs.frozen(eq=False)
class CostTable:
    """Candidate configurations per matrix: ``cost[i, c]`` the error of matrix ``i`` under config
    ``c`` (any non-negative scale; ``inf`` marks an impossible pair) and ``bits[i, c]`` its exact
    storage in bits. ``numel[i]`` counts the matrix's parameters."""

    layers: tuple[str, ...] = attrs.field(converter=tuple)
    configs: tuple[Mapping[str, Any], ...] = attrs.field(converter=tuple)
    cost: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.float64))
    bits: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.float64))
    numel: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))

    def __attrs_post_init__(self) -> None:
        shape = (len(self.layers), len(self.configs))
        for name in ("cost", "bits"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {getattr(self, name).shape}")
        if self.numel.shape != (len(self.layers),):
            raise ValueError(f"numel must have shape ({len(self.layers)},), got {self.numel.shape}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layer names in a cost table must be unique")
        if np.isnan(self.cost).any() or (self.cost < 0).any():
            raise ValueError("costs must be non-negative numbers (inf marks an impossible choice)")

    @property
    def total_params(self) -> int:
        return int(self.numel.sum())

    def choice(self, layer_index: int, config_index: int) -> Choice:
        return Choice(
            layer=self.layers[layer_index],
            index=config_index,
            config=self.configs[config_index],
            bits=float(self.bits[layer_index, config_index]),
            cost=float(self.cost[layer_index, config_index]),
        )


@attrs.frozen
class Choice:
    """The configuration an allocator picked for one matrix."""

    layer: str
    index: int
    config: Mapping[str, Any]
    bits: float
    cost: float


def average_bits(choices: Mapping[str, Choice] | Sequence[Choice], table: CostTable) -> float:
    """Storage bits per parameter of an allocation over the table's matrices."""
    values = choices.values() if isinstance(choices, Mapping) else choices
    return sum(c.bits for c in values) / max(table.total_params, 1)
