"""Kernel entry point of the packed linear ``y = x·Qᵀ + (x·Rᵀ)·Lᵀ + b``.

``lq_linear_packed(x, qweight, left, right, bias)`` takes the *packed* weight (a
:class:`lqframe.QuantizedWeight`: codes in their real bits, blockwise scales, codebook or zero
points) and asks each registered backend in turn whether it handles this call (device, dtype,
format, shape); the first that does computes it. The torch reference — decode to a dense matrix
in the activations' dtype, then two matmuls — handles everything and always comes last. Triton
kernels register themselves in front of it (``register_backend(..., first=True)``) and must give
the reference's result within the compute dtype's rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from lqframe.kernels.reference import lq_linear

__all__ = ["Backend", "register_backend", "unregister_backend", "backends", "select_backend", "lq_linear_packed",
           "compute_dtype"]


@attrs.frozen
class Backend:
    """``supports(x, qweight) -> bool``; ``run(x, qweight, left, right, bias) -> y``."""

    name: str
    supports: Callable[[torch.Tensor, Any], bool]
    run: Callable[..., torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the packed linear computes in: the activations' own floating dtype."""
    return x.dtype if x.is_floating_point() else torch.float32


def _reference(x: torch.Tensor, qweight: Any, left, right, bias) -> torch.Tensor:
    return lq_linear(x, qweight.dequantize(compute_dtype(x)), left, right, bias)


REFERENCE = Backend("torch-reference", lambda x, qweight: True, _reference)
_BACKENDS: list[Backend] = [REFERENCE]


def register_backend(backend: Backend, *, first: bool = True) -> None:
    """Add a backend (in front of the others by default; the reference always stays last)."""
    unregister_backend(backend.name)
    if first:
        _BACKENDS.insert(0, backend)
    else:
        _BACKENDS.insert(len(_BACKENDS) - 1, backend)


def unregister_backend(name: str) -> None:
    if name == REFERENCE.name:
        raise ValueError("the torch reference backend cannot be removed")
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != name]


def backends() -> list[Backend]:
    return list(_BACKENDS)


def select_backend(x: torch.Tensor, qweight: Any) -> Backend:
    for backend in _BACKENDS:
        if backend.supports(x, qweight):
            return backend
    return REFERENCE  # pragma: no cover - the reference supports everything


def lq_linear_packed(x: torch.Tensor, qweight: Any, left: torch.Tensor | None, right: torch.Tensor | None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x·Qᵀ + (x·Rᵀ)·Lᵀ + b`` from the packed ``qweight`` (see module doc); result in ``x``'s dtype."""
    return select_backend(x, qweight).run(x, qweight, left, right, bias)
