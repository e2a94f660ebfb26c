"""How much one layer's compression moves when its calibration statistics change at the rounding level.

Collects ``Σxxᵀ`` of a few linears of the default model (float64, 16 × 512 pydoc windows), adds a
symmetric relative perturbation ``rxx ⊙ (1 + ε·N)`` and decomposes the layer's weight from both, in
float32 and in float64 arithmetic (the components' ``precision`` option). Prints, per layer and
configuration, the fraction of codes that differ, the relative change of ``L·R`` and the output
error ``tr(ΔRΔᵀ)/tr(WRWᵀ)`` of the unperturbed result.

    python benchmarks/perturbation.py                         # ε = 1e-7: float32 rounding of the statistics
    python benchmarks/perturbation.py --eps 1e-12 --configs default

Configurations: ``gptq`` (int4 g64 alone), ``one-pass`` (+ qera-exact r32, one pass), ``default`` (the
default recipe's decomposition: alternated three times), ``floor-1e-4`` / ``damp-0.01`` (the default with a
larger QERA eigenvalue floor / a ridge).
"""

from __future__ import annotations

import argparse
import time

import torch

import lqframe
from lqframe.kernels import unpack_bits
from lqframe.types import LayerStats

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.15.mlp.down_proj",
          "model.layers.15.self_attn.o_proj", "model.layers.29.mlp.gate_proj"]
CONFIGS = {
    "gptq": None,
    "one-pass": {"iterations": 1},
    "default": {"iterations": 3},
    "floor-1e-4": {"iterations": 3, "eig_floor": 1e-4},
    "damp-0.01": {"iterations": 3, "damp": 0.01},
}


def collect(windows: int) -> dict[str, tuple[torch.Tensor, int, torch.Tensor]]:
    from lqframe.data import make_data
    from lqframe.models import load_model

    loaded = load_model("default")
    model = loaded.model
    data = make_data(loaded.tokenizer, ["pydoc"], ["pydoc"], 512, windows, 16, 0)
    sums = {n: 0 for n in LAYERS}
    counts = dict.fromkeys(LAYERS, 0)

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] = sums[name] + x.T @ x
            counts[name] += x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in LAYERS]
    with torch.no_grad():
        model.to(torch.float64)
        for w in data.calibration:
            model(w[None])
    for h in handles:
        h.remove()
    return {n: (sums[n], counts[n], model.get_submodule(n).weight.detach().to(torch.float32)) for n in LAYERS}


def perturbed(rxx: torch.Tensor, eps: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rxx.shape, generator=g, dtype=torch.float64)
    return rxx * (1 + eps * (noise + noise.T) / 2)


def decompose(w, rxx, n, config, precision):
    reg = lqframe.registry()
    q = reg.create("quantizer", "gptq", bits=4, group_size=64, precision=precision)
    stats = LayerStats(n_tokens=n, rxx=rxx.clone())
    if config is None:
        return q.quantize(w, stats), None
    r = reg.create("reconstructor", "qera-exact", rank=32, precision=precision, **config)
    dec = r.decompose(w, q, stats)
    return dec.qweight, dec.lowrank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, default=1e-7)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["gptq", "one-pass", "default"])
    ap.add_argument("--precisions", nargs="+", choices=("float32", "float64"), default=["float32", "float64"])
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = collect(args.windows)
    print(f"relative perturbation of Σxxᵀ: {args.eps:g}; lqframe {lqframe.__version__}, torch {torch.__version__}")
    print("| layer | config | precision | codes differing | L·R change | output error | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, (rxx, n, w) in layers.items():
        other = perturbed(rxx, args.eps)
        for cname in args.configs:
            for precision in args.precisions:
                t0 = time.perf_counter()
                qa, la = decompose(w, rxx, n, CONFIGS[cname], precision)
                seconds = time.perf_counter() - t0
                qb, lb = decompose(w, other, n, CONFIGS[cname], precision)
                count = qa.shape[0] * qa.shape[1]
                ca, cb = (unpack_bits(q.codes.reshape(-1), q.bits, count) for q in (qa, qb))
                moved = float((ca != cb).double().mean())
                change = "–"
                diff = w.double() - qa.dequantize(torch.float64)
                if la is not None:
                    da, db = la.to_dense(torch.float64), lb.to_dense(torch.float64)
                    change = f"{float((da - db).norm() / da.norm()):.2e}"
                    diff = diff - da
                err = float(torch.trace(diff @ rxx @ diff.T) / torch.trace(w.double() @ rxx @ w.double().T))
                short = name.removeprefix("model.layers.")
                print(f"| {short} | {cname} | {precision} | {moved:.2e} | {change} | {err:.4e} | {seconds:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
