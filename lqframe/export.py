"""Exports of a compressed model to formats other tools load (``lqframe export DIR --to FORMAT OUT``).

``peft``
    the low-rank terms as a standard PEFT LoRA adapter folder: ``adapter_config.json`` +
    ``adapter_model.safetensors`` with ``lora_A = R`` (r × in) and ``lora_B = L`` (out × r) of every
    layer with rank > 0, ``lora_alpha = r`` per layer (scaling 1), so that PEFT computes exactly
    ``x·Wᵀ + (x·Rᵀ)·Lᵀ``; mixed ranks go to ``rank_pattern`` / ``alpha_pattern``. Factors keep
    their stored precision (float16 / bfloat16 as such, int8 and float32 as float32 values).
``gptq``
    Q as a GPTQ checkpoint (the format AutoGPTQ, GPTQModel, optimum, transformers and vLLM read):
    per layer int32 ``qweight`` (in·bits/32 × out, the codes of each output column packed
    least-significant first along the input dimension, 3-bit codes running across words),
    ``qzeros`` (groups × out·bits/32, packed the same way along the output dimension, holding
    ``zero − 1`` in the original ``gptq`` checkpoint format, ``zero`` in ``gptq_v2``), float16
    ``scales`` (groups × out) and ``g_idx``; everything else of the model in float16;
    ``quantization_config`` with ``quant_method: gptq``. Only integer formats with one float16 scale
    and zero point per group of input channels (``rtn``, ``gptq``) fit it. With a ``peft`` export of
    the same checkpoint this is the pair serving engines load as "quantized base + LoRA".
``compressed-tensors``
    Q as llm-compressor's ``pack-quantized`` checkpoint (vLLM's native format; transformers loads it
    through its compressed-tensors integration): per layer ``weight_packed`` (int32, each row's codes
    packed densely least significant first), float32 ``weight_scale`` (groups or channels),
    ``weight_zero_point`` (packed along the output dimension) unless symmetric, ``weight_shape``; one
    config group per scheme. Integer formats with an integer zero point per group (``rtn``, ``gptq``).
``dense``
    an ordinary float checkpoint whose linear weights are ``Q`` (the base the adapter applies to, on
    machines without GPTQ kernels), or ``Q + L·R`` with ``merge``.

Every export ends with a self-check (:func:`check_export`): the files are read back by code that
does not share the writer's packing, and the weights they define must equal the model's ``Q`` (and
``L·R``) exactly; the PEFT adapter, where PEFT is installed, must give the model's logits.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lqframe.checkpoint import atomic_write_json, save_tensors
from lqframe.errors import CheckpointError
from lqframe.kernels import pack_bits
from lqframe.lqlinear import LQLinear
from lqframe.models import _task_of_class
from lqframe.structure import expert_weight, fold_state, fused_name, unfolded
from lqframe.types import QuantizedWeight

__all__ = ["EXPORT_FORMATS", "export", "export_peft", "export_gptq", "export_compressed_tensors", "export_dense",
           "check_export", "gptq_pack", "gptq_layer", "ct_pack", "ct_layer"]

EXPORT_FORMATS = ("peft", "gptq", "compressed-tensors", "dense")
GPTQ_BITS = (2, 3, 4, 8)


def _layers(model: nn.Module) -> dict[str, LQLinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LQLinear)}
    if not layers:
        raise CheckpointError("the model has no compressed (LQLinear) layers to export")
    return layers


def _write_folder(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], tokenizer: Any,
                  quantization_config: dict[str, Any] | None, dtype: str) -> None:
    """A transformers model folder: the tensors, the config (with ``quantization_config`` and
    ``torch_dtype``), the tokenizer."""
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config["torch_dtype"] = dtype
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(out / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError(f"{type(model).__name__} has no Hugging Face config to export with")
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


# --------------------------------------------------------------------------- PEFT


def _factor_tensor(module: LQLinear, key: str) -> torch.Tensor:
    value = getattr(module, key).detach().to("cpu")
    if module.factor_dtype in ("float16", "bfloat16"):
        return value.to(getattr(torch, module.factor_dtype)).contiguous()
    return value.to(torch.float32).contiguous()


def export_peft(model: nn.Module, out: str | Path, base_model: str | None = None) -> dict[str, Any]:
    """Write the adapter folder; returns its ``adapter_config``."""
    out = Path(out)
    layers = {n: m for n, m in _layers(model).items() if m.rank > 0}
    if not layers:
        raise CheckpointError("no compressed layer has a low-rank term (every rank is 0): nothing to export as an "
                              "adapter")
    record = unfolded(model)
    experts = sorted(n for n, kind in record.items() if kind == "experts"
                     and any(layer.startswith(n + ".") for layer in layers))
    if experts:
        raise CheckpointError(
            f"a PEFT adapter targets modules, and transformers builds this model's experts ({experts[0]} and "
            f"{len(experts) - 1} more) as fused 3-D parameters with no module per expert, so the low-rank terms of "
            "the expert layers have nowhere to go; use the checkpoint with lqframe.load / from_pretrained, or "
            "`lqframe export --to dense --merge` for a float model with L·R folded in")
    conv1d = any(record.get(n) == "conv1d" for n in layers)
    ranks = {n: m.rank for n, m in layers.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {n: v for n, v in ranks.items() if v != r}
    config = {
        # PEFT's causal-LM wrapper for causal LMs; its plain wrapper for encoders and other heads
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if _task_of_class(type(model).__name__) == "causal-lm" else None,
        "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(layers), "lora_dropout": 0.0, "bias": "none",
        # Conv1D layers (GPT-2) store their weight transposed: PEFT merges with fan_in_fan_out
        "fan_in_fan_out": conv1d,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True, "revision": None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = _factor_tensor(m, "right")
        tensors[f"base_model.model.{name}.lora_B.weight"] = _factor_tensor(m, "left")
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(out / "adapter_config.json", config)
    return config


# --------------------------------------------------------------------------- GPTQ


def gptq_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words of ``codes`` (rows × n, values < 2**bits), each row's codes packed least
    significant first into ``n·bits/32`` words (a code may straddle two words when bits is 3).

    That is lqframe's own bit stream (:func:`lqframe.kernels.pack_bits`, LSB-first over bytes)
    read as little-endian int32: every row fills whole words, so rows start on word boundaries."""
    rows, n = codes.shape
    if (n * bits) % 32:
        raise CheckpointError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise CheckpointError("GPTQ export needs a little-endian machine")
    stream = pack_bits(codes.reshape(-1).to(torch.int64), bits)
    return stream.view(torch.int32).reshape(rows, n * bits // 32)


def _integer_groups_problem(qw: QuantizedWeight, bits_ok: bool, bits_rule: str) -> str | None:
    """Why ``qw`` is not an integer matrix with one plain scale per group of input channels and an
    allowed width (``bits_ok``; ``bits_rule`` says which), or None: what GPTQ and compressed-tensors
    both need."""
    if qw.codebook is not None or qw.offset is not None:
        return f"its format {qw.format!r} maps codes through a codebook or an offset"
    if isinstance(qw.scale, QuantizedWeight):
        return "its scales are themselves quantized (double quantization)"
    if not bits_ok:
        return f"{bits_rule}, not {qw.bits}"
    if len(qw.shape) != 2:
        return f"it is not a matrix (shape {qw.shape})"
    if qw.shape[1] % qw.block_size:
        return f"its {qw.shape[1]} input channels are not a whole number of groups of {qw.block_size}"
    return None


def _check_gptq_weight(name: str, qw: QuantizedWeight) -> None:
    why = _integer_groups_problem(qw, qw.bits in GPTQ_BITS, "GPTQ checkpoints hold 2, 3, 4 or 8 bits")
    if why is None and ((qw.shape[1] * qw.bits) % 32 or (qw.shape[0] * qw.bits) % 32):
        why = f"its shape {tuple(qw.shape)} does not pack into 32-bit words at {qw.bits} bits"
    elif why is None and not torch.equal(qw.block_scales().to(torch.float16).to(torch.float32), qw.block_scales()):
        why = "its scales are not float16 values"
    if why:
        raise CheckpointError(f"layer {name} cannot be written as GPTQ: {why} (GPTQ needs an integer format with "
                              "a float16 scale and zero point per group, e.g. the rtn or gptq quantizers)")


def _input_order(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (int64, out × in) with the columns in the input's order, and each input channel's
    group (int32 ``g_idx``): a weight stored in act-order (``perm``) is written back the way GPTQ
    reads act-order groups."""
    codes = qw.unpacked_codes().to(torch.int64)
    inverse = qw.inverse_perm()
    if inverse is None:
        return codes, (torch.arange(qw.cols) // qw.block_size).to(torch.int32)
    return codes.index_select(1, inverse), (inverse // qw.block_size).to(torch.int32)


def gptq_layer(name: str, qw: QuantizedWeight, bias: torch.Tensor | None, version: int = 1
               ) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer (``version`` 1: the original ``gptq`` format, zeros stored
    minus one; 2: ``gptq_v2``)."""
    _check_gptq_weight(name, qw)
    codes, g_idx = _input_order(qw)  # out × in
    zeros = qw.block_zeros().to(torch.int64)  # out × groups
    stored_zeros = zeros - 1 if version == 1 else zeros
    if version == 1 and bool((stored_zeros < 0).any()):
        raise CheckpointError(f"layer {name}: a zero point of 0 cannot be written in the original gptq format "
                              "(it stores zero − 1); export with gptq_version 2")
    tensors = {
        f"{name}.qweight": gptq_pack(codes, qw.bits).T.contiguous(),  # (in·bits/32) × out
        f"{name}.qzeros": gptq_pack(stored_zeros.T.contiguous(), qw.bits),  # groups × (out·bits/32)
        f"{name}.scales": qw.block_scales().T.contiguous().to(torch.float16),  # groups × out
        f"{name}.g_idx": g_idx,
    }
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().to("cpu", torch.float16)
    return tensors


def _float_state(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state outside the compressed layers (floats in ``dtype``); a tied output
    embedding is left out, as transformers saves it."""
    drop = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        drop = {f"{n}.weight" for n, mod in model.named_modules() if head is not None and mod is head}
    out = {}
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name in drop or any(module == s or module.startswith(s + ".") for s in skip):
            continue
        out[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    return out


def export_gptq(model: nn.Module, out: str | Path, tokenizer: Any = None, version: int | None = None
                ) -> dict[str, Any]:
    """Write the GPTQ checkpoint folder; returns its ``quantization_config``. ``version`` None:
    the original format when every zero point fits it, else ``gptq_v2``."""
    out = Path(out)
    layers = _layers(model)
    for name, m in layers.items():
        _check_gptq_weight(name, m.quantized_weight())
    configs = {(m.quantized_weight().bits, m.quantized_weight().block_size) for m in layers.values()}
    if len(configs) != 1:
        raise CheckpointError("a GPTQ checkpoint has one bit width and group size for every layer; this model mixes "
                              + ", ".join(f"{b} bits g{g}" for b, g in sorted(configs)))
    bits, group = configs.pop()
    if version is None:
        version = 1 if all(bool((m.quantized_weight().block_zeros() >= 1).all()) for m in layers.values()) else 2
    sym = all(not isinstance(m.quantized_weight().zero, torch.Tensor) for m in layers.values())
    tensors = _float_state(model, set(layers), torch.float16)
    for name, m in layers.items():
        tensors.update(gptq_layer(name, m.quantized_weight(), m.bias, version))
    config = _config_dict(model)
    desc_act = any(m.quantized_weight().perm is not None for m in layers.values())
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
          "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
          "checkpoint_format": "gptq" if version == 1 else "gptq_v2",
          "modules_in_block_to_quantize": None,
          "meta": {"quantizer": "lqframe", "layers": sorted(layers)}}
    _write_folder(out, tensors, config, tokenizer, qc, "float16")
    return qc


# --------------------------------------------------------------------------- compressed-tensors


def ct_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` words of unsigned ``codes`` (rows × n, values <
    2**bits): each row densely, least significant first, in ``ceil(n·bits/32)`` int32 words (codes
    may straddle words at any width; the last word of a row padded with zero bits)."""
    rows, n = codes.shape
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise CheckpointError("compressed-tensors export needs a little-endian machine")
    padded = -(-n // 32) * 32
    wide = torch.zeros(rows, padded, dtype=torch.int64)
    wide[:, :n] = codes.to(torch.int64)
    words = pack_bits(wide.reshape(-1), bits).view(torch.int32).reshape(rows, padded * bits // 32)
    return words[:, : -(-n * bits // 32)].contiguous()


def _check_ct_weight(name: str, qw: QuantizedWeight) -> None:
    why = _integer_groups_problem(qw, 1 <= qw.bits <= 8, "pack-quantized holds 1 to 8 bits")
    if why is None:
        zeros = qw.block_zeros()
        if not torch.equal(zeros, zeros.round()) or bool((zeros < 0).any()) or bool((zeros >= 2 ** qw.bits).any()):
            why = f"its zero points are not integers in [0, {2 ** qw.bits - 1}]"
        elif qw.perm is not None:
            why = ("its groups are act-order sets of input channels (g_idx), which compressed-tensors no longer "
                   "holds (0.20 removed actorder: group); --to gptq writes them (desc_act)")
    if why:
        raise CheckpointError(f"layer {name} cannot be written as compressed-tensors pack-quantized: {why} (it needs "
                              "an integer format with a scale and an integer zero point per group, e.g. the rtn or "
                              "gptq quantizers)")


def _ct_scheme(qw: QuantizedWeight) -> dict[str, Any]:
    """The ``weights`` quantization arguments of a layer (what ``config_groups`` groups by)."""
    symmetric = not isinstance(qw.zero, torch.Tensor) and float(qw.zero or 0) == 2 ** (qw.bits - 1)
    channel = qw.block_size == qw.shape[1]
    return {"num_bits": qw.bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if channel else "group", "group_size": None if channel else qw.block_size,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def ct_layer(name: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The compressed-tensors ``pack-quantized`` tensors of one layer: ``weight_packed`` (out ×
    ⌈in·bits/32⌉ int32), ``weight_scale`` (out × groups, float32: the exact values lqframe decodes
    with), ``weight_shape``, and — for zero points other than the symmetric 2**(bits−1) —
    ``weight_zero_point`` packed along the output dimension (⌈out·bits/32⌉ × groups). compressed-tensors
    stores signed values ``q = code − 2**(bits−1)`` plus that offset, which is the unsigned code
    itself: ``w = (q − zp)·scale = (code − zero)·scale``, lqframe's decoding."""
    _check_ct_weight(name, qw)
    tensors = {
        f"{name}.weight_packed": ct_pack(qw.unpacked_codes(), qw.bits),
        f"{name}.weight_scale": qw.block_scales().contiguous(),
        f"{name}.weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64),
    }
    if not _ct_scheme(qw)["symmetric"]:
        tensors[f"{name}.weight_zero_point"] = ct_pack(qw.block_zeros().to(torch.int64).T.contiguous(),
                                                       qw.bits).T.contiguous()
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().to("cpu", torch.float32)
    return tensors


def export_compressed_tensors(model: nn.Module, out: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write Q as a compressed-tensors ``pack-quantized`` checkpoint (llm-compressor's format, which
    vLLM serves and transformers loads); returns its ``quantization_config``. One config group per
    distinct layer scheme; every other tensor in float32."""
    from importlib.metadata import PackageNotFoundError, version

    out = Path(out)
    layers = _layers(model)
    record = unfolded(model)
    folded = sorted(n for n in record if any(layer == n or layer.startswith(n + ".") for layer in layers))
    if folded:
        raise CheckpointError(f"compressed-tensors quantizes the model's own linear modules, and {folded[0]} is "
                              f"{'fused experts' if record[folded[0]] == 'experts' else 'a Conv1D'} in transformers' "
                              "model, not nn.Linear; export it with --to dense, or use the checkpoint itself")
    groups: dict[str, dict[str, Any]] = {}
    tensors = _float_state(model, set(layers), torch.float32)
    for name, m in layers.items():
        qw = m.quantized_weight()
        tensors.update(ct_layer(name, qw, m.bias))
        scheme = _ct_scheme(qw)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme})["targets"].append(name)
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if len(groups) == 1:  # llm-compressor's spelling: every Linear, the rest ignored
        only = next(iter(groups.values()))
        only["targets"], ignore = ["Linear"], sorted(n for n in linears if n not in layers)
    else:
        ignore = sorted(n for n in linears if n not in layers)
    try:
        ct_version = version("compressed-tensors")
    except PackageNotFoundError:
        ct_version = None
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {f"group_{i}": {**g, "input_activations": None, "output_activations": None,
                                           "format": "pack-quantized"}
                            for i, g in enumerate(groups.values())},
          "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
          "transform_config": {}, "version": ct_version}
    _write_folder(out, tensors, _config_dict(model), tokenizer, qc, "float32")
    return qc


# --------------------------------------------------------------------------- dense


def export_dense(model: nn.Module, out: str | Path, tokenizer: Any = None, merge: bool = False,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """An ordinary transformers checkpoint with ``Q`` (``merge``: ``Q + L·R``) as the weights."""
    out = Path(out)
    layers = _layers(model)
    tensors = _float_state(model, set(layers), dtype)
    for name, m in layers.items():
        w = m.dense_weight() if merge else m.dequantized_weight()
        tensors[f"{name}.weight"] = w.detach().to("cpu", dtype).contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to("cpu", dtype)
    tensors = fold_state(model, tensors)  # fused experts and Conv1D back in the model's own layout
    name = str(dtype).removeprefix("torch.")
    _write_folder(out, tensors, _config_dict(model), tokenizer, None, name)
    return {"merged": merge, "dtype": name}


# --------------------------------------------------------------------------- self-check


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _dense_base(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose compressed layers are plain ``nn.Linear`` with ``weights``."""
    import copy

    from lqframe.pipeline import set_module

    base = copy.deepcopy(model).to("cpu")
    for name, m in _layers(base).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weights[name])
            if m.bias is not None:
                lin.bias.copy_(m.bias.detach())
        set_module(base, name, lin)
    return base


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def check_export(model: nn.Module, fmt: str, out: str | Path, log: Callable[[str], None] = lambda s: None,
                 merge: bool = False) -> dict[str, Any]:
    """Read the export back and compare it with ``model``; raises ``CheckpointError`` on any
    difference, returns what was checked."""
    out = Path(out)
    layers = _layers(model)
    result: dict[str, Any] = {"format": fmt, "layers": 0}
    if fmt in ("gptq", "compressed-tensors"):
        # read back by the importer (lqframe.imports: its own bit reader, not the writer's packing)
        from lqframe.imports import read_quantized

        label = "GPTQ" if fmt == "gptq" else "compressed-tensors"
        _, read = read_quantized(out)
        for name, m in layers.items():
            w, mine = read[name].dequantize(), m.dequantized_weight().detach().to("cpu", torch.float32)
            if not torch.equal(w, mine):
                raise CheckpointError(f"{label} self-check: layer {name} reads back different weights "
                                      f"(max |Δ| {float((w - mine).abs().max())})")
            result["layers"] += 1
        log(f"self-check: {result['layers']} {label} layers unpack to exactly the model's Q")
    elif fmt == "peft":
        state = _read(out / "adapter_model.safetensors")
        weights = {}
        for name, m in layers.items():
            weights[name] = m.dequantized_weight().detach().cpu()
            if m.rank == 0:
                continue
            a = state[f"base_model.model.{name}.lora_A.weight"].float()
            b = state[f"base_model.model.{name}.lora_B.weight"].float()
            if not (torch.equal(a, m.right.detach().cpu().float()) and torch.equal(b, m.left.detach().cpu().float())):
                raise CheckpointError(f"PEFT self-check: layer {name}'s adapter differs from its factors")
            result["layers"] += 1
        try:
            import peft  # noqa: F401
        except ImportError:
            log("self-check: the adapter holds exactly the model's factors (PEFT is not installed: its logits were "
                "not compared)")
            return result
        from peft import PeftModel

        base = _dense_base(model, weights)
        tuned = PeftModel.from_pretrained(base, str(out)).eval()
        vocab = int(getattr(model.config, "vocab_size", 256))
        ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
        mine = _logits(model.to("cpu"), ids)
        theirs = _logits(tuned, ids)
        err = float((mine - theirs).abs().max() / mine.abs().max().clamp_min(1e-12))
        result["peft_logits_rel_error"] = err
        if err > 1e-4:
            raise CheckpointError(f"PEFT self-check: Q + the adapter loaded by PEFT gives other logits than the model "
                                  f"(max relative difference {err:.2e})")
        log(f"self-check: PEFT {sys.modules['peft'].__version__} on Q reproduces the model's logits (max relative "
            f"difference {err:.1e})")
    elif fmt == "dense":
        state = _read(out / "model.safetensors")
        record = unfolded(model)
        dtype = next(iter(state.values())).dtype if state else torch.float32
        for name, m in layers.items():
            ref = (m.dense_weight() if merge else m.dequantized_weight()).detach().to("cpu", dtype)
            stored = _unfolded_weight(model, record, state, name)
            if not torch.equal(stored, ref):
                raise CheckpointError(f"dense self-check: layer {name} reads back different weights")
            result["layers"] += 1
        log(f"self-check: {result['layers']} dense layers ({'Q + L·R' if merge else 'Q'}) read back exactly")
    return result


def _unfolded_weight(model: nn.Module, record: dict[str, str], state: dict[str, torch.Tensor], name: str
                     ) -> torch.Tensor:
    """Layer ``name``'s weight (out × in) read from a dense export in the model's own layout: a
    Conv1D weight transposed back, an expert's cut from the fused 3-D tensor by the layout flags."""
    if record.get(name) == "conv1d":
        return state[f"{name}.weight"].T
    owner, _, part = name.rpartition(".")
    experts, _, e = owner.rpartition(".")
    if record.get(experts) != "experts":
        return state[f"{name}.weight"]
    module = model.get_submodule(experts)
    return expert_weight(module, state[f"{experts}.{fused_name(module, part)}"], int(e), part)


def export(source: str | Path, fmt: str, out: str | Path, *, merge: bool = False, gptq_version: int | None = None,
           base_model: str | None = None, check: bool = True, log: Callable[[str], None] = lambda s: None
           ) -> dict[str, Any]:
    """Export the lqframe checkpoint folder ``source`` (see module doc)."""
    from lqframe.checkpoint import load_checkpoint, load_tokenizer

    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"export folder {out} is not empty; choose another")
    model = load_checkpoint(source)
    tokenizer = load_tokenizer(source)
    if fmt == "peft":
        info = export_peft(model, out, base_model or str(source))
    elif fmt == "gptq":
        info = export_gptq(model, out, tokenizer, gptq_version)
    elif fmt == "compressed-tensors":
        info = export_compressed_tensors(model, out, tokenizer)
    else:
        info = export_dense(model, out, tokenizer, merge=merge)
    result = {"format": fmt, "output": str(out), "info": info}
    if check:
        result["check"] = check_export(model, fmt, out, log, merge=merge)
    return result
