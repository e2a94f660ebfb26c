"""Kernel entry point of the packed linear ``y = x·Qᵀ + (x·Rᵀ)·Lᵀ + b``.

``lq_linear_packed(x, qweight, left, right, bias)`` takes the *packed* weight (a
:class:`lqframe.QuantizedWeight`: codes in their real bits, blockwise scales, codebook or zero
points) and asks each registered backend in turn whether it handles this call (device, dtype,
format, shape); the first that does computes it. The torch reference — decode to a dense matrix
in the activations' dtype, then two matmuls — handles everything and always comes last. Triton
kernels register themselves in front of it (``register_backend(..., first=True)``) and must give
the reference's result within the compute dtype's rounding.

The Triton backend (:mod:`lqframe.kernels.triton_lq`) is registered here and imported at its first
use. ``LQFRAME_KERNELS`` selects: ``auto`` (default: Triton for CUDA tensors, the reference
elsewhere), ``triton`` (Triton for every call it can take, CPU tensors included when
``TRITON_INTERPRET=1`` — for tests; an error when Triton cannot run at all) or ``reference``.
Calls that need gradients (tuning) always take the reference: the kernels are forward-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import torch

from lqframe.kernels.reference import lq_linear

__all__ = ["Backend", "register_backend", "unregister_backend", "backends", "select_backend", "lq_linear_packed",
           "compute_dtype", "kernel_mode", "KERNEL_MODES"]

#: values of ``LQFRAME_KERNELS``
KERNEL_MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    """The backend selection asked for by ``LQFRAME_KERNELS`` (read at every call)."""
    mode = os.environ.get("LQFRAME_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"LQFRAME_KERNELS={mode!r}: expected one of {', '.join(KERNEL_MODES)}")
    return mode


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
    return lq_linear(x, qweight.dequantize(compute_dtype(x), stored=True), left, right, bias)


REFERENCE = Backend("torch-reference", lambda x, qweight: True, _reference)

_TRITON: dict[str, Any] = {}


def _triton_module():
    """``lqframe.kernels.triton_lq``, imported once (None when Triton cannot be imported)."""
    if "module" not in _TRITON:
        try:
            from lqframe.kernels import triton_lq
        except Exception as exc:  # triton missing or without a driver
            _TRITON["module"], _TRITON["error"] = None, exc
        else:
            _TRITON["module"] = triton_lq
    return _TRITON["module"]


def _triton_supports(x: torch.Tensor, qweight: Any) -> bool:
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "auto" and not x.is_cuda:
        return False
    module = _triton_module()
    if module is None:
        if mode == "triton":
            raise RuntimeError(f"LQFRAME_KERNELS=triton, but Triton cannot be used here: {_TRITON['error']}")
        return False
    if not x.is_cuda and not module.INTERPRETER:
        if mode == "triton":
            raise RuntimeError("LQFRAME_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before "
                               "the first call)")
        return False
    from lqframe.kernels.layout import layout_supported

    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32) and qweight.codes.device == x.device
            and x.shape[-1] > 0 and qweight.rows > 0 and layout_supported(qweight) is None)


def _triton_run(x: torch.Tensor, qweight: Any, left, right, bias) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, left, right)):
        return _reference(x, qweight, left, right, bias)  # gradients needed: the differentiable reference
    return _triton_module().lq_linear_triton(x, qweight, left, right, bias)


TRITON = Backend("triton", _triton_supports, _triton_run)
_BACKENDS: list[Backend] = [TRITON, REFERENCE]


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
    """``x·Qᵀ + (x·Rᵀ)·Lᵀ + b`` from the packed ``qweight`` (see module doc); result in ``x``'s dtype.

    For a weight whose columns are stored permuted (``qweight.perm``, act-order imports) ``x`` and
    ``R`` are put in stored order here, so every backend reads the stored columns as they are."""
    perm = getattr(qweight, "perm", None)
    if perm is not None:
        x = x.index_select(-1, perm)
        right = right.index_select(1, perm) if right is not None else None
    return select_backend(x, qweight).run(x, qweight, left, right, bias)
