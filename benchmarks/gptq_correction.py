"""Why act-order can look worse under a low-rank correction: per-layer output errors on the default model.

For a few linears of the float model (inputs captured on the calibration windows), every GPTQ
variant is measured three ways, all as relative output errors ``‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖`` over the
calibration tokens (exact, from Σxxᵀ):

* ``Q``        — GPTQ alone;
* ``Q+LR``     — plus the QERA-exact rank-r correction of GPTQ's error (one shot);
* ``held-out`` — ``Q+LR``'s output error on the inputs of held-out windows (pydoc evaluation
  windows, and English news prose): what the calibration fit does on tokens it never saw;
* ``captured`` — the share of GPTQ's output-weighted error energy ``‖S(W − Q)ᵀ‖²`` that the best
  rank-r term removes (the top-r squared singular values of ``S(W − Q)ᵀ`` over their sum): the
  flatter GPTQ leaves its error spectrum, the less a rank-r correction can take back.

    python benchmarks/gptq_correction.py --layers 0 15 29 --bits 4 3 --rank 32
    python benchmarks/gptq_correction.py --variants "act_order=true static_groups=true damp=0.1" \
        --calibration pydoc news

Prints a markdown table; the mean over the chosen layers is the last row of each variant.
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

import lqframe
from lqframe.data import make_data
from lqframe.lowrank import output_error
from lqframe.models import find_blocks, load_model

VARIANTS = {
    "natural": {},
    "natural, static": {"static_groups": True},
    "act-order": {"act_order": True},
    "act-order, static": {"act_order": True, "static_groups": True},
}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def capture(model, blocks, names, windows) -> dict[str, lqframe.LayerStats]:
    """Σxxᵀ (float64) of the inputs of the named linears of the float model."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for b in blocks:
        for n in names:
            mod = model.get_submodule(b).get_submodule(n)

            def hook(_m, args, _out, key=f"{b}.{n}"):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return {k: lqframe.LayerStats(n_tokens=counts[k], rxx=sums[k]) for k in sums}


def captured_share(err: torch.Tensor, stats: lqframe.LayerStats, rank: int) -> float:
    rxx = stats.rxx / stats.n_tokens
    evals, evecs = torch.linalg.eigh(rxx)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    s = torch.linalg.svdvals(root @ err.double().T) ** 2
    return float(s[:rank].sum() / s.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 9, 18, 27])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--variants", nargs="+", metavar="'KEY=VALUE ...'",
                    help="GPTQ option sets to compare instead of the four act-order × static-groups ones")
    ap.add_argument("--calibration", nargs="+", default=["pydoc"], help="calibration sources (mixed)")
    ap.add_argument("--shrink", type=float, default=0.0,
                    help="fit to Σxxᵀ + shrink·mean(diag Σxxᵀ)·I instead of Σxxᵀ (errors are still measured on Σxxᵀ)")
    ap.add_argument("--evaluation", nargs="+", default=["pydoc", "news"], help="held-out sources")
    args = ap.parse_args()

    loaded = load_model("default")
    model = loaded.model.eval()
    data = make_data(loaded.tokenizer, args.calibration, args.evaluation, 512, 16, 16, 0)
    variants = VARIANTS
    if args.variants:
        variants = {v or "defaults": {k: yaml.safe_load(x) for k, _, x in (p.partition("=") for p in v.split())}
                    for v in args.variants}
    path, _ = find_blocks(model)
    blocks = [f"{path}.{i}" for i in args.layers]
    t0 = time.perf_counter()
    stats = capture(model, blocks, LINEARS, data.calibration)
    held = {s: capture(model, blocks, LINEARS, w) for s, w in data.evaluation.items()}
    print(f"captured inputs of {len(stats)} linears in {time.perf_counter() - t0:.0f} s")
    reg = lqframe.registry()
    rec = reg.create("reconstructor", "qera-exact", rank=args.rank)
    held_heads = " | ".join(f"Q / Q+LR held-out {s}" for s in held)
    print(f"\n| bits | variant | Q | Q+LR (r{args.rank}) | {held_heads} | captured by r{args.rank} |\n"
          f"|---|---|---|---|{'---|' * len(held)}---|")
    for bits in args.bits:
        for label, opts in variants.items():
            q_err, lr_err, share = [], [], []
            out_q = {s: [] for s in held}
            out_lr = {s: [] for s in held}
            for key, st in stats.items():
                w = model.get_submodule(key).weight.detach().float()
                fit = st
                if args.shrink:
                    ridge = args.shrink * float(torch.diagonal(st.rxx).mean())
                    fit = lqframe.LayerStats(n_tokens=st.n_tokens,
                                             rxx=st.rxx + ridge * torch.eye(st.rxx.shape[0], dtype=st.rxx.dtype))
                ref = output_error(w, st)
                quant = reg.create("quantizer", "gptq", bits=bits, group_size=args.group_size,
                                   symmetric=args.symmetric, **opts)
                qd = quant.quantize(w, fit).dequantize()
                dec = rec.decompose(w, quant, fit)
                q_err.append((output_error(w - qd, st) / ref) ** 0.5)
                lr_err.append((output_error(w - dec.dense(), st) / ref) ** 0.5)
                share.append(captured_share(w - qd, st, args.rank))
                for s, hs in held.items():
                    href = output_error(w, hs[key])
                    out_q[s].append((output_error(w - qd, hs[key]) / href) ** 0.5)
                    out_lr[s].append((output_error(w - dec.dense(), hs[key]) / href) ** 0.5)
            mean = lambda v: sum(v) / len(v)  # noqa: E731
            held_cells = " | ".join(f"{mean(out_q[s]):.4f} / {mean(out_lr[s]):.4f}" for s in held)
            print(f"| {bits} | {label} | {mean(q_err):.4f} | {mean(lr_err):.4f} | {held_cells} | {mean(share):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
