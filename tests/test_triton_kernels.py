"""The Triton kernels (``lqframe.kernels.triton_lq``) against the torch reference.

On CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before any
kernel module is imported); the tests marked ``cuda`` run the compiled kernels where a CUDA GPU
exists. The oracle is exact arithmetic (float64) on the operands rounded as the reference rounds
them: Q decoded in float32 then rounded to the activations' dtype, likewise L, R and the bias. The
kernel must be within the activations' rounding of it, and the compute layout must decode to
exactly the reference's Q.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lqframe
from lqframe import testing
from lqframe.kernels import dispatch
from lqframe.kernels.layout import codes_per_word, compute_layout

pytest.importorskip("triton")

from lqframe.kernels import triton_lq  # noqa: E402

REG = lqframe.registry()
CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

pytestmark = pytest.mark.skipif(not (triton_lq.INTERPRETER or CUDA),
                                reason="Triton needs TRITON_INTERPRET=1 or a CUDA GPU")


def _formats(bits: int) -> list[tuple[str, dict]]:
    """Every packed format lqframe writes at ``bits``: integer (packed or constant zero points,
    float16/bfloat16/float32 scales) and NormalFloat (plain, QLoRA and LQ-LoRA double quantization)."""
    out = [("rtn", {"bits": bits, "symmetric": False, "scale_dtype": "float16"}),
           ("rtn", {"bits": bits, "symmetric": True, "scale_dtype": "bfloat16"}),
           ("rtn", {"bits": bits, "symmetric": False, "scale_dtype": "float32"})]
    if bits in (2, 3, 4, 8):
        out += [("nf", {"bits": bits, "scale_dtype": "float16"}),
                ("nf", {"bits": bits, "double_quant": "qlora", "dq_group_size": 8}),
                ("nf", {"bits": bits, "double_quant": "lqlora", "dq_bits": 3, "dq_group_size": 4,
                        "dq_scale_dtype": "bfloat16"})]
    return out


ALL_FORMATS = [(name, dict(opts)) for bits in range(1, 9) for name, opts in _formats(bits)]


def _qweight(name: str, opts: dict, rows: int, cols: int, group: int, seed: int):
    w = testing.make_matrix(rows, cols, "heavy" if seed % 3 == 0 else "gaussian", "float32", seed)
    return REG.create("quantizer", name, group_size=group, **opts).quantize(w)


def _exact(x, qw, left, right, bias):
    """float64 result of the reference's rounded operands (Q, L, R, bias, and t = x·Rᵀ rounded)."""
    dt = x.dtype
    xd = x.to(torch.float64)
    y = xd @ qw.dequantize(torch.float32).to(dt).to(torch.float64).T
    bound = xd.abs() @ qw.dequantize(torch.float32).to(dt).to(torch.float64).abs().T
    if left is not None and left.shape[1]:
        rd, ld = right.to(dt).to(torch.float64), left.to(dt).to(torch.float64)
        t = xd @ rd.T
        y = y + t @ ld.T
        bound = bound + (t.abs() + xd.abs() @ rd.abs().T) @ ld.abs().T
    if bias is not None:
        b = bias.to(dt).to(torch.float64)
        y, bound = y + b, bound + b.abs()
    return y, bound


def _check(x, qw, left, right, bias, path=None):
    y = triton_lq.lq_linear_triton(x, qw, left, right, bias, path=path)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.shape[0])
    exact, bound = _exact(x.reshape(-1, x.shape[-1]), qw, left, right, bias)
    k = x.shape[-1] + (0 if left is None else left.shape[1])
    tol = (4 * UNIT[x.dtype] + 2 * k * UNIT[torch.float32]) * bound + 1e-30
    err = (y.reshape(exact.shape).to(torch.float64) - exact).abs()
    worst = float((err / tol).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}× the {x.dtype} rounding bound"
    ref = dispatch._reference(x, qw, left, right, bias)  # and the reference is within the same bound
    ref_err = (ref.reshape(exact.shape).to(torch.float64) - exact).abs()
    assert not ref_err.numel() or float((ref_err / tol).max()) <= 1.0
    return y


# --------------------------------------------------------------------------- compute layout
@pytest.mark.parametrize("name,opts", ALL_FORMATS, ids=[f"{n}-{o}" for n, o in ALL_FORMATS])
def test_layout_decodes_exactly_the_reference_q(name, opts):
    for rows, cols, group in ((5, 70, 16), (3, 33, 7), (1, 1, 64)):
        qw = _qweight(name, opts, rows, cols, group, rows + cols)
        layout = compute_layout(qw)
        assert layout.words.dtype == torch.int32
        assert layout.words.shape == (rows, -(-cols // codes_per_word(opts["bits"])))
        assert torch.equal(layout.dequantize(), qw.dequantize())
        assert compute_layout(qw) is layout  # built once per packed weight


def test_layout_words_are_the_stored_bytes_for_word_aligned_rows():
    for bits in (1, 2, 4, 8):
        qw = _qweight("rtn", {"bits": bits}, 4, 64, 32, 1)
        words = compute_layout(qw).words
        assert words.data_ptr() == qw.codes.data_ptr()  # a view of the stored bytes, not a copy
        assert torch.equal(words, compute_layout(_qweight("rtn", {"bits": bits}, 4, 64, 32, 1)).words)
    qw = _qweight("rtn", {"bits": 4}, 4, 60, 32, 1)  # rows of 7.5 words: a copy
    assert compute_layout(qw).words.data_ptr() != qw.codes.data_ptr()


def test_every_registered_quantizer_is_readable():
    """Whatever a registered quantizer writes, the kernels read (or say why not)."""
    w = testing.make_matrix(12, 40, "gaussian", "float32", 0)
    for case in testing.component_cases("quantizer"):
        quantizer = case.create()
        stats = testing.synthetic_stats(12, 40, quantizer.needs, seed=0) if quantizer.needs else None
        qw = quantizer.quantize(w, stats)
        x = torch.randn(3, 40)
        _check(x, qw, None, None, None)


# --------------------------------------------------------------------------- kernels vs oracle
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(ALL_FORMATS), rows=st.integers(1, 40), cols=st.integers(1, 72),
       group=st.sampled_from([4, 16, 32, 64, 7]), m=st.integers(1, 20), rank=st.integers(0, 9),
       bias=st.booleans(), dtype=st.sampled_from(DTYPES), path=st.sampled_from([None, "decode", "prefill"]),
       seed=st.integers(0, 1000))
def test_fused_kernel_matches_exact_arithmetic(fmt, rows, cols, group, m, rank, bias, dtype, path, seed):
    name, opts = fmt
    qw = _qweight(name, opts, rows, cols, group, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, cols, generator=g).to(dtype)
    left = torch.randn(rows, rank, generator=g) * 0.3 if rank else None
    right = torch.randn(rank, cols, generator=g) * 0.3 if rank else None
    b = torch.randn(rows, generator=g) if bias else None
    _check(x, qw, left, right, b, path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_both_paths_at_block_multiples_and_batched_inputs(bits, dtype):
    """Shapes that are exact multiples of the interpreter's tiles, a 3-d activation tensor, and a
    rank above the decode path's rank tile."""
    qw = _qweight("rtn", {"bits": bits}, 32, 64, 32, bits)
    left, right = torch.randn(32, 40) * 0.2, torch.randn(40, 64) * 0.2
    x = torch.randn(2, 3, 64).to(dtype)
    decode = _check(x, qw, left, right, torch.randn(32), path="decode")
    prefill = _check(x, qw, left, right, torch.randn(32), path="prefill")
    assert decode.shape == prefill.shape == (2, 3, 32)
    _check(torch.randn(32, 64).to(dtype), qw, left, right, None)


def test_factor_casts_are_reused_until_modified():
    qw = _qweight("rtn", {"bits": 4}, 8, 32, 16, 0)
    left, right = torch.randn(8, 3), torch.randn(3, 32)
    x = torch.randn(2, 32, dtype=torch.float16)
    first = triton_lq.lq_linear_triton(x, qw, left, right)
    cached = triton_lq._CASTS[id(left)][1]
    assert triton_lq._as(left, torch.float16) is cached
    with torch.no_grad():
        left.mul_(2)  # an optimizer step: the cast is made again
    assert triton_lq._as(left, torch.float16) is not cached
    assert not torch.equal(first, triton_lq.lq_linear_triton(x, qw, left, right))
    key = id(left)
    del left
    assert key not in triton_lq._CASTS  # dropped with the tensor


def test_empty_batch_and_deterministic():
    qw = _qweight("nf", {"bits": 4}, 8, 32, 16, 0)
    assert triton_lq.lq_linear_triton(torch.zeros(0, 32), qw, None, None).shape == (0, 8)
    x, left, right = torch.randn(5, 32), torch.randn(8, 3), torch.randn(3, 32)
    first = triton_lq.lq_linear_triton(x, qw, left, right)
    assert torch.equal(first, triton_lq.lq_linear_triton(x, qw, left, right))  # bit for bit, call to call


def test_wrong_feature_count_is_an_error():
    qw = _qweight("rtn", {"bits": 4}, 8, 32, 16, 0)
    with pytest.raises(ValueError, match="33 features"):
        triton_lq.lq_linear_triton(torch.randn(2, 33), qw, None, None)


# --------------------------------------------------------------------------- dispatch
def _backend(monkeypatch, mode, x, qw):
    monkeypatch.setenv("LQFRAME_KERNELS", mode)
    return dispatch.select_backend(x, qw).name


def test_dispatch_modes(monkeypatch):
    qw = _qweight("rtn", {"bits": 4}, 8, 32, 16, 0)
    x = torch.randn(2, 32)
    assert _backend(monkeypatch, "auto", x, qw) == "torch-reference"  # CPU tensors: the reference
    assert _backend(monkeypatch, "reference", x, qw) == "torch-reference"
    assert _backend(monkeypatch, "triton", x, qw) == "triton"
    monkeypatch.setenv("LQFRAME_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="LQFRAME_KERNELS='cuda-please'"):
        dispatch.select_backend(x, qw)


def test_gradients_take_the_reference(monkeypatch):
    """The kernels are forward-only: a call that needs gradients to L and R goes to the reference,
    and the gradients are those of the reference."""
    monkeypatch.setenv("LQFRAME_KERNELS", "triton")
    qw = _qweight("rtn", {"bits": 3}, 8, 32, 16, 0)
    left = torch.randn(8, 4, requires_grad=True)
    right = torch.randn(4, 32, requires_grad=True)
    x = torch.randn(3, 32)
    dispatch.lq_linear_packed(x, qw, left, right).square().sum().backward()
    grads = left.grad.clone(), right.grad.clone()
    left.grad = right.grad = None
    dispatch._reference(x, qw, left, right, None).square().sum().backward()
    assert torch.equal(grads[0], left.grad) and torch.equal(grads[1], right.grad)
    with torch.no_grad():  # without gradients: the Triton kernel
        y = dispatch.lq_linear_packed(x, qw, left, right)
        assert torch.equal(y, triton_lq.lq_linear_triton(x, qw, left, right))


def test_tiny_model_perplexity_through_the_kernels(monkeypatch):
    """A compressed tiny LLaMA (int3 g16 + rank-4 SVD factors) scored through the Triton
    path (interpreter) and through the reference: the same perplexity within float32 rounding."""
    from lqframe.evaluate import perplexity
    from lqframe.lqlinear import LQLinear
    from lqframe.recipe import parse_recipe
    from tests.tiny import tiny_llama

    model = tiny_llama(layers=1, hidden=32, intermediate=64, vocab=64)
    recipe = parse_recipe({"quantize_stage": {"quantizer": {"name": "rtn", "bits": 3, "group_size": 16}},
                           "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}},
                           "evaluate_stage": {"float_baseline": False}}, "tiny")
    lqframe.compress(model, recipe, None, progress=False)
    assert sum(isinstance(m, LQLinear) for m in model.modules()) == 7
    windows = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    original = triton_lq.lq_linear_triton
    monkeypatch.setattr(triton_lq, "lq_linear_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("LQFRAME_KERNELS", "reference")
    reference = perplexity(model, windows, progress=False)
    assert not calls
    monkeypatch.setenv("LQFRAME_KERNELS", "triton")
    fused = perplexity(model, windows, progress=False)
    assert len(calls) == 7 * 2
    assert math.isfinite(reference) and abs(fused - reference) <= 1e-5 * reference


def test_every_kernel_variant_compiles_for_an_h100_class_gpu():
    """Triton's ahead-of-time path (to PTX and a cubin for sm_90) needs no GPU: every path, dtype,
    code format and GPU tile of CONFIGS compiles, which the interpreter alone would not show."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-m", "lqframe.kernels.triton_lq", "90"], capture_output=True, text=True,
                         env=env, timeout=600)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and lines, res.stdout + res.stderr[-2000:]
    assert all(line.startswith("ok ") for line in lines)
    assert any(line.startswith("ok    prefill bf16") for line in lines)
    assert any(line.startswith("ok    decode fp16 int3") for line in lines)


# --------------------------------------------------------------------------- on a CUDA GPU
cuda = pytest.mark.skipif(not CUDA or triton_lq.INTERPRETER, reason="needs a CUDA GPU (compiled kernels)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 100])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_kernels_match_the_reference(bits, m, dtype):
    qw = _qweight("rtn", {"bits": bits}, 384, 512, 64, bits)
    qw = lqframe.QuantizedWeight.from_state(*_to_cuda(qw.to_state()))
    left, right = (torch.randn(384, 32, device="cuda") * 0.05, torch.randn(32, 512, device="cuda") * 0.05)
    x = torch.randn(m, 512, device="cuda").to(dtype)
    _check(x, qw, left, right, torch.randn(384, device="cuda"))
    assert dispatch.select_backend(x, qw).name == "triton"  # auto: CUDA tensors take the kernels


def _to_cuda(state):
    tensors, header = state
    return {k: v.cuda() for k, v in tensors.items()}, header
