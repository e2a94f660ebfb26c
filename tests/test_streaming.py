"""Models larger than memory (lqframe.streaming): a synthetic model written tensor by tensor, runs that
stream its blocks from the shards giving the very checkpoint and perplexities of a resident run,
resuming after a kill, refusing what needs the whole model, and memory that does not grow with depth."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lqframe
from lqframe.recipe import load_recipe, parse_recipe
from lqframe.run import run
from tests.tiny import byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import synthetic_model  # noqa: E402

SHAPE = {"hidden": 256, "intermediate": 688, "heads": 4, "kv_heads": 2, "layers": 3}
SMALL = ["data.seq_len=64", "data.calibration_windows=4", "data.evaluation_windows=3", "data.calibration=[pydoc]",
         "evaluate_stage.data=[pydoc]", "quantize_stage.quantizer.group_size=32", "save_stage.max_shard_size_mb=1"]
#: what a finished run writes that must be the same bytes whichever way it ran (report.json holds timings)
SAME = ("config.json", "generation_config.json", "model.safetensors.index.json", "recipe.yaml", "tokenizer.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "m"
    synthetic_model.write_model(out, SHAPE, byte_tokenizer(), max_shard_size_mb=1)
    return out


def _recipe(name="gptq4-qera32.yaml", *extra):
    rank = ["reconstruct_stage.reconstructor.rank=8"] if "qera" in name else []
    return load_recipe(ROOT / "recipes" / name, [*SMALL, *rank, *extra])


def _files(out: Path) -> dict[str, bytes]:
    names = [p.name for p in out.iterdir() if p.name.endswith(".safetensors") or p.name in SAME]
    return {n: (out / n).read_bytes() for n in sorted(names)}


def test_synthetic_model_loads_and_is_the_same_whatever_the_shards(model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    record = json.loads((model_dir / "synthetic.json").read_text())
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert record["shards"] == len(set(index["weight_map"].values())) > 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert all(bool(torch.isfinite(h).all()) for h in hidden)
    # the norms carry the outlier channels: q/k/v and gate/up see them in their inputs
    norm = model.model.layers[1].input_layernorm.weight
    assert sorted(torch.nonzero(norm > 1).flatten().tolist()) == record["outlier_channels"]
    # one shard: the same tensors, bit for bit
    single = tmp_path / "one"
    synthetic_model.write_model(single, SHAPE, byte_tokenizer(), max_shard_size_mb=1000)
    one = load_file(single / "model.safetensors")
    for name, fname in index["weight_map"].items():
        assert torch.equal(load_file(model_dir / fname)[name], one[name]), name


@pytest.mark.parametrize("recipe", ["gptq4-qera32.yaml", "quantize-only-rtn4.yaml"])
def test_streamed_run_writes_the_resident_runs_checkpoint(model_dir, tmp_path, recipe):
    """Data-aware (GPTQ + QERA-exact: calibration, sequential propagation) and data-free recipes."""
    reports, files = {}, {}
    for mode in (False, True):
        out = tmp_path / f"stream-{mode}"
        reports[mode] = run(_recipe(recipe), str(model_dir), out, stream=mode, progress=False, log=lambda s: None)
        files[mode] = _files(out)
    assert files[True].keys() == files[False].keys() and len(files[True]) >= 5
    for name in files[True]:
        assert files[True][name] == files[False][name], name
    assert reports[True]["ppl"] == reports[False]["ppl"] and reports[True]["fp_ppl"] == reports[False]["fp_ppl"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in reports[False]["layers"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in reports[True]["layers"]] == strip


@pytest.mark.parametrize("stream", [False, True])
def test_activations_on_disk_give_the_same_checkpoint(model_dir, tmp_path, monkeypatch, stream):
    """``activations: disk``: every block's activations go to one file per window in the run's progress
    folder (none held in memory), and the checkpoint and perplexities are those of the in-memory run."""
    from lqframe.executor import ActivationFiles

    written: list[Path] = []
    real = ActivationFiles.append

    def append(self, t):
        real(self, t)
        written.append(self._paths[-1])

    ref_out = tmp_path / "ref"
    ref = run(_recipe(), str(model_dir), ref_out, progress=False, log=lambda s: None)
    assert not written
    monkeypatch.setattr(ActivationFiles, "append", append)
    out = tmp_path / "disk"
    report = run(_recipe("gptq4-qera32.yaml", "activations=disk"), str(model_dir), out, stream=stream,
                 progress=False, log=lambda s: None)
    # block-0 inputs and each block's outputs of 4 calibration windows, and (evaluation) of 3 windows
    assert len(written) >= 4 * SHAPE["layers"] + (3 * (SHAPE["layers"] + 1) if stream else 0)
    assert {p.parent for p in written} == {out / ".lqframe-partial" / "activations-0"}
    assert not any(p.exists() for p in written)  # each block's files go when the next block's are made
    assert report["ppl"] == ref["ppl"] and report["fp_ppl"] == ref["fp_ppl"]
    mine, theirs = _files(out), _files(ref_out)
    assert b"activations: disk" in mine.pop("recipe.yaml") and theirs.pop("recipe.yaml")
    assert mine == theirs and len(mine) >= 4


def test_auto_streams_a_model_larger_than_the_memory_left(model_dir, tmp_path, monkeypatch):
    """``stream: auto`` (the default) streams when the float weights exceed 70 % of the memory
    available, and the run ends with the resident run's checkpoint."""
    import lqframe.streaming as streaming

    size = streaming.float_bytes(model_dir)
    monkeypatch.setattr(streaming, "_available_memory", lambda: int(size / 0.7) + 1)
    ref = run(_recipe("quantize-only-rtn4.yaml"), str(model_dir), tmp_path / "fits", progress=False,
              log=lambda s: None)
    assert ref["streamed"] is False
    monkeypatch.setattr(streaming, "_available_memory", lambda: int(size / 0.7) - 1)
    messages: list[str] = []
    report = run(_recipe("quantize-only-rtn4.yaml"), str(model_dir), tmp_path / "big", progress=False,
                 log=messages.append)
    assert report["streamed"] is True and any("streamed" in m for m in messages)
    assert _files(tmp_path / "big") == _files(tmp_path / "fits") and report["ppl"] == ref["ppl"]


def test_available_memory_reads_a_container_limit(monkeypatch, tmp_path):
    import builtins

    import lqframe.streaming as streaming

    files = {"/proc/meminfo": "MemTotal: 100 kB\nMemAvailable:   8000000 kB\n",
             "/sys/fs/cgroup/memory.max": "4294967296\n", "/sys/fs/cgroup/memory.current": "1073741824\n"}
    real = builtins.open

    def fake(path, *args, **kwargs):
        if str(path) in files:
            target = tmp_path / str(path).replace("/", "_")
            target.write_text(files[str(path)])
            return real(target, *args, **kwargs)
        if str(path).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)
    assert streaming._available_memory() == 3 * 2**30  # the container's 4 GiB limit, 1 GiB used
    files["/sys/fs/cgroup/memory.max"] = "max\n"
    assert streaming._available_memory() == 8000000 * 1024  # no limit: the machine's MemAvailable


def test_a_killed_streamed_run_resumes_to_the_same_checkpoint(model_dir, tmp_path, interrupt_after):
    reference = tmp_path / "ref"
    ref = run(_recipe(), str(model_dir), reference, stream=True, progress=False, log=lambda s: None)
    out = tmp_path / "out"
    interrupt_after(2)  # killed right after block 1 was committed
    with pytest.raises(KeyboardInterrupt):
        run(_recipe(), str(model_dir), out, stream=True, progress=False, log=lambda s: None)
    assert json.loads((out / ".lqframe-partial" / "progress.json").read_text())["finished_block"] == 1
    interrupt_after(None)
    messages: list[str] = []
    report = run(_recipe(), str(model_dir), out, stream=True, progress=False, log=messages.append)
    assert any("resuming" in m for m in messages) and any("streamed" in m for m in messages)
    assert report["ppl"] == ref["ppl"]
    assert _files(out) == _files(reference)


def test_a_streamed_checkpoint_loads_and_scores_as_reported(model_dir, tmp_path):
    from lqframe.checkpoint import load_tokenizer
    from lqframe.data import make_windows
    from lqframe.evaluate import perplexity

    out = tmp_path / "o"
    report = run(_recipe(), str(model_dir), out, stream=True, progress=False, log=lambda s: None)
    model = lqframe.load(out)
    windows = make_windows(load_tokenizer(out), "pydoc", 64, 4, 3, 0).evaluation
    assert perplexity(model, windows, progress=False) == report["ppl"]


@pytest.mark.parametrize("stage, message", [
    ({"tune_stage": {"objectives": {"causal-lm": 1.0}, "windows": 2, "validation_windows": 1}}, "tune_stage trains"),
    ({"allocate_stage": {"allocator": "ilp", "budget_bits": 4.0, "grid": {"quantizer": {"bits": [3, 4]}}}},
     "allocate_stage builds"),
    ({"reconstruct_stage": {"reconstructor": {"name": "lqlora", "rank": 4, "weighting": "fisher"}}},
     "gradient pass"),
])
def test_what_needs_the_whole_model_is_refused_when_streaming(model_dir, tmp_path, stage, message):
    doc = {"data": {"seq_len": 32, "calibration_windows": 2, "evaluation_windows": 0},
           "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}}, **stage}
    with pytest.raises(lqframe.RecipeError, match=f"a streamed model .*{message}.*stream: false"):
        run(parse_recipe(doc, "<s>"), str(model_dir), tmp_path / "o", stream=True, progress=False,
            log=lambda s: None)


def test_stream_option_in_recipes_and_errors(model_dir):
    stage = {"quantize_stage": {"quantizer": {"name": "rtn"}}}
    assert parse_recipe({"stream": True, **stage}, "<r>").stream == "true"
    assert parse_recipe({"stream": "auto", **stage}, "<r>").stream == "auto"
    assert parse_recipe(stage, "<r>").stream == "auto"
    with pytest.raises(lqframe.RecipeError, match=r"<r>: stream: expected auto, true or false, got 'yes please'"):
        parse_recipe({"stream": "yes please", **stage}, "<r>")
    assert parse_recipe({"activations": "disk", **stage}, "<r>").activations == "disk"
    assert parse_recipe(stage, "<r>").activations == "auto"
    with pytest.raises(lqframe.RecipeError, match=r"<r>: activations: expected one of auto, device, cpu, disk, "
                                                  r"got 'ssd'"):
        parse_recipe({"activations": "ssd", **stage}, "<r>")
    # where the work happens is not what it computes: a run resumes after these change
    assert parse_recipe({"activations": "disk", "stream": True, "offload": True, **stage}, "<r>").fingerprint() == \
        parse_recipe(stage, "<r>").fingerprint() != parse_recipe({"device": "cpu", **stage}, "<r>").fingerprint()
    from lqframe.streaming import should_stream

    assert should_stream("auto", {"kind": "dir", "path": str(model_dir)}) is False  # 16 MB fits
    assert should_stream("auto", {"kind": "default"}) is False
    with pytest.raises(lqframe.ModelError, match="streaming reads a model folder of safetensors weights"):
        run(parse_recipe({"quantize_stage": {"quantizer": {"name": "rtn"}}}, "<r>"), "default", None, stream=True,
            progress=False, log=lambda s: None)


_RSS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
    from pathlib import Path
    import synthetic_model
    from tests.tiny import byte_tokenizer
    from lqframe.recipe import parse_recipe
    from lqframe.run import run
    shape = {{"hidden": 768, "intermediate": 2048, "heads": 4, "kv_heads": 4, "layers": int(sys.argv[1])}}
    folder = Path(sys.argv[2])
    synthetic_model.write_model(folder / "m", shape, byte_tokenizer(), max_shard_size_mb=64)
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    doc = {{"stream": True, "data": {{"seq_len": 32, "calibration_windows": 0, "evaluation_windows": 2}},
           "quantize_stage": {{"quantizer": {{"name": "rtn", "bits": 4, "group_size": 64}}}},
           "evaluate_stage": {{"float_baseline": False}}, "save_stage": {{"max_shard_size_mb": 64}}}}
    report = run(parse_recipe(doc, "<rss>"), str(folder / "m"), folder / "out", progress=False, log=lambda s: None)
    print(json.dumps({{"peak_mb": report["peak_rss_mb"], "before_mb": before / 1024}}))
""")


def test_streamed_peak_memory_does_not_grow_with_depth(tmp_path):
    """4 and 16 blocks of 7.1 M parameters (28 MB of float32 each): a resident run would hold 12 blocks
    (340 MB) more at 16; the streamed run's peak RSS grows by less than a quarter of that."""
    peaks = {}
    for layers in (4, 16):
        folder = tmp_path / str(layers)
        res = subprocess.run([sys.executable, "-c", _RSS.format(root=str(ROOT), bench=str(ROOT / "benchmarks")),
                              str(layers), str(folder)], capture_output=True, text=True, timeout=600,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        peaks[layers] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    block_mb = (4 * 768 * 768 + 3 * 768 * 2048) * 4 / 2**20
    assert peaks[16] - peaks[4] < 0.25 * 12 * block_mb, peaks


def test_lqframe_eval_streams_a_float_model_and_a_checkpoint(model_dir, tmp_path, capsys):
    """``lqframe eval --stream`` of the float folder and of a compressed checkpoint: the perplexities
    ``lqframe eval`` computes resident, exactly."""
    from lqframe.cli import main

    out = tmp_path / "o"
    run(_recipe(), str(model_dir), out, progress=False, log=lambda s: None)
    for target in (model_dir, out):
        got = {}
        for flag in ("--stream", "--no-stream"):
            capsys.readouterr()
            assert main(["eval", str(target), "--windows", "3", "--seq-len", "64", "--data", "pydoc", "--json",
                         flag]) == 0
            got[flag] = json.loads(capsys.readouterr().out)["ppl"]
        assert got["--stream"] == got["--no-stream"], (target, got)
