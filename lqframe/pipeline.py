"""Planning and per-layer work of a compression run: which linears get which components, the
allocation cost table, and one layer's decomposition into an :class:`~lqframe.lqlinear.LQLinear`
with its report row. The run engine (:mod:`lqframe.engine`) drives these over the blocks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Container, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from lqframe.costcache import CostCache, stats_digest, tensor_digest
from lqframe.errors import LqframeError, RecipeError
from lqframe.interfaces import ErrorReconstructor, Quantizer
from lqframe.lowrank import LowRankReconstructor, output_error
from lqframe.lqlinear import LQLinear
from lqframe.models import block_linears, select, unmatched
from lqframe.recipe import ComponentSpec, Recipe
from lqframe.registry import registry
from lqframe.types import CostTable, Decomposition, LayerStats

__all__ = ["LayerPlan", "LayerResult", "plan_layers", "set_module", "components", "layer_needs",
           "decompose_layer", "layer_errors", "cost_table", "decompose_candidate", "summarize", "coverage",
           "coverage_bits"]


@attrs.frozen
class LayerPlan:
    name: str
    block: int
    quantizer: ComponentSpec
    reconstructor: ComponentSpec


@attrs.define
class LayerResult:
    name: str
    quantizer: str
    reconstructor: str
    bits: int | None
    group_size: int | None
    rank: int
    numel: int
    storage_bits: int
    lowrank_bits: int
    rel_weight_error: float
    rel_output_error: float | None
    seconds: float
    quantizer_options: dict[str, Any] = attrs.field(factory=dict)
    reconstructor_options: dict[str, Any] = attrs.field(factory=dict)
    info: dict[str, Any] = attrs.field(factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# --------------------------------------------------------------------------- planning


def plan_layers(model: nn.Module, recipe: Recipe) -> list[LayerPlan]:
    """Which linears to compress and with which components (targets, ignore, overrides)."""
    if recipe.quantize is None:
        return []
    per_block = block_linears(model)
    names = [n for _, _, lins in per_block for n in lins]
    block_of = {n: i for i, _, lins in per_block for n in lins}
    stage = recipe.quantize
    for pattern in unmatched(list(stage.targets), names):
        raise RecipeError(
            f"{recipe.origin}: quantize_stage.targets: pattern {pattern!r} matches no linear layer in the "
            f"model's blocks (e.g. {', '.join(names[:3])})"
        )
    chosen = select(names, list(stage.targets), list(stage.ignore))
    if not chosen:
        raise RecipeError(f"{recipe.origin}: quantize_stage: targets and ignore leave no layer to compress")
    for key, overrides in (("quantize_stage", stage.overrides),
                           ("reconstruct_stage", recipe.reconstruct.overrides if recipe.reconstruct else ())):
        for i, ov in enumerate(overrides):
            for pattern in unmatched(list(ov.targets), chosen):
                raise RecipeError(f"{recipe.origin}: {key}.overrides[{i}].targets: pattern {pattern!r} matches "
                                  "no compressed layer")
    return [LayerPlan(n, block_of[n], recipe.quantizer_for(n), recipe.reconstructor_for(n)) for n in chosen]


def components(quantizer: ComponentSpec, reconstructor: ComponentSpec) -> tuple[Quantizer, ErrorReconstructor]:
    reg = registry()
    return (reg.create("quantizer", quantizer.name, **quantizer.options),
            reg.create("reconstructor", reconstructor.name, **reconstructor.options))


def layer_needs(plan: LayerPlan) -> frozenset[str]:
    """The statistics a layer's components need."""
    q, r = components(plan.quantizer, plan.reconstructor)
    return r.all_needs(q)


def layer_errors(w: torch.Tensor, approx: torch.Tensor, stats: LayerStats | None,
                 sample: torch.Tensor | None, known_output_error: float | None = None) -> tuple[float, float | None]:
    """Relative weight error ‖W − Ŵ‖/‖W‖ and relative output error ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖: exact over
    every calibration token when ``rxx`` was captured (``known_output_error``: E‖x(W − Ŵ)ᵀ‖²
    already computed by the reconstructor), else over the token ``sample`` (None without data)."""
    w32 = w.float()
    diff = w32 - approx
    rel_w = float(diff.norm() / max(float(w32.norm()), 1e-30))
    if stats is not None and stats.rxx is not None and stats.n_tokens:
        ref = output_error(w32, stats)
        err = known_output_error if known_output_error is not None else output_error(diff, stats)
        return rel_w, (err / ref) ** 0.5 if ref > 0 else 0.0
    if sample is not None and sample.numel():
        ref = sample @ w32.T
        return rel_w, float((sample @ diff.T).norm() / max(float(ref.norm()), 1e-30))
    return rel_w, None


def decompose_layer(
    name: str, linear: nn.Linear, plan: LayerPlan, stats: LayerStats | None, sample: torch.Tensor | None,
    prepared: tuple[Decomposition, float] | None = None, *, measured: LayerStats | None = None,
    tokens: int | None = None, fixed: Quantizer | None = None,
) -> tuple[LQLinear, LayerResult]:
    """Decompose one linear (or take the decomposition the allocate stage already made, with its
    seconds) and build its :class:`LQLinear` and report row. ``measured``: the layer's own statistics
    when ``stats`` are data-free stand-ins (a seldom-routed expert), to measure its output error on;
    ``tokens``: how many calibration tokens its statistics cover (the report row's ``tokens``);
    ``fixed``: a :class:`lqframe.imports.FixedQuantizer` holding the layer's imported Q, used instead of
    the plan's quantizer."""
    quantizer, recon = components(plan.quantizer, plan.reconstructor)
    quantizer_name, quantizer_options = plan.quantizer.name, dict(plan.quantizer.options)
    quantizer_meta = plan.quantizer.to_dict()
    if fixed is not None:
        quantizer, quantizer_name, quantizer_options = fixed, f"imported:{fixed.source}", fixed.options()
        quantizer_meta = {"name": "imported", **quantizer_options}
    w = linear.weight.detach()
    if prepared is None:
        t0 = time.perf_counter()
        try:
            dec = recon.decompose(w, quantizer, stats)
        except LqframeError as exc:
            raise type(exc)(f"layer {name}: {exc}") from None
        seconds = time.perf_counter() - t0
    else:
        dec, seconds = prepared
    module = LQLinear.from_decomposition(linear, dec, meta={"quantizer": quantizer_meta,
                                                            "reconstructor": plan.reconstructor.to_dict()})
    if measured is None:
        rel_w, rel_out = layer_errors(w, dec.dense(), stats, sample, _known_output_error(recon, dec))
    else:
        rel_w, rel_out = layer_errors(w, dec.dense(), measured, sample)
    qw = dec.qweight
    result = LayerResult(
        name=name,
        quantizer=quantizer_name,
        reconstructor=plan.reconstructor.name,
        bits=qw.bits,
        group_size=qw.block_size,
        rank=dec.rank,
        numel=w.numel(),
        storage_bits=qw.storage_bits(),
        lowrank_bits=0 if dec.lowrank is None else dec.lowrank.storage_bits(),
        rel_weight_error=rel_w,
        rel_output_error=rel_out,
        seconds=seconds,
        quantizer_options=quantizer_options,
        reconstructor_options=dict(plan.reconstructor.options),
        info={k: v for k, v in dec.info.items() if isinstance(v, int | float | str | bool)},
    )
    if tokens is not None:
        result.info["tokens"] = tokens
    if measured is not None:
        result.info["fallback"] = "data-free"
    return module, result


# --------------------------------------------------------------------------- allocation


def candidate_plans(recipe: Recipe, plan: LayerPlan) -> list[LayerPlan]:
    """The allocate stage's candidates applied to one layer's plan (quantizer and/or reconstructor
    options; a bare mapping is quantizer options)."""
    out = []
    for cand in recipe.allocate.candidates:
        out.append(attrs.evolve(plan, quantizer=plan.quantizer.merged(cand.get("quantizer", {})),
                                reconstructor=plan.reconstructor.merged(cand.get("reconstructor", {}))))
    return out


#: the statistic each allocation metric reads (``weight`` reads none)
METRIC_NEEDS = {"output": frozenset({"rxx"}), "fisher": frozenset({"fisher"}), "weight": frozenset()}


def allocation_needs(recipe: Recipe, plans: Sequence[LayerPlan]) -> dict[str, frozenset[str]]:
    """Per layer, the statistics any allocation candidate (and the cost metric) needs."""
    if recipe.allocate is None:
        return {}
    metric = METRIC_NEEDS.get(recipe.allocate.metric, frozenset())
    return {p.name: frozenset(metric).union(*(layer_needs(c) for c in candidate_plans(recipe, p))) for p in plans}


def _known_output_error(recon: ErrorReconstructor, dec: Decomposition) -> float | None:
    """lqframe's low-rank base class reports E‖x(W − Q − LR)ᵀ‖² of the stored factors in
    ``info["output_error"]``: reused rather than computed again."""
    return dec.info.get("output_error") if isinstance(recon, LowRankReconstructor) else None


def layer_cost(w: torch.Tensor, dec: Decomposition, stats: LayerStats | None, known: float | None = None,
               metric: str = "auto") -> float:
    """A candidate's cost under ``metric``:

    ``output``
        the squared relative output error ‖X(W − Ŵ)ᵀ‖²/‖XWᵀ‖² (needs ``rxx``);
    ``fisher``
        the Fisher-weighted squared error Σ F ⊙ (W − Ŵ)² (needs ``fisher``), not normalised: the
        Fisher measures how much the loss moves per unit of weight error, so these add up across
        matrices into (twice) the expected loss increase — LQ-LoRA's ILP objective;
    ``weight``
        the squared relative weight error ‖W − Ŵ‖²/‖W‖²;
    ``auto``
        ``output`` when ``rxx`` is known, else ``fisher`` when the Fisher is, else ``weight``.
    """
    have = stats.available() if stats is not None else frozenset()
    if metric == "auto":
        metric = "output" if "rxx" in have and stats.n_tokens else "fisher" if "fisher" in have else "weight"
    if metric == "fisher":
        stats.require({"fisher"}, "the fisher allocation metric")
        f = stats.get("fisher").to(device=w.device, dtype=torch.float64)
        return float((f * (w.double() - dec.dense().double()) ** 2).sum())
    if metric == "output":
        (stats if stats is not None else LayerStats()).require({"rxx"}, "the output allocation metric")
    rel_w, rel_out = layer_errors(w, dec.dense(), stats if metric == "output" else None, None, known)
    return (rel_w if rel_out is None else rel_out) ** 2


def _component_fingerprint(spec: ComponentSpec, kind: str, instance: Any) -> dict[str, Any]:
    info = registry().info(kind, spec.name)
    return {"name": spec.name, "options": instance.options(), "distribution": info.distribution,
            "version": info.version}


class SharedQuantizer(Quantizer):
    """A quantizer that remembers its result for one weight: the candidates of a cost table that
    share a quantizer configuration and differ only in the reconstructor (rank, factor format,
    weighting) quantize the layer's weight once. Any other input (an alternation's ``W − LR``)
    goes to the wrapped quantizer. The weight is recognised by its storage (pointer, shape,
    strides, dtype, version counter): a view of it, as ``check_weight`` makes, is the same weight."""

    def __init__(self, inner: Quantizer, weight: torch.Tensor):
        self.inner = inner
        self.needs = inner.needs
        self.rounds_to_nearest = inner.rounds_to_nearest
        self._key = self._identity(weight)
        self._memo: dict[str, Any] = {}

    @staticmethod
    def _identity(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)

    def _shared(self, what: str, weight: torch.Tensor, compute):
        if self._identity(weight) != self._key:
            return compute()
        if what not in self._memo:
            self._memo[what] = compute()
        return self._memo[what]

    def quantize(self, weight, stats=None):
        return self._shared("quantize", weight, lambda: self.inner.quantize(weight, stats))

    def roundtrip(self, weight, stats=None):
        return self._shared("roundtrip", weight, lambda: self.inner.roundtrip(weight, stats))

    def storage_bits(self, shape):
        return self.inner.storage_bits(shape)

    def options(self):
        return self.inner.options()


def decompose_candidate(w: torch.Tensor, plan: LayerPlan, stats: LayerStats | None, index: int,
                        shared: dict[str, SharedQuantizer] | None = None,
                        parts: tuple[Quantizer, ErrorReconstructor] | None = None) -> tuple[Decomposition, float]:
    """One allocation candidate's decomposition of a layer and its seconds (errors name the layer
    and the candidate). ``shared``: per-layer memo of quantizers by spec (see :class:`SharedQuantizer`);
    ``parts``: the candidate's components when the caller has made them already."""
    q, rec = parts if parts is not None else components(plan.quantizer, plan.reconstructor)
    if shared is not None:
        spec = json.dumps(plan.quantizer.to_dict(), sort_keys=True, default=str)
        if spec not in shared:
            shared[spec] = SharedQuantizer(q, w)
        q = shared[spec]
    t0 = time.perf_counter()
    try:
        dec = rec.decompose(w, q, stats)
    except LqframeError as exc:
        raise type(exc)(f"layer {plan.name}, allocation candidate {index}: {exc}") from None
    return dec, time.perf_counter() - t0


def cost_table(model: nn.Module, recipe: Recipe, plans: Sequence[LayerPlan], stats_of, progress: bool = True,
               cache: CostCache | None = None, device: torch.device | None = None, rows: Container[int] | None = None,
               fixed: Mapping[str, Quantizer] | None = None,
               ) -> tuple[CostTable, list[list[LayerPlan]], dict[tuple[int, int], tuple[Decomposition, float]]]:
    """Decompose every layer with every candidate once: costs (see :func:`layer_cost`, with the
    stage's ``metric``), exact bits from the components' ``storage_bits(shape)`` (+
    ``lowrank_bits(shape)`` when the budget includes the low-rank term), and the decompositions
    themselves (reused for the chosen one). ``stats_of(name)`` gives a layer's calibration
    statistics (None for data-free candidates).

    With a ``cache`` (:class:`~lqframe.costcache.CostCache`) a cost already computed for the same
    weight, statistics, components and device is read back instead of decomposing again (that
    pair then has no decomposition here: the allocate stage makes the chosen one with
    :func:`decompose_candidate` and the same statistics, so a warm cache changes nothing in the
    result). Weights are decomposed on ``device`` (default: where they are). ``rows``: decompose
    only these matrices (one process's share; the others' costs are left 0, their bits filled).
    ``fixed``: per layer, an imported Q (``quantize_stage.from``) that every candidate of the layer
    takes instead of quantizing — the candidates then differ in their reconstructor (rank) only."""
    from lqframe import __version__

    stage = recipe.allocate
    per_layer = [candidate_plans(recipe, p) for p in plans]
    n, k = len(plans), len(stage.candidates)
    cost = torch.zeros(n, k, dtype=torch.float64)
    bits = torch.zeros(n, k, dtype=torch.float64)
    decs: dict[tuple[int, int], tuple[Decomposition, float]] = {}
    numel = []
    bar = tqdm(plans, desc=f"allocate: cost table ({n} matrices × {k} candidates)", unit="matrix",
               disable=not progress, leave=False)
    for i, plan in enumerate(bar):
        weight = model.get_submodule(plan.name).weight
        shape = (weight.shape[0], weight.shape[1])
        numel.append(weight.numel())
        mine = rows is None or i in rows
        # one float32 tensor for every candidate (shared quantizations recognise it)
        w = weight.detach().to(device=device, dtype=torch.float32).contiguous() if mine else None
        stats = stats_of(plan.name) if mine else None
        w_digest = tensor_digest(w) if cache is not None and mine else ""
        shared: dict[str, SharedQuantizer] = {}
        imported = (fixed or {}).get(plan.name)
        for j, cand in enumerate(per_layer[i]):
            q, rec = components(cand.quantizer, cand.reconstructor)
            q = imported if imported is not None else q
            bits[i, j] = q.storage_bits(shape) + (rec.lowrank_bits(shape) if stage.include_lowrank else 0)
            if not mine:
                continue
            key = None
            if cache is not None:
                needs = rec.all_needs(q) | METRIC_NEEDS.get(stage.metric, frozenset())
                if stage.metric == "auto":
                    needs = needs | (stats.available() & {"rxx", "fisher"} if stats is not None else frozenset())
                fingerprint = {"lqframe": __version__, "metric": stage.metric,
                               "quantizer": imported.fingerprint() if imported is not None
                               else _component_fingerprint(cand.quantizer, "quantizer", q),
                               "reconstructor": _component_fingerprint(cand.reconstructor, "reconstructor", rec)}
                key = cache.key(w_digest, stats_digest(stats, frozenset(needs)), fingerprint, w.device.type)
                hit = cache.get(key)
                if hit is not None:
                    cost[i, j] = hit[0]
                    continue
            dec, seconds = decompose_candidate(w, cand, stats, j, shared, (q, rec))
            decs[(i, j)] = (dec, seconds)
            cost[i, j] = layer_cost(w, dec, stats, _known_output_error(rec, dec), stage.metric)
            if key is not None:
                cache.put(key, float(cost[i, j]), seconds, plan.name, stage.candidates[j])
        if cache is not None:
            bar.set_postfix_str(f"cached {cache.hits}, computed {cache.misses}")
    configs = [dict(c) for c in stage.candidates]
    return CostTable([p.name for p in plans], configs, cost.numpy(), bits.numpy(), numel), per_layer, decs


#: weight tensors (two or more dimensions) left in float are listed from this many elements up
LEFT_IN_FLOAT_MIN = 4096
#: the run warns when more than this fraction of the block parameters is not compressed
UNTARGETED_WARNING = 0.05


def coverage(model: nn.Module, plans: Sequence[LayerPlan]) -> dict[str, Any]:
    """What a plan compresses and what it leaves in float, counted before any layer changes (meta
    tensors count too): parameters of the blocks and of the whole model (tied tensors once), the
    targeted weights, the bits the rest keeps in its own dtype, and every weight tensor of two or
    more dimensions left in float with at least :data:`LEFT_IN_FLOAT_MIN` elements (the largest
    first) — 3-D expert tensors of mixture-of-experts models, embeddings, heads."""
    from lqframe.models import find_blocks

    path, blocks = find_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    targeted = {f"{p.name}.weight" for p in plans}
    totals = {"block_params": 0, "model_params": 0, "targeted_params": 0, "float_block_bits": 0, "float_bits": 0}
    left = []
    for name, p in model.named_parameters():  # (shared tensors once)
        inside = id(p) in in_blocks
        bits = p.numel() * p.element_size() * 8
        totals["model_params"] += p.numel()
        totals["block_params"] += p.numel() if inside else 0
        if name in targeted:
            totals["targeted_params"] += p.numel()
            continue
        totals["float_bits"] += bits
        totals["float_block_bits"] += bits if inside else 0
        if p.dim() >= 2 and p.numel() >= LEFT_IN_FLOAT_MIN:
            left.append({"name": name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                         "numel": p.numel(), "in_blocks": inside})
    left.sort(key=lambda r: (-r["numel"], r["name"]))
    untargeted = totals["block_params"] - totals["targeted_params"]
    return {**totals, "blocks": path, "untargeted_block_fraction": untargeted / max(totals["block_params"], 1),
            "left_in_float": left}


def coverage_bits(cov: dict[str, Any], results: Sequence[LayerResult]) -> dict[str, float | None]:
    """Bits per parameter of everything stored (Q, L·R, and what stayed float in its dtype) over the
    blocks and over the whole model."""
    compressed = sum(r.storage_bits + r.lowrank_bits for r in results)
    blocks = (compressed + cov["float_block_bits"]) / cov["block_params"] if cov["block_params"] else None
    whole = (compressed + cov["float_bits"]) / cov["model_params"] if cov["model_params"] else None
    return {"bits_per_param_blocks": blocks, "bits_per_param_model": whole}


def untargeted_warning(cov: dict[str, Any]) -> str | None:
    """A warning line when more than :data:`UNTARGETED_WARNING` of the block parameters stay float."""
    fraction = cov["untargeted_block_fraction"]
    if fraction <= UNTARGETED_WARNING:
        return None
    biggest = [r for r in cov["left_in_float"] if r["in_blocks"]][:3]
    what = ", ".join(f"{r['name']} {tuple(r['shape'])}" for r in biggest) or "norms and biases"
    return (f"warning: {fraction:.0%} of the block parameters are not compressed (targets reach "
            f"{cov['targeted_params']:,} of {cov['block_params']:,}); the largest left in float: {what}")


def summarize(results: Sequence[LayerResult]) -> dict[str, Any]:
    numel = sum(r.numel for r in results)
    q_bits = sum(r.storage_bits for r in results)
    lr_bits = sum(r.lowrank_bits for r in results)
    return {
        "layers": len(results),
        "params": numel,
        "avg_bits": q_bits / numel if numel else math.nan,
        "avg_bits_with_lowrank": (q_bits + lr_bits) / numel if numel else math.nan,
        # layers whose statistics covered too few tokens (experts the router seldom chose): data-free
        "data_free": {r.name: r.info.get("tokens", 0) for r in results if r.info.get("fallback")},
    }
