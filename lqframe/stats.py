"""Calibration statistics: the kinds a component can ask for, how each is computed and merged, and
the store the run engine fills.

A **statistic kind** is a named per-input quantity with an explicit *merge rule* (``sum`` or
``max``), so partial statistics gathered over different batches — or, later, different processes
(``torch.distributed.all_reduce`` with ``SUM`` / ``MAX``) — combine into exactly the value one pass
over all the data would give. Kinds come from one of two *sources*:

``forward``
    computed by a forward hook from the layer's input activations ``x`` (tokens × in_features),
    in float64: ``rxx`` = Σ xxᵀ, ``sq_sum`` = Σ x², ``abs_sum`` = Σ |x|, ``abs_mean_max`` = the
    running max over batches of the per-batch mean |x| (LQER's statistic).
``gradient``
    computed from a backward pass (``fisher`` = Σ grad(W)² per calibration window, LQ-LoRA's
    weighting, produced by :func:`lqframe.fisher.empirical_fisher`). A gradient kind has no forward
    function; the engine produces it with the kind's *producer* and refuses, at planning time, a
    plan that needs a gradient kind without one.

Plugins add kinds with ``registry.add_statistic(StatisticKind(...))`` in their ``lqframe_register``
hook; a quantizer or reconstructor then lists the name in its ``needs`` and finds the value in
``LayerStats.get(name)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch

from lqframe.errors import MissingStatisticError
from lqframe.fisher import empirical_fisher
from lqframe.types import STAT_NAMES, LayerStats

__all__ = ["StatisticKind", "BUILTIN_STATISTICS", "StatsAccumulator", "StatsStore", "MERGE_RULES"]

#: how two partial values of a statistic combine (and which all-reduce op does it across processes)
MERGE_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add,
    "max": torch.maximum,
}


@attrs.frozen
class StatisticKind:
    """One statistic: ``compute(x64)`` maps a float64 batch (tokens × in_features) to this batch's
    partial value; partial values combine with ``merge`` (``sum`` or ``max``)."""

    name: str
    merge: str = attrs.field(validator=attrs.validators.in_(tuple(MERGE_RULES)))
    compute: Callable[[torch.Tensor], torch.Tensor] | None = None
    source: str = attrs.field(default="forward", validator=attrs.validators.in_(("forward", "gradient")))
    #: gradient kinds: ``produce(context) -> {layer name: value}``, where ``context`` is the run
    #: engine's :class:`~lqframe.engine.GradientContext` (model, calibration windows, device, layers).
    #: None: nothing installed can produce it, and a plan that needs it is refused.
    produce: Callable[[Any], Mapping[str, torch.Tensor]] | None = None
    doc: str = ""

    def __attrs_post_init__(self) -> None:
        if self.source == "forward" and self.compute is None:
            raise ValueError(f"statistic {self.name!r}: a forward statistic needs a compute function")


BUILTIN_STATISTICS: tuple[StatisticKind, ...] = (
    # float64 products, not only a float64 sum: with float32 per-batch products (QERA's reference)
    # gptq4 + qera-exact r32 on the default model gives 12.73 instead of 12.61, because S⁻¹
    # amplifies the rounding in the small-eigenvalue directions of E[xxᵀ]
    StatisticKind("rxx", "sum", lambda x: x.T @ x, doc="Σ xxᵀ (m×m): GPTQ, QERA-exact"),
    StatisticKind("sq_sum", "sum", lambda x: (x * x).sum(0), doc="Σ x² per channel: QERA-approx"),
    StatisticKind("abs_sum", "sum", lambda x: x.abs().sum(0), doc="Σ |x| per channel"),
    StatisticKind("abs_mean_max", "max", lambda x: x.abs().mean(0),
                  doc="max over batches of the batch mean |x| per channel: LQER"),
    StatisticKind("fisher", "sum", source="gradient", produce=empirical_fisher,
                  doc="Σ grad(W)² (n×m) over the calibration windows: Fisher-weighted LQ-LoRA"),
)
assert {k.name for k in BUILTIN_STATISTICS} == STAT_NAMES


def _kinds(kinds: Mapping[str, StatisticKind] | None) -> Mapping[str, StatisticKind]:
    """The kinds given, or the built-in ones (the engine passes ``registry().statistics()``, which
    adds the kinds plugins define)."""
    return kinds if kinds is not None else {k.name: k for k in BUILTIN_STATISTICS}


class StatsAccumulator:
    """Accumulates exactly the *forward* statistics in ``needs`` from batches of activations, in
    float64 (gradient statistics are ignored here: they come from a gradient pass)."""

    def __init__(self, in_features: int, needs: Iterable[str], kinds: Mapping[str, StatisticKind] | None = None):
        kinds = _kinds(kinds)
        needs = frozenset(needs)
        unknown = needs - set(kinds)
        if unknown:
            raise MissingStatisticError(f"unknown statistics {sorted(unknown)}; known: {sorted(kinds)}")
        self.in_features = in_features
        self.kinds = {n: kinds[n] for n in sorted(needs) if kinds[n].source == "forward"}
        self.needs = frozenset(self.kinds)
        self.n_tokens = 0
        self._acc: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor) -> None:
        # -1 is ambiguous for a zero-element tensor: give the row count explicitly
        x = x.reshape(math.prod(x.shape[:-1]), 0) if self.in_features == 0 else x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        x64 = x.detach().to(torch.float64)
        self.n_tokens += x64.shape[0]
        for name, kind in self.kinds.items():
            value = kind.compute(x64).to(torch.float64)
            self._acc[name] = MERGE_RULES[kind.merge](self._acc[name], value) if name in self._acc else value

    def merge(self, other: StatsAccumulator) -> None:
        """Combine another accumulator's partial statistics into this one (same needs)."""
        if other.needs != self.needs or other.in_features != self.in_features:
            raise ValueError("can only merge accumulators of the same statistics and width")
        self.n_tokens += other.n_tokens
        for name, value in other._acc.items():
            mine = self._acc.get(name)
            self._acc[name] = value.clone() if mine is None else MERGE_RULES[self.kinds[name].merge](mine, value)

    def state(self) -> dict[str, torch.Tensor]:
        """The partial values (plus ``n_tokens``) as tensors: what an all-reduce would combine."""
        return {"n_tokens": torch.tensor(self.n_tokens, dtype=torch.int64), **self._acc}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from ``state`` (another accumulator's :meth:`state`), replacing what this one holds."""
        self.n_tokens = int(state["n_tokens"])
        self._acc = {k: v for k, v in state.items() if k != "n_tokens"}

    def isotropic(self) -> LayerStats:
        """The statistics of the identity batch (``in_features`` tokens, token i = the i-th unit
        vector): ``rxx = I``, ``sq_sum = abs_sum = 1`` per channel, any plugin kind computed on those
        tokens. With them every built-in data-aware component reduces to its data-free form (GPTQ to
        round-to-nearest, QERA to the plain SVD of the error): the data-free fallback of a layer that
        saw too few tokens. This accumulator is left as it was."""
        m = self.in_features
        values: dict[str, torch.Tensor] = {}
        if "rxx" in self.kinds:
            values["rxx"] = torch.eye(m, dtype=torch.float64)
        others = {n: k for n, k in self.kinds.items() if n != "rxx"}
        step = max(1, min(m, 2**22 // max(m, 1)))  # identity rows a few MiB at a time
        for lo in range(0, m, step):
            count = min(step, m - lo)
            rows = torch.zeros(count, m, dtype=torch.float64)
            rows[torch.arange(count), torch.arange(lo, lo + count)] = 1.0
            for name, kind in others.items():
                value = kind.compute(rows).to(torch.float64)
                values[name] = MERGE_RULES[kind.merge](values[name], value) if name in values else value
        builtin = {k: v for k, v in values.items() if k in STAT_NAMES}
        extra = {k: v for k, v in values.items() if k not in STAT_NAMES}
        return LayerStats(n_tokens=m, extra=extra, **builtin)

    def finalize(self) -> LayerStats:
        builtin = {k: v for k, v in self._acc.items() if k in STAT_NAMES}
        extra = {k: v for k, v in self._acc.items() if k not in STAT_NAMES}
        return LayerStats(n_tokens=self.n_tokens, extra=extra, **builtin)


class StatsStore:
    """Statistics of every captured input, keyed by input (the linears reading one tensor share one
    entry: ``key_of[layer]``). Filled by the block executor's hooks (forward kinds) and by gradient
    producers (gradient kinds, per layer); read by the decompose and allocate stages."""

    def __init__(self, kinds: Mapping[str, StatisticKind] | None = None):
        self.kinds = dict(_kinds(kinds))
        self.inputs: dict[str, StatsAccumulator] = {}
        self.key_of: dict[str, str] = {}
        self.gradient: dict[str, dict[str, torch.Tensor]] = {}
        self._final: dict[str, LayerStats] = {}

    def accumulator(self, key: str, layers: Iterable[str], in_features: int, needs: Iterable[str]) -> StatsAccumulator:
        acc = StatsAccumulator(in_features, needs, self.kinds)
        self.inputs[key] = acc
        self._final.pop(key, None)
        for layer in layers:
            self.key_of[layer] = key
        return acc

    def add_gradient(self, layer: str, name: str, value: torch.Tensor) -> None:
        kind = self.kinds[name]
        mine = self.gradient.setdefault(layer, {}).get(name)
        self.gradient[layer][name] = value if mine is None else MERGE_RULES[kind.merge](mine, value)

    def __contains__(self, layer: str) -> bool:
        return layer in self.key_of

    def layer_stats(self, layer: str) -> LayerStats | None:
        """The layer's statistics. Layers reading one input get one shared object (finalized once,
        so quantities derived from it with ``LayerStats.cached`` are shared), unless they have
        gradient statistics of their own."""
        key = self.key_of.get(layer)
        if key is None and layer not in self.gradient:
            return None
        if key is None:
            stats = LayerStats()
        else:
            if key not in self._final:
                self._final[key] = self.inputs[key].finalize()
            stats = self._final[key]
        return self._with_gradients(layer, stats)

    def _with_gradients(self, layer: str, stats: LayerStats) -> LayerStats:
        """``stats`` plus the layer's own gradient statistics (a new object when it has any)."""
        grads = self.gradient.get(layer, {})
        if grads:
            builtin = {k: v for k, v in grads.items() if k in STAT_NAMES}
            extra = {**stats.extra, **{k: v for k, v in grads.items() if k not in STAT_NAMES}}
            stats = attrs.evolve(stats, extra=extra, memo={}, **builtin)
        return stats

    def tokens(self, layer: str) -> int | None:
        """How many tokens the layer's forward statistics cover (None: it has none)."""
        key = self.key_of.get(layer)
        return None if key is None else self.inputs[key].n_tokens

    def isotropic_stats(self, layer: str) -> LayerStats:
        """The layer's statistics with the forward ones replaced by the identity batch's
        (:meth:`StatsAccumulator.isotropic`), its gradient statistics kept."""
        return self._with_gradients(layer, self.inputs[self.key_of[layer]].isotropic())

    def drop(self, layers: Iterable[str]) -> None:
        """Forget the statistics of finished layers (an input's entry goes with its last reader)."""
        for layer in layers:
            key = self.key_of.pop(layer, None)
            self.gradient.pop(layer, None)
            if key is not None and key not in self.key_of.values():
                self.inputs.pop(key, None)
                self._final.pop(key, None)

    def state(self) -> dict[str, Any]:
        return {key: acc.state() for key, acc in self.inputs.items()}
