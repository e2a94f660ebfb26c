"""The compressed-tensors export (llm-compressor's ``pack-quantized`` format, which vLLM serves):
decoded by the compressed-tensors library's own decompressor to exactly lqframe's Q, loaded by
transformers (its compressed-tensors integration decompresses on CPU) into a model with lqframe's
Q-only logits, and refused with the layer named where the format cannot hold it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lqframe
from lqframe.errors import CheckpointError
from lqframe.export import _dense_base, ct_layer, ct_pack, export
from lqframe.recipe import parse_recipe
from lqframe.registry import registry
from lqframe.run import run
from tests.tiny import tiny_llama_dir

compressed_tensors = pytest.importorskip("compressed_tensors")


def _doc(quantizer: dict, **extra) -> dict:
    return {"data": {"seq_len": 32, "calibration_windows": 2, "evaluation_windows": 0, "source": "pydoc"},
            "quantize_stage": {"quantizer": quantizer, **extra},
            "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}}, "save_stage": {}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("ct") / "m", layers=2)


def _checkpoint(model_dir, tmp_path, quantizer, **extra):
    out = tmp_path / "ckpt"
    run(parse_recipe(_doc(quantizer, **extra), "<ct>"), str(model_dir), out, progress=False, log=lambda s: None)
    return out


def _library_decoded(folder, name: str) -> torch.Tensor:
    """Layer ``name``'s weight as compressed-tensors' own decompressor reads the export."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = load_file(folder / "model.safetensors")
    group = next(g for g in config["config_groups"].values() if g["targets"] == ["Linear"] or name in g["targets"])
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    return PackedQuantizationCompressor.decompress(own, scheme)["weight"]


@pytest.mark.parametrize("quantizer", [
    {"name": "gptq", "bits": 4, "group_size": 32},                      # asymmetric: packed zero points
    {"name": "gptq", "bits": 4, "group_size": 32, "symmetric": True},   # llm-compressor's W4A16
    {"name": "rtn", "bits": 3, "group_size": 32, "symmetric": True},    # codes straddling words
    {"name": "rtn", "bits": 8, "group_size": 32},
], ids=["gptq4-asym", "gptq4-sym", "rtn3-sym", "rtn8-asym"])
def test_the_librarys_decompressor_reads_back_q(model_dir, tmp_path, quantizer):
    ckpt = _checkpoint(model_dir, tmp_path, quantizer)
    result = export(ckpt, "compressed-tensors", tmp_path / "ct")
    model = lqframe.load(ckpt)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "dequantized_weight")}
    assert result["check"]["layers"] == len(layers) == 14
    for name, layer in layers.items():
        assert torch.equal(_library_decoded(tmp_path / "ct", name).float(), layer.dequantized_weight()), name
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["format"], weights["num_bits"], weights["symmetric"]) == (
        "pack-quantized", quantizer["bits"], quantizer.get("symmetric", False))
    assert config["ignore"] == ["lm_head"]


@pytest.mark.parametrize("mixed", [False, True])
def test_transformers_loads_the_export_with_lqframes_q(model_dir, tmp_path, mixed):
    """Symmetric schemes (what llm-compressor writes by default); ``mixed``: two bit widths, two config
    groups naming their layers."""
    from transformers import AutoModelForCausalLM

    extra = {"overrides": [{"targets": ["mlp"], "quantizer": {"bits": 3}}]} if mixed else {}
    ckpt = _checkpoint(model_dir, tmp_path, {"name": "gptq", "bits": 4, "group_size": 32, "symmetric": True},
                       **extra)
    export(ckpt, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == (2 if mixed else 1)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    model = lqframe.load(ckpt)
    base = _dense_base(model, {n: m.dequantized_weight() for n, m in model.named_modules()
                               if hasattr(m, "dequantized_weight")}).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = theirs(input_ids=ids).logits, base(input_ids=ids).logits  # (decompresses on this forward)
    assert torch.equal(got, want)
    for name, module in theirs.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            assert torch.equal(module.weight, model.get_submodule(name).dequantized_weight()), name


def test_pack_layout_is_the_formats():
    """Element i of a row at bits i·b … i·b + b − 1 of the row's little-endian words, rows padded to
    whole words; compared with compressed-tensors' own packer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        codes = torch.randint(0, 2 ** bits, (5, 45), generator=gen)
        signed = (codes - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(ct_pack(codes, bits), pack_to_int32(signed, bits)), bits
        assert torch.equal(ct_pack(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0)), bits


def test_formats_it_cannot_hold_are_refused_with_the_layer_named(model_dir, tmp_path):
    nf = _checkpoint(model_dir, tmp_path, {"name": "nf", "bits": 4, "group_size": 32})
    with pytest.raises(CheckpointError, match=r"layer model\.layers\.0\.self_attn\.q_proj cannot be written as "
                                              r"compressed-tensors pack-quantized: its format .* codebook"):
        export(nf, "compressed-tensors", tmp_path / "out")
    qw = registry().create("quantizer", "rtn", bits=4, group_size=48).quantize(torch.randn(8, 64))
    with pytest.raises(CheckpointError, match=r"layer x cannot .* 64 input channels are not a whole number of groups"):
        ct_layer("x", qw, None)


def test_transformers_serves_the_pair_quantized_base_plus_adapter(model_dir, tmp_path):
    """The serving pair: transformers loads Q from the compressed-tensors export, PEFT attaches L·R from
    the PEFT export of the same checkpoint, and the result computes lqframe's model (Q + L·R)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = _checkpoint(model_dir, tmp_path, {"name": "gptq", "bits": 4, "group_size": 32, "symmetric": True})
    export(ckpt, "compressed-tensors", tmp_path / "base")
    export(ckpt, "peft", tmp_path / "adapter", base_model=str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # transformers decompresses Q on the first forward; PEFT needs the weights there
        base(input_ids=ids[:, :2])
    served = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got, want = served(input_ids=ids).logits, lqframe.load(ckpt)(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    with torch.no_grad(), served.disable_adapter():  # Q alone computes something else: the adapter counts
        alone = served(input_ids=ids).logits
    assert float((alone - want).abs().max() / want.abs().max()) > 1e-3
