"""The model matrix: tiny random models built from transformers' own configuration classes, one per
family users compress, each through a data-aware recipe, save, reload and export
(:func:`check_family`, run by tests/test_model_matrix.py). ``python -m tests.model_matrix`` runs the
same checks for every family and writes ``docs/models.md`` from what they measured."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"

_SMALL = {"vocab_size": 256}


@attrs.frozen
class Family:
    key: str
    name: str
    #: the transformers model class (its name) and the config class with its keyword arguments
    model_class: str
    config_class: str
    config: dict[str, Any]
    #: causal-lm, masked-lm
    task: str
    #: what the family stores its block linears as (nn.Linear, fused experts, Conv1D)
    layout: str = "Linear"
    note: str = ""
    #: what the family's recipe leaves float (``quantize_stage.ignore``)
    ignore: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> torch.nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**{**_SMALL, **self.config})
        model = getattr(transformers, self.model_class)(config).eval()
        with torch.no_grad():  # random models are flat: scale the matrices so that errors show
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                    p.mul_(2.0)
        return model


_ATTN = {"num_attention_heads": 4, "num_key_value_heads": 2}
_LLAMA = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, **_ATTN,
          "max_position_embeddings": 256, "tie_word_embeddings": False}

FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama", "LlamaForCausalLM", "LlamaConfig", _LLAMA, "causal-lm"),
    Family("mistral", "Mistral", "MistralForCausalLM", "MistralConfig", _LLAMA, "causal-lm"),
    Family("qwen2", "Qwen2", "Qwen2ForCausalLM", "Qwen2Config", _LLAMA, "causal-lm"),
    Family("qwen3", "Qwen3", "Qwen3ForCausalLM", "Qwen3Config", {**_LLAMA, "head_dim": 16}, "causal-lm"),
    Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
           {**_LLAMA, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
           "causal-lm", "fused experts"),
    Family("mixtral", "Mixtral", "MixtralForCausalLM", "MixtralConfig",
           {**_LLAMA, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
           "causal-lm", "fused experts"),
    Family("gpt_oss", "gpt-oss", "GptOssForCausalLM", "GptOssConfig",
           {**_LLAMA, "intermediate_size": 32, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
            "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16,
            "max_position_embeddings": 131072},
           "causal-lm", "fused experts",
           "experts transposed, gate/up interleaved, with biases"),
    Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
           {**_LLAMA, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 4,
            "num_experts_per_tok": 2}, "causal-lm", "fused experts",
           "a shared expert (nn.Linear) beside the routed ones; its 1-row gate left float, as llm-compressor's "
           "recipes do", ignore=("shared_expert_gate",)),
    Family("deepseek_v3", "DeepSeek-V3", "DeepseekV3ForCausalLM", "DeepseekV3Config",
           {**_LLAMA, "num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_intermediate_size": 32,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
            "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
            "num_key_value_heads": 4}, "causal-lm", "fused experts",
           "multi-head latent attention; the first block dense, grouped top-k routing"),
    Family("olmoe", "OLMoE", "OlmoeForCausalLM", "OlmoeConfig",
           {**_LLAMA, "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}, "causal-lm",
           "fused experts"),
    Family("gemma2", "Gemma 2", "Gemma2ForCausalLM", "Gemma2Config",
           {**_LLAMA, "head_dim": 16, "sliding_window": 16}, "causal-lm"),
    Family("gemma3", "Gemma 3 (text)", "Gemma3ForCausalLM", "Gemma3TextConfig",
           {**_LLAMA, "head_dim": 16, "sliding_window": 16}, "causal-lm"),
    Family("phi3", "Phi-3", "Phi3ForCausalLM", "Phi3Config",
           {**_LLAMA, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "causal-lm",
           note="fused qkv_proj and gate_up_proj linears"),
    Family("opt", "OPT", "OPTForCausalLM", "OPTConfig",
           {"hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "max_position_embeddings": 256, "pad_token_id": 1}, "causal-lm"),
    Family("gpt2", "GPT-2", "GPT2LMHeadModel", "GPT2Config",
           {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0},
           "causal-lm", "Conv1D"),
    Family("gpt_neox", "GPT-NeoX", "GPTNeoXForCausalLM", "GPTNeoXConfig",
           {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 256}, "causal-lm"),
    Family("falcon", "Falcon", "FalconForCausalLM", "FalconConfig",
           {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "new_decoder_architecture": True,
            "num_kv_heads": 2}, "causal-lm"),
    Family("bert", "BERT", "BertForMaskedLM", "BertConfig",
           {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 256}, "masked-lm"),
    Family("roberta", "RoBERTa", "RobertaForMaskedLM", "RobertaConfig",
           {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 260, "pad_token_id": 1}, "masked-lm"),
)

BY_KEY = {f.key: f for f in FAMILIES}


RECIPE = {
    "data": {"source": "pydoc", "seq_len": 32, "calibration_windows": 4, "evaluation_windows": 2, "seed": 0},
    "quantize_stage": {"quantizer": {"name": "gptq", "bits": 4, "group_size": 32}},
    "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 4}},
    "save_stage": {},
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def check_family(family: Family, work: Path) -> dict[str, Any]:
    """Run the family through the whole cycle (module doc); every check asserts. Returns the record
    docs/models.md shows."""
    import transformers

    import lqframe
    from lqframe.evaluate import perplexity
    from lqframe.export import export
    from lqframe.models import find_blocks, load_model
    from lqframe.recipe import parse_recipe
    from lqframe.run import _windows, run
    from tests.tiny import byte_tokenizer

    source, out = work / "model", work / "out"
    model = family.build()
    model.save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    doc = dict(RECIPE)
    if family.ignore:
        doc["quantize_stage"] = {**doc["quantize_stage"], "ignore": list(family.ignore)}
    if family.task == "causal-lm":
        doc["evaluate_stage"] = {"float_baseline": True}
    recipe = parse_recipe(doc, f"<matrix {family.key}>")
    report = run(recipe, str(source), out, progress=False, log=lambda s: None)

    # every matrix of the blocks is compressed (3-D experts and Conv1D included), the routers excepted
    # (tiny, and kept in float by every MoE quantizer: they decide where each token goes)
    _, blocks = find_blocks(model)
    routers = {id(p) for m in blocks.modules() if "Router" in type(m).__name__ for p in m.parameters()}
    matrices = sum(p.numel() for n, p in blocks.named_parameters()
                   if p.dim() >= 2 and id(p) not in routers and not n.endswith("bias")
                   and not any(pattern in n for pattern in family.ignore))
    cov = report["coverage"]
    assert cov["targeted_params"] == matrices == report["params"], (family.key, cov["targeted_params"], matrices)
    if family.layout != "Linear":
        assert set(report["data_free"]) <= {r["name"] for r in report["layers"]}

    # the checkpoint = the model compressed in memory by the same recipe on the same windows
    loaded = load_model(str(source))
    windows = _windows(recipe, loaded.tokenizer)
    lqframe.compress(loaded.model, recipe, windows.calibration, progress=False)
    in_memory = loaded.model
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    reloaded = lqframe.load(out)
    mine, reference = _outputs(reloaded, ids), _outputs(in_memory, ids)
    load_diff = _rel(mine, reference)
    assert load_diff <= 1e-6, (family.key, load_diff)
    cls = getattr(transformers, family.model_class)
    auto = {"causal-lm": transformers.AutoModelForCausalLM, "masked-lm": transformers.AutoModelForMaskedLM}
    theirs = auto[family.task].from_pretrained(out).eval()
    assert type(theirs) is cls
    assert torch.equal(_outputs(theirs, ids), mine), family.key
    if family.task == "causal-lm":
        ev = next(iter(windows.evaluation.values()))
        assert perplexity(reloaded, ev, progress=False) == report["ppl"]

    # exports: the dense base read by transformers in the model's own layout; the adapter by PEFT
    dense = work / "dense"
    export(out, "dense", dense, merge=True)
    float_cls = cls.from_pretrained(dense).eval()
    for module in float_cls.modules():
        assert "LQ" not in type(module).__name__
    dense_diff = _rel(_outputs(float_cls, ids), mine)
    assert dense_diff <= 1e-4, (family.key, dense_diff)
    gptq = export(out, "gptq", work / "gptq")  # Q packed as GPTQ, read back by the self-check
    assert gptq["check"]["layers"] == len(report["layers"])
    peft_result: Any
    try:
        export(out, "peft", work / "peft")
        peft_result = True
    except lqframe.CheckpointError as exc:
        assert family.layout == "fused experts" and "PEFT adapter targets modules" in str(exc), exc
        peft_result = "no (per-expert terms)"
    if peft_result is True:
        from peft import PeftModel

        base_dir = work / "base"
        export(out, "dense", base_dir)
        base = cls.from_pretrained(base_dir).eval()
        tuned = PeftModel.from_pretrained(base, str(work / "peft")).eval()
        peft_diff = _rel(_outputs(tuned, ids), mine)
        assert peft_diff <= 1e-4, (family.key, peft_diff)
    return {"layers": report["layers"] if isinstance(report["layers"], int) else len(report["layers"]),
            "compressed_fraction": cov["targeted_params"] / cov["block_params"],
            "load_matches": True, "load_rel_diff": load_diff, "from_pretrained_matches": True,
            "dense_export": True, "dense_rel_diff": dense_diff, "gptq_export": True, "peft": peft_result,
            "ppl": report.get("ppl"), "fp_ppl": report.get("fp_ppl"),
            "data_free_layers": len(report["data_free"])}


def render(records: dict[str, Any], versions: dict[str, str]) -> str:
    """docs/models.md from the records."""
    yes = lambda v: "yes" if v else "—"  # noqa: E731
    lines = [
        "# Supported models",
        "",
        "<!-- generated by `python -m tests.model_matrix` (the checks of tests/test_model_matrix.py); "
        "do not edit by hand -->",
        "",
        "Every family below is tested end to end (`tests/test_model_matrix.py`) on a tiny random model built "
        "from transformers' own configuration class: a data-aware recipe (GPTQ int4 g32 + QERA-exact rank 4, "
        "calibrated on pydoc windows) through `lqframe run`, the checkpoint reloaded with `lqframe.load` and "
        "with transformers' `from_pretrained`, its outputs compared with the model compressed in memory, and "
        "the exports the format allows loaded back by the tools that read them (the dense checkpoint by "
        "transformers as the model's own class, the adapter by PEFT on that base; the GPTQ checkpoint is "
        "unpacked by lqframe's independent reader, as no GPTQ kernel runs here). Measured with "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "| family | class | block layout | compressed / block params | lqframe.load = in memory | "
        "from_pretrained = lqframe.load | dense export (transformers) | GPTQ export (self-check) | "
        "PEFT adapter (PEFT) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        r = records.get(f.key)
        if r is None:
            continue
        peft = r.get("peft")
        peft_cell = "yes" if peft is True else (peft or "—")
        lines.append(
            f"| {f.name} | `{f.model_class}` | {f.layout} | {r['compressed_fraction']:.1%} "
            f"({r['layers']} layers) | {yes(r['load_matches'])} (max rel. diff {r['load_rel_diff']:.0e}) | "
            f"{yes(r['from_pretrained_matches'])} | {yes(r['dense_export'])} | {yes(r['gptq_export'])} | "
            f"{peft_cell} | {f.note or ''} |")
    lines += [
        "",
        "Block layouts: **Linear** — the block's projections are `nn.Linear`; **fused experts** — a "
        "mixture-of-experts module of transformers 5 whose experts are 3-D parameters, unfolded by lqframe "
        "into one linear per expert matrix (`experts.{e}.gate_proj/up_proj/down_proj`), each compressed with "
        "its own statistics from the tokens the router sends it (`quantize_stage.experts`, docs/recipes.md); "
        "**Conv1D** — GPT-2-style layers with the weight stored transposed, compressed as the linear they are.",
        "",
        "Streamed runs (`--stream`) write the resident run's checkpoint byte for byte for Llama-shaped models "
        "(tests/test_streaming.py), Qwen3-MoE (experts stored one by one), Mixtral (experts under transformers' "
        "on-disk names `block_sparse_moe.experts.{e}.w1/w3/w2`), gpt-oss (fused experts on disk) and GPT-2 "
        "(Conv1D stored transposed) (tests/test_experts.py); so do `torchrun` runs for Llama-shaped models "
        "(tests/test_distributed.py) and Qwen3-MoE, whose RILQ tuning under DDP also matches one process.",
        "",
        "Not covered: expert modules transformers does not mark with `use_experts_implementation` (Llama 4's "
        "dense-routed experts, DBRX, JetMoE) stay float, and the run's coverage warning names them; a PEFT "
        "adapter cannot hold per-expert low-rank terms (transformers has no module per expert to attach them "
        "to): export those models dense (`--merge`) or load the checkpoint itself.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    import transformers

    import lqframe

    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = {}
    for family in FAMILIES:
        with tempfile.TemporaryDirectory() as work:
            records[family.key] = check_family(family, Path(work))
        print(f"{family.name}: {records[family.key]}", file=sys.stderr)
    versions = {"lqframe": lqframe.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    DOC.write_text(render(records, versions), encoding="utf-8")
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
