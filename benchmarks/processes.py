"""One process or several (torch.distributed) on this machine: wall time of the same job, and the
check that both write the same checkpoint.

    python benchmarks/processes.py default        # the main job (lqframe run's default recipe)
    python benchmarks/processes.py ilp            # the LQ-LoRA ILP recipe: Fisher pass + a cold cost table
    python benchmarks/processes.py --table        # benchmarks/results/processes.md

Each job runs twice on the default model, in fresh processes, alone on the machine: one process with
``--threads`` × N threads, and ``torchrun --nproc-per-node N`` with ``--threads`` threads each (gloo),
so both use the same cores. The row records both wall times, each run's stage seconds, the leader's
peak RSS, the perplexities, and whether ``model.safetensors`` is the same bytes (it must be).

``ilp`` is ``recipes/lqlora-ilp.yaml`` (NF {2, 3, 4} bits × group {64, 128}, LQ-LoRA rank 32
weighted by the empirical Fisher, the ILP at 2.75 bits) with the cost cache off (every candidate
decomposed), 2 alternations instead of 5 and evaluation on pydoc alone, to keep it within minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale  # noqa: E402

JOBS = {
    "default": (None, ()),
    "ilp": (ROOT / "recipes" / "lqlora-ilp.yaml", ("allocate_stage.cache=false",
                                                   "reconstruct_stage.reconstructor.iterations=2",
                                                   "evaluate_stage.data=[pydoc]")),
}


def _recipe_file(job: str, work: Path) -> Path:
    path, _ = JOBS[job]
    if path is not None:
        return path
    from lqframe.recipe import DEFAULT_RECIPE

    work.mkdir(parents=True, exist_ok=True)
    (work / "default.yaml").write_text(DEFAULT_RECIPE)
    return work / "default.yaml"


def run_job(job: str, processes: int, threads: int, work: Path, model: str) -> dict:
    recipe = _recipe_file(job, work)
    rows = {}
    for label, n, t in (("one", 1, threads * processes), ("many", processes, threads)):
        print(f"{job}: {n} process(es) × {t} thread(s) …", file=sys.stderr, flush=True)
        rows[label] = scale.measure(model, work / f"{job}-{label}", recipe, False, t, None, processes=n,
                                    sets=JOBS[job][1])
        rows[label].update(processes=n, threads=t)
    same = (work / f"{job}-one" / "model.safetensors").read_bytes() == \
        (work / f"{job}-many" / "model.safetensors").read_bytes()
    return {"job": job, "processes": processes, "threads": threads, "model": model, "sets": list(JOBS[job][1]),
            "machine": scale._machine(), "same_checkpoint": same, "runs": rows}


def table(rows: list[dict]) -> str:
    lines = ["| job | run | wall | stage seconds | leader peak RSS | ppl | checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for label in ("one", "many"):
            res = r["runs"][label]
            stages = ", ".join(f"{k} {v:.0f}" for k, v in res["stage_seconds"].items() if v >= 1)
            ppl = " / ".join(f"{v['compressed']:.4f}" for v in res["perplexity"].values())
            check = "–" if label == "one" else ("byte-identical" if r["same_checkpoint"] else "DIFFERENT")
            who = f"{res['processes']} process{'es' if res['processes'] > 1 else ''} × {res['threads']} " \
                  f"thread{'s' if res['threads'] > 1 else ''}"
            lines.append(f"| {r['job']} | {who} | {res['wall_s']:.0f} s "
                         f"| {stages} | {res['peak_rss_mb'] / 1024:.2f} GiB | {ppl} | {check} |")
    first = next((r["runs"]["one"].get("versions") for r in rows), None)
    if first:
        lines.append("")
        lines.append("Measured with " + ", ".join(f"{k} {v}" for k, v in first.items()) + f"; {rows[0]['machine']}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", choices=list(JOBS))
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process of the torchrun run")
    ap.add_argument("--model", default="default")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lqframe-processes"))
    ap.add_argument("--out", type=Path, default=RESULTS / "processes.jsonl")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.job is not None:
        row = run_job(args.job, args.processes, args.threads, args.work, args.model)
        print(json.dumps(row), flush=True)
        kept = [r for r in scale._rows(args.out) if (r["job"], r["processes"]) != (row["job"], row["processes"])]
        args.out.write_text("".join(json.dumps(r) + "\n" for r in [*kept, row]))
        if not row["same_checkpoint"]:
            raise SystemExit(f"{args.job}: the {args.processes}-process checkpoint differs from the one-process one")
    text = table(scale._rows(args.out))
    print(text)
    (args.out.with_suffix(".md")).write_text(
        "# One process or several (torchrun, gloo) on one machine\n\n"
        "`python benchmarks/processes.py default|ilp`, then `--table` (see its docstring).\n\n" + text + "\n")


if __name__ == "__main__":
    main()
