"""Q from another tool's quantized checkpoint, read exactly (``quantize_stage.from: PATH``).

A user holding a GPTQ, compressed-tensors or bitsandbytes 4-bit (QLoRA) checkpoint gets lqframe's
corrections on it (QERA's closed form, RILQ tuning) without re-quantizing: :func:`read_quantized`
reads every quantized layer of the folder into lqframe's :class:`~lqframe.QuantizedWeight` — the
same codes, scales and zero points, so its ``dequantize()`` equals the producing tool's
dequantization — and the run's decompose stage hands each layer's reconstructor a
:class:`FixedQuantizer` that always answers with that Q (an alternating reconstructor then converges
in one step: Q never moves). ``--model`` names the float model the checkpoint was made from; its
calibration statistics drive the corrections.

Formats:

``gptq`` (AutoGPTQ / GPTQModel / optimum; ``checkpoint_format`` ``gptq`` — zero points stored
minus one — or ``gptq_v2``): ``qweight`` int32 (in·bits/32 × out, each output column's codes packed
least significant first along the input dimension), ``qzeros`` (groups × out·bits/32), float16
``scales`` (groups × out), ``g_idx``. Widths 2, 3, 4, 8.

``compressed-tensors`` ``pack-quantized`` (llm-compressor): ``weight_packed`` (out × ⌈in·bits/32⌉,
each row packed densely), ``weight_scale`` (out × groups, or out × 1 per channel),
``weight_zero_point`` packed along the output dimension when asymmetric, ``weight_shape``.

``bitsandbytes`` 4-bit (transformers' ``BitsAndBytesConfig(load_in_4bit=True)``, QLoRA's base): per
layer the ``weight`` bytes (two codes per byte, the first in the high nibble, over the flattened
out × in weight), ``weight.quant_map`` (the 16 code values: NF4 or FP4), ``weight.absmax`` (one
scale per block of ``blocksize`` — float32, or 8-bit codes when double-quantized, with
``nested_absmax``, ``nested_quant_map`` and the ``nested_offset`` of the ``quant_state`` JSON) — read
into lqframe's codebook format, double quantization as ``nf``'s ``double_quant: qlora``. Blocks run
over the flattened weight, so ``in_features`` must be a multiple of ``blocksize`` (every model
bitsandbytes is used on) for them to be lqframe's per-row blocks.

A ``g_idx`` (GPTQ) or ``weight_g_idx`` (compressed-tensors ``actorder: group``) that puts input
channels in groups other than contiguous runs — act-order without static groups — is read as a
column order: the Q keeps its codes with the columns sorted by group (``QuantizedWeight.perm``), so
each group is one block, exactly as the producing tool groups them. Every group must hold
``group_size`` channels (what GPTQ makes); any other layout lqframe cannot represent is refused
naming the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lqframe.errors import CheckpointError
from lqframe.interfaces import Quantizer
from lqframe.quantization import int_format
from lqframe.types import QuantizedWeight

__all__ = ["IMPORT_FORMATS", "read_quantized", "unpack_rows", "FixedQuantizer"]

IMPORT_FORMATS = ("gptq", "compressed-tensors", "bitsandbytes")


def unpack_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(rows × count) unsigned codes from int32 words (rows × k): each row's codes densely packed,
    least significant bit first, from the row's first word (little-endian words)."""
    rows, k = words.shape
    if count * bits > 32 * k:
        raise CheckpointError(f"{k} words of 32 bits cannot hold {count} codes of {bits} bits")
    raw = words.contiguous().to(torch.int32).numpy().astype("<i4").view(np.uint8).reshape(rows, 4 * k)
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, : count * bits].reshape(rows, count, bits)
    weights = (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy((stream.astype(np.int64) * weights).sum(-1))


class FixedQuantizer(Quantizer):
    """A quantizer that answers every call with one imported Q (any weight: an alternation's
    ``W − L·R`` gets the same Q, which is what correcting a fixed quantization means)."""

    rounds_to_nearest = False  # (whatever the producing tool did)

    def __init__(self, qweight: QuantizedWeight, source: str = "imported"):
        self.qweight = qweight
        self.source = source
        self._fingerprint: dict[str, Any] | None = None

    def quantize(self, weight, stats=None) -> QuantizedWeight:
        if tuple(weight.shape) != tuple(self.qweight.shape):
            raise CheckpointError(f"the imported Q is {tuple(self.qweight.shape)}, the weight {tuple(weight.shape)}")
        return self.qweight

    def roundtrip(self, weight, stats=None) -> torch.Tensor:
        return self.quantize(weight, stats).dequantize(torch.float32).to(weight.device)

    def storage_bits(self, shape) -> int:
        return self.qweight.storage_bits()

    def options(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.qweight.format, "bits": self.qweight.bits,
                "group_size": self.qweight.block_size}

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this Q in the allocation cost cache: its options and every stored tensor
        (hashed once: every candidate of the layer asks)."""
        if self._fingerprint is None:
            from lqframe.costcache import tensor_digest

            tensors, header = self.qweight.to_state()
            self._fingerprint = {"name": "imported", "options": self.options(),
                                 "header": json.dumps(header, sort_keys=True),
                                 "tensors": {k: tensor_digest(t) for k, t in sorted(tensors.items())}}
        return self._fingerprint


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (quantize_stage.from takes a quantized model folder)")
    try:
        qc = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc})") from None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: no quantization_config: not a quantized checkpoint")
    return qc


def _column_order(g_idx: torch.Tensor | None, group: int, where: str) -> torch.Tensor | None:
    """The stored column order that makes ``g_idx``'s groups contiguous blocks (None: already so)."""
    if g_idx is None:
        return None
    g = g_idx.to(torch.int64).reshape(-1)
    cols = g.numel()
    if torch.equal(g, torch.arange(cols) // group):
        return None
    groups = -(-cols // group)
    sizes = torch.bincount(g.clamp(0, groups), minlength=groups + 1)
    full = torch.full((groups,), group, dtype=torch.int64)
    full[-1] = cols - group * (groups - 1)
    if bool((g < 0).any()) or bool((g >= groups).any()) or not torch.equal(sizes[:groups], full):
        raise CheckpointError(f"{where}: its groups are not {groups} sets of {group} input channels (sizes "
                              f"{sorted(set(sizes[:groups].tolist()))}); lqframe holds act-order groups of equal size")
    return torch.argsort(g, stable=True).to(torch.int32)


def _qweight(codes: torch.Tensor, bits: int, group: int, scales: torch.Tensor, zeros: torch.Tensor,
             source: str, perm: torch.Tensor | None = None) -> QuantizedWeight:
    symmetric = bool((zeros == 2 ** (bits - 1)).all())
    zero: int | torch.Tensor = 2 ** (bits - 1) if symmetric else zeros.to(torch.int64)
    for narrow in (torch.float16, torch.bfloat16):  # float32 scales holding 16-bit values: stored in 16 bits
        if scales.dtype == torch.float32 and torch.equal(scales.to(narrow).to(torch.float32), scales):
            scales = scales.to(narrow)
            break
    if perm is not None:  # codes in stored order: each group's channels together
        codes = codes.index_select(1, perm.to(torch.int64))
    return QuantizedWeight.from_codes(codes.to(torch.int64), bits, group, scales.contiguous(), zero=zero,
                                      format=int_format(bits, symmetric), meta={"imported": source}, perm=perm)


def _gptq(folder: Path, qc: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    bits = int(qc.get("bits", 4))
    version = {"gptq": 1, "gptq_v2": 2}.get(qc.get("checkpoint_format", "gptq"))
    if version is None:
        raise CheckpointError(f"{folder}: GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not one lqframe "
                              "reads (gptq, gptq_v2)")
    if bits not in (2, 3, 4, 8):
        raise CheckpointError(f"{folder}: GPTQ bits {bits}: lqframe reads 2, 3, 4 and 8")
    out = {}
    for key in sorted(state):
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        qweight, scales = state[key], state.get(f"{name}.scales")
        qzeros, g_idx = state.get(f"{name}.qzeros"), state.get(f"{name}.g_idx")
        if scales is None or qzeros is None:
            raise CheckpointError(f"{folder}: {name}.qweight has no .scales or .qzeros beside it")
        in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
        groups = scales.shape[0]
        group = in_f // groups if in_f % groups == 0 else None
        if group is None:
            raise CheckpointError(f"{folder}: {name}.scales has {groups} groups for {in_f} input channels")
        perm = _column_order(g_idx, group, f"{folder}: {name}.g_idx")
        codes = unpack_rows(qweight.T.contiguous(), bits, in_f)  # out × in
        zeros = unpack_rows(qzeros, bits, out_f).T + (1 if version == 1 else 0)  # out × groups
        out[name] = _qweight(codes, bits, group, scales.T.contiguous(), zeros, "gptq", perm)
    return out


def _compressed_tensors(folder: Path, qc: dict[str, Any], state: dict[str, torch.Tensor]
                        ) -> dict[str, QuantizedWeight]:
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise CheckpointError(f"{folder}: compressed-tensors format {fmt!r}: lqframe reads pack-quantized")
    schemes = list((qc.get("config_groups") or {}).values())
    out = {}
    for key in sorted(state):
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        scheme = next((g for g in schemes if name in g.get("targets", [])), None) or next(
            (g for g in schemes if "Linear" in g.get("targets", [])), None)
        if scheme is None:
            raise CheckpointError(f"{folder}: {key}: no config group targets this layer")
        w = scheme["weights"]
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise CheckpointError(f"{folder}: {key}: {w.get('type')} weights with strategy {w.get('strategy')!r}; "
                                  "lqframe reads integer group or channel quantization")
        bits = int(w["num_bits"])
        out_f, in_f = (int(v) for v in state[f"{name}.weight_shape"].tolist())
        scales = state[f"{name}.weight_scale"]
        group = in_f if w.get("strategy") == "channel" else int(w["group_size"])
        if scales.shape != (out_f, -(-in_f // group)):
            raise CheckpointError(f"{folder}: {name}.weight_scale is {tuple(scales.shape)}, expected "
                                  f"({out_f}, {-(-in_f // group)})")
        codes = unpack_rows(state[key], bits, in_f)
        zp = state.get(f"{name}.weight_zero_point")
        if w.get("symmetric", True) or zp is None:
            zeros = torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int64)
        else:
            zeros = unpack_rows(zp.T.contiguous(), bits, out_f).T
        perm = _column_order(state.get(f"{name}.weight_g_idx"), group, f"{folder}: {name}.weight_g_idx")
        out[name] = _qweight(codes, bits, group, scales, zeros, "compressed-tensors", perm)
    return out


_BNB_STATE = ".weight.quant_state.bitsandbytes__"


def _bitsandbytes(folder: Path, qc: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    if not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        raise CheckpointError(f"{folder}: a bitsandbytes 8-bit (LLM.int8) checkpoint: lqframe reads bitsandbytes' "
                              "4-bit (NF4, FP4) weights")
    out = {}
    for key in sorted(state):
        if _BNB_STATE not in key:
            continue
        name = key[: key.index(_BNB_STATE)]
        try:
            meta = json.loads(bytes(state[key].to(torch.uint8).tolist()).decode("utf-8"))
            rows, cols = (int(v) for v in meta["shape"])
            block = int(meta["blocksize"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder}: {key}: unreadable quant_state ({exc})") from None
        if cols % block:
            raise CheckpointError(f"{folder}: {name}.weight: {cols} input channels are not a multiple of bitsandbytes' "
                                  f"block of {block} (its blocks cross rows; lqframe's blocks are runs of one row)")
        packed = state[f"{name}.weight"].contiguous().view(torch.uint8).reshape(-1)  # any quant_storage dtype
        if packed.numel() * 2 < rows * cols:
            raise CheckpointError(f"{folder}: {name}.weight holds {packed.numel() * 2} codes for a "
                                  f"{rows}×{cols} weight")
        codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: rows * cols].reshape(rows, cols)
        absmax = state[f"{name}.weight.absmax"]
        if "nested_blocksize" in meta:
            offset = torch.tensor([float(meta["nested_offset"])], dtype=torch.float32)
            scale: torch.Tensor | QuantizedWeight = QuantizedWeight.from_codes(
                absmax.to(torch.int64).reshape(-1), 8, int(meta["nested_blocksize"]),
                state[f"{name}.weight.nested_absmax"].to(torch.float32).reshape(-1),
                codebook=state[f"{name}.weight.nested_quant_map"].to(torch.float32).contiguous(), offset=offset,
                format="dynamic8")
        else:
            scale = absmax.to(torch.float32).reshape(-1)
        kind = str(meta.get("quant_type", key.rsplit("__", 1)[-1]))
        out[name] = QuantizedWeight.from_codes(
            codes.to(torch.int64), 4, block, scale,
            codebook=state[f"{name}.weight.quant_map"].to(torch.float32).contiguous(), format=kind,
            meta={"imported": "bitsandbytes", "double_quant": "qlora" if "nested_blocksize" in meta else "none",
                  "dtype": str(meta.get("dtype", ""))})
    return out


_READERS = {"gptq": _gptq, "compressed-tensors": _compressed_tensors, "bitsandbytes": _bitsandbytes}


def read_quantized(path: str | Path) -> tuple[str, dict[str, QuantizedWeight]]:
    """``(format, {layer name: Q})`` of a GPTQ, compressed-tensors or bitsandbytes 4-bit checkpoint
    folder (module doc)."""
    from lqframe.checkpoint import read_state

    folder = Path(path)
    qc = _config(folder)
    method = qc.get("quant_method")
    if method not in IMPORT_FORMATS:
        raise CheckpointError(f"{folder}: quant_method {method!r}: lqframe reads Q from {', '.join(IMPORT_FORMATS)} "
                              "checkpoints")
    state = read_state(folder, check_sizes=False)
    layers = _READERS[method](folder, qc, state)
    if not layers:
        raise CheckpointError(f"{folder}: a {method} checkpoint without quantized layers")
    return method, layers
