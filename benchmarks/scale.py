"""Memory and time of streamed runs against model depth, and a model larger than this machine's memory.

    python benchmarks/scale.py depth --layers 4 8 16 32             # 2048 / 5632 blocks, streamed and resident
    python benchmarks/scale.py big --shape 7b                       # the 7B-shaped model, data-free recipe
    python benchmarks/scale.py big --shape 7b --recipe default --calibration 4 --time-limit 1800
    python benchmarks/scale.py big --shape 7b --recipe default --device cuda --time-limit 420   # on a GPU
    python benchmarks/scale.py --table                              # benchmarks/results/scale.md

Each row is one ``lqframe run`` in a fresh process (its peak RSS is the process's own) on a random
LLaMA-shaped model written by ``benchmarks/synthetic_model.py`` (cached under ``--work``), appended to
``benchmarks/results/scale.jsonl`` as soon as it finishes. Rows are keyed by every option that moves
a figure (shape, depth, mode, recipe, windows, thread count); a row already there is not measured
again (``--force`` does).

``depth``: the data-free recipe (``rtn`` int4 g64, evaluation on ``--evaluation`` windows of
``--seq-len`` tokens, no float baseline) at each depth, ``--modes stream resident``: a streamed run's
peak stays flat while the model grows; a resident run's grows with it.

``big``: the whole model streamed: ``--recipe data-free`` as above, or ``--recipe default`` (GPTQ
int4 g64 + QERA-exact r32 on ``--calibration`` pydoc windows) for as long as ``--time-limit`` allows —
the run is stopped then, and the seconds per block come from its progress file (the run can be
resumed by the same command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import synthetic_model  # noqa: E402

DATA_FREE = {"data": {"source": "pydoc", "calibration_windows": 0},
             "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 64}},
             "evaluate_stage": {"float_baseline": False}, "save_stage": {}}


def _model(work: Path, shape: dict, tokenizer: str) -> Path:
    name = "llama-" + "-".join(f"{k}{v}" for k, v in sorted(shape.items()))
    folder = work / name
    if not (folder / "synthetic.json").is_file():
        print(f"writing {folder} …", file=sys.stderr, flush=True)
        synthetic_model.write_model(folder, shape, synthetic_model.load_tokenizer(tokenizer),
                                    log=lambda s: print(s, file=sys.stderr, flush=True))
    return folder


def _recipe(kind: str, args) -> dict:
    if kind == "data-free":
        doc = json.loads(json.dumps(DATA_FREE))
    else:
        doc = {"data": {"source": "pydoc", "calibration_windows": args.calibration},
               "quantize_stage": {"quantizer": {"name": "gptq", "bits": 4, "group_size": 64}},
               "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 32}},
               "evaluate_stage": {"float_baseline": False}, "save_stage": {}}
    doc["data"].update({"seq_len": args.seq_len, "evaluation_windows": args.evaluation})
    return doc


def _machine() -> str:
    name = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            kb = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB memory"
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores{mem}"


def _peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure(model: Path | str, out: Path, recipe: dict | Path, stream: bool, threads: int, time_limit: float | None,
            processes: int = 1, sets: tuple[str, ...] = (), device: str = "cpu", resume: bool = False) -> dict:
    """One ``lqframe run`` in a fresh process (``processes`` > 1: under torchrun, ``threads`` each);
    its report, or (stopped at ``time_limit``) what its progress file says."""
    import yaml

    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_file = recipe
    if isinstance(recipe, dict):
        recipe_file = out.parent / f"{out.name}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, "-m", "lqframe.cli", "run", str(recipe_file), "--model", str(model), "--output", str(out),
           *([] if resume else ["--overwrite"]), "--quiet", "--device", device, "--stream" if stream else "--no-stream",
           *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as sink:  # a file, not a pipe: nobody reads a pipe while the run goes on
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak, stopped = 0.0, False
    finished: dict[int, float] = {}  # block -> wall seconds when the progress file first said it was done
    progress_file = out / ".lqframe-partial" / "progress.json"
    while proc.poll() is None:
        peak = max(peak, _peak_rss_mb(proc.pid) or 0.0)
        try:
            block = json.loads(progress_file.read_text())["finished_block"]
            finished.setdefault(block, time.perf_counter() - t0)
        except (OSError, ValueError, KeyError):
            pass
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            proc.send_signal(signal.SIGINT)
            stopped = True
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:  # inside a long LAPACK call: the progress file is committed
                proc.kill()                     # atomically, so a kill loses only the unfinished block
            break
        time.sleep(0.5)
    proc.wait()
    wall = time.perf_counter() - t0
    if not stopped and proc.returncode != 0:
        raise SystemExit(f"lqframe run failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    if stopped:
        progress = json.loads((out / ".lqframe-partial" / "progress.json").read_text())
        layers = progress["layers"]
        blocks = progress["finished_block"] + 1
        if blocks == 0:
            raise SystemExit(f"stopped at {wall:.0f} s before the first block finished (peak RSS {peak:.0f} MB): "
                             "no figure per block; give it a longer --time-limit")
        times = [finished[b] for b in sorted(finished) if b >= 0]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"stopped_after_s": round(wall, 1), "blocks_done": blocks, "peak_rss_mb": round(peak, 1),
                # wall seconds between block commits (capture, decompositions, propagation, writing);
                # with one block done, the decompositions' own seconds
                "seconds_per_block": round(sum(gaps) / len(gaps), 2) if gaps else
                round(sum(r["seconds"] for r in layers) / max(blocks, 1), 2),
                "first_block_done_s": round(times[0], 1) if times else None,
                "block_commits_s": {str(b): round(finished[b], 1) for b in sorted(finished) if b >= 0},
                "layer_seconds": round(sum(r["seconds"] for r in layers), 2)}
    report = json.loads((out / "report.json").read_text())
    blocks = len({r["name"].rsplit(".", 2)[0] for r in report["layers"]})
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(report["peak_rss_mb"], 1), "ppl": report["ppl"],
            "avg_bits": report["avg_bits"], "perplexity": report["perplexity"],
            "stage_seconds": {k: round(v, 2) for k, v in report["stage_seconds"].items()},
            "seconds_per_block": round(report["stage_seconds"].get("decompose", 0.0) / max(blocks, 1), 2),
            "versions": {k: report["versions"][k] for k in ("lqframe", "torch", "transformers", "python")}}


def _key(row: dict) -> tuple:
    return (json.dumps(row["shape"], sort_keys=True), row["mode"], row["recipe"], row["seq_len"], row["evaluation"],
            row.get("calibration", 0), row["threads"], row.get("device", "cpu"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def table(rows: list[dict]) -> str:
    lines = ["| shape (hidden / intermediate × blocks) | mode | recipe | params | peak RSS | wall | s / block | ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["shape"]["hidden"], r["recipe"], r["mode"], r["shape"]["layers"])):
        s = r["shape"]
        res = r["result"]
        wall = f"{res['wall_s']:.0f} s" if "wall_s" in res else f"stopped at {res['stopped_after_s']:.0f} s " \
                                                                 f"({res['blocks_done']} blocks)"
        ppl = f"{res['ppl']:.3f}" if res.get("ppl") is not None else "–"
        mode = r["mode"] + (f" ({r['device']})" if r.get("device") else "") + (" (resumed)" if r.get("resumed") else "")
        lines.append(f"| {s['hidden']} / {s['intermediate']} × {s['layers']} | {mode} | {r['recipe']} | "
                     f"{r['parameters'] / 1e9:.2f} B | {res['peak_rss_mb'] / 1024:.2f} GiB | {wall} | "
                     f"{res['seconds_per_block']:.2f} | {ppl} |")
    first = next((r["result"].get("versions") for r in rows if r["result"].get("versions")), None)
    if first:
        lines.append("")
        lines.append("Measured with " + ", ".join(f"{k} {v}" for k, v in first.items()) +
                     f"; {rows[0]['machine']}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=["depth", "big"])
    ap.add_argument("--table", action="store_true", help="print the table of the rows measured (and write scale.md)")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--shape", choices=list(synthetic_model.SHAPES), default="7b")
    ap.add_argument("--modes", nargs="+", choices=["stream", "resident"], default=["stream", "resident"])
    ap.add_argument("--recipe", choices=["data-free", "default"], default="data-free")
    ap.add_argument("--calibration", type=int, default=4)
    ap.add_argument("--evaluation", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (the row records the device)")
    ap.add_argument("--time-limit", type=float)
    ap.add_argument("--tokenizer", default="default")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lqframe-scale"))
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.jsonl")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="continue the unfinished run in the output folder (seconds per block of the blocks it does)")
    args = ap.parse_args()
    if args.table or args.what is None:
        text = table(_rows(args.out))
        print(text)
        (args.out.with_suffix(".md")).write_text(
            "# Streamed runs: peak memory against depth, and a model larger than memory\n\n"
            "`python benchmarks/scale.py --table` (rows from benchmarks/scale.py; see its docstring).\n\n"
            + text + "\n")
        return
    if args.what == "depth":
        shapes = [{"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                   "kv_heads": args.heads, "layers": n} for n in args.layers]
        modes = args.modes
    else:
        base = dict(synthetic_model.SHAPES[args.shape])
        if args.layers != [4, 8, 16, 32]:
            base["layers"] = args.layers[0]
        shapes, modes = [base], ["stream"]
    done = {_key(r) for r in _rows(args.out)}
    for shape in shapes:
        model = _model(args.work, shape, args.tokenizer)
        record = json.loads((model / "synthetic.json").read_text())
        for mode in modes:
            row = {"shape": shape, "mode": mode, "recipe": args.recipe, "seq_len": args.seq_len,
                   "evaluation": args.evaluation, "calibration": args.calibration if args.recipe == "default" else 0,
                   "threads": args.threads, "parameters": record["parameters"],
                   "machine": _machine(), **({"device": args.device} if args.device != "cpu" else {})}
            if _key(row) in done and not (args.force or args.resume):
                print(f"{shape} {mode}: measured already (--force measures again)", file=sys.stderr)
                continue
            print(f"{shape} {mode} {args.recipe} …", file=sys.stderr, flush=True)
            out = args.work / "out" / f"{model.name}-{mode}-{args.recipe}"
            row["result"] = measure(model, out, _recipe(args.recipe, args), mode == "stream", args.threads,
                                    args.time_limit, device=args.device, resume=args.resume)
            if args.resume:
                row["resumed"] = True
            print(json.dumps(row), flush=True)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
