"""Speed of ``LQLinear.forward`` (packed Q + float16 rank-32 L·R) at batch 1.

    python benchmarks/lqlinear_forward.py [--device cpu|cuda] [--shapes 576x1536 4096x11008]

For each shape (out × in) it builds an LQLinear from an NF4 g64 + SVD r32 decomposition of a random
matrix and times the forward of one token and of one 512-token sequence: through the packed kernel
entry point (the default), and with the dequantized-weight cache on. Prints one markdown row per
case: median milliseconds over the repeats, and the versions measured with. Runs against whichever
lqframe is importable (the benchmark only uses API that every version has).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_speed import timed  # noqa: E402

import lqframe  # noqa: E402
from lqframe.lqlinear import LQLinear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "4096x11008"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 512])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    reg = lqframe.registry()
    quantizer = reg.create("quantizer", "nf", bits=4, group_size=64)
    recon = reg.create("reconstructor", "svd", rank=32)
    print(f"lqframe {lqframe.__version__} ({lqframe.__file__}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}", file=sys.stderr)
    print("| out × in | tokens | packed forward (ms) | cached dense forward (ms) |")
    print("|---|---|---|---|")
    for shape in args.shapes:
        n, m = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        linear = torch.nn.Linear(m, n, bias=False)
        dec = recon.decompose(linear.weight.detach(), quantizer)
        module = LQLinear.from_decomposition(linear, dec).to(device)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, m, device=device)
            with torch.inference_mode():
                module.cache_weight = False
                module._cache = None
                packed = timed(lambda m=module, v=x: m(v), device, args.repeats) * 1e3
                module.cache_weight = True
                cached = timed(lambda m=module, v=x: m(v), device, args.repeats) * 1e3
                module.cache_weight = False
                module._cache = None
            print(f"| {n} × {m} | {tokens} | {packed:.2f} | {cached:.2f} |", flush=True)


if __name__ == "__main__":
    main()
