import pytest
import torch

import lqframe
from lqframe.lqlinear import LQLinear, set_weight_cache

REG = lqframe.registry()


def _module(rank=4, bias=True, dq="qlora"):
    lin = torch.nn.Linear(96, 40, bias=bias)
    q = REG.create("quantizer", "nf", bits=4, group_size=32, double_quant=dq)
    rec = REG.create("reconstructor", "svd", rank=rank)
    dec = rec.decompose(lin.weight, q)
    return lin, dec, LQLinear.from_decomposition(lin, dec)


@pytest.mark.parametrize("rank,bias,dq", [(4, True, "qlora"), (0, False, "none"), (4, False, "lqlora")])
def test_forward_equals_dense(rank, bias, dq):
    lin, dec, mod = _module(rank, bias, dq)
    x = torch.randn(3, 5, 96)
    ref = x @ dec.dense().T + (lin.bias if bias else 0)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    set_weight_cache(mod, True)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    set_weight_cache(mod, False)
    assert mod._cache is None


def test_only_left_and_right_are_trainable_and_q_is_packed():
    _, _, mod = _module()
    trainable = {n for n, p in mod.named_parameters() if p.requires_grad}
    assert trainable == {"left", "right"}
    assert mod.qweight.codes.dtype == torch.uint8
    assert not any(b.requires_grad for b in mod.buffers())
    x = torch.randn(8, 96)
    mod(x).pow(2).sum().backward()
    assert mod.left.grad is not None and mod.right.grad is not None


def test_layer_config_roundtrip():
    _, dec, mod = _module()
    clone = LQLinear.from_layer_config(mod.layer_config())
    clone.load_state_dict(mod.state_dict())
    x = torch.randn(2, 96)
    torch.testing.assert_close(clone(x), mod(x))
    assert clone.storage_bits() == mod.storage_bits() == dec.storage_bits()
    assert "nf4" in repr(clone)
