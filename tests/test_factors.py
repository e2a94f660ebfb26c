"""Storage formats of the low-rank factors (lqframe.factors) and their use in LQLinear."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lqframe
from lqframe.factors import FACTOR_FORMATS, INT8_BLOCK, decode_factor, encode_factor, factor_bits, round_factor
from lqframe.lqlinear import LQLinear
from tests.strategies import matrices

REG = lqframe.registry()


@settings(max_examples=40, deadline=None)
@given(matrices(max_rows=40, max_cols=150), st.sampled_from(FACTOR_FORMATS))
def test_encoding_is_exact_on_its_own_grid_and_counted_exactly(x, fmt):
    stored = encode_factor(x, fmt)
    values = round_factor(x, fmt)
    assert torch.equal(decode_factor(stored), values.to(torch.float32))
    assert torch.equal(round_factor(values, fmt), values)  # lossless once on the grid
    if isinstance(stored, torch.Tensor):
        real_bits = stored.numel() * stored.element_size() * 8
    else:
        real_bits = stored.storage_bits()
        assert stored.codes.dtype == torch.uint8 and stored.codes.numel() == x.numel()
    assert real_bits == factor_bits(tuple(x.shape), fmt)


@settings(max_examples=40, deadline=None)
@given(matrices(max_rows=30, max_cols=130))
def test_int8_error_is_at_most_half_a_step_per_block(x):
    x = x.to(torch.float32)
    stored = encode_factor(x, "int8")
    err = (decode_factor(stored) - x).abs()
    rows, cols = x.shape
    scale = stored.scale.to(torch.float32)
    for j, b in enumerate(range(0, cols, INT8_BLOCK)):
        block = x[:, b:b + INT8_BLOCK].abs().amax(dim=1)
        assert bool((block <= 127 * scale[:, j]).all())  # nothing clips
        assert bool(((scale[:, j] < 2 * block / 127) | (block == 0)).all())  # the smallest such power of two
        assert bool(((torch.frexp(scale[:, j])[0] == 0.5) | (scale[:, j] == 0)).all())
        assert bool((err[:, b:b + INT8_BLOCK] <= scale[:, j:j + 1] / 2).all())


def test_bits_per_value():
    assert factor_bits((4096, 32), "int8") == 4096 * 32 * 8 + 4096 * 16  # L: one scale per row of 32
    assert factor_bits((32, 4096), "int8") == 32 * 4096 * 8 + 32 * 64 * 16  # R: 8.25 bits per value
    assert factor_bits((10, 10), "bfloat16") == 1600


def _module(fmt, rank=6):
    torch.manual_seed(0)
    lin = torch.nn.Linear(130, 48)
    q = REG.create("quantizer", "rtn", bits=3, group_size=32)
    dec = REG.create("reconstructor", "svd", rank=rank, factor_dtype=fmt).decompose(lin.weight, q)
    return lin, dec, LQLinear.from_decomposition(lin, dec)


def test_int8_factors_cost_half_of_float16_and_lose_little():
    lin, dec16, m16 = _module("float16")
    _, dec8, m8 = _module("int8")
    lr16 = m16.storage_bits() - m16.storage_bits(include_lowrank=False)
    lr8 = m8.storage_bits() - m8.storage_bits(include_lowrank=False)
    assert lr8 == factor_bits((48, 6), "int8") + factor_bits((6, 130), "int8") == dec8.lowrank.storage_bits()
    assert lr8 < 0.6 * lr16
    w = lin.weight.detach()
    e16, e8, e0 = ((w - d).norm() for d in (dec16.dense(), dec8.dense(), dec8.qweight.dequantize()))
    assert e8 < e0 and abs(e8 - e16) < 0.02 * e16


def test_int8_state_dict_holds_packed_factors_and_loads_back():
    _, dec, mod = _module("int8")
    state = mod.state_dict()
    assert "left" not in state and "right" not in state
    assert state["left_q.codes"].dtype == torch.uint8 and state["right_q.scale"].dtype == torch.bfloat16
    clone = LQLinear.from_layer_config(mod.layer_config())
    assert clone.load_state_dict(state, strict=True).missing_keys == []
    assert torch.equal(clone.left, mod.left) and torch.equal(clone.right, mod.right)
    assert torch.equal(clone.dense_weight(), dec.dense())


def test_int8_factors_stay_trainable_and_are_re_encoded_on_save():
    _, _, mod = _module("int8")
    opt = torch.optim.SGD([mod.left, mod.right], lr=0.1)
    mod(torch.randn(16, 130)).pow(2).sum().backward()
    opt.step()
    trained = mod.left.detach().clone()
    clone = LQLinear.from_layer_config(mod.layer_config())
    clone.load_state_dict(mod.state_dict())
    assert torch.equal(clone.left, round_factor(trained, "int8"))  # the trained factor, not the initial one
    assert not torch.equal(clone.left, _module("int8")[2].left)


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
def test_float_factors_are_stored_in_their_dtype(fmt):
    _, _, mod = _module(fmt)
    state = mod.state_dict()
    assert state["left"].dtype == getattr(torch, fmt) and state["right"].dtype == getattr(torch, fmt)
    assert mod.left.dtype == torch.float32  # the trainable parameter itself stays float32
