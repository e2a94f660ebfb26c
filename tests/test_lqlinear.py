import pytest
import torch

import lqframe
from lqframe import testing
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
    # the gradients of the dense formula x·(Q + L·R)ᵀ + b, with Q a constant
    left, right = mod.left.detach().clone().requires_grad_(), mod.right.detach().clone().requires_grad_()
    y = x @ (mod.dequantized_weight() + left @ right).T + mod.bias.detach()
    y.pow(2).sum().backward()
    torch.testing.assert_close(mod.left.grad, left.grad, rtol=1e-5, atol=1e-6 * float(left.grad.abs().max()))
    torch.testing.assert_close(mod.right.grad, right.grad, rtol=1e-5, atol=1e-6 * float(right.grad.abs().max()))


def test_layer_config_roundtrip():
    _, dec, mod = _module()
    clone = LQLinear.from_layer_config(mod.layer_config())
    clone.load_state_dict(mod.state_dict())
    x = torch.randn(2, 96)
    torch.testing.assert_close(clone(x), mod(x))
    assert clone.storage_bits() == mod.storage_bits() == dec.storage_bits()
    assert "nf4" in repr(clone)


def test_forward_goes_through_the_first_backend_that_takes_it():
    from lqframe.kernels import Backend, backends, register_backend, unregister_backend

    _, dec, mod = _module()
    calls = []

    def run(x, qweight, left, right, bias):
        calls.append(qweight)
        return torch.zeros(*x.shape[:-1], qweight.shape[0], dtype=x.dtype)

    register_backend(Backend("test-bf16-only", lambda x, qw: x.dtype == torch.bfloat16, run))
    try:
        assert backends()[0].name == "test-bf16-only" and backends()[-1].name == "torch-reference"
        x = torch.randn(2, 96)
        assert mod(x).abs().sum() > 0 and not calls  # declined: the reference computed it
        assert torch.equal(mod(x.bfloat16()), torch.zeros(2, 40, dtype=torch.bfloat16))
        assert len(calls) == 1 and calls[0] is mod.quantized_weight()  # the packed weight itself
    finally:
        unregister_backend("test-bf16-only")
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_backend("torch-reference")


def test_packed_weight_is_built_once_and_rebuilt_after_a_move():
    _, _, mod = _module()
    first = mod.quantized_weight()
    mod(torch.randn(2, 96))
    assert mod.quantized_weight() is first
    header = mod.qweight.full_header()
    mod.to(torch.bfloat16)  # a dtype cast leaves the stored format alone …
    assert mod.left.dtype == torch.bfloat16 and mod.qweight.full_header() == header
    assert torch.equal(mod.quantized_weight().dequantize(), first.dequantize())
    mod.to("meta")  # … a device move replaces the buffers: the packed view follows
    assert mod.quantized_weight() is not first and mod.quantized_weight().codes.device.type == "meta"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_computes_in_the_activations_dtype(device, dtype):
    """Each output within the rounding bound of its dtype (testing.check_linear_output); the L·R term
    is made as large as Q's, so a dropped or mis-rounded low-rank term is far outside that bound."""
    lin, dec, mod = _module()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mod.left.copy_(torch.randn(mod.left.shape, generator=g) * 0.3)
        mod.right.copy_(torch.randn(mod.right.shape, generator=g) * 0.3)
    mod = mod.to(device)
    x = torch.randn(4, 96, device=device).to(dtype)
    y = mod(x)
    assert y.dtype == dtype and y.device.type == device
    worst = testing.check_linear_output(y, x, dec.qweight.dequantize(), mod.left, mod.right, mod.bias)
    assert worst <= 1.0
    # the check is sharp enough to see the low-rank term at this size
    without = x.float() @ dec.qweight.dequantize().to(device).T + mod.bias.float()
    with pytest.raises(AssertionError, match="rounding bound"):
        testing.check_linear_output(without.to(dtype), x, dec.qweight.dequantize(), mod.left, mod.right, mod.bias)
