"""GPTQ (Frantar et al., ICLR 2023): column-by-column quantization with second-order error feedback.

Minimises the layer output error ``‖X Wᵀ − X Ŵᵀ‖²`` greedily (METHODS.md §5.2): every column is
rounded onto its group's grid and its rounding error, divided by the diagonal of the upper Cholesky
factor ``U`` of ``H⁻¹`` (``H = 2·Σxxᵀ/N``), is pushed onto the columns not yet quantized
(``W[:, j] −= err · U[i, j]``), in lazy blocks of ``block_size`` columns.

The codes are stored in exactly the format of the data-free quantizers, so kernels, checkpoints and
storage accounting cannot tell the difference:

* ``grid: int`` — the ``rtn`` format (``int{k}-asym`` min–max with a packed zero point per group, or
  ``int{k}-sym`` with ``symmetric: true``), per group of ``group_size`` input columns;
* ``grid: nf`` — the ``nf`` format without double quantization (NormalFloat-k codebook, one absmax
  scale per group).

Choices, where the reference code leaves room:

* **Precision** (``precision: float64``, the default). ``H`` is damped and factorised, and the column
  sweep over the weight (the error feedback) runs, in float64: the codes then do not depend on which
  BLAS kernels or how many threads computed them (float32 sweeps moved 14 % of the default model's
  codes between two MKL code paths; docs/design.md, "Reproducibility"). Grids are computed from the
  float32 values, exactly as ``rtn`` / ``nf`` compute them. ``precision: float32`` (for GPUs with slow
  float64) sweeps in float32 and factorises in float64 up to 4096 input columns, in float32 above
  (the former behaviour, bit for bit). ``U`` is obtained from a
  single Cholesky factorisation: with ``J`` the reversal permutation and ``J H J = L Lᵀ``,
  ``U = J L⁻¹ J`` is upper triangular with ``Uᵀ U = H⁻¹``.
* **Damping.** ``λ = damp · mean(diag H)``. If the factorisation fails, ``damp`` is multiplied by 10
  (capped at ``max_damp``) and the attempt repeated, with a warning on the ``lqframe.gptq`` logger;
  past ``max_damp`` a :class:`~lqframe.WeightError` is raised.
* **Dead input channels** (``diag H = 0``: the input is always zero) get ``H[i, i] = 1`` and no
  coupling. Their weights do not affect the output; instead of zeroing them (as the reference does)
  they are kept and rounded to nearest, so ``W − Q`` stays small for low-rank reconstructors.
* **Groups.** A group is always ``group_size`` consecutive *original* input columns (the standard
  per-row-block layout), also with ``act_order``. Its grid (scale, zero point) is computed when the
  first of its columns is about to be quantized, from the current values of all its columns — the
  original weights plus every error-feedback update received so far (including updates still pending
  in the lazy block). Without ``act_order`` that is the reference's rule (which, for a group starting
  inside a lazy block, reads the values without that block's pending updates); with ``act_order``
  it is the same rule applied to the permuted visiting order. ``static_groups: true`` computes every
  grid from the original weights instead, before any update (llm-compressor always does; with
  ``act_order`` it is its ``static`` activation ordering). docs/gptq.md compares the peers.
* ``act_order`` visits columns by decreasing ``diag H`` (stable sort, so ties keep their order).
* **Defaults: ``act_order: true, static_groups: true``** — the best GPTQ on its own in every
  measurement (benchmarks/results/gptq.md; int4 g64 on the default model: pydoc perplexity 14.36
  natural order → 13.49, the configuration llm-compressor calls static act-order, where it measures
  13.58). Followed by a rank-r correction the natural order can be better at 4 bits (its error
  keeps more low-rank structure for the correction to take back; docs/gptq.md), so a recipe that
  pairs GPTQ with a reconstructor states the order it measured best.

Without ``rxx`` statistics the quantizer raises :class:`~lqframe.MissingStatisticError`.
"""

from __future__ import annotations

import logging

import attrs
import torch
from attrs import validators as v

from lqframe import DataError, LayerStats, MissingStatisticError, QuantizedWeight, Quantizer, WeightError, hookimpl
from lqframe.numerics import PRECISIONS, check_weight, precision_dtype
from lqframe.quantization import (
    SCALE_DTYPES,
    int_format,
    int_grid,
    int_storage_bits,
    integer,
    nearest_code,
    nf_format,
    nf_grid,
    nf_storage_bits,
    normal_float_codebook,
    scale_dtype,
)

log = logging.getLogger("lqframe.gptq")

#: Largest number of input columns whose Hessian is factorised in float64 (float32 above).
FLOAT64_MAX_COLS = 4096


def _positive_number(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number, got {value!r}")
    if not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{attribute.name} must be a positive finite number, got {value!r}")


@attrs.frozen
class GPTQ(Quantizer):
    """GPTQ onto the ``rtn`` int-k grid or the ``nf`` NormalFloat-k grid (``gptq``)."""

    needs = frozenset({"rxx"})
    rounds_to_nearest = False

    bits: int = attrs.field(default=4, validator=integer(2, 8))
    group_size: int = attrs.field(default=64, validator=integer())
    grid: str = attrs.field(default="int", validator=v.in_(("int", "nf")))
    symmetric: bool = attrs.field(default=False, validator=v.instance_of(bool))
    scale_dtype: str = attrs.field(default="float16", validator=v.in_(tuple(SCALE_DTYPES)))
    damp: float = attrs.field(default=0.01, validator=_positive_number)
    block_size: int = attrs.field(default=128, validator=integer(1))
    #: the best configuration measured (benchmarks/results/gptq.md): on by default
    act_order: bool = attrs.field(default=True, validator=v.instance_of(bool))
    static_groups: bool = attrs.field(default=True, validator=v.instance_of(bool))
    max_damp: float = attrs.field(default=1.0, validator=_positive_number)
    #: arithmetic of the column sweep (the error feedback); grids and stored values do not depend on it
    precision: str = attrs.field(default="float64", validator=v.in_(PRECISIONS))

    def __attrs_post_init__(self) -> None:
        if self.group_size < 1 and self.group_size != -1:
            raise ValueError(f"group_size must be >= 1, or -1 for one group per row; got {self.group_size}")
        if self.symmetric and self.grid != "int":
            raise ValueError("symmetric applies to grid 'int' only (the NormalFloat grid is symmetric already)")
        if self.max_damp < self.damp:
            raise ValueError(f"max_damp ({self.max_damp}) must be >= damp ({self.damp})")

    @classmethod
    def test_configs(cls):
        return [
            {"bits": 4, "group_size": 16, "block_size": 8},
            {"bits": 3, "group_size": 32, "symmetric": True, "act_order": True},
            {"bits": 4, "group_size": 16, "grid": "nf", "act_order": True, "static_groups": True},
            {"bits": 2, "group_size": -1, "grid": "nf", "block_size": 16},
            {"bits": 8, "group_size": 24, "scale_dtype": "bfloat16", "act_order": True},
        ]

    # ------------------------------------------------------------------ format
    def _group(self, cols: int) -> int:
        return max(cols, 1) if self.group_size == -1 else self.group_size

    @property
    def format_name(self) -> str:
        return nf_format(self.bits) if self.grid == "nf" else int_format(self.bits, self.symmetric)

    def storage_bits(self, shape) -> int:
        """Exactly the storage of the ``rtn`` / ``nf`` (no double quantization) configuration whose format
        this one emits (the same core functions, :mod:`lqframe.quantization`, compute both)."""
        group = self._group(shape[1])
        if self.grid == "nf":
            return nf_storage_bits(shape, self.bits, group, self.scale_dtype)
        return int_storage_bits(shape, self.bits, group, self.symmetric, self.scale_dtype)

    # ------------------------------------------------------------------ one group's grid
    @property
    def _dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    def _grid(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grid of one group from its (rows, k) float32 values, exactly as ``rtn`` / ``nf`` compute it
        (the core's :func:`~lqframe.quantization.int_grid` / :func:`~lqframe.quantization.nf_grid`):
        (stored scales, decoded float32 scales, zero points as float32 — 0 for NF)."""
        dtype = scale_dtype(self.scale_dtype)
        values = values.to(torch.float32)  # the grid of the float32 values, exactly as rtn / nf compute it
        if self.grid == "nf":
            stored, scale = nf_grid(values.abs().amax(dim=1), dtype)
            return stored, scale, torch.zeros_like(scale)
        return int_grid(values.amin(dim=1), values.amax(dim=1), self.bits, self.symmetric, dtype)

    # ------------------------------------------------------------------ Hessian
    def _hessian(self, stats: LayerStats, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        h = stats.hessian().to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(h).all()):
            raise DataError("gptq quantizer: the calibration statistic rxx has NaN/Inf entries")
        h = (h + h.T) / 2
        diag = torch.diagonal(h)
        if bool((diag < 0).any()):
            raise DataError("gptq quantizer: rxx has negative diagonal entries, so it is not a sum of x·xᵀ")
        dead = diag == 0
        if bool(dead.any()):
            h[dead, :] = 0
            h[:, dead] = 0
            h[dead, dead] = 1
        return h, dead

    def _inverse_factor(self, h: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, float]:
        """Upper ``U`` with ``Uᵀ U = (H + λI)⁻¹``, raising damp on failure. Returns (U float32, damp)."""
        m = h.shape[0]
        work = h if self.precision == "float64" or m <= FLOAT64_MAX_COLS else h.to(torch.float32)
        mean_diag = float(torch.diagonal(work).mean())
        eye = torch.eye(m, dtype=work.dtype, device=work.device)
        damp = float(self.damp)
        while True:
            damped = work + (damp * mean_diag) * eye
            # J (H+λI) J = L Lᵀ  ⇒  (H+λI)⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), with J L⁻¹ J upper triangular
            low, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
            if int(info) == 0:
                inv = torch.linalg.solve_triangular(low, eye, upper=False)
                u = inv.flip(0, 1).to(self._dtype)
                if bool(torch.isfinite(u).all()) and bool((torch.diagonal(u) > 0).all()):
                    return u, damp
            if damp >= self.max_damp:
                raise WeightError(
                    f"gptq quantizer: the Hessian of the {shape[0]}×{shape[1]} weight is not positive definite "
                    f"even with damp {damp:g} (max_damp {self.max_damp:g}); collect more calibration tokens, "
                    "or raise damp / max_damp"
                )
            new = min(damp * 10, float(self.max_damp))
            log.warning(
                "gptq: Cholesky factorisation of the %d×%d Hessian failed with damp %g; retrying with damp %g",
                m, m, damp, new,
            )
            damp = new

    def _prepare_hessian(self, stats: LayerStats, n: int, m: int, device: torch.device):
        """(dead columns, column order, upper inverse factor, damp used) of the input statistics."""
        h, dead = self._hessian(stats, m, device)
        if self.act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
            h = h[perm][:, perm]
        else:
            perm = torch.arange(m, device=device)
        u, used_damp = self._inverse_factor(h, (n, m))
        return dead, perm, u, used_damp

    # ------------------------------------------------------------------ quantize
    def quantize(self, weight, stats=None) -> QuantizedWeight:
        w = check_weight(weight, f"gptq {self.format_name} quantizer")
        if stats is None:
            raise MissingStatisticError(
                "gptq quantizer needs calibration statistics ['rxx'] (Σxxᵀ of the layer input), "
                "but none were given"
            )
        stats.require(self.needs, "gptq quantizer")
        n, m = w.shape
        if tuple(stats.rxx.shape) != (m, m):
            raise DataError(f"gptq quantizer: rxx has shape {tuple(stats.rxx.shape)}, the weight has {m} input columns")
        group = self._group(m)
        nblocks = -(-m // group) if m else 0
        sdtype = scale_dtype(self.scale_dtype)
        stored = torch.zeros(n, nblocks, dtype=sdtype, device=w.device)
        scale = torch.zeros(n, nblocks, dtype=torch.float32, device=w.device)
        zero = torch.zeros(n, nblocks, dtype=torch.float32, device=w.device)
        codes = torch.zeros(n, m, dtype=torch.uint8, device=w.device)  # bits <= 8
        meta = {"method": "gptq", "act_order": self.act_order, "static_groups": self.static_groups}
        if n and m:
            # the damped inverse Hessian depends on the input statistics alone: once per input
            # (q/k/v and gate/up share theirs), and once per alternation of a reconstructor
            key = ("gptq", self.act_order, self.damp, self.max_damp, self.precision, str(w.device))
            dead, perm, u, used_damp = stats.cached(key, lambda: self._prepare_hessian(stats, n, m, w.device))
            meta["damp"] = used_damp
            meta["dead_columns"] = int(dead.sum())
            self._sweep(w, perm, u, group, stored, scale, zero, codes)
        if self.grid == "nf":
            return QuantizedWeight.from_codes(
                codes, self.bits, group, stored, codebook=normal_float_codebook(self.bits, codes.device),
                format=self.format_name,
                meta={"double_quant": "none", **meta},
            )
        return QuantizedWeight.from_codes(
            codes, self.bits, group, stored,
            zero=(1 << (self.bits - 1)) if self.symmetric else zero.to(torch.int64),
            format=self.format_name, meta=meta,
        )

    def _sweep(self, w, perm, u_perm, group, stored, scale, zero, codes) -> None:
        """The GPTQ column loop over the visiting order ``perm`` (``u_perm``: the factor of the permuted
        Hessian); fills ``stored``/``scale``/``zero`` per group and ``codes`` in place.

        Works on the transposed weight (one contiguous row per input column), so that the rank-one
        updates inside a lazy block touch contiguous memory."""
        n, m = w.shape
        maxq = (1 << self.bits) - 1
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(m, device=w.device)
        nblocks = scale.shape[1]
        grids: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * nblocks

        def set_grid(g: int, values_t: torch.Tensor) -> None:
            s_stored, s, z = self._grid(values_t.T)
            stored[:, g], scale[:, g], zero[:, g] = s_stored, s, z
            flat = s == 0
            grids[g] = (s, z, flat, torch.where(flat, torch.ones_like(s), s))

        if self.static_groups:
            for g in range(nblocks):
                set_grid(g, w[:, g * group:(g + 1) * group].T)
        cb = normal_float_codebook(self.bits).to(w.device) if self.grid == "nf" else None
        zero_code = int(torch.argmin(cb.abs())) if cb is not None else 0
        perm_list = perm.tolist()

        work = w.T[perm].to(self._dtype).contiguous()  # row p: the column visited p-th
        qcodes = torch.empty(m, n, dtype=torch.uint8, device=w.device)
        for i1 in range(0, m, self.block_size):
            i2 = min(i1 + self.block_size, m)
            w1 = work[i1:i2].clone()
            err1 = torch.zeros(i2 - i1, n, dtype=self._dtype, device=w.device)
            for k in range(i2 - i1):
                p = i1 + k
                g = perm_list[p] // group
                if grids[g] is None:
                    members = inv[g * group:min((g + 1) * group, m)]
                    set_grid(g, self._current(members, work, w1, err1, u_perm, i1, i2, k))
                s, z, flat, safe = grids[g]
                x = w1[k]
                if cb is None:
                    q = torch.clamp(torch.round(x / safe) + z, 0, maxq)
                    q = torch.where(flat, z, q)
                    deq = (q - z) * s
                else:
                    q = nearest_code(x / safe, cb)
                    q = torch.where(flat, torch.full_like(q, zero_code), q)
                    deq = cb[q] * s
                qcodes[p] = q
                e = (x - deq) / u_perm[p, p]
                if k + 1 < i2 - i1:
                    w1[k + 1:].addmm_(u_perm[p, p + 1:i2, None], e[None, :], alpha=-1)  # faster than addr_ on CPU
                err1[k] = e
            if i2 < m:
                work[i2:].addmm_(u_perm[i1:i2, i2:].T, err1, alpha=-1)
        codes[:, perm] = qcodes.T

    @staticmethod
    def _current(pos, work, w1, err1, u, i1, i2, k) -> torch.Tensor:
        """Current values (one row per column, transposed layout) of the columns at visiting positions
        ``pos`` (all at or after the current one ``i1 + k``), with the updates still pending in the
        lazy block applied."""
        out = torch.empty(pos.numel(), work.shape[1], dtype=work.dtype, device=work.device)
        inside = pos < i2
        if bool(inside.any()):
            out[inside] = w1[pos[inside] - i1]
        outside = ~inside
        if bool(outside.any()):
            rows = pos[outside]
            vals = work[rows]
            if k:
                vals = vals - u[i1:i1 + k][:, rows].T @ err1[:k]
            out[outside] = vals
        return out


@hookimpl
def lqframe_register(registry):
    registry.add_quantizer("gptq", GPTQ)
