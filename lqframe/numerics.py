"""Shared numerics: input checks, the one weighted low-rank solve every reconstructor uses, and
symmetric matrix square roots.

The weighted low-rank solve (METHODS.md §9.3)::

    C = S⁻¹ [S Δ T]_r T⁻¹          Δ ∈ R^{n×m}

with ``S`` (rows, n) and ``T`` (columns, m) each the identity, a positive diagonal or a full
symmetric positive-definite matrix. S = T = I is the plain truncated SVD (LoRC, LoftQ); a
diagonal T is QERA-approx / LQER; a full T = E[xxᵀ]^{1/2} is QERA-exact; diagonal S and T are
LQ-LoRA's Fisher-weighted step. ``[·]_r`` is the rank-r truncated SVD, so ``‖S(Δ − C)T‖_F²`` is the
sum of the squared singular values of ``SΔT`` beyond r (Eckart–Young).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from lqframe.errors import OptionError, WeightError

__all__ = [
    "PRECISIONS",
    "precision_dtype",
    "check_weight",
    "Scaling",
    "SymmetricScaling",
    "DiagonalScaling",
    "lowrank_solve",
    "LowRankSolution",
    "symmetric_sqrt",
    "TriangularScaling",
    "cholesky_factor",
]


#: the arithmetic a solve or a calibration forward may run in (the ``precision`` options; docs/design.md,
#: "Reproducibility": float64 makes results independent of the BLAS path)
PRECISIONS = ("float64", "float32")


def precision_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``precision`` option's value (one of :data:`PRECISIONS`)."""
    if name not in PRECISIONS:
        raise OptionError(f"precision must be one of {PRECISIONS}, got {name!r}")
    return getattr(torch, name)


def check_weight(weight: torch.Tensor, who: str = "weight") -> torch.Tensor:
    """Validate a weight matrix and return it as contiguous float32.

    Raises :class:`WeightError` for a non-tensor, a non-floating dtype, a tensor that is not 2-D,
    or NaN/Inf values (with their count and the first position), so garbage never flows on.
    """
    if not isinstance(weight, torch.Tensor):
        raise WeightError(f"{who}: expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise WeightError(f"{who}: expected a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 2:
        raise WeightError(f"{who}: expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32).contiguous()
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise WeightError(
            f"{who}: weight of shape {tuple(w.shape)} has {n_nan} NaN and {n_inf} Inf values "
            f"(first at {list(first)}); refusing to quantize non-finite weights"
        )
    return w


# --------------------------------------------------------------------------- scalings


class Scaling:
    """A positive-definite scaling ``S`` with its inverse, applied from the left or the right."""

    size: int

    def left(self, m: torch.Tensor) -> torch.Tensor:  # S @ m
        raise NotImplementedError

    def right(self, m: torch.Tensor) -> torch.Tensor:  # m @ S
        raise NotImplementedError

    def left_inv(self, m: torch.Tensor) -> torch.Tensor:  # S⁻¹ @ m
        raise NotImplementedError

    def right_inv(self, m: torch.Tensor) -> torch.Tensor:  # m @ S⁻¹
        raise NotImplementedError


@attrs.frozen(eq=False)
class DiagonalScaling(Scaling):
    """``S = diag(d)``; entries below ``floor · max(d)`` are raised to it (dead channels)."""

    d: torch.Tensor = attrs.field()
    floor: float = 1e-6

    def __attrs_post_init__(self) -> None:
        d = self.d.to(torch.float64).reshape(-1)
        if not bool(torch.isfinite(d).all()):
            raise WeightError("diagonal scaling has non-finite entries")
        top = float(d.abs().max()) if d.numel() else 0.0
        if top <= 0.0:
            d = torch.ones_like(d)
        else:
            d = d.abs().clamp_min(self.floor * top)
        object.__setattr__(self, "d", d)

    @property
    def size(self) -> int:
        return self.d.numel()

    def left(self, m):
        return self.d.to(m.dtype)[:, None] * m

    def right(self, m):
        return m * self.d.to(m.dtype)[None, :]

    def left_inv(self, m):
        return m / self.d.to(m.dtype)[:, None]

    def right_inv(self, m):
        return m / self.d.to(m.dtype)[None, :]


@attrs.frozen(eq=False)
class SymmetricScaling(Scaling):
    """A full symmetric positive-definite ``S`` given with its inverse."""

    root: torch.Tensor
    inv_root: torch.Tensor

    @property
    def size(self) -> int:
        return self.root.shape[0]

    def left(self, m):
        return self.root.to(m.dtype) @ m

    def right(self, m):
        return m @ self.root.to(m.dtype)

    def left_inv(self, m):
        return self.inv_root.to(m.dtype) @ m

    def right_inv(self, m):
        return m @ self.inv_root.to(m.dtype)


def symmetric_sqrt(matrix: torch.Tensor, rel_floor: float = 1e-8) -> SymmetricScaling:
    """``A^{1/2}`` and ``A^{-1/2}`` of a symmetric PSD matrix through one ``eigh`` in float64.

    Eigenvalues below ``rel_floor · λ_max`` (and negative round-off) are raised to that floor, so
    rank-deficient statistics give a finite, well-defined inverse. For PSD input this equals the
    principal square root (``scipy.linalg.sqrtm``) up to the floor.
    """
    a = matrix.to(torch.float64)
    a = (a + a.T) / 2
    evals, evecs = torch.linalg.eigh(a)
    top = float(evals.max()) if evals.numel() else 0.0
    if top <= 0.0:
        eye = torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
        return SymmetricScaling(eye, eye.clone())
    evals = evals.clamp_min(rel_floor * top)
    root = (evecs * evals.sqrt()) @ evecs.T
    inv_root = (evecs * evals.rsqrt()) @ evecs.T
    return SymmetricScaling(root, inv_root)


@attrs.frozen(eq=False)
class TriangularScaling(Scaling):
    """A lower-triangular ``F`` with ``F Fᵀ = A`` (Cholesky), weighing a matrix exactly like
    ``A^{1/2}``: from the right by ``F`` (``‖D F‖_F² = tr(D A Dᵀ) = ‖D A^{1/2}‖_F²``), from the left
    by ``Fᵀ`` (``‖Fᵀ D‖_F² = tr(Dᵀ A D)``), so a weighted low-rank problem has the same optimum;
    inverses are triangular solves."""

    factor: torch.Tensor

    @property
    def size(self) -> int:
        return self.factor.shape[0]

    def left(self, m):
        return self.factor.to(m.dtype).T @ m

    def right(self, m):
        return m @ self.factor.to(m.dtype)

    def left_inv(self, m):
        return torch.linalg.solve_triangular(self.factor.to(m.dtype).T, m, upper=True)

    def right_inv(self, m):
        return torch.linalg.solve_triangular(self.factor.to(m.dtype), m, upper=False, left=False)


def cholesky_factor(matrix: torch.Tensor, rel_floor: float = 1e-8) -> TriangularScaling:
    """Cholesky factor of a symmetric PSD matrix in float64, with ``rel_floor · max(diag A)`` added
    to the diagonal (the counterpart of :func:`symmetric_sqrt`'s eigenvalue floor: rank-deficient
    statistics stay invertible). If round-off still breaks the factorisation, the ridge grows ×10
    (at most six times)."""
    a = matrix.to(torch.float64)
    a = (a + a.T) / 2
    n = a.shape[0]
    top = float(a.diagonal().max()) if n else 0.0
    if top <= 0.0:
        return TriangularScaling(torch.eye(n, dtype=torch.float64, device=a.device))
    ridge = max(rel_floor, 1e-15) * top
    eye = torch.eye(n, dtype=torch.float64, device=a.device)
    for _ in range(7):
        factor, info = torch.linalg.cholesky_ex(a + ridge * eye)
        if int(info) == 0:
            return TriangularScaling(factor)
        ridge *= 10
    raise WeightError(f"second moment is not positive semi-definite (Cholesky failed with a ridge of {ridge:.3g})")


# --------------------------------------------------------------------------- the low-rank solve


@attrs.frozen(eq=False)
class LowRankSolution:
    """``C = left @ right``; ``singular_values`` are those of the scaled matrix ``SΔT`` (all of them
    for the exact method, the leading ``rank + oversample`` for the randomized one)."""

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor

    def tail_energy(self, rank: int) -> float:
        """Σ_{i>rank} σ_i² — the scaled error of the rank-``rank`` truncation (exact method)."""
        return float((self.singular_values[rank:].to(torch.float64) ** 2).sum())


def _randomized_svd(
    m: torch.Tensor, k: int, oversample: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = m.shape
    q = min(k + oversample, n_rows, n_cols)
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(n_cols, q, generator=gen, dtype=m.dtype, device=m.device)
    basis = torch.linalg.qr(m @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(m.T @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return basis @ u_small, s, vh


def lowrank_solve(
    delta: torch.Tensor,
    rank: int,
    *,
    row_scaling: Scaling | None = None,
    col_scaling: Scaling | None = None,
    method: Literal["exact", "randomized"] = "exact",
    split: Literal["balanced", "left"] = "balanced",
    dtype: torch.dtype = torch.float32,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
) -> LowRankSolution:
    """Minimise ``‖S (Δ − L R) T‖_F`` over rank-``rank`` products (see module doc).

    ``split='balanced'`` puts ``√σ`` in both factors (best conditioned for training);
    ``split='left'`` puts ``σ`` in ``L`` (QERA's convention). Computation runs in ``dtype``
    (float32 or float64); factors are returned in float32.
    """
    if rank < 0:
        raise OptionError(f"rank must be >= 0, got {rank}")
    if method not in ("exact", "randomized"):
        raise OptionError(f"method must be 'exact' or 'randomized', got {method!r}")
    if split not in ("balanced", "left"):
        raise OptionError(f"split must be 'balanced' or 'left', got {split!r}")
    n, m = delta.shape
    for scaling, size, side in ((row_scaling, n, "row"), (col_scaling, m, "column")):
        if scaling is not None and scaling.size != size:
            raise OptionError(f"{side} scaling has size {scaling.size}, the matrix has {size} {side}s")
    work = delta.to(dtype)
    if row_scaling is not None:
        work = row_scaling.left(work)
    if col_scaling is not None:
        work = col_scaling.right(work)
    r = min(rank, n, m)
    if r == 0:
        s_all = torch.linalg.svdvals(work) if method == "exact" and work.numel() else work.new_zeros(0)
        return LowRankSolution(delta.new_zeros(n, 0, dtype=torch.float32),
                               delta.new_zeros(0, m, dtype=torch.float32), s_all)
    if method == "exact":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(work, r, oversample, niter, seed)
    u, sr, vh_r = u[:, :r], s[:r], vh[:r]
    # one sign per singular pair, whichever LAPACK path computed it (their signs differ with the thread
    # count): the largest entry of each right vector positive, so the stored factors repeat bit for bit
    flip = torch.sign(vh_r.gather(1, vh_r.abs().argmax(dim=1, keepdim=True)))
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    u, vh_r = u * flip.T, vh_r * flip
    if split == "balanced":
        root = sr.sqrt()
        left, right = u * root, root[:, None] * vh_r
    else:
        left, right = u * sr, vh_r
    if row_scaling is not None:
        left = row_scaling.left_inv(left)
    if col_scaling is not None:
        right = col_scaling.right_inv(right)
    return LowRankSolution(left.to(torch.float32).contiguous(), right.to(torch.float32).contiguous(), s)
