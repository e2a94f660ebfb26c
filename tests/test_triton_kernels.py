"""The Triton kernels (``lqframe.kernels.triton_lq``) against the torch reference.

Without a CUDA GPU they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in
conftest.py before any kernel module is imported); with one they run compiled on CUDA tensors
(:data:`DEVICE`), and the tests marked ``cuda`` add every format × both paths × float16/bfloat16 at
shapes sized from the GPU tiles. The oracle is exact arithmetic (float64) on the operands rounded
as the reference rounds them: Q decoded in float32 then rounded to the activations' dtype,
likewise L, R and the bias. The kernel must be within the activations' rounding of it, and the
compute layout must decode to exactly the reference's Q.
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
#: where the kernels run: CPU tensors in the interpreter, CUDA tensors when compiled
DEVICE = "cpu" if triton_lq.INTERPRETER else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

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


def _qweight(name: str, opts: dict, rows: int, cols: int, group: int, seed: int, device: str = "cpu"):
    w = testing.make_matrix(rows, cols, "heavy" if seed % 3 == 0 else "gaussian", "float32", seed)
    return _on(REG.create("quantizer", name, group_size=group, **opts).quantize(w), device)


def _on(qw, device: str):
    """``qw`` with every stored tensor on ``device``."""
    tensors, header = qw.to_state()
    return lqframe.QuantizedWeight.from_state({k: v.to(device) for k, v in tensors.items()}, header)


def _check(x, qw, left, right, bias, path=None):
    """The kernel's output, and the reference's, within the rounding bound of float64 arithmetic on
    the operands rounded to the activations' dtype (testing.check_linear_output)."""
    y = triton_lq.lq_linear_triton(x, qw, left, right, bias, path=path)
    q = qw.dequantize(torch.float32)
    testing.check_linear_output(y, x, q, left, right, bias)
    testing.check_linear_output(dispatch._reference(x, qw, left, right, bias), x, q, left, right, bias)
    return y


def _operands(m, rows, cols, rank, bias, dtype, seed, device):
    """Activations ``m × cols`` in ``dtype``, float32 factors of ``rank`` (None at rank 0) and a
    bias (or None), drawn on the CPU from ``seed`` and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, cols, generator=g).to(dtype).to(device)
    left = (torch.randn(rows, rank, generator=g) * 0.3).to(device) if rank else None
    right = (torch.randn(rank, cols, generator=g) * 0.3).to(device) if rank else None
    b = torch.randn(rows, generator=g).to(device) if bias else None
    return x, left, right, b


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
        qw = _on(quantizer.quantize(w, stats), DEVICE)
        x = torch.randn(3, 40, device=DEVICE)
        _check(x, qw, None, None, None)


# --------------------------------------------------------------------------- kernels vs oracle
# compiled, most examples compile new kernel variants: fewer of them (the cuda tests cover every format)
@settings(max_examples=150 if triton_lq.INTERPRETER else 60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(ALL_FORMATS), rows=st.integers(1, 40), cols=st.integers(1, 72),
       group=st.sampled_from([4, 16, 32, 64, 7]), m=st.integers(1, 20), rank=st.integers(0, 9),
       bias=st.booleans(), dtype=st.sampled_from(DTYPES), path=st.sampled_from([None, "decode", "prefill"]),
       seed=st.integers(0, 1000))
def test_fused_kernel_matches_exact_arithmetic(fmt, rows, cols, group, m, rank, bias, dtype, path, seed):
    name, opts = fmt
    qw = _qweight(name, opts, rows, cols, group, seed, DEVICE)
    x, left, right, b = _operands(m, rows, cols, rank, bias, dtype, seed, DEVICE)
    _check(x, qw, left, right, b, path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_both_paths_at_block_multiples_and_batched_inputs(bits, dtype):
    """Shapes that are exact multiples of the interpreter's tiles, a 3-d activation tensor, and a
    rank above the decode path's rank tile."""
    qw = _qweight("rtn", {"bits": bits}, 32, 64, 32, bits, DEVICE)
    left, right = torch.randn(32, 40, device=DEVICE) * 0.2, torch.randn(40, 64, device=DEVICE) * 0.2
    x = torch.randn(2, 3, 64, device=DEVICE).to(dtype)
    decode = _check(x, qw, left, right, torch.randn(32, device=DEVICE), path="decode")
    prefill = _check(x, qw, left, right, torch.randn(32, device=DEVICE), path="prefill")
    assert decode.shape == prefill.shape == (2, 3, 32)
    _check(torch.randn(32, 64, device=DEVICE).to(dtype), qw, left, right, None)


def test_factor_casts_are_reused_until_modified():
    qw = _qweight("rtn", {"bits": 4}, 8, 32, 16, 0, DEVICE)
    left, right = torch.randn(8, 3, device=DEVICE), torch.randn(3, 32, device=DEVICE)
    x = torch.randn(2, 32, dtype=torch.float16, device=DEVICE)
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
    qw = _qweight("nf", {"bits": 4}, 8, 32, 16, 0, DEVICE)
    assert triton_lq.lq_linear_triton(torch.zeros(0, 32, device=DEVICE), qw, None, None).shape == (0, 8)
    x, left, right = (torch.randn(5, 32, device=DEVICE), torch.randn(8, 3, device=DEVICE),
                      torch.randn(3, 32, device=DEVICE))
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
    if triton_lq.INTERPRETER:
        assert _backend(monkeypatch, "triton", x, qw) == "triton"
    else:  # compiled kernels take no CPU tensors; CUDA tensors take them by default
        with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
            _backend(monkeypatch, "triton", x, qw)
        qw, x = _on(qw, DEVICE), x.to(DEVICE)
        assert _backend(monkeypatch, "auto", x, qw) == "triton"
        assert _backend(monkeypatch, "triton", x, qw) == "triton"
        assert _backend(monkeypatch, "reference", x, qw) == "torch-reference"
    monkeypatch.setenv("LQFRAME_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="LQFRAME_KERNELS='cuda-please'"):
        dispatch.select_backend(x, qw)


def test_gradients_take_the_reference(monkeypatch):
    """The kernels are forward-only: a call that needs gradients to L and R goes to the reference,
    and the gradients are those of the reference."""
    monkeypatch.setenv("LQFRAME_KERNELS", "triton")
    qw = _qweight("rtn", {"bits": 3}, 8, 32, 16, 0, DEVICE)
    left = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    right = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    x = torch.randn(3, 32, device=DEVICE)
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
    path (interpreter, or compiled on the GPU) and through the reference: the same perplexity
    within float32 rounding."""
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
    model.to(DEVICE)
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


# --------------------------------------------------------------------------- every format at the tiles in use
PATHS = ["decode", "prefill"]


def _tile_cases(path: str) -> list[tuple[int, int, int, int, int, bool]]:
    """``(rows, cols, group, m, rank, bias)`` for ``path``, sized from the launch configurations in
    use (the GPU tiles when compiled, the interpreter's otherwise): rows and columns that are
    multiples of every tile and that are not; a group that divides the K tiles and one (48) that
    does not; for decode M = 1, a few rows and more than ``DECODE_MAX_ROWS`` (forced), for prefill
    an M in each prefill tile's range and M = 2 (forced); rank 0 and ranks below and above the
    decode rank tile; with and without bias."""
    cfg = triton_lq._configs()
    tiles = cfg["prefill"]
    bn = max(cfg["decode"]["BN"], *(t["BN"] for _, t in tiles))
    bk = max(cfg["decode"]["BK"], cfg["down"]["BK"], *(t["BK"] for _, t in tiles))
    even, odd = (2 * bn, 2 * bk), (2 * bn + bn // 2 + 3, 2 * bk + bk // 2 + 5)
    kinds = [(*even, 64, 40, True), (*odd, 48, 0, False), (odd[0], even[1], 64, 5, True)]
    if path == "decode":
        ms = [1, triton_lq.DECODE_MAX_ROWS + 3, triton_lq.DECODE_MAX_ROWS - 1]
    else:
        lows = [triton_lq.DECODE_MAX_ROWS] + [bound for bound, _ in tiles[:-1]]
        ms = [min(low + t["BM"] + 3, bound or math.inf) for low, (bound, t) in zip(lows, tiles, strict=True)] + [2]
        ms += [2 * tiles[0][1]["BM"]] * (len(kinds) - len(ms))
    return [(*kinds[i % len(kinds)][:3], m, *kinds[i % len(kinds)][3:]) for i, m in enumerate(ms)]


def _check_tile_cases(name: str, opts: dict, path: str, dtype: torch.dtype, device: str) -> int:
    """Every case of :func:`_tile_cases` for one format, path and dtype on ``device`` against the
    oracle; an M inside the path's range goes through the automatic choice, one outside is forced.
    The number of cases."""
    cases = _tile_cases(path)
    for rows, cols, group, m, rank, bias in cases:
        seed = rows + cols + m
        qw = _qweight(name, opts, rows, cols, group, seed, device)
        x, left, right, b = _operands(m, rows, cols, rank, bias, dtype, seed, device)
        natural = (m <= triton_lq.DECODE_MAX_ROWS) == (path == "decode")
        _check(x, qw, left, right, b, path=None if natural else path)
    return len(cases)


FORMAT_IDS = [f"{n}-{o}" for n, o in ALL_FORMATS]


@pytest.mark.skipif(not triton_lq.INTERPRETER, reason="the interpreter's run of the cuda test's body")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,opts,dtype", [
    ("nf", {"bits": 3, "double_quant": "lqlora", "dq_bits": 3, "dq_group_size": 4, "dq_scale_dtype": "bfloat16"},
     torch.bfloat16),
    ("rtn", {"bits": 5, "symmetric": False, "scale_dtype": "float16"}, torch.float16),
    ("rtn", {"bits": 2, "symmetric": True, "scale_dtype": "bfloat16"}, torch.bfloat16),
], ids=["nf3-lqlora-dq-bf16", "int5-fp16", "int2-symmetric-bf16"])
def test_tile_cases_in_the_interpreter(name, opts, dtype, path):
    """The body of :func:`test_cuda_kernels_every_format_both_paths` on CPU tensors, at the
    interpreter's tiles (a GPU runs it at the GPU tiles)."""
    assert _check_tile_cases(name, opts, path, dtype, "cpu") == 3


# --------------------------------------------------------------------------- on a CUDA GPU
cuda = pytest.mark.skipif(not CUDA or triton_lq.INTERPRETER,
                          reason="needs a CUDA GPU and the compiled kernels (TRITON_INTERPRET unset or 0)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,opts", ALL_FORMATS, ids=FORMAT_IDS)
def test_cuda_kernels_every_format_both_paths(name, opts, path, dtype, monkeypatch):
    """The compiled kernels for every format (integer and NormalFloat, every width, plain and
    double-quantized scales), each path and float16/bfloat16 at the GPU tiles (rows and columns that
    are and are not tile multiples, every prefill tile, rank 0 and above the rank tile, bias or not)."""
    assert _check_tile_cases(name, opts, path, dtype, "cuda") >= 3
    monkeypatch.setenv("LQFRAME_KERNELS", "auto")
    qw = _qweight(name, opts, 8, 64, 16, 0, "cuda")
    assert dispatch.select_backend(torch.zeros(1, 64, device="cuda"), qw).name == "triton"  # auto: CUDA → kernels


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_act_order_weights_compute_in_the_inputs_order(monkeypatch, mode):
    """A weight stored in act-order (``perm``: stored column j is input channel perm[j], imported from
    GPTQ ``g_idx``): both backends compute x·Qᵀ + (x·Rᵀ)·Lᵀ + b with Q in the input's order, and the
    gradients to L and R are those of that product."""
    import attrs

    stored = _qweight("rtn", {"bits": 4, "symmetric": False}, 8, 48, 16, 3)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    qw = attrs.evolve(stored, perm=perm)
    q = qw.dequantize()
    assert torch.equal(q[:, perm.long()], stored.dequantize()) and not torch.equal(q, stored.dequantize())
    x, left, right, b = _operands(3, 8, 48, 2, True, torch.float32, 0, DEVICE)
    monkeypatch.setenv("LQFRAME_KERNELS", mode)
    qw = _on(qw, DEVICE)
    assert dispatch.select_backend(x, qw).name == ("torch-reference" if mode == "reference" else "triton")
    with torch.no_grad():
        testing.check_linear_output(dispatch.lq_linear_packed(x, qw, left, right, b), x, q, left, right, b)
    left, right = left.clone().requires_grad_(), right.clone().requires_grad_()
    dispatch.lq_linear_packed(x, qw, left, right, b).square().sum().backward()
    want_l, want_r = left.detach().clone().requires_grad_(), right.detach().clone().requires_grad_()
    (x @ q.to(DEVICE).T + (x @ want_r.T) @ want_l.T + b).square().sum().backward()
    assert torch.allclose(left.grad, want_l.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(right.grad, want_r.grad, rtol=1e-5, atol=1e-5)
