"""Speed and agreement of the matrix square root QERA-exact needs: ``lqframe.numerics.symmetric_sqrt``
(one float64 ``eigh``; gives ``S`` and ``S⁻¹``) against ``scipy.linalg.sqrtm`` (blocked Schur, what
the QERA reference code uses; gives ``S`` only), on the same random SPD matrices shaped like a
second moment ``E[xxᵀ]`` (sizes: SmolLM2-135M's 576 / 1536, LLaMA-7B's 4096, and 8192).

    python benchmarks/sqrtm_speed.py [--sizes 576 1536 4096 8192] [--seed 0] [--json]

scipy is not a dependency of lqframe; it is imported here only. One run per size and method.

On a machine whose cores are busy with other work, torch's OpenMP threads spin-wait and its
``eigh`` can run tens of times slower with 2 threads than with 1; run with
``OMP_WAIT_POLICY=PASSIVE`` (or on an idle machine) for meaningful figures. The load average at
the start is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from lqframe.numerics import cholesky_factor, symmetric_sqrt


def random_second_moment(size: int, seed: int) -> torch.Tensor:
    """``XᵀX / N`` of ``N = 2·size`` correlated tokens with a few outlier channels (float64, SPD)."""
    g = torch.Generator().manual_seed(seed)
    tokens = 2 * size
    mix = torch.eye(size, dtype=torch.float64) + torch.randn(size, size, generator=g, dtype=torch.float64) / size**0.5
    x = torch.randn(tokens, size, generator=g, dtype=torch.float64) @ mix
    x[:, torch.randperm(size, generator=g)[: max(1, size // 100)]] *= 20.0
    return (x.T @ x) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 8192])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()

    import scipy
    import scipy.linalg

    load = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        a = random_second_moment(size, args.seed)
        a_np = a.numpy()

        t0 = time.perf_counter()
        s_eigh = symmetric_sqrt(a, rel_floor=0.0).root
        t_eigh = time.perf_counter() - t0

        t0 = time.perf_counter()
        cholesky_factor(a, rel_floor=1e-6)  # qera-exact root: cholesky (same objective, see its doc)
        t_chol = time.perf_counter() - t0

        t0 = time.perf_counter()
        s_scipy = scipy.linalg.sqrtm(a_np)
        t_scipy = time.perf_counter() - t0

        s_scipy = np.real_if_close(np.asarray(s_scipy))
        s_scipy_t = torch.from_numpy(np.ascontiguousarray(s_scipy.real, dtype=np.float64))
        rel_diff = float(torch.linalg.norm(s_eigh - s_scipy_t) / torch.linalg.norm(s_scipy_t))
        rows.append({
            "size": size,
            "eigh_s": t_eigh,
            "sqrtm_s": t_scipy,
            "speedup": t_scipy / t_eigh,
            "cholesky_s": t_chol,
            "cholesky_speedup": t_scipy / t_chol,
            "rel_diff": rel_diff,
            "sqrtm_complex": bool(np.iscomplexobj(s_scipy)),
        })
        if not args.json:
            print(f"  size {size}: eigh {t_eigh:.2f} s, cholesky {t_chol:.3f} s, sqrtm {t_scipy:.2f} s", flush=True)

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"\ntorch {torch.__version__} ({torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), scipy {scipy.__version__}, "
          f"{os.cpu_count()} CPUs, load average at start {load:.2f}, float64, one run each")
    print(f"{'size':>6}  {'eigh s':>9}  {'sqrtm s':>9}  {'speed-up':>8}  {'‖S_eigh − S_scipy‖/‖S_scipy‖':>28}"
          f"  {'cholesky s':>10}  {'speed-up':>8}")
    for r in rows:
        flag = " (sqrtm complex)" if r["sqrtm_complex"] else ""
        print(f"{r['size']:>6}  {r['eigh_s']:>9.3f}  {r['sqrtm_s']:>9.3f}  {r['speedup']:>7.1f}×  "
              f"{r['rel_diff']:>28.2e}  {r['cholesky_s']:>10.3f}  {r['cholesky_speedup']:>7.1f}×{flag}")


if __name__ == "__main__":
    main()
