"""Conformance checks for lqframe components, for plugin authors and for lqframe's own test suite.

Every component kind has a check function that runs the properties any implementation must have,
on hypothesis-generated inputs (Gaussian, heavy-tailed, outlier rows, all zeros, constant, tiny,
huge and low-rank matrices; widths that do and do not divide block sizes; float32, float16 and
bfloat16), plus fixed edge cases (empty matrices, NaN and Inf). A failing property raises
``AssertionError`` (through hypothesis, which first shrinks the input to a small failing example)::

    from lqframe import testing

    testing.check_quantizer("binary", {"group_size": 16})                  # by registry name
    testing.check_quantizer(BinaryQuantizer(group_size=16))                # or an instance
    testing.check_reconstructor("svd", {"rank": 4}, quantizer="binary")    # a quantizer × reconstructor pair
    testing.check_eckart_young("svd", quantizer="binary")                  # low-rank optimality
    testing.check_allocator("uniform")
    testing.check_objective(MyObjective())

A component argument is an instance, a class (instantiated with ``config``), a registry name
(created with ``config`` through ``registry``, default :func:`lqframe.registry`) or a
:class:`ComponentCase`. Every check accepts ``device=`` (``"cpu"``, ``"cuda"``, …): inputs and
calibration statistics are built on that device and results must come back on it. Components
that declare ``needs`` get :func:`synthetic_stats`. ``max_examples`` sets the number of hypothesis
examples and ``hypothesis_settings`` a parent :class:`hypothesis.settings` (for example a profile
with ``derandomize=True``).

For pytest, :func:`component_cases`, :func:`parametrize_components` and :func:`parametrize_pairs`
build test cases from the live registry, one per component and entry of its ``test_configs()``,
with ids like ``rtn[bits=4,group_size=64]+svd[rank=4,factor_dtype=float32]``;
:func:`parametrize_devices` adds a device axis (``cuda`` skipped where it is not available)::

    @testing.parametrize_devices()
    @testing.parametrize_pairs(quantizers=["binary"])
    def test_binary_pairs(quantizer_case, reconstructor_case, device):
        testing.check_reconstructor(reconstructor_case, quantizer=quantizer_case, device=device)

This module needs the ``test`` extra (``pip install 'lqframe[test]'``: hypothesis, pytest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import numpy as np
import torch

try:
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lqframe.testing needs hypothesis: pip install 'lqframe[test]'") from exc

import lqframe
from lqframe.errors import BudgetError, WeightError
from lqframe.interfaces import Component, ErrorReconstructor, Quantizer
from lqframe.kernels import pack_bits, packed_nbytes
from lqframe.lowrank import LowRankReconstructor
from lqframe.registry import KINDS, Registry, option_names
from lqframe.stats import StatsAccumulator
from lqframe.types import STAT_NAMES, Choice, CostTable, Decomposition, LayerStats, QuantizedWeight, average_bits

__all__ = [
    # strategies and synthetic inputs
    "DTYPES",
    "MATRIX_KINDS",
    "make_matrix",
    "matrices",
    "synthetic_stats",
    "cost_tables",
    "synthetic_outputs",
    "byte_tokenizer",
    # checks
    "check_quantizer",
    "check_reconstructor",
    "check_eckart_young",
    "check_allocator",
    "check_objective",
    "check_qweight",
    "check_device_placement",
    "check_linear_output",
    "UNIT_ROUNDOFF",
    # pytest helpers
    "ComponentCase",
    "component_id",
    "component_cases",
    "parametrize_components",
    "pair_params",
    "parametrize_pairs",
    "devices",
    "device_params",
    "parametrize_devices",
]

# =========================================================================== strategies


def byte_tokenizer():
    """A byte-level tokenizer (256 tokens, one per byte, no merges): tiny models for tests and
    benchmarks need no tokenizer download, and any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


#: input dtypes the strategies draw from
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: value distributions of :func:`make_matrix`
MATRIX_KINDS = ("gaussian", "heavy", "outlier-rows", "zeros", "constant", "tiny", "large", "low-rank")


def make_matrix(
    n: int, m: int, kind: str, dtype: str, seed: int, constant: float = 0.5, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """An ``n × m`` matrix of one of the :data:`MATRIX_KINDS`, in ``dtype`` (a key of
    :data:`DTYPES`), on ``device``. Drawn on the CPU from ``seed``, so every device gets the same
    values."""
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
    elif kind == "gaussian":
        w = torch.randn(n, m, generator=g) * 0.02
    else:
        raise ValueError(f"unknown matrix kind {kind!r}; kinds: {', '.join(MATRIX_KINDS)}")
    return w.to(DTYPES[dtype]).to(device)


@st.composite
def matrices(draw, max_rows: int = 24, max_cols: int = 80, device: str | torch.device = "cpu"):
    """Hypothesis strategy: weight matrices of 1…``max_rows`` × 1…``max_cols`` (widths that do and
    do not divide block sizes) of every :data:`MATRIX_KINDS` and :data:`DTYPES`, on ``device``."""
    n = draw(st.integers(1, max_rows))
    m = draw(st.integers(1, max_cols))
    kind = draw(st.sampled_from(MATRIX_KINDS))
    dtype = draw(st.sampled_from(tuple(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    constant = draw(st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=16))
    return make_matrix(n, m, kind, dtype, seed, constant, device)


def synthetic_stats(
    n: int,
    m: int,
    needs: Iterable[str],
    seed: int = 0,
    tokens: int = 96,
    device: str | torch.device = "cpu",
    registry: Registry | None = None,
) -> LayerStats | None:
    """Calibration statistics for an ``n × m`` weight, for every statistic in ``needs``; None when
    nothing is needed.

    Forward statistics are accumulated (with the registry's statistic kinds, plugin-defined ones
    included) from ``tokens`` random correlated activations with a few outlier channels (×20);
    gradient statistics (``fisher``) are a random positive ``n × m`` matrix. Drawn on the CPU from
    ``seed``, accumulated on ``device``."""
    needs = frozenset(needs)
    if not needs:
        return None
    kinds = _registry(registry).statistics()
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(m, m, generator=g) / max(m, 1) ** 0.5 + torch.eye(m)
    x = torch.randn(tokens, m, generator=g) @ mix
    if m:
        x[:, torch.randperm(m, generator=g)[: max(1, m // 16)]] *= 20
    gradient = sorted(name for name in needs if name in kinds and kinds[name].source == "gradient")
    acc = StatsAccumulator(m, needs - set(gradient), kinds)
    for chunk in x.to(device).split(32):
        acc.update(chunk)
    stats = acc.finalize()
    for name in gradient:
        value = (torch.rand(n, m, generator=g, dtype=torch.float64) + 1e-3).to(device)
        if name in STAT_NAMES:
            stats = attrs.evolve(stats, **{name: value})
        else:
            stats = attrs.evolve(stats, extra={**stats.extra, name: value})
    return stats


@st.composite
def cost_tables(draw, max_layers: int = 6, max_configs: int = 5, impossible: bool = True):
    """Hypothesis strategy: a :class:`~lqframe.CostTable` of 1…``max_layers`` matrices (1…4096
    parameters) × 1…``max_configs`` configurations (0.5…16 bits per parameter plus up to 64 bits of
    overhead, costs in [0, 1000]); with ``impossible`` about one cost in ten is ``inf``."""
    n_layers = draw(st.integers(1, max_layers))
    n_configs = draw(st.integers(1, max_configs))
    numel = draw(st.lists(st.integers(1, 4096), min_size=n_layers, max_size=n_layers))
    bpp = draw(st.lists(st.floats(0.5, 16.0), min_size=n_configs, max_size=n_configs))
    size = n_layers * n_configs
    overhead = draw(st.lists(st.integers(0, 64), min_size=size, max_size=size))
    cost_value = st.floats(0.0, 1e3)
    if impossible:
        cost_value = st.tuples(st.integers(0, 9), cost_value).map(lambda t: math.inf if t[0] == 0 else t[1])
    cost = draw(st.lists(cost_value, min_size=size, max_size=size))
    bits = np.array([[math.ceil(numel[i] * bpp[c]) for c in range(n_configs)] for i in range(n_layers)], dtype=float)
    bits += np.asarray(overhead, dtype=float).reshape(n_layers, n_configs)
    return CostTable(
        layers=tuple(f"layers.{i}" for i in range(n_layers)),
        configs=tuple({"config": c, "bits_per_param": bpp[c]} for c in range(n_configs)),
        cost=np.asarray(cost, dtype=float).reshape(n_layers, n_configs),
        bits=bits,
        numel=numel,
    )


def synthetic_outputs(
    names: Iterable[str],
    seed: int = 0,
    *,
    batch: int = 2,
    seq: int = 8,
    width: int = 16,
    noise: float = 0.1,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(student, teacher, batch)`` for an objective: for every output name a float32
    ``batch × seq × width`` teacher tensor and a student equal to it plus ``noise`` × Gaussian
    noise; the batch holds ``input_ids`` and ``labels`` in ``[0, width)`` (so ``logits`` have a
    vocabulary of ``width``) and an all-ones ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    teacher = {name: torch.randn(batch, seq, width, generator=g) for name in sorted(set(names))}
    student = {name: t + noise * torch.randn(t.shape, generator=g) for name, t in teacher.items()}
    ids = torch.randint(0, width, (batch, seq), generator=g)
    data = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}

    def to(d):
        return {k: v.to(device) for k, v in d.items()}

    return to(student), to(teacher), to(data)


# =========================================================================== component cases


def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else lqframe.registry()


def component_id(name: str, config: Mapping[str, Any] | None = None) -> str:
    """``name`` or ``name[key=value,…]``: the test id of a component configuration."""
    if not config:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in config.items())}]"


@attrs.frozen
class ComponentCase:
    """One registered component in one configuration (an entry of its ``test_configs()``)."""

    kind: str = attrs.field(validator=attrs.validators.in_(tuple(KINDS)))
    name: str
    config: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    @property
    def id(self) -> str:
        return component_id(self.name, self.config)

    def __str__(self) -> str:
        return self.id

    def create(self, registry: Registry | None = None) -> Component:
        """The component, created through ``registry`` (default: :func:`lqframe.registry`)."""
        return _registry(registry).create(self.kind, self.name, **self.config)


def component_cases(
    kind: str, registry: Registry | None = None, names: Iterable[str] | None = None
) -> list[ComponentCase]:
    """A :class:`ComponentCase` for every registered component of ``kind`` (or only ``names``; an
    unknown name raises :class:`~lqframe.UnknownComponentError`) and each of its
    ``test_configs()``."""
    reg = _registry(registry)
    chosen = reg.names(kind) if names is None else list(names)
    return [ComponentCase(kind, name, cfg) for name in chosen for cfg in reg.get(kind, name).test_configs()]


def parametrize_components(
    kind: str, argname: str | None = None, registry: Registry | None = None, names: Iterable[str] | None = None
):
    """``pytest.mark.parametrize`` over :func:`component_cases`; the argument (default
    ``"<kind>_case"``) receives a :class:`ComponentCase`, the test id is its :attr:`~ComponentCase.id`."""
    import pytest

    cases = component_cases(kind, registry, names)
    return pytest.mark.parametrize(argname or f"{kind}_case", [pytest.param(c, id=c.id) for c in cases])


def pair_params(
    registry: Registry | None = None,
    quantizers: Iterable[str] | None = None,
    reconstructors: Iterable[str] | None = None,
) -> list:
    """``pytest.param(quantizer_case, reconstructor_case, id="q[…]+r[…]")`` for every pair of a
    quantizer case and a reconstructor case (all registered ones unless names are given)."""
    import pytest

    qs = component_cases("quantizer", registry, quantizers)
    rs = component_cases("reconstructor", registry, reconstructors)
    return [pytest.param(q, r, id=f"{q.id}+{r.id}") for q in qs for r in rs]


def parametrize_pairs(
    argnames: str = "quantizer_case,reconstructor_case",
    registry: Registry | None = None,
    quantizers: Iterable[str] | None = None,
    reconstructors: Iterable[str] | None = None,
):
    """``pytest.mark.parametrize`` over :func:`pair_params` (every quantizer × reconstructor
    configuration pair)."""
    import pytest

    return pytest.mark.parametrize(argnames, pair_params(registry, quantizers, reconstructors))


def devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when ``torch.cuda.is_available()``."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def device_params() -> list:
    """``pytest.param("cpu")`` and ``pytest.param("cuda")``, the latter skipped without CUDA (so
    collected test ids are the same on every machine)."""
    import pytest

    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=no_cuda)]


def parametrize_devices(argname: str = "device"):
    """``pytest.mark.parametrize`` over :func:`device_params`."""
    import pytest

    return pytest.mark.parametrize(argname, device_params())


# =========================================================================== shared helpers


def _component(kind: str, component: Any, config: Mapping[str, Any] | None, registry: Registry | None):
    """An instance of ``kind`` from an instance, a class, a registry name or a ComponentCase."""
    base = KINDS[kind]
    config = dict(config or {})
    if isinstance(component, ComponentCase):
        if component.kind != kind:
            raise TypeError(f"expected a {kind} case, got a {component.kind} case ({component.id})")
        return attrs.evolve(component, config={**component.config, **config}).create(registry)
    if isinstance(component, base):
        if config:
            raise TypeError("config can only be given with a component name or class, not an instance")
        return component
    if isinstance(component, str):
        return _registry(registry).create(kind, component, **config)
    if isinstance(component, type) and issubclass(component, base):
        return component(**config)
    raise TypeError(f"expected a {kind} (instance, class, registry name or ComponentCase), got {component!r}")


def _default_quantizer(registry: Registry | None) -> Quantizer:
    reg = _registry(registry)
    return reg.create("quantizer", "rtn", **reg.get("quantizer", "rtn").test_configs()[0])


def _settings(max_examples: int, parent: hsettings | None) -> hsettings:
    return hsettings(
        parent, max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def _same_device(tensor: torch.Tensor, device: str | torch.device, what: str) -> None:
    assert tensor.device.type == torch.device(device).type, f"{what} is on {tensor.device}, the input on {device}"


def _stored_bits(qw: QuantizedWeight) -> int:
    """Bits actually stored, counted from the serialised tensors (codebooks are format constants)."""
    tensors, _ = qw.to_state()
    return sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if not k.endswith("codebook"))


def _check_packed(qw: QuantizedWeight) -> None:
    codes = qw.unpacked_codes()
    assert codes.shape == tuple(qw.shape)
    if codes.numel():
        assert int(codes.min()) >= 0 and int(codes.max()) < (1 << qw.bits)
    assert qw.codes.dtype == torch.uint8
    assert qw.codes.numel() == packed_nbytes(qw.numel, qw.bits), "codes are not packed at their real bit width"
    assert torch.equal(pack_bits(codes, qw.bits), qw.codes), "pack(unpack(codes)) differs from the stored codes"
    if isinstance(qw.scale, QuantizedWeight):
        _check_packed(qw.scale)


def _assert_same_bytes(a: QuantizedWeight, b: QuantizedWeight, what: str) -> None:
    ta, ha = a.to_state()
    tb, hb = b.to_state()
    assert ha == hb, f"{what}: headers differ: {ha} != {hb}"
    assert ta.keys() == tb.keys(), f"{what}: stored tensors differ: {sorted(ta)} != {sorted(tb)}"
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{what}: {key!r} differs"


def check_qweight(
    qw: QuantizedWeight, shape: tuple[int, int], quantizer: Quantizer, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The properties of one :class:`~lqframe.QuantizedWeight` that ``quantizer`` produced for a
    matrix of ``shape``: logical shape; codes in range and packed at their real bit width (no
    slack), ``pack(unpack(codes))`` the stored bytes (double-quantized scales too); storage bits
    equal to the bits of the serialised tensors and to ``quantizer.storage_bits(shape)``;
    ``to_state``/``from_state`` dequantizing to the same values bit for bit; a finite float32
    dequantization on ``device``. Returns the dequantized tensor."""
    assert tuple(qw.shape) == tuple(shape), f"quantized shape {tuple(qw.shape)} != weight shape {tuple(shape)}"
    _check_packed(qw)
    stored = _stored_bits(qw)
    assert qw.storage_bits() == stored, f"storage_bits() {qw.storage_bits()} != {stored} bits serialised"
    predicted = quantizer.storage_bits(tuple(shape))
    assert predicted == qw.storage_bits(), f"{quantizer!r}.storage_bits({tuple(shape)}) = {predicted}, " \
                                           f"actual {qw.storage_bits()}"
    deq = qw.dequantize()
    assert deq.shape == tuple(shape) and deq.dtype == torch.float32
    assert bool(torch.isfinite(deq).all()), "dequantized values are not finite"
    _same_device(deq, device, "the dequantized weight")
    tensors, header = qw.to_state("layer.")
    again = QuantizedWeight.from_state(tensors, header, "layer.")
    assert torch.equal(again.dequantize(), deq), "to_state/from_state does not reproduce the weight"
    return deq


def _bad_weight(bad: float, device) -> torch.Tensor:
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    w[3, 7] = bad
    return w.to(device)


_NON_FINITE = (float("nan"), float("inf"), float("-inf"))
_EMPTY_SHAPES = ((0, 16), (5, 0), (0, 0))


def _expect_weight_error(call: Callable[[], Any], what: str) -> None:
    try:
        call()
    except WeightError as err:
        message = str(err)
        assert "NaN" in message or "Inf" in message, f"{what}: WeightError does not name NaN/Inf: {message}"
        assert "[3, 7]" in message, f"{what}: WeightError does not give the position [3, 7]: {message}"
    else:
        raise AssertionError(f"{what}: a non-finite weight did not raise lqframe.WeightError")


#: unit roundoff (half the machine epsilon) of each floating dtype
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def check_linear_output(
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    left: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> float:
    """Check an output of the packed linear ``y = x·Wᵀ + (x·Rᵀ)·Lᵀ + b`` computed in ``x.dtype``
    (a kernel, a backend, :class:`~lqframe.LQLinear`) against exact arithmetic.

    ``weight`` is ``Q`` dequantized (out × in). The reference is float64 arithmetic on the operands
    rounded to ``x.dtype`` (``W``, ``L``, ``R``, ``b``), and the allowed error per output element is
    ``(4u + 2k·u₃₂) · (|x|·|W|ᵀ + (|x·Rᵀ| + |x|·|R|ᵀ)·|L|ᵀ + |b|)``: four roundings to the
    activation dtype (unit roundoff ``u``: the intermediate ``x·Rᵀ``, two sums, the result) and a
    float32 accumulation over ``k = in + rank`` terms. A dropped or mis-scaled ``L·R`` exceeds it
    wherever that term is larger than the rounding of the rest. Raises ``AssertionError`` naming the
    worst element; returns the largest error as a fraction of its bound."""
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    w = weight.to(x.device, dt).to(torch.float64)
    exact, bound = x2 @ w.T, x2.abs() @ w.abs().T
    rank = 0
    if left is not None and right is not None and left.shape[1]:
        rank = left.shape[1]
        r, lf = right.to(x.device, dt).to(torch.float64), left.to(x.device, dt).to(torch.float64)
        t = x2 @ r.T
        exact = exact + t @ lf.T
        bound = bound + (t.abs() + x2.abs() @ r.abs().T) @ lf.abs().T
    if bias is not None:
        b = bias.to(x.device, dt).to(torch.float64)
        exact, bound = exact + b, bound + b.abs()
    assert y.dtype == dt, f"output dtype {y.dtype}, activations {dt}"
    assert y.shape == (*x.shape[:-1], weight.shape[0]), f"output shape {tuple(y.shape)}"
    k = x.shape[-1] + rank
    tol = (4 * UNIT_ROUNDOFF[dt] + 2 * k * UNIT_ROUNDOFF[torch.float32]) * bound + 1e-30
    err = (y.reshape(exact.shape).to(torch.float64) - exact).abs()
    if not err.numel():
        return 0.0
    ratio = err / tol
    worst = float(ratio.max())
    where = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
    assert worst <= 1.0, f"output {where} is off by {worst:.2f}× the {dt} rounding bound " \
                         f"(error {float(err[where]):.3g}, bound {float(tol[where]):.3g})"
    return worst


# =========================================================================== quantizers


def check_quantizer(
    quantizer: Any,
    config: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    max_examples: int = 60,
    hypothesis_settings: hsettings | None = None,
) -> None:
    """Check a quantizer.

    On ``max_examples`` generated matrices (with :func:`synthetic_stats` when it ``needs`` any):

    * :func:`check_qweight`: real-bit packing and pack/unpack identity, ``storage_bits()`` = bits
      of the serialised tensors = ``quantizer.storage_bits(shape)``, serialisation round trip;
    * with ``rounds_to_nearest``, every element decoded to the nearest value its block can represent
      (its error at most ``QuantizedWeight.error_bound``, the distance to that value, relative slack
      1e-6): a code one step off anywhere, even where a codebook's gaps are narrowest, fails;
    * ``roundtrip`` (the fast path) equal to ``quantize(...).dequantize()`` (``rtol`` 1e-6);
    * the same bytes again when quantizing the input's float32 value: determinism for float32
      inputs, and float16/bfloat16 inputs quantized exactly as their float32 values.

    Fixed cases: a float16 and a bfloat16 16×70 matrix give the bytes of their float32 values;
    NaN, +Inf and -Inf raise :class:`~lqframe.WeightError` from ``quantize`` and ``roundtrip``,
    naming the first bad position; empty matrices (0×16, 5×0, 0×0) quantize, with exact storage.
    """
    quantizer = _component("quantizer", quantizer, config, registry)

    @_settings(max_examples, hypothesis_settings)
    @given(w=matrices(device=device))
    def quantizer_properties(w):
        w32 = w.float()
        stats = synthetic_stats(*w.shape, quantizer.needs, device=device, registry=registry)
        qw = quantizer.quantize(w, stats)
        deq = check_qweight(qw, tuple(w.shape), quantizer, device)
        if quantizer.rounds_to_nearest:
            bound = qw.error_bound(w32)
            slack = 1e-6 * (w32.abs() + bound) + 1e-30
            excess = float(((w32 - deq).abs() - bound - slack).max())
            assert excess <= 0, f"an element is not rounded to the nearest representable value (error {excess:.3g} " \
                                f"above the nearest value's)"
        torch.testing.assert_close(quantizer.roundtrip(w, stats), deq, rtol=1e-6, atol=0)
        # float32 input: determinism; float16/bfloat16 input: quantized as its exact float32 value
        _assert_same_bytes(quantizer.quantize(w32, stats), qw, f"{w.dtype} input quantized again as float32")

    quantizer_properties()

    for dtype in ("float16", "bfloat16"):
        w = make_matrix(16, 70, "gaussian", dtype, seed=3, device=device)
        stats = synthetic_stats(16, 70, quantizer.needs, device=device, registry=registry)
        _assert_same_bytes(quantizer.quantize(w, stats), quantizer.quantize(w.float(), stats),
                           f"{dtype} input against its float32 value")
    for bad in _NON_FINITE:
        w = _bad_weight(bad, device)
        stats = synthetic_stats(8, 40, quantizer.needs, device=device, registry=registry)
        _expect_weight_error(lambda: quantizer.quantize(w, stats), f"quantize with {bad}")  # noqa: B023
        _expect_weight_error(lambda: quantizer.roundtrip(w, stats), f"roundtrip with {bad}")  # noqa: B023
    for shape in _EMPTY_SHAPES:
        stats = synthetic_stats(*shape, quantizer.needs, device=device, registry=registry)
        qw = quantizer.quantize(torch.zeros(shape, device=device), stats)
        check_qweight(qw, shape, quantizer, device)


# =========================================================================== reconstructors


def _with_rank(recon: ErrorReconstructor, rank: int) -> ErrorReconstructor:
    cls = type(recon)
    return attrs.evolve(recon, rank=rank) if attrs.has(cls) and "rank" in option_names(cls) else recon


def _eckart_young_applies(recon: ErrorReconstructor) -> bool:
    return isinstance(recon, LowRankReconstructor) and recon.method == "exact" and recon.iterations == 1


def _condition(scaling, size: int, device) -> float:
    if scaling is None or size == 0:
        return 1.0
    s = scaling.right(torch.eye(size, dtype=torch.float64, device=device))
    return float(torch.linalg.cond(s))


def _check_eckart_young_once(
    dec: Decomposition, w: torch.Tensor, recon: LowRankReconstructor, stats: LayerStats | None, seed: int
) -> None:
    """``‖S(W − Q − LR)T‖_F² = Σ_{i>r} σ_i(S(W − Q)T)²`` for the returned Q, in the reconstructor's
    own scalings; exact (relative 1e-5) when unscaled, with a slack growing with cond(S)·cond(T)
    (the solve runs in float32) when scaled."""
    n, m = w.shape
    stats_ = stats if stats is not None else LayerStats()
    rows, cols = recon.row_scaling(stats_), recon.column_scaling(stats_)

    def weigh(d: torch.Tensor) -> torch.Tensor:
        if rows is not None:
            d = rows.left(d)
        if cols is not None:
            d = cols.right(d)
        return d

    w64 = w.double()
    delta = w64 - dec.qweight.dequantize().double()
    scaled = weigh(delta)
    sigma = torch.linalg.svdvals(scaled)
    k = min(recon.rank, n, m)
    tail = float((sigma[k:] ** 2).sum())
    err = float((weigh(w64 - dec.dense().double()) ** 2).sum())
    scale = float((scaled**2).sum()) + 1e-30
    slack = 0.0
    if rows is not None or cols is not None:
        # float32 rounding of the factors (unit 2^-24), amplified at most by the scalings' conditioning
        e = 2.0**-24 * _condition(rows, n, w.device) * _condition(cols, m, w.device) * math.sqrt(scale)
        slack = 2 * math.sqrt(tail) * e + e * e
    assert abs(err - tail) <= 1e-5 * scale + 1e-12 + slack, f"error {err} != Eckart-Young tail {tail}"
    if recon.rank >= min(n, m):
        assert err <= 1e-9 * scale + 1e-12 + slack, f"full rank leaves an error {err} (of {scale})"
    # never worse than no correction, and never worse than any other rank-r term we try
    assert err <= scale * (1 + 1e-6) + slack
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, m, generator=g, dtype=torch.float64)
    other = float((weigh(delta - 1e-3 * probe.to(w.device)) ** 2).sum())
    assert err <= other + 1e-6 * scale + slack, f"a random rank-{k} term does better: {other} < {err}"


def _check_lowrank_helps(rec: ErrorReconstructor, w: torch.Tensor, dec: Decomposition, stats: LayerStats) -> None:
    """``weighted_error(W − Q − L·R) ≤ weighted_error(W − Q)`` for the returned Q, up to float32
    rounding of the stored factors (relative 2⁻²⁰ of the error of Q, or of the size of ``L·R``)."""
    if dec.lowrank is None:
        return
    residual = w.double() - dec.qweight.dequantize().double()
    lowrank = dec.lowrank.left.double() @ dec.lowrank.right.double()
    without = rec.weighted_error(residual, stats)
    with_lr = rec.weighted_error(residual - lowrank, stats)
    slack = 2.0**-20 * (without + rec.weighted_error(lowrank, stats)) + 1e-30
    assert with_lr <= without + slack, (
        f"{rec!r}: Q + L·R is further from W than Q alone in the reconstructor's own norm "
        f"({with_lr:.6g} > {without:.6g})")


def check_eckart_young(
    reconstructor: Any = "svd",
    config: Mapping[str, Any] | None = None,
    *,
    quantizer: Any = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    max_examples: int = 60,
    vary_rank: bool = True,
    hypothesis_settings: hsettings | None = None,
) -> None:
    """Check that a low-rank reconstructor reaches the Eckart–Young optimum for the Q it returns.

    Applies to subclasses of :class:`lqframe.lowrank.LowRankReconstructor` with ``method: exact``
    and ``iterations: 1`` (``ValueError`` otherwise); the factors are switched to ``float32`` so
    that their rounding does not count. For ``Δ = W − Q``, ``S``/``T`` the reconstructor's
    ``row_scaling``/``column_scaling`` (identity when None) and ``r`` the rank (drawn from
    0…min(n, m)+2 per example when ``vary_rank``):

    * ``‖S(Δ − LR)T‖_F²`` equals ``Σ_{i>r} σ_i(SΔT)²`` (relative 1e-5 of ``‖SΔT‖_F²`` unscaled; a
      slack for float32 rounding amplified by cond(S)·cond(T) when scaled), and is ~0 at full
      rank;
    * it is never above ``‖SΔT‖_F²`` (no correction) nor above the error of a random small
      rank-r term.

    ``quantizer`` defaults to the first ``test_configs()`` entry of ``rtn``.
    """
    recon = _component("reconstructor", reconstructor, config, registry)
    quantizer = _default_quantizer(registry) if quantizer is None else _component("quantizer", quantizer, None,
                                                                                    registry)
    if not _eckart_young_applies(recon):
        raise ValueError(f"{recon!r}: the Eckart-Young check needs a LowRankReconstructor with method 'exact' "
                         "and iterations 1")
    recon = attrs.evolve(recon, factor_dtype="float32")

    @_settings(max_examples, hypothesis_settings)
    @given(w=matrices(max_rows=20, max_cols=60, device=device), data=st.data())
    def eckart_young(w, data):
        n, m = w.shape
        rec = _with_rank(recon, data.draw(st.integers(0, min(n, m) + 2), label="rank")) if vary_rank else recon
        stats = synthetic_stats(n, m, rec.all_needs(quantizer), device=device, registry=registry)
        dec = rec.decompose(w, quantizer, stats)
        _check_eckart_young_once(dec, w, rec, stats, seed=n * 1000 + m)

    eckart_young()


def check_reconstructor(
    reconstructor: Any,
    config: Mapping[str, Any] | None = None,
    *,
    quantizer: Any = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    max_examples: int = 15,
    vary_rank: bool = True,
    hypothesis_settings: hsettings | None = None,
) -> None:
    """Check a reconstructor together with one quantizer (default: the first ``test_configs()``
    entry of ``rtn``; use :func:`parametrize_pairs` to go through all of them).

    On ``max_examples`` generated matrices, at a rank drawn from 0…min(n, m)+2 when the
    reconstructor has a ``rank`` option and ``vary_rank`` (set with ``attrs.evolve``), with
    :func:`synthetic_stats` for ``reconstructor.all_needs(quantizer)``:

    * the decomposition is ``(n, m)``, finite, float32, on the input's device; its rank is at
      most ``min(rank, n, m)``;
    * its ``qweight`` passes :func:`check_qweight` (packing, exact storage, serialisation);
    * ``reconstructor.lowrank_bits(shape)`` equals the low-rank term's ``storage_bits()``, and the
      decomposition's ``storage_bits()`` is the sum of both parts;
    * ``L·R`` never makes ``Q`` worse: ``reconstructor.weighted_error(W − Q − L·R)`` is at most
      ``weighted_error(W − Q)`` (the norm the reconstructor minimises; Frobenius by default, the
      scaled norm ``‖S·Δ·T‖`` for a ``LowRankReconstructor``), for every reconstructor, whatever
      its method;
    * decomposing again gives the same bytes and the same dense matrix;
    * where it applies (a ``LowRankReconstructor`` with ``method: exact``, ``iterations: 1``) the
      Eckart–Young properties of :func:`check_eckart_young`, on float32 factors.

    Fixed cases: NaN, +Inf, -Inf raise :class:`~lqframe.WeightError` naming the position; empty
    matrices decompose, with exact storage of both parts.
    """
    recon = _component("reconstructor", reconstructor, config, registry)
    quantizer = _default_quantizer(registry) if quantizer is None else _component("quantizer", quantizer, None,
                                                                                    registry)

    @_settings(max_examples, hypothesis_settings)
    @given(w=matrices(device=device), data=st.data())
    def pair_properties(w, data):
        n, m = w.shape
        rec = _with_rank(recon, data.draw(st.integers(0, min(n, m) + 2), label="rank")) if vary_rank else recon
        seed = data.draw(st.integers(0, 99), label="stats")
        stats = synthetic_stats(n, m, rec.all_needs(quantizer), seed=seed, device=device, registry=registry)

        dec = rec.decompose(w, quantizer, stats)
        qw = dec.qweight
        dense = dec.dense()
        assert dense.shape == (n, m) and dense.dtype == torch.float32
        assert bool(torch.isfinite(dense).all()), "the decomposition is not finite"
        _same_device(dense, device, "the decomposition")
        if "rank" in option_names(type(rec)):
            assert dec.rank <= min(rec.rank, n, m), f"rank {dec.rank} above the option {rec.rank}"
        check_qweight(qw, (n, m), quantizer, device)
        lr_bits = 0 if dec.lowrank is None else dec.lowrank.storage_bits()
        assert rec.lowrank_bits((n, m)) == lr_bits, f"lowrank_bits({(n, m)}) = {rec.lowrank_bits((n, m))}, " \
                                                   f"actual {lr_bits}"
        assert dec.storage_bits() == qw.storage_bits() + lr_bits

        # L·R never makes Q worse, in the norm the reconstructor minimises (any method: alternating,
        # randomized, with rounded factors); a random or mis-signed L·R fails here
        _check_lowrank_helps(rec, w.float(), dec, stats)

        # deterministic: the same input gives the same bytes
        dec2 = rec.decompose(w, quantizer, stats)
        _assert_same_bytes(dec2.qweight, qw, "decomposing again")
        assert torch.equal(dec2.dense(), dense), "decomposing again gives a different matrix"

        if _eckart_young_applies(rec):
            ey = rec if rec.factor_dtype == "float32" else attrs.evolve(rec, factor_dtype="float32")
            ey_dec = dec if ey is rec else ey.decompose(w, quantizer, stats)
            _check_eckart_young_once(ey_dec, w, ey, stats, seed=seed)

    pair_properties()

    for bad in _NON_FINITE:
        w = _bad_weight(bad, device)
        stats = synthetic_stats(8, 40, recon.all_needs(quantizer), device=device, registry=registry)
        _expect_weight_error(lambda: recon.decompose(w, quantizer, stats), f"decompose with {bad}")  # noqa: B023
    for shape in _EMPTY_SHAPES:
        stats = synthetic_stats(*shape, recon.all_needs(quantizer), device=device, registry=registry)
        dec = recon.decompose(torch.zeros(shape, device=device), quantizer, stats)
        assert dec.dense().shape == shape
        assert dec.qweight.storage_bits() == quantizer.storage_bits(shape)
        lr_bits = 0 if dec.lowrank is None else dec.lowrank.storage_bits()
        assert recon.lowrank_bits(shape) == lr_bits


# =========================================================================== allocators


def _check_allocation(choices: Any, table: CostTable, budget: float | None) -> dict[str, int]:
    assert isinstance(choices, Mapping), f"allocate must return a mapping, got {type(choices).__name__}"
    assert set(choices) == set(table.layers), f"choices for {sorted(choices)}, layers {sorted(table.layers)}"
    picked = {}
    for i, name in enumerate(table.layers):
        choice = choices[name]
        assert isinstance(choice, Choice), f"{name}: expected a lqframe.Choice, got {choice!r}"
        assert choice.layer == name, f"{name}: the choice names layer {choice.layer!r}"
        assert isinstance(choice.index, int | np.integer) and 0 <= choice.index < len(table.configs), choice
        assert choice == table.choice(i, int(choice.index)), f"{name}: {choice} is not the table's entry"
        assert math.isfinite(choice.cost), f"{name}: an impossible configuration (cost inf) was chosen"
        picked[name] = int(choice.index)
    if budget is not None:
        avg = average_bits(choices, table)
        assert avg <= budget + 1e-9 * max(1.0, abs(budget)), f"{avg} bits/parameter over the budget {budget}"
    return picked


def check_device_placement(
    reconstructor: Any,
    config: Mapping[str, Any] | None = None,
    *,
    quantizer: Any = None,
    registry: Registry | None = None,
    shape: tuple[int, int] = (48, 80),
) -> None:
    """Check that a quantizer × reconstructor pair creates every tensor on the weight's device —
    identity matrices, codebooks, index ranges, scratch buffers — without needing a GPU.

    The weight, its statistics and a compressed :class:`~lqframe.lqlinear.LQLinear` are built on
    the CPU; then statistics accumulation, ``quantize``, ``dequantize``, ``roundtrip``,
    ``decompose``, ``dense`` and the packed forward run with ``torch.device("meta")`` as the
    default device. A tensor made without ``device=`` lands on ``meta`` there, and the first
    operation that mixes it with the CPU data fails, naming the line; on a GPU the same omission
    would put it on the CPU. The results must be CPU tensors equal to the ones made without the
    meta default."""
    from lqframe.lqlinear import LQLinear

    recon = _component("reconstructor", reconstructor, config, registry)
    quant = _component("quantizer", quantizer, None, registry) if quantizer is not None else _default_quantizer(
        registry)
    n, m = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, m, generator=g)
    needs = recon.all_needs(quant)
    stats = synthetic_stats(n, m, needs, registry=registry)
    x = torch.randn(3, m, generator=g)
    reference = recon.decompose(w, quant, stats)
    module = LQLinear.from_decomposition(torch.nn.Linear(m, n, bias=True), reference)
    expected_y = module(x)
    kinds = _registry(registry).statistics()
    forward_needs = {k for k in needs if k in kinds and kinds[k].source == "forward"}
    with torch.device("meta"):
        if forward_needs:
            acc = StatsAccumulator(m, forward_needs, kinds)
            acc.update(x)
            for name, value in acc.finalize().available_items():
                assert value.device.type == "cpu", f"statistic {name} was created on {value.device}"
        qw = quant.quantize(w, stats)
        dense_q = qw.dequantize()
        fast = quant.roundtrip(w, stats)
        dec = recon.decompose(w, quant, stats)
        dense = dec.dense()
        y = module(x)
    for what, t in (("quantize codes", qw.codes), ("dequantize", dense_q), ("roundtrip", fast),
                    ("decompose → dense", dense), ("LQLinear forward", y)):
        assert t.device.type == "cpu", f"{what} came back on {t.device}"
    assert torch.equal(dense, reference.dense()), "decompose gave another result with the meta default device"
    assert torch.equal(y, expected_y), "the packed forward gave another result with the meta default device"


def check_allocator(
    allocator: Any,
    config: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    max_examples: int = 50,
    hypothesis_settings: hsettings | None = None,
) -> None:
    """Check a budget allocator on generated :func:`cost_tables` and budgets (none, between the
    cheapest and the dearest allocation, above every allocation, below the cheapest):

    * the result maps every layer of the table, and nothing else, to a :class:`~lqframe.Choice`
      that is the table's own entry (``table.choice(i, c)``) with a finite cost;
    * its ``average_bits`` is within the budget;
    * it raises :class:`~lqframe.BudgetError` when no allocation fits (a budget below the
      cheapest one, a layer whose every cost is ``inf``), and does not when every allocation fits
      (all costs finite, no budget or one above the dearest allocation); between the two an
      allocator may still refuse (``uniform`` needs one configuration that fits every layer);
    * the same table and budget give the same choices (or the same error) again.

    Fixed cases: an empty table gives an empty allocation; a table without configurations raises
    ``BudgetError``. ``device`` is accepted for a uniform signature; cost tables are numpy arrays.
    """
    del device
    allocator = _component("allocator", allocator, config, registry)

    def allocate(table, budget):
        try:
            return allocator.allocate(table, budget), None
        except BudgetError as err:
            return None, err

    @_settings(max_examples, hypothesis_settings)
    @given(table=cost_tables(), mode=st.sampled_from(["none", "within", "above", "below"]),
           where=st.floats(0.0, 1.0))
    def allocator_properties(table, mode, where):
        finite = np.isfinite(table.cost)
        total = table.total_params
        every_layer_possible = bool(finite.any(axis=1).all())
        budget = None
        if every_layer_possible:
            lo = float(np.where(finite, table.bits, np.inf).min(axis=1).sum()) / total
            hi = float(table.bits.max(axis=1).sum()) / total
            budget = {
                "none": None,
                "within": lo + where * (hi - lo),
                "above": hi * (1 + where),
                "below": lo - max(1e-6 * lo, 1e-6) - where * lo / 2,
            }[mode]
        must_fail = not every_layer_possible or mode == "below"
        must_fit = bool(finite.all()) and mode in ("none", "above")

        choices, err = allocate(table, budget)
        if err is not None:
            assert not must_fit, f"BudgetError although every allocation fits the budget {budget}: {err}"
            again, err2 = allocate(table, budget)
            assert again is None and err2 is not None, "the same table and budget raise only once"
            return
        assert not must_fail, f"no allocation fits the budget {budget}, yet allocate returned {choices}"
        picked = _check_allocation(choices, table, budget)
        again, err2 = allocate(table, budget)
        assert err2 is None and _check_allocation(again, table, budget) == picked, "allocation is not deterministic"

    allocator_properties()

    empty = CostTable(layers=(), configs=({"config": 0},), cost=np.zeros((0, 1)), bits=np.zeros((0, 1)), numel=[])
    for budget in (None, 4.0):
        choices = allocator.allocate(empty, budget)
        assert isinstance(choices, Mapping) and len(choices) == 0, f"an empty table gave {choices}"
    no_configs = CostTable(layers=("layer",), configs=(), cost=np.zeros((1, 0)), bits=np.zeros((1, 0)), numel=[64])
    for budget in (None, 4.0):
        _, err = allocate(no_configs, budget)
        assert err is not None, "a table without configurations must raise BudgetError"


# =========================================================================== objectives


def _student_needs(objective: Any) -> frozenset[str]:
    own = getattr(objective, "student_needs", None)
    return frozenset(own()) if callable(own) else frozenset()


def check_objective(
    objective: Any,
    config: Mapping[str, Any] | None = None,
    *,
    inputs: Callable[[int, str | torch.device], tuple[Mapping, Mapping, Any]] | None = None,
    discrepancy: bool = True,
    expect_zero: bool = True,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    max_examples: int = 20,
    hypothesis_settings: hsettings | None = None,
) -> None:
    """Check a loss objective.

    ``inputs(seed, device)`` returns ``(student, teacher, batch)``; by default
    :func:`synthetic_outputs` for the names in the objective's ``needs`` (``{"logits"}`` when it
    needs none), with drawn batch, sequence and width sizes and noise levels. For every example:

    * ``loss(student, teacher, batch)`` is a 0-dim, finite, floating-point tensor on ``device``;
    * it is differentiable with respect to the student tensors: it requires grad, at least one
      student tensor gets a gradient, gradients are finite and not all zero;
    * the inputs are not modified, and the same inputs give the same value again.

    With ``discrepancy`` (a loss measuring how far the student is from the teacher), the loss at
    ``student = teacher`` is not above the loss at the drawn student, and with ``expect_zero`` it is
    0 (absolute 1e-6); use ``expect_zero=False`` for losses whose minimum is not 0 (a cross-entropy
    against soft teacher targets: the teacher's entropy).
    """
    objective = _component("objective", objective, config, registry)
    names = sorted(frozenset(objective.needs) | _student_needs(objective)) or ["logits"]

    @_settings(max_examples, hypothesis_settings)
    @given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), seq=st.integers(2, 8),
           width=st.integers(2, 32), noise=st.floats(1e-3, 1.0))
    def objective_properties(seed, batch, seq, width, noise):
        if inputs is None:
            student, teacher, data = synthetic_outputs(names, seed, batch=batch, seq=seq, width=width, noise=noise,
                                                       device=device)
        else:
            student, teacher, data = inputs(seed, device)
        keep_student = {k: v.detach().clone() for k, v in student.items()}
        keep_teacher = {k: v.detach().clone() for k, v in teacher.items()}
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in student.items()}

        loss = objective.loss(leaves, teacher, data)
        assert isinstance(loss, torch.Tensor), f"loss must be a tensor, got {type(loss).__name__}"
        assert loss.dim() == 0, f"loss must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}"
        assert loss.is_floating_point() and bool(torch.isfinite(loss)), f"loss is not a finite float: {loss}"
        _same_device(loss, device, "the loss")
        assert loss.requires_grad, "loss is not differentiable with respect to the student outputs"
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        present = [g for g in grads if g is not None]
        assert present, "no student tensor receives a gradient"
        assert all(bool(torch.isfinite(g).all()) for g in present), "gradients are not finite"
        assert any(bool(g.ne(0).any()) for g in present), "every gradient is zero away from the teacher"
        for k, v in keep_teacher.items():
            assert torch.equal(teacher[k], v), f"loss modified teacher[{k!r}]"
        for k, v in keep_student.items():
            assert torch.equal(leaves[k].detach(), v), f"loss modified student[{k!r}]"

        value = float(loss.detach())
        again = objective.loss({k: v.detach() for k, v in leaves.items()}, teacher, data)
        assert float(again.detach()) == value, f"the same inputs give {value}, then {float(again.detach())}"
        if discrepancy:
            same = {k: teacher[k].detach().clone() if k in teacher else v.detach() for k, v in leaves.items()}
            at_teacher = float(objective.loss(same, teacher, data).detach())
            assert at_teacher <= value + 1e-6 * (1 + abs(value)), \
                f"loss at student = teacher ({at_teacher}) above the loss away from it ({value})"
            if expect_zero:
                assert abs(at_teacher) <= 1e-6, f"loss at student = teacher is {at_teacher}, not 0"

    objective_properties()

