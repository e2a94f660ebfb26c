"""The benchmark scripts' result caches and the kernel benchmark's bandwidth, without running a model.

benchmarks/ is not a package: its scripts are imported by name with the folder on ``sys.path`` for
the import only (``peers.py`` also sets logging variables at import; they are put back).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _script(name: str):
    path, env = list(sys.path), dict(os.environ)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = path
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)


methods_table = _script("methods_table")
peers = _script("peers")
kernel_speed = _script("kernel_speed")

#: one option changed at a time, each of which moves a row's figures
CHANGES = {
    "model": "HuggingFaceTB/SmolLM2-360M", "group_size": 128, "seq_len": 1024, "evaluation_windows": 32,
    "calibration_windows": 32, "calibration_sources": ["pydoc", "news"], "sequential": "layer",
    "quantizer_options": {"act_order": True}, "reconstructor_options": {"iterations": 3}, "rank": 64, "bits": 3,
    "quantizer": "rtn", "reconstructor": "svd",
}


def _request(argv=(), qname="gptq", bits=4, qopts=None, rname="qera-exact", ropts=None) -> dict:
    """The key fields methods_table.py would look up for one combination of a run with ``argv``."""
    args = methods_table.parser().parse_args(list(argv))
    return methods_table.run_options(args, qname, bits, qopts or {}, rname, ropts or {})


def test_every_key_field_has_a_change():
    assert set(CHANGES) == set(methods_table.ROW_KEY)


@pytest.mark.parametrize("field", list(CHANGES))
def test_methods_key_separates_rows_that_differ_in_one_option(field):
    """Two rows that differ only in ``field`` are two cache entries: a --group-size 128 run never
    prints the cached g64 row."""
    row = _request()
    assert methods_table._row_key(row) != methods_table._row_key({**row, field: CHANGES[field]})


@pytest.mark.parametrize("field", list(CHANGES))
def test_methods_table_shows_rows_that_differ_in_one_option(field):
    """... and the table shows both (a label names a value off the default), none hiding the other."""
    row = _request()
    other = {**row, field: CHANGES[field]}
    table = methods_table.render([{**r, "ppl": 1.0, "fp_ppl": 1.0, "ratio": 1.0, "avg_bits_with_lowrank": 4.0,
                                   "compress_seconds": 1.0} for r in (row, other)])
    assert table.count("(×1.000, 4.00 b, 1 s)") == 2, table


@pytest.mark.parametrize(("argv", "field", "value"), [
    (["--group-size", "128"], "group_size", 128), (["--seq-len", "1024"], "seq_len", 1024),
    (["--evaluation", "32"], "evaluation_windows", 32), (["--model", "other"], "model", "other"),
])
def test_methods_options_reach_the_key(argv, field, value):
    request = _request(argv)
    assert request[field] == value
    assert methods_table._row_key(request) != methods_table._row_key(_request())


def test_old_rows_match_a_default_request():
    """Rows written before model, seq_len and evaluation_windows (some: group size, sequential,
    calibration) were recorded are read as measured with the defaults: a run with default options
    finds them, one with another group size, sequence length, evaluation count or model does not."""
    rows = methods_table._read(RESULTS / "methods.jsonl")
    old = next(r for r in rows if "calibration_windows" not in r and r["reconstructor"] == "none")
    assert not {"model", "seq_len", "evaluation_windows", "sequential"} & set(old)
    combination = {"qname": old["quantizer"], "bits": old["bits"], "qopts": old["quantizer_options"], "rname": "none"}
    request = _request(**combination)
    assert methods_table._row_key(old) == methods_table._row_key(request)
    for argv in (["--group-size", "128"], ["--seq-len", "256"], ["--evaluation", "8"], ["--model", "other"]):
        moved = _request(argv, **combination)
        assert methods_table._row_key(old) != methods_table._row_key(moved), argv
    # a new row records every key field; a row with none of the optional ones is the defaults'
    assert set(methods_table.ROW_KEY) <= set(request)
    bare = {k: old[k] for k in ("quantizer", "bits", "reconstructor", "rank")}
    assert methods_table._row_key(bare) == methods_table._row_key(_request(qname=old["quantizer"], bits=old["bits"],
                                                                           rname="none"))


def test_results_keep_one_row_per_key():
    """The published rows stay distinct under the key (none collapses into another)."""
    for name in ("methods", "gptq", "calibration", "peers"):
        rows = methods_table._read(RESULTS / f"{name}.jsonl")
        assert len({methods_table._row_key(r) for r in rows}) == len(rows), name


def test_peers_key():
    """peers.py looks rows up with methods_table's key: its default request finds the published
    rows; another GPTQ group size, sequence length, evaluation count or model (--tiny) does not."""
    rows = methods_table._read(RESULTS / "peers.jsonl")
    keys = {methods_table._row_key(r) for r in rows}
    default = peers.parser().parse_args([])
    stubs = {name: peers._row_stub(name, default, default.calibration_sources) for name in peers.PEERS}
    assert {methods_table._row_key(s) for s in stubs.values()} == keys
    for argv in (["--group-size", "128"], ["--seq-len", "256"], ["--evaluation", "8"], ["--model", "other"],
                 ["--tiny"]):
        args = peers.parser().parse_args(argv)
        stub = peers._row_stub("gptq-static", args, args.calibration_sources)
        assert set(methods_table.ROW_KEY) <= set(stub)
        assert methods_table._row_key(stub) not in keys, argv


def test_recipe_key():
    """allocation.py and rilq.py key a row on its model and recipe; a row without a model is the default
    model's."""
    row = methods_table._read(RESULTS / "rilq.jsonl")[0]
    assert "model" not in row
    assert methods_table.recipe_key(row) == methods_table.recipe_key({"model": "default", "recipe": row["recipe"]})
    assert methods_table.recipe_key(row) != methods_table.recipe_key({"model": "other", "recipe": row["recipe"]})
    recipe = {**row["recipe"], "quantize_stage": {"quantizer": {**row["recipe"]["quantize_stage"]["quantizer"],
                                                                 "group_size": 128}}}
    assert methods_table.recipe_key(row) != methods_table.recipe_key({"recipe": recipe})


def test_copy_bandwidth_on_a_cpu_tensor():
    """The kernel benchmark's bandwidth measurement gives a figure on any device (CPU here: 4 MiB)."""
    gbs = kernel_speed.copy_bandwidth(torch.device("cpu"), nbytes=1 << 22, repeats=3)
    assert math.isfinite(gbs) and gbs > 0


def test_interop_table_is_the_scripts_rendering_of_its_rows():
    """benchmarks/results/interop.md is what benchmarks/interop.py renders from interop.jsonl (no hand
    edits), every row names the versions it was measured with, and each imported row's recipe reads Q
    from a checkpoint (quantize_stage.from) while the reference row quantizes."""
    interop = _script("interop")
    rows = interop._read(RESULTS / "interop.jsonl")
    assert rows and (RESULTS / "interop.md").read_text() == interop.render(rows)
    for row in rows:
        assert row["versions"]["lqframe"] and row["versions"]["torch"]
        imported = "from" in row["recipe"]["quantize_stage"]
        assert imported == (interop.ROWS[row["row"]][1] is not None), row["row"]
