"""Triton kernels for ``y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ + b`` that never build the dense weight.

Two paths, picked by the number of activation rows ``M`` (:data:`CONFIGS`):

* **decode** (``M ≤ 4``): ``_lowrank_down`` computes ``t = x·Rᵀ`` (``M × r``, R read once), then
  ``_lq_gemv`` streams the packed words of a ``BN``-row tile of Q, decodes them in registers,
  multiplies with the few rows of ``x`` and reduces along K; its epilogue adds ``t·Lᵀ`` for the
  tile's rows and the bias.
* **prefill** (``M > 4``): ``_lq_matmul`` tiles ``(BM × BN)``; each K step decodes a ``BN × BK``
  tile of Q into the activations' dtype and feeds ``tl.dot``; the low-rank down-projection
  ``x·Rᵀ`` is accumulated in the same K loop from the ``x`` tile already loaded, and the
  up-projection ``t·Lᵀ`` is one more ``tl.dot`` in the epilogue.

Both read the row-aligned int32 words of :mod:`lqframe.kernels.layout` (every bit width 1–8,
integer or codebook formats, packed or constant zero points, plain or double-quantized scales).
Q is decoded exactly as the torch reference decodes it and rounded to the activations' dtype as
the reference rounds it, then summed in float32; results agree with the reference within the
activations' rounding. Launch configurations are a fixed table (:data:`CONFIGS`, the one place
to tune them), so a call's summation order, and its result, never depends on timing.

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels run on CPU tensors; the interpreter has no
bfloat16 arithmetic, so there values are rounded to bfloat16 by bit manipulation (round to
nearest even, as torch does) and products are formed in float32.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from lqframe.kernels.layout import ComputeLayout, compute_layout

__all__ = ["lq_linear_triton", "CONFIGS", "INTERPRETER", "DECODE_MAX_ROWS", "compile_variants"]

#: whether the kernels run in Triton's CPU interpreter (fixed when this module is imported)
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: calls with at most this many activation rows take the decode path
DECODE_MAX_ROWS = 4

#: Launch configurations, the one place they are set. ``gpu``: for CUDA devices; ``interpreter``:
#: small tiles so that CPU tests with small shapes still cross tile boundaries.
CONFIGS = {
    "gpu": {
        "down": {"BR": 4, "BK": 512, "num_warps": 4},
        "decode": {"BN": 32, "BK": 256, "num_warps": 4},
        # (largest M, tile) — the first whose M bound holds. Chosen without a GPU so that no variant
        # spills registers on sm_90 at rank ≤ 64 (ptxas -v on the AOT build, compile_variants);
        # to be timed where a GPU is available (benchmarks/kernel_speed.py).
        "prefill": [
            (64, {"BM": 16, "BN": 64, "BK": 64, "num_warps": 8, "num_stages": 3}),
            (256, {"BM": 64, "BN": 64, "BK": 64, "num_warps": 8, "num_stages": 3}),
            (None, {"BM": 128, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 3}),
        ],
    },
    "interpreter": {
        "down": {"BR": 4, "BK": 32},
        "decode": {"BN": 16, "BK": 32},
        "prefill": [(None, {"BM": 16, "BN": 16, "BK": 32})],
    },
}

# how values are rounded to the activations' dtype inside the kernels
_ROUND_NONE, _ROUND_FP16, _ROUND_BF16, _ROUND_BF16_BITS = 0, 1, 2, 3


@triton.jit
def _round(v, ROUND: tl.constexpr):
    """float32 ``v`` rounded to the activations' dtype (kept as float32)."""
    if ROUND == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 3:  # round to nearest even on the bits (the interpreter's cast truncates)
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = u.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _dequant(words_ptr, scale_ptr, zero_ptr, cb_ptr, offs_n, mn, k0, K,
             stride_w, stride_s, stride_z, zero_value, offset,
             BITS: tl.constexpr, CPW: tl.constexpr, GROUP: tl.constexpr, HAS_CB: tl.constexpr,
             HAS_ZT: tl.constexpr, HAS_OFFSET: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             WORD_TILES: tl.constexpr, GROUP_TILES: tl.constexpr):
    """The float32 values of Q at rows ``offs_n`` × columns ``k0 … k0 + BK`` (zero outside).

    ``WORD_TILES`` (``cpw`` a power of two dividing ``BK``): each word is loaded once and unpacked
    in registers; otherwise each code gathers its word. ``GROUP_TILES`` (``BK`` divides the group
    size): the tile lies in one block, so scales and zero points are one value per row."""
    offs_k = k0 + tl.arange(0, BK)
    mask = mn[:, None] & (offs_k < K)[None, :]
    if WORD_TILES:
        offs_w = k0 // CPW + tl.arange(0, BK // CPW)
        word = tl.load(words_ptr + offs_n[:, None] * stride_w + offs_w[None, :],
                       mask=mn[:, None] & (offs_w < (K + CPW - 1) // CPW)[None, :], other=0)
        shifts = tl.arange(0, CPW) * BITS
        code = tl.reshape((word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BN, BK))
    else:
        word = tl.load(words_ptr + offs_n[:, None] * stride_w + (offs_k // CPW)[None, :], mask=mask, other=0)
        code = (word >> ((offs_k % CPW) * BITS)[None, :]) & ((1 << BITS) - 1)
    if GROUP_TILES:
        group = k0 // GROUP
        scale = tl.load(scale_ptr + offs_n * stride_s + group, mask=mn, other=0.0).to(tl.float32)[:, None]
    else:
        group = (offs_k // GROUP)[None, :]
        scale = tl.load(scale_ptr + offs_n[:, None] * stride_s + group, mask=mask, other=0.0).to(tl.float32)
    if HAS_CB:
        value = tl.load(cb_ptr + code, mask=mask, other=0.0)
    elif HAS_ZT:
        if GROUP_TILES:
            zero = tl.load(zero_ptr + offs_n * stride_z + group, mask=mn, other=0).to(tl.float32)[:, None]
        else:
            zero = tl.load(zero_ptr + offs_n[:, None] * stride_z + group, mask=mask, other=0).to(tl.float32)
        value = code.to(tl.float32) - zero
    else:
        value = code.to(tl.float32) - zero_value
    value = value * scale
    if HAS_OFFSET:
        value = value + offset
    return tl.where(mask, value, 0.0)


@triton.jit
def _store_output(acc, b_ptr, y_ptr, offs_m, offs_n, mm, mn, stride_ym, HAS_BIAS: tl.constexpr,
                  ROUND: tl.constexpr):
    """Both paths' last step: add the bias, round to the activations' dtype, store the tile."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], _round(acc, ROUND).to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _lowrank_down(x_ptr, r_ptr, t_ptr, M, K, RANK, stride_xm, stride_r, stride_tm,
                  ROUND: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """``t = x·Rᵀ`` (float32, ``M × RANK``) for a few rows of ``x``; one program per ``BR`` ranks."""
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & mk[None, :], other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs_r[:, None] * stride_r + offs_k[None, :],
                    mask=(offs_r < RANK)[:, None] & mk[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * r[None, :, :], axis=2)
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], _round(acc, ROUND),
             mask=(offs_m < M)[:, None] & (offs_r < RANK)[None, :])


@triton.jit
def _lq_gemv(x_ptr, words_ptr, scale_ptr, zero_ptr, cb_ptr, t_ptr, l_ptr, b_ptr, y_ptr,
             M, N, K, RANK, zero_value, offset,
             stride_xm, stride_w, stride_s, stride_z, stride_tm, stride_l, stride_ym,
             BITS: tl.constexpr, CPW: tl.constexpr, GROUP: tl.constexpr, HAS_CB: tl.constexpr,
             HAS_ZT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
             ROUND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
             WORD_TILES: tl.constexpr, GROUP_TILES: tl.constexpr):
    """Decode path: ``BM`` (≤ 4) rows of ``x`` against a ``BN``-row tile of Q, K streamed."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm, mn = offs_m < M, offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
        w = _dequant(words_ptr, scale_ptr, zero_ptr, cb_ptr, offs_n, mn, k0, K, stride_w, stride_s, stride_z,
                     zero_value, offset, BITS, CPW, GROUP, HAS_CB, HAS_ZT, HAS_OFFSET, BN, BK, WORD_TILES,
                     GROUP_TILES)
        acc += tl.sum(x[:, None, :] * _round(w, ROUND)[None, :, :], axis=2)
    if HAS_LR:  # up-projection of the precomputed t = x·Rᵀ (already rounded) for this tile's rows
        for r0 in range(0, RANK, BR):
            offs_r = r0 + tl.arange(0, BR)
            mr = offs_r < RANK
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], mask=mm[:, None] & mr[None, :],
                        other=0.0)
            lf = tl.load(l_ptr + offs_n[:, None] * stride_l + offs_r[None, :], mask=mn[:, None] & mr[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(t[:, None, :] * lf[None, :, :], axis=2)
    _store_output(acc, b_ptr, y_ptr, offs_m, offs_n, mm, mn, stride_ym, HAS_BIAS, ROUND)


@triton.jit
def _lq_matmul(x_ptr, words_ptr, scale_ptr, zero_ptr, cb_ptr, r_ptr, l_ptr, b_ptr, y_ptr,
               M, N, K, RANK, zero_value, offset,
               stride_xm, stride_w, stride_s, stride_z, stride_r, stride_l, stride_ym,
               BITS: tl.constexpr, CPW: tl.constexpr, GROUP: tl.constexpr, HAS_CB: tl.constexpr,
               HAS_ZT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
               ROUND: tl.constexpr, NATIVE_DOT: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
               WORD_TILES: tl.constexpr, GROUP_TILES: tl.constexpr):
    """Prefill path: a ``BM × BN`` output tile; Q decoded tile by tile into ``tl.dot``; ``x·Rᵀ``
    accumulated from the same ``x`` tiles; ``t·Lᵀ`` in the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, BR)
    mm, mn, mr = offs_m < M, offs_n < N, offs_r < RANK
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = _dequant(words_ptr, scale_ptr, zero_ptr, cb_ptr, offs_n, mn, k0, K, stride_w, stride_s, stride_z,
                     zero_value, offset, BITS, CPW, GROUP, HAS_CB, HAS_ZT, HAS_OFFSET, BN, BK, WORD_TILES,
                     GROUP_TILES)
        if HAS_LR:
            r = tl.load(r_ptr + offs_r[:, None] * stride_r + offs_k[None, :], mask=mr[:, None] & mk[None, :],
                        other=0.0)
        if NATIVE_DOT:  # float16 / bfloat16 tensor cores, float32 accumulation
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
            if HAS_LR:
                t = tl.dot(x, tl.trans(r), t)
        else:  # float32 activations, or the interpreter: exact float32 products of rounded values
            xf = x.to(tl.float32)
            acc = tl.dot(xf, tl.trans(_round(w, ROUND)), acc, input_precision="ieee")
            if HAS_LR:
                t = tl.dot(xf, tl.trans(r.to(tl.float32)), t, input_precision="ieee")
    if HAS_LR:
        lf = tl.load(l_ptr + offs_n[:, None] * stride_l + offs_r[None, :], mask=mn[:, None] & mr[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(t.to(lf.dtype), tl.trans(lf), acc)
        else:
            acc = tl.dot(_round(t, ROUND), tl.trans(lf.to(tl.float32)), acc, input_precision="ieee")
    _store_output(acc, b_ptr, y_ptr, offs_m, offs_n, mm, mn, stride_ym, HAS_BIAS, ROUND)


_CASTS: dict[int, tuple] = {}  # id(tensor) -> ((version, dtype, device), cast); dropped with the tensor


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` contiguous in ``dtype``; conversions of a tensor that is not modified in place
    (L, R and the bias between optimizer steps) are made once and reused."""
    if t.dtype == dtype and t.is_contiguous():
        return t.detach()
    key = (t._version, dtype, t.device)
    hit = _CASTS.get(id(t))
    if hit is None or hit[0] != key:
        if hit is None:
            weakref.finalize(t, _CASTS.pop, id(t), None)
        hit = (key, t.detach().to(dtype).contiguous())
        _CASTS[id(t)] = hit
    return hit[1]


def _round_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float16:
        return _ROUND_FP16
    if dtype == torch.bfloat16:
        return _ROUND_BF16_BITS if INTERPRETER else _ROUND_BF16
    return _ROUND_NONE


def _next_pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, (n - 1).bit_length()))


def _k_tile(bk: int, group: int, cpw: int) -> dict:
    """The K tile for a block size: shrunk to the block when the block is a smaller power of two
    (≥ 16, ``tl.dot``'s least K) so that a tile never spans two blocks, and whether the kernels
    may unpack whole words (``cpw`` a power of two dividing the tile) and read one scale per row
    of a tile (the tile inside one block)."""
    if 16 <= group < bk and group & (group - 1) == 0:
        bk = group
    return {"BK": bk, "WORD_TILES": cpw & (cpw - 1) == 0 and bk % cpw == 0, "GROUP_TILES": group % bk == 0}


def _configs() -> dict:
    return CONFIGS["interpreter" if INTERPRETER else "gpu"]


def _prefill_config(m: int) -> dict:
    for bound, config in _configs()["prefill"]:
        if bound is None or m <= bound:
            return config
    raise AssertionError("the last prefill configuration has no bound")  # pragma: no cover


def lq_linear_triton(x: torch.Tensor, qweight, left: torch.Tensor | None, right: torch.Tensor | None,
                     bias: torch.Tensor | None = None, *, path: str | None = None) -> torch.Tensor:
    """``x·Qᵀ + (x·Rᵀ)·Lᵀ + b`` from the packed ``qweight`` with the Triton kernels; result in
    ``x``'s dtype, computed as the torch reference computes it (see module doc). ``path`` forces
    ``"decode"`` or ``"prefill"`` (tests); by default ``M ≤ DECODE_MAX_ROWS`` decodes."""
    layout: ComputeLayout = compute_layout(qweight)
    n, k = layout.rows, layout.cols
    if x.shape[-1] != k:
        raise ValueError(f"activations have {x.shape[-1]} features, the packed weight {k} columns")
    dtype = x.dtype
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    rank = 0 if left is None or right is None else left.shape[1]
    if rank:
        lf, rf = _as(left, dtype), _as(right, dtype)
    else:
        lf = rf = y  # unused pointers
    b = _as(bias, dtype) if bias is not None else y
    zero = layout.zero if layout.zero is not None else layout.words
    cb = layout.codebook if layout.codebook is not None else layout.scale
    common = dict(BITS=layout.bits, CPW=layout.cpw, GROUP=layout.block_size, HAS_CB=layout.codebook is not None,
                  HAS_ZT=layout.zero is not None, HAS_OFFSET=layout.offset is not None, HAS_LR=rank > 0,
                  HAS_BIAS=bias is not None, ROUND=_round_mode(dtype))
    zstride = layout.zero.stride(0) if layout.zero is not None else 0
    offset = layout.offset if layout.offset is not None else 0.0
    decode = (path or ("decode" if m <= DECODE_MAX_ROWS else "prefill")) == "decode"
    configs = _configs()
    if decode:
        bm = _next_pow2(min(m, DECODE_MAX_ROWS))
        t = torch.empty((m, max(rank, 1)), dtype=torch.float32, device=x.device)
        if rank:
            down = configs["down"]
            _lowrank_down[(triton.cdiv(rank, down["BR"]), triton.cdiv(m, bm))](
                x2, rf, t, m, k, rank, x2.stride(0), rf.stride(0), t.stride(0), ROUND=common["ROUND"], BM=bm,
                **down)
        cfg = {**configs["decode"], **_k_tile(configs["decode"]["BK"], layout.block_size, layout.cpw)}
        _lq_gemv[(triton.cdiv(n, cfg["BN"]), triton.cdiv(m, bm))](
            x2, layout.words, layout.scale, zero, cb, t, lf, b, y, m, n, k, rank, layout.zero_value, offset,
            x2.stride(0), layout.words.stride(0), layout.scale.stride(0), zstride, t.stride(0),
            lf.stride(0) if rank else 0, y.stride(0), BM=bm, BR=min(_next_pow2(max(rank, 1)), 32), **common, **cfg)
    else:
        cfg = _prefill_config(m)
        cfg = {**cfg, **_k_tile(cfg["BK"], layout.block_size, layout.cpw)}
        native = dtype in (torch.float16, torch.bfloat16) and not INTERPRETER
        _lq_matmul[(triton.cdiv(m, cfg["BM"]), triton.cdiv(n, cfg["BN"]))](
            x2, layout.words, layout.scale, zero, cb, rf, lf, b, y, m, n, k, rank, layout.zero_value, offset,
            x2.stride(0), layout.words.stride(0), layout.scale.stride(0), zstride,
            rf.stride(0) if rank else 0, lf.stride(0) if rank else 0, y.stride(0),
            NATIVE_DOT=native, BR=_next_pow2(max(rank, 1), 16), **common, **cfg)
    return y.reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------- ahead-of-time compilation
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _variants() -> list[tuple[str, object, dict, dict, dict]]:
    """``(label, kernel, pointer/scalar types, constexprs, launch options)`` covering every path,
    activation dtype, code format and GPU tile of :data:`CONFIGS` (see :func:`compile_variants`)."""
    scalars = {"M": "i32", "N": "i32", "K": "i32", "RANK": "i32"}
    formats = [  # (label, bits, codebook, packed zero points, scale dtype, offset)
        ("int4 packed zeros", 4, False, True, "fp16", False),
        ("int3 constant zero", 3, False, False, "bf16", False),
        ("nf2 double-quant scales", 2, True, False, "fp32", False),
        ("int8 packed zeros", 8, False, True, "fp16", False),
        ("nf4 offset", 4, True, False, "fp32", True),
    ]
    gpu = CONFIGS["gpu"]
    out = []

    def fmt_args(bits, cb, zt, scale, offset):
        types = {"words_ptr": "*i32", "scale_ptr": f"*{scale}", "zero_ptr": "*u8" if zt else "*i32",
                 "cb_ptr": "*fp32" if cb else f"*{scale}", "zero_value": "fp32", "offset": "fp32"}
        const = {"BITS": bits, "CPW": 32 // bits, "GROUP": 64, "HAS_CB": cb, "HAS_ZT": zt, "HAS_OFFSET": offset}
        return types, const

    def strides(names):
        return {n: "i32" for n in names}

    for dtype, act in _TYPES.items():
        rnd = {torch.float16: _ROUND_FP16, torch.bfloat16: _ROUND_BF16}.get(dtype, _ROUND_NONE)
        for label, bits, cb, zt, scale, offset in ([formats[0]] if dtype != torch.float16 else formats):
            ftypes, fconst = fmt_args(bits, cb, zt, scale, offset)
            ptrs = {n: f"*{act}" for n in ("x_ptr", "r_ptr", "l_ptr", "b_ptr", "y_ptr")}
            tiles = [cfg for _, cfg in gpu["prefill"]] if (dtype, label) == (torch.float16, formats[0][0]) \
                else [gpu["prefill"][0][1]]
            for cfg in tiles:
                tile = {"BM": cfg["BM"], "BN": cfg["BN"], **_k_tile(cfg["BK"], 64, 32 // bits)}
                out.append((f"prefill {act} {label} {cfg}", _lq_matmul,
                            {**ptrs, **ftypes, **scalars,
                             **strides(("stride_xm", "stride_w", "stride_s", "stride_z", "stride_r", "stride_l",
                                        "stride_ym"))},
                            {**fconst, "HAS_LR": True, "HAS_BIAS": True, "ROUND": rnd,
                             "NATIVE_DOT": dtype != torch.float32, **tile, "BR": 32},
                            {k: cfg[k] for k in ("num_warps", "num_stages")}))
            dec = gpu["decode"]
            out.append((f"decode {act} {label}", _lq_gemv,
                        {**{n: f"*{act}" for n in ("x_ptr", "l_ptr", "b_ptr", "y_ptr")}, "t_ptr": "*fp32",
                         **ftypes, **scalars,
                         **strides(("stride_xm", "stride_w", "stride_s", "stride_z", "stride_tm", "stride_l",
                                    "stride_ym"))},
                        {**fconst, "HAS_LR": True, "HAS_BIAS": True, "ROUND": rnd, "BM": 1, "BN": dec["BN"],
                         **_k_tile(dec["BK"], 64, 32 // bits), "BR": 32},
                        {"num_warps": dec["num_warps"]}))
        down = gpu["down"]
        out.append((f"down {act}", _lowrank_down,
                    {"x_ptr": f"*{act}", "r_ptr": f"*{act}", "t_ptr": "*fp32", "M": "i32", "K": "i32",
                     "RANK": "i32", **strides(("stride_xm", "stride_r", "stride_tm"))},
                    {"ROUND": rnd, "BM": 4, "BR": down["BR"], "BK": down["BK"]}, {"num_warps": down["num_warps"]}))
    return out


def compile_variants(arch: int = 90) -> list[tuple[str, str | None]]:
    """Compile every kernel variant (:func:`_variants`) for CUDA compute capability ``arch`` without
    a GPU (Triton's ahead-of-time path down to a cubin); ``(label, None)`` when it compiled,
    ``(label, error)`` when not. Needs Triton's compiler, not its interpreter: run it in a process
    without ``TRITON_INTERPRET=1``."""
    if INTERPRETER:
        raise RuntimeError("compile_variants needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for label, kernel, types, const, options in _variants():
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        missing = [n for n in kernel.arg_names if signature[n] == "constexpr" and n not in const]
        if missing:
            raise AssertionError(f"{label}: no type or value for {missing}")
        constexprs = {(kernel.arg_names.index(k),): v for k, v in const.items()}
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as exc:  # report every failing variant, not only the first
            results.append((label, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"))
        else:
            results.append((label, None))
    return results


if __name__ == "__main__":  # python -m lqframe.kernels.triton_lq [ARCH]: compile every variant
    import sys

    failed = 0
    for label, error in compile_variants(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print(("ok    " if error is None else "FAIL  ") + label + ("" if error is None else f": {error}"), flush=True)
        failed += error is not None
    sys.exit(1 if failed else 0)
