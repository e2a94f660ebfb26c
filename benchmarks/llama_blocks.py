"""Seconds per block of the default recipe on a random LLaMA-shaped model (7B shapes by default).

    python benchmarks/llama_blocks.py --device cuda                 # 2 blocks of 4096 / 11008
    python benchmarks/llama_blocks.py --device cuda --offload       # blocks wait in CPU memory
    python benchmarks/llama_blocks.py --device cpu --hidden 512 --intermediate 1376   # a quick CPU run

Builds a random ``LlamaForCausalLM`` (``--blocks`` decoder blocks, the default model's tokenizer
and vocabulary, or a byte-level tokenizer when the default model is not installed, e.g. on a GPU
machine the 98 MB GGUF cannot be carried to), compresses it with the default recipe (GPTQ int4
g64 + QERA-exact r32, 16 × 512 pydoc calibration tokens) through the same engine as
``lqframe run``, and prints the seconds of each stage, the seconds per block, the peak device
memory and the versions measured with. Random weights: only the speed figures mean anything.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lqframe.data import make_windows
from lqframe.engine import RunState, execute, versions
from lqframe.errors import ModelError
from lqframe.executor import resolve_device
from lqframe.models import load_model
from lqframe.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = resolve_device(args.device)
    try:
        tokenizer = load_model("default").tokenizer
    except ModelError:  # the default model is not installed: a 256-token byte-level tokenizer
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.tiny import byte_tokenizer

        tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.blocks, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=4096)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    windows = make_windows(tokenizer, "pydoc", args.seq_len, args.calibration, 0, 0)
    recipe = load_recipe(None, [f"data.seq_len={args.seq_len}", f"data.calibration_windows={args.calibration}",
                                *args.set])
    state = RunState(recipe, model, device=device, offload=args.offload, calibration=windows.calibration,
                     progress=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    execute(state, only=("calibrate", "decompose"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t0
    layer_seconds = sum(r.seconds for r in state.results)
    out = {
        "shape": {"blocks": args.blocks, "hidden": args.hidden, "intermediate": args.intermediate},
        "device": str(device), "offload": args.offload,
        "seconds": round(total, 2), "seconds_per_block": round(total / args.blocks, 2),
        "decompose_seconds_per_block": round(layer_seconds / args.blocks, 2),
        "stage_seconds": {k: round(v, 2) for k, v in state.timings.items()},
        "peak_device_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None),
        "versions": versions(state),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
