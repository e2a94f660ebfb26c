import pytest
import torch

import lqframe

REG = lqframe.registry()


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"bits": 4, "group_size": 64}, 4 + 20 / 64),
        ({"bits": 3, "group_size": 128}, 3 + 19 / 128),  # GPTQ-style W3 g128 = 3.148
        ({"bits": 4, "group_size": 64, "symmetric": True}, 4 + 16 / 64),
        ({"bits": 8, "group_size": -1, "scale_dtype": "float32"}, 8 + 40 / 1536),
    ],
)
def test_storage(options, expected):
    q = REG.create("quantizer", "rtn", **options)
    qw = q.quantize(torch.randn(576, 1536))
    assert qw.storage_bits() == q.storage_bits((576, 1536))
    assert qw.bits_per_param() == pytest.approx(expected, abs=1e-9)


def test_asymmetric_matches_gptq_minmax_reference():
    w = torch.randn(4, 64) + 0.3
    q = REG.create("quantizer", "rtn", bits=4, group_size=64, scale_dtype="float32")
    lo = w.amin(1, keepdim=True).clamp_max(0)
    hi = w.amax(1, keepdim=True).clamp_min(0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    ref = (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale
    torch.testing.assert_close(q.quantize(w).dequantize(), ref, rtol=0, atol=1e-6)


def test_zero_is_exact_and_symmetric_zero_point_is_not_stored():
    w = torch.randn(3, 50)
    w[:, ::7] = 0
    for sym in (False, True):
        qw = REG.create("quantizer", "rtn", bits=3, group_size=16, symmetric=sym).quantize(w)
        assert bool((qw.dequantize()[:, ::7] == 0).all())
        assert isinstance(qw.zero, int) == sym


def test_bad_options():
    with pytest.raises(lqframe.OptionError, match="group_size"):
        REG.create("quantizer", "rtn", group_size=0)
    with pytest.raises(lqframe.OptionError, match="bits"):
        REG.create("quantizer", "rtn", bits=9)


def test_fp16_scale_overflow_is_a_clear_error():
    w = torch.full((2, 8), 1e6)
    with pytest.raises(lqframe.WeightError, match="float16"):
        REG.create("quantizer", "rtn", bits=4, group_size=8).quantize(w)
    # and float32 scales handle it
    REG.create("quantizer", "rtn", bits=4, group_size=8, scale_dtype="float32").quantize(w)


def test_scale_rounding_up_never_overflows_silently():
    from lqframe.quantization import store_scales

    with pytest.raises(lqframe.WeightError, match="does not fit in float16"):
        store_scales(torch.tensor([65504.5]), torch.float16)
    assert float(store_scales(torch.tensor([65504.0]), torch.float16)) == 65504.0
    s = store_scales(torch.tensor([1.0001, 3e-8, 0.0]), torch.float16)
    assert bool((s.float() >= torch.tensor([1.0001, 3e-8, 0.0])).all())


def test_booleans_are_not_integers():
    with pytest.raises(lqframe.OptionError, match="integer"):
        REG.create("quantizer", "rtn", group_size=True)
