"""Correcting other tools' quantized checkpoints of the default model (issue 24's benchmark).

    python benchmarks/interop.py --gptq /work/interop/gptq-static      # every row; rows already measured are kept
    python benchmarks/interop.py --gptq DIR --rows gptq-qera --force    # measure one row again
    python benchmarks/interop.py --table                                # benchmarks/results/interop.md

Every row is one ``lqframe run`` of the default model (SmolLM2-135M-Instruct) with the default
recipe's data: calibration 48 × 512 tokens of pydoc and news, evaluation on 16 held-out 512-token
windows of pydoc, news and wiki (perplexity, float 12.18 on pydoc). The rows:

* ``own``: lqframe's default recipe (GPTQ int4 g64 act-order + QERA-exact r32, 3 alternations) — the
  target the issue sets: the imported int4 checkpoint + QERA-exact r32 within 1 % of it on pydoc;
* ``gptq``, ``gptq-qera``, ``gptq-rilq``: llm-compressor's GPTQ int4 g64 (asymmetric, static act-order)
  checkpoint given by ``--gptq`` (made by ``benchmarks/peers.py --peers gptq-static --save DIR``;
  docs/peers.md) imported with ``quantize_stage.from``: Q alone, + QERA-exact r32, + QERA-exact r32
  then RILQ tuning;
* ``nf4``, ``nf4-qera``, ``nf4-rilq``: the same for QLoRA's base, bitsandbytes NF4 with double-
  quantized scales, made here with transformers' ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_use_double_quant=True)`` on CPU (``--nf4``: kept and reused).

RILQ uses benchmarks/results/rilq.md's reduced schedule (64 pydoc tuning windows + 16 for
validation, 0.5 · model-loss + 0.5 · causal-lm, Adam 1e-4, 60 updates of 4 windows, validation
every 10, patience 3), about 2 % of the paper's.

Rows go to ``--out`` (JSON lines) as they finish and are kept (not measured again) unless
``--force``; ``--table`` renders them with the library versions they were measured with.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TUNE = {"objectives": {"model-loss": 0.5, "causal-lm": 0.5}, "init": "keep", "windows": 64, "validation_windows": 16,
        "lr": 1.0e-4, "batch_size": 1, "grad_accum": 4, "max_updates": 60, "eval_every": 10, "patience": 3}
QERA = {"reconstructor": {"name": "qera-exact", "rank": 32}}
#: row → (label, source of Q: None (quantize) / "gptq" / "nf4", correction, tuned)
ROWS = {
    "own": ("lqframe default recipe (GPTQ int4 g64 + QERA-exact r32 ×3)", None, True, False),
    "gptq": ("llm-compressor GPTQ int4 g64, imported, Q alone", "gptq", False, False),
    "gptq-qera": ("llm-compressor GPTQ int4 g64 + QERA-exact r32", "gptq", True, False),
    "gptq-rilq": ("llm-compressor GPTQ int4 g64 + QERA-exact r32 + RILQ", "gptq", True, True),
    "nf4": ("bitsandbytes NF4 (QLoRA, double quant), imported, Q alone", "nf4", False, False),
    "nf4-qera": ("bitsandbytes NF4 (QLoRA) + QERA-exact r32", "nf4", True, False),
    "nf4-rilq": ("bitsandbytes NF4 (QLoRA) + QERA-exact r32 + RILQ", "nf4", True, True),
}
DOMAINS = ("pydoc", "news", "wiki")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gptq", type=Path, help="llm-compressor GPTQ checkpoint of the default model")
    p.add_argument("--gptq-tool", default="0.14.0.1", help="the llmcompressor version that made --gptq (recorded)")
    p.add_argument("--nf4", type=Path, default=Path("/tmp/lqframe-interop/nf4"),
                   help="where the bitsandbytes NF4 checkpoint is made (kept and reused)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--work", type=Path, default=Path("/tmp/lqframe-interop/runs"), help="run output folders")
    p.add_argument("--out", type=Path, default=RESULTS / "interop.jsonl")
    p.add_argument("--force", action="store_true", help="measure rows already in --out again")
    p.add_argument("--table", action="store_true", help="only write benchmarks/results/interop.md from --out")
    return p


def make_nf4(folder: Path) -> dict:
    """QLoRA's base of the default model: transformers + bitsandbytes 4-bit NF4 with double-quantized
    scales (float32 compute), saved as transformers saves it."""
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lqframe.models import load_model

    info = {"bitsandbytes": md.version("bitsandbytes")}
    if (folder / "config.json").is_file():
        return info
    path = folder.with_name(folder.name + ".float")  # the default model is a GGUF file: a float32 folder first
    if not (path / "config.json").is_file():  # (transformers will not save_pretrained a GGUF-loaded model)
        from safetensors.torch import save_model

        loaded = load_model("default")
        loaded.model.config.architectures = [type(loaded.model).__name__]
        path.mkdir(parents=True, exist_ok=True)
        loaded.model.config.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config.pop("quantization_config", None)  # the GGUF file's: the weights saved are its float32 decoding
        (path / "config.json").write_text(json.dumps(config, indent=2))
        save_model(loaded.model, str(path / "model.safetensors"), metadata={"format": "pt"})
        loaded.tokenizer.save_pretrained(path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
    tmp.rename(folder)
    return info


def recipe_doc(row: str, sources: dict[str, Path]) -> dict:
    import yaml

    from lqframe.recipe import DEFAULT_RECIPE

    doc = yaml.safe_load(DEFAULT_RECIPE)
    _, source, correct, tuned = ROWS[row]
    if source is not None:
        doc["quantize_stage"] = {"from": str(sources[source])}
        doc.pop("reconstruct_stage", None)
        if correct:
            doc["reconstruct_stage"] = dict(QERA)
    if tuned:
        doc["tune_stage"] = dict(TUNE)
    return doc


def measure(row: str, sources: dict[str, Path], work: Path, peers: dict) -> dict:
    from lqframe.recipe import parse_recipe
    from lqframe.run import run

    doc = recipe_doc(row, sources)
    out = work / row
    t0 = time.perf_counter()
    report = run(parse_recipe(doc, f"<interop {row}>"), "default", out, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    table = report["perplexity"]
    return {"row": row, "label": ROWS[row][0], "recipe": doc,
            "ppl": {d: table[d]["compressed"] for d in DOMAINS}, "fp_ppl": {d: table[d]["float"] for d in DOMAINS},
            "avg_bits": report["avg_bits"], "avg_bits_with_lowrank": report["avg_bits_with_lowrank"],
            "stage_seconds": report.get("stage_seconds"), "seconds": seconds,
            "versions": {**report["versions"], "peer": peers.get(ROWS[row][1])}, "machine": platform.processor()
            or platform.machine()}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _versions(v: dict) -> str:
    peer = "".join(f", {k} {val}" for k, val in sorted((v.get("peer") or {}).items()))
    return (f"lqframe {v.get('lqframe')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
            f"python {v.get('python')}, device {v.get('device')}{peer}")


def render(rows: list[dict]) -> str:
    by = {r["row"]: r for r in rows}
    fp = next(iter(rows))["fp_ppl"] if rows else {}
    lines = ["# Correcting other tools' quantized checkpoints (`python benchmarks/interop.py`)", "",
             "Default model (SmolLM2-135M-Instruct); the default recipe's data: calibration 48 × 512 tokens of "
             "pydoc + news, evaluation 16 × 512 held-out windows per domain. Perplexity (× float); bits per "
             "parameter of the compressed matrices, Q alone / with L·R. RILQ: benchmarks/results/rilq.md's reduced "
             "schedule (60 updates of 4 windows). Regenerate: `python benchmarks/interop.py --gptq DIR` (the GPTQ "
             "checkpoint from `benchmarks/peers.py --peers gptq-static --save DIR`, docs/peers.md).", "",
             "float: " + " / ".join(f"{d} {fp.get(d, float('nan')):.2f}" for d in DOMAINS), "",
             "| row | pydoc | news | wiki | bits Q / Q+L·R | s |", "|---|---|---|---|---|---|"]
    for key in ROWS:
        r = by.get(key)
        if r is None:
            continue
        cells = [f"{r['ppl'][d]:.3f} ({r['ppl'][d] / r['fp_ppl'][d]:.3f}×)" for d in DOMAINS]
        lines.append(f"| {r['label']} | {' | '.join(cells)} | {r['avg_bits']:.3f} / {r['avg_bits_with_lowrank']:.3f} "
                     f"| {r['seconds']:.0f} |")
    if "own" in by and "gptq-qera" in by:
        gap = by["gptq-qera"]["ppl"]["pydoc"] / by["own"]["ppl"]["pydoc"] - 1
        lines += ["", f"Imported llm-compressor int4 + QERA-exact r32 vs lqframe's default recipe on pydoc: "
                      f"{100 * gap:+.2f} % (the issue's target: within 1 %)."]
    if any(ROWS[r["row"]][3] for r in rows):
        lines += ["", "The RILQ rows end below the float model on pydoc and news: RILQ's next-token term trains on "
                      "64 pydoc windows (never among the evaluation windows), adapting the model to that text, and "
                      "the \"float\" model is itself the float32 decoding of the default model's Q4_1 GGUF file."]
    lines += ["", "Measured with:"]
    for line in sorted({_versions(r["versions"]) for r in rows}):
        lines.append(f"* {line}")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser().parse_args()
    if args.table:
        (RESULTS / "interop.md").write_text(render(_read(args.out)))
        print((RESULTS / "interop.md").read_text())
        return
    rows = _read(args.out)
    done = {r["row"] for r in rows}
    todo = [r for r in args.rows if args.force or r not in done]
    sources: dict[str, Path] = {}
    peers: dict[str, dict] = {}
    if any(ROWS[r][1] == "gptq" for r in todo):
        if args.gptq is None or not (args.gptq / "config.json").is_file():
            raise SystemExit("--gptq: give llm-compressor's checkpoint folder (benchmarks/peers.py --save DIR)")
        sources["gptq"] = args.gptq
        qc = json.loads((args.gptq / "config.json").read_text())["quantization_config"]
        peers["gptq"] = {"compressed-tensors": qc.get("version"), "llmcompressor": args.gptq_tool}
    if any(ROWS[r][1] == "nf4" for r in todo):
        peers["nf4"] = make_nf4(args.nf4)
        sources["nf4"] = args.nf4
    for row in todo:
        print(f"[interop] {row}: {ROWS[row][0]}", file=sys.stderr, flush=True)
        result = measure(row, sources, args.work, peers)
        rows = [r for r in rows if r["row"] != row] + [result]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(args.out)
        print(f"[interop] {row}: " + ", ".join(f"{d} {result['ppl'][d]:.4f}" for d in DOMAINS)
              + f" ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    (RESULTS / "interop.md").write_text(render(rows))
    print((RESULTS / "interop.md").read_text())


if __name__ == "__main__":
    main()
