"""Property tests over every registered quantizer × reconstructor pair.

The cases come from the live registry, each component contributing its ``test_configs()``, so an
installed third-party plugin is covered without editing this file.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lqframe
from lqframe.kernels import pack_bits, packed_nbytes
from lqframe.registry import option_names
from tests.strategies import make_matrix, matrices, synthetic_stats

REG = lqframe.registry()


def _cases(kind: str) -> list[tuple[str, dict]]:
    return [(name, cfg) for name in REG.names(kind) for cfg in REG.get(kind, name).test_configs()]


QUANTIZERS = _cases("quantizer")
RECONSTRUCTORS = _cases("reconstructor")


def _id(case: tuple[str, dict]) -> str:
    name, cfg = case
    return name + "".join(f"-{k}={v}" for k, v in cfg.items())


PAIRS = [pytest.param(q, r, id=f"{_id(q)}|{_id(r)}") for q in QUANTIZERS for r in RECONSTRUCTORS]
QCASES = [pytest.param(q, id=_id(q)) for q in QUANTIZERS]

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the pair suite grows as (quantizers × reconstructors): fewer examples per pair, still every pair
PAIR_PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _stored_bits(qw: lqframe.QuantizedWeight) -> int:
    """Bits actually stored, counted from the serialised tensors (codebooks are format constants)."""
    tensors, _ = qw.to_state()
    return sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if not k.endswith("codebook"))


def _check_packed(qw: lqframe.QuantizedWeight) -> None:
    codes = qw.unpacked_codes()
    assert codes.shape == tuple(qw.shape)
    if codes.numel():
        assert int(codes.min()) >= 0 and int(codes.max()) < (1 << qw.bits)
    assert qw.codes.dtype == torch.uint8
    assert qw.codes.numel() == packed_nbytes(qw.numel, qw.bits)  # real bit width, no padding slack
    assert torch.equal(pack_bits(codes, qw.bits), qw.codes)  # pack(unpack(x)) == x
    if isinstance(qw.scale, lqframe.QuantizedWeight):
        _check_packed(qw.scale)


def _with_rank(recon, rank: int):
    cls = type(recon)
    return attrs.evolve(recon, rank=rank) if "rank" in option_names(cls) and attrs.has(cls) else recon


@pytest.mark.parametrize("qcase,rcase", PAIRS)
@PAIR_PROPERTY
@given(w=matrices(), data=st.data())
def test_pair_properties(qcase, rcase, w, data):
    quantizer = REG.create("quantizer", qcase[0], **qcase[1])
    recon = REG.create("reconstructor", rcase[0], **rcase[1])
    n, m = w.shape
    recon = _with_rank(recon, data.draw(st.integers(0, min(n, m) + 2), label="rank"))
    stats = synthetic_stats(n, m, recon.all_needs(quantizer), seed=data.draw(st.integers(0, 99), label="stats"))

    dec = recon.decompose(w, quantizer, stats)
    qw = dec.qweight

    # shapes and finiteness
    assert tuple(qw.shape) == (n, m)
    dense = dec.dense()
    assert dense.shape == (n, m) and dense.dtype == torch.float32
    assert bool(torch.isfinite(dense).all())

    # Q is stored in its real bits, and the accounting is exact
    _check_packed(qw)
    assert qw.storage_bits() == _stored_bits(qw)
    assert quantizer.storage_bits((n, m)) == qw.storage_bits()
    lr_bits = 0 if dec.lowrank is None else dec.lowrank.storage_bits()
    assert recon.lowrank_bits((n, m)) == lr_bits
    assert dec.storage_bits() == qw.storage_bits() + lr_bits

    # the checkpoint representation round-trips exactly
    tensors, header = qw.to_state("layer.")
    again = lqframe.QuantizedWeight.from_state(tensors, header, "layer.")
    assert torch.equal(again.dequantize(), qw.dequantize())

    # deterministic: the same input gives the same bytes
    dec2 = recon.decompose(w, quantizer, stats)
    assert torch.equal(dec2.qweight.codes, qw.codes)
    assert torch.equal(dec2.dense(), dense)


@pytest.mark.parametrize("qcase", QCASES)
@PROPERTY
@given(w=matrices())
def test_quantizer_rounding_bound(qcase, w):
    """Every dequantized element is within the format's rounding step of its input (for quantizers
    that round to nearest), and the fast ``roundtrip`` path agrees with the packed path."""
    quantizer = REG.create("quantizer", qcase[0], **qcase[1])
    w32 = w.float()
    stats = synthetic_stats(*w.shape, quantizer.needs)
    qw = quantizer.quantize(w, stats)
    deq = qw.dequantize()
    if quantizer.rounds_to_nearest:
        bound = qw.error_bound(w32)
        slack = 1e-6 * (w32.abs() + bound) + 1e-30
        excess = (w32 - deq).abs() - bound - slack
        assert float(excess.max()) <= 0, f"rounding error exceeds the format step by {float(excess.max()):.3g}"
    torch.testing.assert_close(quantizer.roundtrip(w, stats), deq, rtol=1e-6, atol=0)
    # low-precision inputs are quantized as their exact float32 values
    assert torch.equal(quantizer.quantize(w32, stats).codes, qw.codes)


@pytest.mark.parametrize("qcase,rcase", PAIRS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_a_clear_error(qcase, rcase, bad):
    quantizer = REG.create("quantizer", qcase[0], **qcase[1])
    recon = REG.create("reconstructor", rcase[0], **rcase[1])
    w = torch.randn(8, 40)
    w[3, 7] = bad
    stats = synthetic_stats(8, 40, recon.all_needs(quantizer))
    with pytest.raises(lqframe.WeightError, match=r"NaN|Inf") as err:
        recon.decompose(w, quantizer, stats)
    assert "[3, 7]" in str(err.value)


@pytest.mark.parametrize("qcase", QCASES)
@PROPERTY
@given(w=matrices(max_rows=20, max_cols=60), data=st.data())
def test_svd_reaches_the_eckart_young_tail(qcase, w, data):
    """For the Q the quantizer produced, ‖W − Q − LR‖_F² equals Σ_{i>r} σ_i(W − Q)²."""
    quantizer = REG.create("quantizer", qcase[0], **qcase[1])
    n, m = w.shape
    rank = data.draw(st.integers(0, min(n, m) + 2), label="rank")
    recon = REG.create("reconstructor", "svd", rank=rank, factor_dtype="float32")
    dec = recon.decompose(w, quantizer, synthetic_stats(n, m, quantizer.needs))
    w64 = w.double()
    delta = w64 - dec.qweight.dequantize().double()
    sigma = torch.linalg.svdvals(delta)
    tail = float((sigma[min(rank, n, m):] ** 2).sum())
    err = float(((w64 - dec.dense().double()) ** 2).sum())
    scale = float((delta**2).sum()) + 1e-30
    assert abs(err - tail) <= 1e-5 * scale + 1e-12, (err, tail)
    if rank >= min(n, m):
        assert err <= 1e-9 * scale + 1e-12
    # never worse than no correction, and never worse than any other rank-r term we try
    assert err <= scale * (1 + 1e-6)
    probe = torch.randn(n, min(rank, n, m), dtype=torch.float64) @ torch.randn(min(rank, n, m), m, dtype=torch.float64)
    assert err <= float(((delta - 1e-3 * probe) ** 2).sum()) + 1e-6 * scale


def test_every_builtin_is_covered():
    names = {q[0] for q in QUANTIZERS}, {r[0] for r in RECONSTRUCTORS}
    assert {"nf", "rtn"} <= names[0] and {"svd", "none"} <= names[1]
    assert len(PAIRS) == len(QUANTIZERS) * len(RECONSTRUCTORS)


def test_bf16_and_f16_inputs_compress_like_their_float32_values():
    w = make_matrix(16, 70, "gaussian", "bfloat16", seed=3)
    for name, cfg in QUANTIZERS:
        q = REG.create("quantizer", name, **cfg)
        stats = synthetic_stats(16, 70, q.needs)
        assert torch.equal(q.quantize(w, stats).codes, q.quantize(w.float(), stats).codes)


@pytest.mark.parametrize("qcase,rcase", PAIRS)
@pytest.mark.parametrize("shape", [(0, 16), (5, 0), (0, 0)])
def test_empty_matrices(qcase, rcase, shape):
    quantizer = REG.create("quantizer", qcase[0], **qcase[1])
    recon = REG.create("reconstructor", rcase[0], **rcase[1])
    dec = recon.decompose(torch.zeros(shape), quantizer, synthetic_stats(*shape, recon.all_needs(quantizer)))
    assert dec.dense().shape == shape
    assert dec.qweight.storage_bits() == quantizer.storage_bits(shape)
