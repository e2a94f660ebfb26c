"""Storage and weight error of the built-in formats on a 576×1536 Gaussian matrix (the shape of
SmolLM2-135M's MLP projections), quantization alone and with an SVD rank-32 correction.

    python benchmarks/formats.py [--rows 576 --cols 1536 --rank 32 --seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lqframe

CONFIGS = [
    ("nf4+DQ(qlora) g64", "nf", {"bits": 4, "group_size": 64, "double_quant": "qlora"}),
    ("nf4+DQ(lqlora) g64", "nf", {"bits": 4, "group_size": 64, "double_quant": "lqlora"}),
    ("nf4 g64 fp16", "nf", {"bits": 4, "group_size": 64}),
    ("nf3 g64 fp16", "nf", {"bits": 3, "group_size": 64}),
    ("nf2 g64 fp16", "nf", {"bits": 2, "group_size": 64}),
    ("rtn4 g64 asym", "rtn", {"bits": 4, "group_size": 64}),
    ("rtn3 g64 asym", "rtn", {"bits": 3, "group_size": 64}),
    ("rtn2 g64 asym", "rtn", {"bits": 2, "group_size": 64}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=576)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    w = torch.randn(args.rows, args.cols)
    reg = lqframe.registry()
    svd = reg.create("reconstructor", "svd", rank=args.rank)
    rows = []
    for label, name, opts in CONFIGS:
        q = reg.create("quantizer", name, **opts)
        t0 = time.perf_counter()
        qw = q.quantize(w)
        t_q = time.perf_counter() - t0
        rel = float((w - qw.dequantize()).norm() / w.norm())
        t0 = time.perf_counter()
        dec = svd.decompose(w, q)
        t_svd = time.perf_counter() - t0
        rel_lr = float((w - dec.dense()).norm() / w.norm())
        rows.append({
            "format": label,
            "bits_per_param": qw.storage_bits() / w.numel(),
            "rel_weight_error": rel,
            f"rel_error_svd_r{args.rank}": rel_lr,
            "bits_with_lowrank": dec.storage_bits() / w.numel(),
            "quantize_s": t_q,
            "svd_s": t_svd,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.rows}x{args.cols} N(0,1), seed {args.seed}; low-rank factors float16")
    print(f"{'format':<20} {'bits/param':>10} {'rel err':>9} {'+svd r' + str(args.rank):>10} "
          f"{'bits incl. LR':>13} {'quant s':>8} {'svd s':>7}")
    for r in rows:
        print(f"{r['format']:<20} {r['bits_per_param']:>10.4f} {r['rel_weight_error']:>9.4f} "
              f"{r[f'rel_error_svd_r{args.rank}']:>10.4f} {r['bits_with_lowrank']:>13.4f} "
              f"{r['quantize_s']:>8.3f} {r['svd_s']:>7.3f}")


if __name__ == "__main__":
    main()
