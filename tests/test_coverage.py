"""Nothing left behind silently: the report counts bits over every parameter of the blocks and of the
whole model, lists the weight tensors left in float, and the run warns when the targets miss more
than 5 % of the block parameters; ``lqframe inspect`` shows the same."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from lqframe.cli import main
from lqframe.recipe import parse_recipe
from lqframe.run import run
from tests.tiny import tiny_llama_dir

DOC = {"data": {"seq_len": 32, "calibration_windows": 2, "evaluation_windows": 0, "source": "pydoc"},
       "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}},
       "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}}, "save_stage": {}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("cov") / "m", layers=2)


def _stored_bits(folder, prefix=None):
    """Bits of the tensors the checkpoint stores (all, or those under ``prefix``), from its bytes."""
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        for name in fh.keys():
            if prefix is None or name.startswith(prefix):
                t = fh.get_tensor(name)
                total += t.numel() * t.element_size() * 8
    return total


@pytest.mark.parametrize("ignore", [[], ["mlp"]])
def test_report_counts_every_parameter_and_names_what_stays_float(model_dir, tmp_path, ignore):
    from transformers import AutoModelForCausalLM

    float_model = AutoModelForCausalLM.from_pretrained(model_dir)
    blocks = float_model.model.layers
    block_params = sum(p.numel() for p in blocks.parameters())
    model_params = sum(p.numel() for p in float_model.parameters())
    messages: list[str] = []
    doc = {**DOC, "quantize_stage": {**DOC["quantize_stage"], "ignore": ignore}}
    out = tmp_path / "o"
    report = run(parse_recipe(doc, "<cov>"), str(model_dir), out, progress=False, log=messages.append)
    cov = report["coverage"]
    assert cov["blocks"] == "model.layers"
    assert cov["block_params"] == block_params and cov["model_params"] == model_params
    mlp = sum(p.numel() for n, p in blocks.named_parameters() if "mlp" in n)
    norms = sum(p.numel() for n, p in blocks.named_parameters() if "norm" in n)
    assert cov["targeted_params"] == block_params - norms - (mlp if ignore else 0) == report["params"]
    # everything the checkpoint stores, counted from its bytes (packed codes, scales, factors, float tensors)
    assert cov["bits_per_param_blocks"] * block_params == pytest.approx(_stored_bits(out, "model.layers."),
                                                                       rel=1e-12)
    left = {r["name"]: r for r in cov["left_in_float"]}
    assert "model.embed_tokens.weight" in left and not left["model.embed_tokens.weight"]["in_blocks"]
    mlp_weights = {n for n in left if ".mlp." in n}
    warned = [m for m in messages if m.startswith("warning:") and "not compressed" in m]
    if ignore:
        assert mlp_weights == {f"model.layers.{i}.mlp.{k}_proj.weight" for i in range(2)
                               for k in ("gate", "up", "down")}
        assert cov["untargeted_block_fraction"] == pytest.approx((mlp + norms) / block_params)
        assert len(warned) == 1 and "mlp" in warned[0] and f"{cov['untargeted_block_fraction']:.0%}" in warned[0]
        assert cov["bits_per_param_blocks"] > report["avg_bits_with_lowrank"]  # the float MLP weighs in
    else:
        assert not mlp_weights and not warned
        assert cov["untargeted_block_fraction"] == pytest.approx(norms / block_params)
        assert cov["untargeted_block_fraction"] < 0.05


def test_the_table_and_inspect_show_the_coverage(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    doc = {**DOC, "quantize_stage": {**DOC["quantize_stage"], "ignore": ["mlp"]}}
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    assert main(["run", str(tmp_path / "r.yaml"), "--model", str(model_dir), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    line = next(s for s in printed.splitlines() if s.startswith("everything stored:"))
    assert f"{report['coverage']['bits_per_param_blocks']:.4f} bits per parameter over the blocks" in line
    assert "left in float: " in printed and "mlp.gate_proj.weight" in printed
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert line in shown
