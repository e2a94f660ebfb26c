"""``lqframe generate``: text from a checkpoint, streamed as it comes, greedy or seeded sampling, and
``--compare`` with the float model it was made from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lqframe
from lqframe.cli import main
from lqframe.recipe import parse_recipe
from lqframe.run import run
from tests.tiny import tiny_llama_dir

DOC = {"data": {"seq_len": 32, "calibration_windows": 2, "evaluation_windows": 0, "source": "pydoc"},
       "quantize_stage": {"quantizer": {"name": "rtn", "bits": 2, "group_size": 32}},
       "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}}, "save_stage": {}}
PROMPT = "def main():"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = tiny_llama_dir(root / "float", layers=2)
    run(parse_recipe(DOC, "<gen>"), str(model), root / "ckpt", progress=False, log=lambda s: None)
    return model, root / "ckpt"


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _greedy(model, tokenizer, n):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def test_greedy_text_is_the_checkpoints_and_compare_gives_the_float_models(checkpoint, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, ckpt = checkpoint
    result = _json(capsys, ["generate", str(ckpt), PROMPT, "--max-new-tokens", "24", "--compare", "--json",
                            "--device", "cpu"])
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    mine = _greedy(lqframe.load(ckpt), tokenizer, 24)
    theirs = _greedy(AutoModelForCausalLM.from_pretrained(source).eval(), tokenizer, 24)
    assert result["output"]["tokens"] == mine and len(mine) == 24
    assert result["output"]["text"] == tokenizer.decode(mine, skip_special_tokens=True)
    assert result["float_model"] == str(source)  # from the checkpoint's report.json
    assert result["float_output"]["tokens"] == theirs
    same = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), 24)
    assert result["agree_tokens"] == same
    assert mine != theirs  # (2-bit: the compressed model does say something else)


def test_the_text_streams_as_it_is_made(checkpoint, capsys, monkeypatch):
    from lqframe import generate as gen

    source, ckpt = checkpoint
    pieces: list[str] = []
    real = gen._Streamer.put

    def put(self, value):
        before = self.shown
        real(self, value)
        if self.shown > before:
            pieces.append("x")

    monkeypatch.setattr(gen._Streamer, "put", put)
    assert main(["generate", str(ckpt), PROMPT, "--max-new-tokens", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = _json(capsys, ["generate", str(ckpt), PROMPT, "--max-new-tokens", "16", "--json", "--device", "cpu"])
    assert out.startswith(f"--- {ckpt}\n{PROMPT}{result['output']['text']}\n(16 tokens")
    assert len(pieces) > 1  # printed piece by piece, not at the end


def test_sampling_is_seeded(checkpoint, capsys):
    _, ckpt = checkpoint
    argv = ["generate", str(ckpt), PROMPT, "--max-new-tokens", "24", "--temperature", "1.0", "--json",
            "--device", "cpu"]
    a, b = _json(capsys, [*argv, "--seed", "3"]), _json(capsys, [*argv, "--seed", "3"])
    c = _json(capsys, [*argv, "--seed", "4"])
    greedy = _json(capsys, ["generate", str(ckpt), PROMPT, "--max-new-tokens", "24", "--json", "--device", "cpu"])
    assert a["output"]["tokens"] == b["output"]["tokens"]
    assert c["output"]["tokens"] != a["output"]["tokens"]
    assert greedy["output"]["tokens"] != a["output"]["tokens"]


def test_errors_name_what_is_missing(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "report.json").unlink()
    assert main(["generate", str(bare), PROMPT, "--compare", "--device", "cpu"]) == 2
    assert "--compare needs the float model" in capsys.readouterr().err
    assert main(["generate", str(ckpt), PROMPT, "--max-new-tokens", "0", "--device", "cpu"]) == 2
    assert "max_new_tokens must be at least 1" in capsys.readouterr().err
