"""A damaged checkpoint is a one-line error: the checkpoint records every file's size and sha256 (in
``report.json``'s ``files``), loading compares the weight files' sizes with the record before
deserializing, and ``lqframe inspect --verify`` recomputes the hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lqframe
from lqframe.checkpoint import (
    check_file_sizes,
    inspect_checkpoint,
    read_state,
    recorded_files,
    save_checkpoint,
    verify_checkpoint,
)
from lqframe.errors import CheckpointError
from lqframe.lqlinear import LQLinear
from lqframe.models import block_linears
from tests.tiny import byte_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _compressed(layers: int = 1):
    model = tiny_llama(layers=layers, hidden=32, intermediate=64)
    q = lqframe.registry().create("quantizer", "rtn", bits=4, group_size=16)
    rec = lqframe.registry().create("reconstructor", "svd", rank=4)
    for _, _, linears in block_linears(model):
        for name, linear in linears.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    LQLinear.from_decomposition(linear, rec.decompose(linear.weight.detach(), q)))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny compressed llama saved with tokenizer, recipe and report; returns (folder, files written)."""
    out = tmp_path_factory.mktemp("integrity") / "ck"
    files = save_checkpoint(_compressed(), out, recipe_yaml="model: tiny\n", report={"model": "tiny", "ppl": 1.5},
                            tokenizer=byte_tokenizer())
    return out, files


@pytest.fixture
def ck(saved, tmp_path):
    """A copy of the saved checkpoint that the test may damage."""
    return Path(shutil.copytree(saved[0], tmp_path / "ck"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "sharded"
    files = save_checkpoint(_compressed(layers=2), out, max_shard_size_mb=0.03)
    shards = sorted(f.name for f in files if f.name.startswith("model-"))
    assert len(shards) > 2
    return out, shards


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lqframe.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _truncate(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return size, size // 2


def _flip(path: Path, offset: int) -> None:
    with open(path, "rb+") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))


def _one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lqframe: error: "), res.stderr
    return lines[0]


# --------------------------------------------------------------------------- the record


def test_record_has_every_file_with_its_size_and_sha256(saved):
    out, files = saved
    names = {f.name for f in files}
    assert {"model.safetensors", "config.json", "recipe.yaml", "tokenizer.json", "report.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "tiny" and report["ppl"] == 1.5  # the run's report is kept as it was
    record = report["files"]
    assert set(record) == names - {"report.json"}  # everything but the report, which holds the record
    for name, rec in record.items():
        data = (out / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert recorded_files(out) == record
    assert files[-1].name == "report.json"  # written last: the completion mark


def test_a_save_without_report_still_records_its_files(tmp_path):
    save_checkpoint(_compressed(), tmp_path / "ck")
    report = json.loads((tmp_path / "ck" / "report.json").read_text())
    assert set(report) == {"files"} and {"model.safetensors", "config.json"} <= set(report["files"])
    assert inspect_checkpoint(tmp_path / "ck")["layers"]  # an empty report inspects as before


def test_a_finished_checkpoint_is_still_lqframe_run_output(saved, tmp_path):
    """`lqframe run --overwrite` only removes files lqframe writes: the record must not add a foreign one."""
    from lqframe.run import _prepare_output

    out = Path(shutil.copytree(saved[0], tmp_path / "out"))
    with pytest.raises(lqframe.LqframeError, match="finished checkpoint"):
        _prepare_output(out, {}, False, lambda s: None)
    _prepare_output(out, {}, True, lambda s: None)
    assert [p.name for p in out.iterdir()] == [".lqframe-lock"]


def test_sharded_checkpoint_records_every_shard_and_the_index(sharded):
    out, shards = sharded
    record = recorded_files(out)
    assert set(shards) | {"model.safetensors.index.json", "config.json"} <= set(record)
    for name in shards:
        assert record[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- loading checks sizes


def test_truncated_weights_are_a_checkpoint_error_naming_the_file(ck):
    f = ck / "model.safetensors"
    size, half = _truncate(f)
    for load in (lqframe.load, read_state, inspect_checkpoint, check_file_sizes):
        with pytest.raises(CheckpointError) as err:
            load(ck)
        msg = str(err.value)
        assert "\n" not in msg and str(f) in msg and str(size) in msg and str(half) in msg and "truncated" in msg


def test_missing_weights_are_a_checkpoint_error_naming_the_file(ck):
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        lqframe.load(ck)


def test_every_shard_is_checked(sharded, tmp_path):
    out = Path(shutil.copytree(sharded[0], tmp_path / "ck"))
    assert lqframe.load(out) is not None
    last = out / sharded[1][-1]
    intact = last.read_bytes()
    _truncate(last)
    with pytest.raises(CheckpointError, match=f"{last.name}: .*truncated"):
        lqframe.load(out)
    last.write_bytes(intact)
    index = out / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(CheckpointError, match="index.json: .*truncated"):
        read_state(out)


def test_a_damaged_header_of_the_right_size_is_a_checkpoint_error(ck):
    f = ck / "model.safetensors"
    _flip(f, 10)  # inside the JSON header: no longer UTF-8
    with pytest.raises(CheckpointError, match=f"{f}: unreadable safetensors file .*re-run or copy it again"):
        lqframe.load(ck)


def test_loading_does_not_hash(ck, monkeypatch):
    """Sizes only on load: hashing every byte of a 70B checkpoint is what `inspect --verify` is for."""
    import lqframe.checkpoint as mod

    def no_hashing(*args, **kwargs):
        raise AssertionError("a load hashed a file")

    monkeypatch.setattr(mod, "file_record", no_hashing)
    monkeypatch.setattr(hashlib, "file_digest", no_hashing)
    assert lqframe.load(ck) is not None and inspect_checkpoint(ck)["layers"]


def test_checkpoint_without_a_record_still_loads(ck):
    """Checkpoints written before the record existed: no size check, the same model."""
    expected = read_state(ck)
    report = json.loads((ck / "report.json").read_text())
    del report["files"]
    (ck / "report.json").write_text(json.dumps(report))
    assert recorded_files(ck) is None
    lqframe.load(ck)
    (ck / "report.json").unlink()
    assert recorded_files(ck) is None
    state = read_state(ck)
    assert state.keys() == expected.keys()
    f = ck / "model.safetensors"
    _truncate(f)  # still a one-line error, from safetensors' own complaint
    with pytest.raises(CheckpointError, match=f"{f}: unreadable safetensors file"):
        lqframe.load(ck)


def test_malformed_record_is_a_checkpoint_error(ck):
    report = json.loads((ck / "report.json").read_text())
    report["files"]["../outside.bin"] = {"size": 1, "sha256": "0" * 64}
    (ck / "report.json").write_text(json.dumps(report))
    with pytest.raises(CheckpointError, match="malformed 'files' record"):
        lqframe.load(ck)
    (ck / "report.json").write_bytes(b"\xff{")
    with pytest.raises(CheckpointError, match="report.json: unreadable report"):
        lqframe.load(ck)


# --------------------------------------------------------------------------- verify


def test_verify_recomputes_every_hash(ck):
    assert {e["status"] for e in verify_checkpoint(ck)} == {"ok"}
    f = ck / "model.safetensors"
    _flip(f, f.stat().st_size // 2)  # same size: only the hash can tell
    check_file_sizes(ck)
    (ck / "tokenizer.json").unlink()
    seen = []
    results = {e["name"]: e for e in verify_checkpoint(ck, on_file=seen.append)}
    assert [e["name"] for e in seen] == list(results)
    assert results["model.safetensors"]["status"] == "mismatch"
    assert results["model.safetensors"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert results["tokenizer.json"]["status"] == "missing"
    assert results["config.json"]["status"] == "ok"


def test_cli_verify_of_an_intact_checkpoint(saved):
    out, _ = saved
    res = _cli("inspect", "--verify", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(recorded_files(out)) + 1
    assert all(line.startswith("ok ") for line in lines[:-1]) and "all" in lines[-1]


def test_cli_verify_names_a_flipped_byte(ck):
    f = ck / "model.safetensors"
    _flip(f, f.stat().st_size // 2)
    res = _cli("inspect", "--verify", str(ck))
    assert "MISMATCH  model.safetensors: sha256" in res.stdout
    assert "ok        config.json" in res.stdout
    err = _one_error_line(res)
    assert str(f) in err and "1 of" in err and "fail verification" in err
    res = _cli("inspect", "--verify", "--json", str(ck))
    _one_error_line(res)
    doc = json.loads(res.stdout)
    assert doc["ok"] is False
    assert {e["name"]: e["status"] for e in doc["files"]}["model.safetensors"] == "mismatch"


def test_cli_verify_without_a_record(ck):
    (ck / "report.json").unlink()
    err = _one_error_line(_cli("inspect", "--verify", str(ck)))
    assert "records no file sizes or checksums" in err and str(ck) in err


# --------------------------------------------------------------------------- the CLI on a truncated copy


def test_cli_commands_on_truncated_weights_print_one_line(ck, tmp_path):
    f = ck / "model.safetensors"
    size, half = _truncate(f)
    for args in (["eval", str(ck)], ["inspect", str(ck)], ["export", str(ck), "--to", "dense", str(tmp_path / "x")]):
        err = _one_error_line(_cli(*args))
        assert err == (f"lqframe: error: {f}: {half} bytes, but the checkpoint recorded {size}: truncated or "
                       "damaged; re-run or copy it again"), args
    assert not (tmp_path / "x").exists()
