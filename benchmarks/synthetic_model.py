"""Write a random LLaMA-shaped model of any size to disk, one tensor at a time (never the whole model
in memory), for scale tests and benchmarks: models larger than this machine's memory.

    python benchmarks/synthetic_model.py --shape 7b OUT                       # 32 blocks, 13.5 GB of float16
    python benchmarks/synthetic_model.py --shape 7b --layers 4 OUT            # the same blocks, fewer of them
    python benchmarks/synthetic_model.py --shape custom --hidden 2048 --intermediate 5632 --heads 16 \\
        --layers 8 OUT

OUT gets what ``transformers.AutoModelForCausalLM.from_pretrained`` and ``lqframe run --model OUT``
load: ``config.json`` (``LlamaForCausalLM``), the tokenizer (the default model's, or ``--tokenizer
FOLDER``; the vocabulary is the tokenizer's), float16 weights in safetensors shards of at most
``--max-shard-size-mb`` with ``model.safetensors.index.json``, and ``synthetic.json`` (the options).

Shapes (hidden / intermediate / heads / key-value heads / blocks): ``7b`` 4096 / 11008 / 32 / 32 / 32,
``13b`` 5120 / 13824 / 40 / 40 / 40, ``70b`` 8192 / 28672 / 64 / 8 / 80.

The weights are drawn so that activations stay finite through every block in float16 (a scaled
initialisation: ``N(0, 1/in)`` for the projections into attention and the MLP, ``N(0, 1/(2·blocks·in))``
for the two projections back into the residual stream, whose sum then grows like a random walk of
bounded steps), and the two norms of every block carry ``--outliers`` channels scaled by
``--outlier-scale`` (the same channels in every block, as large language models have them), so the
inputs of q/k/v and gate/up have outlier channels for data-aware methods to work on. Each tensor is
drawn from its own generator, seeded by ``--seed`` and its name: the same options give the same bytes,
whatever the shard size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from pathlib import Path

import torch

SHAPES = {
    "7b": {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "layers": 32},
    "13b": {"hidden": 5120, "intermediate": 13824, "heads": 40, "kv_heads": 40, "layers": 40},
    "70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "layers": 80},
}


def tensor_plan(shape: dict, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, kind)`` of every tensor, in the order transformers' state dict lists them."""
    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    head_dim = h // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    plan = [("model.embed_tokens.weight", (vocab, h), "embedding")]
    for b in range(layers):
        p = f"model.layers.{b}."
        plan += [(p + "self_attn.q_proj.weight", (h, h), "in"), (p + "self_attn.k_proj.weight", (kv, h), "in"),
                 (p + "self_attn.v_proj.weight", (kv, h), "in"), (p + "self_attn.o_proj.weight", (h, h), "out"),
                 (p + "mlp.gate_proj.weight", (i, h), "in"), (p + "mlp.up_proj.weight", (i, h), "in"),
                 (p + "mlp.down_proj.weight", (h, i), "out"),
                 (p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
    plan += [("model.norm.weight", (h,), "final-norm"), ("lm_head.weight", (vocab, h), "head")]
    return plan


def draw(name: str, shape: tuple[int, ...], kind: str, layers: int, seed: int, outliers: torch.Tensor,
         outlier_scale: float) -> torch.Tensor:
    """One tensor, float16, from a generator of its own (seeded by ``seed`` and ``name``)."""
    g = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    if kind in ("norm", "final-norm"):
        w = torch.ones(shape)
        if kind == "norm":
            w[outliers] = outlier_scale
        return w.to(torch.float16)
    fan_in = shape[1]
    std = {"embedding": 1.0, "in": 1.0 / math.sqrt(fan_in), "out": 1.0 / math.sqrt(2 * layers * fan_in),
           "head": 1.0 / math.sqrt(fan_in)}[kind]
    out = torch.empty(shape, dtype=torch.float16)
    rows = max(1, (64 << 20) // (4 * fan_in))  # 64 MB of float32 at a time
    for start in range(0, shape[0], rows):
        part = torch.randn((min(rows, shape[0] - start), fan_in), generator=g)
        out[start:start + part.shape[0]] = (part * std).to(torch.float16)
    return out


def shards(plan, max_bytes: int) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Tensors grouped into shards in order, each at most ``max_bytes`` (a larger tensor alone)."""
    out: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[1]) * 2
        if out[-1] and size + nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(entry)
        size += nbytes
    return out


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    if spec != "default":
        return AutoTokenizer.from_pretrained(spec)
    from lqframe.models import resolve_model

    info = resolve_model("default")
    return AutoTokenizer.from_pretrained(info["path"], gguf_file=info["gguf_file"])


def write_model(out: Path, shape: dict, tokenizer, *, seed: int = 0, outliers: int = 8, outlier_scale: float = 20.0,
                max_shard_size_mb: float = 2000.0, log=lambda s: None) -> dict:
    """Write the model (see module doc); returns what ``synthetic.json`` records."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise SystemExit(f"hidden {shape['hidden']} must divide by heads {shape['heads']}, and heads by key-value "
                         f"heads {shape['kv_heads']}")
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer)
    plan = tensor_plan(shape, vocab)
    g = torch.Generator().manual_seed(seed)
    channels = torch.randperm(shape["hidden"], generator=g)[:outliers].sort().values
    groups = shards(plan, int(max_shard_size_mb * 2**20))
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map, total = {}, 0
    for k, (group, fname) in enumerate(zip(groups, names, strict=True)):
        tensors = {name: draw(name, dims, kind, shape["layers"], seed, channels, outlier_scale)
                   for name, dims, kind in group}
        tmp = out / f".{fname}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.numel() * 2 for t in tensors.values())
        log(f"  {fname}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()) * 2 / 2**30:.2f} GiB "
            f"({k + 1}/{len(groups)})")
        del tensors
    if len(groups) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float16"
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"shape": shape, "vocab": vocab, "seed": seed, "outlier_channels": channels.tolist(),
              "outlier_scale": outlier_scale, "parameters": sum(math.prod(d) for _, d, _ in plan),
              "bytes": total, "shards": len(groups)}
    (out / "synthetic.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=[*SHAPES, "custom"], default="7b")
    ap.add_argument("--layers", type=int, help="blocks (default: the shape's)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int, help="key-value heads (default: --heads)")
    ap.add_argument("--tokenizer", default="default", help="a tokenizer folder, or 'default' (the default model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outliers", type=int, default=8, help="outlier channels of the block norms")
    ap.add_argument("--outlier-scale", type=float, default=20.0)
    ap.add_argument("--max-shard-size-mb", type=float, default=2000.0)
    args = ap.parse_args(argv)
    if args.shape == "custom":
        missing = [f"--{k}" for k in ("hidden", "intermediate", "heads", "layers") if getattr(args, k) is None]
        if missing:
            ap.error(f"--shape custom needs {', '.join(missing)}")
        shape = {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                 "kv_heads": args.kv_heads or args.heads, "layers": args.layers}
    else:
        shape = dict(SHAPES[args.shape])
        for key in ("hidden", "intermediate", "heads", "kv_heads", "layers"):
            if getattr(args, key) is not None:
                shape[key] = getattr(args, key)
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"writing a random LLaMA ({shape}) to {args.out}", file=sys.stderr)
    record = write_model(args.out, shape, tokenizer, seed=args.seed, outliers=args.outliers,
                         outlier_scale=args.outlier_scale, max_shard_size_mb=args.max_shard_size_mb,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({k: record[k] for k in ("parameters", "bytes", "shards")}))


if __name__ == "__main__":
    main()
