"""Exports other tools load: the PEFT adapter through PEFT itself, the GPTQ tensors through an
unpacker written here from the format's description (not lqframe's), the dense base model through
transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lqframe
from lqframe.errors import CheckpointError
from lqframe.export import export, gptq_layer, gptq_pack
from lqframe.lqlinear import LQLinear
from lqframe.recipe import load_recipe
from lqframe.registry import registry
from lqframe.run import run
from tests.tiny import tiny_llama_dir

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SMALL = ["data.seq_len=64", "data.calibration_windows=4", "data.evaluation_windows=3", "data.calibration=[pydoc]",
         "evaluate_stage.data=[pydoc]", "quantize_stage.quantizer.group_size=32",
         "reconstruct_stage.reconstructor.rank=8", "reconstruct_stage.reconstructor.iterations=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = tiny_llama_dir(root / "model", layers=2)
    out = root / "gptq4"
    run(load_recipe(RECIPES / "gptq4-qera32.yaml", SMALL), str(model_dir), out, progress=False)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))


def test_peft_adapter_on_the_dense_base_gives_the_models_logits(checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export(checkpoint, "dense", tmp_path / "base")
    result = export(checkpoint, "peft", tmp_path / "adapter")
    assert result["check"]["peft_logits_rel_error"] <= 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 8  # scaling 1
    # what a user does: transformers loads the base, PEFT the adapter
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ours = lqframe.load(checkpoint)
    mine, theirs = _logits(ours, IDS), _logits(tuned, IDS)
    assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5 * float(mine.abs().max()))
    # and without the adapter the base is Q alone: a different model
    with tuned.disable_adapter():
        assert not torch.allclose(mine, _logits(tuned, IDS), atol=1e-3)


def test_mixed_ranks_go_to_the_rank_pattern(checkpoint, tmp_path):
    """One layer cut to rank 4 among rank-8 layers: transformers loads the dense base, PEFT the adapter
    (its rank-4 layer from ``rank_pattern``, scaling 1 from ``alpha_pattern``), and the pair gives the
    cut model's logits; a pattern left out fails to load (shape) or changes the logits (scaling 2)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lqframe.load(checkpoint)
    name = next(n for n, m in model.named_modules() if isinstance(m, LQLinear))
    layer = model.get_submodule(name)
    with torch.no_grad():  # cut one layer to rank 4
        layer.left = torch.nn.Parameter(layer.left[:, :4].clone())
        layer.right = torch.nn.Parameter(layer.right[:4].clone())
    from lqframe.export import check_export, export_dense, export_peft

    config = export_peft(model, tmp_path / "a")
    assert config["r"] == 8 and config["rank_pattern"] == {name: 4} and config["alpha_pattern"] == {name: 4}
    check = check_export(model, "peft", tmp_path / "a")
    assert check["peft_logits_rel_error"] <= 1e-4
    export_dense(model, tmp_path / "b")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    lora = tuned.get_submodule(f"base_model.model.{name}")
    assert lora.lora_A["default"].weight.shape == (4, layer.in_features) and lora.scaling["default"] == 1.0
    mine, theirs = _logits(model, IDS), _logits(tuned, IDS)
    assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5 * float(mine.abs().max()))
    # the cut matters: the same pair with the layer's rank-8 factors gives other logits
    assert not torch.allclose(_logits(lqframe.load(checkpoint), IDS), theirs, atol=1e-4 * float(mine.abs().max()))


def _bits_lsb_first(words: np.ndarray) -> np.ndarray:
    """The bit stream of little-endian int32 words, least significant bit first."""
    raw = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)
    return np.unpackbits(raw, axis=-1, bitorder="little")


def _autogptq_3bit(column_words: np.ndarray, count: int) -> list[int]:
    """Decode one column of 3-bit GPTQ words the way AutoGPTQ lays them out: per 3 words, 32 codes —
    word 0 holds codes 0-9 at 3k and the low 2 bits of code 10 at bits 30-31; word 1 its high bit at
    bit 0, codes 11-20 at 3k+1 and the low bit of code 21 at bit 31; word 2 its high 2 bits at
    bits 0-1 and codes 22-31 at 3k+2."""
    w = [int(x) & 0xFFFFFFFF for x in column_words]
    out = []
    for t in range(0, len(w), 3):
        a, b, c = w[t:t + 3]
        out += [(a >> (3 * k)) & 7 for k in range(10)]
        out.append(((a >> 30) & 3) | ((b & 1) << 2))
        out += [(b >> (3 * k + 1)) & 7 for k in range(10)]
        out.append(((b >> 31) & 1) | ((c & 3) << 1))
        out += [(c >> (3 * k + 2)) & 7 for k in range(10)]
    return out[:count]


def _unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """rows × count codes of rows × k int32 words."""
    if bits == 3:
        return torch.tensor([_autogptq_3bit(row, count) for row in words.numpy()], dtype=torch.int64)
    stream = _bits_lsb_first(words.numpy())[:, :count * bits].reshape(words.shape[0], count, bits)
    return torch.from_numpy((stream.astype(np.int64) << np.arange(bits)).sum(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensors_unpacked_independently_equal_q(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 128, generator=g)
    qw = registry().create("quantizer", "rtn", bits=bits, group_size=32).quantize(w)
    t = gptq_layer("layer", qw, None)
    qweight, qzeros, scales, g_idx = t["layer.qweight"], t["layer.qzeros"], t["layer.scales"], t["layer.g_idx"]
    assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16
    assert qweight.shape == (128 * bits // 32, 96) and qzeros.shape == (4, 96 * bits // 32) and scales.shape == (4, 96)
    codes = _unpack(qweight.T.contiguous(), bits, 128).T  # in × out
    zeros = _unpack(qzeros, bits, 96) + 1  # the original gptq format stores zero − 1
    deq = ((codes - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]).T
    assert torch.equal(deq, qw.dequantize(torch.float32))


def test_gptq_pack_straddles_words_at_three_bits():
    codes = torch.arange(32).remainder(8).reshape(1, 32)
    words = gptq_pack(codes, 3)
    assert words.shape == (1, 3)
    assert _autogptq_3bit(words[0].numpy(), 32) == codes[0].tolist()


def test_gptq_checkpoint_folder(checkpoint, tmp_path):
    result = export(checkpoint, "gptq", tmp_path / "g")
    assert result["check"]["layers"] == 14
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and not qc["desc_act"]
    state = load_file(tmp_path / "g" / "model.safetensors")
    model = lqframe.load(checkpoint)
    for name, m in model.named_modules():
        if isinstance(m, LQLinear):
            bits = qc["bits"]
            codes = _unpack(state[f"{name}.qweight"].T.contiguous(), bits, m.in_features).T
            offset = 1 if qc["checkpoint_format"] == "gptq" else 0
            zeros = _unpack(state[f"{name}.qzeros"], bits, m.out_features) + offset
            g = state[f"{name}.g_idx"].long()
            deq = ((codes - zeros[g]).float() * state[f"{name}.scales"].float()[g]).T
            assert torch.equal(deq, m.dequantized_weight()), name
            assert f"{name}.weight" not in state
    assert "model.embed_tokens.weight" in state and state["model.embed_tokens.weight"].dtype == torch.float16
    assert (tmp_path / "g" / "tokenizer.json").is_file()


def test_a_zero_point_of_zero_needs_gptq_v2():
    w = torch.rand(32, 64) + 0.1  # all positive: the min-max grid starts at 0, zero point 0
    qw = registry().create("quantizer", "rtn", bits=4, group_size=32).quantize(w)
    assert bool((qw.block_zeros() == 0).any())
    with pytest.raises(CheckpointError, match="gptq_version 2"):
        gptq_layer("x", qw, None, version=1)
    t = gptq_layer("x", qw, None, version=2)
    zeros = _unpack(t["x.qzeros"], 4, 32)
    assert torch.equal(zeros.T.float(), qw.block_zeros())


def test_codebook_formats_are_refused_by_gptq_with_the_layer_named(tmp_path):
    model_dir = tiny_llama_dir(tmp_path / "model", layers=1)
    out = tmp_path / "nf"
    run(load_recipe(RECIPES / "nf4-svd32.yaml", ["data.seq_len=64", "data.calibration_windows=2",
                                                  "data.evaluation_windows=2", "quantize_stage.quantizer.group_size=32",
                                                  "reconstruct_stage.reconstructor.rank=4"]),
        str(model_dir), out, progress=False)
    with pytest.raises(CheckpointError, match=r"layer model\.layers\.0\.\S+ cannot be written as GPTQ: .*codebook"):
        export(out, "gptq", tmp_path / "g")


def test_cli_export_and_its_errors(checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "lqframe.cli", "export", str(checkpoint), "--to", "dense", str(tmp_path / "d"),
           "--merge"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "read back exactly" in res.stderr
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "d", torch_dtype=torch.float32)
    mine = _logits(lqframe.load(checkpoint), IDS)
    assert torch.allclose(mine, _logits(merged, IDS), rtol=1e-4, atol=1e-4 * float(mine.abs().max()))
    res = subprocess.run(cmd, capture_output=True, text=True)  # the folder is not empty now
    assert res.returncode == 2 and "not empty" in res.stderr and "Traceback" not in res.stderr
