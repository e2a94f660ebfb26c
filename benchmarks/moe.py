"""A small mixture-of-experts model, trained so that its routing is not uniform, compressed with its
experts: bits over all parameters, perplexity float vs compressed, tokens per expert, time.

    python benchmarks/moe.py              # train (cached), compress three ways, print the table
    python benchmarks/moe.py --table      # benchmarks/results/moe.md from benchmarks/results/moe.jsonl

The model is a Qwen3-MoE built from transformers' config class: 4 blocks, hidden 256, 8 experts of
intermediate size 256 per block, 2 routed per token, a byte-level vocabulary (256 tokens, so the
embeddings do not dwarf the blocks). It is trained from a fixed seed for ``--steps`` (600) AdamW steps on
pydoc windows of 256 bytes (batch 8; the evaluation windows are never trained on), with no
load-balancing loss, so that the routers learn preferences. The trained model is cached in
``--cache`` (keyed by the options) and reused.

Each row compresses it with GPTQ int4 g64 (int3, int2 where the row says) + QERA-exact rank 16 on
32 calibration windows of pydoc (``lqframe run``), evaluated on 16 pydoc windows:

* ``attention only``: the experts ignored (what a ``targets: [Linear]`` recipe did before lqframe
  compressed experts) — the bits the report counts over all parameters show what stays float;
* ``experts, routed``: every expert calibrated on the tokens its router sends it (the default);
* ``experts, all tokens``: ``quantize_stage.experts.calibration: all``.

For the routed row the table gives the tokens each expert of each block saw, and which experts fell
back to the data-free decomposition.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
          "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 512,
          "tie_word_embeddings": False, "router_aux_loss_coef": 0.0}
SEQ = 256
#: run name → (GPTQ bits, quantize_stage keys)
ROWS = {
    "attention only": (4, {"ignore": ["experts"]}),
    "experts, routed": (4, {}),
    "experts, all tokens": (4, {"experts": {"calibration": "all"}}),
    "int3 experts, routed": (3, {}),
    "int3 experts, all tokens": (3, {"experts": {"calibration": "all"}}),
    "int2 experts, routed": (2, {}),
    "int2 experts, all tokens": (2, {"experts": {"calibration": "all"}}),
}


def _key(steps: int, seed: int) -> str:
    blob = json.dumps({"config": CONFIG, "steps": steps, "seed": seed, "seq": SEQ}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train(folder: Path, steps: int, seed: int, log=print) -> dict:
    """Train the model (module doc) and save it with its tokenizer into ``folder``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from lqframe.data import make_windows
    from lqframe.testing import byte_tokenizer

    tokenizer = byte_tokenizer()
    every = _all_windows(tokenizer)
    # the windows the runs evaluate on (the same choice lqframe run makes) are never trained on
    held_out = set(make_windows(tokenizer, "pydoc", SEQ, 0, 16, seed=0).evaluation_index)
    train_ids = every[[i for i in range(len(every)) if i not in held_out]]
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**CONFIG))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warm = max(1, steps // 10)  # linear warm-up, then cosine decay to a tenth
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.55 + 0.45 * math.cos(math.pi * min(1.0, max(0, i - warm) / max(1, steps - warm)))))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        batch = train_ids[torch.randint(0, len(train_ids), (8,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"steps": steps, "seed": seed, "train_seconds": time.perf_counter() - t0,
            "final_loss": sum(losses[-20:]) / min(20, len(losses)), "train_windows": len(train_ids),
            "parameters": sum(p.numel() for p in model.parameters())}
    (folder / "trained.json").write_text(json.dumps(info, indent=1))
    return info


def _all_windows(tokenizer) -> torch.Tensor:
    from lqframe.data import _token_ids, load_text

    ids = _token_ids(tokenizer, load_text("pydoc"), "pydoc")
    n = ids.numel() // SEQ
    return ids[: n * SEQ].view(n, SEQ)


def compress(folder: Path, name: str, work: Path) -> dict:
    import transformers

    import lqframe
    from lqframe.recipe import parse_recipe
    from lqframe.run import run

    bits, keys = ROWS[name]
    stage = {"quantizer": {"name": "gptq", "bits": bits, "group_size": 64}, **keys}
    doc = {"data": {"source": "pydoc", "seq_len": SEQ, "calibration_windows": 32, "evaluation_windows": 16},
           "quantize_stage": stage,
           "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 16}},
           "evaluate_stage": {"float_baseline": True}, "save_stage": {}}
    out = work / name.replace(" ", "-").replace(",", "")
    messages: list[str] = []
    t0 = time.perf_counter()
    report = run(parse_recipe(doc, f"<moe {name}>"), str(folder), out, overwrite=True, progress=False,
                 log=messages.append)
    seconds = time.perf_counter() - t0
    cov = report["coverage"]
    tokens: dict[str, list[int]] = {}
    for r in report["layers"]:
        parts = r["name"].split(".")
        if "experts" in parts and parts[-1] == "gate_proj":
            tokens.setdefault(parts[2], []).append(r["info"]["tokens"])
    return {"row": name, "bits": bits, "seconds": seconds, "fp_ppl": report["fp_ppl"], "ppl": report["ppl"],
            "layers": len(report["layers"]), "avg_bits_compressed": report["avg_bits_with_lowrank"],
            "bits_per_param_blocks": cov["bits_per_param_blocks"], "bits_per_param_model": cov["bits_per_param_model"],
            "untargeted_block_fraction": cov["untargeted_block_fraction"], "block_params": cov["block_params"],
            "model_params": cov["model_params"], "tokens_per_expert": tokens, "data_free": report["data_free"],
            "warnings": [m for m in messages if m.startswith("warning")],
            "calibration_tokens": 32 * SEQ, "versions": {"lqframe": lqframe.__version__, "torch": torch.__version__,
                                                         "transformers": transformers.__version__}}


def table(rows: list[dict], trained: dict) -> str:
    v = rows[-1]["versions"]
    lines = [
        "# A mixture-of-experts model compressed with its experts",
        "",
        f"`python benchmarks/moe.py` (lqframe {v['lqframe']}, torch {v['torch']}, transformers "
        f"{v['transformers']}; 2-core CPU). The model: Qwen3-MoE, 4 blocks × 8 experts (2 routed per token), "
        f"hidden 256, expert intermediate 256, byte vocabulary, {trained['parameters']:,} parameters, trained "
        f"{trained['steps']} steps on pydoc (final training loss {trained['final_loss']:.3f}, "
        f"{trained['train_seconds']:.0f} s). Recipe: GPTQ int4 g64 (int3 / int2 where the run says) + QERA-exact "
        f"rank 16, 32 × {SEQ} calibration "
        "tokens of pydoc, perplexity on 16 held-out pydoc windows (per byte).",
        "",
        "| run | float ppl | compressed ppl | bits/param, compressed layers (with L·R) | bits/param, all block "
        "params | bits/param, whole model | block params left float | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['row']} | {r['fp_ppl']:.4f} | {r['ppl']:.4f} | {r['avg_bits_compressed']:.3f} | "
                     f"{r['bits_per_param_blocks']:.3f} | {r['bits_per_param_model']:.3f} | "
                     f"{r['untargeted_block_fraction']:.1%} | {r['seconds']:.0f} |")
    routed = next(r for r in rows if r["row"] == "experts, routed")
    lines += ["", f"Tokens each expert's statistics cover, routed ({routed['calibration_tokens']:,} calibration "
              "tokens per block, each sent to 2 experts; the data-free threshold is 0.5 % = "
              f"{-(-routed['calibration_tokens'] * 5 // 1000)} tokens):", "",
              "| block | " + " | ".join(f"expert {e}" for e in range(8)) + " | max / min |",
              "|---|" + "---|" * 9]
    for block, counts in routed["tokens_per_expert"].items():
        ratio = f"{max(counts) / max(min(counts), 1):.1f}" if min(counts) else "∞"
        lines.append(f"| {block} | " + " | ".join(f"{c:,}" for c in counts) + f" | {ratio} |")
    fallback = routed["data_free"]
    lines += ["", "Data-free fallbacks (routed): " + (", ".join(f"{k} ({v})" for k, v in fallback.items())
                                                      if fallback else "none") + "."]
    warned = rows[0]["warnings"]
    if warned:
        lines += ["", f"The attention-only run warns: `{warned[0]}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lqframe" / "moe-benchmark")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lqframe-moe-benchmark"))
    ap.add_argument("--table", action="store_true", help="only rewrite the table from the recorded rows")
    args = ap.parse_args()
    record = RESULTS / "moe.jsonl"
    if not args.table:
        folder = args.cache / _key(args.steps, args.seed)
        if not (folder / "trained.json").is_file():
            train(folder, args.steps, args.seed, log=lambda s: print(s, file=sys.stderr))
        trained = json.loads((folder / "trained.json").read_text())
        rows = []
        for name in ROWS:
            row = compress(folder, name, args.work)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens_per_expert"}), file=sys.stderr)
            rows.append(row)
        record.write_text("".join(json.dumps({"trained": trained, **r}) + "\n" for r in rows))
    lines = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    text = table(lines, lines[0]["trained"])
    (RESULTS / "moe.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
