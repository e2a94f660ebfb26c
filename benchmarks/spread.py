"""How far a compression moves when only the floating-point path changes: the same code, versions,
model and data, run under each BLAS code path and thread count reachable on this machine.

    python benchmarks/spread.py --job gptq --label before           # GPTQ int4 g64 alone
    python benchmarks/spread.py --job default --label after          # the README's main job
    python benchmarks/spread.py --table                              # the markdown table of the results

Each variant is one ``lqframe run`` in its own process (so the environment applies from the start)
with ``MKL_CBWR`` unset (MKL's choice for this CPU), ``COMPATIBLE`` (SSE2 code, the path any x86
machine can take), ``AVX2`` or ``AVX512``, or with torch's own kernels held to AVX2
(``ATEN_CPU_CAPABILITY=avx2``, a CPU without AVX-512), and ``OMP_NUM_THREADS`` 1 or 2 (torch's
threads; the summation order of threaded kernels may depend on it). These change what another
machine would change: which SIMD kernels run and so the rounding of every dot product. A row
records every evaluation source's perplexity, the fraction of the packed codes that differ from
the first variant's, and the wall time. Rows are appended to ``--out`` (JSON lines) as they
finish; ``--table`` prints the spread (max/min − 1) of each job and label.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "gptq": [str(ROOT / "benchmarks" / "recipes" / "gptq4-alone.yaml")],
    "default": ["--set", "evaluate_stage.float_baseline=false"],
}
#: MKL_CBWR values (default: unset), and aten-avx2: ATen's own kernels limited to AVX2 (ATEN_CPU_CAPABILITY)
PATHS = ("default", "COMPATIBLE", "AVX2", "AVX512", "aten-avx2")


def _codes(folder: Path) -> dict:
    """Every layer's packed codes in a saved checkpoint (``….codes``; not those of double-quantized scales)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, t in load_file(f).items():
            if k.endswith(".codes") and ".scale." not in k:
                out[k] = t
    return out


def _differing(a: dict, b: dict) -> float:
    """Fraction of codes that differ (compared as unpacked codes of each tensor's width)."""
    from lqframe.kernels import unpack_bits

    diff = total = 0
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            raise SystemExit(f"{k}: packed shapes differ {tuple(ta.shape)} vs {tuple(tb.shape)}")
        bits = 4  # both jobs are int4
        n = ta.numel() * 8 // bits
        ca, cb = unpack_bits(ta.reshape(-1), bits, n), unpack_bits(tb.reshape(-1), bits, n)
        diff += int((ca != cb).sum())
        total += n
        del ca, cb
    return diff / max(total, 1) if total else float("nan")


def run_variant(job: str, label: str, path: str, threads: int, work: Path, sets: list[str]) -> dict:
    drop = ("MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = str(threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if path == "aten-avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    elif path != "default":
        env["MKL_CBWR"] = path
    out = work / f"{job}-{label}-{path}-{threads}"
    overrides = [a for s in sets for a in ("--set", s)]
    cmd = [sys.executable, "-m", "lqframe.cli", "run", *JOBS[job], *overrides, "--output", str(out), "--overwrite",
           "--quiet", "--json", "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    ppl = {s: v["compressed"] for s, v in report["perplexity"].items()}
    return {"path": path, "threads": threads, "perplexity": ppl, "seconds": round(seconds, 1), "folder": str(out),
            "versions": report.get("versions")}


def measure(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="lqframe-spread-"))
    first = None  # codes are compared with the first variant of this job and label (also of an earlier call)
    earlier = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()] if args.out.exists() else []
    earlier = [r for r in earlier if r["job"] == args.job and r["label"] == args.label]
    if earlier and Path(earlier[0]["folder"]).is_dir():
        first = _codes(Path(earlier[0]["folder"]))
    for path in args.paths:
        for threads in args.threads:
            row = run_variant(args.job, args.label, path, threads, work, args.set)
            codes = _codes(Path(row["folder"]))
            if first is None:
                first = codes
                row["codes_differing"] = 0.0
            else:
                row["codes_differing"] = _differing(first, codes)
            row = {"job": args.job, "label": args.label, "set": args.set, **row}
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{args.job:8} {args.label:8} MKL_CBWR={path:10} threads={threads}  "
                  + "  ".join(f"{s} {v:.4f}" for s, v in row["perplexity"].items())
                  + f"  codes differing {row['codes_differing']:.2e}  {row['seconds']:.0f} s", flush=True)


def table(out: Path) -> None:
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["job"], r["label"]), []).append(r)
    print("| job | label | source | perplexity per path / threads | codes differing (max) | spread (max/min − 1) |")
    print("|---|---|---|---|---|---|")
    for (job, label), rs in groups.items():
        sources = list(rs[0]["perplexity"])
        for s in sources:
            vals = [r["perplexity"][s] for r in rs]
            cells = ", ".join(f"{r['path']}/{r['threads']}: {r['perplexity'][s]:.4f}" for r in rs)
            diff = max(r["codes_differing"] for r in rs)
            print(f"| {job} | {label} | {s} | {cells} | ≤ {diff:.2%} | {max(vals) / min(vals) - 1:.3%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", choices=sorted(JOBS), default="gptq")
    ap.add_argument("--label", default="current", help="a name for this code state (before, after, ...)")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS[:3]))
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe overrides passed to lqframe run (e.g. the numerics of an earlier default)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spread.jsonl")
    ap.add_argument("--work", help="folder for the runs' checkpoints (default: a new temporary folder)")
    ap.add_argument("--table", action="store_true", help="only print the table of what --out holds")
    args = ap.parse_args()
    if args.table:
        table(args.out)
    else:
        measure(args)


if __name__ == "__main__":
    main()
