"""GPTQ: lower output error than round-to-nearest on correlated inputs, the same result on white ones,
exactly the ``rtn`` / ``nf`` packed formats, and clear behaviour on degenerate statistics."""

from __future__ import annotations

import logging

import pytest
import torch

import lqframe
from lqframe.kernels import packed_nbytes

REG = lqframe.registry()
N_OUT, N_IN = 64, 128


def gptq(**options):
    return REG.create("quantizer", "gptq", **options)


def base_of(q, cols: int = N_IN):
    """The data-free quantizer (rtn / nf) whose format a gptq configuration emits."""
    if q.grid == "nf":
        return REG.create("quantizer", "nf", bits=q.bits, group_size=cols if q.group_size == -1 else q.group_size,
                          scale_dtype=q.scale_dtype)
    return REG.create("quantizer", "rtn", bits=q.bits, group_size=q.group_size, symmetric=q.symmetric,
                      scale_dtype=q.scale_dtype)


def stats_of(x: torch.Tensor) -> lqframe.LayerStats:
    acc = lqframe.StatsAccumulator(x.shape[1], {"rxx"})
    acc.update(x)
    return acc.finalize()


def correlated_layer(n=N_OUT, m=N_IN, tokens=512, seed=0, outlier=3.0):
    """Weights and activations with correlated channels and six ``outlier``× larger channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(m) + 2 * torch.randn(m, m, generator=g) / m**0.5
    x = torch.randn(tokens, m, generator=g) @ mix
    x[:, torch.randperm(m, generator=g)[:6]] *= outlier
    w = torch.randn(n, m, generator=g) * 0.05
    return w, x


def out_err(x, w, w_hat) -> float:
    return float((x @ (w - w_hat).T).norm())


@pytest.fixture(scope="module")
def layer():
    w, x = correlated_layer()
    return w, x, stats_of(x)


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", ["int", "nf"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lower_output_error_than_rtn(layer, bits, grid, act_order):
    w, x, st = layer
    q = gptq(bits=bits, grid=grid, act_order=act_order, group_size=32)
    e_gptq = out_err(x, w, q.quantize(w, st).dequantize())
    e_rtn = out_err(x, w, base_of(q).quantize(w).dequantize())
    assert e_gptq < 0.95 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("grid", ["int", "nf"])
def test_strong_outlier_channels_at_2_bits(grid):
    """With 12× outlier input channels, error feedback widens the min–max range of the groups not yet
    reached, and 2-bit GPTQ with dynamic groups in natural order can lose to RTN (the reference
    algorithm does the same); act_order or static_groups avoid it."""
    w, x = correlated_layer(outlier=12.0)
    st = stats_of(x)
    for opts in ({"act_order": True}, {"static_groups": True}, {"act_order": True, "static_groups": True}):
        q = gptq(bits=2, grid=grid, group_size=32, **opts)
        assert out_err(x, w, q.quantize(w, st).dequantize()) < 0.85 * out_err(x, w, base_of(q).quantize(w).dequantize())


def test_white_inputs_give_about_rtn():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8192, N_IN, generator=g)
    held_out = torch.randn(4096, N_IN, generator=g)
    w = torch.randn(N_OUT, N_IN, generator=g)
    st = stats_of(x)
    for opts in ({"bits": 4}, {"bits": 3, "grid": "nf"}, {"bits": 2, "act_order": True}):
        q = gptq(**opts)
        ours, rtn = q.quantize(w, st).dequantize(), base_of(q).quantize(w).dequantize()
        assert out_err(x, w, ours) <= 1.001 * out_err(x, w, rtn)
        assert out_err(held_out, w, ours) == pytest.approx(out_err(held_out, w, rtn), rel=0.03)


@pytest.mark.parametrize("config", lqframe.registry().get("quantizer", "gptq").test_configs())
def test_diagonal_hessian_is_exactly_rtn(config):
    """Uncorrelated channels: no error feedback, so the codes are the round-to-nearest ones, bit for bit."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 70, generator=g)
    rxx = torch.diag(torch.rand(70, generator=g, dtype=torch.float64) + 0.1)
    q = gptq(**config)
    ours, ref = q.quantize(w, lqframe.LayerStats(n_tokens=100, rxx=rxx)), base_of(q, 70).quantize(w)
    assert torch.equal(ours.codes, ref.codes)
    assert torch.equal(ours.dequantize(), ref.dequantize())


def _minmax_grid(block: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int grid of a (rows, k) float32 block, written out from the format's definition: the
    range always contains 0; asymmetric: ``scale = (max − min)/(2^k − 1)``, zero point
    ``round(−min/scale)``; symmetric: ``scale = 2·absmax/(2^k − 1)``, zero point ``2^(k−1)`` (so the
    codes reach ``−2^(k−1)·scale … (2^(k−1) − 1)·scale``). Float32, like ``rtn`` with float32 scales."""
    maxq = (1 << bits) - 1
    top = block.amax(1).clamp_min(0)
    bottom = block.amin(1).clamp_max(0)
    if symmetric:
        scale = 2 * torch.maximum(top, -bottom) / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = (top - bottom) / maxq
        zero = torch.clamp(torch.round(-bottom / scale), 0, maxq)
    assert bool((scale > 0).all())
    return scale, zero


def _obs_reference(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, static: bool,
                   order: list[int] | None = None, symmetric: bool = False, ties: torch.Tensor | None = None):
    """Textbook OBS loop in float64, visiting the columns in ``order`` (default: natural order):
    quantize column c, spread its error over the columns not yet quantized with the current inverse
    Hessian, then remove c from that inverse (Schur complement). Everything stays in the original
    column numbering — no permuted matrices, no Cholesky factor, no lazy blocks.

    Groups are ``group`` consecutive original columns. A group's grid (:func:`_minmax_grid`) is
    computed from the original weights (``static``), or else when the first of its columns in
    ``order`` is reached, from the current (error-updated) values of all its columns.

    A value half-way between two codes is a tie that float rounding decides by chance, and ties are not
    rare: a symmetric grid puts −absmax exactly half-way, so a group whose first column holds its
    absmax has one. Given ``ties`` (codes, rows × columns, e.g. the tested implementation's), the loop
    follows those codes where the value is within 1e-4 (in code units) of a half-way point and the
    given code is one of the two neighbours, instead of letting the last bits choose.

    Returns (dequantized float32, codes, scales, zero points, number of ties taken from ``ties``);
    scales and zero points have shape (rows, groups)."""
    maxq = (1 << bits) - 1
    n, m = w.shape
    order = list(range(m)) if order is None else list(order)
    assert sorted(order) == list(range(m))
    ngroups = -(-m // group)
    orig, cur = w.clone(), w.double().clone()
    hinv = torch.linalg.inv(h.double())
    out = torch.zeros(n, m, dtype=torch.float64)
    codes = torch.zeros(n, m, dtype=torch.int64)
    scales = torch.zeros(n, ngroups, dtype=torch.float64)
    zeros = torch.zeros(n, ngroups, dtype=torch.float64)
    have_grid = [False] * ngroups
    pending = torch.ones(m, dtype=torch.bool)
    tie_count = 0
    for c in order:
        g = c // group
        if not have_grid[g]:
            source = orig if static else cur.float()
            s, z = _minmax_grid(source[:, g * group:(g + 1) * group], bits, symmetric)
            scales[:, g], zeros[:, g] = s.double(), z.double()
            have_grid[g] = True
        s, z = scales[:, g], zeros[:, g]
        t = cur[:, c] / s
        q = torch.clamp(torch.round(t) + z, 0, maxq)
        if ties is not None:
            below = torch.clamp(torch.floor(t) + z, 0, maxq)
            above = torch.clamp(torch.floor(t) + 1 + z, 0, maxq)
            given = ties[:, c].double()
            tie = ((t - torch.floor(t) - 0.5).abs() < 1e-4) & ((given == below) | (given == above))
            q = torch.where(tie, given, q)
            tie_count += int(tie.sum())
        codes[:, c] = q.long()
        out[:, c] = (q - z) * s
        pending[c] = False
        err = (cur[:, c] - out[:, c]) / hinv[c, c]
        cur[:, pending] -= err[:, None] * hinv[c, pending][None, :]
        hinv = hinv - hinv[:, c:c + 1] @ hinv[c:c + 1, :] / hinv[c, c]
        hinv[c, :] = 0  # zero up to rounding: c has left the problem
        hinv[:, c] = 0
    return out.float(), codes, scales.float(), zeros.float(), tie_count


def _descending_diag_order(h: torch.Tensor) -> list[int]:
    """act_order's visiting order: decreasing diag H, ties in column order (Python's sort is stable)."""
    diag = torch.diagonal(h).tolist()
    return sorted(range(len(diag)), key=lambda i: -diag[i])


def _damped_hessian(st: lqframe.LayerStats, damp: float) -> torch.Tensor:
    h = st.hessian()
    return h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("group,static", [(-1, False), (8, True), (8, False)])
def test_matches_textbook_obs_loop(group, static, act_order, symmetric):
    w, x = correlated_layer(12, 40, tokens=200, seed=3)
    st = stats_of(x)
    q = gptq(bits=3, group_size=group, symmetric=symmetric, scale_dtype="float32", static_groups=static,
             act_order=act_order, block_size=16)
    h = _damped_hessian(st, q.damp)
    order = _descending_diag_order(h) if act_order else None
    qw = q.quantize(w, st)
    ours, codes = qw.dequantize(), qw.unpacked_codes()
    ref, ref_codes, ref_scale, ref_zero, ties = _obs_reference(w, h, 3, 40 if group == -1 else group, static, order,
                                                               symmetric, ties=codes)
    assert ties <= 0.03 * codes.numel()  # following our tie-breaks cannot hide more than a few codes
    # float32 vs float64 arithmetic: grids may differ in the last bit, a rare near-tie may round differently
    differ = (ours - ref).abs() > 1e-5 * float(ref.abs().max())
    assert float(differ.float().mean()) < 0.02
    assert float((codes != ref_codes).float().mean()) < 0.02
    torch.testing.assert_close(qw.block_scales(), ref_scale, rtol=1e-5, atol=0)
    assert float((qw.block_zeros() != ref_zero).float().mean()) < 0.02
    if static or group == -1:  # from the original weights in the same float32 arithmetic: bit for bit
        assert torch.equal(qw.block_scales(), ref_scale) and torch.equal(qw.block_zeros(), ref_zero)
    if symmetric:
        assert bool((qw.block_zeros() == 4).all())
    assert out_err(x, w, ours) == pytest.approx(out_err(x, w, ref), rel=1e-3)


def test_textbook_obs_cases_are_discriminating():
    """The layer of :func:`test_matches_textbook_obs_loop` exercises what the act_order cases claim to:
    a visiting order that scatters every group of 8, and dynamic grids that differ from static ones
    and depend on the group layout (original-order groups ≠ groups consecutive in visiting order)."""
    w, x = correlated_layer(12, 40, tokens=200, seed=3)
    st = stats_of(x)
    h = _damped_hessian(st, 0.01)
    order = _descending_diag_order(h)
    assert order != list(range(40))
    first_eight = {c // 8 for c in order[:8]}
    assert len(first_eight) >= 3  # the first 8 visited columns come from several original groups
    dyn = _obs_reference(w, h, 3, 8, False, order)
    sta = _obs_reference(w, h, 3, 8, True, order)
    assert not torch.allclose(dyn[2], sta[2], rtol=1e-3, atol=0)  # dynamic grids see the updates
    # (the natural-order run differs as well: the order matters)
    nat = _obs_reference(w, h, 3, 8, False)
    assert float((nat[1] != dyn[1]).float().mean()) > 0.05
    # our dynamic act_order result is the original-order-group one, not a visiting-order-group one
    qw = gptq(bits=3, group_size=8, scale_dtype="float32", act_order=True, static_groups=False,
              block_size=16).quantize(w, st)
    permuted_groups = _obs_reference(w[:, order], h[order][:, order], 3, 8, False)
    assert float((qw.unpacked_codes()[:, order] != permuted_groups[1]).float().mean()) > 0.05
    assert float((qw.unpacked_codes() != dyn[1]).float().mean()) < 0.02


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int_grid_is_the_textbook_minmax_grid(bits, symmetric):
    """The core's ``int_grid`` (used by gptq and rtn) against the definition written out in
    :func:`_minmax_grid`, on rows with mixed signs, all-positive rows (the range is widened to 0, and a
    symmetric grid is still ±absmax: scale ``2·max/(2^k − 1)``) and all-negative rows."""
    from lqframe.quantization import int_grid

    g = torch.Generator().manual_seed(11)
    block = torch.randn(30, 16, generator=g)
    block[10:20] = block[10:20].abs() + 0.01
    block[20:] = -block[20:].abs() - 0.01
    stored, scale, zero = int_grid(block.amin(1), block.amax(1), bits, symmetric, torch.float32)
    ref_scale, ref_zero = _minmax_grid(block, bits, symmetric)
    assert torch.equal(stored, scale) and torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    maxq = (1 << bits) - 1
    absmax = block.abs().amax(1)
    if symmetric:
        torch.testing.assert_close(scale, 2 * absmax / maxq)
        assert bool((zero == 1 << (bits - 1)).all())
        # the lowest code reaches −absmax·2^k/(2^k − 1); the highest (2^(k−1) − 1)·scale, just below absmax
        assert bool(((0 - zero) * scale <= -absmax).all()) and bool(((maxq - zero) * scale < absmax).all())
    else:
        torch.testing.assert_close(scale, (block.amax(1).clamp_min(0) - block.amin(1).clamp_max(0)) / maxq)
        assert bool((zero[10:20] == 0).all()) and bool((zero[20:] == maxq).all())
    # the rtn quantizer with float32 scales encodes on exactly this grid
    rtn = REG.create("quantizer", "rtn", bits=bits, group_size=16, symmetric=symmetric, scale_dtype="float32")
    qw = rtn.quantize(block)
    assert torch.equal(qw.block_scales()[:, 0], ref_scale) and torch.equal(qw.block_zeros()[:, 0], ref_zero)
    expect = torch.clamp(torch.round(block / ref_scale[:, None]) + ref_zero[:, None], 0, maxq)
    assert torch.equal(qw.unpacked_codes(), expect.long())


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_block_size_does_not_change_the_result(layer, act_order):
    """Groups spanning several lazy blocks (and scattered by act_order) see all pending updates."""
    w, x, st = layer
    results = [gptq(bits=3, group_size=32, block_size=b, act_order=act_order).quantize(w, st) for b in (1, 7, 128)]
    ref = results[-1].unpacked_codes()
    for qw in results[:-1]:
        assert float((qw.unpacked_codes() != ref).float().mean()) < 0.01
        assert out_err(x, w, qw.dequantize()) == pytest.approx(out_err(x, w, results[-1].dequantize()), rel=1e-2)


def test_static_groups_use_the_rtn_grid(layer):
    w, _, st = layer
    for opts in ({"bits": 4, "group_size": 32}, {"bits": 3, "grid": "nf", "group_size": 16, "act_order": True}):
        q = gptq(static_groups=True, **opts)
        ours, ref = q.quantize(w, st), base_of(q).quantize(w)
        assert torch.equal(ours.scale, ref.scale)
        if q.grid == "int":
            assert torch.equal(ours.zero, ref.zero)


def test_float32_hessian_path(layer, monkeypatch):
    w, x, st = layer
    module = __import__("lqframe.plugins.gptq", fromlist=["FLOAT64_MAX_COLS"])
    ref = gptq(bits=3).quantize(w, st)
    monkeypatch.setattr(module, "FLOAT64_MAX_COLS", 0)
    f32 = gptq(bits=3).quantize(w, st)
    assert out_err(x, w, f32.dequantize()) == pytest.approx(out_err(x, w, ref.dequantize()), rel=2e-2)


# --------------------------------------------------------------------------- format


FORMAT_CASES = [
    {"bits": 4},
    {"bits": 3, "group_size": 128},
    {"bits": 4, "symmetric": True, "act_order": True},
    {"bits": 2, "group_size": -1, "scale_dtype": "float32"},
    {"bits": 8, "group_size": 24, "scale_dtype": "bfloat16", "act_order": True},
    {"bits": 4, "grid": "nf"},
    {"bits": 3, "grid": "nf", "group_size": 48, "act_order": True},
    {"bits": 2, "grid": "nf", "group_size": -1},
]


@pytest.mark.parametrize("opts", FORMAT_CASES)
def test_packed_format_is_the_rtn_nf_format(opts):
    n, m = 10, 100  # 100 columns: the last group of a row is short
    w, x = correlated_layer(n, m, tokens=300, seed=4)
    q = gptq(**opts)
    base = base_of(q, m)
    ours, ref = q.quantize(w, stats_of(x)), base.quantize(w)
    assert q.storage_bits((n, m)) == base.storage_bits((n, m)) == ours.storage_bits() == ref.storage_bits()
    assert q.storage_bits((576, 1536)) == base_of(q, 1536).storage_bits((576, 1536))
    assert (ours.format, ours.bits, ours.shape, ours.block_size) == (ref.format, ref.bits, ref.shape, ref.block_size)
    assert ours.scale.dtype == ref.scale.dtype and ours.scale.shape == ref.scale.shape
    if q.grid == "nf":
        assert torch.equal(ours.codebook, ref.codebook) and ours.zero is None
    else:
        assert ours.codebook is None
        assert type(ours.zero) is type(ref.zero)
        if q.symmetric:
            assert ours.zero == ref.zero
        else:
            assert ours.zero.numel() == packed_nbytes(ours.nblocks_total, ours.bits)
    codes = ours.unpacked_codes()
    assert codes.min() >= 0 and codes.max() < (1 << q.bits)
    assert ours.codes.numel() == packed_nbytes(n * m, q.bits)
    deq = ours.dequantize()
    assert deq.shape == (n, m) and bool(torch.isfinite(deq).all())
    assert q.bits_per_param((n, m)) == pytest.approx(ours.bits_per_param())
    tensors, header = ours.to_state("l.")
    assert torch.equal(lqframe.QuantizedWeight.from_state(tensors, header, "l.").dequantize(), deq)
    torch.testing.assert_close(q.roundtrip(w, stats_of(x)), deq, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 16), (5, 0), (0, 0)])
def test_empty_matrices(shape):
    n, m = shape
    q = gptq(bits=3)
    qw = q.quantize(torch.zeros(shape), lqframe.LayerStats(n_tokens=4, rxx=torch.zeros(m, m, dtype=torch.float64)))
    assert qw.dequantize().shape == shape and qw.storage_bits() == q.storage_bits(shape)


# --------------------------------------------------------------------------- degenerate statistics


def test_dead_input_channels():
    w, x = correlated_layer(seed=5)
    dead = torch.tensor([0, 5, 6, 40, 127])
    x[:, dead] = 0
    q = gptq(bits=3, act_order=True, group_size=16)
    qw = q.quantize(w, stats_of(x))
    deq = qw.dequantize()
    assert bool(torch.isfinite(deq).all())
    assert qw.meta["dead_columns"] == len(dead)
    # dead columns are kept and rounded to nearest on their group's grid (no error feedback reaches them)
    bound = qw.error_bound(w)[:, dead]
    assert bool(((w[:, dead] - deq[:, dead]).abs() <= bound * (1 + 1e-6) + 1e-7).all())
    assert out_err(x, w, deq) < out_err(x, w, base_of(q).quantize(w).dequantize())


def test_rank_deficient_statistics():
    w, x = correlated_layer(tokens=40, seed=6)  # 40 tokens, 128 input channels: rank(rxx) = 40
    for opts in ({"bits": 2}, {"bits": 4, "grid": "nf", "act_order": True}):
        q = gptq(**opts)
        deq = q.quantize(w, stats_of(x)).dequantize()
        assert bool(torch.isfinite(deq).all())
        assert out_err(x, w, deq) < out_err(x, w, base_of(q).quantize(w).dequantize())


def test_all_zero_weight_and_all_zero_statistics():
    w, x = correlated_layer(seed=7)
    q = gptq(bits=3)
    assert torch.equal(q.quantize(torch.zeros_like(w), stats_of(x)).dequantize(), torch.zeros_like(w))
    # no signal at all (every channel dead): plain round-to-nearest
    none = lqframe.LayerStats(n_tokens=0, rxx=torch.zeros(N_IN, N_IN, dtype=torch.float64))
    assert torch.equal(q.quantize(w, none).codes, base_of(q).quantize(w).codes)


def _indefinite_stats(m=N_IN, dip=0.05, seed=8):
    """A Σxxᵀ corrupted (e.g. by low-precision accumulation) into an indefinite matrix: the spectrum of
    real statistics in a random orthonormal basis, with the smallest eigenvalue replaced by
    −dip × the mean diagonal — so damp 0.01 fails and 0.1 succeeds for dip = 0.05."""
    _, x = correlated_layer(m=m, tokens=1000, seed=seed)
    evals = torch.linalg.eigvalsh(x.double().T @ x.double())
    positive = float(evals[1:].sum())
    evals[0] = -dip * positive / (m + dip)  # = −dip · trace/m of the result
    basis = torch.linalg.qr(torch.randn(m, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q
    rxx = (basis * evals) @ basis.T
    return lqframe.LayerStats(n_tokens=1000, rxx=(rxx + rxx.T) / 2)


def test_indefinite_hessian_raises_damp_with_a_warning(caplog):
    w, _ = correlated_layer(seed=9)
    st = _indefinite_stats()
    with caplog.at_level(logging.WARNING, logger="lqframe.gptq"):
        qw = gptq(bits=3).quantize(w, st)
    messages = [r.getMessage() for r in caplog.records if r.name == "lqframe.gptq"]
    assert len(messages) == 1 and "retrying with damp 0.1" in messages[0]
    assert qw.meta["damp"] == pytest.approx(0.1)
    assert bool(torch.isfinite(qw.dequantize()).all())


def test_indefinite_hessian_beyond_max_damp_is_a_weight_error(caplog):
    w, _ = correlated_layer(seed=9)
    st = _indefinite_stats(dip=5.0)  # needs damp > 5: more than max_damp allows
    with caplog.at_level(logging.WARNING, logger="lqframe.gptq"), pytest.raises(
        lqframe.WeightError, match="not positive definite.*damp 1"
    ):
        gptq(bits=3).quantize(w, st)
    assert [r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records if r.name == "lqframe.gptq"] == ["0.1", "1"]


# --------------------------------------------------------------------------- errors and determinism


def test_missing_statistics():
    w = torch.randn(8, 32)
    with pytest.raises(lqframe.MissingStatisticError, match=r"gptq.*rxx"):
        gptq().quantize(w)
    only_sq = lqframe.LayerStats(n_tokens=10, sq_sum=torch.ones(32, dtype=torch.float64))
    with pytest.raises(lqframe.MissingStatisticError, match=r"gptq.*rxx"):
        gptq().quantize(w, only_sq)
    with pytest.raises(lqframe.MissingStatisticError, match=r"gptq.*rxx"):
        REG.create("reconstructor", "none").decompose(w, gptq())


def test_bad_weight_and_bad_statistics():
    w = torch.randn(8, 32)
    st = stats_of(torch.randn(64, 32))
    bad = w.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(lqframe.WeightError, match=r"NaN.*\[2, 3\]"):
        gptq().quantize(bad, st)
    with pytest.raises(lqframe.WeightError, match="NaN"):
        gptq().quantize(bad)  # the weight is checked before the statistics
    with pytest.raises(lqframe.DataError, match="rxx has shape"):
        gptq().quantize(torch.randn(8, 16), st)
    nan_rxx = lqframe.LayerStats(n_tokens=64, rxx=st.rxx.clone().fill_diagonal_(float("nan")))
    with pytest.raises(lqframe.DataError, match="NaN"):
        gptq().quantize(w, nan_rxx)


@pytest.mark.parametrize(
    "options",
    [{"bits": 1}, {"bits": 9}, {"group_size": 0}, {"grid": "fp4"}, {"grid": "nf", "symmetric": True},
     {"damp": 0.0}, {"damp": 0.5, "max_damp": 0.1}, {"block_size": 0}, {"act_order": 1}],
)
def test_bad_options(options):
    with pytest.raises(lqframe.OptionError):
        gptq(**options)


def test_deterministic(layer):
    w, _, st = layer
    for opts in ({"bits": 3, "act_order": True}, {"bits": 4, "grid": "nf", "group_size": 16}):
        a, b = gptq(**opts).quantize(w, st), gptq(**opts).quantize(w, st)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        assert torch.equal(a.dequantize(), b.dequantize())


def test_needs_and_flags():
    cls = REG.get("quantizer", "gptq")
    assert cls.needs == frozenset({"rxx"}) and cls.rounds_to_nearest is False
    assert issubclass(cls, lqframe.Quantizer)
    assert len({tuple(sorted(c.items())) for c in cls.test_configs()}) == len(cls.test_configs()) >= 3


_BLOCKED_SCRIPT = r"""
import json, sys, torch, lqframe
reg = lqframe.registry()
names = sorted(i.name for i in reg.components() if i.kind == "quantizer")
w, x = torch.load(sys.argv[1])
acc = lqframe.StatsAccumulator(x.shape[1], {"rxx"})
acc.update(x)
stats = acc.finalize()
out = {}
for i, opts in enumerate(json.loads(sys.argv[2])):
    q = reg.create("quantizer", "gptq", **opts)
    qw = q.quantize(w, stats)
    out[str(i)] = (*qw.to_state(), q.storage_bits(tuple(w.shape)))
torch.save({"quantizers": names, "blocked": list(reg.blocked), "results": out}, sys.argv[3])
"""


def test_gptq_works_with_rtn_and_nf_blocked(tmp_path):
    """gptq takes its int and NF grids from the core, not from the ``rtn`` / ``nf`` plugins: with those
    blocked it still quantizes, bit for bit as in a normal process."""
    import json
    import os
    import subprocess
    import sys

    from lqframe.registry import BLOCK_ENV

    n, m = 12, 100
    w, x = correlated_layer(n, m, tokens=300, seed=5)
    torch.save((w, x), tmp_path / "layer.pt")
    cases = [c for c in FORMAT_CASES if c.get("grid") == "nf"][:2] + [c for c in FORMAT_CASES if "grid" not in c][:3]
    env = {**os.environ, BLOCK_ENV: "rtn,nf", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_SCRIPT, str(tmp_path / "layer.pt"), json.dumps(cases),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert "gptq" in got["quantizers"] and not {"rtn", "nf"} & set(got["quantizers"])
    assert sorted(got["blocked"]) == ["nf", "rtn"]
    st = stats_of(x)
    for i, opts in enumerate(cases):
        q = gptq(**opts)
        ours = q.quantize(w, st)
        tensors, header, bits = got["results"][str(i)]
        ref_tensors, ref_header = ours.to_state()
        assert header == ref_header, opts
        assert bits == q.storage_bits((n, m)) == base_of(q, m).storage_bits((n, m))
        assert tensors.keys() == ref_tensors.keys()
        for key, value in tensors.items():
            assert value.dtype == ref_tensors[key].dtype and torch.equal(value, ref_tensors[key]), (opts, key)
        assert header["format"] == base_of(q, m).quantize(w).format


def test_defaults_are_the_measured_best():
    """act-order with static groups: the best GPTQ alone on the default model (benchmarks/results/gptq.md)."""
    q = gptq()
    assert q.act_order and q.static_groups and not q.symmetric and q.damp == 0.01
