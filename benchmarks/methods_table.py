"""Perplexity of quantizer × reconstructor combinations on the default model, one table.

Loads the model once; every combination compresses a fresh copy with the same calibration and
evaluation windows (the run protocol: pydoc, 16 × 512 calibration, 16 × 512 evaluation) and is
appended to a JSON-lines file as soon as it finishes, so an interrupted table resumes.

    python benchmarks/methods_table.py --bits 4 3 2 --quantizers rtn gptq \
        --reconstructors none svd lqer qera-approx qera-exact loftq --rank 32

Variants: ``--quantizer-options act_order=true static_groups=true`` (YAML values) and
``--reconstructor-options factor_dtype=int8``; rows record their options and are cached per
combination *and* options.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import yaml

import lqframe
from lqframe.data import make_windows
from lqframe.engine import RunState, execute, versions
from lqframe.evaluate import perplexity
from lqframe.executor import resolve_device
from lqframe.models import load_model
from lqframe.pipeline import summarize
from lqframe.recipe import parse_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--quantizers", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--reconstructors", nargs="+",
                    default=["none", "svd", "lqer", "qera-approx", "qera-exact", "loftq"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--evaluation", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--quantizer-options", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reconstructor-options", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sequential", choices=["block", "layer"], default="block",
                    help="quantize_stage.sequential: calibrate each block at once, or each input group in turn")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--out", default="benchmarks/results/methods.jsonl")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of what --out holds")
    args = ap.parse_args()
    if args.table:
        print(render([json.loads(x) for x in Path(args.out).read_text().splitlines() if x.strip()]))
        return
    qopts = _options(args.quantizer_options)
    ropts = _options(args.reconstructor_options)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[_key(row["quantizer"], row["bits"], row["reconstructor"], row["rank"],
                          row.get("quantizer_options", {}), row.get("reconstructor_options", {}),
                          row.get("sequential", "block"), row.get("calibration_windows", 16))] = row

    loaded = load_model(args.model)
    base = loaded.model
    windows = make_windows(loaded.tokenizer, "pydoc", args.seq_len, args.calibration, args.evaluation, 0)
    device = resolve_device(args.device)
    fp = perplexity(base.to(device), windows.evaluation, progress=False)
    print(f"float perplexity {fp:.4f} ({args.evaluation}×{args.seq_len} evaluation tokens)", flush=True)
    registered = set(lqframe.registry().names("quantizer")) | set(lqframe.registry().names("reconstructor"))
    for bits in args.bits:
        for qname in args.quantizers:
            for rname in args.reconstructors:
                rank = args.rank if rname != "none" else 0
                r_opts = ropts if rname != "none" else {}
                key = _key(qname, bits, rname, rank, qopts, r_opts, args.sequential, args.calibration)
                label = f"{qname:5} {bits}b {rname:12}{_label(qopts, r_opts, args.sequential, args.calibration)}"
                if key in done:
                    print(f"{label} ppl {done[key]['ppl']:10.4f} (cached)", flush=True)
                    continue
                if qname not in registered or rname not in registered:
                    print(f"{label} skipped: not installed", flush=True)
                    continue
                doc = {
                    "data": {"source": "pydoc", "seq_len": args.seq_len,
                             "calibration_windows": args.calibration, "evaluation_windows": args.evaluation},
                    "quantize_stage": {"quantizer": {"name": qname, "bits": bits, "group_size": args.group_size,
                                                     **qopts},
                                       "sequential": args.sequential},
                    "evaluate_stage": {"float_baseline": False},
                }
                if rname != "none":
                    doc["reconstruct_stage"] = {"reconstructor": {"name": rname, "rank": args.rank, **r_opts}}
                recipe = parse_recipe(doc, f"{qname}-{bits}-{rname}")
                state = RunState(recipe, copy.deepcopy(base), device=device, calibration=windows.calibration,
                                 evaluation=windows.evaluation, progress=False, log=lambda s: None)
                t0 = time.perf_counter()
                execute(state, only=("calibrate", "allocate", "decompose"))
                seconds = time.perf_counter() - t0
                execute(state, only=("evaluate",))
                ppl, results = state.ppl, state.results
                row = {"quantizer": qname, "bits": bits, "reconstructor": rname, "rank": rank,
                       "quantizer_options": qopts, "reconstructor_options": r_opts, "sequential": args.sequential,
                       "calibration_windows": args.calibration, "group_size": args.group_size,
                       "ppl": ppl, "fp_ppl": fp, "ratio": ppl / fp,
                       "compress_seconds": seconds, **summarize(results), "versions": versions(state)}
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{label} ppl {ppl:10.4f}  ×{ppl / fp:6.3f}  bits {row['avg_bits']:.3f}"
                      f"/{row['avg_bits_with_lowrank']:.3f}  {seconds:6.1f} s", flush=True)
                del state


def render(rows: list[dict]) -> str:
    """Markdown: one line per quantizer × reconstructor (× options), one column per bit width."""
    fp = rows[0]["fp_ppl"] if rows else float("nan")
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    lines: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        label = (r["quantizer"], r["reconstructor"], _label(r.get("quantizer_options", {}),
                                                              r.get("reconstructor_options", {}),
                                                              r.get("sequential", "block"),
                                                              r.get("calibration_windows", 16)).strip())
        lines.setdefault(label, {})[r["bits"]] = r
    order = ["none", "svd", "lqer", "qera-approx", "qera-exact", "loftq"]
    lines = dict(sorted(lines.items(), key=lambda kv: (kv[0][0] != "rtn", kv[0][0],
                                                      order.index(kv[0][1]) if kv[0][1] in order else 99,
                                                      kv[0][2])))
    out = [f"float perplexity {fp:.2f}; cells: perplexity (× float, bits per parameter with L·R, compress time)",
           "", "| quantizer | reconstructor | variant | " + " | ".join(f"{b}-bit" for b in bits) + " |",
           "|---|---|---|" + "---|" * len(bits)]
    for (q, rec, variant), by_bits in lines.items():
        cells = []
        for b in bits:
            r = by_bits.get(b)
            cells.append("–" if r is None else
                         f"{r['ppl']:.2f} (×{r['ratio']:.3f}, {r['avg_bits_with_lowrank']:.2f} b, "
                         f"{r['compress_seconds']:.0f} s){'' if r.get('versions') else ' †'}")
        out.append(f"| {q} | {rec} | {variant or '–'} | " + " | ".join(cells) + " |")
    measured = {_versions_line(r["versions"]) for r in rows if r.get("versions")}
    out.append("")
    out += [f"Measured with {line}." for line in sorted(measured)]
    if any(not r.get("versions") for r in rows):
        out.append("† measured before report rows recorded their versions (an earlier engine; same protocol).")
    return "\n".join(out)


def _versions_line(v: dict) -> str:
    return (f"lqframe {v.get('lqframe')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
            f"python {v.get('python')}, device {v.get('device')}")


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"option {pair!r} is not KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def _key(qname, bits, rname, rank, qopts, ropts, sequential="block", calibration=16):
    return (qname, bits, rname, rank, json.dumps(qopts, sort_keys=True), json.dumps(ropts, sort_keys=True),
            sequential, calibration)


def _label(qopts: dict, ropts: dict, sequential: str = "block", calibration: int = 16) -> str:
    opts = [f"{k}={v}" for k, v in {**qopts, **ropts}.items()]
    if sequential != "block":
        opts.append(f"sequential={sequential}")
    if calibration != 16:
        opts.append(f"calibration={calibration}×512")
    return f" [{' '.join(opts)}]" if opts else ""


if __name__ == "__main__":
    main()
