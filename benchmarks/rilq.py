"""RILQ on the default model: low-bit Q with no correction, with the closed-form correction, and
with that correction tuned (``tune_stage``: 0.5 · model-loss + 0.5 · causal-lm, Q frozen), at
several ranks. Same protocol as benchmarks/methods_table.py (pydoc calibration, 16 × 512;
evaluation on pydoc and news, 16 × 512 held-out windows each); the tuning windows are drawn from
pydoc, never among the evaluation windows.

    python benchmarks/rilq.py --bits 2 3 --ranks 16 32 64

Each row records the perplexities, the bits, the tune stage's wall time, the process's peak
resident memory while it tuned (sampled), the validation history and why training stopped. Rows
go to ``--out`` (JSON lines) as they finish; a row already there is not measured again when every
option that moves its figures matches (``methods_table.recipe_key``): ``--model`` and the recipe
the row ran (bits, ``--group-size``, rank, ``--quantizer``/``--reconstructor`` and their options,
``--tune``, ``--calibration``, ``--evaluation``, ``--seq-len``, ``--evaluation-sources``).
``--device`` (float rounding only) and ``--out`` are not in the key; rows without a ``model`` were
measured on the default model. ``--table`` prints the markdown table of what ``--out`` holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods_table import _options, _read, _versions_line, compress_and_score, recipe_key  # noqa: E402

from lqframe.data import make_data, make_tuning_windows  # noqa: E402
from lqframe.engine import perplexity_table, versions  # noqa: E402
from lqframe.evaluate import perplexity  # noqa: E402
from lqframe.executor import resolve_device  # noqa: E402
from lqframe.models import load_model  # noqa: E402
from lqframe.pipeline import summarize  # noqa: E402
from lqframe.recipe import parse_recipe  # noqa: E402


class PeakRSS:
    """The process's largest resident set size (MB) while the block runs, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss_mb())

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--quantizer-options", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reconstructor", default="qera-exact", help="the closed-form correction tuned from")
    ap.add_argument("--reconstructor-options", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--kinds", nargs="+", default=["none", "closed", "tuned"],
                    choices=["none", "closed", "tuned"])
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--evaluation", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--evaluation-sources", nargs="+", default=["pydoc", "news"])
    ap.add_argument("--tune", nargs="*", default=[], metavar="KEY=VALUE",
                    help="tune_stage options (default: RILQ's objectives, lr 1e-4, 64 + 16 windows, accumulation 8, "
                         "250 updates, validation every 25, patience 5)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/rilq.jsonl")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        print(render(_read(out)))
        return
    qopts, ropts = _options(args.quantizer_options), _options(args.reconstructor_options)
    tune = {"objectives": RILQ_OBJECTIVES, **_options(args.tune)}

    loaded = load_model(args.model)
    base = loaded.model
    data = make_data(loaded.tokenizer, [("pydoc", None)], args.evaluation_sources, args.seq_len, args.calibration,
                     args.evaluation, 0)
    stage_probe = parse_recipe({"quantize_stage": {"quantizer": "rtn"}, "tune_stage": tune}).tune
    tuning = make_tuning_windows(loaded.tokenizer, ["pydoc"], args.seq_len, stage_probe.windows,
                                 stage_probe.validation_windows, args.evaluation, 0)
    device = resolve_device(args.device)
    base.to(device)
    fps = {s: perplexity(base, w, progress=False) for s, w in data.evaluation.items()}
    print("float perplexity " + ", ".join(f"{v:.4f} ({s})" for s, v in fps.items()), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {recipe_key(r) for r in _read(out)}

    jobs = []
    for bits in args.bits:
        if "none" in args.kinds:
            jobs.append((bits, 0, "none"))
        for rank in args.ranks:
            jobs += [(bits, rank, k) for k in ("closed", "tuned") if k in args.kinds]
    for bits, rank, kind in jobs:
        doc = {
            "data": {"source": args.evaluation_sources[0], "seq_len": args.seq_len,
                     "calibration_windows": args.calibration, "evaluation_windows": args.evaluation},
            "quantize_stage": {"quantizer": {"name": args.quantizer, "bits": bits, "group_size": args.group_size,
                                             **qopts}},
            "evaluate_stage": {"float_baseline": False, "data": args.evaluation_sources},
        }
        if kind != "none":
            doc["reconstruct_stage"] = {"reconstructor": {"name": args.reconstructor, "rank": rank, **ropts}}
        if kind == "tuned":
            doc["tune_stage"] = tune
        label = f"{args.quantizer} {bits}b r{rank} {kind}"
        if recipe_key({"model": args.model, "recipe": doc}) in done:
            print(f"{label}: cached", flush=True)
            continue
        recipe = parse_recipe(doc, label)
        with PeakRSS() as mem:
            state, seconds = compress_and_score(recipe, base, device, data, fps,
                                                tuning=tuning if kind == "tuned" else None,
                                                log=lambda s: print("   ", s, flush=True))
        tuned = state.tuned
        row = {"model": args.model, "recipe": doc, "quantizer": args.quantizer, "bits": bits, "rank": rank,
               "kind": kind,
               "reconstructor": args.reconstructor if kind != "none" else "none",
               "ppl": state.ppl, "perplexity": perplexity_table(state), "data": data.record(),
               "tuning_data": tuning.record() if kind == "tuned" else None,
               "compress_seconds": seconds, "tune_seconds": state.timings.get("tune"),
               "teacher_seconds": state.timings.get("teacher"),
               "peak_rss_mb": mem.peak, "tuning": tuned, **summarize(state.results), "versions": versions(state)}
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        extra = ""
        if tuned is not None:
            extra = (f"  tune {row['tune_seconds']:.0f} s, {tuned['updates']} updates ({tuned['stopped']}), "
                     f"best at {tuned['best_update']}")
        print(f"{label}: " + "  ".join(f"{s} {v['compressed']:.4f} ×{v['ratio']:.3f}"
                                       for s, v in row["perplexity"].items())
              + f"  peak {mem.peak:.0f} MB, total {seconds:.0f} s" + extra, flush=True)
        del state


RILQ_OBJECTIVES = {"model-loss": 0.5, "causal-lm": 0.5}


def _objectives_label(objectives) -> str:
    if isinstance(objectives, dict):
        return " + ".join(f"{w:g} {name}" for name, w in objectives.items())
    return objectives if isinstance(objectives, str) else " + ".join(objectives)


def render(rows: list[dict]) -> str:
    if not rows:
        return "no rows"
    sources = list(rows[0]["perplexity"])
    floats = " / ".join(f"{rows[0]['perplexity'][s]['float']:.2f}" for s in sources)
    lines = [f"float perplexity {floats} ({' / '.join(sources)}); × float in brackets", "",
             "| Q | rank | correction | bits Q + L·R | " + " | ".join(sources)
             + " | tune time | updates (best) | peak RSS |",
             "|---|---|---|---|" + "---|" * len(sources) + "---|---|---|"]
    order = {"none": 0, "closed": 1, "tuned": 2}
    for r in sorted(rows, key=lambda r: (-r["bits"], r["rank"], order[r["kind"]])):
        what = {"none": "none", "closed": r["reconstructor"], "tuned": f"{r['reconstructor']} + RILQ"}[r["kind"]]
        objectives = (r["recipe"].get("tune_stage") or {}).get("objectives", RILQ_OBJECTIVES)
        if r["kind"] == "tuned" and objectives != RILQ_OBJECTIVES:
            what = f"{r['reconstructor']} + tuned ({_objectives_label(objectives)})"
        t = r.get("tuning")
        cells = " | ".join(f"{r['perplexity'][s]['compressed']:.2f} (×{r['perplexity'][s]['ratio']:.2f})"
                           for s in sources)
        lines.append(f"| {r['quantizer']} {r['bits']}-bit g{r['recipe']['quantize_stage']['quantizer']['group_size']} "
                     f"| {r['rank'] or '–'} | {what} | {r['avg_bits_with_lowrank']:.2f} | {cells} | "
                     + (f"{r['tune_seconds']:.0f} s | {t['updates']} ({t['best_update']}) | " if t else "– | – | ")
                     + f"{r['peak_rss_mb']:.0f} MB |")
    lines.append("")
    schedules = sorted({json.dumps({k: v for k, v in r["recipe"]["tune_stage"].items() if k != "objectives"},
                                   sort_keys=True) for r in rows if r["kind"] == "tuned"})
    lines += [f"Tuning options (besides the objectives): {s}." for s in schedules]
    lines += [f"Measured with {v}." for v in sorted({_versions_line(r["versions"]) for r in rows})]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
