"""Time and memory of the empirical Fisher pass (the ``fisher`` statistic) on the default model:
one forward + backward per calibration window, gradients squared into one float32 accumulator per
target linear as they complete.

    python benchmarks/fisher_pass.py --windows 16 --seq-len 512
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from lqframe.data import make_data
from lqframe.engine import GradientContext
from lqframe.executor import resolve_device
from lqframe.fisher import empirical_fisher
from lqframe.models import block_linears, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    loaded = load_model(args.model)
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    data = make_data(loaded.tokenizer, [("pydoc", None)], ["pydoc"], args.seq_len, args.windows, 1, 0)
    layers = [name for _, _, linears in block_linears(model) for name in linears]
    weights_mb = sum(model.get_submodule(n).weight.numel() for n in layers) * 4 / 2**20
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fisher = empirical_fisher(GradientContext(model, data.calibration, device, layers, True))
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(float(f.sum()) for f in fisher.values())
    print(f"fisher pass: {len(layers)} linears ({weights_mb:.0f} MB of float32 weights), {args.windows} × "
          f"{args.seq_len} tokens on {device}: {seconds:.1f} s ({seconds / args.windows:.2f} s per window); "
          f"peak RSS {rss0:.0f} → {rss1:.0f} MB"
          + (f"; peak device memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB"
             if device.type == "cuda" else "")
          + f"; Σ F = {total:.6g}")


if __name__ == "__main__":
    main()
