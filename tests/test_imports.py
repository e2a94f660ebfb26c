"""Q from another tool's checkpoint (``quantize_stage.from``, lqframe.imports): GPTQ (v1, v2) and
compressed-tensors pack-quantized read back to exactly the codes and scales that were written, a
correction on an imported Q gives the very checkpoint lqframe writes when it quantizes itself, and what
cannot be represented or does not match the model is refused naming the layer or tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lqframe
from lqframe.errors import CheckpointError, RecipeError
from lqframe.export import export, gptq_pack
from lqframe.imports import read_quantized, unpack_rows
from lqframe.recipe import parse_recipe
from lqframe.run import run
from tests.tiny import tiny_llama_dir


def _doc(quantize: dict) -> dict:
    return {"data": {"seq_len": 32, "calibration_windows": 2, "evaluation_windows": 2, "source": "pydoc"},
            "quantize_stage": quantize, "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 4}},
            "evaluate_stage": {}, "save_stage": {}}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A float model, lqframe's own GPTQ + QERA checkpoint of it (asymmetric and symmetric), and the
    exports of their Q in every format lqframe reads."""
    root = tmp_path_factory.mktemp("imports")
    model = tiny_llama_dir(root / "float", layers=2)
    out = {"float": model}
    for sym in (False, True):
        ckpt = root / f"own-{sym}"
        report = run(parse_recipe(_doc({"quantizer": {"name": "gptq", "bits": 4, "group_size": 32, "symmetric": sym}}),
                                  "<own>"), str(model), ckpt, progress=False, log=lambda s: None)
        out[("own", sym)] = (ckpt, report)
        for fmt, extra in (("gptq", {}), ("gptq_v2", {"gptq_version": 2}), ("compressed-tensors", {})):
            folder = root / f"{fmt}-{sym}"
            export(ckpt, fmt.split("_")[0], folder, **extra)
            out[(fmt, sym)] = folder
    return out


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "compressed-tensors"])
def test_q_reads_back_exactly(made, fmt, sym):
    ckpt, _ = made[("own", sym)]
    model = lqframe.load(ckpt)
    method, layers = read_quantized(made[(fmt, sym)])
    assert method == fmt.split("_")[0] and len(layers) == 14
    for name, qw in layers.items():
        mine = model.get_submodule(name).quantized_weight()
        assert torch.equal(qw.unpacked_codes(), mine.unpacked_codes()), name
        assert torch.equal(qw.block_scales(), mine.block_scales()), name
        assert torch.equal(qw.block_zeros(), mine.block_zeros()), name
        assert torch.equal(qw.dequantize(), mine.dequantize()), name
        assert qw.storage_bits() == mine.storage_bits()


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_correcting_an_imported_q_gives_lqframes_own_checkpoint(made, tmp_path, fmt):
    """QERA-exact on the imported Q, with statistics from the float model: the same bytes as the run
    that quantized the model itself (its GPTQ Q, then the same QERA)."""
    ckpt, ref = made[("own", False)]
    messages: list[str] = []
    report = run(parse_recipe(_doc({"from": str(made[(fmt, False)])}), "<imported>"), str(made["float"]),
                 tmp_path / "o", progress=False, log=messages.append)
    assert any(f"Q of 14 layers read from the {fmt} checkpoint" in m for m in messages)
    assert report["ppl"] == ref["ppl"]
    assert {r["quantizer"] for r in report["layers"]} == {f"imported:{fmt}"}
    a, b = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the checkpoint reloads as any other
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lqframe.load(tmp_path / "o")(ids).logits, lqframe.load(ckpt)(ids).logits)


def test_a_streamed_correction_of_an_imported_q_writes_the_same_bytes(made, tmp_path):
    """A model larger than memory corrected from an imported Q: streamed block by block from its shards,
    the checkpoint is byte for byte the resident run's."""
    doc = parse_recipe(_doc({"from": str(made[("compressed-tensors", False)])}), "<imported>")
    run(doc, str(made["float"]), tmp_path / "resident", progress=False, log=lambda s: None)
    run(doc, str(made["float"]), tmp_path / "streamed", stream=True, progress=False, log=lambda s: None)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("resident", "streamed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_model_is_refused_naming_the_layer(made, tmp_path):
    other = tiny_llama_dir(tmp_path / "other", layers=2, hidden=32, intermediate=96)
    with pytest.raises(RecipeError, match=r"quantize_stage.from: layer model\.layers\.0\.mlp\.down_proj is "
                                          r"\(64, 160\) in .* and \(32, 96\) in the model: it was not made from"):
        run(parse_recipe(_doc({"from": str(made[("gptq", False)])}), "<imported>"), str(other), tmp_path / "o",
            progress=False, log=lambda s: None)


def _act_order(source, folder, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPTQ act-order (``desc_act``) checkpoint made from the GPTQ folder ``source``: in every layer a
    random permutation gives the input channels to the groups (``g_idx``) and the codes move with their
    channels. Returns each layer's weight decoded straight from the published layout: input channel i
    takes the scale and zero point of group ``g_idx[i]``."""
    import shutil

    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    decoded = {}
    for key in sorted(k for k in state if k.endswith(".qweight")):
        name = key[: -len(".qweight")]
        scales = state[f"{name}.scales"].float()  # groups × out
        groups, out_f = scales.shape
        in_f = state[key].shape[0] * 8
        codes = unpack_rows(state[key].T.contiguous(), 4, in_f)  # out × in, groups contiguous runs
        order = torch.randperm(in_f, generator=gen)
        moved = torch.empty_like(codes)
        moved[:, order] = codes
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_f) // (in_f // groups)).to(torch.int32)
        state[key] = gptq_pack(moved, 4).T.contiguous()
        state[f"{name}.g_idx"] = g_idx
        zeros = unpack_rows(state[f"{name}.qzeros"], 4, out_f) + 1  # groups × out (v1: stored minus one)
        decoded[name] = (moved - zeros[g_idx.long()].T) * scales[g_idx.long()].T
    save_file(state, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return decoded


def test_a_gptq_act_order_checkpoint_is_read_as_its_layout_says(made, tmp_path):
    """act-order groups (g_idx) are read as a column order: Q decodes to the published layout's weight,
    a QERA correction on it is saved and reloaded as any other, and the GPTQ export writes the same
    codes, scales and g_idx back (desc_act); compressed-tensors, which dropped group act-order, refuses."""
    decoded = _act_order(made[("gptq", False)], tmp_path / "actorder")
    _, layers = read_quantized(tmp_path / "actorder")
    for name, qw in layers.items():
        assert qw.perm is not None, name
        assert torch.equal(qw.dequantize(), decoded[name]), name
        assert float(qw.error_bound(decoded[name]).max()) == 0.0, name  # on its grid, channel by channel
    plain = read_quantized(made[("gptq", False)])[1]
    assert all(qw.storage_bits() == plain[n].storage_bits() + 32 * qw.cols for n, qw in layers.items())
    config = {"data": {"seq_len": 32, "calibration_windows": 2, "evaluation_windows": 2, "source": "pydoc"},
              "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 4}}, "save_stage": {}}
    (tmp_path / "recipe.yaml").write_text(json.dumps(config))
    from lqframe.cli import main

    assert main(["run", str(tmp_path / "recipe.yaml"), "--model", str(made["float"]), "--from",
                 str(tmp_path / "actorder"), "--output", str(tmp_path / "o"), "--quiet", "--json"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {r["quantizer"] for r in report["layers"]} == {"imported:gptq"}
    assert all(r["info"]["output_error"] < r["info"]["output_error_none"] for r in report["layers"])
    model = lqframe.load(tmp_path / "o")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for name, weight in decoded.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.dequantized_weight(), weight), name
        if layer.in_features == 64:  # the packed forward computes in the input's order
            want = x @ layer.dense_weight().T + (layer.bias if layer.bias is not None else 0)
            assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5), name
    from transformers import AutoModelForCausalLM  # the column order survives transformers' loader too

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "o")(ids).logits, model(ids).logits)
    export(tmp_path / "o", "gptq", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]["desc_act"] is True
    again = read_quantized(tmp_path / "back")[1]
    source = load_file(tmp_path / "actorder" / "model.safetensors")
    written = load_file(tmp_path / "back" / "model.safetensors")
    for name, qw in layers.items():
        assert torch.equal(again[name].perm, qw.perm) and torch.equal(again[name].dequantize(), qw.dequantize())
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(written[f"{name}.{part}"], source[f"{name}.{part}"]), (name, part)
    with pytest.raises(CheckpointError, match=r"layer model\.layers\.0\.self_attn\.q_proj cannot be written as "
                                              r"compressed-tensors pack-quantized: its groups are act-order sets"):
        export(tmp_path / "o", "compressed-tensors", tmp_path / "ct")


def test_what_lqframe_cannot_hold_is_refused_naming_the_tensor(made, tmp_path):
    import shutil

    folder = tmp_path / "actorder"
    shutil.copytree(made[("gptq", False)], folder)
    state = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.g_idx"
    state[name] = torch.zeros_like(state[name])  # every channel in group 0: groups of unequal size
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.g_idx: its groups are not 5 sets "
                                              r"of 32 input channels \(sizes \[0, 160\]\)"):
        read_quantized(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quant_method 'awq': lqframe reads Q from gptq, compressed-tensors"):
        read_quantized(folder)
    with pytest.raises(RecipeError, match=r"allocate_stage.candidates\[1\]: quantize_stage.from fixes Q: a candidate "
                                          r"may set only reconstructor options .* not quantizer \{'bits': 4\}"):
        parse_recipe({**_doc({"from": "x"}), "allocate_stage": {
            "allocator": "ilp", "budget_bits": 3, "include_lowrank": True,
            "candidates": [{"reconstructor": {"rank": 2}}, {"quantizer": {"bits": 4}}]}}, "<r>")
    with pytest.raises(RecipeError, match=r"allocate_stage.include_lowrank: with quantize_stage.from every candidate "
                                          r"stores the same Q"):
        parse_recipe({**_doc({"from": "x"}), "allocate_stage": {
            "allocator": "ilp", "budget_bits": 3, "grid": {"reconstructor": {"rank": [2, 4]}}}}, "<r>")


def test_ranks_are_allocated_on_an_imported_q(made, tmp_path):
    """allocate_stage on an imported Q: the ILP chooses each matrix's rank under a budget that counts
    Q + L·R; Q stays the checkpoint's in every layer, and the cost cache tells two imported Qs apart."""
    _, layers = read_quantized(made[("gptq", False)])
    q_bits = sum(qw.storage_bits() for qw in layers.values()) / sum(qw.numel for qw in layers.values())
    doc = {**_doc({"from": str(made[("gptq", False)])}), "allocate_stage": {
        "allocator": "ilp", "budget_bits": q_bits + 1.0, "include_lowrank": True, "metric": "output",
        "cache": str(tmp_path / "costs.sqlite"), "grid": {"reconstructor": {"rank": [1, 2, 4, 8]}}}}
    messages: list[str] = []
    report = run(parse_recipe(doc, "<ranks>"), str(made["float"]), tmp_path / "o", progress=False,
                 log=messages.append)
    ranks = {r["name"]: r["rank"] for r in report["layers"]}
    assert len(set(ranks.values())) >= 2, ranks  # a real choice, not one rank everywhere
    rows = report["layers"]
    spent = sum(r["storage_bits"] + r["lowrank_bits"] for r in rows) / sum(r["numel"] for r in rows)
    assert q_bits < spent <= q_bits + 1.0 + 1e-9
    model = lqframe.load(tmp_path / "o")
    for name, qw in layers.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), qw.dequantize()), name
    assert any("0 from the cache" in m and "56 computed" in m for m in messages)
    # the same Q again: every cost from the cache, the same checkpoint
    messages.clear()
    run(parse_recipe(doc, "<ranks>"), str(made["float"]), tmp_path / "again", progress=False, log=messages.append)
    assert any("56 from the cache" in m for m in messages)
    assert torch.equal(load_file(tmp_path / "o" / "model.safetensors")["model.layers.0.mlp.up_proj.left"],
                       load_file(tmp_path / "again" / "model.safetensors")["model.layers.0.mlp.up_proj.left"])
    # another Q of the same model: nothing from the cache
    messages.clear()
    other = {**doc, "quantize_stage": {"from": str(made[("gptq", True)])}}
    run(parse_recipe(other, "<ranks>"), str(made["float"]), tmp_path / "sym", progress=False, log=messages.append)
    assert any("0 from the cache" in m for m in messages)


def test_unpack_reads_rows_least_significant_bit_first():
    words = torch.tensor([[0x76543210, 0x00000098]], dtype=torch.int64).to(torch.int32)
    assert unpack_rows(words, 4, 10).tolist() == [list(range(10))]
    three = torch.tensor([[(1 << 30) | (5 << 3) | 7, 0b1]], dtype=torch.int64).to(torch.int32)  # element 10 straddles
    assert unpack_rows(three, 3, 12).tolist()[0][:3] == [7, 5, 0] and unpack_rows(three, 3, 12)[0, 10] == 5


def _library_checkpoint(model_dir, folder, symmetric: bool) -> dict[str, torch.Tensor]:
    """An llm-compressor-style pack-quantized checkpoint of the model at ``model_dir``, written with the
    compressed-tensors library (its qparams, its compressor, its config); returns the library's own
    dequantization of every layer."""
    compressed_tensors = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state, decoded = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.detach()
            blocks = w.reshape(w.shape[0], -1, 32)
            scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
            packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale,
                                                            "weight_zero_point": zero}, scheme)
            state.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
            decoded[name] = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    state.update({k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in decoded})
    folder.mkdir(parents=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                                       quantization_status="compressed",
                                                       ignore=["lm_head"]).model_dump()
    config["quantization_config"]["version"] = compressed_tensors.__version__
    (folder / "config.json").write_text(json.dumps(config, default=str))
    save_file(state, folder / "model.safetensors")
    return decoded


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_checkpoint_the_compressed_tensors_library_wrote_is_corrected(made, tmp_path, symmetric):
    decoded = _library_checkpoint(made["float"], tmp_path / "ct", symmetric)
    _, layers = read_quantized(tmp_path / "ct")
    assert layers.keys() == decoded.keys() and len(layers) == 14
    for name, qw in layers.items():  # the library's own dequantization, exactly
        assert torch.equal(qw.dequantize(), decoded[name].float()), name
    report = run(parse_recipe(_doc({"from": str(tmp_path / "ct")}), "<library>"), str(made["float"]),
                 tmp_path / "o", progress=False, log=lambda s: None)
    model = lqframe.load(tmp_path / "o")
    for name, weight in decoded.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), weight.float()), name
    # the correction helps: every layer's output error with L·R is below its imported Q's alone
    assert all(r["info"]["output_error"] < r["info"]["output_error_none"] for r in report["layers"])


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """A float model whose widths are whole bitsandbytes blocks (64) and its 4-bit checkpoints, written
    by transformers + bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``, on CPU): QLoRA's NF4 with
    double-quantized scales, and FP4 with float32 scales."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("qlora")
    out = {"float": tiny_llama_dir(root / "float", layers=2, intermediate=128)}
    for kind, double in (("nf4", True), ("fp4", False)):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double,
                                    bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(out["float"], quantization_config=config, device_map="cpu")
        model.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def _bnb_dequantized(folder) -> dict[str, torch.Tensor]:
    """bitsandbytes' own dequantization of every 4-bit layer stored in ``folder``."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    state = load_file(folder / "model.safetensors")
    names = {k.split(".weight.quant_state.")[0] for k in state if ".weight.quant_state." in k}
    out = {}
    for name in names:
        parts = {k[len(name) + len(".weight."):]: v for k, v in state.items() if k.startswith(f"{name}.weight.")}
        out[name] = dequantize_4bit(state[f"{name}.weight"], QuantState.from_dict(parts, device=torch.device("cpu")))
    return out


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_a_bitsandbytes_4bit_checkpoint_reads_to_the_librarys_dequantization(qlora, kind):
    from lqframe.registry import registry

    method, layers = read_quantized(qlora[kind])
    want = _bnb_dequantized(qlora[kind])
    assert method == "bitsandbytes" and layers.keys() == want.keys() and len(layers) == 14
    for name, qw in layers.items():
        assert torch.equal(qw.dequantize(), want[name]), name
        assert qw.format == kind and qw.block_size == 64
    if kind == "nf4":  # QLoRA's layout is nf's double_quant: qlora, bit for bit in what it stores
        nf = registry().create("quantizer", "nf", bits=4, group_size=64, double_quant="qlora")
        assert all(qw.storage_bits() == nf.storage_bits(qw.shape) for qw in layers.values())
        assert all(torch.equal(qw.codebook, nf.quantize(torch.randn(2, 64)).codebook) for qw in layers.values())


def test_a_qlora_base_is_corrected_and_its_adapter_serves_on_the_original_checkpoint(qlora, tmp_path):
    """QERA on QLoRA's NF4 base: the corrected checkpoint holds the base's Q unchanged, so the original
    bitsandbytes checkpoint loaded by transformers plus lqframe's PEFT adapter computes lqframe's model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = run(parse_recipe(_doc({"from": str(qlora["nf4"])}), "<qlora>"), str(qlora["float"]), tmp_path / "o",
                 progress=False, log=lambda s: None)
    assert {r["quantizer"] for r in report["layers"]} == {"imported:bitsandbytes"}
    assert all(r["info"]["output_error"] < r["info"]["output_error_none"] for r in report["layers"])
    model = lqframe.load(tmp_path / "o")
    for name, weight in _bnb_dequantized(qlora["nf4"]).items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), weight), name
    export(tmp_path / "o", "peft", tmp_path / "adapter", base_model=str(qlora["nf4"]))
    base = AutoModelForCausalLM.from_pretrained(qlora["nf4"], device_map="cpu")
    # train mode (no dropout anywhere here): bitsandbytes then computes with its dequantized weight; in
    # eval mode on a CPU with AVX512-BF16 it switches to a bfloat16 kernel (≈ 3e-3 relative per layer)
    served = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = served(input_ids=ids).logits, model(input_ids=ids).logits
        with served.disable_adapter():
            alone = served(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert float((alone - want).abs().max() / want.abs().max()) > 1e-3


def test_bitsandbytes_layouts_lqframe_cannot_hold_are_refused(made, qlora, tmp_path):
    import shutil

    folder = tmp_path / "int8"
    shutil.copytree(qlora["nf4"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"bitsandbytes 8-bit \(LLM.int8\) checkpoint: lqframe reads"):
        read_quantized(folder)
    # the block of 64 runs over the flattened weight: 160 input channels put blocks across rows
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    AutoModelForCausalLM.from_pretrained(made["float"], quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), device_map="cpu").save_pretrained(tmp_path / "odd")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: 160 input channels are not "
                                              r"a multiple of bitsandbytes' block of 64"):
        read_quantized(tmp_path / "odd")
