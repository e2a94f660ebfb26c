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
@given(matrices(max_rows=40, max_cols=150), st.sampled_from(FACTOR_FORMATS), st.sampled_from(["left", "right"]))
def test_encoding_is_exact_on_its_own_grid_and_counted_exactly(x, fmt, side):
    stored = encode_factor(x, fmt, side)
    values = round_factor(x, fmt, side)
    assert values.shape == x.shape
    assert torch.equal(decode_factor(stored, side), values.to(torch.float32))
    assert torch.equal(round_factor(values, fmt, side), values)  # lossless once on the grid
    if isinstance(stored, torch.Tensor):
        real_bits = stored.numel() * stored.element_size() * 8
    else:
        real_bits = stored.storage_bits()
        assert stored.codes.dtype == torch.uint8 and stored.codes.numel() == x.numel()
        assert stored.shape == (tuple(x.shape) if side == "left" else tuple(x.T.shape))  # R is stored as Rᵀ
    assert real_bits == factor_bits(tuple(x.shape), fmt, side)


@settings(max_examples=40, deadline=None)
@given(matrices(max_rows=130, max_cols=30))
def test_int8_error_is_at_most_half_a_step_per_block(x):
    """Blocks run along the rank: along the rows of L, and for R along its columns (rows of Rᵀ)."""
    x = x.to(torch.float32)  # rows along the rank: x is L, and x.T is R
    for side, factor in (("left", x), ("right", x.T)):
        stored = encode_factor(factor, "int8", side)
        err = decode_factor(stored, side) - factor
        err = err if side == "left" else err.T
        scale = stored.scale.to(torch.float32)
        for j, b in enumerate(range(0, x.shape[1], INT8_BLOCK)):
            block = x[:, b:b + INT8_BLOCK].abs().amax(dim=1)
            assert bool((block <= 127 * scale[:, j]).all())  # nothing clips
            assert bool(((scale[:, j] < 2 * block / 127) | (block == 0)).all())  # the smallest such power of two
            assert bool(((torch.frexp(scale[:, j])[0] == 0.5) | (scale[:, j] == 0)).all())
            assert bool((err[:, b:b + INT8_BLOCK].abs() <= scale[:, j:j + 1] / 2).all())


def test_bits_per_value():
    assert factor_bits((4096, 32), "int8", "left") == 4096 * 32 * 8 + 4096 * 16  # one scale per row of L
    assert factor_bits((32, 4096), "int8", "right") == 32 * 4096 * 8 + 4096 * 16  # one per column of R
    assert factor_bits((4096, 128), "int8", "left") == 4096 * 128 * 8 + 4096 * 2 * 16  # 64 values per scale
    assert factor_bits((10, 10), "bfloat16", "right") == 1600


def test_int8_right_factor_scales_follow_input_channels():
    """QERA's R carries T⁻¹: columns of very different size. Per-column scales keep every column's
    relative error at the int8 level, which a scale shared along a row would not."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(8, 256, generator=g) * torch.logspace(-3, 2, 256)[None, :]
    err = (round_factor(r, "int8", "right") - r).abs() / r.abs().amax(dim=0, keepdim=True)
    assert float(err.max()) <= 1 / 127
    shared = (round_factor(r, "int8", "left") - r).abs() / r.abs().amax(dim=0, keepdim=True)
    assert float(shared.max()) > 10 / 127  # a block shared along a row of R: small columns lose most bits


def _module(fmt, rank=6):
    torch.manual_seed(0)
    lin = torch.nn.Linear(130, 48)
    q = REG.create("quantizer", "rtn", bits=3, group_size=32)
    dec = REG.create("reconstructor", "svd", rank=rank, factor_dtype=fmt).decompose(lin.weight, q)
    return lin, dec, LQLinear.from_decomposition(lin, dec)


def test_int8_factors_cost_half_of_float16_and_lose_little():
    lin, dec16, m16 = _module("float16", rank=16)
    _, dec8, m8 = _module("int8", rank=16)
    lr16 = m16.storage_bits() - m16.storage_bits(include_lowrank=False)
    lr8 = m8.storage_bits() - m8.storage_bits(include_lowrank=False)
    assert lr8 == factor_bits((48, 16), "int8", "left") + factor_bits((16, 130), "int8", "right") \
        == dec8.lowrank.storage_bits()
    assert lr8 == (8 + 16 / 16) / 16 * lr16  # 9 bits per value at rank 16
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
    assert torch.equal(clone.left, round_factor(trained, "int8", "left"))  # the trained factor, not the initial one
    assert not torch.equal(clone.left, _module("int8")[2].left)


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
def test_float_factors_are_stored_in_their_dtype(fmt):
    _, _, mod = _module(fmt)
    state = mod.state_dict()
    assert state["left"].dtype == getattr(torch, fmt) and state["right"].dtype == getattr(torch, fmt)
    assert mod.left.dtype == torch.float32  # the trainable parameter itself stays float32


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_one_name_factor_dtype_and_old_layer_configs_load(fmt, tmp_path):
    """The storage format is ``factor_dtype`` everywhere (reconstructor option, LowRank, LQLinear, the
    per-layer config, ``lqframe inspect``); checkpoints that wrote ``lowrank_dtype`` still load."""
    import json

    import transformers

    import lqframe
    from lqframe.checkpoint import inspect_checkpoint, save_checkpoint
    from lqframe.factors import layer_factor_dtype

    lin, dec, mod = _module(fmt)
    assert dec.lowrank.factor_dtype == fmt and mod.factor_dtype == fmt
    config = mod.layer_config()
    assert config["factor_dtype"] == fmt and "lowrank_dtype" not in config

    old = {k: v for k, v in config.items() if k != "factor_dtype"} | {"lowrank_dtype": fmt}
    assert layer_factor_dtype(old) == fmt and layer_factor_dtype({"rank": 0}) == "float32"
    clone = LQLinear.from_layer_config(old)
    assert clone.factor_dtype == fmt
    clone.load_state_dict(mod.state_dict(), strict=True)
    assert torch.equal(clone.dense_weight(), mod.dense_weight())

    # a whole checkpoint in the old spelling: lqframe.load, from_pretrained and inspect read it
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64))
    q = REG.create("quantizer", "rtn", bits=4, group_size=16)
    rec = REG.create("reconstructor", "svd", rank=4, factor_dtype=fmt)
    name = "model.layers.0.mlp.down_proj"
    linear = model.get_submodule(name)
    model.model.layers[0].mlp.down_proj = LQLinear.from_decomposition(linear, rec.decompose(linear.weight.detach(), q))
    save_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    layer = cfg["quantization_config"]["layers"][name]
    layer["lowrank_dtype"] = layer.pop("factor_dtype")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = torch.arange(10)[None]
    with torch.no_grad():
        expected = model(ids).logits
        for loaded in (lqframe.load(tmp_path), transformers.AutoModelForCausalLM.from_pretrained(tmp_path)):
            assert loaded.get_submodule(name).factor_dtype == fmt
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
    (info,) = inspect_checkpoint(tmp_path)["layers"]
    assert info["factor_dtype"] == fmt and "lowrank_format" not in info
