"""Models larger than memory: the model as a skeleton, its blocks streamed from disk.

``lqframe run --stream`` (recipe ``stream: true``; ``auto``, the default, streams a model whose float
weights would not fit in the memory available) builds the model on the meta device
(:func:`accelerate.init_empty_weights`: parameters take no memory, buffers such as rotary tables are
real), loads the parameters outside the block stack (embeddings, final norm, head) from the
model folder's safetensors shards, and leaves every block empty. The block executor then reads one
block at a time through a :class:`ShardSource` — its tensors from the memory-mapped shards, in the
dtype a resident load would give them (the same numbers: float16/bfloat16 → float32 is exact) — and
empties it again when it is done. A block already compressed comes back from the run's sink
(``.lqframe-partial/block-NNNNN.safetensors``: its compressed layers) plus the shards (its norms).
Evaluation runs block by block over all windows (:func:`streamed_nll`: the same numbers as the
resident path), and the save stage writes the checkpoint shard by shard, reading each tensor
where it lies (:func:`lqframe.checkpoint.save_checkpoint` with ``fetch``), so that a streamed run
writes the very checkpoint a resident run writes.

Peak memory: the non-block parameters, one float block (in ``quantize_stage.precision`` while it
computes), the activations of the calibration windows, one compressed block.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lqframe.errors import ModelError
from lqframe.models import LoadedModel, find_blocks

__all__ = ["ShardReader", "ShardSource", "load_streaming", "float_bytes", "should_stream", "streamed_nll",
           "streamed_window_nlls"]

_INDEX = "model.safetensors.index.json"


class ShardReader:
    """The tensors of a model folder's safetensors weights, by name, read one at a time (files
    memory-mapped by safetensors and opened on first use)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{index}: unreadable shard index ({type(exc).__name__}: {exc})") from None
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / "model.safetensors").is_file():
            single = self.folder / "model.safetensors"
            with self._open(single) as fh:
                self.files = dict.fromkeys(fh.keys(), single)
        else:
            raise ModelError(f"{self.folder}: streaming reads safetensors weights (model.safetensors or "
                             f"{_INDEX}), and there are none")

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path}: unreadable safetensors file ({exc})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` (a copy, in ``dtype`` when given, on ``device``)."""
        return self.get_many([name], dtype, device)[name]

    def get_many(self, names, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
                 ) -> dict[str, torch.Tensor]:
        """Tensors ``names`` (copies, floating ones in ``dtype`` when given, on ``device``), each file
        opened once and closed again: its memory-mapped pages do not stay in the process's memory."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            path = self.files.get(name)
            if path is None:
                raise ModelError(f"{self.folder}: the weights hold no tensor {name!r}, which the model has "
                                 "(streaming reads checkpoints whose tensor names are the model's own parameter "
                                 "names)")
            by_file.setdefault(path, []).append(name)
        out = {}
        for path, keys in by_file.items():
            with self._open(path) as fh:
                for name in keys:
                    stored = fh.get_tensor(name)
                    t = stored.to(dtype) if dtype is not None and stored.is_floating_point() else stored
                    t = t.to(device)
                    # never a view of the mapping, which closing the file unmaps
                    out[name] = t.clone() if t.data_ptr() == stored.data_ptr() else t
        return out

    def nbytes(self) -> int:
        """Bytes of every tensor as stored."""
        index = self.folder / _INDEX
        if index.is_file():
            total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
            if total:
                return int(total)
        return sum(os.path.getsize(f) for f in set(self.files.values()))


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (dotted, relative to ``module``) by ``value``, keeping
    its kind and ``requires_grad``."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


def float_bytes(folder: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """The memory a resident load of the folder's weights takes in ``dtype`` (from the stored
    bytes and their dtypes)."""
    reader = ShardReader(folder)
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for path in sorted(set(reader.files.values())):
        with reader._open(path) as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * size
    return total


def _available_memory() -> int | None:
    """Bytes this process may still use: the machine's MemAvailable, or less where a container's
    memory limit (cgroup v2 ``memory.max`` − ``memory.current``, or v1's ``limit_in_bytes`` −
    ``usage_in_bytes``) leaves less — in a container MemAvailable describes the host."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            found += [int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")]
    except OSError:
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            with open(limit, encoding="ascii") as fh:
                text = fh.read().strip()
            with open(usage, encoding="ascii") as fh:
                used = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 2**62:  # "max", or v1's "no limit" (a huge number)
            found.append(max(int(text) - used, 0))
    return min(found) if found else None


def should_stream(mode: str, info: dict[str, Any], dtype: torch.dtype = torch.float32,
                  fraction: float = 0.7) -> bool:
    """Whether to stream: ``true``/``false`` as said; ``auto`` when the model folder's float weights
    would take more than ``fraction`` of the memory available now (a GGUF or hub model: never)."""
    if mode == "true":
        return True
    if mode == "false" or info.get("kind") != "dir":
        return False
    available = _available_memory()
    return available is not None and float_bytes(info["path"], dtype) > fraction * available


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold each time a large block is freed, so that later large tensors
    (a block's weights, loaded and freed once per block) come from the heap and stay in the process
    after they are freed: resident memory grew by about a block per block. A fixed threshold (128 KiB)
    keeps every large tensor in its own mapping, given back when freed. A no-op off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def load_streaming(spec: str, dtype: torch.dtype = torch.float32) -> tuple[LoadedModel, ShardReader]:
    """The model of folder ``spec`` with its parameters outside the block stack loaded and every
    block empty (meta), the tokenizer, and the reader its blocks come from."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lqframe.models import _declared_class, _load_tokenizer, _task_of_class, resolve_model

    info = resolve_model(spec)
    if info["kind"] != "dir":
        raise ModelError(f"streaming reads a model folder of safetensors weights; {spec!r} is a {info['kind']} "
                         "model (load it resident: stream: false)")
    folder = info["path"]
    reader = ShardReader(folder)
    _return_freed_memory()
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(f"cannot load the config of {folder}: {exc}") from exc
    layers = None
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == "lqframe":  # an lqframe checkpoint
        from lqframe.checkpoint import read_quantization_config

        qc = read_quantization_config(folder)
        layers, unfolded = qc["layers"], qc.get("unfolded")
        del config.quantization_config
    declared = _declared_class(config) or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        if declared is AutoModelForCausalLM:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = declared._from_config(config, dtype=dtype)
    if layers is not None:  # its compressed layers as empty skeletons, filled block by block
        from lqframe.checkpoint import swap_in_skeletons

        with torch.device("meta"):
            swap_in_skeletons(model, layers, unfolded)
    else:  # fused experts and Conv1D as linears, read from the shards in whatever layout they have there
        from lqframe.structure import unfold

        with torch.device("meta"):
            unfold(model)
    path, blocks = find_blocks(model)
    prefix = path + "."
    tied = getattr(config, "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            continue
        if name not in reader and tied and hasattr(model, "get_output_embeddings") \
                and model.get_output_embeddings() is not None and p is model.get_output_embeddings().weight:
            continue  # the head, tied to the embeddings: tie_weights below
        _set_tensor(model, name, reader.get(name, dtype))
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if leftover:
        raise ModelError(f"{folder}: no weights for {leftover[:3]}")
    if hasattr(model, "can_generate") and model.can_generate():  # as from_pretrained reads it
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        except OSError:
            model.generation_config = GenerationConfig.from_pretrained(
                folder, config_file_name="config.json", _from_model_config=True, local_files_only=True)
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=_load_tokenizer(info, folder), spec=info["spec"], kind="dir",
                         path=folder, gguf_file=None, task=_task_of_class(type(model).__name__))
    return loaded, reader


class ShardSource:
    """Blocks read from the shards one at a time (see module doc). ``restore(index, block, device)``,
    set by the run's sink, puts a finished block's compressed layers back; it returns False for a block
    not finished yet."""

    streams = True

    def __init__(self, model: nn.Module, reader: ShardReader, dtype: torch.dtype):
        self.model = model
        self.path, self.blocks = find_blocks(model)
        self.reader = reader
        self.dtype = dtype
        self.restore: Callable[[int, nn.Module, torch.device], bool] = lambda index, block, device: False
        self._aliases: dict[str, str] | None = None  # on-disk names transformers renames (structure.stored_names)

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int, device: torch.device) -> nn.Module:
        block = self.blocks[index]
        self.restore(index, block, device)  # compressed layers of a finished block, from the sink
        prefix = f"{self.path}.{index}."
        self._load_compressed(block, prefix, device)  # those of a compressed checkpoint, from its shards
        empty = [name for name, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        values = self.stored([prefix + name for name in empty], device)
        for name in empty:
            _set_tensor(block, name, values.pop(prefix + name))
        return block.to(device)

    def stored(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors ``names`` of the model from the folder, in the run's dtype, laid out as the model
        holds them (unfolded experts and Conv1D: :func:`lqframe.structure.stored_tensors`)."""
        from lqframe.structure import stored_names, stored_tensors

        if self._aliases is None and any(name not in self.reader for name in names):  # once per source
            self._aliases = stored_names(self.model, list(self.reader.files))
        return stored_tensors(self.model, names, self.reader, self.dtype, device, self._aliases)

    def _load_compressed(self, block: nn.Module, prefix: str, device: torch.device) -> None:
        """Empty compressed layers whose tensors the shards hold (a compressed checkpoint streamed):
        rebuilt from their layer configuration and loaded as :func:`lqframe.load` loads them."""
        from lqframe.lqlinear import LQLinear
        from lqframe.pipeline import set_module

        for name, module in list(block.named_modules()):
            if not isinstance(module, LQLinear) or not any(t.is_meta for t in [*module.parameters(),
                                                                                 *module.buffers()]):
                continue
            own = prefix + name + "."
            keys = [k for k in self.reader.files if k.startswith(own)]
            if not keys:
                continue
            fresh = LQLinear.from_layer_config(module.layer_config())
            fresh.load_state_dict({k[len(own):]: v for k, v in self.reader.get_many(keys).items()})
            set_module(block, name, fresh.to(device))

    def release(self, index: int, block: nn.Module, offload: bool) -> None:
        block.to("meta")  # every tensor given back


# --------------------------------------------------------------------------- evaluation


class _Stand(nn.Module):
    """Stands in for every block while the model's head runs: returns the final hidden state the
    streamed blocks computed (a tuple when the real blocks return one)."""

    def __init__(self, value: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (self.value,) if self.as_tuple else self.value


def streamed_nll(executor, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity"
                 ) -> tuple[float, int]:
    """Total next-token NLL (float64) and the count of predicted tokens over ``windows``, computed
    block by block through ``executor``'s source (:func:`streamed_window_nlls`, added in window order)."""
    total = torch.zeros((), dtype=torch.float64)
    for value in streamed_window_nlls(executor, windows, progress, desc):
        total += value
    return float(total), windows.shape[0] * (windows.shape[1] - 1)


def streamed_window_nlls(executor, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity"
                         ) -> list[torch.Tensor]:
    """Each window's next-token NLL (a float64 scalar), computed block by block through
    ``executor``'s source: every window's hidden state goes through block 0, then block 1, …, in the
    model's own dtype as :func:`lqframe.evaluate.nll_sum` computes them, and the head runs on each
    window's final hidden state."""
    from tqdm.auto import tqdm

    from lqframe.evaluate import _check_windows, next_token_nll
    from lqframe.lqlinear import set_weight_cache
    from lqframe.pipeline import set_module

    _check_windows(windows)
    model = executor.model
    saved = executor.precision, executor.kwargs, executor.block_kwargs, executor.model_dtype
    executor.precision = None  # evaluation computes in the model's dtype, as a resident forward does
    try:
        hidden = executor.first_inputs(windows, desc=f"{desc}: embeddings")
        as_tuple = False
        for b in tqdm(range(len(executor)), desc=desc, unit="block", disable=not progress, leave=False):
            with executor.block(b) as block:
                set_weight_cache(block, True)
                try:
                    with torch.inference_mode():
                        outs = executor.keep()  # (in memory, or files with activations: disk)
                        for x in hidden:
                            out = executor.call_block(block, x)
                            as_tuple = isinstance(out, tuple | list)
                            outs.append((out[0] if as_tuple else out).to(executor.cache_device))
                        hidden = outs
                finally:
                    set_weight_cache(block, False)
        nlls = []
        path, blocks = find_blocks(model)
        with torch.inference_mode():
            for window, h in zip(windows, hidden, strict=True):
                stand = nn.ModuleList([_Stand(h.to(executor.device), as_tuple) for _ in range(len(blocks))])
                set_module(model, path, stand)
                try:
                    ids = window[None].to(executor.device, torch.long)
                    out = model(input_ids=ids, use_cache=False)
                finally:
                    set_module(model, path, blocks)
                nlls.append(next_token_nll(out.logits if hasattr(out, "logits") else out[0], ids).cpu())
    finally:
        executor.precision, executor.kwargs, executor.block_kwargs, executor.model_dtype = saved
    return nlls
