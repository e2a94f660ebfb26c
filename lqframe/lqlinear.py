"""``LQLinear``: the drop-in replacement for ``nn.Linear`` holding ``W ≈ Q + L·R``.

Q stays packed (uint8 codes and scales as buffers, frozen); L (out × r) and R (r × in) are
trainable float32 parameters. ``forward`` computes ``x·Qᵀ + (x·Rᵀ)·Lᵀ + b`` by handing the packed
weight (a :class:`~lqframe.QuantizedWeight` built once over the buffers) with L, R and the bias to
the kernel entry point :func:`lqframe.kernels.lq_linear_packed`, which picks the first backend
that handles the call (Triton kernels on GPUs; the torch reference everywhere), computing in the
activations' dtype. With ``cache_weight`` set (:func:`set_weight_cache`), the dequantized weight is
kept instead, for loops that run the same layer many times (calibration, evaluation).

``state_dict()`` is what is stored: L and R in their ``factor_dtype`` (:mod:`lqframe.factors`).
For ``int8`` factors the stored tensors are the packed buffers ``left_q.*`` (L) / ``right_q.*`` (Rᵀ)
(re-encoded from the parameters whenever the state is taken) and the float parameters are rebuilt
from them on load (``load_state_dict``, :meth:`LQLinear.restore_factors` after a transformers load).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lqframe.factors import (
    FLOAT_FACTOR_DTYPES,
    check_format,
    decode_factor,
    encode_factor,
    factor_bits,
    is_quantized,
    layer_factor_dtype,
)
from lqframe.kernels import lq_linear, lq_linear_packed
from lqframe.types import Decomposition, QuantizedWeight

__all__ = ["PackedStorage", "LQLinear"]

_DTYPES = {str(d).removeprefix("torch."): d
           for d in (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int32)}


class PackedStorage(nn.Module):
    """The tensors of a :class:`QuantizedWeight` as buffers (nested for double-quantized scales),
    so that ``state_dict`` holds exactly the packed bytes and scales that are stored."""

    def __init__(self, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.header = {k: v for k, v in header.items() if k != "scale"}
        self.nested = "scale" in header
        specs = header["tensors"]
        for key, spec in specs.items():
            if tensors is not None:
                value = tensors[key].detach().clone()  # own the memory (codebooks are shared constants)
            else:
                value = torch.zeros(spec["shape"], dtype=_DTYPES[spec["dtype"]])
            self.register_buffer(key, value)
        if self.nested:
            sub = {k.removeprefix("scale."): v for k, v in (tensors or {}).items() if k.startswith("scale.")}
            self.scale = PackedStorage(header["scale"], sub if tensors is not None else None)

    @staticmethod
    def describe(qweight: QuantizedWeight) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, header)`` with per-level tensor specs, ready for :class:`PackedStorage`."""
        tensors, header = qweight.to_state()

        def annotate(h: dict[str, Any], prefix: str) -> None:
            own = {k[len(prefix):]: t for k, t in tensors.items()
                   if k.startswith(prefix) and "." not in k[len(prefix):]}
            h["tensors"] = {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                            for k, t in own.items()}
            if "scale" in h:
                annotate(h["scale"], prefix + "scale.")

        annotate(header, "")
        return tensors, header

    @classmethod
    def from_qweight(cls, qweight: QuantizedWeight) -> PackedStorage:
        tensors, header = cls.describe(qweight)
        return cls(header, tensors)

    def full_header(self) -> dict[str, Any]:
        header = dict(self.header)
        if self.nested:
            header["scale"] = self.scale.full_header()
        return header

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def to_qweight(self) -> QuantizedWeight:
        return QuantizedWeight.from_state(self.tensors(), self.full_header())

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts do not: ``model.to(torch.bfloat16)`` must not re-round
        the stored float16 scales or codebooks (the format is part of the checkpoint)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return t if target.device == t.device else t.to(target.device)

        return super()._apply(move, recurse)


def _factor_header(shape: tuple[int, int], fmt: str, side: str) -> dict[str, Any]:
    """Layout of a packed factor (computed on the CPU: skeletons may be built on the meta device)."""
    with torch.device("cpu"):
        return PackedStorage.describe(encode_factor(torch.zeros(shape), fmt, side))[1]


class LQLinear(nn.Module):
    """``y = x·Qᵀ + (x·Rᵀ)·Lᵀ + b`` with Q packed and frozen, L and R trainable."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qheader: dict[str, Any],
        rank: int,
        bias: bool,
        factor_dtype: str = "float16",
        qtensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.factor_dtype = check_format(factor_dtype, "factor_dtype")
        self.meta = dict(meta or {})
        self.qweight = PackedStorage(qheader, qtensors)
        self.left = nn.Parameter(torch.zeros(out_features, rank))
        self.right = nn.Parameter(torch.zeros(rank, in_features))
        if is_quantized(self.factor_dtype):  # packed storage of the factors, kept in step on save
            self.left_q = PackedStorage(_factor_header((out_features, rank), self.factor_dtype, "left"))
            self.right_q = PackedStorage(_factor_header((rank, in_features), self.factor_dtype, "right"))
            self.register_load_state_dict_post_hook(_factors_loaded)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._cache: torch.Tensor | None = None
        self._packed: tuple[tuple[int, ...], QuantizedWeight] | None = None
        self.cache_weight = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_decomposition(
        cls, linear: nn.Linear, dec: Decomposition, meta: dict[str, Any] | None = None
    ) -> LQLinear:
        tensors, header = PackedStorage.describe(dec.qweight)
        rank = dec.rank
        factor_dtype = "float32" if dec.lowrank is None else dec.lowrank.factor_dtype
        module = cls(linear.in_features, linear.out_features, header, rank, linear.bias is not None,
                     factor_dtype=factor_dtype, qtensors=tensors, meta=meta)
        with torch.no_grad():
            if dec.lowrank is not None:
                module.left.copy_(dec.lowrank.left.to(torch.float32))
                module.right.copy_(dec.lowrank.right.to(torch.float32))
                module._encode_factors()
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach().to(torch.float32))
        return module.to(linear.weight.device)

    def layer_config(self) -> dict[str, Any]:
        """What a loader needs to rebuild this module (stored in config.json)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "factor_dtype": self.factor_dtype,
            "qweight": self.qweight.full_header(),
            "meta": self.meta,
        }

    @classmethod
    def from_layer_config(cls, config: dict[str, Any]) -> LQLinear:
        """Inverse of :meth:`layer_config`; also reads checkpoints that call ``factor_dtype``
        ``lowrank_dtype`` (:func:`~lqframe.factors.layer_factor_dtype`)."""
        return cls(config["in_features"], config["out_features"], config["qweight"], config["rank"],
                   config["bias"], layer_factor_dtype(config), meta=config.get("meta"))

    @property
    def lowrank_dtype(self) -> str:
        """Deprecated alias of :attr:`factor_dtype`."""
        return self.factor_dtype

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def quantized_weight(self) -> QuantizedWeight:
        """The packed weight, built once over the buffers (rebuilt when a buffer is replaced, e.g.
        by a device move or a loader that assigns new tensors)."""
        key = tuple(id(b) for b in self.qweight.buffers())
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, self.qweight.to_qweight())
        return self._packed[1]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q as a dense matrix, float32 unless asked otherwise (cached while ``cache_weight`` is set)."""
        if self._cache is not None and self._cache.dtype == dtype:
            return self._cache
        w = self.quantized_weight().dequantize(dtype)
        if self.cache_weight:
            self._cache = w
        return w

    def dense_weight(self) -> torch.Tensor:
        """``Q + L·R`` as float32 (for inspection and merging)."""
        return self.dequantized_weight() + self.left.detach() @ self.right.detach()

    def storage_bits(self, include_lowrank: bool = True) -> int:
        bits = self.quantized_weight().storage_bits()
        if include_lowrank:
            bits += factor_bits(tuple(self.left.shape), self.factor_dtype, "left")
            bits += factor_bits(tuple(self.right.shape), self.factor_dtype, "right")
        return bits

    def extra_repr(self) -> str:
        h = self.qweight.header
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={h.get('format')}, "
                f"bits={h.get('bits')}, group_size={h.get('block_size')}, rank={self.rank}, "
                f"bias={self.bias is not None}")

    def _apply(self, fn, recurse=True):  # dropping the caches on .to()/.cuda()
        self._cache = None
        self._packed = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_weight or self._cache is not None:
            # float64 inputs (the executor's calibration precision) are computed in float64 throughout
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            return lq_linear(x, self.dequantized_weight(dtype), self.left, self.right, self.bias)
        return lq_linear_packed(x, self.quantized_weight(), self.left, self.right, self.bias)

    # ------------------------------------------------------------------ storage of L and R
    def _encode_factors(self) -> None:
        """Refresh the packed factor buffers from the parameters (int8 factors only)."""
        if not is_quantized(self.factor_dtype) or self.left.is_meta:  # meta: a skeleton being loaded
            return
        for key in ("left", "right"):
            storage: PackedStorage = getattr(self, f"{key}_q")
            tensors, _ = encode_factor(getattr(self, key), self.factor_dtype, key).to_state()
            for name, value in tensors.items():
                getattr(storage, name).copy_(value)

    @torch.no_grad()
    def restore_factors(self) -> None:
        """Set the float parameters L and R from the packed factor buffers (after those were loaded
        by something other than ``load_state_dict``, e.g. transformers). No-op for float factors."""
        if not is_quantized(self.factor_dtype):
            return
        for key in ("left", "right"):
            value = decode_factor(getattr(self, f"{key}_q").to_qweight(), key)
            param = getattr(self, key)
            if param.is_meta or param.device != value.device:  # never materialised (transformers skips it)
                setattr(self, key, nn.Parameter(value, requires_grad=param.requires_grad))
            else:
                param.copy_(value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if is_quantized(self.factor_dtype):
            self._encode_factors()  # the children's buffers (left_q, right_q) are written after this
            for name in ("left", "right"):
                del destination[prefix + name]
            return
        dtype = FLOAT_FACTOR_DTYPES[self.factor_dtype]
        if dtype != torch.float32:
            for name in ("left", "right"):
                destination[prefix + name] = getattr(self, name).detach().to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if is_quantized(self.factor_dtype):
            # L and R are not stored: they are decoded from left_q/right_q once those are loaded
            for name in ("left", "right"):
                state_dict.setdefault(prefix + name, getattr(self, name).detach())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _factors_loaded(module: LQLinear, incompatible_keys) -> None:
    module.restore_factors()


def set_weight_cache(model: nn.Module, enabled: bool) -> None:
    """Keep (or drop) a dequantized float32 copy of every LQLinear's Q, e.g. during evaluation."""
    for module in model.modules():
        if isinstance(module, LQLinear):
            module.cache_weight = enabled
            if not enabled:
                module._cache = None
