"""Hypothesis strategies for weight matrices: shapes that do and do not divide block sizes,
Gaussian, heavy-tailed, all-zero, constant, tiny and huge values, in float16/bfloat16/float32."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KINDS = ("gaussian", "heavy", "outlier-rows", "zeros", "constant", "tiny", "large", "low-rank")


def make_matrix(n: int, m: int, kind: str, dtype: str, seed: int, constant: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        w = torch.zeros(n, m)
    elif kind == "constant":
        w = torch.full((n, m), constant)
    elif kind == "heavy":
        # Student-t with 3 degrees of freedom: occasional large entries
        z = torch.randn(n, m, generator=g)
        chi = torch.randn(3, n, m, generator=g).pow(2).sum(0)
        w = z / (chi / 3).sqrt()
    elif kind == "outlier-rows":
        w = torch.randn(n, m, generator=g) * (1 + 20 * (torch.rand(n, 1, generator=g) > 0.8))
    elif kind == "tiny":
        w = torch.randn(n, m, generator=g) * 1e-4
    elif kind == "large":
        w = torch.randn(n, m, generator=g) * 300.0
    elif kind == "low-rank":
        w = torch.randn(n, 2, generator=g) @ torch.randn(2, m, generator=g)
    else:
        w = torch.randn(n, m, generator=g) * 0.02
    return w.to(DTYPES[dtype])


@st.composite
def matrices(draw, max_rows: int = 24, max_cols: int = 80):
    n = draw(st.integers(1, max_rows))
    m = draw(st.integers(1, max_cols))
    kind = draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from(tuple(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    constant = draw(st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=16))
    return make_matrix(n, m, kind, dtype, seed, constant)


def synthetic_stats(n: int, m: int, needs, seed: int = 0, tokens: int = 96):
    """Calibration statistics from random correlated activations with a few outlier channels (and
    a random positive Fisher matrix), for every statistic in ``needs``; None when nothing is needed."""
    import lqframe

    needs = frozenset(needs)
    if not needs:
        return None
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(m, m, generator=g) / max(m, 1) ** 0.5 + torch.eye(m)
    x = torch.randn(tokens, m, generator=g) @ mix
    if m:
        x[:, torch.randperm(m, generator=g)[: max(1, m // 16)]] *= 20
    acc = lqframe.StatsAccumulator(m, needs - {"fisher"})
    for chunk in x.split(32):
        acc.update(chunk)
    stats = acc.finalize()
    if "fisher" in needs:
        import attrs

        stats = attrs.evolve(stats, fisher=torch.rand(n, m, generator=g, dtype=torch.float64) + 1e-3)
    return stats
