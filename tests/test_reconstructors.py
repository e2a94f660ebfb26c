"""The low-rank reconstructors (svd, qera-exact, qera-approx, lqer, loftq) against the oracles of
METHODS.md §2.1 and §9: QERA-exact reaches the theoretical output-error tail and beats every other
rank-r correction of the same Q on output error; plain SVD is best on weight error; with statistics
that make every scaling the identity all scaled solves coincide with SVD; LoftQ never returns an
iterate worse than its first (= SVD); degenerate statistics stay finite."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lqframe
from lqframe.factors import FLOAT_FACTOR_DTYPES, round_factor
from lqframe.kernels import pack_bits, packed_nbytes
from lqframe.lowrank import LowRankReconstructor, output_error
from lqframe.registry import option_names
from tests.strategies import matrices

REG = lqframe.registry()
ALL_STATS = {"rxx", "sq_sum", "abs_mean_max"}
FIXED_Q = ("svd", "qera-exact", "qera-approx", "lqer")  # reconstructors that keep Q = q(W)
DATA_AWARE = ("qera-exact", "qera-approx", "lqer")
LOWRANK = ("svd", *DATA_AWARE, "loftq")
QUANTIZERS = [("nf", {"bits": 4, "group_size": 32}), ("rtn", {"bits": 3, "group_size": 16})]

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def recon(name: str, **options) -> lqframe.ErrorReconstructor:
    if name != "none":
        options.setdefault("factor_dtype", "float32")
    return REG.create("reconstructor", name, **options)


def correlated_stats(
    m: int, n_tokens: int, seed: int, outliers: int = 3, batches: int = 4, dead: int = 0
) -> lqframe.LayerStats:
    """Statistics of X = Z·A (a random mixing of channels) with a few channels scaled ×20 and the
    last ``dead`` channels always zero, accumulated over several batches."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(m, dtype=torch.float64) + 0.3 * torch.randn(m, m, generator=g, dtype=torch.float64) / m**0.5
    chan = torch.ones(m, dtype=torch.float64)
    chan[torch.randperm(m, generator=g)[: min(outliers, m)]] = 20.0
    if dead:
        chan[m - dead:] = 0.0
    acc = lqframe.StatsAccumulator(m, ALL_STATS)
    for chunk in torch.arange(n_tokens).chunk(batches):
        z = torch.randn(len(chunk), m, generator=g, dtype=torch.float64)
        acc.update((z @ mix) * chan)
    return acc.finalize()


def scaled_tail(delta: torch.Tensor, stats: lqframe.LayerStats, rank: int) -> tuple[float, float]:
    """Σ_{i>r} σ_i(ΔS)² with the unfloored S = E[xxᵀ]^{1/2}, and the total ‖ΔS‖², in float64."""
    evals, evecs = torch.linalg.eigh(stats.second_moment())
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    sigma = torch.linalg.svdvals(delta.double() @ root)
    return float((sigma[rank:] ** 2).sum()), float((sigma**2).sum())


def weight_error(w: torch.Tensor, dec: lqframe.Decomposition) -> float:
    return float(((w.double() - dec.dense().double()) ** 2).sum())


def lowrank_dense(dec: lqframe.Decomposition) -> torch.Tensor:
    shape = tuple(dec.qweight.shape)
    return torch.zeros(shape, dtype=torch.float64) if dec.lowrank is None else dec.lowrank.to_dense().double()


# --------------------------------------------------------------------------- QERA-exact oracle


@FAST
@given(
    n=st.integers(1, 48),
    m=st.integers(2, 96),
    seed=st.integers(0, 2**31 - 1),
    qi=st.integers(0, len(QUANTIZERS) - 1),
    data=st.data(),
)
def test_qera_exact_reaches_the_tail_and_beats_every_other_correction(n, m, seed, qi, data):
    rank = data.draw(st.integers(0, min(n, m) + 2), label="rank")
    stats = correlated_stats(m, 4 * m + 16, seed, outliers=max(1, m // 16))
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(n, m, generator=g) * 0.02
    quantizer = REG.create("quantizer", QUANTIZERS[qi][0], **QUANTIZERS[qi][1])

    decs = {name: recon(name, **({} if name == "none" else {"rank": rank})).decompose(w, quantizer, stats)
            for name in ("none", *FIXED_Q)}
    codes = decs["none"].qweight.codes
    assert all(torch.equal(d.qweight.codes, codes) for d in decs.values())  # the same Q for all

    delta = w.double() - decs["none"].qweight.dequantize().double()
    tail, total = scaled_tail(delta, stats, rank)
    out = {name: output_error(w.double() - d.dense().double(), stats) for name, d in decs.items()}
    slack = 1e-6 * total + 1e-18

    exact = decs["qera-exact"]
    assert abs(out["qera-exact"] - tail) <= 1e-4 * tail + slack, (out["qera-exact"], tail)
    if rank > 0:
        assert abs(exact.info["tail_energy"] - tail) <= 1e-4 * tail + slack
        assert exact.info["output_error"] == pytest.approx(out["qera-exact"], rel=1e-5, abs=slack)
    assert exact.info.get("output_error_none", out["none"]) == pytest.approx(out["none"], rel=1e-6, abs=slack)
    assert out["none"] == pytest.approx(total, rel=1e-6, abs=slack)
    for name in ("none", "svd", "qera-approx", "lqer"):
        assert out["qera-exact"] <= out[name] * (1 + 1e-5) + slack, name
    # and for a fixed Q, plain SVD has the smallest weight error (Eckart–Young)
    werr = {name: weight_error(w, d) for name, d in decs.items()}
    for name in ("none", "qera-exact", "qera-approx", "lqer"):
        assert werr["svd"] <= werr[name] * (1 + 1e-5) + 1e-12, name


def test_methods_ordering_example():
    """METHODS.md §2.1's check: m=256, n=192, k=16, NF4 g64, correlated activations with outlier
    channels — output error none > svd > (lqer ≈) qera-approx > qera-exact = theoretical tail."""
    n, m, k = 192, 256, 16
    stats = correlated_stats(m, 1024, seed=11, outliers=8, batches=8)
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(5)) * 0.02
    quantizer = REG.create("quantizer", "nf", bits=4, group_size=64)
    out = {}
    for name in ("none", "svd", "lqer", "qera-approx", "qera-exact"):
        dec = recon(name, **({} if name == "none" else {"rank": k})).decompose(w, quantizer, stats)
        out[name] = output_error(w - dec.dense(), stats)
    delta = w.double() - quantizer.quantize(w).dequantize().double()
    tail, _ = scaled_tail(delta, stats, k)
    assert out["none"] > out["svd"] > out["qera-approx"] > out["qera-exact"]
    assert out["svd"] > out["lqer"] > out["qera-exact"]
    assert out["qera-exact"] == pytest.approx(tail, rel=1e-4)


# --------------------------------------------------------------------------- identity statistics


def test_identity_statistics_reduce_every_scaled_solve_to_svd():
    n, m, rank, tokens = 24, 40, 5, 1000
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(3))
    identity = lqframe.LayerStats(
        n_tokens=tokens,
        rxx=tokens * torch.eye(m, dtype=torch.float64),
        sq_sum=torch.full((m,), float(tokens), dtype=torch.float64),
        abs_mean_max=torch.full((m,), 0.7, dtype=torch.float64),
    )
    quantizer = REG.create("quantizer", "nf", bits=4, group_size=32)
    ref = recon("svd", rank=rank).decompose(w, quantizer)
    c_ref = lowrank_dense(ref)
    for name in DATA_AWARE:
        c = lowrank_dense(recon(name, rank=rank).decompose(w, quantizer, identity))
        torch.testing.assert_close(c, c_ref, atol=1e-5 * float(c_ref.abs().max()), rtol=0, msg=name)

    # on real correlated statistics the scaled solves move away from SVD, which stays best in weight error
    stats = correlated_stats(m, 400, seed=4, outliers=4)
    werr = {name: weight_error(w, recon(name, rank=rank).decompose(w, quantizer, stats)) for name in FIXED_Q}
    assert all(werr["svd"] < werr[name] for name in DATA_AWARE), werr


# --------------------------------------------------------------------------- LoftQ


def _check_packed(qw: lqframe.QuantizedWeight) -> None:
    assert qw.codes.dtype == torch.uint8 and qw.codes.numel() == packed_nbytes(qw.numel, qw.bits)
    assert torch.equal(pack_bits(qw.unpacked_codes(), qw.bits), qw.codes)


@FAST
@given(w=matrices(max_rows=24, max_cols=80), iterations=st.integers(1, 4), qi=st.integers(0, 1), data=st.data())
def test_loftq_best_iterate_is_never_worse_than_svd(w, iterations, qi, data):
    n, m = w.shape
    rank = data.draw(st.integers(0, min(n, m) + 2), label="rank")
    quantizer = REG.create("quantizer", QUANTIZERS[qi][0], **QUANTIZERS[qi][1])
    dec = recon("loftq", rank=rank, iterations=iterations).decompose(w, quantizer)
    svd = recon("svd", rank=rank).decompose(w, quantizer)
    info = dec.info
    w32 = w.float()
    scale = float(w32.double().norm()) + 1e-30

    _check_packed(dec.qweight)
    assert dec.qweight.storage_bits() == quantizer.storage_bits((n, m))
    assert bool(torch.isfinite(dec.dense()).all())
    if iterations == 1 or dec.rank == 0:  # nothing to alternate: exactly svd
        assert torch.equal(dec.dense(), svd.dense()) and "errors" not in info
        return
    # the reported error is the error of what is returned
    assert info["final_error"] == pytest.approx(weight_error(w32, dec) ** 0.5, rel=1e-6, abs=1e-7 * scale)
    # iteration 1 is svd with the same quantizer, and the best iterate is no worse
    assert info["initial_error"] == pytest.approx(weight_error(w32, svd) ** 0.5, rel=1e-5, abs=1e-7 * scale)
    assert info["final_error"] <= info["initial_error"] * (1 + 1e-6) + 1e-7 * scale
    assert 1 <= info["iterations_run"] <= iterations
    assert len(info["errors"]) == info["iterations_run"]
    assert info["errors"][info["best_iteration"] - 1] == min(info["errors"])
    assert all(isinstance(info[k], int | float) for k in ("iterations_run", "best_iteration", "initial_error"))
    assert dec.rank == min(rank, n, m)
    if rank >= min(n, m) and min(n, m):
        assert info["final_error"] <= 1e-5 * scale


def test_loftq_improves_on_svd_and_returns_the_best_not_the_last():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    quantizer = REG.create("quantizer", "nf", bits=2, group_size=64)
    dec = recon("loftq", rank=8, iterations=5).decompose(w, quantizer)
    errs = dec.info["errors"]
    assert dec.info["final_error"] < 0.99 * errs[0]  # alternation helps on 2-bit
    assert dec.info["final_error"] == pytest.approx(min(errs), rel=1e-6)
    assert dec.info["best_iteration"] == errs.index(min(errs)) + 1


@pytest.mark.parametrize("qname", ["gptq", "rtn"])
def test_data_aware_alternation_lowers_the_output_error(qname):
    """qera-exact with iterations > 1 alternates Q = q(W − LR) / LR = qera(W − Q); with gptq both
    steps lower the layer-output error, and the best iterate is returned with its weighted error."""
    n, m = 40, 96
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(3))
    stats = correlated_stats(m, 2000, seed=4)
    # natural-order GPTQ: on this layer act-order's iterates only get worse (the best one, the
    # first, is what alternation then returns), so it would not exercise the descent
    opts = {"act_order": False, "static_groups": False} if qname == "gptq" else {}
    quantizer = REG.create("quantizer", qname, bits=2, group_size=32, **opts)
    once = recon("qera-exact", rank=6).decompose(w, quantizer, stats)
    alt = recon("qera-exact", rank=6, iterations=5).decompose(w, quantizer, stats)
    info = alt.info
    assert info["initial_error"] ** 2 == pytest.approx(once.info["output_error"], rel=1e-3)
    assert info["final_error"] == min(info["errors"]) and info["final_error"] < 0.99 * info["initial_error"]
    assert alt.info["output_error"] < 0.98 * once.info["output_error"]
    assert info["final_error"] ** 2 == pytest.approx(alt.info["output_error"], rel=1e-3)
    # the packed Q is the best iterate's and L·R the closed form for it: the one-shot oracle holds
    tail, _ = scaled_tail(w - alt.qweight.dequantize(), stats, 6)
    assert alt.info["output_error"] == pytest.approx(tail, rel=1e-3)


class _Jittery(lqframe.Quantizer):
    """A quantizer whose fast roundtrip disagrees slightly with its packed output, to exercise the
    final refit of loftq against the packed Q."""

    def __init__(self, inner: lqframe.Quantizer):
        self.inner = inner

    def quantize(self, weight, stats=None):
        return self.inner.quantize(weight, stats)

    def storage_bits(self, shape):
        return self.inner.storage_bits(shape)

    def roundtrip(self, weight, stats=None):
        return self.inner.roundtrip(weight, stats) * 1.01


def test_loftq_refits_to_the_packed_q():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    quantizer = _Jittery(REG.create("quantizer", "nf", bits=3, group_size=32))
    dec = recon("loftq", rank=4, iterations=3).decompose(w, quantizer)
    # the low-rank part is then the optimal one for the packed Q, and final_error is its real error
    assert dec.info["refit"] is True
    assert dec.info["final_error"] == pytest.approx(weight_error(w, dec) ** 0.5, rel=1e-6)
    packed = w - dec.qweight.dequantize()
    tail = float((torch.linalg.svdvals(packed.double())[4:] ** 2).sum())
    assert weight_error(w, dec) == pytest.approx(tail, rel=1e-5)


# --------------------------------------------------------------------------- degenerate statistics


@pytest.mark.parametrize("case", ["dead-channels", "fewer-tokens-than-columns", "all-zero"])
def test_degenerate_statistics_stay_finite(case):
    n, m, rank = 20, 48, 6
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(2)) * 0.05
    if case == "dead-channels":
        stats = correlated_stats(m, 300, seed=6, dead=10)
    elif case == "fewer-tokens-than-columns":
        stats = correlated_stats(m, m // 3, seed=7, batches=2)
    else:
        acc = lqframe.StatsAccumulator(m, ALL_STATS)
        for _ in range(3):
            acc.update(torch.zeros(16, m))
        stats = acc.finalize()
    quantizer = REG.create("quantizer", "rtn", bits=3, group_size=16)
    svd = recon("svd", rank=rank).decompose(w, quantizer)
    none_out = output_error(w - quantizer.quantize(w).dequantize(), stats)
    for name in DATA_AWARE:
        dec = recon(name, rank=rank).decompose(w, quantizer, stats)
        assert bool(torch.isfinite(dec.lowrank.left).all() and torch.isfinite(dec.lowrank.right).all()), name
        assert bool(torch.isfinite(dec.dense()).all()), name
        assert all(v == v for v in dec.info.values() if isinstance(v, float)), name  # no NaN diagnostics
        out = output_error(w - dec.dense(), stats)
        assert out <= none_out * (1 + 1e-4) + 1e-12, name
        if case == "all-zero":  # every scaling falls back to the identity
            torch.testing.assert_close(lowrank_dense(dec), lowrank_dense(svd), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("name", DATA_AWARE)
def test_missing_statistics_are_a_clear_error(name):
    w = torch.randn(8, 16)
    quantizer = REG.create("quantizer", "rtn", bits=4, group_size=8)
    needs = sorted(REG.get("reconstructor", name).needs)
    with pytest.raises(lqframe.MissingStatisticError, match=name):
        recon(name, rank=2).decompose(w, quantizer)
    others = lqframe.LayerStats(n_tokens=4, abs_sum=torch.ones(16, dtype=torch.float64))
    with pytest.raises(lqframe.MissingStatisticError, match=needs[0]):
        recon(name, rank=2).decompose(w, quantizer, others)


@pytest.mark.parametrize("name", LOWRANK)
@pytest.mark.parametrize("factor_dtype", ["float32", "float16", "bfloat16", "int8"])
def test_shared_options_storage_and_reproducibility(name, factor_dtype):
    n, m = 12, 40
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(8))
    stats = correlated_stats(m, 200, seed=9)
    quantizer = REG.create("quantizer", "nf", bits=4, group_size=16)
    for method in ("exact", "randomized"):
        r = recon(name, rank=3, method=method, factor_dtype=factor_dtype)
        dec = r.decompose(w, quantizer, stats)
        assert dec.lowrank.factor_dtype == factor_dtype
        if factor_dtype == "int8":  # float32 values on the int8 grid: encoding them is lossless
            for t, side in ((dec.lowrank.left, "left"), (dec.lowrank.right, "right")):
                assert torch.equal(round_factor(t, "int8", side), t)
        else:
            assert dec.lowrank.left.dtype == FLOAT_FACTOR_DTYPES[factor_dtype]
        assert dec.lowrank.storage_bits() == r.lowrank_bits((n, m))
        again = r.decompose(w, quantizer, stats)
        assert torch.equal(again.dense(), dec.dense()) and torch.equal(again.qweight.codes, dec.qweight.codes)
    for rank in (0, min(n, m), min(n, m) + 5):
        dec = recon(name, rank=rank).decompose(w, quantizer, stats)
        assert dec.rank == min(rank, n, m) and recon(name, rank=rank).lowrank_bits((n, m)) == (
            0 if dec.lowrank is None else dec.lowrank.storage_bits()
        )
        if rank == 0:
            assert dec.lowrank is None
            assert torch.equal(dec.dense(), quantizer.quantize(w).dequantize())
        else:  # full rank: the correction is exact
            assert weight_error(w, dec) <= 1e-8 * float((w.double() ** 2).sum())


def test_low_rank_reconstructors_share_the_svd_options():
    base = option_names(REG.get("reconstructor", "svd"))
    assert base == ["rank", "method", "factor_dtype", "oversample", "niter", "seed", "iterations", "precision"]
    defaults = REG.create("reconstructor", "svd").options()
    assert defaults == {"rank": 32, "method": "exact", "factor_dtype": "float16", "oversample": 10, "niter": 2,
                        "seed": 0, "iterations": 1, "precision": "float64"}
    assert REG.create("reconstructor", "loftq").iterations == 5
    for name in LOWRANK:
        cls = REG.get("reconstructor", name)
        names = option_names(cls)  # subclasses that change a default (iterations) move it after the base's
        assert issubclass(cls, LowRankReconstructor) and names[:6] == base[:6] and set(base) <= set(names)
        assert all(cfg.get("rank", 32) <= 4 for cfg in cls.test_configs())
        assert any(cfg.get("factor_dtype") == "float32" for cfg in cls.test_configs())
    assert REG.get("reconstructor", "loftq").needs == frozenset()
    assert REG.get("reconstructor", "loftq").__mro__[1] is LowRankReconstructor


@pytest.mark.parametrize(
    "name,options",
    [
        ("qera-exact", {"eig_floor": -1e-3}),
        ("qera-exact", {"eig_floor": 1.0}),
        ("qera-approx", {"scale_floor": float("nan")}),
        ("lqer", {"min_scale": 0.0}),
        ("loftq", {"iterations": 0}),
        ("loftq", {"method": "lanczos"}),
        ("lqer", {"factor_dtype": "int4"}),
    ],
)
def test_bad_options_are_rejected(name, options):
    with pytest.raises(lqframe.OptionError):
        REG.create("reconstructor", name, **options)


def test_evolve_keeps_subclass_options():
    r = REG.create("reconstructor", "qera-exact", rank=3, eig_floor=1e-8)
    r2 = attrs.evolve(r, rank=5)
    assert r2.rank == 5 and r2.eig_floor == 1e-8 and r2.needs == frozenset({"rxx"})


@pytest.mark.parametrize("dead", [0, 5])
def test_qera_exact_cholesky_root_reaches_the_same_optimum(dead):
    """root: cholesky weighs by F with F Fᵀ = E[xxᵀ]; the optimum and its output error equal the
    symmetric root's (full-rank statistics), and dead channels stay finite."""
    n, m, rank = 30, 64, 5
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(11))
    stats = correlated_stats(m, 3000, seed=12, dead=dead)
    quantizer = REG.create("quantizer", "rtn", bits=3, group_size=32)
    sym = recon("qera-exact", rank=rank).decompose(w, quantizer, stats)
    chol = recon("qera-exact", rank=rank, root="cholesky").decompose(w, quantizer, stats)
    assert torch.equal(sym.qweight.codes, chol.qweight.codes)
    assert bool(torch.isfinite(chol.dense()).all())
    # the ridge (eig_floor · max diag, on every eigenvalue) moves the optimum by well under 0.1 %
    assert chol.info["output_error"] == pytest.approx(sym.info["output_error"], rel=1e-3)
    if not dead:  # the symmetric root's solution is the exact optimum
        tail, _ = scaled_tail(w - sym.qweight.dequantize(), stats, rank)
        assert sym.info["output_error"] == pytest.approx(tail, rel=1e-6)
        assert tail * (1 - 1e-9) <= chol.info["output_error"] <= tail * (1 + 1e-3)


def test_qera_exact_damp_shrinks_toward_plain_svd():
    """damp fits to E[xxᵀ] + damp·mean(diag)·I: 0 is the exact solve, a huge damp the unweighted SVD;
    in between the output error on the calibration statistics grows and the weight error falls."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    st = correlated_stats(64, 400, seed=6)
    q = REG.create("quantizer", "rtn", bits=3, group_size=16)
    ref = recon("qera-exact", rank=6).decompose(w, q, st)
    assert torch.equal(recon("qera-exact", rank=6, damp=0.0).decompose(w, q, st).dense(), ref.dense())
    svd = recon("svd", rank=6).decompose(w, q, st)
    huge = recon("qera-exact", rank=6, damp=1e3).decompose(w, q, st)
    torch.testing.assert_close(huge.dense(), svd.dense(), rtol=0, atol=2e-3 * float(w.abs().max()))
    errs = [recon("qera-exact", rank=6, damp=d).decompose(w, q, st) for d in (0.0, 0.1, 1.0)]
    out = [output_error(w - e.dense(), st) for e in errs]
    wgt = [float((w - e.dense()).norm()) for e in errs]
    assert out[0] < out[1] < out[2] and wgt[0] > wgt[1] > wgt[2]
