"""The run engine: a table of stages, each one function over one :class:`RunState`.

::

    baseline   float perplexity before anything changes      (evaluate_stage.float_baseline)
    teacher    the float model's outputs on the tuning        (tune_stage)
               windows, once, before any layer is replaced
    calibrate  block-0 inputs; gradient statistics; a float   (quantize_stage; the full pass only
               pass filling the statistics store for a         when the allocate stage is
               data-aware allocation                           data-aware)
    allocate   cost table over candidates → BudgetAllocator   (allocate_stage)
    decompose  per block: capture → decompose → propagate     (quantize_stage, reconstruct_stage)
    tune       train L, R with Q frozen                       (tune_stage)
    evaluate   perplexity on held-out windows, on the device  (evaluate_stage)
    save       checkpoint (the run's sink decides where)      (save_stage)

``lqframe run``, :func:`lqframe.compress` and the benchmark scripts all call :func:`execute`; a
new stage is one :class:`Stage` entry in :data:`STAGES` plus its recipe spec. The per-block work is
done by :class:`~lqframe.executor.BlockExecutor`, which owns devices, offloading, sources and sinks.

Planning happens before any stage runs (:func:`prepare`): every statistic a component needs must
be one that something can produce — a forward statistic captured by hooks, or a gradient
statistic whose producer is installed — or the plan is refused with the layer and component named.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from lqframe.distributed import SINGLE, Group
from lqframe.errors import ModelError, RecipeError
from lqframe.executor import BlockExecutor, BlockSink, BlockSource, MemorySink, offloaded
from lqframe.lqlinear import set_weight_cache
from lqframe.numerics import precision_dtype
from lqframe.pipeline import (
    LayerPlan,
    LayerResult,
    allocation_needs,
    components,
    cost_table,
    coverage,
    decompose_candidate,
    decompose_layer,
    layer_needs,
    plan_layers,
    set_module,
    summarize,
    untargeted_warning,
)
from lqframe.recipe import Recipe
from lqframe.registry import registry
from lqframe.stats import StatsStore
from lqframe.structure import routing_all, unfold
from lqframe.types import Decomposition

__all__ = ["RunState", "Stage", "STAGES", "GradientContext", "prepare", "execute", "COMPRESSION_STAGES"]


@attrs.define(eq=False)
class GradientContext:
    """What a gradient-statistic producer gets: the model (on ``device``), the calibration windows
    and the layers that need the statistic."""

    model: nn.Module
    #: the windows to sum over: all of them, or under torchrun this process's share (the engine
    #: merges the processes' results in rank order with the statistic's merge rule)
    calibration: torch.Tensor
    device: torch.device
    layers: list[str]
    progress: bool = True


@attrs.define(eq=False)
class RunState:
    """Everything a run knows; stages read and extend it."""

    recipe: Recipe
    model: nn.Module
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    offload: bool = False
    calibration: torch.Tensor | None = None
    #: evaluation windows per source (the first source gives ``fp_ppl`` / ``ppl``); a bare tensor is
    #: one unnamed source
    evaluation: Mapping[str, torch.Tensor] | torch.Tensor | None = None
    task: str = "causal-lm"
    #: blocks whose float outputs (on the float model's own inputs) a later stage needs as targets
    teacher_blocks: frozenset[int] = frozenset()
    sink: BlockSink = attrs.field(factory=MemorySink)
    #: where the blocks come from (None: the model in memory); a streaming source holds them on disk
    source: BlockSource | None = None
    #: the processes of the run (lqframe.distributed; one unless started by torchrun)
    group: Group = SINGLE
    #: where the activations between blocks live: auto (cpu with offload, else device), device, cpu,
    #: disk (files in the run's progress folder, else a temporary folder)
    activations: str = "auto"
    progress: bool = True
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
    # -- filled by prepare() and the stages
    executor: BlockExecutor | None = None
    plans: list[LayerPlan] = attrs.field(factory=list)
    needs: dict[str, frozenset[str]] = attrs.field(factory=dict)
    #: per layer, the statistics any allocation candidate needs (planned once: it builds every candidate)
    alloc_needs: dict[str, frozenset[str]] = attrs.field(factory=dict)
    stats: StatsStore = attrs.field(factory=lambda: StatsStore(registry().statistics()))
    inputs: list[torch.Tensor] | None = None
    start_block: int = 0
    prepared: dict[str, tuple[Decomposition, float]] = attrs.field(factory=dict)
    teacher: dict[int, list[torch.Tensor]] = attrs.field(factory=dict)
    results: list[LayerResult] = attrs.field(factory=list)
    #: perplexity per evaluation source, float model and compressed model
    fp_ppls: dict[str, float] = attrs.field(factory=dict)
    ppls: dict[str, float] = attrs.field(factory=dict)
    timings: dict[str, float] = attrs.field(factory=dict)
    #: what the allocate stage chose and what it cost (report.json ``allocation``)
    allocation: dict[str, Any] | None = None
    #: the tune stage's training and validation windows (``.train``, ``.validation``: (n, seq_len))
    tuning: Any = None
    objectives: Any = None
    teacher_store: Any = None
    #: what the tune stage did (report.json ``tuning``)
    tuned: dict[str, Any] | None = None
    #: what the plan compresses and what it leaves in float (pipeline.coverage; report.json ``coverage``)
    coverage: dict[str, Any] | None = None
    #: ``quantize_stage.from``: each imported layer's fixed quantizer (lqframe.imports)
    imported: dict[str, Any] = attrs.field(factory=dict)

    @property
    def min_tokens(self) -> int:
        """The fewest calibration tokens a layer's statistics may cover before it falls back to a
        data-free decomposition (``quantize_stage.experts.min_tokens``)."""
        total = 0 if self.calibration is None else int(self.calibration.numel())
        return self.recipe.quantize.experts.threshold(total) if self.recipe.quantize is not None else 0

    @property
    def streaming(self) -> bool:
        """The blocks are streamed from disk (the model as a whole is never in memory)."""
        return self.source is not None and self.source.streams

    @property
    def uses_data(self) -> bool:
        return self.calibration is not None and len(self.calibration) > 0

    def evaluation_sets(self) -> dict[str, torch.Tensor]:
        if self.evaluation is None:
            return {}
        if isinstance(self.evaluation, torch.Tensor):
            return {"eval": self.evaluation}
        return dict(self.evaluation)

    def _first(self, values: dict[str, float]) -> float | None:
        first = next(iter(self.evaluation_sets()), None)
        return values.get(first) if first is not None else next(iter(values.values()), None)

    @property
    def fp_ppl(self) -> float | None:
        """The float perplexity on the first evaluation source."""
        return self._first(self.fp_ppls)

    @property
    def ppl(self) -> float | None:
        """The compressed model's perplexity on the first evaluation source."""
        return self._first(self.ppls)


@attrs.frozen
class Stage:
    """``run(state)`` when ``enabled(recipe)``; ``recipe_keys`` name the recipe stages that turn it on."""

    name: str
    recipe_keys: tuple[str, ...]
    enabled: Callable[[Recipe], bool]
    run: Callable[[RunState], None]


# --------------------------------------------------------------------------- planning


def _data_aware_allocation(state: RunState) -> bool:
    return any(state.alloc_needs.values())


def _all_needs(state: RunState, layer: str) -> frozenset[str]:
    """What the layer's own components and its allocation candidates need."""
    return state.needs[layer] | state.alloc_needs.get(layer, frozenset())


def prepare(state: RunState) -> RunState:
    """Plan the layers, check that every statistic they need can be produced, and place the
    model on the device."""
    recipe = state.recipe
    found = unfold(state.model)  # (a streamed model is unfolded when it is loaded)
    if found:
        kinds = sorted(set(found.values()))
        state.log("unfolded into linears: " + ", ".join(
            f"{sum(k == kind for k in found.values())} {_UNFOLD_WORDS[kind]}" for kind in kinds))
    state.plans = plan_layers(state.model, recipe)
    if recipe.quantize is not None and recipe.quantize.source is not None:
        _import(state)
    state.needs = {p.name: layer_needs(p) for p in state.plans}
    state.alloc_needs = allocation_needs(recipe, state.plans)
    if state.plans:
        state.coverage = coverage(state.model, state.plans)
        warning = untargeted_warning(state.coverage)
        if warning:
            state.log(warning)
    kinds = registry().statistics()
    for plan in state.plans:
        for name in sorted(_all_needs(state, plan.name)):
            kind = kinds.get(name)
            who = f"layer {plan.name} ({plan.quantizer.name} + {plan.reconstructor.name})"
            if kind is None:
                raise RecipeError(f"{recipe.origin}: {who} needs the statistic {name!r}, which no installed plugin "
                                  f"defines (known: {', '.join(sorted(kinds))})")
            if kind.source == "gradient" and kind.produce is None:
                raise RecipeError(f"{recipe.origin}: {who} needs the statistic {name!r}, which comes from a gradient "
                                  "pass, and no installed plugin produces it")
    if any(state.needs.values()) or _data_aware_allocation(state):
        if not state.uses_data:
            names = sorted({p.reconstructor.name for p in state.plans} | {p.quantizer.name for p in state.plans})
            raise RecipeError(f"{recipe.origin}: the components {names} need calibration statistics, but no "
                              "calibration windows were given (data.calibration_windows is 0)")
    if recipe.tune is not None:
        if state.tuning is None:
            raise RecipeError(f"{recipe.origin}: tune_stage: no tuning windows were given (lqframe run makes them "
                              "from tune_stage.data; lqframe.compress takes tuning=...)")
        if state.task != "causal-lm":
            raise RecipeError(f"{recipe.origin}: tune_stage: the objectives train a causal LM, and this is a "
                              f"{state.task} model")
        if recipe.reconstruct is None:
            raise RecipeError(f"{recipe.origin}: tune_stage: no layer has a low-rank term to train (there is no "
                              "reconstruct_stage); add one with a rank, e.g. {reconstructor: {name: svd, rank: 32}}")
        from lqframe.tune import Objectives

        state.objectives = Objectives.from_stage(recipe.tune)
    if recipe.evaluate is not None and state.evaluation is not None and state.task != "causal-lm":
        raise RecipeError(f"{recipe.origin}: evaluate_stage: token perplexity needs a causal LM, and this is a "
                          f"{state.task} model; remove evaluate_stage to compress it")
    if state.streaming:
        _check_streamable(state)
    if state.group.active:
        _check_distributable(state)
    precision = recipe.quantize.precision if recipe.quantize is not None else "float64"
    activations = state.activations if state.activations != "auto" else "cpu" if state.offload else "device"
    work = state.sink.work_dir()
    scratch = None
    if activations == "disk" and work is not None:
        scratch = work / f"activations-{state.group.rank}"
        shutil.rmtree(scratch, ignore_errors=True)  # a killed run's (a resumed one reads the sink's inputs)
    state.executor = BlockExecutor(state.model, state.device, offload=state.offload, activations=activations,
                                   progress=state.progress, precision=precision_dtype(precision),
                                   source=state.source, group=state.group, scratch=scratch)
    state.executor.place_model()
    return state


_UNFOLD_WORDS = {"experts": "fused experts modules (one linear per expert matrix)",
                 "conv1d": "Conv1D layers (as nn.Linear with the transposed weight)"}


def _routing(state: RunState, probe: bool = False):
    """Which tokens the experts compute on: every calibration token while statistics are captured
    with ``experts.calibration: all``, the routed ones otherwise. ``probe`` (finding which linears
    share an input): every expert on every token, so that every expert is reached on any window
    and the groups do not depend on the window (under torchrun each process probes its own)."""
    everyone = state.recipe.quantize.experts.calibration == "all"
    return routing_all(state.model, "all" if everyone else "each" if probe else None)


def _falls_back(state: RunState, name: str) -> bool:
    """The layer's forward statistics cover fewer tokens than ``quantize_stage.experts.min_tokens``
    (an expert the router seldom chose): it is decomposed data-free."""
    tokens = state.stats.tokens(name)
    return tokens is not None and tokens < state.min_tokens


def _layer_stats(state: RunState, name: str):
    """The layer's statistics for decomposing it: its own, or the data-free ones
    (:meth:`lqframe.stats.StatsStore.isotropic_stats`) when it :func:`_falls_back`."""
    return state.stats.isotropic_stats(name) if _falls_back(state, name) else state.stats.layer_stats(name)


def _import(state: RunState) -> None:
    """``quantize_stage.from``: read the checkpoint's Q, keep the plans of the layers it quantized (the
    others stay as they are), and check every shape against the model."""
    from lqframe.imports import FixedQuantizer, read_quantized

    source = state.recipe.quantize.source
    fmt, layers = read_quantized(source)
    planned = {p.name for p in state.plans}
    outside = sorted(n for n in layers if n not in planned)
    for name in sorted(layers):
        if name not in planned:
            continue
        weight = state.model.get_submodule(name).weight
        if tuple(weight.shape) != tuple(layers[name].shape):
            raise RecipeError(f"{state.recipe.origin}: quantize_stage.from: layer {name} is "
                              f"{tuple(layers[name].shape)} in {source} and {tuple(weight.shape)} in the model: "
                              "it was not made from this model")
    state.plans = [p for p in state.plans if p.name in layers]
    if not state.plans:
        raise RecipeError(f"{state.recipe.origin}: quantize_stage.from: {source} quantizes none of the targeted "
                          f"layers (it has {', '.join(sorted(layers)[:3])} …)")
    state.imported = {p.name: FixedQuantizer(layers[p.name], fmt) for p in state.plans}
    state.log(f"Q of {len(state.imported)} layers read from the {fmt} checkpoint {source} (the recipe's quantizer is "
              "not used)"
              + (f"; {len(outside)} of its quantized layers are outside the targets and stay as the model has them "
                 f"({', '.join(outside[:3])})" if outside else ""))


def _whole_model_work(state: RunState) -> tuple[str, str] | None:
    """The first stage of the plan that works on every layer at once — ``(name, why)`` — or None:
    tuning, allocation, a gradient statistic."""
    if state.recipe.tune is not None:
        return "tune_stage", "trains every block's L and R together (a backward pass through the whole model)"
    if state.recipe.allocate is not None:
        return "allocate_stage", "builds its cost table from every layer of the resident model"
    kinds = registry().statistics()
    gradient = sorted({n for p in state.plans for n in _all_needs(state, p.name) if kinds[n].source == "gradient"})
    if gradient:
        return f"the statistic(s) {gradient}", "come from a gradient pass through the whole model"
    return None


def _check_streamable(state: RunState) -> None:
    """What needs the whole model at once cannot run on a streamed one: say which stage, and how."""
    work = _whole_model_work(state)
    if work:
        raise RecipeError(f"{state.recipe.origin}: a streamed model (stream: true, or auto with a model larger than "
                          f"memory) is never in memory as a whole, and {work[0]} {work[1]}; run it resident "
                          "(stream: false) on a machine with the memory, or leave that stage out")


def _check_distributable(state: RunState) -> None:
    """Every process needs at least one calibration window of its own."""
    n = len(state.calibration) if state.uses_data else None
    if n is not None and n < state.group.world:
        raise RecipeError(f"{state.recipe.origin}: {n} calibration windows cannot be shared by {state.group.world} "
                          "processes: use at least one window per process")


def _own(state: RunState, windows: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of ``windows``."""
    lo, hi = state.group.bounds(len(windows))
    return windows[lo:hi]


# --------------------------------------------------------------------------- stages


def _baseline(state: RunState) -> None:
    sets = state.evaluation_sets()
    todo = [s for s in sets if s not in state.fp_ppls]  # (a resumed run has them)
    if todo or not sets:
        state.fp_ppls.update(_perplexities(state, "float perplexity", todo))
        state.log("float perplexity: " + ", ".join(f"{v:.4f} ({s})" for s, v in state.fp_ppls.items()))


def _perplexities(state: RunState, desc: str, sources: Sequence[str] | None = None) -> dict[str, float]:
    """Perplexity of the model as it is now on each evaluation source (``sources``: just these)."""
    from lqframe.evaluate import perplexity

    every = state.evaluation_sets()
    if not every:  # (a model that is no causal LM was refused by prepare)
        raise RecipeError(f"{state.recipe.origin}: evaluate_stage: no evaluation windows were given")
    sets = every if sources is None else {s: every[s] for s in sources}
    label = {s: f"{desc} ({s})" if len(every) > 1 else desc for s in sets}
    if state.streaming:  # block by block over all windows (lqframe.streaming)
        from lqframe.streaming import streamed_window_nlls

        return {source: _gathered(state, windows, lambda own, s=source: streamed_window_nlls(
            state.executor, own, progress=state.progress, desc=label[s])) for source, windows in sets.items()}
    set_weight_cache(state.model, True)  # each Q dequantized once for all windows
    out = {}
    try:
        # offloading hooks installed once for all sources
        with offloaded(state.model, state.device) if state.offload else contextlib.nullcontext():
            for source, windows in sets.items():
                if state.group.active:
                    from lqframe.evaluate import window_nlls

                    out[source] = _gathered(state, windows, lambda own, s=source: window_nlls(
                        state.model, own, state.progress, label[s]))
                else:
                    out[source] = perplexity(state.model, windows, progress=state.progress, desc=label[source])
    finally:
        set_weight_cache(state.model, False)
    return out


def _gathered(state: RunState, windows: torch.Tensor, nlls) -> float:
    """Perplexity over ``windows`` from ``nlls(share)`` (each window's NLL): each process computes
    its share, and the values are added in window order, as one process adds them."""
    from lqframe.evaluate import perplexity_from

    total = torch.zeros((), dtype=torch.float64)
    own = _own(state, windows)
    for value in (v for part in state.group.gather(nlls(own) if len(own) else []) for v in part):
        total += value
    return perplexity_from(float(total), windows.shape[0] * (windows.shape[1] - 1))


def _gradient_statistics(state: RunState) -> None:
    kinds = registry().statistics()
    wanted: dict[str, list[str]] = {}
    for plan in state.plans:
        for name in _all_needs(state, plan.name):
            if kinds[name].source == "gradient":
                wanted.setdefault(name, []).append(plan.name)
    if not wanted:
        return
    with _backward_device(state) as device:
        for name, layers in wanted.items():
            t0 = time.perf_counter()
            # each process its share of the windows; the shares' results merged in rank order
            ctx = GradientContext(state.model, _own(state, state.calibration), device, layers, state.progress)
            values = _merged(state, kinds[name], kinds[name].produce(ctx))
            for layer, value in values.items():
                state.stats.add_gradient(layer, name, value)
            state.timings[f"gradient:{name}"] = time.perf_counter() - t0


def _merged(state: RunState, kind, mine: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A gradient statistic produced by every process over its share of the windows, merged with
    the kind's rule in rank order (rank 0's share first, as one process meets the windows) and
    handed to every process. A sum over windows accumulated in float64 from exact per-window
    terms (the Fisher's squares of float32 gradients) is then the one-process sum whenever the
    partial sums are exact, which they are unless one element's terms span more than 2^29."""
    if not state.group.active:
        return mine
    from lqframe.stats import MERGE_RULES

    rule = MERGE_RULES[kind.merge]

    def step(acc):
        part = {k: v.detach().cpu() for k, v in mine.items()}
        return part if acc is None else {k: rule(acc[k], part[k]) for k in part}

    return state.group.chain(None, step)


@contextlib.contextmanager
def _backward_device(state: RunState):
    """Where a backward pass over the whole model runs (gradient statistics, tuning): the run's
    device, or the CPU for an offloaded model (a backward pass needs every block where the forward
    ran); the blocks are placed back as the run keeps them afterwards."""
    if not state.offload:
        yield state.device
        return
    device = torch.device("cpu")
    state.model.to(device)
    try:
        yield device
    finally:
        state.executor.place_model()


def _calibrate(state: RunState) -> None:
    ex = state.executor
    data_aware = _data_aware_allocation(state)
    resuming = state.sink.next_block() > 0
    if resuming and (data_aware or state.teacher_blocks):
        why = ("chose its allocation from statistics of the float model" if data_aware
               else "kept outputs of the float model")
        state.log(f"the unfinished run {why}, which a resumed run cannot rebuild: starting afresh")
        state.sink.reset()
        resuming = False
    if not state.uses_data:
        return
    if resuming:  # the inputs of the next block come back from the sink when decompose starts
        ex.set_kwargs(state.calibration)
    else:
        state.inputs = ex.first_inputs(_own(state, state.calibration))
    _gradient_statistics(state)
    if not data_aware:
        return
    # a data-aware allocation needs every layer's statistics before any layer is decomposed:
    # one pass over the float model (whose block outputs are the teacher targets, too)
    needs = {p.name: _all_needs(state, p.name) for p in state.plans}
    by_block = _by_block(state.plans)
    x = state.inputs
    for b in tqdm(range(len(ex)), desc="calibrate", unit="block", disable=not state.progress):
        with ex.block(b) as block:
            names = [p.name for p in by_block.get(b, [])]
            if names:
                with _routing(state, probe=True):
                    groups = ex.input_groups(block, names, x[0])
                with _routing(state):
                    ex.capture(block, groups, needs, x, state.stats)
            x = ex.forward(block, x)
            if b in state.teacher_blocks:
                state.teacher[b] = ex.in_model_dtype(x)


def _allocate(state: RunState) -> None:
    recipe = state.recipe
    stage = recipe.allocate
    cache = None
    if stage.cache is not False:
        from lqframe.costcache import CostCache

        cache = CostCache(None if stage.cache is True else stage.cache)
    group = state.group
    # the matrices shared by the processes, balanced by size (every candidate of a matrix on one
    # process: they share its quantizations); each fills its rows, and all rows are gathered
    owners = group.assign([state.model.get_submodule(p.name).weight.numel() for p in state.plans])
    rows = {i for i, r in enumerate(owners) if r == group.rank}
    t0 = time.perf_counter()
    try:
        table, per_layer, decs = cost_table(state.model, recipe, state.plans, lambda n: _layer_stats(state, n),
                                            state.progress,
                                            cache=cache, device=state.device, rows=rows if group.active else None,
                                            fixed=state.imported)
    finally:
        if cache is not None:
            cache.close()
    counts = (cache.hits, cache.misses) if cache is not None else (0, 0)
    if group.active:
        parts = group.gather(({i: table.cost[i].copy() for i in rows}, counts))
        for part, _ in parts:
            for i, row in part.items():
                table.cost[i] = row
        counts = tuple(sum(c[k] for _, c in parts) for k in range(2))
    state.timings["cost_table"] = time.perf_counter() - t0
    if cache is not None:
        state.log(f"allocation cost table: {len(table.layers)} matrices × {len(table.configs)} candidates in "
                  f"{state.timings['cost_table']:.1f} s ({counts[0]} from the cache at {cache.path}, "
                  f"{counts[1]} computed)")
    t0 = time.perf_counter()
    choice = None
    if group.leader:  # one solve, handed to every process
        allocator = registry().create("allocator", stage.allocator.name, **stage.allocator.options)
        choice = allocator.allocate(table, stage.budget_bits)
    choice = group.broadcast(choice, 0)
    state.timings["allocate_solve"] = time.perf_counter() - t0
    plans = []
    kinds = registry().statistics()
    for i, plan in enumerate(state.plans):
        j = choice[plan.name].index
        chosen = per_layer[i][j]
        plans.append(chosen)
        # a candidate that reads forward statistics is decomposed again in the decompose stage, on
        # the inputs of the compressed blocks before it (as without allocation), unless told to reuse
        forward = any(kinds[n].source == "forward" for n in layer_needs(chosen))
        if forward and not stage.reuse:
            continue
        # a cost from the cache has no decomposition yet: its owner makes it as the table would have
        if owners[i] == group.rank and (i, j) not in decs:
            w = state.model.get_submodule(plan.name).weight.detach().to(state.device)
            parts = None
            if plan.name in state.imported:  # (the imported Q, not the nominal quantizer)
                parts = (state.imported[plan.name], components(chosen.quantizer, chosen.reconstructor)[1])
            decs[(i, j)] = decompose_candidate(w, chosen, _layer_stats(state, plan.name), j, parts=parts)
        state.prepared[plan.name] = group.broadcast(decs.get((i, j)), owners[i], state.device)
    decs.clear()
    state.plans = plans
    state.needs = {p.name: layer_needs(p) for p in plans}
    used = sum(choice[p.name].bits for p in plans) / max(table.total_params, 1)
    state.allocation = {
        "allocator": stage.allocator.to_dict(), "budget_bits": stage.budget_bits,
        "include_lowrank": stage.include_lowrank, "metric": stage.metric, "reuse": stage.reuse,
        "candidates": len(table.configs),
        "bits_per_param": used, "total_cost": sum(choice[p.name].cost for p in plans),
        "cost_table_seconds": state.timings["cost_table"], "solve_seconds": state.timings["allocate_solve"],
        "cache": None if cache is None else {"path": str(cache.path), "hits": cache.hits, "computed": cache.misses},
        "chosen": {p.name: choice[p.name].index for p in plans},
    }
    state.log(f"allocation: {table.total_params:,} parameters, {used:.4f} bits per parameter")


def _by_block(plans: Sequence[LayerPlan]) -> dict[int, list[LayerPlan]]:
    by_block: dict[int, list[LayerPlan]] = {}
    for p in plans:
        by_block.setdefault(p.block, []).append(p)
    return by_block


def _decompose(state: RunState) -> None:
    ex = state.executor
    # a resumed run: finished blocks back from the sink (after allocation, which needed the float weights)
    state.start_block, inputs, state.results = state.sink.restore(state.model)
    if inputs is not None:
        state.inputs = ex.keep(ex._to_cache(x) for x in inputs)
    by_block = _by_block(state.plans)
    for b in range(state.start_block):
        for p in by_block.get(b, []):
            state.prepared.pop(p.name, None)
    sequential = state.recipe.quantize.sequential
    teacher_in = state.inputs if state.teacher_blocks and not state.teacher and state.uses_data else None
    bar = tqdm(range(state.start_block, len(ex)), desc="compress", unit="block", disable=not state.progress)
    for b in bar:
        plans = {p.name: p for p in by_block.get(b, [])}
        bar.set_postfix_str(f"{ex.source.path}.{b}: {len(plans)} layers")
        with ex.block(b) as block:
            if teacher_in is not None:  # the float block's outputs on the float model's inputs
                teacher_in = ex.forward(block, teacher_in)
                if b in state.teacher_blocks:
                    state.teacher[b] = ex.in_model_dtype(teacher_in)
            todo = [n for n in plans if n not in state.prepared]
            phases: list[list[list[str]]] = [[list(plans)]] if plans else []
            if state.uses_data and todo:
                with _routing(state, probe=True):
                    groups = ex.input_groups(block, list(plans), state.inputs[0])
                phases = [[g] for g in groups] if sequential == "layer" else [groups]
            block_results = []
            for phase in phases:
                capture = [g for g in phase if any(n in todo for n in g)] if state.uses_data else []
                with _routing(state):
                    samples = ex.capture(block, capture, state.needs, state.inputs, state.stats,
                                         stop=sequential == "layer") if capture else {}
                names = [n for group in phase for n in group]
                for name in names:
                    lin = state.model.get_submodule(name)
                    if not isinstance(lin, nn.Linear):
                        raise ModelError(f"layer {name} is a {type(lin).__name__}, not an nn.Linear")
                owners = state.group.assign([state.model.get_submodule(n).weight.numel() for n in names])
                done = {}
                for name, owner in zip(names, owners, strict=True):  # this process's share of the matrices
                    prepared = state.prepared.pop(name, None)
                    if owner == state.group.rank:
                        stats = _layer_stats(state, name)
                        measured = state.stats.layer_stats(name) if _falls_back(state, name) else None
                        done[name] = decompose_layer(name, state.model.get_submodule(name), plans[name], stats,
                                                     samples.get(name), prepared, measured=measured,
                                                     tokens=state.stats.tokens(name),
                                                     fixed=state.imported.get(name))
                for name, owner in zip(names, owners, strict=True):
                    module, result = done[name] if not state.group.active else _shared_layer(state, done.get(name),
                                                                                              owner)
                    set_module(state.model, name, module)
                    block_results.append(result)
                state.stats.drop(n for group in phase for n in group)
            order = {n: i for i, n in enumerate(plans)}
            block_results.sort(key=lambda r: order[r.name])
            few = [r for r in block_results if r.info.get("fallback")]
            if few:
                state.log(f"block {b}: {len(few)} layers saw fewer than {state.min_tokens} calibration tokens and were "
                          "decomposed data-free: " + ", ".join(f"{r.name} ({r.info.get('tokens', 0)})" for r in few[:6])
                          + (f" and {len(few) - 6} more" if len(few) > 6 else ""))
            state.results += block_results
            later = any(p.name not in state.prepared for c in range(b + 1, len(ex)) for p in by_block.get(c, []))
            if state.uses_data and later:
                state.inputs = ex.forward(block, state.inputs)
            elif state.uses_data:
                state.inputs = None  # every later layer is already decomposed: nothing needs them
            state.sink.write(b, block, block_results, state.inputs)


def _shared_layer(state: RunState, mine, owner: int):
    """A compressed layer as its owner process made it, on every process (each rebuilds it from the
    owner's stored tensors, the owner too, so that all propagate the very same module)."""
    from lqframe.lqlinear import LQLinear

    payload = None
    if mine is not None:
        module, result = mine
        payload = (module.layer_config(), {k: v.detach().cpu() for k, v in module.state_dict().items()}, result)
    config, tensors, result = state.group.broadcast(payload, owner)
    module = LQLinear.from_layer_config(config)
    module.load_state_dict(tensors)
    return module.to(state.device), result


def _tune_identity(state: RunState) -> dict[str, Any]:
    return {"windows": int(state.tuning.checksum()),
            "tune_stage": attrs.asdict(state.recipe.tune, value_serializer=lambda i, a, v: v if not isinstance(
                v, tuple) else list(v))}


def _teacher(state: RunState) -> None:
    from lqframe.tune import TEACHER_DIR, TeacherStore, compute_teacher

    stage = state.recipe.tune
    work = state.sink.work_dir()
    directory = work / TEACHER_DIR if stage.teacher == "disk" and work is not None else None
    if stage.teacher == "disk" and directory is None:
        state.log("tune_stage.teacher is disk, but this run keeps no files (no save stage): teacher outputs stay "
                  "in memory")
    state.teacher_store = TeacherStore(state.objectives.stored(), directory)
    with offloaded(state.model, state.device) if state.offload else contextlib.nullcontext():
        seconds = compute_teacher(state.model, state.tuning, state.objectives, state.teacher_store, state.device,
                                  stage.batch_size, state.progress, identity=_tune_identity(state),
                                  group=state.group)
    state.timings["teacher_outputs"] = seconds
    n = len(state.tuning.train) + len(state.tuning.validation)
    state.log(f"teacher outputs ({', '.join(sorted(state.teacher_store.names)) or 'none'}) of {n} windows: "
              f"{state.teacher_store.nbytes() / 2**20:.0f} MB in {'files' if directory else 'memory'}"
              + (f", {seconds:.1f} s" if seconds else " (kept from before)"))


def _tune(state: RunState) -> None:
    from lqframe.tune import tune

    with _backward_device(state) as device:
        state.tuned = tune(state.model, state.recipe.tune, state.tuning, state.teacher_store, device,
                           objectives=state.objectives, work_dir=state.sink.work_dir(),
                           identity=_tune_identity(state), progress=state.progress, log=state.log,
                           origin=state.recipe.origin, group=state.group)


def _evaluate(state: RunState) -> None:
    state.ppls = _perplexities(state, "perplexity")


def _save(state: RunState) -> None:
    state.sink.save(state)


def _has_quantize(recipe: Recipe) -> bool:
    return recipe.quantize is not None


STAGES: tuple[Stage, ...] = (
    Stage("baseline", ("evaluate_stage",), lambda r: r.evaluate is not None and r.evaluate.float_baseline, _baseline),
    Stage("teacher", ("tune_stage",), lambda r: r.tune is not None, _teacher),
    Stage("calibrate", ("quantize_stage",), _has_quantize, _calibrate),
    Stage("allocate", ("allocate_stage",), lambda r: r.allocate is not None, _allocate),
    Stage("decompose", ("quantize_stage", "reconstruct_stage"), _has_quantize, _decompose),
    Stage("tune", ("tune_stage",), lambda r: r.tune is not None, _tune),
    Stage("evaluate", ("evaluate_stage",), lambda r: r.evaluate is not None, _evaluate),
    Stage("save", ("save_stage",), lambda r: r.save is not None, _save),
)
#: the stages that change the model (what :func:`lqframe.compress` runs)
COMPRESSION_STAGES = ("teacher", "calibrate", "allocate", "decompose", "tune")


def execute(state: RunState, only: Container[str] | None = None) -> RunState:
    """Plan (once per state), then run every enabled stage in order (``only``: just these stage
    names; a later call can run the rest)."""
    if state.executor is None:
        prepare(state)
    for stage in STAGES:
        if (only is None or stage.name in only) and stage.enabled(state.recipe):
            t0 = time.perf_counter()
            stage.run(state)
            state.timings[stage.name] = state.timings.get(stage.name, 0.0) + time.perf_counter() - t0
    return state


def versions(state: RunState) -> dict[str, Any]:
    """Versions of lqframe, torch, transformers and of every plugin whose components the run used."""
    import importlib.metadata

    from lqframe import __version__

    out: dict[str, Any] = {"lqframe": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        out["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        out["transformers"] = None
    reg = registry()
    used = {("quantizer", p.quantizer.name) for p in state.plans} | {("reconstructor", p.reconstructor.name)
                                                                      for p in state.plans}
    if state.recipe.allocate is not None:
        used.add(("allocator", state.recipe.allocate.allocator.name))
    plugins = {}
    for kind, name in sorted(used):
        info = reg.info(kind, name)
        plugins[f"{kind}:{name}"] = {"plugin": info.plugin, "distribution": info.distribution,
                                     "version": info.version}
    out["plugins"] = plugins
    out["device"] = str(state.device) + (f" ({torch.cuda.get_device_name(state.device)})"
                                         if state.device.type == "cuda" else "")
    return out


def perplexity_table(state: RunState) -> dict[str, dict[str, float | None]]:
    """Per evaluation source: float and compressed perplexity and their ratio (report.json)."""
    out = {}
    for source in state.evaluation_sets():
        fp, q = state.fp_ppls.get(source), state.ppls.get(source)
        out[source] = {"float": fp, "compressed": q, "ratio": q / fp if fp and q is not None else None}
    return out


def coverage_report(state: RunState) -> dict[str, Any] | None:
    """report.json ``coverage``: :func:`~lqframe.pipeline.coverage` with the bits per parameter over
    the blocks and the whole model."""
    from lqframe.pipeline import coverage_bits

    if state.coverage is None:
        return None
    return {**state.coverage, **coverage_bits(state.coverage, state.results)}


def report(state: RunState) -> dict[str, Any]:
    return {**summarize(state.results), "fp_ppl": state.fp_ppl, "ppl": state.ppl,
            "perplexity": perplexity_table(state), "coverage": coverage_report(state)}
