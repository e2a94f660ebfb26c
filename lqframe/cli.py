"""The ``lqframe`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from lqframe.errors import LqframeError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    from lqframe.registry import BLOCK_ENV, option_defaults, registry

    reg = registry()
    if args.json:
        entries = []
        for info in reg.components():
            entry = info.as_dict()
            entry["options"] = {k: v for k, v in option_defaults(info.cls).items()}
            entries.append(entry)
        entries += [f.as_dict() for f in reg.failures]
        entries += [{"kind": "blocked", "name": name, "plugin": name, "distribution": None, "version": None}
                    for name in reg.blocked]
        print(json.dumps(entries, indent=2, default=str))
        return 0
    rows = [[i.kind, i.name, i.plugin, i.distribution or "-", i.version or "-"] for i in reg.components()]
    print(_table(rows, ["kind", "name", "plugin", "distribution", "version"]))
    if reg.failures:
        print("\nplugins that failed to load:")
        for f in reg.failures:
            print(f"  {f.plugin} ({f.distribution or 'no distribution'} {f.version or ''}) "
                  f"failed at {f.stage}: {f.error}".replace("  failed", " failed"))
    if reg.blocked:
        print(f"\nblocked by {BLOCK_ENV}: {', '.join(reg.blocked)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lqframe.recipe import load_recipe
    from lqframe.run import format_table, run

    sets = list(args.set or ())
    if args.source is not None:  # (a JSON string is a YAML scalar whatever the path holds)
        sets.insert(0, f"quantize_stage.from={json.dumps(args.source)}")
    recipe = load_recipe(args.recipe, sets)
    report = run(recipe, args.model, args.output, overwrite=args.overwrite, device=args.device,
                 offload=True if args.offload else None, stream=args.stream, activations=args.activations,
                 progress=not args.quiet)
    _leave_group()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: the first process reports
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in report.items()}, indent=2, default=str))
    else:
        print(format_table(report))
        if report.get("output"):
            print(f"saved to {report['output']}")
    return 0


def _eval_windows(data: list[str] | None, recipe_path, tokenizer, n_eval: int | None, seq_len: int | None):
    """Evaluation windows of ``--data`` (else the checkpoint recipe's evaluation sources), exactly
    the windows a run with that recipe evaluates."""
    from lqframe.data import make_data
    from lqframe.recipe import DataSpec, load_recipe

    spec, sources = DataSpec(), None
    if recipe_path is not None and recipe_path.is_file():
        recipe = load_recipe(recipe_path, check_components=False)
        spec, sources = recipe.data, recipe.evaluation_sources()
    sources = list(data or sources or [spec.source])
    return make_data(tokenizer, (), sources, seq_len or spec.seq_len, 0,
                     n_eval if n_eval is not None else spec.evaluation_windows, spec.seed)


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lqframe.evaluate import perplexity
    from lqframe.lqlinear import set_weight_cache

    target = Path(args.target)
    recipe_path = None
    checkpoint = target.is_dir() and (target / "config.json").is_file() and _is_lqframe_dir(target)
    if args.stream is not False:
        from lqframe.models import resolve_model
        from lqframe.streaming import should_stream

        if checkpoint:  # a damaged copy is a one-line error before anything reads it
            from lqframe.checkpoint import check_file_sizes

            check_file_sizes(target)
        info = {"kind": "dir", "path": str(target)} if checkpoint else resolve_model(args.target)
        if should_stream("true" if args.stream else "auto", info):
            return _eval_streamed(args, target, checkpoint)
    model, tokenizer = _load_target(args.target, checkpoint)
    if checkpoint:
        recipe_path = target / "recipe.yaml"
    from lqframe.executor import resolve_device

    data = _eval_windows(args.data, recipe_path, tokenizer, args.windows, args.seq_len)
    model.to(resolve_device(args.device))
    set_weight_cache(model, True)
    ppls = {source: perplexity(model, windows, progress=not args.json, desc=f"perplexity ({source})")
            for source, windows in data.evaluation.items()}
    return _print_eval(args, data, ppls)


def _eval_streamed(args: argparse.Namespace, target, checkpoint: bool) -> int:
    """``lqframe eval`` of a model folder or checkpoint larger than memory: blocks streamed from its
    shards (lqframe.streaming), every window through one block at a time."""
    import torch

    from lqframe.evaluate import perplexity_from
    from lqframe.executor import BlockExecutor, resolve_device
    from lqframe.streaming import ShardSource, load_streaming, streamed_nll

    loaded, reader = load_streaming(str(target))
    recipe_path = target / "recipe.yaml" if checkpoint else None
    data = _eval_windows(args.data, recipe_path, loaded.tokenizer, args.windows, args.seq_len)
    source = ShardSource(loaded.model, reader, torch.float32)
    executor = BlockExecutor(loaded.model, resolve_device(args.device), source=source, progress=not args.json)
    executor.place_model()
    ppls = {s: perplexity_from(*streamed_nll(executor, windows, progress=not args.json, desc=f"perplexity ({s})"))
            for s, windows in data.evaluation.items()}
    return _print_eval(args, data, ppls)


def _print_eval(args: argparse.Namespace, data, ppls: dict[str, float]) -> int:
    first = next(iter(ppls))
    n = len(data.evaluation[first])
    result = {"model": args.target, "data": first, "seq_len": data.seq_len, "windows": n, "ppl": ppls[first],
              "perplexity": ppls}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for source, ppl in ppls.items():
            print(f"{args.target}: perplexity {ppl:.4f} on {len(data.evaluation[source])} × {data.seq_len} tokens "
                  f"of {source}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lqframe.executor import resolve_device
    from lqframe.generate import agreement, generate

    target = Path(args.target)
    checkpoint = target.is_dir() and (target / "config.json").is_file() and _is_lqframe_dir(target)
    device = resolve_device(args.device)
    model, tokenizer = _load_target(args.target, checkpoint)
    float_spec = None
    if args.compare:
        from lqframe.checkpoint import _read_report

        float_spec = args.model or ((_read_report(target) or {}).get("model") if checkpoint else None)
        if float_spec is None:
            raise LqframeError(f"--compare needs the float model: {args.target} records none (no report.json); "
                               "pass --model")
    if tokenizer is None and float_spec is not None:
        from lqframe.models import load_model

        tokenizer = load_model(float_spec).tokenizer
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "seed": args.seed, "chat": args.chat, "device": device}

    def show(label: str):
        if args.json:
            return None
        print(f"--- {label}\n{args.prompt}", end="", flush=True)
        return lambda text: print(text, end="", flush=True)

    result = {"prompt": args.prompt, "model": args.target,
              "settings": {k: v for k, v in options.items() if k != "device"}}
    result["output"] = generate(model, tokenizer, args.prompt, on_text=show(args.target), **options)
    if not args.json:
        print(f"\n({len(result['output']['tokens'])} tokens, {result['output']['seconds']:.1f} s)")
    if float_spec is not None:
        from lqframe.models import load_model

        del model
        reference = load_model(float_spec)
        result["float_model"] = float_spec
        result["float_output"] = generate(reference.model, tokenizer, args.prompt,
                                          on_text=show(f"{float_spec} (float)"), **options)
        same = agreement(result["output"]["tokens"], result["float_output"]["tokens"])
        result["agree_tokens"] = same
        if not args.json:
            n = len(result["float_output"]["tokens"])
            print(f"\n({n} tokens, {result['float_output']['seconds']:.1f} s)")
            print(f"the compressed and float continuations agree on their first {same} of "
                  f"{max(n, len(result['output']['tokens']))} tokens")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _load_target(spec: str, checkpoint: bool):
    """``(model, tokenizer)`` of an lqframe checkpoint folder (``checkpoint``) or of any model spec."""
    if checkpoint:
        from lqframe.checkpoint import load_checkpoint, load_tokenizer
        from lqframe.hf import register_with_transformers

        register_with_transformers()  # explicitly, as lqframe.load does
        return load_checkpoint(spec), load_tokenizer(spec)
    from lqframe.models import load_model

    loaded = load_model(spec)
    return loaded.model, loaded.tokenizer


def _leave_group() -> None:
    """End the torch.distributed process group a torchrun run joined (all processes together)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _is_lqframe_dir(path) -> bool:
    from lqframe.checkpoint import read_quantization_config
    from lqframe.errors import CheckpointError

    try:
        read_quantization_config(path)
        return True
    except CheckpointError:
        return False


def cmd_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lqframe.checkpoint import inspect_checkpoint
    from lqframe.run import format_table

    if args.verify:
        return _verify(Path(args.dir), args.json)
    info = inspect_checkpoint(Path(args.dir))
    if args.plot:
        from lqframe.plot import plot_layers

        print(f"wrote {plot_layers(info, args.plot)}", file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_table(info))
    return 0


def _verify(path, as_json: bool) -> int:
    """``inspect --verify``: one line per recorded file as it is hashed (a large checkpoint takes
    minutes), or one JSON document; any failure ends in a one-line error and a non-zero exit."""
    from lqframe.checkpoint import verify_checkpoint
    from lqframe.errors import CheckpointError

    def show(e: dict) -> None:
        if e["status"] == "ok":
            line = f"ok        {e['name']} ({e['size']} bytes, sha256 {e['sha256'][:16]}…)"
        elif e["status"] == "missing":
            line = f"missing   {e['name']} (recorded {e['recorded_size']} bytes)"
        elif e["size"] != e["recorded_size"]:
            line = f"MISMATCH  {e['name']}: {e['size']} bytes, recorded {e['recorded_size']}"
        else:
            line = f"MISMATCH  {e['name']}: sha256 {e['sha256'][:16]}…, recorded {e['recorded_sha256'][:16]}…"
        print(line, flush=True)

    results = verify_checkpoint(path, on_file=None if as_json else show)
    bad = [e for e in results if e["status"] != "ok"]
    if as_json:
        print(json.dumps({"path": str(path), "ok": not bad, "files": results}, indent=2))
    if bad:
        names = ", ".join(str(path / e["name"]) for e in bad[:5]) + (", …" if len(bad) > 5 else "")
        raise CheckpointError(f"{path}: {len(bad)} of {len(results)} files fail verification ({names}): the "
                              "checkpoint is damaged; re-run or copy it again")
    if not as_json:
        print(f"{path}: all {len(results)} files match their recorded size and sha256")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lqframe.export import export

    result = export(args.dir, args.to, args.out, merge=args.merge, gptq_version=args.gptq_version,
                    base_model=args.base_model, check=not args.no_check,
                    log=lambda s: print(s, file=sys.stderr))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"wrote {args.to} export of {args.dir} to {args.out}")
    return 0


def _device(value: str) -> str:
    from lqframe.recipe import check_device

    try:
        return check_device(value)
    except Exception as exc:  # noqa: BLE001 - argparse turns this into a usage error
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from lqframe import __version__
    from lqframe.export import EXPORT_FORMATS
    from lqframe.recipe import ACTIVATION_MODES

    parser = argparse.ArgumentParser(
        prog="lqframe",
        description="Compress language models into packed low-bit weights plus low-rank terms (W ≈ Q + L·R).",
    )
    parser.add_argument("--version", action="version", version=f"lqframe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plugins", help="list registered components and plugins that failed to load")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("run", help="compress a model with a recipe, evaluate and save it (the main job)")
    p.add_argument("recipe", nargs="?",
                   help="recipe YAML file (default: the built-in GPTQ int4 + QERA-exact r32 recipe)")
    p.add_argument("--model", help="model folder, .gguf file, hub id, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--output", help="output folder (default: runs/<model name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set quantize_stage.quantizer.bits=3 (repeatable)")
    p.add_argument("--from", dest="source", metavar="QUANTIZED_DIR",
                   help="take Q from this GPTQ, compressed-tensors or bitsandbytes 4-bit checkpoint of --model "
                        "instead of quantizing (quantize_stage.from); the recipe's other stages correct it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", type=_device, help="compute device: auto (CUDA when present), cpu, cuda, cuda:N "
                                                   "(default: the recipe's device, auto)")
    p.add_argument("--offload", action="store_true",
                   help="keep the blocks and activations in CPU memory, one block on the device at a time")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the blocks from the model folder one at a time, never the whole model in memory "
                        "(default: the recipe's stream, auto: when the model would not fit)")
    p.add_argument("--activations", choices=ACTIVATION_MODES, default=None,
                   help="where the activations between blocks live (default: the recipe's activations, auto: "
                        "on the device, or in CPU memory with --offload; disk: one file per window)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="token perplexity of a saved checkpoint or a model")
    p.add_argument("target", metavar="DIR_OR_MODEL")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="data source (pydoc, news, wiki, text:PATH, jsonl:PATH:FIELD, hf:NAME[:CONFIG[:SPLIT]], "
                        "package:DIST:PATH); repeat it for several; default: the checkpoint recipe's evaluation "
                        "sources")
    p.add_argument("--windows", type=int, help="evaluation windows (default: the recipe's)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the recipe's)")
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the blocks one at a time from the folder's shards (default: when the model would "
                        "not fit in memory)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="text from a saved checkpoint or a model, streamed as it is produced")
    p.add_argument("target", metavar="DIR_OR_MODEL",
                   help="an lqframe checkpoint folder, or any model lqframe run takes")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling: the random seed (the same for both with --compare)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compare", action="store_true",
                   help="also generate with the float model (the checkpoint's source, or --model) and say where "
                        "the two part")
    p.add_argument("--model", help="the float model for --compare (default: the one the checkpoint's report names)")
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming the text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="per-layer formats, bits, ranks and errors of a saved checkpoint")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plot", metavar="FILE", help="also draw bits and rank per matrix to FILE (.png, .svg, .pdf; "
                      "needs matplotlib: pip install 'lqframe[plot]')")
    what.add_argument("--verify", action="store_true",
                      help="instead of the table, check every file's size and sha256 against the ones the "
                           "checkpoint recorded (reads every byte); exits non-zero if any differs or is missing")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a saved checkpoint as a PEFT LoRA adapter, a GPTQ or "
                                      "compressed-tensors checkpoint, or a dense float model")
    p.add_argument("dir", help="an lqframe checkpoint folder")
    p.add_argument("--to", required=True, choices=EXPORT_FORMATS,
                   help="peft: L·R as a LoRA adapter folder; gptq: Q as a GPTQ checkpoint (integer formats); "
                        "compressed-tensors: Q as llm-compressor's pack-quantized checkpoint (vLLM, transformers); "
                        "dense: a float checkpoint of Q (with --merge: Q + L·R)")
    p.add_argument("out", help="the folder to write (must be new or empty)")
    p.add_argument("--merge", action="store_true", help="dense: fold L·R into the weights")
    p.add_argument("--gptq-version", type=int, choices=(1, 2),
                   help="gptq: 1 the original format (zeros stored minus one), 2 gptq_v2 (default: 1 when every "
                        "zero point fits it)")
    p.add_argument("--base-model", help="peft: base_model_name_or_path to record (default: DIR)")
    p.add_argument("--no-check", action="store_true", help="skip the self-check that reads the export back")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except LqframeError as exc:
        rank = f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})" if "RANK" in os.environ else ""
        print(f"lqframe: error{rank}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # disk full, permissions, … : one line naming the file
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"lqframe: error: cannot read or write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lqframe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
