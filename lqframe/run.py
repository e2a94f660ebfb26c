"""The main job: ``lqframe run`` — load, calibrate, compress block by block, evaluate, save.

Resumable: after every block the finished layers and the next block's inputs are written
(atomically) to ``OUTPUT/.lqframe-partial/``; the same command started again continues from the
last finished block and produces the same checkpoint.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lqframe.checkpoint import atomic_write_json, save_checkpoint, save_tensors
from lqframe.distributed import SINGLE, Group, group_from_env
from lqframe.engine import COMPRESSION_STAGES, RunState, coverage_report, execute, perplexity_table, versions
from lqframe.errors import LqframeError
from lqframe.executor import BlockSink, resolve_device
from lqframe.lqlinear import LQLinear
from lqframe.pipeline import LayerResult, set_module, summarize
from lqframe.recipe import ACTIVATION_MODES, Recipe
from lqframe.tune import TUNE_STATE

__all__ = ["run", "compress", "default_output", "peak_rss_mb", "format_table"]

PARTIAL = ".lqframe-partial"
#: files and folders a run writes into its output folder (what --overwrite may remove)
_OWN = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json|"
    r"recipe\.yaml|report\.json|tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|"
    r"chat_template\.(jinja|json)|added_tokens\.json|\.lqframe-partial|\.lqframe-lock|\..*\.tmp|\.tokenizer-.*)$"
)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0


def default_output(model_spec: str | None) -> Path:
    name = "smollm2-135m-instruct" if model_spec in (None, "default") else Path(str(model_spec)).name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")).strip("-").lower() or "model"
    return Path("runs") / slug


# --------------------------------------------------------------------------- output folder


class CheckpointSink(BlockSink):
    """The run's sink: progress of an unfinished run inside the output folder (``.lqframe-partial``:
    one safetensors file per finished block, the next block's inputs, ``progress.json`` as the
    commit point), and the final checkpoint (the save stage)."""

    def __init__(self, out: Path, identity: dict[str, Any]):
        self.out = out
        self.dir = out / PARTIAL
        self.identity = identity
        self.state: RunState | None = None
        self.finish: Callable[[RunState], dict[str, Any]] | None = None  # builds the report
        self.tokenizer: Any = None  # saved with the checkpoint
        self.progress: dict[str, Any] = self._fresh()
        #: a streamed model's blocks (lqframe.streaming.ShardSource): finished blocks stay on disk
        self.source: Any = None
        self._partial: dict[str, Path] | None = None
        #: the processes of the run: the first writes the progress and the checkpoint, each the next
        #: block's inputs of its own windows
        self.group = SINGLE

    def _fresh(self) -> dict[str, Any]:
        return {"identity": self.identity, "finished_block": -1, "layers": [], "layer_configs": {}, "fp_ppl": {}}

    def load(self) -> bool:
        path = self.dir / "progress.json"
        if not path.is_file():
            return False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        if data.get("identity") != self.identity:
            return False
        self.progress = data
        return True

    def save_progress(self) -> None:
        if self.group.leader:
            atomic_write_json(self.dir / "progress.json", self.progress)

    def check_data(self, data_sets, tuning=None) -> None:
        """A resumed run must see the very same token windows (text, tokenizer and lqframe alike)."""
        data = {**data_sets.record(), "checksum": data_sets.checksum()}
        if tuning is not None:
            data["tuning"] = {**tuning.record(), "checksum": tuning.checksum()}
        if self.progress.get("data") is None:
            self.progress["data"] = data
            self.save_progress()
            self.group.barrier()
        elif self.progress["data"] != data:
            raise LqframeError(f"the unfinished run in {self.out} used other data windows than this one (the text, "
                               "tokenizer or lqframe version changed); pass --overwrite to start afresh")

    def reset(self) -> None:
        data = self.progress.get("data")
        self.group.barrier()
        if self.group.leader:
            for f in self.dir.glob("*.safetensors"):
                f.unlink(missing_ok=True)
            (self.dir / TUNE_STATE).unlink(missing_ok=True)  # it tuned the layers being discarded
        self.progress = {**self._fresh(), "data": data}
        self.save_progress()
        self.group.barrier()

    def _inputs_name(self, block: int) -> str:
        g = self.group
        return f"inputs-{block:05d}.safetensors" if not g.active else f"inputs-{block:05d}-{g.rank}.safetensors"

    def write(self, block: int, module, results: list[LayerResult], inputs) -> None:
        model = self.state.model
        tensors = {}
        for r in results:
            layer = model.get_submodule(r.name)
            for key, t in layer.state_dict().items():
                tensors[f"{r.name}.{key}"] = t
            self.progress["layer_configs"][r.name] = layer.layer_config()
        if self.group.leader:
            save_tensors(self.dir / f"block-{block:05d}.safetensors", tensors)
        if inputs is not None:  # each process its own windows', keyed by window
            first = self.group.bounds(len(self.state.calibration))[0]
            save_tensors(self.dir / self._inputs_name(block + 1), {f"x.{first + i}": x for i, x in enumerate(inputs)})
        self.group.barrier()  # every process's inputs are on disk before the commit
        self.progress["finished_block"] = block
        self.progress["fp_ppl"] = dict(self.state.fp_ppls)
        self.progress["layers"] += [r.as_dict() for r in results]
        self.save_progress()  # the commit point
        self.group.barrier()
        keep = self._inputs_name(block + 1)
        mine = "inputs-*.safetensors" if not self.group.active else f"inputs-*-{self.group.rank}.safetensors"
        for old in self.dir.glob(mine):
            if old.name != keep:
                old.unlink(missing_ok=True)

    def next_block(self) -> int:
        return int(self.progress["finished_block"]) + 1

    def work_dir(self) -> Path:
        return self.dir

    def _restore_layers(self, model, block: int, device: torch.device | None = None) -> bool:
        """Put block ``block``'s compressed layers back into ``model`` from its file (on ``device``,
        else where the layer it replaces is); False when the block has no file."""
        path = self.dir / f"block-{block:05d}.safetensors"
        if not path.is_file():
            return False  # not finished, or a block without compressed layers
        with safe_open(path, framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        for name, cfg in self.progress["layer_configs"].items():
            prefix = name + "."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not own:
                continue
            where = device if device is not None else model.get_submodule(name).weight.device
            module = LQLinear.from_layer_config(cfg)
            module.load_state_dict(own)
            set_module(model, name, module.to(where))
        return True

    def restore_block(self, index: int, block, device: torch.device) -> bool:
        """A streamed model's finished block ``index``: its compressed layers from disk (the source's
        ``restore``)."""
        if index > int(self.progress["finished_block"]):
            return False
        return self._restore_layers(self.state.model, index, device)

    def restore(self, model) -> tuple[int, list[torch.Tensor] | None, list[LayerResult]]:
        """Swap the finished layers back in (a streamed model: as empty skeletons, read again when their
        block is loaded); return (next block, its inputs, finished results)."""
        done = int(self.progress["finished_block"])
        if done < 0:
            return 0, None, []
        if self.source is not None:
            for name, cfg in self.progress["layer_configs"].items():
                with torch.device("meta"):
                    set_module(model, name, LQLinear.from_layer_config(cfg))
        else:
            for b in range(done + 1):
                self._restore_layers(model, b)
        inputs = None
        found: dict[int, Path] = {}  # window → file, whatever number of processes wrote them
        for path in self.dir.glob(f"inputs-{done + 1:05d}*.safetensors"):
            with safe_open(path, framework="pt") as fh:
                found.update({int(k.split(".")[1]): path for k in fh.keys()})
        if found:
            n = len(self.state.calibration) if self.state is not None and self.state.calibration is not None \
                else len(found)
            lo, hi = self.group.bounds(n)
            if set(range(n)) <= found.keys():
                inputs = []
                for w in range(lo, hi):
                    with safe_open(found[w], framework="pt") as fh:
                        inputs.append(fh.get_tensor(f"x.{w}"))
        results = [LayerResult(**r) for r in self.progress["layers"]]
        return done + 1, inputs, results

    def fetch(self, name: str) -> torch.Tensor:
        """A streamed model's tensor ``name`` from disk: a compressed layer's from its block file, any
        other from the model's own weights in the run's dtype (what a resident model holds)."""
        if self._partial is None:
            self._partial = {}
            for path in sorted(self.dir.glob("block-*.safetensors")):
                with safe_open(path, framework="pt") as fh:
                    self._partial.update(dict.fromkeys(fh.keys(), path))
        path = self._partial.get(name)
        if path is None:
            return self.source.stored([name])[name]
        with safe_open(path, framework="pt") as fh:
            return fh.get_tensor(name)

    def save(self, state: RunState) -> None:
        recipe = state.recipe
        report = self.finish(state)
        self.group.barrier()
        if self.group.leader:
            save_checkpoint(state.model, self.out, recipe_yaml=recipe.to_yaml(), report=report,
                            tokenizer=self.tokenizer if recipe.save.tokenizer else None,
                            max_shard_size_mb=recipe.save.max_shard_size_mb,
                            fetch=self.fetch if self.source is not None else None)
            self.remove()
        self.group.barrier()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _lock(out: Path) -> Path:
    """One run per output folder: a lock file holding the writer's pid (stale locks are taken over)."""
    import os

    lock = out / ".lqframe-lock"
    if lock.exists():
        try:
            pid = int(lock.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        alive = False
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if alive:
            raise LqframeError(f"another lqframe run (pid {pid}) is writing to {out}; wait for it or choose "
                               "another --output")
    lock.write_text(str(os.getpid()))
    return lock


def _prepare_output(out: Path, identity: dict[str, Any], overwrite: bool, log: Callable[[str], None]
                    ) -> CheckpointSink:
    partial = CheckpointSink(out, identity)
    if out.exists() and not out.is_dir():
        raise LqframeError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _lock(out)
    entries = [e for e in out.iterdir() if e.name != ".lqframe-lock"]
    if not entries:
        return partial
    if (out / "report.json").exists() or not (out / PARTIAL).exists() or not partial.load():
        if not overwrite:
            what = "a finished checkpoint" if (out / "report.json").exists() else (
                "an unfinished run of a different recipe or model" if (out / PARTIAL).exists() else "other files")
            raise LqframeError(f"output folder {out} already holds {what}; pass --overwrite to replace it, "
                               "or choose another --output")
        foreign = [e.name for e in entries if not _OWN.match(e.name)]
        if foreign:
            raise LqframeError(f"refusing to overwrite {out}: it contains files lqframe did not write "
                               f"({', '.join(sorted(foreign)[:5])})")
        for e in entries:
            shutil.rmtree(e) if e.is_dir() else e.unlink()
        return CheckpointSink(out, identity)
    log(f"resuming the unfinished run in {out} after block {partial.progress['finished_block']}")
    return partial


# --------------------------------------------------------------------------- table


def format_table(report: dict[str, Any]) -> str:
    rows = report.get("layers", [])
    head = (f"{'layer':<44} {'quant':<6} {'bits':>4} {'group':>5} {'rank':>4} {'b/param':>8} {'+LR':>7} "
            f"{'w err':>7} {'out err':>7} {'sec':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        numel = max(r["numel"], 1)
        out_err = "-" if r["rel_output_error"] is None else f"{r['rel_output_error']:.4f}"
        lines.append(
            f"{r['name'][-44:]:<44} {r['quantizer'][:6]:<6} {r['bits'] or '-':>4} {r['group_size'] or '-':>5} "
            f"{r['rank']:>4} {r['storage_bits'] / numel:>8.3f} {(r['storage_bits'] + r['lowrank_bits']) / numel:>7.3f} "
            f"{r['rel_weight_error']:>7.4f} {out_err:>7} {r['seconds']:>6.2f}"
        )
    lines.append("-" * len(head))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    table = report.get("perplexity") or {"": {"float": report.get("fp_ppl"), "compressed": report.get("ppl")}}
    ppl = "; ".join(f"{(source + ' ') if source else ''}fp ppl {fmt(v.get('float'))} → ppl {fmt(v.get('compressed'))}"
                    for source, v in table.items())
    lines.append(
        f"total: {len(rows)} layers, {report.get('params', 0):,} params, avg bits {fmt(report.get('avg_bits'))} "
        f"(with low-rank {fmt(report.get('avg_bits_with_lowrank'))}); {ppl}; {report.get('seconds', 0):.1f} s, "
        f"peak RSS {report.get('peak_rss_mb', 0):.0f} MB"
    )
    fallback = report.get("data_free") or {}
    if fallback:
        shown = ", ".join(f"{name} ({tokens})" for name, tokens in list(fallback.items())[:4])
        more = f" and {len(fallback) - 4} more" if len(fallback) > 4 else ""
        lines.append(f"decomposed data-free (too few calibration tokens): {shown}{more}")
    cov = report.get("coverage")
    if cov:
        lines.append(
            f"everything stored: {fmt(cov.get('bits_per_param_blocks'))} bits per parameter over the blocks "
            f"({cov['block_params']:,} params, {1 - cov['untargeted_block_fraction']:.1%} compressed), "
            f"{fmt(cov.get('bits_per_param_model'))} over the whole model ({cov['model_params']:,})")
        left = cov.get("left_in_float") or []
        if left:
            shown = ", ".join(f"{r['name']} {tuple(r['shape'])} {r['dtype']}" for r in left[:4])
            more = f" and {len(left) - 4} more" if len(left) > 4 else ""
            lines.append(f"left in float: {shown}{more}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the job


def _windows(recipe: Recipe, tokenizer):
    """The run's windows: calibration mixed from ``data.calibration`` (when there is a quantize
    stage), evaluation per source of ``evaluate_stage.data`` (when there is an evaluate stage)."""
    from lqframe.data import make_data

    d = recipe.data
    if tokenizer is None:
        raise LqframeError("the model has no tokenizer; lqframe needs one to read calibration and evaluation text")
    calibration = d.calibration_sources() if recipe.quantize is not None else ()
    return make_data(tokenizer, calibration, recipe.evaluation_sources(), d.seq_len, d.calibration_windows,
                     d.evaluation_windows, d.seed)


def _tuning_windows(recipe: Recipe, tokenizer):
    """The tune stage's training and validation windows (None without a tune stage), from
    ``tune_stage.data`` or else the calibration sources, never an evaluation window."""
    from lqframe.data import make_tuning_windows

    stage = recipe.tune
    if stage is None:
        return None
    d = recipe.data
    return make_tuning_windows(tokenizer, stage.data or d.calibration_sources(), d.seq_len, stage.windows,
                               stage.validation_windows, d.evaluation_windows, d.seed)


def _describe(data) -> str:
    cal = " + ".join(f"{len(idx)} × {s}" for s, idx in data.calibration_sources) or "none"
    ev = ", ".join(f"{len(idx)} × {s}" for s, idx in data.evaluation_sources) or "none"
    return f"data: windows of {data.seq_len} tokens; calibration {cal}; evaluation {ev}"


def run(
    recipe: Recipe,
    model_spec: str | None = None,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    device: str | None = None,
    offload: bool | None = None,
    stream: str | bool | None = None,
    activations: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Run a recipe end to end and return the report (also written to ``OUTPUT/report.json``).
    ``device`` / ``offload`` / ``stream`` (auto, true, false: :mod:`lqframe.streaming`) /
    ``activations`` (auto, device, cpu, disk) override the recipe's (``auto``: CUDA when present;
    streamed when the model would not fit in memory; activations on the device, or in CPU memory
    with offloaded blocks)."""
    from lqframe import __version__

    t_start = time.perf_counter()
    spec = model_spec or recipe.model or "default"
    out = Path(output) if output is not None else default_output(spec)
    dev = resolve_device(device if device is not None else recipe.device)
    offload = recipe.offload if offload is None else offload
    if isinstance(stream, bool):
        stream = "true" if stream else "false"
    if activations is not None and activations not in ACTIVATION_MODES:
        raise LqframeError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
    place = {"stream": stream, "activations": activations}
    group = group_from_env(dev)
    if not group.leader:  # one process speaks and draws progress bars
        log, progress = (lambda s: None), False
    if recipe.save is None:
        return _run(recipe, spec, out, None, dev, offload, progress, log, t_start, group, **place)
    identity = {"recipe": recipe.fingerprint(), "model": spec, "lqframe": __version__}
    sink = None
    try:
        if group.leader:
            sink = _prepare_output(out, identity, overwrite, log)  # takes the folder's lock
        group.barrier()
        if sink is None:  # the other processes follow the folder the first one prepared
            sink = CheckpointSink(out, identity)
            sink.load()
        sink.group = group
        return _run(recipe, spec, out, sink, dev, offload, progress, log, t_start, group, **place)
    finally:
        if group.leader:
            (out / ".lqframe-lock").unlink(missing_ok=True)


def _run(recipe: Recipe, spec: str, out: Path, sink: CheckpointSink | None, device: torch.device, offload: bool,
         progress: bool, log, t_start: float, group: Group = SINGLE, stream: str | None = None,
         activations: str | None = None) -> dict[str, Any]:
    from lqframe.models import find_blocks, load_model, resolve_model
    from lqframe.streaming import ShardSource, float_bytes, load_streaming, should_stream

    source = None
    info = resolve_model(spec)
    if should_stream(stream if stream is not None else recipe.stream, info):
        log(f"loading model {spec} (streamed: its blocks stay on disk, one in memory at a time) …")
        loaded, reader = load_streaming(spec)
        log(f"streaming {len(find_blocks(loaded.model)[1])} blocks from {reader.folder} "
            f"({float_bytes(reader.folder) / 2**30:.2f} GiB as float32)")
        source = ShardSource(loaded.model, reader, torch.float32)
    else:
        log(f"loading model {spec} …")
        loaded = load_model(spec)
    windows = _windows(recipe, loaded.tokenizer)
    tuning = _tuning_windows(recipe, loaded.tokenizer)
    log(f"{_describe(windows)}; device {device}" + (" (blocks offloaded to CPU memory)" if offload else ""))
    if tuning is not None:
        log(f"tuning: {len(tuning.train)} training + {len(tuning.validation)} validation windows of "
            + " + ".join(f"{len(idx)} × {s}" for s, idx in tuning.sources))
    state = RunState(recipe, loaded.model, device=device, offload=offload, calibration=windows.calibration,
                     evaluation=windows.evaluation or None, task=loaded.task, progress=progress, log=log,
                     tuning=tuning, source=source, group=group, activations=activations or recipe.activations)

    def finish(st: RunState) -> dict[str, Any]:
        return {
            "model": spec,
            "recipe": recipe.origin,
            "fp_ppl": st.fp_ppl,
            "ppl": st.ppl,
            "perplexity": perplexity_table(st),
            **summarize(st.results),
            "coverage": coverage_report(st),
            "seconds": time.perf_counter() - t_start,
            "peak_rss_mb": peak_rss_mb(),
            "peak_device_mb": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None),
            "versions": versions(st),
            "processes": st.group.world,
            "streamed": st.streaming,
            "data": windows.record(),
            "stages": recipe.stages(),
            "stage_seconds": dict(st.timings),
            "allocation": st.allocation,
            "tuning": None if st.tuned is None else {**st.tuned, "data": tuning.record()},
            "layers": [r.as_dict() for r in st.results],
        }

    if sink is not None:
        sink.check_data(windows, tuning)
        sink.state, sink.finish, sink.tokenizer = state, finish, loaded.tokenizer
        state.sink = sink
        if source is not None:
            sink.source = source
            source.restore = sink.restore_block
        fp = sink.progress.get("fp_ppl")
        state.fp_ppls = dict(fp) if isinstance(fp, dict) else {}
    execute(state)
    report = finish(state)
    if sink is not None:
        report["output"] = str(out)
    return report


def compress(model, recipe: Recipe, calibration: torch.Tensor | None = None, *, device: str | None = None,
             offload: bool | None = None, progress: bool = True,
             tuning: tuple[torch.Tensor, torch.Tensor] | Any = None) -> list[LayerResult]:
    """Compress an already-loaded model in place (Python API); returns the per-layer results. The
    model ends on the compute device (``device``, else the recipe's, else CUDA when present).
    ``tuning``: the tune stage's ``(training, validation)`` windows (or a
    :class:`~lqframe.data.TuningWindows`), needed when the recipe has a tune stage."""
    if isinstance(tuning, tuple):
        from lqframe.data import TuningWindows

        train, val = tuning
        tuning = TuningWindows(train=train, validation=val, seq_len=int(train.shape[1]), seed=0, sources=(),
                               total_tokens={})
    state = RunState(recipe, model, device=resolve_device(device if device is not None else recipe.device),
                     offload=recipe.offload if offload is None else offload, calibration=calibration,
                     progress=progress, log=lambda s: None, tuning=tuning)
    execute(state, only=COMPRESSION_STAGES)
    return state.results
