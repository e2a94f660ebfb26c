"""Mixed-configuration allocation on the default model: the ``ilp`` allocator (and ``greedy``)
at several average-bit budgets, with the budget counting Q only or Q + L·R, against the uniform
rows of the methods table. Same protocol as benchmarks/methods_table.py (pydoc calibration,
16 × 512; evaluation on pydoc and news, 16 × 512 held-out windows each).

    python benchmarks/allocation.py --quantizer gptq --reconstructor qera-exact \
        --bits 2 3 4 --group-sizes 32 64 128 --ranks 32 --budgets 2.5 2.75 3.0 3.5 4.0

Every (budget, convention, allocator) compresses a fresh copy; the cost table is built once and
cached on disk (``--cache``), so each further budget costs its solve, the chosen decompositions
and the evaluation. Rows go to ``--out`` (JSON lines) as they finish; ``--table`` renders them
next to the uniform rows of ``--uniform`` (methods.jsonl) at equal or more bits. With the factors
counted, give several ``--ranks`` so the program chooses the rank per matrix too.

Each row records the cost-table time (cold or cached), the Fisher pass time (``--metric fisher``
or a Fisher-weighted reconstructor), the solve time and the bits / ranks chosen. A row already in
``--out`` is not measured again when every option that moves its figures matches
(``methods_table.recipe_key``): ``--model`` and the recipe the row ran (quantizer, reconstructor
and their options, ``--bits``, ``--group-sizes``, ``--ranks``, the budget and convention, the
allocator, ``--metric``, ``--reuse``, ``--cache`` (whose state sets the cost-table time),
``--calibration``, ``--evaluation``, ``--seq-len``, ``--evaluation-sources``). ``--device`` (float
rounding only), ``--out`` and ``--uniform`` are not in the key; rows without a ``model`` were
measured on the default model.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods_table import _options, _read, _versions_line, compress_and_score, recipe_key  # noqa: E402

from lqframe.costcache import CostCache, default_cache_path  # noqa: E402
from lqframe.data import make_data  # noqa: E402
from lqframe.engine import perplexity_table, versions  # noqa: E402
from lqframe.errors import BudgetError  # noqa: E402
from lqframe.evaluate import perplexity  # noqa: E402
from lqframe.executor import resolve_device  # noqa: E402
from lqframe.models import load_model  # noqa: E402
from lqframe.pipeline import summarize  # noqa: E402
from lqframe.recipe import parse_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--quantizer-options", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reconstructor", default="qera-exact")
    ap.add_argument("--reconstructor-options", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--ranks", type=int, nargs="+", default=[32])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 2.75, 3.0, 3.5, 4.0])
    ap.add_argument("--conventions", nargs="+", choices=["q", "q+lr"], default=["q", "q+lr"],
                    help="q: the budget counts Q only (LQ-LoRA's); q+lr: Q and the low-rank factors")
    ap.add_argument("--lr-budgets", type=float, nargs="+",
                    help="budgets for the q+lr convention (default: --budgets + the factors' bits at the "
                         "smallest rank)")
    ap.add_argument("--allocators", nargs="+", default=["ilp"])
    ap.add_argument("--metric", default="auto", choices=["auto", "output", "fisher", "weight"])
    ap.add_argument("--reuse", action="store_true",
                    help="keep the cost table's decompositions (float-model statistics) instead of compressing the "
                         "chosen configurations block by block (allocate_stage.reuse)")
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--evaluation", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--evaluation-sources", nargs="+", default=["pydoc", "news"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", help="cost cache file, shared by every budget (default: lqframe's, "
                    "$LQFRAME_CACHE/costs.sqlite or ~/.cache/lqframe/costs.sqlite)")
    ap.add_argument("--out", default="benchmarks/results/allocation.jsonl")
    ap.add_argument("--uniform", nargs="+",
                    default=["benchmarks/results/methods.jsonl", "benchmarks/results/gptq.jsonl"],
                    help="JSON-lines files of uniform rows to compare with (methods_table.py's)")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of what --out holds")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        print(render(_read(out), [row for path in args.uniform for row in _read(Path(path))]))
        return
    qopts, ropts = _options(args.quantizer_options), _options(args.reconstructor_options)
    grid = {"quantizer": {"bits": args.bits, "group_size": args.group_sizes}}
    if args.reconstructor != "none":
        grid["reconstructor"] = {"rank": args.ranks}

    loaded = load_model(args.model)
    base = loaded.model
    data = make_data(loaded.tokenizer, [("pydoc", None)], args.evaluation_sources, args.seq_len, args.calibration,
                     args.evaluation, 0)
    device = resolve_device(args.device)
    base.to(device)
    fps = {s: perplexity(base, w, progress=False) for s, w in data.evaluation.items()}
    print("float perplexity " + ", ".join(f"{v:.4f} ({s})" for s, v in fps.items()), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {recipe_key(r) for r in _read(out)}
    cache_path = Path(args.cache) if args.cache else default_cache_path()

    jobs = []
    for convention in args.conventions:
        budgets = args.budgets
        if convention == "q+lr":
            budgets = args.lr_budgets or [b + _factor_bits(base, min(args.ranks)) for b in args.budgets]
        jobs += [(convention, b, a) for b in budgets for a in args.allocators]
    for convention, budget, allocator in jobs:
        doc = {
            "data": {"source": args.evaluation_sources[0], "seq_len": args.seq_len,
                     "calibration_windows": args.calibration, "evaluation_windows": args.evaluation},
            "quantize_stage": {"quantizer": {"name": args.quantizer, **qopts}},
            "allocate_stage": {"allocator": allocator, "budget_bits": round(budget, 6),
                               "include_lowrank": convention == "q+lr", "grid": grid, "metric": args.metric,
                               "cache": str(cache_path), "reuse": args.reuse},
            "evaluate_stage": {"float_baseline": False, "data": args.evaluation_sources},
        }
        if args.reconstructor != "none":
            doc["reconstruct_stage"] = {"reconstructor": {"name": args.reconstructor, **ropts}}
        recipe = parse_recipe(doc, f"allocation-{convention}-{budget}")
        row_key = recipe_key({"model": args.model, "recipe": doc})
        if row_key in done:
            print(f"{convention:5} {budget:.3f} {allocator}: cached", flush=True)
            continue
        entries_before = len(CostCache(cache_path)) if cache_path.exists() else 0
        try:
            state, seconds = compress_and_score(recipe, base, device, data, fps)
        except BudgetError as exc:  # recorded: the table says which budgets cannot be met
            row = {"model": args.model, "recipe": doc, "convention": convention, "budget": budget,
                   "allocator": allocator, "quantizer": args.quantizer, "reconstructor": args.reconstructor,
                   "grid": grid, "error": str(exc)}
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{convention:5} budget {budget:.3f} {allocator}: {exc}", flush=True)
            continue
        results = state.results
        row = {
            "model": args.model, "recipe": doc, "convention": convention, "budget": budget, "allocator": allocator,
            "quantizer": args.quantizer, "reconstructor": args.reconstructor, "grid": grid,
            "ppl": state.ppl, "perplexity": perplexity_table(state), "data": data.record(),
            "compress_seconds": seconds,
            "cost_table_seconds": state.timings.get("cost_table"),
            "cost_table_cold": entries_before == 0,
            "new_cost_entries": len(CostCache(cache_path)) - entries_before,
            "fisher_seconds": state.timings.get("gradient:fisher"),
            "solve_seconds": state.timings.get("allocate_solve"),
            "choices": dict(collections.Counter(f"{r.bits}b g{r.group_size} r{r.rank}" for r in results)),
            **summarize(results),
            "versions": versions(state),
        }
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        used = row["avg_bits_with_lowrank"] if convention == "q+lr" else row["avg_bits"]
        print(f"{convention:5} budget {budget:.3f} {allocator}: {used:.3f} bits  "
              + "  ".join(f"{s} {v['compressed']:.4f} ×{v['ratio']:.3f}" for s, v in row["perplexity"].items())
              + f"  table {row['cost_table_seconds']:.0f} s (+{row['new_cost_entries']} entries), solve "
              f"{row['solve_seconds']:.2f} s, total {seconds:.0f} s", flush=True)
        del state


def _factor_bits(model, rank: int) -> float:
    """Bits per parameter of rank-``rank`` float16 factors over the model's target linears."""
    from lqframe.models import block_linears

    numel = factors = 0
    for _, _, linears in block_linears(model):
        for lin in linears.values():
            n, m = lin.weight.shape
            numel += n * m
            factors += 16 * rank * (n + m)
    return factors / numel


def _ropts(row: dict) -> dict:
    """The reconstructor options of an allocation row (besides its name and the grid's rank)."""
    spec = dict(row["recipe"].get("reconstruct_stage", {}).get("reconstructor", {}))
    spec.pop("name", None)
    return spec


def _nearest(peers: list[dict], lr: bool, sources: list[str]) -> str:
    """The uniform rows with the fewest bits among ``peers``, the best of them on pydoc."""
    def bits(u):
        return u["avg_bits_with_lowrank"] if lr else u["avg_bits"]

    fewest = min((bits(u) for u in peers), default=None)
    near = [u for u in peers if fewest is not None and abs(bits(u) - fewest) < 0.02]
    best = min(near, key=lambda u: u["perplexity"]["pydoc"]["compressed"], default=None)
    if best is None:
        return "–"
    return (f"{best['bits']}-bit {best['reconstructor']} {bits(best):.2f} b: "
            + " / ".join(f"{best['perplexity'][s]['compressed']:.2f}" if s in best["perplexity"] else "–"
                         for s in sources))


def _metric(row: dict) -> str:
    stage = row["recipe"]["allocate_stage"]
    metric = stage.get("metric", "auto")
    return ("output" if metric == "auto" else metric) + (", reuse" if stage.get("reuse") else "")


def render(rows: list[dict], uniform: list[dict]) -> str:
    """One line per allocation row, with the best uniform row at equal or more bits beside it."""
    if not rows:
        return "no rows"
    measured = [r for r in rows if "perplexity" in r]
    sources = list(measured[0]["perplexity"])
    fps = measured[0]["perplexity"]
    floats = " / ".join(f"{fps[s]['float']:.2f}" for s in sources)
    lines = [f"float perplexity {floats} ({' / '.join(sources)}); "
             "uniform: among the methods-table rows of the same quantizer with at least as many bits in the same "
             "convention, those with the fewest bits, and of them the one with the lowest pydoc perplexity", "",
             "| budget counts | budget | allocator (cost) | bits Q / Q+L·R | " + " | ".join(sources)
             + " | choices | nearest uniform at ≥ bits | the same method uniform at ≥ bits | cost table | solve |",
             "|---|---|---|---|" + "---|" * len(sources) + "---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["convention"], r["budget"], r["allocator"], _metric(r))):
        lr = r["convention"] == "q+lr"
        if "error" in r:
            lines.append(f"| {'Q + L·R' if lr else 'Q'} | {r['budget']:.3f} | {r['allocator']} ({_metric(r)}) | "
                         f"infeasible: {r['error'].split(': ', 1)[-1]} |" + " |" * (len(sources) + 6))
            continue
        used = r["avg_bits_with_lowrank"] if lr else r["avg_bits"]
        peers = [u for u in uniform if u["quantizer"] == r["quantizer"] and "perplexity" in u
                 and (u["avg_bits_with_lowrank"] if lr else u["avg_bits"]) >= used - 1e-9]
        uni = _nearest(peers, lr, sources)
        same = _nearest([u for u in peers if u["reconstructor"] == r["reconstructor"]
                         and u.get("reconstructor_options") == _ropts(r)], lr, sources)
        choices = ", ".join(f"{k} ×{v}" for k, v in sorted(r["choices"].items()))
        new = r.get("new_cost_entries") or 0
        table = f"{r['cost_table_seconds']:.0f} s ({f'{new} computed' if new else 'cached'})"
        fisher = f", Fisher pass {r['fisher_seconds']:.0f} s" if r.get("fisher_seconds") else ""
        table += fisher
        lines.append(f"| {'Q + L·R' if lr else 'Q'} | {r['budget']:.3f} | {r['allocator']} ({_metric(r)}) | "
                     f"{r['avg_bits']:.3f} / {r['avg_bits_with_lowrank']:.3f} | "
                     + " | ".join(f"{r['perplexity'][s]['compressed']:.2f}" for s in sources)
                     + f" | {choices} | {uni} | {same} | {table} | {r['solve_seconds']:.2f} s |")
    lines.append("")
    lines += [f"Measured with {v}." for v in sorted({_versions_line(r["versions"]) for r in measured})]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
