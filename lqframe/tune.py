"""The tune stage: train every ``LQLinear``'s L and R with Q frozen against a weighted sum of loss
objectives (RILQ: ``0.5·model-loss + 0.5·causal-lm``; fine-tuning on a user's text: ``causal-lm``).

* **Teacher outputs** are computed once, from the float model before any layer is replaced
  (:func:`compute_teacher`, the engine's ``teacher`` stage), for the training and validation
  windows, and kept in CPU memory or in files in the run's folder (``tune_stage.teacher``); they
  are never recomputed. Only what the objectives declare is kept: ``hidden`` (the final hidden
  state after the last norm), ``blocks`` (each decoder block's output). The teacher's ``logits``
  are the model's own, unchanged head applied to the kept hidden state, checked once against the
  model's forward.
* **Training** (:func:`tune`): Adam on float32 master copies of the factors, gradient accumulation,
  a fixed seeded order of the windows, validation every ``eval_every`` updates (the weighted loss
  and the perplexity on the held-out windows, the initial state included), early stopping after
  ``patience`` validations without improvement, and the best validated state restored at the end.
  Factors stored in a low-precision format (float16, bfloat16, int8) are rounded to it after every
  step (the master keeps the small updates), so the model evaluated is exactly the model saved.
* **Resumable**: after every validation the masters, the optimizer, the best state and the history
  go to ``tune-state.pt`` in the run's progress folder (atomically); a run started again continues
  from there and ends with the same factors, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from lqframe.checkpoint import _atomic, atomic_write_json, save_tensors
from lqframe.distributed import SINGLE, Group
from lqframe.errors import LqframeError, ModelError, RecipeError
from lqframe.evaluate import next_token_nll
from lqframe.factors import round_factor
from lqframe.interfaces import LossObjective
from lqframe.lqlinear import LQLinear, set_weight_cache
from lqframe.models import find_blocks
from lqframe.recipe import TuneStage

__all__ = ["Objectives", "TeacherStore", "model_outputs", "compute_teacher", "tune", "TUNE_STATE"]

#: the tune stage's own checkpoint, in the run's progress folder
TUNE_STATE = "tune-state.pt"
#: the teacher files' folder, in the run's progress folder
TEACHER_DIR = "teacher"


# --------------------------------------------------------------------------- objectives


@attrs.define
class Objectives:
    """The stage's weighted objectives and what they need from teacher and student."""

    terms: list[tuple[str, LossObjective, float]]

    @classmethod
    def from_stage(cls, stage: TuneStage) -> Objectives:
        from lqframe.registry import registry

        reg = registry()
        return cls([(o.objective.name, reg.create("objective", o.objective.name, **o.objective.options), o.weight)
                    for o in stage.objectives])

    @property
    def teacher_needs(self) -> frozenset[str]:
        return frozenset().union(*(frozenset(obj.needs) for _, obj, _ in self.terms))

    @property
    def student_needs(self) -> frozenset[str]:
        return frozenset().union(*(obj.student_needs() for _, obj, _ in self.terms))

    def stored(self) -> frozenset[str]:
        """What the teacher store keeps: logits are rebuilt from the hidden state by the head."""
        needs = self.teacher_needs
        return (needs - {"logits"}) | ({"hidden"} if "logits" in needs else frozenset())

    def loss(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
             batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum and each term's value."""
        total, parts = None, {}
        for name, obj, weight in self.terms:
            value = obj.loss(student, teacher, batch)
            parts[name] = float(value.detach())
            if weight:
                total = weight * value if total is None else total + weight * value
        return total, parts


# --------------------------------------------------------------------------- model outputs


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or decoder is model:
        raise ModelError(f"tuning needs a causal LM with a separate decoder (get_decoder()) and head; "
                         f"{type(model).__name__} has none")
    return decoder


def _head(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ModelError(f"tuning needs the model's language-model head; {type(model).__name__} has no "
                         "get_output_embeddings()")
    return head


def _call_kwargs(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and getattr(config, "use_cache", None) is not None else {}


@contextmanager
def _block_outputs(model: nn.Module, enabled: bool) -> Iterator[list[torch.Tensor]]:
    out: list[torch.Tensor] = []
    if not enabled:
        yield out
        return
    _, blocks = find_blocks(model)

    def keep(module, args, output) -> None:
        out.append(output[0] if isinstance(output, tuple) else output)

    handles = [b.register_forward_hook(keep) for b in blocks]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def model_outputs(model: nn.Module, input_ids: torch.Tensor, names: frozenset[str],
                  decoder: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The named outputs (:data:`lqframe.types.OUTPUT_NAMES`) of ``model`` on ``input_ids``, in the
    current grad mode: ``hidden`` from the decoder (after its last norm), ``logits`` = head(hidden),
    ``blocks`` every decoder block's output, stacked. ``decoder``: the module to call in place of
    the model's decoder (its DistributedDataParallel wrapper)."""
    with _block_outputs(model, "blocks" in names) as blocks:
        out = (decoder or _decoder(model))(input_ids=input_ids, **_call_kwargs(model))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    result = {}
    if "hidden" in names:
        result["hidden"] = hidden
    if "logits" in names:
        result["logits"] = _head(model)(hidden)
    if "blocks" in names:
        result["blocks"] = torch.stack(blocks)
    return result


# --------------------------------------------------------------------------- the teacher


class TeacherStore:
    """The float model's outputs per window, float32, in CPU memory or in files of ``directory``
    (one safetensors file per window, written atomically; ``complete.json`` marks a finished set)."""

    def __init__(self, names: frozenset[str], directory: Path | None = None):
        self.names = frozenset(names)
        self.dir = directory
        self._memory: dict[int, dict[str, torch.Tensor]] = {}

    def _path(self, index: int) -> Path:
        return self.dir / f"window-{index:05d}.safetensors"

    def complete(self, count: int, identity: Mapping[str, Any]) -> bool:
        """True when all ``count`` windows are there, written for the same ``identity``."""
        if self.dir is None:
            return len(self._memory) >= count
        import json

        mark = self.dir / "complete.json"
        try:
            return json.loads(mark.read_text(encoding="utf-8")) == {**identity, "count": count}
        except (OSError, ValueError):
            return False

    def mark_complete(self, count: int, identity: Mapping[str, Any]) -> None:
        if self.dir is not None:
            atomic_write_json(self.dir / "complete.json", {**identity, "count": count})

    def put(self, index: int, outputs: Mapping[str, torch.Tensor]) -> None:
        values = {k: outputs[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(self.names)}
        if self.dir is None:
            self._memory[index] = values
            return
        save_tensors(self._path(index), values)

    def get(self, index: int) -> dict[str, torch.Tensor]:
        if self.dir is None:
            return self._memory[index]
        from safetensors.torch import load_file

        return load_file(self._path(index))

    def share(self, group: Group, mine: Sequence[int]) -> None:
        """Every process's windows in every process's store (``mine``: the ones this one computed)."""
        if self.dir is None:
            for part in group.gather({i: self._memory[i] for i in mine}):
                self._memory.update(part)
        else:  # the files are in the one folder (several machines need it on a shared file system)
            group.barrier()

    def nbytes(self) -> int:
        if self.dir is None:
            return sum(t.numel() * t.element_size() for v in self._memory.values() for t in v.values())
        return sum(p.stat().st_size for p in self.dir.glob("window-*.safetensors"))


def _all_windows(tuning) -> torch.Tensor:
    return torch.cat([tuning.train, tuning.validation])


@torch.no_grad()
def compute_teacher(model: nn.Module, tuning, objectives: Objectives, store: TeacherStore, device: torch.device,
                    batch_size: int = 1, progress: bool = True, identity: Mapping[str, Any] | None = None,
                    group: Group = SINGLE) -> float:
    """Fill ``store`` with the float model's outputs on every tuning window (training, then
    validation); returns the seconds it took (0 when the store was already complete). Under
    several processes each computes its share of the windows and every store ends with all of
    them (files: each writes its own into the shared folder; memory: the shares are gathered)."""
    windows = _all_windows(tuning)
    identity = dict(identity or {})
    if store.complete(len(windows), identity):
        return 0.0
    t0 = time.perf_counter()
    names = store.names
    was_training = model.training
    model.eval()
    try:
        if "logits" in objectives.teacher_needs:  # the head on the hidden state is the model's logits
            ids = windows[:1].to(device)
            mine = model_outputs(model, ids, frozenset({"logits"}))["logits"].float()
            theirs = model(input_ids=ids, **_call_kwargs(model)).logits.float()
            if not torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()) + 1e-6):
                raise ModelError(f"{type(model).__name__}: its logits are not its head applied to its decoder's "
                                 "last hidden state (a scaled or soft-capped head?); logit-kl cannot be used with it")
        lo, hi = group.bounds(len(windows))
        for start in tqdm(range(lo, hi, batch_size), desc="teacher outputs", unit="batch",
                          disable=not progress, leave=False, file=sys.stderr):
            ids = windows[start:min(start + batch_size, hi)].to(device)
            out = model_outputs(model, ids, names)
            for j in range(ids.shape[0]):
                store.put(start + j, {k: v[:, j:j + 1] if k == "blocks" else v[j:j + 1] for k, v in out.items()})
    finally:
        model.train(was_training)
    if group.active:
        store.share(group, range(lo, hi))
    if group.leader:
        store.mark_complete(len(windows), identity)
    group.barrier()
    return time.perf_counter() - t0


def _teacher_batch(store: TeacherStore, indices: Sequence[int], model: nn.Module, objectives: Objectives,
                   device: torch.device) -> dict[str, torch.Tensor]:
    parts = [store.get(i) for i in indices]
    out = {k: torch.cat([p[k] for p in parts], dim=1 if k == "blocks" else 0).to(device) for k in store.names}
    if "logits" in objectives.teacher_needs:
        head = _head(model)
        with torch.no_grad():
            out["logits"] = head(out["hidden"].to(head.weight.dtype))
    return out


# --------------------------------------------------------------------------- training


@attrs.define(eq=False)
class _Factor:
    module: LQLinear
    key: str  # "left" or "right"
    master: torch.Tensor

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.key)

    @torch.no_grad()
    def publish(self) -> None:
        """The parameter := the master rounded to the factor's storage format."""
        value = round_factor(self.master, self.module.factor_dtype, self.key)
        self.param.copy_(value.to(self.param.dtype))


def _factors(model: nn.Module) -> list[_Factor]:
    out = []
    for _, module in model.named_modules():
        if isinstance(module, LQLinear) and module.rank > 0:
            for key in ("left", "right"):
                out.append(_Factor(module, key, getattr(module, key).detach().to(torch.float32).clone()))
    return out


def _rilq_init(factors: list[_Factor], seed: int) -> None:
    """RILQ's (PEFT's "gaussian") start: R ~ N(0, 1/r²), L = 0, so training starts at Q itself."""
    g = torch.Generator().manual_seed(seed)
    for f in factors:
        if f.key == "left":
            f.master.zero_()
        else:
            rank = f.master.shape[0]
            f.master.copy_(torch.randn(f.master.shape, generator=g) / rank)
        f.publish()


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The model's decoder in torch's DistributedDataParallel: gradients of the trainable
    parameters (the factors) averaged over the processes in the backward pass; buffers (Q) are
    the same everywhere and are not exchanged."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    from lqframe.structure import LQExperts

    # every process built the same factors and Q: nothing to broadcast at the start or per forward; an
    # expert no token of a process's windows was routed to has factors without a gradient there
    experts = any(isinstance(m, LQExperts) for m in model.modules())
    return DistributedDataParallel(_decoder(model), device_ids=ids, init_sync=False, forward_sync_buffers=False,
                                   find_unused_parameters=experts)


def _update_pieces(n: int, stage: TuneStage, update: int, group: Group) -> list[tuple[list[int], float]]:
    """This process's part of one update: ``(window indices, weight)`` pieces, the weight being the
    piece's share of its micro-batch. One process: every micro-batch, weight 1. Several: whole
    micro-batches shared out when there are at least as many as processes, else each micro-batch's
    windows shared out; a process left without windows gets one window of weight 0 (it must still
    take part in the gradient exchange)."""
    micro = [_batch_order(n, stage.batch_size, stage.seed, update * stage.grad_accum + k)
             for k in range(stage.grad_accum)]
    if not group.active:
        return [(b, 1.0) for b in micro]
    if len(micro) >= group.world:
        return [(b, 1.0) for b in micro[slice(*group.bounds(len(micro)))]]
    pieces = []
    for b in micro:
        lo, hi = group.bounds(len(b))
        if hi > lo:
            pieces.append((b[lo:hi], (hi - lo) / len(b)))
    return pieces or [(micro[0][:1], 0.0)]


def _batch_order(n: int, batch_size: int, seed: int, micro: int) -> list[int]:
    """Window indices of micro-batch ``micro``: epochs of a seeded permutation, a pure function of
    ``micro`` (so a resumed run draws the same batches)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(micro, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def _batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _validate(model, tuning, objectives: Objectives, store: TeacherStore, device, batch_size: int,
              group: Group = SINGLE) -> tuple[float, float, dict[str, float]]:
    """(weighted loss, perplexity, each term) on the validation windows (each process its share;
    the sums gathered and added in rank order, the same on every process)."""
    val = tuning.validation
    offset = tuning.train.shape[0]
    names = objectives.student_needs | {"logits"}
    total, nll, count, parts_sum = 0.0, 0.0, 0, {}
    lo, hi = group.bounds(val.shape[0])
    for start in range(lo, hi, batch_size):
        ids = val[start:min(start + batch_size, hi)].to(device)
        student = model_outputs(model, ids, names)
        teacher = _teacher_batch(store, range(offset + start, offset + start + ids.shape[0]), model, objectives,
                                 device)
        loss, parts = objectives.loss(student, teacher, _batch(ids))
        total += float(loss) * ids.shape[0]
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v * ids.shape[0]
        nll += float(next_token_nll(student["logits"], ids))
        count += ids[:, 1:].numel()
    if group.active:
        parts = group.gather((total, nll, count, parts_sum))
        total, nll, count = (sum(p[i] for p in parts) for i in range(3))
        parts_sum = {k: sum(p[3].get(k, 0.0) for p in parts) for k in parts[0][3]}
    n = val.shape[0]
    return total / n, math.exp(min(nll / count, 700.0)), {k: v / n for k, v in parts_sum.items()}


def tune(model: nn.Module, stage: TuneStage, tuning, store: TeacherStore, device: torch.device, *,
         objectives: Objectives | None = None, work_dir: Path | None = None, identity: Mapping[str, Any] | None = None,
         progress: bool = True, log: Callable[[str], None] = lambda s: None, origin: str = "<recipe>",
         group: Group = SINGLE) -> dict[str, Any]:
    """Train the factors of every LQLinear of ``model`` (on ``device``) as ``stage`` says; returns
    the record that goes into report.json (``tuning``).

    Under several processes (``group``) the training is data-parallel: the decoder is wrapped in
    torch's DistributedDataParallel (its trainable parameters are the factors; the packed Q are
    buffers and are not exchanged), an update's micro-batches (or, when there are fewer than
    processes, each micro-batch's windows) are shared out (:func:`_update_pieces`), each piece's
    loss weighted by its share of its micro-batch so that DDP's average of the gradients is the
    gradient of the update's loss (for a loss averaged over a batch's windows, as the built-in
    objectives are), and validation is split and gathered. Every process then holds the same
    factors; only the first writes the stage's checkpoint. The result equals the one-process
    training up to the order of floating-point additions in the gradient sum."""
    objectives = objectives or Objectives.from_stage(stage)
    factors = _factors(model)
    if not factors:
        raise RecipeError(f"{origin}: tune_stage: no compressed layer has a low-rank term to train (every rank is "
                          "0); add a reconstruct_stage with a rank, e.g. {name: svd, rank: 32}")
    if tuning.validation.shape[0] == 0 and stage.patience:
        raise RecipeError(f"{origin}: tune_stage: early stopping needs validation windows")
    identity = dict(identity or {})
    path = None if work_dir is None else work_dir / TUNE_STATE
    t0 = time.perf_counter()

    saved = None
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable file: start the stage afresh (it is rewritten at the next validation)
            saved = None
        if saved is not None and saved.get("identity") != identity:
            saved = None
    if saved is None and stage.init == "rilq":
        _rilq_init(factors, stage.seed)
    optimizer = torch.optim.Adam([f.master for f in factors], lr=stage.lr)
    record: dict[str, Any] = {"history": [], "best_update": 0, "updates": 0, "stopped": None}
    best: list[torch.Tensor] | None = None
    best_loss, bad = math.inf, 0
    if saved is not None:
        for f, m in zip(factors, saved["masters"], strict=True):
            f.master.copy_(m)
            f.publish()
        optimizer.load_state_dict(saved["optimizer"])
        record = saved["record"]
        best = saved["best"]
        best_loss, bad = saved["best_loss"], saved["bad"]
        log(f"tune: resuming at update {record['updates']} from {path}")

    prior = float(record.get("seconds", 0.0))

    def checkpoint() -> None:
        record["seconds"] = prior + time.perf_counter() - t0  # (a resumed stage adds its own time)
        if path is not None and group.leader:
            state = {"identity": identity, "masters": [f.master for f in factors],
                     "optimizer": optimizer.state_dict(), "record": record, "best": best,
                     "best_loss": best_loss, "bad": bad}
            _atomic(path, lambda tmp: torch.save(state, tmp))

    for f in factors:  # published values of a resumed or RILQ-initialised state are in place already
        f.param.requires_grad_(True)
    trained = {id(f.param) for f in factors}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()  # no dropout: the loss is a deterministic function of the factors
    set_weight_cache(model, True)  # Q never changes: dequantized once
    n_train = tuning.train.shape[0]
    student_names = objectives.student_needs
    ddp = _data_parallel(model, device) if group.active else None
    try:
        def validate(update: int, train_loss: float | None) -> None:
            nonlocal best, best_loss, bad
            if tuning.validation.shape[0] == 0:
                return
            loss, ppl, parts = _validate(model, tuning, objectives, store, device, stage.batch_size, group)
            improved = loss < best_loss
            if improved:
                best, best_loss, bad = [f.master.clone() for f in factors], loss, 0
                record["best_update"] = update
            else:
                bad += 1
            record["history"].append({"update": update, "train_loss": train_loss, "validation_loss": loss,
                                      "validation_ppl": ppl, "terms": parts})
            log(f"tune: update {update}/{stage.max_updates}: " + ("" if train_loss is None else
                f"train {train_loss:.5g}, ") + f"validation {loss:.5g} (perplexity {ppl:.3f})"
                + (" best" if improved else f" ({bad} without improvement)"))

        if not record["history"] and tuning.validation.shape[0]:
            validate(0, None)
            checkpoint()
        bar = tqdm(total=stage.max_updates, initial=record["updates"], desc="tune", unit="update",
                   disable=not progress, file=sys.stderr)
        while record["updates"] < stage.max_updates and record["stopped"] is None:
            update = record["updates"]
            total = 0.0
            pieces = _update_pieces(n_train, stage, update, group)
            for p, (idx, share) in enumerate(pieces):
                ids = tuning.train[idx].to(device)
                teacher = _teacher_batch(store, idx, model, objectives, device)
                # (DDP exchanges the gradients once per update, in the backward pass of the last piece)
                with ddp.no_sync() if ddp is not None and p < len(pieces) - 1 else contextlib.nullcontext():
                    student = model_outputs(model, ids, student_names, decoder=ddp)
                    loss, _ = objectives.loss(student, teacher, _batch(ids))
                    if not torch.isfinite(loss):
                        raise LqframeError(f"{origin}: tune_stage: the loss became {float(loss)} at update "
                                           f"{update + 1}; lower tune_stage.lr (now {stage.lr})")
                    # DDP averages over the processes: each loss weighted by its share of its micro-batch
                    (loss * (share * group.world) / stage.grad_accum).backward()
                total += float(loss.detach()) * share
            if group.active:  # the update's loss, added in rank order
                total = sum(group.gather(total))
            for f in factors:
                f.master.grad = f.param.grad.detach().to(torch.float32)
                f.param.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for f in factors:
                f.publish()
            record["updates"] = update + 1
            window_loss = total / stage.grad_accum
            bar.update(1)
            bar.set_postfix_str(f"loss {window_loss:.4g}")
            if record["updates"] % stage.eval_every == 0 or record["updates"] == stage.max_updates:
                validate(record["updates"], window_loss)
                if stage.patience and bad >= stage.patience:
                    record["stopped"] = f"early: {bad} validations without improvement"
                checkpoint()
        bar.close()
        if record["stopped"] is None:
            record["stopped"] = "max_updates"
        if best is not None:  # the best validated state
            for f, m in zip(factors, best, strict=True):
                f.master.copy_(m)
                f.publish()
        checkpoint()
    finally:
        for f in factors:
            f.param.requires_grad_(True)
            f.param.grad = None
        for p in frozen:
            p.requires_grad_(True)
        set_weight_cache(model, False)
        model.train(was_training)
    record["seconds"] = prior + time.perf_counter() - t0
    history = record["history"]
    if history:
        record["validation_before"] = {"loss": history[0]["validation_loss"], "ppl": history[0]["validation_ppl"]}
        best_row = min(history, key=lambda r: r["validation_loss"])
        record["validation_best"] = {"loss": best_row["validation_loss"], "ppl": best_row["validation_ppl"],
                                     "update": best_row["update"]}
    record["objectives"] = [{"name": n, "weight": w, **obj.options()} for n, obj, w in objectives.terms]
    record["trained_parameters"] = sum(f.master.numel() for f in factors)
    return record
