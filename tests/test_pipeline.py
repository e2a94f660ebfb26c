"""The main job on tiny real models: compress, evaluate, save, load back, resume, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lqframe
from lqframe import testing
from lqframe.executor import KeepFloat64
from lqframe.lqlinear import LQLinear, set_weight_cache
from lqframe.models import find_blocks
from lqframe.recipe import load_recipe
from lqframe.run import run
from tests.tiny import tiny_llama_dir

#: the recipe these tests start from (not the built-in default, which may change with measurements)
BASE = Path(__file__).resolve().parent.parent / "recipes" / "nf4-svd32.yaml"
SMALL = ["data.seq_len=64", "data.calibration_windows=4", "data.evaluation_windows=3",
         "quantize_stage.quantizer.group_size=32", "reconstruct_stage.reconstructor.rank=8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model", layers=3)


def small_recipe(*extra):
    return load_recipe(BASE, [*SMALL, *extra])


def _tensors(path):
    with safe_open(path, framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


#: float32 unit roundoff
U32 = torch.finfo(torch.float32).eps / 2


def _float_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _run_windows(out, report):
    """The run's calibration and evaluation windows (one source), cut again from its recipe.yaml and
    checked against the window positions report.json records."""
    from lqframe.checkpoint import load_tokenizer
    from lqframe.data import make_windows

    d = load_recipe(out / "recipe.yaml").data
    w = make_windows(load_tokenizer(out), d.source, d.seq_len, d.calibration_windows, d.evaluation_windows, d.seed)
    recorded = report["data"]
    assert [c["windows"] for c in recorded["calibration"]] == ([list(w.calibration_index)] if len(w.calibration)
                                                               else [])
    assert [e["windows"] for e in recorded["evaluation"]] == [list(w.evaluation_index)]
    return w


def _layer_inputs(float_model, compressed, windows, mode):
    """Every compressed linear's calibration inputs X (float64, tokens × in_features) by layer name,
    from float64 forwards of the float model and of the saved checkpoint (as the engine calibrates:
    quantize_stage.precision float64). ``mode``: ``block`` — block k's float linears fed by the
    compressed blocks 0..k−1 (quantize_stage.sequential: block); ``layer`` — the compressed model's own
    linears, each input group seeing the groups before it compressed (sequential: layer); ``float`` —
    the float model's (an allocation that reuses the cost table's decompositions)."""
    f64, c64 = copy.deepcopy(float_model).double(), copy.deepcopy(compressed).double()
    names = [n for n, m in compressed.named_modules() if isinstance(m, LQLinear)]
    xs: dict[str, list[torch.Tensor]] = {}

    def keep(m, args, name):
        xs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    hooked = c64 if mode == "layer" else f64
    hooks = [hooked.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: keep(m, a, n)) for n in names]
    runner = f64 if mode == "float" else c64
    if mode == "block":
        _, float_blocks = find_blocks(f64)
        _, blocks = find_blocks(c64)
        hooks += [b.register_forward_pre_hook(lambda m, a, kw, k=k: (float_blocks[k](*a, **kw), None)[1],
                                              with_kwargs=True) for k, b in enumerate(blocks)]
    try:
        with torch.inference_mode(), KeepFloat64():
            for w in windows:
                runner(input_ids=w[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert set(xs) == set(names) and all(len(v) == len(windows) for v in xs.values())
    return {n: torch.cat(v) for n, v in xs.items()}


def _rel_output_error(x, w, approx):
    """``‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖`` in float64 (the report's rel_output_error, lqframe.pipeline.layer_errors and
    docs/recipes.md), and a bound on the relative difference of a computation of it from float32
    operands, as the engine's are (the token sample, W − Ŵ and Ŵ = Q + L·R in float32): rounding
    X, D = W − Ŵ and Ŵ (u each) and float32 dot products of length m (γ_m ≈ m·u) move each entry of
    XDᵀ by at most (m + 2)·u·(|X||D|ᵀ + |X||Ŵ|ᵀ) and of XWᵀ by (m + 2)·u·|X||W|ᵀ (Higham, Accuracy and
    Stability of Numerical Algorithms, §3.5); the ratio moves by at most the sum of the two."""
    d = w - approx
    num, den = float((x @ d.T).norm()), float((x @ w.T).norm())
    ax = x.abs()
    gamma = (x.shape[1] + 2) * U32
    bound = gamma * (float((ax @ d.abs().T).norm() + (ax @ approx.abs().T).norm()) / num
                     + float((ax @ w.abs().T).norm()) / den)
    return num / den, bound


def _check_output_errors(layers, model_dir, out, windows, mode="block"):
    """Each reported rel_output_error is the layer's relative output error recomputed from its inputs
    (:func:`_layer_inputs`), the float weights and the saved checkpoint's Q + L·R, within float32
    rounding; and L·R lowers it below that of Q alone, itself below 1 (the error of Ŵ = 0). Returns
    per layer ``(X, W, Q, error)`` (float64)."""
    float_model, compressed = _float_model(model_dir), lqframe.load(out)
    xs = _layer_inputs(float_model, compressed, windows.calibration, mode)
    assert sorted(r["name"] for r in layers) == sorted(xs)
    found = {}
    for r in layers:
        name, x = r["name"], xs[r["name"]]
        w = float_model.get_submodule(name).weight.detach().double()
        module = compressed.get_submodule(name)
        q = module.dequantized_weight().double()
        err, bound = _rel_output_error(x, w, module.dense_weight().double())
        assert r["rel_output_error"] == pytest.approx(err, rel=bound, abs=0), (name, bound)
        q_err, _ = _rel_output_error(x, w, q)
        assert err < q_err < 1, name
        found[name] = (x, w, q, err)
    return found


def _stored_bits_per_param(out, report):
    """Bits per parameter of the compressed layers' Q as the checkpoint stores it: every byte of their
    ``qweight`` tensors but a codebook (a format constant: QuantizedWeight.storage_bits), over the
    weights' sizes in config.json."""
    state = _tensors(out / "model.safetensors")
    shapes = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert sorted(shapes) == sorted(r["name"] for r in report["layers"])
    bits = sum(t.numel() * t.element_size() * 8 for k, t in state.items()
               if k.rpartition(".qweight.")[0] in shapes and not k.endswith(".codebook"))
    return bits / sum(c["in_features"] * c["out_features"] for c in shapes.values())


def _check_perplexity(report, model_dir, out, windows):
    """The reported ppl is the saved checkpoint's, loaded back, on the run's evaluation windows, and the
    reported fp_ppl (when there is one) the float model's: evaluated on the run's device as ``lqframe
    eval`` evaluates (the same float32 operations on the same tensors), they are equal; and the
    compression shows (a no-op, or an evaluation of the float model, gives fp_ppl). No upper bound: on
    the tiny random model perplexity does not grow with the compression error (zeroing every compressed
    linear scores 285.0, below nf4 + svd's 287.5; a random perturbation of the same size scores below
    the float model), so the per-layer output errors (:func:`_check_output_errors`) are what a random
    compression fails."""
    from lqframe.evaluate import perplexity

    device = report["versions"]["device"].split()[0]

    def ppl(model):
        model.to(device)
        set_weight_cache(model, True)
        return perplexity(model, windows.evaluation, progress=False)

    compressed, fp = ppl(lqframe.load(out)), ppl(_float_model(model_dir))
    assert report["ppl"] == compressed
    assert report["fp_ppl"] in (None, fp)
    assert fp < compressed


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    report = run(small_recipe(), str(model_dir), out, progress=False)
    return out, report


def test_report_schema_and_figures(finished, model_dir):
    out, report = finished
    on_disk = json.loads((out / "report.json").read_text())
    for key in ("model", "recipe", "fp_ppl", "ppl", "avg_bits", "avg_bits_with_lowrank", "seconds", "peak_rss_mb",
                "layers"):
        assert key in on_disk
    assert len(on_disk["layers"]) == 3 * 7
    layer = on_disk["layers"][0]
    for key in ("name", "quantizer", "reconstructor", "bits", "group_size", "rank", "storage_bits",
                "rel_weight_error", "rel_output_error", "seconds"):
        assert key in layer
    assert layer["bits"] == 4 and layer["group_size"] == 32 and layer["rank"] == 8
    windows = _run_windows(out, on_disk)
    _check_output_errors(on_disk["layers"], model_dir, out, windows)
    assert on_disk["avg_bits"] == pytest.approx(4 + 16 / 32)  # NF4, one float16 scale per 32
    assert on_disk["avg_bits_with_lowrank"] > on_disk["avg_bits"]
    assert on_disk["peak_rss_mb"] > 100
    assert (on_disk["ppl"], on_disk["fp_ppl"]) == (report["ppl"], report["fp_ppl"])
    _check_perplexity(report, model_dir, out, windows)
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / ".lqframe-partial").exists()


def test_checkpoint_holds_packed_codes(finished):
    out, _ = finished
    state = _tensors(out / "model.safetensors")
    codes = state["model.layers.0.mlp.up_proj.qweight.codes"]
    assert codes.dtype == torch.uint8 and codes.numel() == 160 * 64 * 4 // 8
    assert state["model.layers.0.mlp.up_proj.left"].dtype == torch.float16
    assert "model.layers.0.mlp.up_proj.weight" not in state
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "lqframe"
    assert len(cfg["quantization_config"]["layers"]) == 21


def test_load_back_gives_the_reported_perplexity(finished):
    from lqframe.data import make_windows
    from lqframe.evaluate import perplexity

    out, report = finished
    model = lqframe.load(out)
    assert isinstance(model.model.layers[1].self_attn.k_proj, LQLinear)
    from lqframe.checkpoint import load_tokenizer

    recipe = load_recipe(out / "recipe.yaml")
    d = recipe.data
    windows = make_windows(load_tokenizer(out), d.source, d.seq_len, 0, d.evaluation_windows, d.seed)
    ppl = perplexity(model, windows.evaluation, progress=False)
    assert ppl == pytest.approx(report["ppl"], rel=1e-4)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[0].mlp.down_proj, LQLinear)
    assert perplexity(hf, windows.evaluation, progress=False) == pytest.approx(report["ppl"], rel=1e-4)


def test_cli_eval_and_inspect(finished):
    out, report = finished
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "eval", str(out), "--json"], capture_output=True,
                         text=True, check=True)
    assert json.loads(res.stdout)["ppl"] == pytest.approx(report["ppl"], rel=1e-4)
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "inspect", str(out), "--json"], capture_output=True,
                         text=True, check=True)
    info = json.loads(res.stdout)
    assert len(info["layers"]) == 21 and info["avg_bits"] == pytest.approx(report["avg_bits"])
    assert info["layers"][0]["format"] == "nf4" and info["layers"][0]["rank"] == 8
    text = subprocess.run([sys.executable, "-m", "lqframe.cli", "inspect", str(out)], capture_output=True,
                          text=True, check=True).stdout
    assert "model.layers.2.mlp.down_proj" in text and "total: 21 layers" in text


def test_existing_output_is_not_overwritten(finished, model_dir):
    out, _ = finished
    with pytest.raises(lqframe.LqframeError, match="finished checkpoint.*--overwrite"):
        run(small_recipe(), str(model_dir), out, progress=False)


def test_overwrite_refuses_foreign_files(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(lqframe.LqframeError, match="other files"):
        run(small_recipe(), str(model_dir), out, progress=False)
    with pytest.raises(lqframe.LqframeError, match="did not write.*notes.txt"):
        run(small_recipe(), str(model_dir), out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_after_interruption_gives_the_same_checkpoint(model_dir, tmp_path, finished, interrupt_after):
    out = tmp_path / "out"
    interrupt_after(1)  # killed right after block 0 was committed
    with pytest.raises(KeyboardInterrupt):
        run(small_recipe(), str(model_dir), out, progress=False)
    assert not (out / "report.json").exists() and not (out / "model.safetensors").exists()
    progress = json.loads((out / ".lqframe-partial" / "progress.json").read_text())
    assert progress["finished_block"] == 0
    interrupt_after(None)

    messages = []
    report = run(small_recipe(), str(model_dir), out, progress=False, log=messages.append)
    assert any("resuming" in m for m in messages)
    ref_out, ref_report = finished
    assert report["ppl"] == ref_report["ppl"] and report["fp_ppl"] == ref_report["fp_ppl"]
    a, b = _tensors(out / "model.safetensors"), _tensors(ref_out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overrides_and_ignore(model_dir, tmp_path):
    recipe = small_recipe()
    import yaml

    doc = yaml.safe_load(recipe.to_yaml())
    doc["quantize_stage"]["ignore"] = ["re:layers\\.2\\."]
    doc["quantize_stage"]["overrides"] = [{"targets": ["re:.*down_proj$"], "quantizer": {"name": "rtn", "bits": 8}}]
    doc.pop("save_stage")
    from lqframe.recipe import parse_recipe

    report = run(parse_recipe(doc), str(model_dir), tmp_path / "o", progress=False)
    names = {r["name"]: r for r in report["layers"]}
    assert len(names) == 14 and not any(".layers.2." in n for n in names)
    assert names["model.layers.0.mlp.down_proj"]["quantizer"] == "rtn"
    assert names["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert not (tmp_path / "o" / "report.json").exists()  # no save_stage, nothing saved


def test_pattern_that_matches_nothing(model_dir, tmp_path):
    recipe = small_recipe("quantize_stage.targets=[re:.*attn_out$]")
    with pytest.raises(lqframe.RecipeError, match="matches no linear layer"):
        run(recipe, str(model_dir), tmp_path / "o", progress=False)


def test_nan_weight_is_a_one_line_error_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tiny_llama_dir(tmp_path / "m", layers=2)
    state = load_file(d / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "run", str(BASE), "--model", str(d), "--output",
                          str(tmp_path / "o"), "--quiet", *sum((["--set", s] for s in SMALL), [])],
                         capture_output=True, text=True)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("lqframe: error:") and "model.layers.1.mlp.up_proj" in err and "NaN" in err
    assert not (tmp_path / "o" / "model.safetensors").exists() and not (tmp_path / "o" / "report.json").exists()


def test_data_free_run_and_allocation(model_dir, tmp_path):
    allocate = "allocate_stage={allocator: uniform, budget_bits: 3.6, candidates: [{bits: 4}, {bits: 3}]}"
    recipe = load_recipe(BASE, [*SMALL, "data.calibration_windows=0", allocate])
    report = run(recipe, str(model_dir), tmp_path / "o", progress=False)
    assert all(r["rel_output_error"] is None for r in report["layers"])
    assert {r["bits"] for r in report["layers"]} == {3}
    assert _stored_bits_per_param(tmp_path / "o", report) == report["avg_bits"] <= 3.6


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/nonexistent/model"], "no model at /nonexistent/model"),
        (["--set", "data.source=text:/nonexistent.txt"], "nonexistent.txt"),
        (["--set", "quantize_stage.quantizer.bits=11"], "quantize_stage.quantizer"),
        (["--set", "reconstruct_stage.reconstructor.rank=-1"], "reconstruct_stage.reconstructor"),
    ],
)
def test_cli_bad_input(model_dir, tmp_path, args, needle):
    cmd = [sys.executable, "-m", "lqframe.cli", "run", str(BASE), "--model", str(model_dir),
           "--output", str(tmp_path / "o"),
           "--quiet", *sum((["--set", s] for s in SMALL), []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lqframe: error:") and needle in last
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_empty_data_file(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "run", str(BASE), "--model", str(model_dir), "--output",
                          str(tmp_path / "o"), "--quiet", *sum((["--set", s] for s in SMALL), []),
                          "--set", f"data.source=text:{empty}"], capture_output=True, text=True)
    assert res.returncode != 0 and "empty" in res.stderr


@testing.parametrize_devices()
def test_python_compress_api(model_dir, device):
    from lqframe.models import load_model

    loaded = load_model(str(model_dir))
    results = lqframe.compress(loaded.model, small_recipe(), None, device=device, progress=False)
    assert len(results) == 21
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LQLinear) and q_proj.left.device.type == device


def test_resume_refuses_changed_data(model_dir, tmp_path, monkeypatch):
    from lqframe import run as run_mod

    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    recipe = small_recipe(f"data.source=text:{text}")
    original = run_mod.CheckpointSink.write

    def crash(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod.CheckpointSink, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, str(model_dir), tmp_path / "o", progress=False)
    monkeypatch.setattr(run_mod.CheckpointSink, "write", original)
    text.write_text("Pack my box with five dozen liquor jugs. " * 200)
    with pytest.raises(lqframe.LqframeError, match="other data windows"):
        run(recipe, str(model_dir), tmp_path / "o", progress=False)


def test_sharded_checkpoint_loads_back(model_dir, tmp_path):
    from lqframe.checkpoint import save_checkpoint
    from lqframe.models import load_model

    loaded = load_model(str(model_dir))
    lqframe.compress(loaded.model, small_recipe(), None, progress=False)
    files = save_checkpoint(loaded.model, tmp_path / "ck", max_shard_size_mb=0.05)
    shards = [f for f in files if f.name.startswith("model-")]
    assert len(shards) > 1 and (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    back = lqframe.load(tmp_path / "ck")
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, loaded.model(x).logits, rtol=1e-5, atol=1e-5)


def test_full_disk_is_a_one_line_error_and_leaves_no_checkpoint(model_dir, tmp_path):
    script = (
        "import errno, sys\n"
        "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device', str(a[0]))\n"
        "import lqframe.checkpoint as ck; ck.write_shard = full\n"  # every safetensors file lqframe writes
        "from lqframe.cli import main\n"
        f"sys.exit(main(['run', '--model', {str(model_dir)!r}, '--output', {str(tmp_path / 'o')!r}, '--quiet', "
        + ", ".join(f"'--set', {s!r}" for s in SMALL) + "]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lqframe: error:") and "No space left on device" in last
    left = {p.name for p in (tmp_path / "o").iterdir()}
    assert not left & {"model.safetensors", "config.json", "report.json", "recipe.yaml"}, left


def test_encoder_model_compresses_and_saves(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from tests.tiny import byte_tokenizer

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    d = tmp_path / "bert"
    BertForMaskedLM(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    doc = ["data.seq_len=32", "data.calibration_windows=2", "data.evaluation_windows=0",
           "quantize_stage.quantizer.group_size=16", "reconstruct_stage.reconstructor.rank=4"]
    import yaml

    from lqframe.recipe import parse_recipe

    raw = yaml.safe_load(load_recipe(BASE, doc).to_yaml())
    with pytest.raises(lqframe.RecipeError, match="causal LM"):
        run(parse_recipe(raw), str(d), tmp_path / "o1", progress=False)
    raw.pop("evaluate_stage")
    report = run(parse_recipe(raw), str(d), tmp_path / "o2", progress=False)
    assert len(report["layers"]) == 2 * 6  # query, key, value, attention out, intermediate, output
    assert all(r["rel_output_error"] is not None for r in report["layers"])
    back = lqframe.load(tmp_path / "o2")
    assert type(back).__name__ == "BertForMaskedLM"
    assert sum(isinstance(m, LQLinear) for m in back.modules()) == 12


def test_one_run_per_output_folder(model_dir, tmp_path, finished):
    out = tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lqframe-lock").write_text(str(sleeper.pid))
        with pytest.raises(lqframe.LqframeError, match=f"another lqframe run \\(pid {sleeper.pid}\\)"):
            run(small_recipe(), str(model_dir), out, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    # a stale lock (its process is gone) is taken over
    report = run(small_recipe("evaluate_stage.float_baseline=false"), str(model_dir), out, progress=False)
    assert not (out / ".lqframe-lock").exists()
    assert report["ppl"] == finished[1]["ppl"] and report["fp_ppl"] is None  # the same run, without the baseline


def test_linears_reading_the_same_input_share_statistics(model_dir):
    from lqframe.data import make_windows
    from lqframe.executor import BlockExecutor
    from lqframe.models import load_model

    loaded = load_model(str(model_dir))
    windows = make_windows(loaded.tokenizer, "pydoc", 64, 2, 0, 0)
    ex = BlockExecutor(loaded.model, "cpu", progress=False)
    inputs = ex.first_inputs(windows.calibration)
    names = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    with ex.block(0) as block:
        groups = ex.input_groups(block, names, inputs[0])
    short = [[n.rsplit(".", 1)[1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


@pytest.mark.parametrize("reuse", [False, True])
def test_data_aware_allocation_runs_after_calibration(model_dir, tmp_path, reuse):
    """gptq + qera-exact candidates at two bit widths (and two ranks): statistics are captured before
    the cost table, bits come from storage_bits + lowrank_bits, and each chosen configuration is
    compressed again on the compressed model's inputs (with ``reuse``: the cost table's
    decomposition is kept, not computed twice)."""
    from lqframe import pipeline

    calls = {"n": 0}
    original = pipeline.components

    def counting(q, r):
        quantizer, recon = original(q, r)
        real = recon.decompose

        def decompose(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        object.__setattr__(recon, "decompose", decompose)
        return quantizer, recon

    allocate = (f"allocate_stage={{allocator: uniform, budget_bits: 4.0, reuse: {str(reuse).lower()}, cache: false, "
                "candidates: ["
                "{quantizer: {bits: 4}, reconstructor: {rank: 4}}, {quantizer: {bits: 3}, reconstructor: {rank: 8}}]}")
    recipe = load_recipe(BASE, [*SMALL, "quantize_stage.quantizer.name=gptq",
                                "reconstruct_stage.reconstructor.name=qera-exact", allocate])
    import unittest.mock

    with unittest.mock.patch.object(pipeline, "components", counting):
        report = run(recipe, str(model_dir), tmp_path / "o", progress=False)
    assert calls["n"] == (2 if reuse else 3) * 21  # every candidate once per layer (+ the chosen one again)
    layers = report["layers"]
    assert {(r["bits"], r["rank"]) for r in layers} == {(3, 8)}  # 4-bit g32 int needs 4.625 bits
    assert _stored_bits_per_param(tmp_path / "o", report) == report["avg_bits"] <= 4.0
    assert {r["quantizer"] for r in layers} == {"gptq"} and {r["reconstructor"] for r in layers} == {"qera-exact"}
    # the chosen configurations fitted (and measured) on the compressed blocks' inputs, or with reuse on
    # the float model's, where the cost table made them
    windows = _run_windows(tmp_path / "o", report)
    _check_output_errors(layers, model_dir, tmp_path / "o", windows, "float" if reuse else "block")
    _check_perplexity(report, model_dir, tmp_path / "o", windows)


@testing.parametrize_devices()
def test_data_aware_reconstructor_runs_in_the_pipeline(model_dir, tmp_path, device):
    recipe = load_recipe(BASE, [*SMALL, "reconstruct_stage.reconstructor.name=qera-exact",
                                "quantize_stage.quantizer.name=gptq", "evaluate_stage.float_baseline=false"])
    report = run(recipe, str(model_dir), tmp_path / "o", device=device, progress=False)
    assert report["versions"]["device"].startswith(device)
    assert {r["reconstructor"] for r in report["layers"]} == {"qera-exact"}
    assert {r["quantizer"] for r in report["layers"]} == {"gptq"}
    windows = _run_windows(tmp_path / "o", report)
    found = _check_output_errors(report["layers"], model_dir, tmp_path / "o", windows)
    _check_perplexity(report, model_dir, tmp_path / "o", windows)
    # qera-exact's L·R is the best rank-r correction of Q in the output metric: on the same Q and inputs
    # it beats the plain (weight-metric) truncated SVD of W − Q at the same rank, in every layer
    for r in report["layers"]:
        x, w, q, err = found[r["name"]]
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        k = r["rank"]
        svd_err, _ = _rel_output_error(x, w, q + (u[:, :k] * sv[:k]) @ vh[:k])
        assert err < svd_err, r["name"]


def test_int8_factors_end_to_end(model_dir, tmp_path, finished):
    """factor_dtype int8: the report counts 8.25-bit factors, the checkpoint holds them packed, and
    both loaders give back the reported perplexity."""
    from lqframe.checkpoint import load_tokenizer
    from lqframe.data import make_windows
    from lqframe.evaluate import perplexity
    from lqframe.factors import factor_bits

    _, fp16_report = finished
    out = tmp_path / "int8"
    report = run(small_recipe("reconstruct_stage.reconstructor.factor_dtype=int8"), str(model_dir), out,
                 progress=False)
    lr_bits = sum(r["lowrank_bits"] for r in report["layers"])
    shapes = [(m.out_features, m.in_features) for m in
              (lqframe.load(out).get_submodule(r["name"]) for r in report["layers"])]
    assert lr_bits == sum(factor_bits((n, 8), "int8", "left") + factor_bits((8, m), "int8", "right")
                          for n, m in shapes)
    assert report["avg_bits"] == fp16_report["avg_bits"]
    assert report["avg_bits_with_lowrank"] < fp16_report["avg_bits_with_lowrank"]
    assert report["ppl"] == pytest.approx(fp16_report["ppl"], rel=0.01)  # 8-bit factors lose almost nothing
    state = _tensors(out / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.left" not in state
    assert state["model.layers.0.mlp.up_proj.left_q.codes"].dtype == torch.uint8
    d = load_recipe(out / "recipe.yaml").data
    windows = make_windows(load_tokenizer(out), d.source, d.seq_len, 0, d.evaluation_windows, d.seed)
    assert perplexity(lqframe.load(out), windows.evaluation, progress=False) == pytest.approx(report["ppl"],
                                                                                               rel=1e-6)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert perplexity(hf, windows.evaluation, progress=False) == pytest.approx(report["ppl"], rel=1e-6)


def test_layer_sequential_fits_each_group_to_the_compressed_inputs(model_dir, tmp_path):
    """quantize_stage.sequential: layer captures q/k/v with the float block (same as block mode),
    then o_proj with q/k/v already compressed, and so on; results stay in module order."""
    sets = ["quantize_stage.quantizer.name=gptq", "reconstruct_stage.reconstructor.name=qera-exact",
            "evaluate_stage.float_baseline=false"]
    block = run(small_recipe(*sets), str(model_dir), tmp_path / "block", progress=False)
    layer = run(small_recipe(*sets, "quantize_stage.sequential=layer"), str(model_dir), tmp_path / "layer",
                progress=False)
    assert [r["name"] for r in layer["layers"]] == [r["name"] for r in block["layers"]]
    by_name = {r["name"]: r for r in block["layers"]}
    first = [r for r in layer["layers"] if r["name"].startswith("model.layers.0.self_attn.")
             and r["name"].split(".")[-1] in ("q_proj", "k_proj", "v_proj")]
    assert len(first) == 3 and all(r["rel_output_error"] == by_name[r["name"]]["rel_output_error"] for r in first)
    later = [r for r in layer["layers"] if r["name"].split(".")[-1] in ("o_proj", "up_proj", "down_proj")]
    assert all(r["rel_output_error"] != by_name[r["name"]]["rel_output_error"] for r in later)
    windows = _run_windows(tmp_path / "layer", layer)
    _check_output_errors(layer["layers"], model_dir, tmp_path / "layer", windows, "layer")
    _check_perplexity(layer, model_dir, tmp_path / "layer", windows)


def test_sequential_must_be_block_or_layer():
    with pytest.raises(lqframe.RecipeError, match="quantize_stage.sequential: must be 'block' or 'layer'"):
        small_recipe("quantize_stage.sequential=tensor")


def test_several_calibration_and_evaluation_sources(model_dir, tmp_path):
    """data.calibration mixes sources; evaluate_stage.data scores each; report.json records which windows."""
    from lqframe.checkpoint import load_tokenizer
    from lqframe.data import make_windows
    from lqframe.evaluate import perplexity

    out = tmp_path / "out"
    report = run(small_recipe("data.calibration=[pydoc, {source: news, windows: 1}]",
                              "evaluate_stage.data=[news, pydoc]"), str(model_dir), out, progress=False)
    assert list(report["perplexity"]) == ["news", "pydoc"]
    for v in report["perplexity"].values():
        assert 0 < v["float"] < v["compressed"] and v["ratio"] == pytest.approx(v["compressed"] / v["float"])
    assert report["ppl"] == report["perplexity"]["news"]["compressed"]  # the first source is the headline
    assert report["fp_ppl"] == report["perplexity"]["news"]["float"]
    data = report["data"]
    assert [(c["source"], len(c["windows"])) for c in data["calibration"]] == [("pydoc", 4), ("news", 1)]
    assert [(e["source"], len(e["windows"])) for e in data["evaluation"]] == [("news", 3), ("pydoc", 3)]
    assert json.loads((out / "report.json").read_text())["data"] == data
    # the recorded windows are the ones scored: the saved model reproduces each source's figure
    model, tok = lqframe.load(out), load_tokenizer(out)
    for e in data["evaluation"]:
        w = make_windows(tok, e["source"], 64, 0, 3, 0)
        assert list(w.evaluation_index) == e["windows"]
        cal = next(c["windows"] for c in data["calibration"] if c["source"] == e["source"])
        assert not set(cal) & set(e["windows"])
        assert perplexity(model, w.evaluation, progress=False) == pytest.approx(
            report["perplexity"][e["source"]]["compressed"], rel=1e-4)
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "eval", str(out), "--json"], capture_output=True,
                         text=True, check=True)
    assert json.loads(res.stdout)["perplexity"] == pytest.approx(
        {s: v["compressed"] for s, v in report["perplexity"].items()}, rel=1e-4)
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "eval", str(out), "--data", "pydoc"],
                         capture_output=True, text=True, check=True)
    assert "of pydoc" in res.stdout and "news" not in res.stdout
