"""Sequential compression of a model, block by block.

For each repeated block (decoder layer) in order:

1. run the block on its calibration inputs with hooks on the target linears that accumulate only
   the statistics the chosen plugins declare (float64), plus a token sample for error reporting;
2. decompose every target linear (``ErrorReconstructor.decompose``) and swap it for an
   :class:`~lqframe.lqlinear.LQLinear`;
3. run the *compressed* block again: its outputs are the next block's inputs.

With ``sequential="layer"`` (GPTQ's "true sequential") steps 1–2 run once per group of linears
that read the same input, in execution order (q/k/v, then o, then gate/up, then down): each
group's statistics are captured with the groups before it already compressed, so every layer is
fitted to the inputs it will see in the compressed model. The forward pass stops as soon as the
group's input has been captured, so this costs about one extra block forward in total.

Only one block's activations are held at a time. After each block a ``checkpoint`` callback
may persist progress, and a run can start from a given block with given inputs (resume).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from lqframe.errors import LqframeError, ModelError, RecipeError
from lqframe.interfaces import ErrorReconstructor, Quantizer
from lqframe.lqlinear import LQLinear, set_weight_cache
from lqframe.models import block_linears, find_blocks, select, unmatched
from lqframe.recipe import SEQUENTIAL_MODES, ComponentSpec, Recipe
from lqframe.registry import registry
from lqframe.types import CostTable, LayerStats, StatsAccumulator

__all__ = ["LayerPlan", "LayerResult", "plan_layers", "compress_blocks", "capture_block_inputs", "set_module"]

#: tokens per layer kept to measure the output error ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖
OUTPUT_ERROR_TOKENS = 4096


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


def allocate(model: nn.Module, recipe: Recipe, plans: list[LayerPlan], progress: bool = True) -> list[LayerPlan]:
    """Choose each layer's quantizer options from the allocate stage's candidates (data-free costs:
    the squared relative weight error of the layer's reconstructor with each candidate)."""
    stage = recipe.allocate
    if stage is None:
        return plans
    reg = registry()
    configs = [dict(c) for c in stage.candidates]
    cost = torch.zeros(len(plans), len(configs), dtype=torch.float64)
    bits = torch.zeros(len(plans), len(configs), dtype=torch.float64)
    numel = []
    bar = tqdm(plans, desc="allocate: cost table", disable=not progress, leave=False)
    for i, plan in enumerate(bar):
        w = model.get_submodule(plan.name).weight.detach().float()
        numel.append(w.numel())
        rec = reg.create("reconstructor", plan.reconstructor.name, **plan.reconstructor.options)
        for j, cand in enumerate(configs):
            spec = plan.quantizer.merged(cand)
            q = reg.create("quantizer", spec.name, **spec.options)
            if rec.all_needs(q):
                raise RecipeError(
                    f"{recipe.origin}: allocate_stage: costs are computed data-free, but {spec.name} + "
                    f"{plan.reconstructor.name} need calibration statistics {sorted(rec.all_needs(q))}; "
                    "allocate with data-free components (e.g. nf/rtn with svd, loftq or none)")
            dec = rec.decompose(w, q, None)
            cost[i, j] = float(((w - dec.dense()) ** 2).sum() / max(float((w**2).sum()), 1e-30))
            bits[i, j] = dec.storage_bits(include_lowrank=stage.include_lowrank)
    table = CostTable([p.name for p in plans], configs, cost.numpy(), bits.numpy(), numel)
    allocator = reg.create("allocator", stage.allocator.name, **stage.allocator.options)
    choice = allocator.allocate(table, stage.budget_bits)
    return [attrs.evolve(p, quantizer=p.quantizer.merged(choice[p.name].config)) for p in plans]


# --------------------------------------------------------------------------- calibration inputs


class _Stop(Exception):
    pass


def capture_block_inputs(
    model: nn.Module, block: nn.Module, windows: torch.Tensor, progress: bool = True
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run the model on each window up to ``block`` and return the block's hidden-state inputs
    (one tensor per window) and the keyword arguments the model passes to its blocks."""
    inputs: list[torch.Tensor] = []
    kwargs_seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.detach())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            kwargs_seen["__extra_args__"] = tuple(args[1:])
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for w in tqdm(windows, desc="capture block-0 inputs", disable=not progress, leave=False):
                try:
                    model(input_ids=w[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(inputs) != len(windows):
        raise ModelError("could not capture the inputs of the first block: the model never called it")
    return inputs, kwargs_seen


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    extra = kwargs.get("__extra_args__", ())
    kw = {k: v for k, v in kwargs.items() if k != "__extra_args__"}
    out = block(hidden, *extra, **kw)
    return out[0] if isinstance(out, tuple | list) else out


# --------------------------------------------------------------------------- the block loop


class _Capture:
    """Statistics plus a token sample (for the output error) of one input shared by one or more
    linears: q/k/v read the same normalised hidden state, gate/up another, and share one capture."""

    def __init__(self, in_features: int, needs: frozenset[str]):
        self.in_features = in_features
        self.acc = StatsAccumulator(in_features, needs)
        self.sample: list[torch.Tensor] = []
        self.sampled = 0
        self.last: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x is self.last:  # another member of the group sees the same tensor in the same call
            return
        self.last = x
        flat = x.detach().reshape(-1, self.in_features)
        self.acc.update(flat)
        if self.sampled < OUTPUT_ERROR_TOKENS:
            take = flat[: OUTPUT_ERROR_TOKENS - self.sampled].to(torch.float32).clone()
            self.sample.append(take)
            self.sampled += take.shape[0]


class _Stop(Exception):
    """Raised by a capture hook to end a block's forward pass once its input has been seen."""


def _input_groups(block: nn.Module, names: Sequence[str], model: nn.Module, x: torch.Tensor,
                  kwargs: Mapping[str, Any]) -> list[list[str]]:
    """Group linears by the input tensor they receive (one forward of the block on one window),
    in the order the block uses them (linears the forward never reaches come last)."""
    seen: dict[str, torch.Tensor] = {}  # the tensors themselves: holding them keeps ids from being reused

    def hook(name):
        def fn(module, args):
            seen[name] = args[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            _run_block(block, x, kwargs)
    finally:
        for h in handles:
            h.remove()
    order = {n: i for i, n in enumerate(seen)}
    groups: list[tuple[torch.Tensor | None, list[str]]] = []
    for n in sorted(names, key=lambda n: order.get(n, len(order))):
        x = seen.get(n)
        for tensor, members in groups:
            if x is not None and tensor is x:
                members.append(n)
                break
        else:
            groups.append((x, [n]))
    return [members for _, members in groups]


def _capture(model: nn.Module, block: nn.Module, groups: list[list[str]], needs: Mapping[str, frozenset[str]],
             inputs: Sequence[torch.Tensor], kwargs: Mapping[str, Any], stop: bool) -> dict[str, _Capture]:
    """Run ``block`` on every input window and capture the inputs of the linears in ``groups`` (one
    shared capture per group). ``stop``: end each forward once the (single) group was captured."""
    captures: dict[str, _Capture] = {}
    for group in groups:
        shared = _Capture(model.get_submodule(group[0]).in_features, frozenset().union(*(needs[n] for n in group)))
        captures.update(dict.fromkeys(group, shared))

    def hook(module, args, c):
        c.update(args[0])
        if stop:
            raise _Stop

    handles = [model.get_submodule(name).register_forward_pre_hook(lambda m, args, c=cap: hook(m, args, c))
               for name, cap in captures.items()]
    set_weight_cache(block, True)  # compressed linears of earlier groups dequantize once
    try:
        with torch.inference_mode():
            for x in inputs:
                try:
                    _run_block(block, x, kwargs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for cap in captures.values():
            cap.last = None
        set_weight_cache(block, False)
    return captures


def _needs(plan: LayerPlan) -> frozenset[str]:
    q, r = _components(plan)
    return r.all_needs(q)


def _components(plan: LayerPlan) -> tuple[Quantizer, ErrorReconstructor]:
    reg = registry()
    q = reg.create("quantizer", plan.quantizer.name, **plan.quantizer.options)
    r = reg.create("reconstructor", plan.reconstructor.name, **plan.reconstructor.options)
    return q, r


def _decompose_layer(
    name: str, linear: nn.Linear, plan: LayerPlan, stats: LayerStats | None, sample: torch.Tensor | None
) -> tuple[LQLinear, LayerResult]:
    quantizer, recon = _components(plan)
    t0 = time.perf_counter()
    w = linear.weight.detach()
    try:
        dec = recon.decompose(w, quantizer, stats)
    except LqframeError as exc:
        raise type(exc)(f"layer {name}: {exc}") from None
    seconds = time.perf_counter() - t0
    module = LQLinear.from_decomposition(linear, dec, meta={"quantizer": plan.quantizer.to_dict(),
                                                            "reconstructor": plan.reconstructor.to_dict()})
    w32 = w.float()
    approx = dec.dense()
    rel_w = float((w32 - approx).norm() / max(float(w32.norm()), 1e-30))
    rel_out = None
    if sample is not None and sample.numel():
        ref = sample @ w32.T
        rel_out = float((sample @ (w32 - approx).T).norm() / max(float(ref.norm()), 1e-30))
    qw = dec.qweight
    result = LayerResult(
        name=name,
        quantizer=plan.quantizer.name,
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
        quantizer_options=dict(plan.quantizer.options),
        reconstructor_options=dict(plan.reconstructor.options),
        info={k: v for k, v in dec.info.items() if isinstance(v, int | float | str | bool)},
    )
    return module, result


BlockCallback = Callable[[int, list[LayerResult], list[torch.Tensor] | None], None]


def compress_blocks(
    model: nn.Module,
    plans: Sequence[LayerPlan],
    calibration: torch.Tensor | None,
    *,
    start_block: int = 0,
    start_inputs: list[torch.Tensor] | None = None,
    on_block_done: BlockCallback | None = None,
    progress: bool = True,
    sequential: str = "block",
) -> list[LayerResult]:
    """Compress the planned layers block by block (see module doc). ``calibration`` holds token
    windows (n × seq_len) or is None for data-free plugins only. ``sequential``: ``block`` (all
    linears of a block see the float block's inputs) or ``layer`` (each input group is captured
    after the groups before it were compressed)."""
    if sequential not in SEQUENTIAL_MODES:
        raise RecipeError(f"sequential must be 'block' or 'layer', got {sequential!r}")
    blocks_path, blocks = find_blocks(model)
    by_block: dict[int, list[LayerPlan]] = {}
    for p in plans:
        by_block.setdefault(p.block, []).append(p)
    needs = {p.name: _needs(p) for p in plans}
    needs_any = any(needs.values())
    use_data = calibration is not None and len(calibration) > 0
    if needs_any and not use_data:
        names = sorted({p.reconstructor.name for p in plans} | {p.quantizer.name for p in plans})
        raise RecipeError(f"the components {names} need calibration statistics, but no calibration windows "
                          "were given (data.calibration_windows is 0)")
    results: list[LayerResult] = []
    inputs: list[torch.Tensor] | None = None
    kwargs: dict[str, Any] = {}
    if use_data:
        captured, kwargs = capture_block_inputs(model, blocks[0], calibration, progress)
        inputs = start_inputs if start_inputs is not None else captured
    bar = tqdm(range(start_block, len(blocks)), desc="compress", unit="block", disable=not progress)
    for b in bar:
        block = blocks[b]
        layer_plans = by_block.get(b, [])
        bar.set_postfix_str(f"{blocks_path}.{b}: {len(layer_plans)} layers")
        plan_by_name = {p.name: p for p in layer_plans}
        phases: list[list[list[str]]] = [[[p.name for p in layer_plans]]] if layer_plans else []
        if use_data and layer_plans:
            groups = _input_groups(block, list(plan_by_name), model, inputs[0], kwargs)
            phases = [[g] for g in groups] if sequential == "layer" else [groups]
        block_results = []
        for phase in phases:
            captures = _capture(model, block, phase, needs, inputs, kwargs, stop=sequential == "layer") \
                if use_data else {}
            for name in (n for group in phase for n in group):
                lin = model.get_submodule(name)
                if not isinstance(lin, nn.Linear):
                    raise ModelError(f"layer {name} is a {type(lin).__name__}, not an nn.Linear")
                cap = captures.get(name)
                stats = cap.acc.finalize() if cap else None
                sample = torch.cat(cap.sample) if cap and cap.sample else None
                module, result = _decompose_layer(name, lin, plan_by_name[name], stats, sample)
                set_module(model, name, module)
                block_results.append(result)
        order = {p.name: i for i, p in enumerate(layer_plans)}
        block_results.sort(key=lambda r: order[r.name])
        results += block_results
        if use_data:
            set_weight_cache(block, True)  # dequantize each Q once for all windows
            try:
                with torch.inference_mode():
                    inputs = [_run_block(block, x, kwargs) for x in inputs]
            finally:
                set_weight_cache(block, False)
        if on_block_done is not None:
            on_block_done(b, block_results, inputs)
    return results


def summarize(results: Sequence[LayerResult]) -> dict[str, Any]:
    numel = sum(r.numel for r in results)
    q_bits = sum(r.storage_bits for r in results)
    lr_bits = sum(r.lowrank_bits for r in results)
    return {
        "layers": len(results),
        "params": numel,
        "avg_bits": q_bits / numel if numel else math.nan,
        "avg_bits_with_lowrank": (q_bits + lr_bits) / numel if numel else math.nan,
    }
