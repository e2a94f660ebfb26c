"""Mixture-of-experts experts and Conv1D as first-class linears (lqframe.structure): unfolding keeps
the model's function, folding gives back its own tensors, per-expert statistics come from exactly
the tokens the router sends (or from every token), seldom-routed experts fall back to the data-free
decomposition and say so, compressed experts run through the kernel entry point, and streamed and
multi-process runs write the resident one-process checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lqframe
from lqframe import structure
from lqframe.recipe import parse_recipe
from lqframe.run import _windows, run
from tests.model_matrix import BY_KEY
from tests.tiny import byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ["qwen3_moe", "mixtral", "gpt_oss", "gpt2"]


def _doc(**experts):
    doc = {"data": {"source": "pydoc", "seq_len": 32, "calibration_windows": 4, "evaluation_windows": 2},
           "quantize_stage": {"quantizer": {"name": "gptq", "bits": 4, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 4}},
           "evaluate_stage": {"float_baseline": True}, "save_stage": {}}
    if experts:
        doc["quantize_stage"]["experts"] = experts
    return doc


def _folder(tmp_path: Path, key: str) -> Path:
    folder = tmp_path / key
    BY_KEY[key].build().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("moe"), "qwen3_moe")


@pytest.mark.parametrize("key", LAYOUTS)
def test_unfolding_keeps_the_function_and_folding_gives_back_the_tensors(key):
    model = BY_KEY[key].build()
    for name, p in model.named_parameters():  # biases of the experts are zero at init: make them count
        if name.endswith("_bias"):
            torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    record = structure.unfold(model)
    kind = BY_KEY[key].layout
    assert set(record.values()) == {"conv1d" if kind == "Conv1D" else "experts"}
    assert not any(structure.experts_layout(m) or structure.is_conv1d(m) for m in model.modules())
    with torch.no_grad():
        after = model(input_ids=ids).logits
        with structure.routing_all(model, "all"):
            everyone = model(input_ids=ids).logits
    scale = float(before.abs().max())
    assert float((after - before).abs().max()) <= 1e-6 * scale  # (the order of the experts' sum may differ)
    assert float((everyone - after).abs().max()) <= 1e-6 * scale  # every expert computes, the routed ones count
    folded = structure.fold_state(model, dict(model.state_dict()))
    assert folded.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(folded[name], t), name
    assert structure.unfold(model) == record  # idempotent


def _router_counts(model, windows) -> list[torch.Tensor]:
    """Tokens per expert per layer as the float model's routers choose them (top-k indices)."""
    counts: list[torch.Tensor] = []
    routers = [m for m in model.modules() if "Router" in type(m).__name__]
    seen = {id(r): torch.zeros(r.num_experts, dtype=torch.long) for r in routers}

    def hook(module, args, out):
        seen[id(module)] += torch.bincount(out[2].flatten(), minlength=module.num_experts)

    handles = [r.register_forward_hook(hook) for r in routers]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    for h in handles:
        h.remove()
    counts = [seen[id(r)] for r in routers]
    return counts


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(moe_dir, tmp_path):
    recipe = parse_recipe(_doc(min_tokens=0), "<moe>")
    messages: list[str] = []
    report = run(recipe, str(moe_dir), tmp_path / "o", progress=False, log=messages.append)
    assert any("unfolded into linears: 2 fused experts modules" in m for m in messages)
    loaded = lqframe.models.load_model(str(moe_dir))
    windows = _windows(recipe, loaded.tokenizer)
    counts = _router_counts(loaded.model, windows.calibration)
    rows = {r["name"]: r for r in report["layers"]}
    n_tokens, top_k = windows.calibration.numel(), 2
    for layer in range(2):
        tokens = [rows[f"model.layers.{layer}.mlp.experts.{e}.gate_proj"]["info"]["tokens"] for e in range(4)]
        assert sum(tokens) == top_k * n_tokens  # every token reaches exactly k experts
        for e in range(4):
            for part in ("up_proj", "down_proj"):
                assert rows[f"model.layers.{layer}.mlp.experts.{e}.{part}"]["info"]["tokens"] == tokens[e]
        if layer == 0:  # block 0 sees the float model's own inputs: the float router's choice, token for token
            assert tokens == counts[0].tolist()
        assert len(set(tokens)) > 1  # (routing is not uniform: a wrong count cannot pass by symmetry)
    assert rows["model.layers.0.self_attn.q_proj"]["info"]["tokens"] == n_tokens
    assert report["data_free"] == {}
    # every expert of every block is in the checkpoint, packed
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    for layer in range(2):
        for e in range(4):
            for part in ("gate_proj", "up_proj", "down_proj"):
                prefix = f"model.layers.{layer}.mlp.experts.{e}.{part}."
                assert prefix + "qweight.codes" in keys and prefix + "left" in keys, prefix
                assert prefix + "weight" not in keys

    # experts.calibration: all — every expert's statistics cover every calibration token
    report_all = run(parse_recipe(_doc(calibration="all", min_tokens=0), "<moe>"), str(moe_dir), tmp_path / "a",
                     progress=False, log=lambda s: None)
    experts = [r for r in report_all["layers"] if ".experts." in r["name"]]
    assert experts and all(r["info"]["tokens"] == n_tokens for r in experts)
    # the outputs only take the routed experts: block 0's errors are measured on other inputs, the model is the
    # same function, so both runs' compressed models score close to each other
    assert report_all["fp_ppl"] == report["fp_ppl"]
    assert [r["info"]["tokens"] for r in experts] != [rows[r["name"]]["info"]["tokens"] for r in experts]


def test_seldom_routed_experts_fall_back_to_the_data_free_decomposition(moe_dir, tmp_path):
    recipe = parse_recipe(_doc(min_tokens="30%"), "<moe>")
    messages: list[str] = []
    report = run(recipe, str(moe_dir), tmp_path / "o", progress=False, log=messages.append)
    threshold = -(-30 * 4 * 32 // 100)  # 30 % of 128 tokens, rounded up
    rows = {r["name"]: r for r in report["layers"]}
    few = {n: r["info"]["tokens"] for n, r in rows.items() if r["info"].get("tokens", threshold) < threshold}
    assert few and report["data_free"] == few
    assert all(rows[n]["info"]["fallback"] == "data-free" for n in few)
    assert not any(r["info"].get("fallback") for n, r in rows.items() if n not in few)
    said = [m for m in messages if "decomposed data-free" in m]
    assert said and all(str(threshold) in m for m in said)
    assert sum(len([n for n in few if f"layers.{b}." in n]) for b in range(2)) == len(few)
    # the data-free decomposition: GPTQ without statistics is round-to-nearest, QERA-exact the SVD of the error
    model = lqframe.load(tmp_path / "o")
    float_model = lqframe.models.load_model(str(moe_dir)).model
    structure.unfold(float_model)
    rtn = lqframe.registry().create("quantizer", "rtn", bits=4, group_size=32)
    svd = lqframe.registry().create("reconstructor", "svd", rank=4)
    for name in few:
        w = float_model.get_submodule(name).weight.detach()
        layer = model.get_submodule(name)
        ref = svd.decompose(w, rtn, None)
        assert torch.equal(layer.dequantized_weight(), ref.qweight.dequantize()), name
        lr = (layer.left.float() @ layer.right.float())
        assert float((lr - ref.lowrank.left @ ref.lowrank.right).abs().max()) <= 2e-3 * float(lr.abs().max()), name
    # the table says it too
    from lqframe.run import format_table

    assert "decomposed data-free (too few calibration tokens)" in format_table(report)


def test_compressed_experts_run_through_the_kernel_entry_point(moe_dir, tmp_path, monkeypatch):
    run(parse_recipe(_doc(min_tokens=0), "<moe>"), str(moe_dir), tmp_path / "o", progress=False,
        log=lambda s: None)
    model = lqframe.load(tmp_path / "o")
    import lqframe.lqlinear as lqlinear

    names = {m: n for n, m in model.named_modules()}
    kernel_rows: list[int] = []
    layer_rows: dict[str, int] = {}
    real_kernel, real_forward = lqlinear.lq_linear_packed, lqlinear.LQLinear.forward

    def kernel(x, *args, **kwargs):
        kernel_rows.append(x.shape[0])
        return real_kernel(x, *args, **kwargs)

    def forward(self, x):
        layer_rows[names[self]] = layer_rows.get(names[self], 0) + x.reshape(-1, x.shape[-1]).shape[0]
        return real_forward(self, x)

    monkeypatch.setattr(lqlinear, "lq_linear_packed", kernel)
    monkeypatch.setattr(lqlinear.LQLinear, "forward", forward)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    routed = _router_counts(model, ids)  # (the routers stay float: the compressed model's own routing)
    layer_rows.clear()
    kernel_rows.clear()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(kernel_rows) == len(layer_rows)  # one packed kernel call per layer reached
    for b, counts in enumerate(routed):
        for e, n in enumerate(counts.tolist()):
            for part in ("gate_proj", "up_proj", "down_proj"):  # one call per routed expert, its tokens only
                assert layer_rows.get(f"model.layers.{b}.mlp.experts.{e}.{part}", 0) == n
        assert layer_rows[f"model.layers.{b}.self_attn.q_proj"] == 16


@pytest.mark.parametrize("key", ["qwen3_moe", "mixtral", "gpt_oss", "gpt2"])
def test_a_streamed_run_writes_the_resident_runs_checkpoint(tmp_path, key):
    """Experts stored one by one on disk under the unfolded names (Qwen) or under others, in renamed
    modules (Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2), fused (gpt-oss); Conv1D stored transposed (GPT-2)."""
    folder = _folder(tmp_path, key)
    files, reports = {}, {}
    for mode in (False, True):
        out = tmp_path / f"stream-{mode}"
        reports[mode] = run(parse_recipe(_doc(min_tokens=0), "<s>"), str(folder), out, stream=mode, progress=False,
                            log=lambda s: None)
        files[mode] = {p.name: p.read_bytes() for p in out.iterdir() if p.name.endswith(".safetensors")
                       or p.name == "config.json"}
    assert reports[True]["streamed"] and not reports[False]["streamed"]
    assert files[True] == files[False]
    assert reports[True]["ppl"] == reports[False]["ppl"]


def test_two_processes_write_the_one_process_checkpoint(moe_dir, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("no torch.distributed")
    (tmp_path / "r.yaml").write_text(json.dumps(_doc(min_tokens="30%")))
    outs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        cli = ["-m", "lqframe.cli", "run", str(tmp_path / "r.yaml"), "--model", str(moe_dir), "--output", str(out),
               "--quiet", "--json", "--device", "cpu"]
        cmd = [sys.executable, *cli] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *cli]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("RANK", None)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[processes] = (out, json.loads(res.stdout[res.stdout.index("{"):]))
    (one, r1), (two, r2) = outs[1], outs[2]
    assert r2["processes"] == 2
    assert r1["data_free"] and r2["data_free"] == r1["data_free"]  # the fallback decided on the merged counts
    for name in ("model.safetensors", "config.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_experts_recipe_options_are_checked():
    from lqframe.errors import RecipeError

    assert parse_recipe(_doc(), "<r>").quantize.experts.threshold(1000) == 5  # 0.5 % by default
    assert parse_recipe(_doc(min_tokens=7), "<r>").quantize.experts.threshold(10**6) == 7
    with pytest.raises(RecipeError, match=r"quantize_stage.experts.calibration: must be one of routed, all"):
        parse_recipe(_doc(calibration="every"), "<r>")
    with pytest.raises(RecipeError, match=r"quantize_stage.experts.min_tokens: must be a token count or a percentage"):
        parse_recipe(_doc(min_tokens="lots"), "<r>")
    with pytest.raises(RecipeError, match=r"quantize_stage.experts.routing: unknown key"):
        parse_recipe(_doc(routing="all"), "<r>")


def test_a_checkpoint_naming_a_module_the_model_lacks_is_refused(moe_dir, tmp_path):
    run(parse_recipe(_doc(min_tokens=0), "<moe>"), str(moe_dir), tmp_path / "o", progress=False, log=lambda s: None)
    cfg_path = tmp_path / "o" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["unfolded"]["model.layers.0.mlp.gate"] = "experts"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(lqframe.CheckpointError, match=r"unfolds 'model.layers.0.mlp.gate' as experts, and in the "
                                                      r"Qwen3MoeForCausalLM model it is a Qwen3MoeTopKRouter"):
        lqframe.load(tmp_path / "o")


SMALL = ["data.seq_len=32", "data.calibration_windows=4", "data.evaluation_windows=2", "data.calibration=[pydoc]",
         "evaluate_stage.data=[pydoc]", "reconstruct_stage.reconstructor.rank=4"]


def test_the_ilp_sees_every_expert_matrix(moe_dir, tmp_path):
    """LQ-LoRA weighted by the empirical Fisher (a gradient pass through the routed experts), the ILP over
    every matrix: each expert matrix is a column of the cost table with its own choice."""
    from lqframe.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "lqlora-ilp.yaml", [
        *SMALL, "allocate_stage.cache=false", "reconstruct_stage.reconstructor.iterations=2",
        "allocate_stage.grid.quantizer.group_size=[32]", "quantize_stage.quantizer.group_size=32"])
    report = run(recipe, str(moe_dir), tmp_path / "o", progress=False, log=lambda s: None)
    chosen = report["allocation"]["chosen"]
    experts = [n for n in chosen if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and len(chosen) == len(report["layers"]) == 32
    assert report["allocation"]["bits_per_param"] <= 2.75
    assert torch.isfinite(torch.tensor(report["ppl"]))
    model = lqframe.load(tmp_path / "o")
    for name in experts:
        assert model.get_submodule(name).quantized_weight().bits == next(
            r["bits"] for r in report["layers"] if r["name"] == name)


@pytest.mark.parametrize("processes", [1, 2])
def test_rilq_tunes_the_experts_factors(moe_dir, tmp_path, processes):
    """The tune stage trains every expert's L and R (the experts a step's tokens reach); under DDP an
    expert no window of a process reaches has no gradient there, and training matches one process."""
    if processes > 1 and not torch.distributed.is_available():
        pytest.skip("no torch.distributed")
    from safetensors.torch import load_file

    sets = [*SMALL, "tune_stage.windows=4", "tune_stage.validation_windows=2", "tune_stage.max_updates=2",
            "tune_stage.eval_every=1", "tune_stage.lr=0.001", "tune_stage.patience=0", "tune_stage.grad_accum=2",
            "quantize_stage.quantizer.group_size=32"]
    outs = {}
    for n in sorted({1, processes}):
        out = tmp_path / f"p{n}"
        cli = ["-m", "lqframe.cli", "run", str(ROOT / "recipes" / "gptq2-rilq64.yaml"), "--model", str(moe_dir),
               "--output", str(out), "--quiet", "--json", "--device", "cpu", *[a for s in sets for a in ("--set", s)]]
        cmd = [sys.executable, *cli] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *cli]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("RANK", None)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[n] = (load_file(out / "model.safetensors"), json.loads(res.stdout[res.stdout.index("{"):]))
    state, report = outs[1]
    assert report["tuning"]["updates"] == 2
    # the same run without its tune stage: the factors tuning started from
    import attrs

    from lqframe.recipe import load_recipe

    base = attrs.evolve(load_recipe(ROOT / "recipes" / "gptq2-rilq64.yaml", sets), tune=None)
    run(base, str(moe_dir), tmp_path / "untuned", progress=False, log=lambda s: None)
    before = load_file(tmp_path / "untuned" / "model.safetensors")
    factors = [k for k in state if ".experts." in k and k.endswith((".left", ".right"))]
    assert len(factors) == 2 * 4 * 3 * 2
    moved = [k for k in factors if not torch.equal(state[k], before[k])]
    assert len(moved) >= len(factors) // 2, (len(moved), len(factors))
    assert all(torch.equal(state[k], before[k]) for k in state if k.endswith(".codes"))  # Q frozen
    if processes > 1:
        got, many = outs[processes]
        for a, b in zip(report["tuning"]["history"], many["tuning"]["history"], strict=True):
            for key in ("train_loss", "validation_loss"):
                assert (a[key] is None and b[key] is None) or b[key] == pytest.approx(a[key], rel=1e-5)
        for k in state:
            if k.endswith((".left", ".right")):
                assert torch.allclose(got[k].float(), state[k].float(), rtol=1e-3, atol=1e-5 * state[k].abs().max())
            else:
                assert torch.equal(got[k], state[k]), k


@pytest.mark.parametrize("stream", [False, True])
def test_a_killed_moe_run_resumes_to_the_same_checkpoint(moe_dir, tmp_path, interrupt_after, stream):
    """The finished block's experts come back from the progress folder into the unfolded model."""
    recipe = parse_recipe(_doc(min_tokens="30%"), "<moe>")
    ref = run(recipe, str(moe_dir), tmp_path / "ref", stream=stream, progress=False, log=lambda s: None)
    out = tmp_path / "out"
    interrupt_after(1)  # killed right after block 0 was committed
    with pytest.raises(KeyboardInterrupt):
        run(recipe, str(moe_dir), out, stream=stream, progress=False, log=lambda s: None)
    interrupt_after(None)
    messages: list[str] = []
    report = run(recipe, str(moe_dir), out, stream=stream, progress=False, log=messages.append)
    assert any("resuming" in m for m in messages)
    assert report["ppl"] == ref["ppl"] and report["data_free"] == ref["data_free"]
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_lqframe_eval_streams_a_float_moe_model(moe_dir, capsys):
    """A float MoE folder streamed block by block (experts stored one by one on disk) scores what the
    resident model scores."""
    from lqframe.cli import main

    scores = []
    for stream in ("--stream", "--no-stream"):
        assert main(["eval", str(moe_dir), "--data", "pydoc", "--windows", "2", "--seq-len", "32", stream, "--json",
                     "--device", "cpu"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["ppl"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)
