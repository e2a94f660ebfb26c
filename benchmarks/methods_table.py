"""Perplexity of quantizer × reconstructor combinations on the default model, one table.

Loads the model once; every combination compresses a fresh copy with the same calibration and
evaluation windows (the run protocol: pydoc, 16 × 512 calibration, 16 × 512 evaluation) and is
appended to a JSON-lines file as soon as it finishes, so an interrupted table resumes.

    python benchmarks/methods_table.py --bits 4 3 2 --quantizers rtn gptq \
        --reconstructors none svd lqer qera-approx qera-exact loftq --rank 32

Variants: ``--quantizer-options act_order=true static_groups=true`` (YAML values) and
``--reconstructor-options factor_dtype=int8``; several quantizer variants in one invocation with
``--quantizer-variants "" "act_order=true static_groups=true" "symmetric=true"`` (one string each,
"" for none).

Every row is scored on each ``--evaluation-sources`` (default ``pydoc news``: Python documentation
and English news prose, 16 × 512 windows each); ``--calibration-sources pydoc news`` calibrates on a
mix (windows split evenly). A cached row that lacks a requested evaluation source is measured again
and replaced.

A row is cached (not measured again) under every option that moves its figures, and records them
all (:data:`ROW_KEY`): ``--model``, the quantizer, bits, ``--group-size`` and
``--quantizer-options``, the reconstructor, ``--rank`` and ``--reconstructor-options``,
``--sequential``, ``--calibration`` and ``--calibration-sources``, ``--seq-len`` and
``--evaluation`` (the evaluation windows per source; the calibration windows are held out from
them). A run with any of them changed measures its own rows, and the table labels a value other
than the default. Not in the key: ``--evaluation-sources`` (each source is scored on its own
windows; a missing one is measured, as said above), ``--device`` (moves the figures only by float
rounding; the row's ``versions`` name the device), ``--out`` and ``--include``, nor lqframe's own
defaults (the row's ``resolved`` options and ``versions`` record them). Rows written before
the model, group size, sequence length and evaluation windows were recorded were measured with the
defaults, read as such (:func:`key_options`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import yaml

import lqframe
from lqframe.data import make_data
from lqframe.engine import COMPRESSION_STAGES, RunState, execute, perplexity_table, versions
from lqframe.evaluate import perplexity
from lqframe.executor import resolve_device
from lqframe.models import load_model
from lqframe.pipeline import summarize
from lqframe.recipe import parse_recipe


def parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--quantizer-variants", nargs="+", metavar="'KEY=VALUE ...'",
                    help="several quantizer option sets, one quoted string each ('' = defaults)")
    ap.add_argument("--calibration-sources", nargs="+", default=["pydoc"], metavar="SOURCE[:WINDOWS]",
                    help="calibration sources mixed; --calibration windows split evenly among those without a count")
    ap.add_argument("--evaluation-sources", nargs="+", default=["pydoc", "news"])
    ap.add_argument("--reconstructor-options", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sequential", choices=["block", "layer"], default="block",
                    help="quantize_stage.sequential: calibrate each block at once, or each input group in turn")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--out", default="benchmarks/results/methods.jsonl")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of what --out holds")
    ap.add_argument("--include", nargs="*", default=[], metavar="JSONL",
                    help="with --table: also render the rows of these files (e.g. benchmarks/results/peers.jsonl)")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.table:
        print(render([row for path in [args.out, *args.include] for row in _read(Path(path))]))
        return
    variants = ([_options(v.split()) for v in args.quantizer_variants] if args.quantizer_variants
                else [_options(args.quantizer_options)])
    ropts = _options(args.reconstructor_options)
    cal_sources = list(args.calibration_sources)  # SOURCE or SOURCE:WINDOWS (make_data's explicit count)
    cal_pairs = [(s.rpartition(":")[0], int(s.rpartition(":")[2])) if s.rpartition(":")[2].isdigit() else (s, None)
                 for s in cal_sources]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_row_key(row): row for row in _read(out)}

    loaded = load_model(args.model)
    base = loaded.model
    data = make_data(loaded.tokenizer, cal_pairs, args.evaluation_sources, args.seq_len, args.calibration,
                     args.evaluation, 0)
    device = resolve_device(args.device)
    base.to(device)
    fps = {s: perplexity(base, w, progress=False) for s, w in data.evaluation.items()}
    fp = fps[args.evaluation_sources[0]]
    print("float perplexity " + ", ".join(f"{v:.4f} ({s})" for s, v in fps.items())
          + f" ({args.evaluation}×{args.seq_len} evaluation tokens each)", flush=True)
    registered = set(lqframe.registry().names("quantizer")) | set(lqframe.registry().names("reconstructor"))
    for bits, qname, qopts, rname in itertools.product(args.bits, args.quantizers, variants, args.reconstructors):
        options = run_options(args, qname, bits, qopts, rname, ropts)
        r_opts = options["reconstructor_options"]
        label = f"{qname:5} {bits}b {rname:12}{_label(options)}"
        cached = done.get(_row_key(options))
        if cached is not None and all(s in cached.get("perplexity", {}) for s in args.evaluation_sources):
            print(f"{label} ppl {cached['ppl']:10.4f} (cached)", flush=True)
            continue
        if qname not in registered or rname not in registered:
            print(f"{label} skipped: not installed", flush=True)
            continue
        doc = {
            "data": {"source": args.evaluation_sources[0], "seq_len": args.seq_len,
                     "calibration": [s if n is None else {"source": s, "windows": n} for s, n in cal_pairs],
                     "calibration_windows": args.calibration, "evaluation_windows": args.evaluation},
            "quantize_stage": {"quantizer": {"name": qname, "bits": bits, "group_size": args.group_size,
                                             **qopts},
                               "sequential": args.sequential},
            "evaluate_stage": {"float_baseline": False, "data": args.evaluation_sources},
        }
        if rname != "none":
            doc["reconstruct_stage"] = {"reconstructor": {"name": rname, "rank": args.rank, **r_opts}}
        recipe = parse_recipe(doc, f"{qname}-{bits}-{rname}")
        state, seconds = compress_and_score(recipe, base, device, data, fps)
        ppl, results = state.ppl, state.results
        row = {**options,
               "ppl": ppl, "fp_ppl": fp, "ratio": ppl / fp, "perplexity": perplexity_table(state),
               "data": data.record(),
               "compress_seconds": seconds, **summarize(results),
               "mean_rel_output_error": _mean([r.rel_output_error for r in results]),
               "resolved": _resolved(state),
               "versions": versions(state)}
        _append(out, row, replace=cached)
        print(f"{label} " + "  ".join(f"{s} {v['compressed']:.4f} ×{v['ratio']:.3f}"
                                      for s, v in row["perplexity"].items())
              + f"  bits {row['avg_bits']:.3f}/{row['avg_bits_with_lowrank']:.3f}  {seconds:6.1f} s",
              flush=True)
        del state


def run_options(args, qname: str, bits: int, qopts: dict, rname: str, ropts: dict) -> dict:
    """The :data:`ROW_KEY` fields of one combination of a run with options ``args`` (rank 0 and no
    reconstructor options without a reconstructor): its cache key, and the first fields of its row."""
    none = rname == "none"
    return {"model": args.model, "quantizer": qname, "bits": bits, "group_size": args.group_size,
            "quantizer_options": qopts, "reconstructor": rname, "rank": 0 if none else args.rank,
            "reconstructor_options": {} if none else ropts, "sequential": args.sequential,
            "calibration_windows": args.calibration, "calibration_sources": list(args.calibration_sources),
            "seq_len": args.seq_len, "evaluation_windows": args.evaluation}


def compress_and_score(recipe, base, device, data, fps: dict, tuning=None, log=lambda s: None
                       ) -> tuple[RunState, float]:
    """Compress a fresh copy of ``base`` with ``recipe`` on the shared windows and score it on
    every evaluation source (the float figures ``fps`` are given, not measured again); returns
    the run state and the compression seconds (every stage that changes the model: teacher,
    calibrate, allocate, decompose, tune). ``tuning``: the tune stage's windows."""
    state = RunState(recipe, copy.deepcopy(base), device=device, calibration=data.calibration,
                     evaluation=data.evaluation, progress=False, log=log, tuning=tuning)
    state.fp_ppls = dict(fps)
    t0 = time.perf_counter()
    execute(state, only=COMPRESSION_STAGES)
    seconds = time.perf_counter() - t0
    execute(state, only=("evaluate",))
    return state, seconds


def _resolved(state: RunState) -> dict:
    """Every option of the first layer's quantizer and reconstructor, defaults included (a row stays
    readable when a default changes)."""
    import attrs

    from lqframe.pipeline import components

    plan = state.plans[0]
    q, r = components(plan.quantizer, plan.reconstructor)
    return {"quantizer": {"name": plan.quantizer.name, **attrs.asdict(q)},
            "reconstructor": {"name": plan.reconstructor.name, **attrs.asdict(r)}}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


#: the fields of a row that name every option moving its figures: its cache key (:func:`_row_key`)
ROW_KEY = ("model", "quantizer", "bits", "group_size", "quantizer_options", "reconstructor", "rank",
           "reconstructor_options", "sequential", "calibration_windows", "calibration_sources", "seq_len",
           "evaluation_windows")
#: what a row that lacks one of these fields was measured with: the scripts' defaults, unchanged since
#: the first rows (earlier rows did not record model, seq_len, evaluation_windows, some not the rest)
ROW_DEFAULTS = {"model": "default", "group_size": 64, "quantizer_options": {}, "reconstructor_options": {},
                "sequential": "block", "calibration_windows": 16, "calibration_sources": ["pydoc"], "seq_len": 512,
                "evaluation_windows": 16}


def key_options(row: dict) -> dict:
    """The :data:`ROW_KEY` fields of ``row`` (a results row or the options of a run), a missing one
    read as the default it was measured with (:data:`ROW_DEFAULTS`); quantizer, bits, reconstructor
    and rank every row has."""
    return {k: row[k] if k in row or k not in ROW_DEFAULTS else copy.deepcopy(ROW_DEFAULTS[k]) for k in ROW_KEY}


def _row_key(row: dict) -> str:
    """The cache key of a row: two rows share it exactly when every option that moves the figures is equal."""
    options = key_options(row)
    return json.dumps([options[k] for k in ROW_KEY], sort_keys=True)


def recipe_key(row: dict) -> str:
    """The cache key of a row that records the recipe it ran (allocation.py, rilq.py): its model and
    that recipe, which holds every other option that moves its figures; a row without a model was
    measured on the default one (:data:`ROW_DEFAULTS`)."""
    return json.dumps({"model": row.get("model", ROW_DEFAULTS["model"]), "recipe": row["recipe"]}, sort_keys=True)


def _append(path: Path, row: dict, replace: dict | None = None) -> None:
    """Add a row (replacing ``replace``, an older measurement of the same combination), atomically."""
    if replace is None:
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        return
    rows = [row if _row_key(r) == _row_key(replace) else r for r in _read(path)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _cell(r: dict, sources: list[str]) -> str:
    table = r.get("perplexity") or {"pydoc": {"compressed": r["ppl"], "ratio": r["ratio"]}}
    ppl = " / ".join(f"{table[s]['compressed']:.2f}" if s in table else "–" for s in sources)
    ratio = " / ".join(f"×{table[s]['ratio']:.3f}" if s in table else "–" for s in sources)
    return (f"{ppl} ({ratio}, {r['avg_bits_with_lowrank']:.2f} b, {r['compress_seconds']:.0f} s)"
            f"{'' if r.get('versions') else ' †'}")


def render(rows: list[dict]) -> str:
    """Markdown: one line per quantizer × reconstructor (× options), one column per bit width."""
    fp = rows[0]["fp_ppl"] if rows else float("nan")
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    lines: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        rank = f" [rank {r['rank']}]" if r.get("rank") not in (0, 32, None) else ""
        label = (r["quantizer"], r["reconstructor"], (_label(key_options(r)) + rank).strip())
        lines.setdefault(label, {})[r["bits"]] = r
    order = ["none", "svd", "lqer", "qera-approx", "qera-exact", "loftq"]
    lines = dict(sorted(lines.items(), key=lambda kv: (kv[0][0] != "rtn", kv[0][0],
                                                      order.index(kv[0][1]) if kv[0][1] in order else 99,
                                                      kv[0][2])))
    sources = list(dict.fromkeys(s for r in rows for s in (r.get("perplexity") or {"pydoc": None})))
    fps = {s: v["float"] for r in rows for s, v in (r.get("perplexity") or {}).items()}
    fps.setdefault("pydoc", fp)
    out = [f"float perplexity {' / '.join(f'{fps[s]:.2f}' for s in sources)} ({' / '.join(sources)}); cells: "
           f"perplexity on {' / '.join(sources)} (× float, bits per parameter with L·R, compress time)",
           "", "| quantizer | reconstructor | variant | " + " | ".join(f"{b}-bit" for b in bits) + " |",
           "|---|---|---|" + "---|" * len(bits)]
    for (q, rec, variant), by_bits in lines.items():
        cells = []
        for b in bits:
            r = by_bits.get(b)
            cells.append("–" if r is None else _cell(r, sources))
        out.append(f"| {q} | {rec} | {variant or '–'} | " + " | ".join(cells) + " |")
    measured = {_versions_line(r["versions"]) for r in rows if r.get("versions")}
    out.append("")
    out += [f"Measured with {line}." for line in sorted(measured)]
    missing = sorted({s for r in rows for s in sources if s not in (r.get("perplexity") or {"pydoc": None})})
    if missing:
        out.append(f"– for {', '.join(missing)}: the row was measured before that text was added to the protocol "
                   "(its other figures stand; re-run the row to add it).")
    if any(not r.get("versions") for r in rows):
        out.append("† measured before report rows recorded their versions (an earlier engine; same protocol).")
    return "\n".join(out)


def _versions_line(v: dict) -> str:
    peers = "".join(f", {name} {version}" for name, version in sorted((v.get("peer") or {}).items()))
    return (f"lqframe {v.get('lqframe')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
            f"python {v.get('python')}, device {v.get('device')}{peers}")


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"option {pair!r} is not KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def _label(options: dict) -> str:
    """The variant of a row: its options, and every key field (:func:`key_options`) off its default."""
    o = key_options(options)
    qopts, ropts = o["quantizer_options"], o["reconstructor_options"]
    opts = [f"{k}={v}" for k, v in qopts.items()]
    opts += [f"{'reconstructor ' if k in qopts else ''}{k}={v}" for k, v in ropts.items()]
    if o["group_size"] != ROW_DEFAULTS["group_size"]:
        opts.append(f"g{o['group_size']}")
    if o["sequential"] != ROW_DEFAULTS["sequential"]:
        opts.append(f"sequential={o['sequential']}")
    if o["calibration_windows"] != ROW_DEFAULTS["calibration_windows"] or o["seq_len"] != ROW_DEFAULTS["seq_len"]:
        opts.append(f"calibration={o['calibration_windows']}×{o['seq_len']}")
    if list(o["calibration_sources"]) != ROW_DEFAULTS["calibration_sources"]:
        opts.append(f"calibrated on {'+'.join(o['calibration_sources'])}")
    if o["evaluation_windows"] != ROW_DEFAULTS["evaluation_windows"] or o["seq_len"] != ROW_DEFAULTS["seq_len"]:
        opts.append(f"evaluation={o['evaluation_windows']}×{o['seq_len']}")
    if o["model"] != ROW_DEFAULTS["model"]:
        opts.append(f"model {o['model']}")
    return f" [{' '.join(opts)}]" if opts else ""


if __name__ == "__main__":
    main()
