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


def _command(recipe: str, model: Path, out: Path, processes: int) -> list[str]:
    extra = RANKED if "qera" in recipe else ILP if "ilp" in recipe else []
    sets = [a for s in [*SETS, *extra] for a in ("--set", s)]
    run = ["-m", "lqframe.cli", "run", str(ROOT / "recipes" / recipe), "--model", str(model), "--output", str(out),
           "--quiet", "--json", "--device", "cpu", *sets]
    if processes == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *run]


def _run(recipe, model, out, processes, env=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("RANK", None)
    res = subprocess.run(_command(recipe, model, out, processes), capture_output=True, text=True, env=env,
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


@pytest.mark.parametrize("recipe, processes", [("gptq4-qera32.yaml", 2), ("gptq4-qera32.yaml", 3),
                                               ("quantize-only-rtn4.yaml", 2), ("lqlora-ilp.yaml", 2),
                                               ("lqlora-ilp.yaml", 3)])
def test_n_processes_write_the_one_process_checkpoint(model_dir, tmp_path, single, recipe, processes):
    """The default recipe (GPTQ + QERA-exact: statistics, sequential propagation, evaluation) and a
    data-free one; 6 calibration windows over 3 processes, and over 2."""
    ref_dir, ref = single[recipe]
    out = tmp_path / "out"
    report = _report(_run(recipe, model_dir, out, processes))
    assert report["processes"] == processes and ref["processes"] == 1
    for name in SAME:
        if (ref_dir / name).exists():
            assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name
    assert report["ppl"] == ref["ppl"] and report["fp_ppl"] == ref["fp_ppl"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(report["layers"]) == strip(ref["layers"])
    if "allocation" in ref:  # the same cost table, hence the same choice
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


def test_what_is_not_shared_yet_is_refused_under_torchrun(model_dir, tmp_path):
    res = _run("gptq2-rilq64.yaml", model_dir, tmp_path / "o", 2, check=False)
    assert res.returncode != 0
    assert "runs in one process for now; start the run without torchrun" in res.stderr
