"""The shared weighted low-rank solve and symmetric square root."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lqframe
from lqframe.numerics import DiagonalScaling, check_weight, cholesky_factor, lowrank_solve, symmetric_sqrt


def _spd(m, seed, deficient=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * m, m, generator=g, dtype=torch.float64)
    x[:, :deficient] = 0  # dead channels
    x[:, -1] *= 30  # an outlier channel
    return x.T @ x


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_symmetric_sqrt_is_a_root_and_inverse(m, seed):
    a = _spd(m, seed)
    s = symmetric_sqrt(a, rel_floor=0.0)
    torch.testing.assert_close(s.root @ s.root, a, rtol=1e-8, atol=1e-8 * float(a.abs().max()))
    torch.testing.assert_close(s.root @ s.inv_root, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.root, s.root.T)


def test_symmetric_sqrt_of_rank_deficient_matrix_is_finite():
    a = _spd(12, 1, deficient=3)
    s = symmetric_sqrt(a)
    assert bool(torch.isfinite(s.inv_root).all())
    assert bool(torch.isfinite(symmetric_sqrt(torch.zeros(5, 5)).inv_root).all())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), m=st.integers(1, 30), r=st.integers(0, 33), seed=st.integers(0, 10_000),
       scaled=st.sampled_from(["none", "diag", "full"]))
def test_weighted_solve_reaches_the_scaled_tail(n, m, r, seed, scaled):
    """‖(Δ − C) T‖_F² = Σ_{i>r} σ_i(Δ T)² for the solve's C (QERA's closed form with T = S)."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(n, m, generator=g, dtype=torch.float64)
    col = None
    if scaled == "diag":
        col = DiagonalScaling(torch.rand(m, generator=g, dtype=torch.float64) + 0.1)
    elif scaled == "full":
        col = symmetric_sqrt(_spd(m, seed))
    sol = lowrank_solve(delta, r, col_scaling=col, dtype=torch.float64)
    c = sol.left.double() @ sol.right.double()
    resid = delta - c
    scaled_resid = col.right(resid) if col is not None else resid
    scaled_delta = col.right(delta) if col is not None else delta
    tail = float((torch.linalg.svdvals(scaled_delta)[min(r, n, m):] ** 2).sum())
    err = float((scaled_resid**2).sum())
    assert err == pytest.approx(tail, rel=1e-4, abs=1e-6 * float((scaled_delta**2).sum()) + 1e-9)
    assert sol.tail_energy(min(r, n, m)) == pytest.approx(tail, rel=1e-6, abs=1e-9)


def test_identity_scalings_reduce_to_plain_svd():
    delta = torch.randn(20, 30, dtype=torch.float64)
    plain = lowrank_solve(delta, 5, dtype=torch.float64)
    ones = lowrank_solve(delta, 5, row_scaling=DiagonalScaling(torch.ones(20)),
                         col_scaling=DiagonalScaling(torch.ones(30)), dtype=torch.float64)
    torch.testing.assert_close(plain.left @ plain.right, ones.left @ ones.right)


def test_randomized_is_close_to_exact_and_reproducible():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(200, 8, generator=g) @ torch.randn(8, 300, generator=g)
    delta += 0.01 * torch.randn(200, 300, generator=g)
    exact = lowrank_solve(delta, 8)
    rand1 = lowrank_solve(delta, 8, method="randomized", seed=5)
    rand2 = lowrank_solve(delta, 8, method="randomized", seed=5)
    assert torch.equal(rand1.left, rand2.left)
    e_exact = float((delta - exact.left @ exact.right).norm())
    e_rand = float((delta - rand1.left @ rand1.right).norm())
    assert e_rand <= e_exact * 1.01


def test_split_conventions_give_the_same_product():
    delta = torch.randn(10, 12)
    a = lowrank_solve(delta, 3, split="balanced")
    b = lowrank_solve(delta, 3, split="left")
    torch.testing.assert_close(a.left @ a.right, b.left @ b.right, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.right @ b.right.T, torch.eye(3), atol=1e-5)  # orthonormal rows


def test_check_weight_errors():
    with pytest.raises(lqframe.WeightError, match="2-D"):
        check_weight(torch.zeros(3))
    with pytest.raises(lqframe.WeightError, match="floating"):
        check_weight(torch.zeros(3, 3, dtype=torch.int32))
    w = torch.zeros(4, 4)
    w[1, 2] = float("nan")
    w[3, 3] = float("inf")
    with pytest.raises(lqframe.WeightError, match=r"1 NaN and 1 Inf .*\[1, 2\]"):
        check_weight(w, "model.layers.0.q_proj")


@pytest.mark.parametrize("side", ["row", "column"])
def test_cholesky_factor_weighs_like_the_symmetric_root_on_either_side(side):
    """F (F Fᵀ = A) as a column scaling and Fᵀ as a row scaling give the same weighted problem as
    A^{1/2}: the same tail energy and the same optimal product."""
    n = m = 24
    a = _spd(m, seed=5)
    delta = torch.randn(n, m, generator=torch.Generator().manual_seed(6))
    chol, sym = cholesky_factor(a, rel_floor=0.0), symmetric_sqrt(a, rel_floor=0.0)
    x = torch.randn(m, 7, dtype=torch.float64)
    torch.testing.assert_close(chol.left_inv(chol.left(x)), x)
    torch.testing.assert_close(chol.right_inv(chol.right(x.T)), x.T)
    key = "row_scaling" if side == "row" else "col_scaling"
    a_sol = lowrank_solve(delta, 4, dtype=torch.float64, **{key: chol})
    b_sol = lowrank_solve(delta, 4, dtype=torch.float64, **{key: sym})
    assert a_sol.tail_energy(4) == pytest.approx(b_sol.tail_energy(4), rel=1e-9)
    torch.testing.assert_close(a_sol.left @ a_sol.right, b_sol.left @ b_sol.right, rtol=1e-4, atol=1e-5)
