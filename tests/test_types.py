import numpy as np
import pytest
import torch

import lqframe
from lqframe import CostTable, LayerStats, QuantizedWeight, StatsAccumulator
from lqframe.kernels import pack_bits


def test_quantized_weight_validates_its_parts():
    codes = pack_bits(torch.zeros(2, 10, dtype=torch.int64), 4)
    QuantizedWeight(codes=codes, bits=4, shape=(2, 10), block_size=8, scale=torch.ones(4))
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(codes=codes, bits=4, shape=(2, 10), block_size=8, scale=torch.ones(3))
    with pytest.raises(ValueError, match="bytes"):
        QuantizedWeight(codes=codes[:-1], bits=4, shape=(2, 10), block_size=8, scale=torch.ones(4))
    with pytest.raises(ValueError, match="codebook"):
        QuantizedWeight(codes=codes, bits=4, shape=(2, 10), block_size=8, scale=torch.ones(4),
                        codebook=torch.zeros(8))


def test_integer_decode_rule():
    codes = torch.tensor([[0, 1, 2, 3, 3]])
    qw = QuantizedWeight.from_codes(codes, 2, 4, torch.tensor([0.5, 2.0]), zero=torch.tensor([1, 0]))
    assert qw.dequantize().tolist() == [[-0.5, 0.0, 0.5, 1.0, 6.0]]
    assert qw.storage_bits() == 2 * 8 + 2 * 32 + 8  # 5 codes → 2 bytes, 2 fp32 scales, zeros in 1 byte


def test_stats_accumulator_float64_and_only_what_is_needed():
    acc = StatsAccumulator(3, {"rxx", "abs_mean_max"})
    x1 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    x2 = torch.tensor([[3.0, 0.0, 0.0]])
    acc.update(x1)
    acc.update(x2)
    st = acc.finalize()
    assert st.n_tokens == 3 and st.sq_sum is None and st.rxx.dtype == torch.float64
    x = torch.cat([x1, x2]).double()
    torch.testing.assert_close(st.rxx, x.T @ x)
    torch.testing.assert_close(st.abs_mean_max, torch.tensor([3.0, 1.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(st.rms(), (x.pow(2).mean(0)).sqrt())
    torch.testing.assert_close(st.hessian(), 2 * x.T @ x / 3)
    with pytest.raises(lqframe.MissingStatisticError, match="fisher"):
        st.require({"fisher"}, "lq-lora reconstructor")
    with pytest.raises(lqframe.MissingStatisticError):
        LayerStats().rms()


def _table(costs, bits, numel):
    return CostTable(layers=[f"l{i}" for i in range(len(costs))], configs=[{"c": j} for j in range(len(costs[0]))],
                     cost=costs, bits=bits, numel=numel)


def test_cost_table_validation():
    with pytest.raises(ValueError, match="shape"):
        CostTable(layers=["a"], configs=[{}], cost=[[1.0, 2.0]], bits=[[1.0]], numel=[1])
    with pytest.raises(ValueError, match="non-negative"):
        _table([[-1.0]], [[1.0]], [1])


def test_uniform_allocator_picks_the_best_config_that_fits():
    reg = lqframe.registry()
    alloc = reg.create("allocator", "uniform")
    numel = np.array([100, 300])
    bits = np.array([[2.0, 3.0, 4.0]]).T @ numel[None, :]  # bits per param × numel
    bits = bits.T
    costs = np.array([[9.0, 4.0, 1.0], [8.0, 3.0, 2.0]])
    table = _table(costs, bits, numel)
    got = alloc.allocate(table, 3.5)
    assert {c.index for c in got.values()} == {1}
    assert lqframe.average_bits(got, table) == pytest.approx(3.0)
    assert {c.index for c in alloc.allocate(table, None).values()} == {2}
    with pytest.raises(lqframe.BudgetError, match="smallest uniform configuration needs 2.0000"):
        alloc.allocate(table, 1.0)
