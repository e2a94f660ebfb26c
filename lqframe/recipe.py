"""Recipes: YAML validated into attrs objects.

A recipe names the stages to run, each as a ``<name>_stage`` key (the shape llm-compressor users
know); stages it does not name are skipped::

    model: default                       # optional; `lqframe run --model` overrides
    data: {source: pydoc, seq_len: 512, calibration_windows: 16, evaluation_windows: 16, seed: 0}
    quantize_stage:
      targets: [Linear]                  # regexes over module names ('re:' prefix allowed);
      ignore: []                         #   'Linear' = every linear in the repeated blocks
      quantizer: {name: nf, bits: 4, group_size: 64}
      overrides:
        - targets: ['re:.*down_proj$']
          quantizer: {bits: 8}
    reconstruct_stage:
      reconstructor: {name: svd, rank: 32}
    evaluate_stage: {}
    save_stage: {}

Every error names the file and the YAML path of the offending value, and the allowed values.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from lqframe.errors import LqframeError, RecipeError
from lqframe.numerics import PRECISIONS  # quantize_stage.precision (lqframe.executor)

__all__ = [
    "Recipe",
    "ComponentSpec",
    "Override",
    "DataSpec",
    "QuantizeStage",
    "ReconstructStage",
    "AllocateStage",
    "TuneStage",
    "WeightedObjective",
    "EvaluateStage",
    "SaveStage",
    "load_recipe",
    "parse_recipe",
    "apply_sets",
    "DEFAULT_RECIPE",
    "STAGE_ORDER",
    "SEQUENTIAL_MODES",
    "EXPERT_CALIBRATION",
    "ExpertsSpec",
    "PRECISIONS",
    "check_device",
]

STAGE_ORDER = ("allocate", "quantize", "reconstruct", "tune", "evaluate", "save")
#: quantize_stage.sequential: calibrate a block's linears together, or each input group in turn
SEQUENTIAL_MODES = ("block", "layer")
#: quantize_stage.experts.calibration: statistics of the tokens routed to each expert, or of all tokens
EXPERT_CALIBRATION = ("routed", "all")

DEFAULT_RECIPE = """\
# lqframe's default recipe: GPTQ int4 (group 64, float16 scale + 4-bit zero point per group; the
# quantizer's defaults: act-order with static groups) and a QERA-exact rank-32 correction (float16
# factors) that minimises each layer's output error, both fitted to 48 × 512 calibration tokens
# mixed from two domains (Python documentation and English news prose, 24 windows each),
# alternating three times (GPTQ on W − L·R, then QERA on W − Q: coordinate descent on the
# layer-output error, the best iterate kept); scored on held-out windows of both and of
# Wikipedia, a domain it never saw. Chosen from benchmarks/results/calibration.md: the best
# perplexity on every domain among the measured recipes within the 10-minute budget (on the
# default model 1.038 / 1.064 / 1.079 × float on pydoc / news / wiki; natural-order GPTQ in one
# pass: 1.044 / 1.074 / 1.091; calibrated on pydoc alone: 1.035 / 1.142 / 1.142).
data:
  source: pydoc
  calibration: [pydoc, news]
  seq_len: 512
  calibration_windows: 48
  evaluation_windows: 16
  seed: 0
quantize_stage:
  targets: [Linear]
  ignore: []
  quantizer: {name: gptq, bits: 4, group_size: 64}
reconstruct_stage:
  reconstructor: {name: qera-exact, rank: 32, iterations: 3}
evaluate_stage:
  float_baseline: true
  data: [pydoc, news, wiki]
save_stage: {}
"""


class _Ctx:
    """Where we are in the document, for error messages."""

    def __init__(self, origin: str, path: str = ""):
        self.origin = origin
        self.path = path

    def child(self, key: str | int) -> _Ctx:
        if isinstance(key, int):
            return _Ctx(self.origin, f"{self.path}[{key}]")
        return _Ctx(self.origin, f"{self.path}.{key}" if self.path else key)

    def error(self, message: str) -> RecipeError:
        where = f"{self.origin}: {self.path}" if self.path else self.origin
        return RecipeError(f"{where}: {message}")


def _mapping(value: Any, ctx: _Ctx, allowed: Sequence[str] | None = None) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ctx.error(f"expected a mapping, got {type(value).__name__} {value!r}")
    out = {}
    for key in value:
        if not isinstance(key, str):
            raise ctx.error(f"keys must be strings, got {key!r}")
        if allowed is not None and key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ctx.child(key).error(f"unknown key{hint} allowed: {', '.join(allowed)}")
        out[key] = value[key]
    return out


def _int(value: Any, ctx: _Ctx, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(f"expected an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ctx.error(f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ctx.error(f"must be <= {hi}, got {value}")
    return value


def _float(value: Any, ctx: _Ctx, lo: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.error(f"expected a number, got {value!r}")
    if lo is not None and value < lo:
        raise ctx.error(f"must be >= {lo}, got {value}")
    return float(value)


def _bool(value: Any, ctx: _Ctx) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(f"expected true or false, got {value!r}")
    return value


def _str(value: Any, ctx: _Ctx) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.error(f"expected a non-empty string, got {value!r}")
    return value


def _patterns(value: Any, ctx: _Ctx) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ctx.error(f"expected a list of patterns (strings), got {value!r}")
    return tuple(value)


# --------------------------------------------------------------------------- spec objects


@attrs.frozen
class ComponentSpec:
    """A component by registry name plus its options."""

    name: str
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    def merged(self, partial: Mapping[str, Any]) -> ComponentSpec:
        """Apply an override: a different ``name`` replaces the component, otherwise options merge."""
        partial = dict(partial)
        name = partial.pop("name", self.name)
        if name != self.name:
            return ComponentSpec(name, partial)
        return ComponentSpec(name, {**self.options, **partial})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


@attrs.frozen
class Override:
    targets: tuple[str, ...]
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)  # partial component spec


@attrs.frozen
class DataSpec:
    #: the text calibrated on and evaluated on, unless ``calibration`` / ``evaluate_stage.data`` say otherwise
    source: str = "pydoc"
    seq_len: int = 512
    #: calibration windows in all (split evenly among the calibration sources without a count of their own)
    calibration_windows: int = 16
    #: evaluation windows per evaluation source
    evaluation_windows: int = 16
    seed: int = 0
    #: calibration sources mixed, each ``(source, windows or None)``; empty: just ``source``
    calibration: tuple[tuple[str, int | None], ...] = ()

    def calibration_sources(self) -> tuple[tuple[str, int | None], ...]:
        return self.calibration or ((self.source, None),)


@attrs.frozen
class ExpertsSpec:
    """How the experts of a mixture-of-experts model are calibrated (``quantize_stage.experts``)."""

    #: ``routed``: each expert's statistics from the tokens its router sends it; ``all``: every expert
    #: also computes on every calibration token (statistics for rarely routed experts; outputs unchanged)
    calibration: str = "routed"
    #: a layer whose statistics cover fewer tokens than this is decomposed data-free (identity
    #: statistics), said in the log and the report: a count, or a percentage of the calibration tokens
    min_tokens: int | str = "0.5%"

    def threshold(self, total_tokens: int) -> int:
        """``min_tokens`` as a token count, for ``total_tokens`` calibration tokens."""
        if isinstance(self.min_tokens, str):
            return math.ceil(float(self.min_tokens.rstrip("%")) / 100 * total_tokens)
        return self.min_tokens


@attrs.frozen
class QuantizeStage:
    quantizer: ComponentSpec
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    sequential: str = "block"
    #: calibration / propagation forwards in float64 (results independent of the BLAS path) or float32
    precision: str = "float64"
    experts: ExpertsSpec = ExpertsSpec()
    #: ``from``: a GPTQ or compressed-tensors checkpoint whose Q the layers take as it is
    #: (lqframe.imports); the quantizer then only stands for the format in planning
    source: str | None = None


@attrs.frozen
class ReconstructStage:
    reconstructor: ComponentSpec
    overrides: tuple[Override, ...] = ()


@attrs.frozen
class AllocateStage:
    allocator: ComponentSpec
    #: every candidate configuration: the listed ``candidates``, then the ``grid``'s product
    candidates: tuple[Mapping[str, Any], ...]
    budget_bits: float | None = None
    include_lowrank: bool = False
    #: the per-matrix error the allocator sums: auto, output, fisher or weight (pipeline.layer_cost)
    metric: str = "auto"
    #: the on-disk cost cache: True (the default file), False (none) or a file path
    cache: bool | str = True
    #: keep the cost table's decompositions of the chosen candidates (made on the float model's
    #: statistics) instead of decomposing them again block by block on the compressed model's inputs
    reuse: bool = False


@attrs.frozen
class WeightedObjective:
    """One term of the tune stage's loss: a loss objective and its weight."""

    objective: ComponentSpec
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.objective.to_dict(), "weight": self.weight}


#: tune_stage.init: start from the reconstructor's factors, or RILQ's (R Gaussian with std 1/r, L = 0)
TUNE_INITS = ("keep", "rilq")
#: tune_stage.teacher: where the float model's outputs are kept between steps
TEACHER_STORES = ("memory", "disk")


@attrs.frozen
class TuneStage:
    """Train every LQLinear's L and R with Q frozen, against a weighted sum of loss objectives."""

    objectives: tuple[WeightedObjective, ...]
    #: factors to start from: the reconstructor's (``keep``) or RILQ's (``rilq``)
    init: str = "keep"
    #: the text tuned on (sources mixed, like data.calibration); empty: the calibration sources
    data: tuple[tuple[str, int | None], ...] = ()
    #: training windows and held-out validation windows (disjoint, none of them an evaluation window)
    windows: int = 64
    validation_windows: int = 16
    lr: float = 1e-4
    #: windows per micro-batch, and micro-batches per optimizer update
    batch_size: int = 1
    grad_accum: int = 8
    #: optimizer updates at most; validate every ``eval_every`` updates; stop after ``patience``
    #: validations without improvement (0: never stop early); the best validated state is kept
    max_updates: int = 250
    eval_every: int = 25
    patience: int = 5
    teacher: str = "memory"
    seed: int = 0


@attrs.frozen
class EvaluateStage:
    float_baseline: bool = True
    #: evaluation sources, each scored separately (the first is the run's headline figure); empty: data.source
    data: tuple[str, ...] = ()


@attrs.frozen
class SaveStage:
    max_shard_size_mb: int = 2000
    tokenizer: bool = True


#: values of the recipe's ``stream`` (lqframe.streaming): auto (when the float weights would not fit in
#: the memory available), true, false
STREAM_MODES = ("auto", "true", "false")
#: values of the recipe's ``activations``: where the activations between blocks live (auto: cpu with
#: offloaded blocks, else the device; disk: one file per window in the run's progress folder)
ACTIVATION_MODES = ("auto", "device", "cpu", "disk")
#: top-level keys that say where the work happens, not what it computes (the checkpoint is the same
#: bytes whatever they say): left out of the fingerprint, so a run resumes after they change
PLACEMENT_KEYS = ("offload", "stream", "activations")


@attrs.frozen
class Recipe:
    data: DataSpec = attrs.field(factory=DataSpec)
    model: str | None = None
    #: compute device: auto (CUDA when present), cpu, cuda, cuda:N; `lqframe run --device` overrides
    device: str = "auto"
    #: keep the blocks (and the activations between them) in CPU memory, one block on the device
    offload: bool = False
    #: stream the blocks from disk, never the whole model in memory: auto (when the float weights would
    #: not fit in the memory available), true, false (lqframe.streaming)
    stream: str = "auto"
    #: where the activations between blocks live: auto, device, cpu, disk (ACTIVATION_MODES)
    activations: str = "auto"
    quantize: QuantizeStage | None = None
    reconstruct: ReconstructStage | None = None
    allocate: AllocateStage | None = None
    tune: TuneStage | None = None
    evaluate: EvaluateStage | None = None
    save: SaveStage | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    origin: str = attrs.field(default="<recipe>", eq=False)

    def stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if getattr(self, s) is not None]

    def evaluation_sources(self) -> tuple[str, ...]:
        """What the evaluate stage scores (nothing without an evaluate stage)."""
        if self.evaluate is None:
            return ()
        return self.evaluate.data or (self.data.source,)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dict(self.raw), sort_keys=False)

    def fingerprint(self) -> str:
        """Hash of the recipe content (what must match for a run to be resumed), placement keys
        (:data:`PLACEMENT_KEYS`) left out."""
        content = {k: v for k, v in self.raw.items() if k not in PLACEMENT_KEYS}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- per-layer components -----------------------------------------------------------------
    def quantizer_for(self, name: str) -> ComponentSpec:
        return _resolve(self.quantize.quantizer, self.quantize.overrides, name)

    def reconstructor_for(self, name: str) -> ComponentSpec:
        if self.reconstruct is None:
            return ComponentSpec("none")
        return _resolve(self.reconstruct.reconstructor, self.reconstruct.overrides, name)


def _resolve(base: ComponentSpec, overrides: Sequence[Override], layer: str) -> ComponentSpec:
    from lqframe.models import select

    spec = base
    for ov in overrides:  # later overrides win
        if select([layer], list(ov.targets), []):
            spec = spec.merged(ov.options)
    return spec


# --------------------------------------------------------------------------- parsing

_TOP_KEYS = ("model", "device", "offload", "stream", "activations", "data") + tuple(f"{s}_stage" for s in STAGE_ORDER)


def _experts(value: Any, ctx: _Ctx) -> ExpertsSpec:
    e = _mapping(value, ctx, ("calibration", "min_tokens"))
    defaults = ExpertsSpec()
    calibration = _str(e.get("calibration", defaults.calibration), ctx.child("calibration"))
    if calibration not in EXPERT_CALIBRATION:
        raise ctx.child("calibration").error(f"must be one of {', '.join(EXPERT_CALIBRATION)}, got {calibration!r}")
    minimum = e.get("min_tokens", defaults.min_tokens)
    where = ctx.child("min_tokens")
    if isinstance(minimum, str):
        text = minimum.strip()
        try:
            share = float(text[:-1]) if text.endswith("%") else None
        except ValueError:
            share = None
        if share is None or not 0 <= share <= 100:
            raise where.error(f"must be a token count or a percentage such as '0.5%', got {minimum!r}")
        minimum = text
    else:
        minimum = _int(minimum, where, 0)
    return ExpertsSpec(calibration=calibration, min_tokens=minimum)


def _component(value: Any, ctx: _Ctx, kind: str) -> ComponentSpec:
    if isinstance(value, str):
        value = {"name": value}
    body = _mapping(value, ctx)
    if "name" not in body:
        raise ctx.error(f"the {kind} needs a 'name' (see `lqframe plugins` for the {kind}s installed)")
    name = _str(body.pop("name"), ctx.child("name"))
    return ComponentSpec(name, body)


def _overrides(value: Any, ctx: _Ctx, key: str) -> tuple[Override, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ctx.error("expected a list of overrides, each with 'targets' and '" + key + "'")
    out = []
    for i, item in enumerate(value):
        c = ctx.child(i)
        body = _mapping(item, c, ("targets", key))
        if "targets" not in body:
            raise c.error("an override needs 'targets'")
        partial = body.get(key, {})
        if isinstance(partial, str):
            partial = {"name": partial}
        out.append(Override(_patterns(body["targets"], c.child("targets")), _mapping(partial, c.child(key))))
    return tuple(out)


def _source(value: Any, ctx: _Ctx) -> str:
    from lqframe.data import SOURCE_FORMS

    if not isinstance(value, str) or not value:
        raise ctx.error(f"expected a data source ({', '.join(SOURCE_FORMS)}), got {value!r}")
    return value


def _source_list(value: Any, ctx: _Ctx) -> list[Any]:
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ctx.error(f"expected a non-empty list of data sources, got {value!r}")
    return value


def _calibration_sources(value: Any, ctx: _Ctx) -> tuple[tuple[str, int | None], ...]:
    """``data.calibration``: sources (strings) or ``{source: S, windows: N}`` mappings, mixed."""
    if value is None:
        return ()
    out: list[tuple[str, int | None]] = []
    for i, item in enumerate(_source_list(value, ctx)):
        c = ctx.child(i)
        if isinstance(item, Mapping):
            body = _mapping(item, c, ("source", "windows"))
            if "source" not in body:
                raise c.error("a calibration source needs 'source', e.g. {source: news, windows: 8}")
            windows = body.get("windows")
            out.append((_source(body["source"], c.child("source")),
                        None if windows is None else _int(windows, c.child("windows"), 0)))
        else:
            out.append((_source(item, c), None))
        if out[-1][0] in [s for s, _ in out[:-1]]:
            raise c.error(f"source {out[-1][0]!r} is listed twice")
    return tuple(out)


def _evaluation_sources(value: Any, ctx: _Ctx) -> tuple[str, ...]:
    if value is None:
        return ()
    out = tuple(_source(item, ctx.child(i)) for i, item in enumerate(_source_list(value, ctx)))
    if len(set(out)) != len(out):
        raise ctx.error(f"a source is listed twice: {list(out)}")
    return out


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(value: str, ctx: _Ctx | None = None) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when the run starts)."""
    if not _DEVICE_RE.match(value):
        message = f"device must be auto, cpu, cuda or cuda:N, got {value!r}"
        raise ctx.error(message) if ctx is not None else RecipeError(message)
    return value


def _candidate(value: Any, ctx: _Ctx) -> dict[str, dict[str, Any]]:
    """An allocation candidate: ``{quantizer: {...}, reconstructor: {...}}`` (either may be left
    out), or a bare mapping of quantizer options (``{bits: 3}``)."""
    body = _mapping(value, ctx)
    if set(body) & {"quantizer", "reconstructor"}:
        body = _mapping(body, ctx, ("quantizer", "reconstructor"))
        return {k: _mapping(body.get(k), ctx.child(k)) for k in ("quantizer", "reconstructor")}
    return {"quantizer": body, "reconstructor": {}}


#: LQ-LoRA's configuration space (METHODS.md §1.4) for the ``nf`` quantizer with its double
#: quantization: bits × first-level block × second-level bits × second-level block × scale format
LQLORA_GRID = {"quantizer": {"double_quant": ["lqlora"], "bits": [2, 3, 4, 8], "group_size": [16, 32, 64],
                             "dq_bits": [2, 3, 4, 8], "dq_group_size": [16, 64, 256],
                             "dq_scale_dtype": ["bfloat16", "float16", "float32"]}}


def _grid(value: Any, ctx: _Ctx) -> tuple[dict[str, dict[str, Any]], ...]:
    """The product of option lists: ``{quantizer: {bits: [2, 3, 4]}, reconstructor: {rank: [16, 64]}}``
    (a bare value is a list of one), or ``lqlora`` for LQ-LoRA's 432-configuration NF grid.
    Candidates come in row-major order: the last option varies fastest."""
    import itertools

    if value == "lqlora":
        value = LQLORA_GRID
    body = _mapping(value, ctx, ("quantizer", "reconstructor"))
    axes: list[tuple[str, str, list[Any]]] = []
    for kind in ("quantizer", "reconstructor"):
        options = _mapping(body.get(kind), ctx.child(kind))
        for key, values in options.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ctx.child(kind).child(key).error("expected a non-empty list of values")
            axes.append((kind, key, values))
    if not axes:
        raise ctx.error("a grid needs at least one option list, e.g. {quantizer: {bits: [2, 3, 4]}}")
    out = []
    for combo in itertools.product(*(values for _, _, values in axes)):
        cand: dict[str, dict[str, Any]] = {"quantizer": {}, "reconstructor": {}}
        for (kind, key, _), v in zip(axes, combo, strict=True):
            cand[kind][key] = v
        out.append(cand)
    return tuple(out)


_TUNE_KEYS = ("objectives", "objective", "init", "data", "windows", "validation_windows", "lr", "batch_size",
              "grad_accum", "max_updates", "eval_every", "patience", "teacher", "seed")


def _objectives(value: Any, ctx: _Ctx) -> tuple[WeightedObjective, ...]:
    """``model-loss``; ``{model-loss: 0.5, causal-lm: 0.5}`` (name: weight); or a list of names or
    ``{name, weight, ...options}`` mappings."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping) and "name" not in value:
        items = []
        for key, weight in value.items():
            if not isinstance(key, str):
                raise ctx.error(f"objective names must be strings, got {key!r}")
            items.append({"name": key, "weight": weight})
        value = items
    elif isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ctx.error("expected one or more loss objectives: a name, {name: weight, ...} or a list, e.g. "
                        "{model-loss: 0.5, causal-lm: 0.5}")
    out = []
    for i, item in enumerate(value):
        c = ctx.child(i)
        body = _mapping({"name": item} if isinstance(item, str) else item, c)
        weight = _float(body.pop("weight", 1.0), c.child("weight"), 0.0)
        out.append(WeightedObjective(_component(body, c, "objective"), weight))
    if not any(o.weight > 0 for o in out):
        raise ctx.error("every objective has weight 0: nothing to train against")
    return tuple(out)


def _tune_stage(value: Any, c: _Ctx, check_components: bool) -> TuneStage:
    s = _mapping(value, c, _TUNE_KEYS)
    if "objectives" in s and "objective" in s:
        raise c.error("give 'objectives' or 'objective', not both")
    key = "objectives" if "objectives" in s else "objective"
    if key not in s:
        raise c.error("tune_stage needs 'objectives', e.g. {model-loss: 0.5, causal-lm: 0.5} (RILQ); "
                      "see `lqframe plugins` for the objectives installed")
    objectives = _objectives(s[key], c.child(key))

    def choice(name: str, allowed: Sequence[str], default: str) -> str:
        v = s.get(name, default)
        if v not in allowed:
            raise c.child(name).error(f"expected one of {', '.join(allowed)}, got {v!r}")
        return v

    stage = TuneStage(
        objectives=objectives,
        init=choice("init", TUNE_INITS, "keep"),
        data=_calibration_sources(s.get("data"), c.child("data")),
        windows=_int(s.get("windows", 64), c.child("windows"), 1),
        validation_windows=_int(s.get("validation_windows", 16), c.child("validation_windows"), 0),
        lr=_float(s.get("lr", 1e-4), c.child("lr"), 0.0),
        batch_size=_int(s.get("batch_size", 1), c.child("batch_size"), 1),
        grad_accum=_int(s.get("grad_accum", 8), c.child("grad_accum"), 1),
        max_updates=_int(s.get("max_updates", 250), c.child("max_updates"), 1),
        eval_every=_int(s.get("eval_every", 25), c.child("eval_every"), 1),
        patience=_int(s.get("patience", 5), c.child("patience"), 0),
        teacher=choice("teacher", TEACHER_STORES, "memory"),
        seed=_int(s.get("seed", 0), c.child("seed")),
    )
    if stage.validation_windows == 0 and stage.patience > 0:
        raise c.child("patience").error("early stopping needs validation windows (validation_windows is 0); set "
                                        "patience: 0 or give validation_windows")
    if check_components:
        for i, o in enumerate(objectives):
            _check_component(o.objective, "objective", c.child(key).child(i))
    return stage


def _check_component(spec: ComponentSpec, kind: str, ctx: _Ctx) -> None:
    """Instantiate through the registry so unknown names and bad options fail now, with a path."""
    from lqframe.registry import registry

    try:
        registry().create(kind, spec.name, **spec.options)
    except LqframeError as exc:
        raise ctx.error(str(exc)) from None


def _check_with_overrides(base: ComponentSpec, overrides: Sequence[Override], kind: str, ctx: _Ctx) -> None:
    _check_component(base, kind, ctx.child(kind))
    for i, ov in enumerate(overrides):
        _check_component(base.merged(ov.options), kind, ctx.child("overrides").child(i).child(kind))


def parse_recipe(doc: Any, origin: str = "<recipe>", check_components: bool = True) -> Recipe:
    root = _Ctx(origin)
    body = _mapping(doc, root, _TOP_KEYS)
    kw: dict[str, Any] = {"raw": copy.deepcopy(body), "origin": origin}

    if body.get("model") is not None:
        kw["model"] = _str(body["model"], root.child("model"))
    if body.get("device") is not None:
        kw["device"] = check_device(_str(str(body["device"]), root.child("device")), root.child("device"))
    if "offload" in body:
        kw["offload"] = _bool(body["offload"], root.child("offload"))
    if "stream" in body:
        value = body["stream"]
        value = ("true" if value else "false") if isinstance(value, bool) else value
        if value not in STREAM_MODES:
            raise root.child("stream").error(f"expected auto, true or false, got {body['stream']!r}")
        kw["stream"] = value
    if "activations" in body:
        value = body["activations"]
        if value not in ACTIVATION_MODES:
            raise root.child("activations").error(f"expected one of {', '.join(ACTIVATION_MODES)}, got {value!r}")
        kw["activations"] = value

    c = root.child("data")
    d = _mapping(body.get("data"), c, [f.name for f in attrs.fields(DataSpec)])
    defaults = DataSpec()
    kw["data"] = DataSpec(
        source=_str(d.get("source", defaults.source), c.child("source")),
        calibration=_calibration_sources(d.get("calibration"), c.child("calibration")),
        seq_len=_int(d.get("seq_len", defaults.seq_len), c.child("seq_len"), 2),
        calibration_windows=_int(d.get("calibration_windows", defaults.calibration_windows),
                                 c.child("calibration_windows"), 0),
        evaluation_windows=_int(d.get("evaluation_windows", defaults.evaluation_windows),
                                c.child("evaluation_windows"), 0),
        seed=_int(d.get("seed", defaults.seed), c.child("seed")),
    )

    if "quantize_stage" in body:
        c = root.child("quantize_stage")
        s = _mapping(body["quantize_stage"], c, ("targets", "ignore", "quantizer", "overrides", "sequential",
                                                  "precision", "experts", "from"))
        source = _str(s["from"], c.child("from")) if "from" in s else None
        if "quantizer" not in s and source is None:
            raise c.error("quantize_stage needs a 'quantizer', e.g. {name: nf, bits: 4, group_size: 64}, or "
                          "'from': a quantized checkpoint whose Q to take")
        stage = QuantizeStage(
            # with 'from' and no quantizer: rtn stands for the imported format in planning (no statistics)
            quantizer=_component(s.get("quantizer", "rtn"), c.child("quantizer"), "quantizer"),
            targets=_patterns(s.get("targets", ["Linear"]), c.child("targets")),
            ignore=_patterns(s.get("ignore", []), c.child("ignore")),
            overrides=_overrides(s.get("overrides"), c.child("overrides"), "quantizer"),
            sequential=_str(s.get("sequential", "block"), c.child("sequential")),
            precision=_str(s.get("precision", "float64"), c.child("precision")),
            experts=_experts(s.get("experts"), c.child("experts")),
            source=source,
        )
        if stage.sequential not in SEQUENTIAL_MODES:
            raise c.child("sequential").error(f"must be 'block' or 'layer', got {stage.sequential!r}")
        if stage.precision not in PRECISIONS:
            raise c.child("precision").error(f"must be 'float64' or 'float32', got {stage.precision!r}")
        if check_components:
            _check_with_overrides(stage.quantizer, stage.overrides, "quantizer", c)
        kw["quantize"] = stage

    if "reconstruct_stage" in body:
        c = root.child("reconstruct_stage")
        s = _mapping(body["reconstruct_stage"], c, ("reconstructor", "overrides"))
        if "reconstructor" not in s:
            raise c.error("reconstruct_stage needs a 'reconstructor', e.g. {name: svd, rank: 32}")
        if "quantize_stage" not in body:
            raise c.error("a reconstruct_stage needs a quantize_stage (it corrects a quantizer's error): a "
                          "quantizer, or from: a quantized checkpoint (lqframe run --from)")
        stage = ReconstructStage(
            reconstructor=_component(s["reconstructor"], c.child("reconstructor"), "reconstructor"),
            overrides=_overrides(s.get("overrides"), c.child("overrides"), "reconstructor"),
        )
        if check_components:
            _check_with_overrides(stage.reconstructor, stage.overrides, "reconstructor", c)
        kw["reconstruct"] = stage

    if "allocate_stage" in body:
        c = root.child("allocate_stage")
        s = _mapping(body["allocate_stage"], c, ("allocator", "candidates", "grid", "budget_bits", "include_lowrank",
                                                  "metric", "cache", "reuse"))
        if "quantize_stage" not in body:
            raise c.error("an allocate_stage chooses quantizer options per layer: it needs a quantize_stage")
        cands = s.get("candidates", [] if "grid" in s else None)
        if not isinstance(cands, list) or not (cands or "grid" in s):
            raise c.child("candidates").error("expected a non-empty list of quantizer option sets, e.g. "
                                              "[{bits: 4}, {bits: 3}] (or a grid: of option lists)")
        candidates = tuple(_candidate(x, c.child("candidates").child(i)) for i, x in enumerate(cands))
        if "grid" in s:
            candidates += _grid(s["grid"], c.child("grid"))
        budget = s.get("budget_bits")
        metric = s.get("metric", "auto")
        if metric not in ("auto", "output", "fisher", "weight"):
            raise c.child("metric").error(f"expected auto, output, fisher or weight, got {metric!r}")
        cache = s.get("cache", True)
        if not isinstance(cache, bool | str) or cache == "":
            raise c.child("cache").error(f"expected true, false or a file path, got {cache!r}")
        stage = AllocateStage(
            allocator=_component(s.get("allocator", "uniform"), c.child("allocator"), "allocator"),
            candidates=candidates,
            budget_bits=None if budget is None else _float(budget, c.child("budget_bits"), 0.0),
            include_lowrank=_bool(s.get("include_lowrank", False), c.child("include_lowrank")),
            metric=metric,
            cache=cache,
            reuse=_bool(s.get("reuse", False), c.child("reuse")),
        )
        if kw["quantize"].source is not None:  # the quantizer is the imported Q: ranks are what is left to choose
            listed = len(cands)
            for i, cand in enumerate(candidates):
                if cand["quantizer"]:
                    where = c.child("candidates").child(i) if i < listed else c.child("grid").child(i - listed)
                    raise where.error(f"quantize_stage.from fixes Q: a candidate may set only reconstructor options "
                                      f"(e.g. {{reconstructor: {{rank: 16}}}}), not quantizer {cand['quantizer']}")
            if not stage.include_lowrank:
                raise c.child("include_lowrank").error(
                    "with quantize_stage.from every candidate stores the same Q: set include_lowrank: true so the "
                    "budget counts the low-rank terms the allocation chooses between")
        if check_components:
            _check_component(stage.allocator, "allocator", c.child("allocator"))
            recon = kw["reconstruct"].reconstructor if "reconstruct" in kw else ComponentSpec("none")
            listed = len(cands)
            for i, cand in enumerate(candidates):  # the grid's candidates are numbered in its row-major order
                where = c.child("candidates").child(i) if i < listed else c.child("grid").child(i - listed)
                _check_component(kw["quantize"].quantizer.merged(cand["quantizer"]), "quantizer", where)
                _check_component(recon.merged(cand["reconstructor"]), "reconstructor", where)
        kw["allocate"] = stage

    if "tune_stage" in body:
        kw["tune"] = _tune_stage(body["tune_stage"], root.child("tune_stage"), check_components)

    if "evaluate_stage" in body:
        c = root.child("evaluate_stage")
        s = _mapping(body["evaluate_stage"], c, ("float_baseline", "data"))
        kw["evaluate"] = EvaluateStage(float_baseline=_bool(s.get("float_baseline", True), c.child("float_baseline")),
                                       data=_evaluation_sources(s.get("data"), c.child("data")))

    if "save_stage" in body:
        c = root.child("save_stage")
        s = _mapping(body["save_stage"], c, ("max_shard_size_mb", "tokenizer"))
        kw["save"] = SaveStage(
            max_shard_size_mb=_int(s.get("max_shard_size_mb", 2000), c.child("max_shard_size_mb"), 1),
            tokenizer=_bool(s.get("tokenizer", True), c.child("tokenizer")),
        )

    recipe = Recipe(**kw)
    if not recipe.stages():
        raise root.error(f"the recipe names no stage; add one or more of: "
                         f"{', '.join(s + '_stage' for s in STAGE_ORDER)}")
    return recipe


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_sets(doc: Mapping[str, Any], sets: Sequence[str], origin: str = "--set") -> dict[str, Any]:
    """Apply ``key.sub=value`` assignments (values parsed as YAML) to a recipe document."""
    out = copy.deepcopy(dict(doc))
    for item in sets:
        if "=" not in item:
            raise RecipeError(f"{origin} {item!r}: expected KEY=VALUE, e.g. quantize_stage.quantizer.bits=3")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"{origin} {item!r}: empty key")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise RecipeError(f"{origin} {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return out


def load_recipe(path: str | Path | None = None, sets: Sequence[str] = (), check_components: bool = True) -> Recipe:
    """Read a recipe file (``None``: the built-in default), apply ``--set`` overrides, validate."""
    if path is None:
        origin, text = "default recipe", DEFAULT_RECIPE
    else:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise RecipeError(f"{origin}: no such recipe file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{origin}: cannot read the recipe: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{origin}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if doc is None:
        raise RecipeError(f"{origin}: the recipe is empty")
    if not isinstance(doc, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of stages, got {type(doc).__name__}")
    if sets:
        doc = apply_sets(doc, sets)
    return parse_recipe(doc, origin, check_components)
