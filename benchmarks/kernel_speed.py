"""Speed of the packed linear ``y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ`` per layer shape and batch, against the
torch reference path and a dense matmul, with the bytes-read bound (docs/kernels.md).

    python benchmarks/kernel_speed.py [--device cuda] [--bits 4 3 2] [--batches 1 16 512]
    python benchmarks/kernel_speed.py --device cuda --generate OUTPUT_DIR   # decode tokens/s end to end

Shapes (out × in): LLaMA-7B's 4096×4096 (q, k, v, o), 11008×4096 (gate, up), 4096×11008 (down)
and LLaMA-70B's 8192×8192 (q, o), 1024×8192 (k, v), 28672×8192 (gate, up), 8192×28672 (down).
Q is int-k, group 64, float16 scales, packed zero points (codes drawn at random: speed does not
depend on the values), L and R rank 32, activations float16 on a GPU.

On a CUDA device each row gives the median time per call of the fused Triton kernel
(``LQFRAME_KERNELS=triton``), of the torch reference (dequantize, then two matmuls) and of a dense
float16 ``x·Wᵀ``; the effective GB/s of each (bytes it must read ÷ time); and the bytes-read bound
(packed Q + scales + zero points + float16 L, R + x + y, read at the card's bandwidth). That
bandwidth is measured on the card that runs the benchmark (:func:`copy_bandwidth`: a 1 GiB
device-to-device copy, bytes read + bytes written ÷ median time), unless ``--bandwidth GB/s``
gives it; the output names the card and says which was used ("measured copy bandwidth 3012 GB/s
on NVIDIA H100 80GB HBM3" or "given bandwidth 4800 GB/s on ..."), and every JSON row records
``device``, ``bandwidth_gbs`` and ``bandwidth`` (measured or given). On a CPU the Triton kernels do
not run (their interpreter is a correctness tool): the rows time the reference path and a dense
float32 matmul, have no bound, and GPU figures need a GPU.

``--generate DIR`` loads an lqframe output folder (``lqframe run``) and its float original, and
reports greedy decode tokens per second for 128 new tokens from one prompt, float16 original
against the compressed model through the kernels (and through the reference path).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

SHAPES = {
    "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "70B q/o": (8192, 8192), "70B k/v": (1024, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}


def packed_weight(n: int, k: int, bits: int, group: int, device: torch.device):
    """An int-``bits`` g``group`` packed weight with float16 scales and packed zero points."""
    from lqframe.types import QuantizedWeight

    g = torch.Generator().manual_seed(n * 31 + k)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int64)
    blocks = -(-k // group)
    scale = (torch.rand(n * blocks, generator=g) * 0.01 + 1e-3).to(torch.float16)
    zero = torch.randint(0, 1 << bits, (n * blocks,), generator=g, dtype=torch.int64)
    qw = QuantizedWeight.from_codes(codes, bits, group, scale, zero=zero, format=f"int{bits}-asym")
    tensors, header = qw.to_state()
    return QuantizedWeight.from_state({name: t.to(device) for name, t in tensors.items()}, header)


def bytes_read(n: int, k: int, m: int, bits: int, group: int, rank: int, act_bytes: int) -> int:
    blocks = n * -(-k // group)
    q = (n * k * bits + 7) // 8 + blocks * 2 + (blocks * bits + 7) // 8
    return q + rank * (n + k) * 2 + m * k * act_bytes + m * n * act_bytes


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """GB/s of a copy of ``nbytes`` bytes from one buffer of ``device`` to another: bytes read + bytes
    written over the median time of ``repeats`` copies after warm-up (:func:`timed`: CUDA events on
    a GPU). What the card's memory sustains in practice, below its data-sheet figure; the bytes-read
    bound is taken at it. Works on any device (a CPU gives its memory's figure, for tests)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(functools.partial(dst.copy_, src), device, repeats)
    return 2 * nbytes / seconds / 1e9


def layer_rows(args, device: torch.device) -> list[dict]:
    from lqframe.kernels import dispatch

    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    rows = []
    for label in args.shapes:
        n, k = SHAPES[label]
        dense = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        left = torch.randn(n, args.rank, device=device) * 0.01
        right = torch.randn(args.rank, k, device=device) * 0.01
        for bits in args.bits:
            qw = packed_weight(n, k, bits, args.group_size, device)
            for m in args.batches:
                x = torch.randn(m, k, device=device, dtype=dtype)
                need = bytes_read(n, k, m, bits, args.group_size, args.rank, x.element_size())
                dense_bytes = n * k * x.element_size() + (m * k + m * n) * x.element_size()
                row = {"shape": label, "out": n, "in": k, "bits": bits, "batch": m, "rank": args.rank,
                       "bytes": need, "bound_ms": need / (args.bandwidth * 1e9) * 1e3 if gpu else None,
                       "device": args.device_name, "bandwidth_gbs": args.bandwidth if gpu else None,
                       "bandwidth": args.bandwidth_source if gpu else None}
                packed = functools.partial(dispatch.lq_linear_packed, x, qw, left, right)
                with torch.inference_mode():
                    os.environ["LQFRAME_KERNELS"] = "reference"
                    row["reference_ms"] = timed(packed, device, args.repeats) * 1e3
                    row["dense_ms"] = timed(functools.partial(torch.nn.functional.linear, x, dense), device,
                                            args.repeats) * 1e3
                    if gpu:
                        os.environ["LQFRAME_KERNELS"] = "triton"
                        row["fused_ms"] = timed(packed, device, args.repeats) * 1e3
                    os.environ["LQFRAME_KERNELS"] = "auto"
                for kind in ("fused", "reference"):
                    if row.get(f"{kind}_ms"):
                        row[f"{kind}_gbs"] = need / (row[f"{kind}_ms"] / 1e3) / 1e9
                row["dense_gbs"] = dense_bytes / (row["dense_ms"] / 1e3) / 1e9
                if gpu:
                    row["speedup_vs_dense"] = row["dense_ms"] / row["fused_ms"]
                    row["fraction_of_bound"] = row["bound_ms"] / row["fused_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], gpu: bool) -> str:
    dense = "dense float16" if gpu else "dense float32"
    head = ["layer", "out × in", "bits", "batch"]
    head += ["fused (ms)", "fused GB/s", "reference (ms)", f"{dense} (ms)", "× dense", "bound (ms)", "of bound"] \
        if gpu else ["reference (ms)", "reference GB/s", f"{dense} (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"], f"{r['out']} × {r['in']}", str(r["bits"]), str(r["batch"])]
        if gpu:
            cells += [f"{r['fused_ms']:.4f}", f"{r['fused_gbs']:.0f}", f"{r['reference_ms']:.4f}",
                      f"{r['dense_ms']:.4f}", f"{r['speedup_vs_dense']:.2f}", f"{r['bound_ms']:.4f}",
                      f"{100 * r['fraction_of_bound']:.0f} %"]
        else:
            cells += [f"{r['reference_ms']:.2f}", f"{r['reference_gbs']:.3g}", f"{r['dense_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generate(args, device: torch.device) -> None:
    """Greedy decode speed of the compressed model (kernels and reference) against its float16 original."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    import lqframe  # noqa: F401  (registers the lqframe checkpoint format with transformers)
    from lqframe.models import load_model

    spec = json.loads((Path(args.generate) / "report.json").read_text())["model"]
    loaded = load_model(spec)  # the float original and its tokenizer
    prompt = loaded.tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.", return_tensors="pt")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results = {}
    for label, mode in (("float", None), ("compressed, kernels", "triton"), ("compressed, reference", "reference")):
        if mode == "triton" and device.type != "cuda":
            continue
        os.environ["LQFRAME_KERNELS"] = mode or "reference"
        if mode is None:
            model = loaded.model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.generate, dtype=dtype)
        model = model.to(device).eval()
        ids = prompt["input_ids"].to(device)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up (compilation, layouts)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        new = out.shape[1] - ids.shape[1]
        results[label] = {"tokens_per_s": new / seconds, "new_tokens": new, "seconds": seconds,
                          "device": args.device_name}
        print(json.dumps({label: results[label]}), flush=True)
        del model
    os.environ["LQFRAME_KERNELS"] = "auto"
    print("| model | tokens/s |\n|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['tokens_per_s']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 512])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, help="timed calls per row (default 50 on a GPU, 3 on a CPU)")
    ap.add_argument("--bandwidth", type=float, metavar="GB/s",
                    help="memory bandwidth for the bytes-read bound (default: measured on the GPU that runs this, "
                         "a 1 GiB device-to-device copy)")
    ap.add_argument("--generate", metavar="DIR", help="decode tokens/s of this lqframe output folder instead")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.repeats is None:
        args.repeats = 50 if device.type == "cuda" else 3
    import lqframe

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    args.device_name = name
    print(f"lqframe {lqframe.__version__}, torch {torch.__version__}, {name}", file=sys.stderr)
    if device.type != "cuda":
        print("no CUDA device: the Triton kernels are not timed (GPU figures need a GPU); the rows time "
              "the torch reference path and a dense float32 matmul", file=sys.stderr)
    if args.generate:
        generate(args, device)
        return
    bound = ""
    if device.type == "cuda":
        args.bandwidth_source = "given" if args.bandwidth is not None else "measured"
        if args.bandwidth is None:
            args.bandwidth = copy_bandwidth(device)
        what = "copy bandwidth" if args.bandwidth_source == "measured" else "bandwidth"
        bound = f"{args.bandwidth_source} {what} {args.bandwidth:.0f} GB/s on {name}"
        print(json.dumps({"device": name, "bandwidth_gbs": args.bandwidth, "bandwidth": args.bandwidth_source}),
              flush=True)
    rows = layer_rows(args, device)
    if bound:
        print(f"bytes-read bound at the {bound}\n")
    print(table(rows, device.type == "cuda"))


if __name__ == "__main__":
    main()
