import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lqframe.kernels import pack_bits, packed_nbytes, unpack_bits


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_identity(bits, count, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (count,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, count), codes)
    # and packing is a bijection on the stored bytes: unpack → pack gives the same bytes
    assert torch.equal(pack_bits(unpack_bits(packed, bits, count), bits), packed)


def test_layout_is_lsb_first_dense():
    # 4-bit: code 2i is the low nibble of byte i
    assert pack_bits(torch.tensor([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    # 2-bit: four codes per byte, first code in bits 0-1
    assert pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]
    # 3-bit: 8 codes fill exactly 3 bytes; code 2 straddles bytes 0 and 1
    codes = torch.tensor([7, 0, 5, 0, 0, 0, 0, 0])
    stream = 7 | (5 << 6)
    assert pack_bits(codes, 3).tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, 0]
    # a partial group occupies only the bytes its bits need
    assert pack_bits(torch.tensor([7, 7, 7]), 3).numel() == 2


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="need"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 10)
