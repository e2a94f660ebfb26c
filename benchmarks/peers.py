"""Peer tools from PyPI on lqframe's evaluation protocol, rows in the methods-table format.

Runs PEFT's LoftQ initialisation and llm-compressor's GPTQ on CPU, on the very model, windows and
perplexity function that ``benchmarks/methods_table.py`` uses (SmolLM2-135M-Instruct; pydoc
calibration, 16 × 512; pydoc and news evaluation, 16 × 512 each; ``lqframe.evaluate.perplexity``),
and appends one JSON line per peer row to ``--out`` in methods_table's row schema, so the table
renders with ``methods_table.render``. A row already in ``--out`` is kept (not measured again, unless
``--force``) when every option that moves its figures matches (methods_table's key): ``--model``
(``--tiny``), ``--rank`` and ``--iterations`` (LoftQ), ``--group-size`` (GPTQ; LoftQ's NF4 blocks are
64), ``--calibration``, ``--calibration-sources``, ``--seq-len`` and ``--evaluation``; a row lacking
a requested ``--evaluation-sources`` source is measured again. ``--out``, ``--verbose`` and
``--table`` move no figure. Install the peers with ``pip install -e '.[peers]'`` (see
docs/peers.md); a peer whose package is not importable is skipped with a message.

    python benchmarks/peers.py                      # every peer; rows already in --out are kept
    python benchmarks/peers.py --peers gptq-static --force
    python benchmarks/peers.py --tiny               # random 2-layer Llama, random windows: plumbing check
    python benchmarks/peers.py --table              # only print the table of --out
    python benchmarks/peers.py --peers gptq-static --save DIR   # also save the checkpoint to DIR

Peers (``--peers``):

* ``loftq``: PEFT ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4,
  loftq_iter=5))`` with ``r = lora_alpha = 32`` (scaling 1) on every decoder linear (q/k/v/o/gate/
  up/down). The base weights become PEFT's NF4 quantize-dequantize Q (bitsandbytes, blocks of 64
  with a float32 absmax, no double quantization); the LoRA branch B·A is the low-rank term.
  Data-free: it reads no calibration window.
* ``gptq-static`` / ``gptq-none``: llm-compressor ``GPTQModifier``, int4 asymmetric, groups of 64,
  ``actorder`` static / none, run by ``oneshot`` with the sequential (decoder-layer) pipeline on the
  calibration windows, passed as a tokenized dataset of ``input_ids``. The result is evaluated as
  llm-compressor leaves it: every weight is on its int4 grid (checked), the plain forward.

``--save DIR`` (one GPTQ peer only) also writes the evaluated model as a compressed-tensors checkpoint,
after its perplexity is measured: llm-compressor's own ``model.save_pretrained(DIR,
save_compressed=True)`` (``pack-quantized``: ``config.json`` with its ``quantization_config``,
``recipe.yaml``, safetensors) plus the tokenizer. It is written to ``DIR.tmp`` and renamed to ``DIR``
when complete; a previous checkpoint in ``DIR`` is replaced. The peer is measured even if its row is
cached, and its row is written as with ``--force``. See :func:`save_gptq`.

Both tools are used as published with one exception, patched at run time (nothing in site-packages
is edited): PEFT's ``loftq_init`` hard-codes its compute device to CUDA (or XPU); see
:func:`patch_peft_loftq_for_cpu`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import inspect
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if "--verbose" not in sys.argv[1:]:
    # before tqdm and llm-compressor are imported: both read these once, at import time
    os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # its INFO lines and per-layer METRIC (level 38)

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods_table  # noqa: E402  (render, _row_key, _append, _read: one row format for both tables)

import lqframe  # noqa: E402
from lqframe.evaluate import perplexity  # noqa: E402

#: the decoder linears of a Llama block, as PEFT's ``target_modules`` suffixes
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: bits per entry counted for a low-rank factor (lqframe's default factor_dtype, float16)
FACTOR_BITS = 16

PEERS: dict[str, dict[str, Any]] = {
    "loftq": {"needs": ("peft", "bitsandbytes", "scipy"), "distributions": ("peft", "bitsandbytes")},
    "gptq-static": {"needs": ("llmcompressor", "compressed_tensors", "datasets"),
                    "distributions": ("llmcompressor", "compressed-tensors"), "actorder": "static"},
    "gptq-none": {"needs": ("llmcompressor", "compressed_tensors", "datasets"),
                  "distributions": ("llmcompressor", "compressed-tensors"), "actorder": None},
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    ap.add_argument("--model", default="default")
    ap.add_argument("--rank", type=int, default=32, help="LoftQ LoRA rank (lora_alpha = rank: scaling 1)")
    ap.add_argument("--iterations", type=int, default=5, help="LoftQ alternating iterations (loftq_iter)")
    ap.add_argument("--group-size", type=int, default=64, help="GPTQ group size (PEFT's NF4 blocks are 64)")
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--evaluation", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibration-sources", nargs="+", default=["pydoc"])
    ap.add_argument("--evaluation-sources", nargs="+", default=["pydoc", "news"])
    ap.add_argument("--out", help="JSON-lines results file (default benchmarks/results/peers.jsonl; "
                                  "with --tiny a file in the temporary directory)")
    ap.add_argument("--force", action="store_true", help="measure a peer again even if --out has its row")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of what --out holds")
    ap.add_argument("--tiny", action="store_true",
                    help="a random 2-layer Llama (hidden 64) and random token windows instead of the model "
                         "and its data: checks the plumbing in seconds; rows go to a temporary file")
    ap.add_argument("--verbose", action="store_true", help="keep the peers' own logging and progress bars")
    ap.add_argument("--save", metavar="DIR",
                    help="save the GPTQ peer's model (one of gptq-static / gptq-none in --peers) as a "
                         "compressed-tensors checkpoint in DIR with llm-compressor's save_pretrained, plus the "
                         "tokenizer; measures the peer even if its row is cached")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    save_peer = None
    if args.save and not args.table:
        gptq = [n for n in dict.fromkeys(args.peers) if n != "loftq"]
        if len(gptq) != 1:
            ap.error(f"--save takes exactly one GPTQ peer (gptq-static or gptq-none) in --peers, not {gptq or 'none'}")
        save_peer = gptq[0]
    out = Path(args.out or (Path(tempfile.gettempdir()) / "lqframe-peers-tiny.jsonl" if args.tiny
                            else Path(__file__).resolve().parent / "results" / "peers.jsonl"))
    if args.table:
        print(table(methods_table._read(out)))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {methods_table._row_key(r): r for r in methods_table._read(out)}
    cal_sources = list(args.calibration_sources)

    todo = []
    for name in args.peers:
        row = _row_stub(name, args, cal_sources)
        cached = done.get(methods_table._row_key(row))
        if cached is not None and not args.force and name != save_peer and all(s in cached.get("perplexity", {})
                                                         for s in args.evaluation_sources):
            print(f"{name:12} ppl {cached['ppl']:10.4f} (cached in {out})", flush=True)
            continue
        missing = [m for m in PEERS[name]["needs"] if importlib.util.find_spec(m) is None]
        if missing:
            print(f"{name:12} skipped: {', '.join(missing)} not importable (pip install -e '.[peers]', "
                  f"docs/peers.md)", flush=True)
            continue
        todo.append((name, row, cached))
    if save_peer is not None and save_peer not in [t[0] for t in todo]:
        raise SystemExit(f"--save: {save_peer} was skipped, nothing saved")
    if not todo:
        print(table(methods_table._read(out)))
        return

    model, tokenizer, calibration, evaluation, data_record = _load(args, cal_sources)
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    fps = {s: perplexity(model, w, progress=False) for s, w in evaluation.items()}
    print("float perplexity " + ", ".join(f"{v:.4f} ({s})" for s, v in fps.items())
          + f" ({args.evaluation}×{args.seq_len} evaluation tokens each)", flush=True)

    for name, row, cached in todo:
        work = copy.deepcopy(model)
        if name == "loftq":
            work, seconds, acct, settings = run_loftq(work, model, args.rank, args.iterations)
        else:
            work, seconds, acct, settings = run_gptq(work, model, calibration, tokenizer, PEERS[name]["actorder"],
                                                     args.group_size, args.seq_len)
        ppls = {s: perplexity(work, w, progress=False) for s, w in evaluation.items()}
        first = args.evaluation_sources[0]
        row.update({
            "ppl": ppls[first], "fp_ppl": fps[first], "ratio": ppls[first] / fps[first],
            "perplexity": {s: {"float": fps[s], "compressed": ppls[s], "ratio": ppls[s] / fps[s]} for s in ppls},
            "compress_seconds": seconds,
            "layers": acct["layers"], "params": acct["params"],
            "avg_bits": acct["q_bits"] / acct["params"],
            "avg_bits_with_lowrank": (acct["q_bits"] + acct["lr_bits"]) / acct["params"],
            "bits_accounting": acct["how"],
            "peer_settings": settings,
            "versions": _versions(PEERS[name]["distributions"]),
        })
        if data_record is not None:
            row["data"] = data_record
        methods_table._append(out, row, replace=cached)
        print(f"{name:12} " + "  ".join(f"{s} {v['compressed']:.4f} ×{v['ratio']:.3f}"
                                         for s, v in row["perplexity"].items())
              + f"  bits {row['avg_bits']:.4f}/{row['avg_bits_with_lowrank']:.4f}  {seconds:7.1f} s", flush=True)
        if name == save_peer:  # after the evaluation: saving compresses the model in place
            print(f"{name:12} saved to {save_gptq(work, tokenizer, Path(args.save))}", flush=True)
        del work
    print()
    print(table(methods_table._read(out)))


# ----------------------------------------------------------------------------------------------------
# the protocol: model, windows, row skeleton


def _load(args, cal_sources):
    """(float model, tokenizer, calibration windows, {source: evaluation windows}, data record)."""
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                             tie_word_embeddings=True)
        model = LlamaForCausalLM(config).float().eval()
        gen = torch.Generator().manual_seed(0)
        calibration = torch.randint(0, 256, (args.calibration, args.seq_len), generator=gen)
        evaluation = {s: torch.randint(0, 256, (args.evaluation, args.seq_len), generator=gen)
                      for s in args.evaluation_sources}
        return model, None, calibration, evaluation, None
    from lqframe.data import make_data
    from lqframe.models import load_model

    loaded = load_model(args.model)
    data = make_data(loaded.tokenizer, cal_sources, args.evaluation_sources, args.seq_len, args.calibration,
                     args.evaluation, 0)
    model = loaded.model.to("cpu").eval()
    return model, loaded.tokenizer, data.calibration, dict(data.evaluation), data.record()


def _row_stub(name: str, args, cal_sources: list[str]) -> dict[str, Any]:
    """Every field of a row's cache key (methods_table.ROW_KEY: the options that move its figures)."""
    common = {"model": "tiny-random-llama" if args.tiny else args.model, "sequential": "block",
              "calibration_windows": args.calibration, "calibration_sources": cal_sources,
              "group_size": args.group_size if name != "loftq" else 64, "seq_len": args.seq_len,
              "evaluation_windows": args.evaluation}
    if name == "loftq":
        return {"quantizer": "peft nf4", "bits": 4, "reconstructor": "peft loftq", "rank": args.rank,
                "quantizer_options": {}, "reconstructor_options": {"iterations": args.iterations}, **common}
    return {"quantizer": "llm-compressor gptq", "bits": 4, "reconstructor": "none", "rank": 0,
            "quantizer_options": {"actorder": PEERS[name]["actorder"] or "none"}, "reconstructor_options": {},
            **common}


def _versions(distributions) -> dict[str, Any]:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"peer": {d: version(d) for d in distributions}, "lqframe": lqframe.__version__,
            "torch": torch.__version__, "transformers": version("transformers"),
            "python": platform.python_version(), "device": "cpu"}


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """name → module of every decoder linear (what both peers compress; lm_head and embeddings excluded)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DECODER_LINEARS}


def table(rows: list[dict]) -> str:
    """methods_table's markdown table, plus the peer versions each row was measured with."""
    if not rows:
        return "(no rows)"
    peers = sorted({", ".join(f"{k} {v}" for k, v in r["versions"]["peer"].items())
                    for r in rows if r.get("versions", {}).get("peer")})
    return methods_table.render(rows) + "".join(f"\nPeer versions: {p}." for p in peers)


# ----------------------------------------------------------------------------------------------------
# PEFT LoftQ


_LOFTQ_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


def patch_peft_loftq_for_cpu() -> str:
    """Make PEFT's ``loftq_init`` compute on the CPU; returns what was patched.

    ``peft.utils.loftq_utils.loftq_init`` sets ``compute_device = "xpu" if is_xpu_available() else
    "cuda"`` and moves the weight and the bitsandbytes ``Params4bit`` there, so it fails on a
    machine without CUDA. bitsandbytes (0.50 tested) quantizes and dequantizes NF4 on the CPU, so the
    only change needed is that one line. The patch takes the installed function's own source
    (``inspect.getsource``), replaces exactly that line by ``compute_device = "cpu"`` (it must occur
    exactly once, else this raises), compiles it in the module's namespace, and rebinds the result as
    ``peft.utils.loftq_utils.loftq_init`` and ``peft.tuners.lora.layer.loftq_init`` (the name the LoRA
    layer calls, bound by ``from peft.utils.loftq_utils import loftq_init``). Nothing else changes;
    site-packages is not edited.
    """
    import peft.tuners.lora.layer as lora_layer
    from peft.utils import loftq_utils

    current = lora_layer.loftq_init
    if getattr(current, "_lqframe_cpu_patch", False):
        return current._lqframe_cpu_patch_note
    source = inspect.getsource(loftq_utils.loftq_init)
    if source.count(_LOFTQ_DEVICE_LINE) != 1:
        raise RuntimeError(f"this PEFT's loftq_init does not contain the line {_LOFTQ_DEVICE_LINE!r} exactly once; "
                           "the CPU patch in benchmarks/peers.py must be revisited for this version")
    namespace: dict[str, Any] = {}
    exec(compile(source.replace(_LOFTQ_DEVICE_LINE, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"),
         dict(vars(loftq_utils)), namespace)
    patched = namespace["loftq_init"]
    note = (f"peft.utils.loftq_utils.loftq_init: line {_LOFTQ_DEVICE_LINE!r} replaced by "
            "'compute_device = \"cpu\"' (rebound in peft.utils.loftq_utils and peft.tuners.lora.layer)")
    patched._lqframe_cpu_patch = True
    patched._lqframe_cpu_patch_note = note
    loftq_utils.loftq_init = patched
    lora_layer.loftq_init = patched
    return note


def _bnb_nf4_format() -> dict[str, Any]:
    """Block size and absmax dtype of the NF4 format PEFT's loftq_init produces, read from
    bitsandbytes itself: ``Params4bit(..., compress_statistics=False, quant_type="nf4")`` is the call
    in loftq_init; its defaults decide the block size."""
    import bitsandbytes as bnb

    probe = bnb.nn.Params4bit(torch.zeros(128, 128) + 0.5, requires_grad=False, compress_statistics=False,
                              quant_type="nf4").to("cpu")
    state = probe.quant_state
    if state.state2 is not None:
        raise RuntimeError("bitsandbytes double-quantized the absmax although compress_statistics=False")
    code = bnb.functional.get_4bit_type("nf4", device="cpu").float()
    return {"blocksize": int(state.blocksize), "absmax_dtype": state.absmax.dtype,
            "absmax_bits": torch.finfo(state.absmax.dtype).bits, "code": code}


def _check_nf4(q: torch.Tensor, fmt: dict[str, Any], name: str) -> None:
    """Raise unless every block of ``fmt['blocksize']`` consecutive entries of ``q`` (row-major, as
    bitsandbytes blocks the flattened tensor) is absmax × NF4 codes: ``q / max|block|`` lies on the
    NF4 code table. This is what PEFT's quantize-dequantize Q looks like and a float weight does not."""
    blocks = q.detach().float().reshape(-1, fmt["blocksize"])
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    gap = (normed.unsqueeze(-1) - fmt["code"]).abs().amin(dim=-1)
    if float(gap.max()) > 1e-5:
        raise RuntimeError(f"{name}: the base weight is not an NF4 block-{fmt['blocksize']} dequantized weight "
                           f"(largest distance to the code table {float(gap.max()):.3g}); PEFT did not replace "
                           "the base weight by its quantized Q")


def run_loftq(work: nn.Module, reference: nn.Module, rank: int, iterations: int):
    """PEFT LoftQ on ``work`` (changed in place); returns (peft model, seconds, bit accounting, settings)."""
    import peft
    from peft import LoftQConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    note = patch_peft_loftq_for_cpu()
    fmt = _bnb_nf4_format()
    floats = {n: m.weight.detach().clone() for n, m in _decoder_linears(reference).items()}
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=list(DECODER_LINEARS),
                        init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iterations))
    t0 = time.perf_counter()
    pm = get_peft_model(work, config)
    seconds = time.perf_counter() - t0
    pm.eval()

    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLinear)}
    if set(layers) != set(floats):
        raise RuntimeError(f"PEFT wrapped {len(layers)} linears, expected the {len(floats)} decoder linears")
    params = q_bits = lr_bits = 0
    for name, layer in layers.items():
        scaling = layer.scaling["default"]
        if scaling != 1.0:
            raise RuntimeError(f"{name}: LoRA scaling {scaling}, expected 1 (lora_alpha = r)")
        q = layer.get_base_layer().weight
        if torch.equal(q, floats[name]):
            raise RuntimeError(f"{name}: the base weight is still the float weight; this PEFT version does not "
                               "replace it by the LoftQ Q, which the comparison needs")
        _check_nf4(q, fmt, name)
        with torch.no_grad():  # the factors are counted as float16: evaluate them as stored in float16
            for lin in (layer.lora_A["default"], layer.lora_B["default"]):
                lin.weight.copy_(lin.weight.to(torch.float16).to(lin.weight.dtype))
        n, m = q.shape
        params += n * m
        q_bits += n * m * 4 + (n * m // fmt["blocksize"]) * fmt["absmax_bits"]
        lr_bits += FACTOR_BITS * rank * (n + m)
    acct = {"layers": len(layers), "params": params, "q_bits": q_bits, "lr_bits": lr_bits,
            "how": (f"Q: 4-bit NF4 codes + one {fmt['absmax_dtype']} absmax per {fmt['blocksize']} entries (what "
                    f"bitsandbytes stores without double quantization) = {4 + fmt['absmax_bits'] / fmt['blocksize']} "
                    f"bits; L·R: rank {rank} factors counted at {FACTOR_BITS} bits per entry (PEFT computes them in "
                    "float32; they were rounded to float16 before evaluation)")}
    settings = {"lora": {"r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
                         "target_modules": list(DECODER_LINEARS), "init_lora_weights": "loftq"},
                "loftq_config": {"loftq_bits": 4, "loftq_iter": iterations},
                "nf4": {"blocksize": fmt["blocksize"], "absmax_dtype": str(fmt["absmax_dtype"]),
                        "double_quant": False},
                "lora_factors_evaluated": "float16-rounded", "calibration_used": False,
                "patch": note, "peft": peft.__version__}
    return pm, seconds, acct, settings


# ----------------------------------------------------------------------------------------------------
# llm-compressor GPTQ


def run_gptq(work: nn.Module, reference: nn.Module, calibration: torch.Tensor, tokenizer, actorder: str | None,
             group_size: int, seq_len: int):
    """llm-compressor GPTQ on ``work`` (changed in place); returns (model, seconds, bit accounting, settings)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    floats = {n: m.weight.detach().clone() for n, m in _decoder_linears(reference).items()}
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size,
               # scales rounded to float16 as computed, as a half-precision checkpoint stores them (the
               # model here is float32, whose scales llm-compressor would otherwise keep in float32)
               "scale_dtype": "float16"}
    modifier = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                            ignore=["lm_head"], actorder=actorder)
    dataset = Dataset.from_dict({"input_ids": calibration.tolist()})
    # lqframe's default model is read from a GGUF file: transformers dequantizes it to float32 on load
    # but keeps the provenance tag (config.quantization_config = GgufConfig, model.hf_quantizer), and
    # oneshot refuses such a model as "already quantized (gguf)". The weights are plain float32
    # tensors, so the tag is dropped on this copy.
    if getattr(work.config, "quantization_config", None) is not None:
        del work.config.quantization_config
    if getattr(work, "hf_quantizer", None) is not None:
        work.hf_quantizer = None
    with tempfile.TemporaryDirectory() as folder:
        # oneshot re-reads the model's config from config.name_or_path (validate_model): lqframe's model
        # comes from a GGUF file (no config.json), so point it at a folder holding the config.
        work.config.save_pretrained(folder)
        work.config.name_or_path = folder
        t0 = time.perf_counter()
        result = oneshot(model=work, dataset=dataset, recipe=modifier,
                         # only checked for presence: the dataset is tokenized already
                         processor=tokenizer if tokenizer is not None else _NoProcessor(),
                         num_calibration_samples=len(calibration), max_seq_length=seq_len,
                         shuffle_calibration_samples=False, batch_size=1, pipeline="sequential")
        seconds = time.perf_counter() - t0
    result.eval()

    layers = {n: m for n, m in _decoder_linears(result).items()}
    quantized = {n for n, m in result.named_modules() if hasattr(m, "weight_scale")}
    if quantized != set(floats) or set(layers) != set(floats):
        raise RuntimeError(f"llm-compressor quantized {sorted(quantized - set(floats)) or len(quantized)} modules, "
                           f"expected the {len(floats)} decoder linears")
    params = q_bits = 0
    scale_bits = 16
    g_idx = False
    for name, layer in layers.items():
        w, scale, zero = layer.weight.detach(), layer.weight_scale.detach(), layer.weight_zero_point.detach()
        args = layer.quantization_scheme.weights
        if torch.equal(w, floats[name]):
            raise RuntimeError(f"{name}: weight unchanged by GPTQ")
        if not torch.equal(fake_quantize(w, scale, zero, args), w):
            raise RuntimeError(f"{name}: the weight is not on its int4 grid after oneshot")
        if not torch.equal(scale.to(torch.float16).to(scale.dtype), scale):
            scale_bits = max(scale_bits, torch.finfo(scale.dtype).bits)
        n, m = w.shape
        groups = scale.numel()
        stored_g_idx = getattr(layer, "weight_g_idx", None) is not None
        g_idx |= stored_g_idx
        extra = 32 * m if stored_g_idx else 0  # an int32 group index per input column, if stored
        params += n * m
        q_bits += n * m * 4 + groups * (4 + 16) + extra
    if scale_bits != 16:
        q_bits += sum(m.weight_scale.numel() for m in layers.values()) * (scale_bits - 16)
    acct = {"layers": len(layers), "params": params, "q_bits": q_bits, "lr_bits": 0,
            "how": (f"compressed-tensors pack-quantized: 4-bit codes + per {group_size} entries one "
                    f"{scale_bits}-bit scale and one 4-bit packed zero point; "
                    f"{'an int32 g_idx per input column' if g_idx else 'no g_idx'} "
                    f"(actorder {actorder or 'none'})")}
    modifier_fields = {k: getattr(modifier, k) for k in ("block_size", "dampening_frac")}
    settings = {"scheme": {**weights, "observer": str(args.observer)}, "actorder": actorder or "none",
                "targets": "Linear", "ignore": ["lm_head"], **modifier_fields, "pipeline": "sequential",
                "num_calibration_samples": len(calibration), "max_seq_length": seq_len, "batch_size": 1,
                "evaluated": "weights as left by oneshot (on the int4 grid), plain forward"}
    return result, seconds, acct, settings


def save_gptq(model: nn.Module, tokenizer, folder: Path) -> Path:
    """Save ``model`` as oneshot left it with llm-compressor's own saving; returns the folder.

    ``oneshot`` wraps ``model.save_pretrained`` (``modify_save_pretrained``, applied here too in case it
    did not); ``save_pretrained(DIR, save_compressed=True)`` compresses the model in place (int4
    ``pack-quantized``: ``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``),
    writes the safetensors, rewrites ``config.json`` from the config at ``config.name_or_path``, adds
    its ``quantization_config`` and writes ``recipe.yaml``. The model is not usable for a float forward
    afterwards. It also looks at ``config.name_or_path`` for a recipe and for ``.py`` files and would go
    to the Hub if that were no folder, so ``name_or_path`` points at a temporary folder holding the
    config (lqframe's model comes from a GGUF file). ``config.architectures`` is set to the model class
    when missing (a GGUF-loaded config has none), as transformers' ``save_pretrained`` would. The
    tokenizer, if any, is saved beside it.

    Everything is written to ``DIR.tmp`` and renamed to ``DIR`` at the end. An existing ``DIR`` is
    replaced when it is empty or holds a ``config.json`` (a previous checkpoint); anything else is refused.
    """
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    folder = Path(folder).expanduser().resolve()
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / "config.json").is_file())):
        raise SystemExit(f"--save: {folder} exists and is not a checkpoint folder; not replacing it")
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    modify_save_pretrained(model)  # a no-op when oneshot has wrapped save_pretrained already
    if not getattr(model.config, "architectures", None):
        # what transformers' save_pretrained writes; a GGUF-loaded config has none, and llm-compressor
        # rewrites config.json from the config file at name_or_path
        model.config.architectures = [type(model).__name__]
    with tempfile.TemporaryDirectory() as config_folder:
        model.config.save_pretrained(config_folder)
        model.config.name_or_path = config_folder
        model.save_pretrained(str(tmp), save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


class _NoProcessor:
    """Stands in for a tokenizer when there is none (``--tiny``): oneshot insists on a processor
    object, but a tokenized dataset never calls it."""


if __name__ == "__main__":
    main()
