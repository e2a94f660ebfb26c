"""NormalFloat code tables and storage accounting against METHODS.md §0.1–0.3."""

import pytest
import torch

import lqframe
from lqframe.plugins.nf import dynamic_map, normal_float_codebook, normal_float_formula

NF4_BNB = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
NF3 = [-1, -0.478629, -0.217142, 0, 0.16093, 0.337915, 0.562617, 1]
NF2 = [-1, 0, 0.337915, 1]

REG = lqframe.registry()


def test_code_tables_match_the_published_values():
    assert normal_float_codebook(4).tolist() == torch.tensor(NF4_BNB).tolist()
    torch.testing.assert_close(normal_float_formula(4), torch.tensor(NF4_BNB), rtol=0, atol=2.5e-7)
    torch.testing.assert_close(normal_float_codebook(3), torch.tensor(NF3, dtype=torch.float32), rtol=0, atol=1e-6)
    torch.testing.assert_close(normal_float_codebook(2), torch.tensor(NF2, dtype=torch.float32), rtol=0, atol=1e-6)
    nf8 = normal_float_codebook(8)
    assert nf8.numel() == 256 and nf8[0] == -1 and nf8[-1] == 1 and (nf8 == 0).sum() == 1
    assert bool((nf8[1:] > nf8[:-1]).all())


def test_dynamic_map():
    d = dynamic_map()
    assert d.numel() == 256
    assert -1 < float(d.min()) < -0.99  # the negative side has no -1: 127 negative, 0, 127 positive, 1
    assert float(d.max()) == 1.0 and bool((d == 0).any())
    assert bool((d[1:] >= d[:-1]).all())
    assert abs(float(d[d > 0].min()) - 0.55e-6) < 1e-9  # smallest magnitude: 10^-6 · mean(0.1, 1)


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"bits": 4, "double_quant": "qlora"}, 4 + 8 / 64 + 32 / (64 * 256)),
        ({"bits": 4, "double_quant": "lqlora", "dq_bits": 8, "dq_scale_dtype": "float32"}, 4.127),
        ({"bits": 3, "double_quant": "lqlora"}, 3 + 8 / 64 + 32 / (64 * 256)),
        (
            {"bits": 2, "double_quant": "lqlora", "dq_bits": 2, "dq_scale_dtype": "bfloat16"},
            2 + 2 / 64 + 16 / (64 * 256),
        ),
        ({"bits": 4, "scale_dtype": "float32"}, 4.5),
        ({"bits": 4}, 4.25),
    ],
)
def test_storage_formulas(options, expected):
    """bits = b + b0/B0 + b1/(B0·B1) (+ one float32 offset) on a 576×1536 matrix."""
    q = REG.create("quantizer", "nf", **options)
    shape = (576, 1536)
    qw = q.quantize(torch.randn(shape))
    assert qw.storage_bits() == q.storage_bits(shape)
    offset = 32 / (576 * 1536) if options.get("double_quant", "none") != "none" else 0
    assert qw.bits_per_param() == pytest.approx(expected + offset, abs=2e-4)


def test_nf4_double_quant_is_4_127_bits():
    q = REG.create("quantizer", "nf", bits=4, group_size=64, double_quant="qlora")
    assert round(q.bits_per_param((576, 1536)), 3) == 4.127


def test_double_quant_scales_are_close_to_the_absmax():
    w = torch.randn(64, 512)
    plain = REG.create("quantizer", "nf", scale_dtype="float32").quantize(w)
    for style in ("qlora", "lqlora"):
        dq = REG.create("quantizer", "nf", double_quant=style).quantize(w)
        assert isinstance(dq.scale, lqframe.QuantizedWeight)
        rel = (dq.block_scales() - plain.block_scales()).abs() / plain.block_scales()
        assert float(rel.max()) < 0.02, style


def test_nf4_matches_a_direct_absmax_reference():
    """Independent decode: nearest NF4 value of x/absmax per 64-block, times absmax (fp32 scales)."""
    w = torch.randn(8, 128)
    q = REG.create("quantizer", "nf", bits=4, group_size=64, scale_dtype="float32")
    blocks = w.reshape(8, 2, 64)
    absmax = blocks.abs().amax(2, keepdim=True)
    table = torch.tensor(NF4_BNB)
    idx = (blocks / absmax).unsqueeze(-1).sub(table).abs().argmin(-1)
    ref = (table[idx] * absmax).reshape(8, 128)
    torch.testing.assert_close(q.quantize(w).dequantize(), ref, rtol=0, atol=1e-6)


def test_qlora_requires_8bit_dq():
    with pytest.raises(lqframe.OptionError, match="dq_bits"):
        REG.create("quantizer", "nf", double_quant="qlora", dq_bits=4)
