"""The block executor: runs a model's repeated blocks one at a time on the compute device.

A causal LM is ``embed → block 0 → … → block N−1 → head``. The executor captures the inputs of
block 0 for every calibration window (a pre-hook stops the forward there), then walks the blocks
in order: it *loads* block ``b`` from a :class:`BlockSource` onto the device, runs the per-block
actions the stages give it, *propagates* the activations through the (by then compressed) block
to get block ``b+1``'s inputs, hands the finished block to a :class:`BlockSink`, and *releases*
it (back to CPU memory when blocks are offloaded). Only one block's activations exist at a time;
they live on the device or, with ``activations="cpu"``, in CPU memory, moved to the device one
window at a time.

Actions it offers the stages:

- :meth:`BlockExecutor.input_groups` — which target linears read the same input tensor (q/k/v,
  gate/up): one statistics capture serves each group;
- :meth:`BlockExecutor.capture` — forward hooks that fill a :class:`~lqframe.stats.StatsStore` with
  exactly the statistics the plugins declare (float64), plus a token sample per input for the
  output-error report when ``rxx`` (which gives it exactly) is not captured;
- :meth:`BlockExecutor.forward` — the block's outputs for a list of inputs (teacher targets when
  run before compression, the next block's inputs after it).

``precision`` (``quantize_stage.precision``, float64 by default) is the arithmetic of every calibration
and propagation forward: the cached activations, the block's own parameters (cast for the duration of
the call and restored exactly) and the compressed linears (which compute in their inputs' dtype). In
float64 the statistics and the inputs each block is compressed on no longer depend on which BLAS
kernels, SIMD width or thread count computed them (those change float32 results in the last bit, and
a compression pipeline turns last-bit differences into different codes: docs/design.md,
"Reproducibility"); ``None`` computes in the model's own dtype.

Sources: the model in memory (:class:`MemorySource`), or its blocks streamed from the safetensors
shards (:class:`lqframe.streaming.ShardSource`, models larger than memory); the run's sink writes each
finished block to disk (``lqframe.run.CheckpointSink``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqframe.distributed import SINGLE
from lqframe.errors import LqframeError, ModelError
from lqframe.lqlinear import LQLinear, set_weight_cache
from lqframe.models import find_blocks
from lqframe.stats import StatsStore

_NARROWING = (torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type)
_SOFTMAX = (torch.Tensor.softmax, torch.Tensor.log_softmax, torch.softmax, torch.log_softmax,
            torch.nn.functional.softmax, torch.nn.functional.log_softmax)


class KeepFloat64(torch.overrides.TorchFunctionMode):
    """Within float64 calibration forwards, no float64 tensor is rounded to a narrower float.

    Models compute their numerically delicate parts in float32 by explicit casts (transformers' RMSNorm
    and rotary embeddings, ``softmax(..., dtype=float32)``), meant to *raise* half-precision inputs. In a
    float64 forward those casts would round every activation to float32 on its way through a norm, and
    each such rounding is a chance for two floating-point paths to land one float32 step apart — which
    the compression pipeline amplifies into different codes (docs/design.md, "Reproducibility"). Here a
    cast of a float64 tensor to float32/16 returns it unchanged, and a softmax asked for a narrower
    dtype computes in float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        wide = isinstance(first, torch.Tensor) and first.dtype == torch.float64
        if wide and func in _SOFTMAX and kwargs.get("dtype") not in (None, torch.float64):
            kwargs = {**kwargs, "dtype": torch.float64}
        out = func(*args, **kwargs)
        if wide and func in _NARROWING and isinstance(out, torch.Tensor) and out.is_floating_point() \
                and out.dtype != torch.float64:
            return first if first.device == out.device else first.to(out.device)
        return out

__all__ = ["resolve_device", "BlockSource", "MemorySource", "BlockSink", "MemorySink", "BlockExecutor",
           "OUTPUT_ERROR_TOKENS", "ACTIVATION_PLACES", "ActivationFiles"]

#: tokens per input kept to measure the output error when ``rxx`` is not captured
OUTPUT_ERROR_TOKENS = 4096
#: where the activations between blocks live (``activations`` of the recipe; ``auto``: cpu with
#: offloaded blocks, else device)
ACTIVATION_PLACES = ("device", "cpu", "disk")


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


class ActivationFiles(Sequence[torch.Tensor]):
    """One block's activations on disk: a safetensors file per window in ``folder``, written as each
    window's activation is made (:meth:`append`) and read back one window at a time (indexing), so
    memory holds one window's activation whatever the number of windows. The files are deleted when
    the object is dropped (the next block's activations replace it) and at interpreter exit."""

    _serial = 0

    def __init__(self, folder: Path, tensors: Iterable[torch.Tensor] = ()):
        ActivationFiles._serial += 1
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stem = f"act-{os.getpid()}-{ActivationFiles._serial:06d}"
        self._paths: list[Path] = []
        weakref.finalize(self, _remove_files, self._paths)
        for t in tensors:
            self.append(t)

    def append(self, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"{self._stem}-{len(self._paths):06d}.safetensors"
        save_file({"x": t.detach().to("cpu").contiguous()}, str(path))
        self._paths.append(path)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        from safetensors.torch import load_file

        return load_file(str(self._paths[index]))["x"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the first CUDA device when one is available, else the CPU; ``cpu``;
    ``cuda`` / ``cuda:N``. A CUDA device that is not there is a clear error."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise LqframeError(f"device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise LqframeError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise LqframeError(f"device {spec!r} was asked for, but no CUDA device is available "
                           "(torch.cuda.is_available() is False); use --device cpu or auto")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise LqframeError(f"device {spec!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


# --------------------------------------------------------------------------- sources and sinks


class BlockSource:
    """Where blocks come from. ``load(b, device)`` returns block ``b`` on ``device``; ``release``
    is called when the executor is done with it. ``blocks`` are the model's block modules (empty
    between loads where the source ``streams``: :class:`lqframe.streaming.ShardSource`)."""

    path: str
    blocks: nn.ModuleList
    streams: bool = False
    def __len__(self) -> int: ...  # noqa: E704
    def load(self, index: int, device: torch.device) -> nn.Module: ...  # noqa: E704
    def release(self, index: int, block: nn.Module, offload: bool) -> None: ...  # noqa: E704


class MemorySource(BlockSource):
    """The blocks of a model held in memory (moved to the device in place)."""

    def __init__(self, model: nn.Module):
        self.path, self.blocks = find_blocks(model)

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int, device: torch.device) -> nn.Module:
        return self.blocks[index].to(device)

    def release(self, index: int, block: nn.Module, offload: bool) -> None:
        if offload:
            block.to("cpu")


class BlockSink:
    """Where finished blocks go, and where a run resumes from.

    ``write(b, block, results, next_inputs)`` is called once per block after its layers are
    compressed and its outputs computed (``next_inputs`` None when nothing needs them);
    ``next_block()`` says where a resumed run starts; ``restore(model)`` puts finished blocks back
    and returns ``(next block, its inputs or None, finished layer results)``; ``reset()`` forgets
    all progress; ``save(state)`` is the save stage.
    """

    def next_block(self) -> int:
        """The block a resumed run starts from (0: nothing finished)."""
        return 0

    def restore(self, model: nn.Module) -> tuple[int, list[torch.Tensor] | None, list]:
        return 0, None, []

    def reset(self) -> None:
        pass

    def write(self, index: int, block: nn.Module, results: list, next_inputs: list[torch.Tensor] | None) -> None:
        pass

    def save(self, state: Any) -> None:
        pass

    def work_dir(self) -> Path | None:
        """A folder for a later stage's own progress (the tune stage's state, teacher files), kept
        until the run is saved; None: the run keeps no progress on disk."""
        return None


class MemorySink(BlockSink):
    """Finished blocks stay in the model in memory."""


# --------------------------------------------------------------------------- the executor


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it wanted has been seen."""


class _Capture:
    """Statistics of one input shared by one or more linears, plus an optional token sample. With
    ``defer`` (several processes) the inputs are kept and added by :meth:`flush`, in window order
    across the processes."""

    def __init__(self, acc, sample: bool, defer: bool = False):
        self.acc = acc
        self.sample: list[torch.Tensor] | None = [] if sample else None
        self.sampled = 0
        self.last: torch.Tensor | None = None
        self.pending: list[torch.Tensor] | None = [] if defer else None

    def update(self, x: torch.Tensor) -> None:
        if x is self.last:  # another member of the group sees the same tensor in the same call
            return
        self.last = x
        flat = x.detach().reshape(-1, self.acc.in_features)
        if self.pending is not None:
            self.pending.append(flat)
            return
        self._add(flat)

    def flush(self, group) -> None:
        """Add the kept inputs rank after rank (lqframe.distributed.Group.chain): the very additions,
        in the very order, of one process seeing every window."""
        device = self.pending[0].device if self.pending else None

        def step(state):
            if state is not None:
                self._load(state, device)
            for flat in self.pending:
                self._add(flat)
            self.pending.clear()
            return {"acc": {k: v.cpu() for k, v in self.acc.state().items()}, "sampled": self.sampled,
                    "sample": None if self.sample is None else [t.cpu() for t in self.sample]}

        self._load(group.chain(None, step), device)

    def _load(self, state, device) -> None:
        to = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        self.acc.load_state({k: to(v) for k, v in state["acc"].items()})
        self.sampled = state["sampled"]
        if state["sample"] is not None:
            self.sample = [to(t) for t in state["sample"]]

    def _add(self, flat: torch.Tensor) -> None:
        self.acc.update(flat)
        if self.sample is not None and self.sampled < OUTPUT_ERROR_TOKENS:
            # a float32 copy by copy_: inside KeepFloat64 a cast would leave the float64 tensor as it is
            part = flat[: OUTPUT_ERROR_TOKENS - self.sampled]
            take = torch.empty(part.shape, dtype=torch.float32, device=part.device).copy_(part)
            self.sample.append(take)
            self.sampled += take.shape[0]

    def sample_tensor(self) -> torch.Tensor | None:
        return torch.cat(self.sample) if self.sample else None


class _Recorder(nn.Module):
    """Stands in for a block while the model runs to record the arguments it would get (see
    :meth:`BlockExecutor._every_block_kwargs`); passes the hidden state on."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, Any] | None = None
        self.last = False

    def forward(self, hidden_states, *args, **kwargs):
        self.seen = {**kwargs, "__extra_args__": tuple(args)}
        if self.last:  # the model's head need not run
            raise _Stop
        return hidden_states


def _same_arguments(a: Any, b: Any) -> bool:
    """Two blocks' arguments hold the same values (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_arguments(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_arguments(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable equality: treat as different
        return a is b


class BlockExecutor:
    """Runs blocks one at a time on ``device`` (see module doc).

    ``offload``: keep every block in CPU memory except the one being worked on (the rest of the
    model — embeddings, final norm, head — lives on the device). ``activations``: where the
    activation cache lives between blocks, ``device``, ``cpu`` or ``disk`` (:class:`ActivationFiles`
    in ``scratch``, default a temporary folder removed at exit).
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", *, offload: bool = False,
                 activations: str = "device", source: BlockSource | None = None, progress: bool = True,
                 precision: torch.dtype | None = None, group: Any = None, scratch: Path | None = None):
        if activations not in ACTIVATION_PLACES:
            raise LqframeError(f"activations must be one of {ACTIVATION_PLACES}, got {activations!r}")
        self.activations = activations
        self.scratch = scratch
        if activations == "disk" and scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="lqframe-activations-"))
            weakref.finalize(self, shutil.rmtree, str(self.scratch), True)
        if precision is not None and not precision.is_floating_point:
            raise LqframeError(f"precision must be a floating-point dtype, got {precision}")
        self.model = model
        self.precision = precision
        #: the dtype of the blocks' own parameters (what the model itself computes in), set by first_inputs
        self.model_dtype: torch.dtype | None = None
        self.device = torch.device(device)
        self.offload = offload
        self.cache_device = self.device if activations == "device" else torch.device("cpu")
        self.source = source if source is not None else MemorySource(model)
        self.progress = progress
        self.kwargs: dict[str, Any] = {}
        #: each block's keyword arguments where they differ between blocks (models mixing sliding-window
        #: and full attention pass each layer its own mask), by block index; None: block 0's for all
        self.block_kwargs: list[dict[str, Any]] | None = None
        #: the processes of the run (lqframe.distributed): each holds its share of the windows
        self.group = group if group is not None else SINGLE

    def __len__(self) -> int:
        return len(self.source)

    # ------------------------------------------------------------------ placement
    def place_model(self) -> None:
        """Put the model on the device: all of it, or with ``offload`` all but the blocks."""
        if not self.offload and not self.source.streams:
            self.model.to(self.device)
            return
        in_blocks = {id(m) for block in self.source.blocks for m in block.modules()}
        for module in self.model.modules():
            if id(module) not in in_blocks:
                module._apply(lambda t: t.to(self.device), recurse=False)

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` on the device for the duration of the ``with``."""
        block = self.source.load(index, self.device)
        try:
            yield block
        finally:
            self.source.release(index, block, self.offload)

    def keep(self, tensors: Iterable[torch.Tensor] = ()) -> list[torch.Tensor] | ActivationFiles:
        """A container for one block's activations where they live (a list, or files on disk)."""
        if self.activations == "disk":
            return ActivationFiles(self.scratch, tensors)
        return list(tensors)

    def _to_cache(self, t: torch.Tensor) -> torch.Tensor:
        if self.precision is not None and t.is_floating_point():
            return t.to(self.cache_device, dtype=self.precision)
        return t.to(self.cache_device)

    def in_model_dtype(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Activations back in the model's own dtype (teacher targets: tuning computes in it)."""
        dtype = self.model_dtype
        return [x if dtype is None or x.dtype == dtype else x.to(dtype) for x in xs]

    def _cast(self, value: Any) -> Any:
        """Floating tensors (also inside tuples and lists) in ``precision``; anything else as is."""
        if isinstance(value, torch.Tensor):
            return value.to(self.precision) if value.is_floating_point() else value
        if isinstance(value, tuple | list):
            return type(value)(self._cast(v) for v in value)
        return value

    @contextmanager
    def computing(self, block: nn.Module, exclude: Sequence[nn.Module] = ()) -> Iterator[None]:
        """``block``'s floating parameters and buffers in ``precision`` for the duration of the ``with``,
        restored afterwards to the very same tensors (so float32 weights come back bit for bit, and
        anything holding a reference to them still does), and in float64 no cast narrows an activation
        (:class:`KeepFloat64`). Compressed linears, and the modules in ``exclude``, are left alone:
        compressed linears compute in their inputs' dtype from their packed buffers."""
        if self.precision is None:
            yield
            return
        packed = {id(t) for m in block.modules() if isinstance(m, LQLinear)
                  for t in (*m.parameters(), *m.buffers())}
        packed |= {id(t) for m in exclude for t in (*m.parameters(), *m.buffers())}
        swapped: list[tuple[dict, str, torch.Tensor]] = []
        for module in block.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or id(t) in packed or not t.is_floating_point() or t.dtype == self.precision:
                        continue
                    swapped.append((table, name, t))
                    converted = t.detach().to(self.precision)
                    table[name] = nn.Parameter(converted, requires_grad=False) if isinstance(t, nn.Parameter) \
                        else converted
        mode = KeepFloat64() if self.precision == torch.float64 else contextlib.nullcontext()
        try:
            with mode:
                yield
        finally:
            for table, name, t in swapped:
                table[name] = t

    # ------------------------------------------------------------------ block-0 inputs
    def first_inputs(self, windows: torch.Tensor, desc: str = "capture block-0 inputs") -> Sequence[torch.Tensor]:
        """Run the model on each window up to block 0; return block 0's hidden-state inputs (one
        tensor per window, on the cache device) and remember the keyword arguments the model
        passes to its blocks (attention mask, position embeddings …)."""
        inputs = self.keep()
        kwargs_seen: dict[str, Any] = {}
        first = self.source.blocks[0]

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs.append(self._to_cache(hidden.detach()))
            if not kwargs_seen:
                kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
                kwargs_seen["__extra_args__"] = tuple(args[1:])
            raise _Stop

        self.model_dtype = next((p.dtype for p in first.parameters() if p.is_floating_point()), None)
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        blocks = self.source.blocks
        try:  # embeddings and rotary tables in ``precision`` too (the blocks never run: the hook stops at block 0)
            with torch.inference_mode(), self.computing(self.model, exclude=blocks):
                for w in tqdm(windows, desc=desc, disable=not self.progress, leave=False):
                    try:
                        self.model(input_ids=w[None].to(self.device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        if len(inputs) != len(windows):
            raise ModelError("could not capture the inputs of the first block: the model never called it")
        cast = (lambda kw: kw) if self.precision is None else (lambda kw: {k: self._cast(v) for k, v in kw.items()})
        self.kwargs = cast(kwargs_seen)
        every = self._every_block_kwargs(windows[0]) if len(windows) and len(blocks) > 1 else None
        self.block_kwargs = None
        if every is not None and any(not _same_arguments(kw, every[0]) for kw in every[1:]):
            self.block_kwargs = [cast(kw) for kw in every]
        return inputs

    def _every_block_kwargs(self, window: torch.Tensor) -> list[dict[str, Any]] | None:
        """The keyword arguments the model passes to each of its blocks, from one forward pass in which
        every block is replaced by a stand-in that records them and passes the hidden state on (no
        block computes). None when the model does not call every stand-in."""
        from lqframe.pipeline import set_module

        recorders = nn.ModuleList([_Recorder() for _ in self.source.blocks])
        recorders[-1].last = True
        set_module(self.model, self.source.path, recorders)
        try:
            with torch.inference_mode(), self.computing(self.model, exclude=self.source.blocks):
                try:
                    self.model(input_ids=window[None].to(self.device), use_cache=False)
                except Exception:  # noqa: BLE001 - _Stop after the last block, or a model that cannot run on
                    pass  # stand-ins (then block 0's arguments serve every block)
        finally:
            set_module(self.model, self.source.path, self.source.blocks)
        seen = [r.seen for r in recorders]
        return seen if all(kw is not None for kw in seen) else None

    def set_kwargs(self, windows: torch.Tensor) -> None:
        """Capture the block keyword arguments only (a resumed run has its inputs already)."""
        self.first_inputs(windows[:1], desc="capture block arguments")

    # ------------------------------------------------------------------ running a block
    def call_block(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        """The block's own output (a tensor, or the tuple some models' blocks return)."""
        kwargs = self.kwargs
        if self.block_kwargs is not None:
            index = next(i for i, b in enumerate(self.source.blocks) if b is block)
            kwargs = self.block_kwargs[index]
        extra = kwargs.get("__extra_args__", ())
        kw = {k: v for k, v in kwargs.items() if k != "__extra_args__"}
        return block(hidden.to(self.device), *extra, **kw)

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = self.call_block(block, hidden)
        return out[0] if isinstance(out, tuple | list) else out

    def forward(self, block: nn.Module, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The block's outputs for every input (each compressed linear dequantizes once), kept where
        the activations live (:meth:`keep`)."""
        set_weight_cache(block, True)
        try:
            with torch.inference_mode(), self.computing(block):
                return self.keep(self._to_cache(self.run_block(block, x)) for x in inputs)
        finally:
            set_weight_cache(block, False)

    def input_groups(self, block: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[list[str]]:
        """Group linears by the input tensor they receive (one forward of the block on one window),
        in the order the block uses them (linears the forward never reaches come last)."""
        seen: dict[str, torch.Tensor] = {}  # the tensors themselves: holding them keeps ids from being reused

        def hook(name):
            def fn(module, args):
                seen[name] = args[0]
            return fn

        handles = [self.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            with torch.inference_mode(), self.computing(block):
                self.run_block(block, x)
        finally:
            for h in handles:
                h.remove()
        order = {n: i for i, n in enumerate(seen)}
        groups: list[tuple[torch.Tensor | None, list[str]]] = []
        for n in sorted(names, key=lambda n: order.get(n, len(order))):
            t = seen.get(n)
            for tensor, members in groups:
                if t is not None and tensor is t:
                    members.append(n)
                    break
            else:
                groups.append((t, [n]))
        return [members for _, members in groups]

    def capture(self, block: nn.Module, groups: Sequence[Sequence[str]], needs: Mapping[str, frozenset[str]],
                inputs: Sequence[torch.Tensor], store: StatsStore, *, stop: bool = False
                ) -> dict[str, torch.Tensor | None]:
        """Run ``block`` on every input with hooks on the linears in ``groups`` that accumulate
        their statistics into ``store`` (one entry per group). ``stop``: end each forward once
        the (single) group was captured. Returns each layer's token sample (None where ``rxx``
        is captured, which measures the output error exactly)."""
        captures: dict[str, _Capture] = {}
        for group in groups:
            want = frozenset().union(*(needs[n] for n in group))
            in_features = self.model.get_submodule(group[0]).in_features
            acc = store.accumulator(group[0], group, in_features, want)
            shared = _Capture(acc, sample="rxx" not in want, defer=self.group.active)
            captures.update(dict.fromkeys(group, shared))

        def hook(module, args, c):
            c.update(args[0])
            if stop:
                raise _Stop

        handles = [self.model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, c=cap: hook(m, args, c)) for name, cap in captures.items()]
        set_weight_cache(block, True)  # compressed linears of earlier groups dequantize once
        try:
            with torch.inference_mode(), self.computing(block):
                for x in inputs:
                    try:
                        self.run_block(block, x)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
            for cap in captures.values():
                cap.last = None
            set_weight_cache(block, False)
        if self.group.active:  # every process's windows, added in window order
            for cap in dict.fromkeys(captures.values()):
                cap.flush(self.group)
        return {name: cap.sample_tensor() for name, cap in captures.items()}


@contextmanager
def offloaded(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a whole-model forward with the blocks kept in CPU memory: each block moves to ``device``
    just before it runs and back right after (for evaluation of an offloaded model)."""
    _, blocks = find_blocks(model)

    def arrive(module, args) -> None:  # hooks must return None: a value would replace args/outputs
        module.to(device)

    def leave(module, args, output) -> None:
        module.to("cpu")

    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(arrive))
        handles.append(block.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
