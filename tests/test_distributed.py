"""Many processes (lqframe.distributed) under torchrun with gloo: the checkpoint of an N-process run is
byte-identical to the one-process run's; a rank that fails stops every rank with a one-line error
naming it, leaves no checkpoint, and the same command resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_llama_dir

ROOT = Path(__file__).resolve().parent.parent
SETS = ["data.seq_len=48", "data.calibration_windows=6", "data.evaluation_windows=3", "data.calibration=[pydoc]",
        "evaluate_stage.data=[pydoc]", "quantize_stage.quantizer.group_size=32"]
RANKED = ["reconstruct_stage.reconstructor.rank=8"]
#: the ILP recipe: LQ-LoRA decompositions weighted by the Fisher, its cost table computed afresh
ILP = [*RANKED, "allocate_stage.cache=false", "reconstruct_stage.reconstructor.iterations=2"]
#: every file of a checkpoint that must be the same bytes (report.json records timings and the process count)
SAME = ("model.safetensors", "config.json", "generation_config.json", "recipe.yaml", "tokenizer.json")

pytestmark = pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("dist") / "model", layers=3)


def _command(recipe: str, model: Path, out: Path, processes: int, sets: list[str] | None = None) -> list[str]:
    extra = sets if sets is not None else RANKED if "qera" in recipe else ILP if "ilp" in recipe else []
    sets = [a for s in [*SETS, *extra] for a in ("--set", s)]
    run = ["-m", "lqframe.cli", "run", str(ROOT / "recipes" / recipe), "--model", str(model), "--output", str(out),
           "--quiet", "--json", "--device", "cpu", *sets]
    if processes == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *run]


def _run(recipe, model, out, processes, env=None, check=True, sets=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("RANK", None)
    res = subprocess.run(_command(recipe, model, out, processes, sets), capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _report(res) -> dict:
    return json.loads(res.stdout[res.stdout.index("{"):])


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """The one-process runs every N-process run is compared with."""
    root = tmp_path_factory.mktemp("single")
    return {recipe: (root / recipe, _report(_run(recipe, model_dir, root / recipe, 1)))
            for recipe in ("gptq4-qera32.yaml", "quantize-only-rtn4.yaml", "lqlora-ilp.yaml")}


@pytest.mark.parametrize("recipe, processes, stream", [
    ("gptq4-qera32.yaml", 2, False), ("gptq4-qera32.yaml", 3, False), ("gptq4-qera32.yaml", 3, True),
    ("quantize-only-rtn4.yaml", 2, False), ("quantize-only-rtn4.yaml", 2, True),
    ("lqlora-ilp.yaml", 2, False), ("lqlora-ilp.yaml", 3, False)])
def test_n_processes_write_the_one_process_checkpoint(model_dir, tmp_path, single, recipe, processes, stream):
    """The default recipe (GPTQ + QERA-exact: statistics, sequential propagation, evaluation), a
    data-free one and the ILP one (Fisher pass, cost table, solve); 6 calibration windows over 3
    processes, and over 2; streamed from disk (each process reading the blocks) or resident."""
    ref_dir, ref = single[recipe]
    out = tmp_path / "out"
    sets = None if not stream else [*(RANKED if "qera" in recipe else []), "stream=true"]
    report = _report(_run(recipe, model_dir, out, processes, sets=sets))
    assert report["processes"] == processes and ref["processes"] == 1
    assert report["streamed"] is stream and ref["streamed"] is False
    for name in SAME:
        if (ref_dir / name).exists() and not (stream and name == "recipe.yaml"):  # (it says stream: true)
            assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name
    assert report["ppl"] == ref["ppl"] and report["fp_ppl"] == ref["fp_ppl"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(report["layers"]) == strip(ref["layers"])
    if ref["allocation"]:  # the same cost table, hence the same choice
        assert report["allocation"]["chosen"] == ref["allocation"]["chosen"]
        assert report["allocation"]["total_cost"] == ref["allocation"]["total_cost"]


_FAIL = textwrap.dedent("""
    import os
    import lqframe.pipeline as pipeline
    import lqframe.engine as engine
    from lqframe.errors import LqframeError

    real = engine.decompose_layer

    def failing(name, *args, **kwargs):
        if os.environ.get("RANK") == "1" and ".layers.1." in name:
            raise LqframeError(f"injected failure at {name}")
        return real(name, *args, **kwargs)

    engine.decompose_layer = failing
""")


def test_a_failing_rank_stops_every_rank_and_the_command_resumes(model_dir, tmp_path, single):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAIL)
    out = tmp_path / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    res = _run("gptq4-qera32.yaml", model_dir, out, 2, env=env, check=False)
    assert res.returncode != 0
    assert "lqframe: error (rank 1 of 2): injected failure at model.layers.1." in res.stderr
    assert not (out / "report.json").exists() and not (out / "model.safetensors").exists()
    progress = json.loads((out / ".lqframe-partial" / "progress.json").read_text())
    assert progress["finished_block"] == 0  # block 0 committed, nothing of block 1
    # the same command, without the fault: resumes after block 0, and the checkpoint is the same
    res = _run("gptq4-qera32.yaml", model_dir, out, 2)
    assert "resuming the unfinished run" in res.stderr
    ref_dir, ref = single["gptq4-qera32.yaml"]
    assert _report(res)["ppl"] == ref["ppl"]
    for name in SAME:
        assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name


TUNE = ["tune_stage.windows=8", "tune_stage.validation_windows=4", "tune_stage.max_updates=4",
        "tune_stage.eval_every=2", "tune_stage.lr=0.001", "tune_stage.patience=0"]


@pytest.mark.parametrize("batch, accum, processes", [(1, 4, 2), (2, 1, 3)])
def test_the_tune_stage_is_data_parallel(model_dir, tmp_path, batch, accum, processes):
    """RILQ's tune stage under DDP: an update's micro-batches shared out (1 window × 4 over 2
    processes), or one micro-batch's windows (2 windows over 3 processes: one takes a window of
    weight 0) — the same training as one process up to the order of additions in the gradient sum;
    the stages before it byte-identical."""
    from safetensors.torch import load_file

    sets = [*RANKED, *TUNE, f"tune_stage.batch_size={batch}", f"tune_stage.grad_accum={accum}"]
    runs = [_report(_run("gptq2-rilq64.yaml", model_dir, tmp_path / str(n), n, sets=sets)) for n in (1, processes)]
    one, many = (r["tuning"] for r in runs)
    assert many["updates"] == one["updates"] == 4
    for a, b in zip(one["history"], many["history"], strict=True):
        for key in ("train_loss", "validation_loss"):
            assert (a[key] is None and b[key] is None) or b[key] == pytest.approx(a[key], rel=1e-5), (a, b)
    assert runs[1]["ppl"] == pytest.approx(runs[0]["ppl"], rel=1e-5)
    ref, got = (load_file(tmp_path / str(n) / "model.safetensors") for n in (1, processes))
    assert ref.keys() == got.keys()
    trained = [k for k in ref if k.endswith((".left", ".right"))]
    assert trained
    for k in ref:
        if k in trained:
            assert torch.allclose(got[k].float(), ref[k].float(), rtol=1e-3, atol=1e-5 * ref[k].abs().max()), k
        else:  # Q, its scales, every frozen tensor: the very same bytes
            assert torch.equal(got[k], ref[k]), k

