"""Saving and loading compressed checkpoints.

A checkpoint folder holds ``model.safetensors`` (or shards plus ``model.safetensors.index.json``)
with the packed codes and scales in their real width, L and R in their storage dtype and every
unquantized parameter; ``config.json`` with a ``quantization_config`` (``quant_method:
"lqframe"``) that describes each compressed layer; ``recipe.yaml``; ``report.json``; and the
tokenizer. Every file is written atomically (temporary file + rename); ``report.json`` is
written last, so a folder with a report is complete.

``report.json`` also records every other file of the checkpoint (``files``: name → size in bytes
and sha256). Loading compares the weight files' sizes with that record before it deserializes
anything, so a truncated copy is a one-line error naming the file rather than a safetensors
traceback; :func:`verify_checkpoint` (``lqframe inspect --verify``) recomputes the hashes. The
record lives in ``report.json`` rather than in a file of its own because ``report.json`` already is
the completion mark (and a new file would be foreign to ``lqframe run --overwrite``, which removes
only the files it knows), and transformers' ``save_pretrained`` does not copy it (a record in
``config.json`` would travel into folders whose files differ). Checkpoints written before it was
recorded load without the check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lqframe.errors import CheckpointError
from lqframe.factors import layer_factor_dtype
from lqframe.lqlinear import LQLinear

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "atomic_write_text",
    "atomic_write_json",
    "save_tensors",
    "save_checkpoint",
    "checkpoint_state",
    "load_checkpoint",
    "read_quantization_config",
    "file_record",
    "recorded_files",
    "check_file_sizes",
    "verify_checkpoint",
    "swap_in_skeletons",
]

QUANT_METHOD = "lqframe"
FORMAT_VERSION = 1
#: the file whose ``files`` key records the size and sha256 of every other file of the checkpoint
REPORT = "report.json"
INDEX = "model.safetensors.index.json"
#: what a damaged file's error tells the user to do
_REMEDY = "truncated or damaged; re-run or copy it again"

_log = logging.getLogger(__name__)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic(Path(path), write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
    """Atomic safetensors write (:func:`write_shard`: each tensor's bytes written in turn, so tensors
    that share memory are stored apart)."""
    write_shard(path, tensors, metadata=metadata)


#: safetensors' names of the dtypes a checkpoint holds
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_shard(path: str | Path, tensors: Mapping[str, torch.Tensor],
                fetch: Callable[[str], torch.Tensor] | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (atomically): the header from the tensors' shapes
    and dtypes (meta tensors are fine), then each tensor's bytes in order, a meta one read by
    ``fetch(name)`` just before it is written — so a shard never has to be in memory as a whole, and
    a streamed and a resident run write the same bytes."""
    import struct

    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {t.dtype} cannot be stored in a safetensors checkpoint")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for name, t in tensors.items():
                value = t
                if t.is_meta:
                    if fetch is None:
                        raise CheckpointError(f"{name}: the model holds it on the meta device, and nothing says "
                                              "where to read it")
                    value = fetch(name)
                    if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
                        raise CheckpointError(f"{name}: read {tuple(value.shape)} {value.dtype}, the model has "
                                              f"{tuple(t.shape)} {t.dtype}")
                flat = value.detach().to("cpu").contiguous().reshape(-1)
                if flat.numel():
                    fh.write(flat.view(torch.uint8).numpy().tobytes())

    _atomic(Path(path), write)


# --------------------------------------------------------------------------- state


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as stored (L and R in their storage format), tied weights once."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in state.items():
        if t.is_meta:  # a streamed model's block tensors, on disk (never tied)
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen and t.is_floating_point():
            continue  # tied parameter (e.g. lm_head ↔ embed_tokens); the config re-ties it
        seen[key] = name
        out[name] = t
    return out


def quantization_config(model: nn.Module, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from lqframe import __version__
    from lqframe.structure import unfolded

    layers = {name: m.layer_config() for name, m in model.named_modules() if isinstance(m, LQLinear)}
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "lqframe_version": __version__,
            "layers": layers, "unfolded": unfolded(model), **(extra or {})}


def _shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    *,
    recipe_yaml: str | None = None,
    report: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    max_shard_size_mb: float = 2000,
    fetch: Callable[[str], torch.Tensor] | None = None,
) -> list[Path]:
    """Write a loadable checkpoint (see module doc). Returns the files written.

    ``fetch(name)`` gives the tensors the model holds only as meta tensors (a streamed model's
    blocks, read from disk): the shards are planned from the shapes, and each is read, written and
    dropped in turn, so the model never has to be in memory as a whole."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        _write_checkpoint(model, out, written, recipe_yaml, report, tokenizer, max_shard_size_mb, fetch)
    except BaseException:
        for f in written:  # nothing half-written: a failed save leaves no checkpoint files behind
            f.unlink(missing_ok=True)
        raise
    return written


def _write_checkpoint(model, out: Path, written: list[Path], recipe_yaml, report, tokenizer, max_shard_size_mb,
                      fetch=None):
    state = checkpoint_state(model)
    shards = _shards(state, int(max_shard_size_mb * 1024 * 1024))
    if len(shards) == 1:
        write_shard(out / "model.safetensors", shards[0], fetch)
        written.append(out / "model.safetensors")
        stale = out / "model.safetensors.index.json"
        if stale.exists():
            stale.unlink()
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_shard(out / fname, shard, fetch)
            written.append(out / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_json(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(out / "model.safetensors.index.json")
    config = getattr(model, "config", None)
    cfg = config.to_dict() if config is not None else {}
    if config is not None and hasattr(model, "save_pretrained"):
        # the class whose module names the checkpoint holds (as save_pretrained records it), whatever
        # the source's config said: lqframe.load and from_pretrained rebuild exactly this model
        cfg["architectures"] = [type(model).__name__]
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = quantization_config(model)
    atomic_write_json(out / "config.json", cfg)
    written.append(out / "config.json")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            atomic_write_json(out / "generation_config.json", gen.to_dict())
            written.append(out / "generation_config.json")
        except Exception:  # noqa: BLE001 - a generation config is optional
            pass
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                os.replace(f, out / f.name)
                written.append(out / f.name)
    if recipe_yaml is not None:
        atomic_write_text(out / "recipe.yaml", recipe_yaml)
        written.append(out / "recipe.yaml")
    # last, and always (an empty report when none is given): the report records every file above, so
    # a folder with one is complete and its files can be checked against it
    files = {f.name: file_record(f) for f in written if f.is_file()}
    atomic_write_json(out / REPORT, {**(report or {}), "files": files})
    written.append(out / REPORT)


# --------------------------------------------------------------------------- integrity


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, hashed in chunks: weight files can be tens of GB."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        size = os.fstat(fh.fileno()).st_size
    return {"size": size, "sha256": digest}


def _read_report(path: Path) -> dict[str, Any] | None:
    report_path = path / REPORT
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{report_path}: unreadable report: {_one_line(exc)}") from None
    if not isinstance(report, dict):
        raise CheckpointError(f"{report_path}: unreadable report: not a JSON object")
    return report


def _files_of(report: Mapping[str, Any] | None, report_path: Path) -> dict[str, dict[str, Any]] | None:
    files = None if report is None else report.get("files")
    if files is None:
        return None

    def valid(name: Any, rec: Any) -> bool:
        # plain names only: the record must not send the checks outside the folder
        return (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
                and "\\" not in name and isinstance(rec, dict) and type(rec.get("size")) is int
                and rec["size"] >= 0 and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64)

    if not isinstance(files, dict) or not all(valid(n, r) for n, r in files.items()):
        raise CheckpointError(f"{report_path}: malformed 'files' record (expected file name → size and sha256)")
    return files


def recorded_files(path: str | Path) -> dict[str, dict[str, Any]] | None:
    """The checkpoint's record of its files (name → ``{"size", "sha256"}``, from ``report.json``), or
    None when it has none (written before lqframe recorded them, or not a complete checkpoint)."""
    path = Path(path)
    return _files_of(_read_report(path), path / REPORT)


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == INDEX


def _check_sizes(path: Path, files: Mapping[str, Mapping[str, Any]] | None) -> None:
    if files is None:
        _log.debug("%s records no file sizes (written before lqframe recorded them); not checked", path)
        return
    for name, rec in files.items():
        if not _is_weight_file(name):
            continue  # config, tokenizer, recipe: small, read as text, and sometimes edited by hand
        f = path / name
        try:
            actual = f.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing (the checkpoint recorded {rec['size']} bytes); copy it again or "
                                  "re-run") from None
        if actual != rec["size"]:
            raise CheckpointError(f"{f}: {actual} bytes, but the checkpoint recorded {rec['size']}: {_REMEDY}")


def check_file_sizes(path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the file when a weight file (or the shard index) that the
    checkpoint records is missing or has another size than recorded. Sizes only, no hashing, so it
    costs a few ``stat`` calls even for a 70B checkpoint; a checkpoint without a record passes."""
    path = Path(path)
    _check_sizes(path, recorded_files(path))


def verify_checkpoint(path: str | Path, on_file: Callable[[dict[str, Any]], None] | None = None
                      ) -> list[dict[str, Any]]:
    """Recompute size and sha256 of every file the checkpoint records (``lqframe inspect --verify``).
    Returns one entry per file: ``name``, ``status`` (``ok``, ``mismatch`` or ``missing``), ``size``,
    ``sha256`` (None when missing, or when the size already differs: no need to hash a truncated file)
    and the recorded ``recorded_size`` and ``recorded_sha256``; ``on_file`` sees each entry as soon as
    it is known (hashing a large checkpoint takes minutes). Raises :class:`CheckpointError` when the
    checkpoint records no files."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    files = recorded_files(path)
    if files is None:
        raise CheckpointError(f"{path}: records no file sizes or checksums ({REPORT} is missing or has no 'files': "
                              "a checkpoint written before lqframe recorded them, or an unfinished one); nothing "
                              "to verify")
    results = []
    for name, rec in files.items():
        f = path / name
        entry: dict[str, Any] = {"name": name, "status": "missing", "size": None, "sha256": None,
                                 "recorded_size": rec["size"], "recorded_sha256": rec["sha256"]}
        if f.is_file():
            entry["size"] = f.stat().st_size
            entry["status"] = "mismatch"
            if entry["size"] == rec["size"]:
                entry["sha256"] = file_record(f)["sha256"]
                if entry["sha256"] == rec["sha256"]:
                    entry["status"] = "ok"
        results.append(entry)
        if on_file is not None:
            on_file(entry)
    return results


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------- loading


def read_quantization_config(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not an lqframe checkpoint (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable config: {exc}") from None
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{cfg_path}: no lqframe quantization_config (quant_method must be '{QUANT_METHOD}')")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format version {qc['format_version']} is newer than this lqframe "
                              f"supports ({FORMAT_VERSION}); upgrade lqframe")
    return qc


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _model_name(model: nn.Module, name: str) -> str:
    """``name`` as ``model`` spells it: the same, or with transformers' ``base_model_prefix`` added or
    removed (a head model loading a bare model's checkpoint, or the reverse, as from_pretrained
    allows: ``AutoModel.from_pretrained`` of a ``BertForMaskedLM`` checkpoint)."""
    if _has_module(model, name):
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        other = name.removeprefix(prefix + ".") if name.startswith(prefix + ".") else f"{prefix}.{name}"
        if _has_module(model, other):
            return other
    raise CheckpointError(f"the checkpoint compresses layer {name!r}, which the {type(model).__name__} model "
                          "does not have")


def swap_in_skeletons(model: nn.Module, layers: Mapping[str, Mapping[str, Any]],
                      unfolded: Mapping[str, str] | None = None) -> dict[str, Mapping[str, Any]]:
    """Unfold the modules the checkpoint records as unfolded (:mod:`lqframe.structure`: fused experts,
    Conv1D), then replace the named linears by empty :class:`LQLinear` modules of the recorded layout.
    Returns the layers by the names they have in ``model`` (see :func:`_model_name`)."""
    from lqframe.structure import unfold

    if unfolded:
        unfold(model, {_model_name(model, name): kind for name, kind in unfolded.items()})
    resolved = {_model_name(model, name): cfg for name, cfg in layers.items()}
    for name, layer_cfg in resolved.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LQLinear.from_layer_config(dict(layer_cfg)))
    return resolved


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({type(exc).__name__}: {_one_line(exc)}); "
                                  f"{_REMEDY}") from None
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_state(path: str | Path, *, check_sizes: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's weight files. The files' sizes are checked against the record
    first (``check_sizes``; :func:`load_checkpoint` has done it already), and a file safetensors cannot
    read anyway (a damaged header of the right size) is a :class:`CheckpointError` naming it."""
    path = Path(path)
    if check_sizes:
        check_file_sizes(path)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if not f.is_file():
            raise CheckpointError(f"{f}: weight shard listed in the index is missing")
        try:
            with safe_open(f, framework="pt") as fh:
                for key in fh.keys():
                    state[key] = fh.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{f}: unreadable safetensors file ({_one_line(exc)}); {_REMEDY}") from None
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compressed model from a checkpoint folder (``lqframe.load``)."""
    import transformers

    path = Path(path)
    qc = read_quantization_config(path)
    check_file_sizes(path)  # before building the model: a damaged copy fails in a second, naming the file
    config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    archs = getattr(config, "architectures", None) or []
    model_cls = None
    for arch in archs:
        model_cls = getattr(transformers, arch, None)
        if model_cls is not None:
            break
    if model_cls is None:
        model_cls = transformers.AutoModelForCausalLM
        model = model_cls.from_config(config)
    else:
        model = model_cls(config)
    swap_in_skeletons(model, qc["layers"], qc.get("unfolded"))
    state = read_state(path, check_sizes=False)
    result = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model.to(device)


def _tied_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            names.add(name)
        seen.setdefault(id(p), name)
    keys = getattr(model, "_tied_weights_keys", None) or {}
    names |= set(keys if not isinstance(keys, dict) else keys.keys())
    return names


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with a checkpoint, or None if it has none."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError):
        return None


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Per-layer formats, bits, ranks (from config.json) and errors (from report.json, if present).
    Reads no weights, but checks the weight files' sizes like a load does: a checkpoint that inspects
    fine also loads."""
    path = Path(path)
    qc = read_quantization_config(path)
    report = _read_report(path)
    _check_sizes(path, _files_of(report, path / REPORT))
    report = report or {}
    measured = {r["name"]: r for r in report.get("layers", [])}
    layers = []
    for name, cfg in qc["layers"].items():
        module = LQLinear.from_layer_config(cfg)
        header = cfg["qweight"]
        numel = cfg["in_features"] * cfg["out_features"]
        q_bits = module.quantized_weight().storage_bits()
        lr_bits = module.storage_bits() - q_bits
        m = measured.get(name, {})
        layers.append({
            "name": name,
            "format": header.get("format"),
            "quantizer": m.get("quantizer", cfg.get("meta", {}).get("quantizer", {}).get("name", "?")),
            "reconstructor": m.get("reconstructor", cfg.get("meta", {}).get("reconstructor", {}).get("name", "?")),
            "bits": header.get("bits"),
            "group_size": header.get("block_size"),
            "rank": cfg["rank"],
            "factor_dtype": layer_factor_dtype(cfg) if cfg["rank"] else None,
            "numel": numel,
            "storage_bits": q_bits,
            "lowrank_bits": lr_bits,
            "rel_weight_error": m.get("rel_weight_error", float("nan")),
            "rel_output_error": m.get("rel_output_error"),
            "seconds": m.get("seconds", 0.0),
            "info": m.get("info", {}),
        })
    numel = sum(x["numel"] for x in layers)
    out = {k: report.get(k) for k in ("model", "recipe", "fp_ppl", "ppl", "perplexity", "seconds", "peak_rss_mb",
                                      "coverage", "data_free")}
    out.update({
        "path": str(path),
        "params": numel,
        "avg_bits": sum(x["storage_bits"] for x in layers) / numel if numel else None,
        "avg_bits_with_lowrank": sum(x["storage_bits"] + x["lowrank_bits"] for x in layers) / numel if numel else None,
        "layers": layers,
    })
    out["seconds"] = out["seconds"] or 0.0
    out["peak_rss_mb"] = out["peak_rss_mb"] or 0.0
    return out
