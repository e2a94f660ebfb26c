"""The run engine on tiny real models: sequential propagation, teacher outputs, one engine behind
every entry point, the statistics store, planning errors, devices and offloading."""

from __future__ import annotations

import contextlib
import copy

import attrs
import pytest
import torch
from safetensors import safe_open

import lqframe
from lqframe import engine
from lqframe.data import make_data, make_windows
from lqframe.engine import RunState, execute
from lqframe.executor import KeepFloat64, resolve_device
from lqframe.lqlinear import LQLinear
from lqframe.models import find_blocks
from lqframe.recipe import parse_recipe
from lqframe.stats import StatisticKind, StatsStore
from tests.tiny import byte_tokenizer, tiny_llama

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def recipe(quantizer="rtn", reconstructor="qera-exact", **extra):
    doc = {"data": {"seq_len": 48, "calibration_windows": 3, "evaluation_windows": 2},
           "quantize_stage": {"quantizer": {"name": quantizer, "bits": 4, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": reconstructor, "rank": 4}}, **extra}
    return parse_recipe(doc, "<test>")


@pytest.fixture(scope="module")
def windows():
    return make_windows(byte_tokenizer(), "pydoc", 48, 3, 2, 0)


def _block_inputs(model, windows, block_index):
    """Σxxᵀ (float64) of every linear's input in block ``block_index`` in a plain forward pass."""
    _, blocks = find_blocks(model)
    block = blocks[block_index]
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear | LQLinear):
            def hook(m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
            hooks.append(mod.register_forward_pre_hook(hook))
    wide = next(model.parameters()).dtype == torch.float64
    with torch.inference_mode(), KeepFloat64() if wide else contextlib.nullcontext():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    return sums


def test_statistics_of_block_k_come_from_the_compressed_prefix(windows, monkeypatch):
    """The rxx a layer of block k is fitted to equals Σxxᵀ of its inputs in a forward pass of the model
    whose blocks 0..k−1 are already compressed (and block k still float), computed in float64 like the
    engine's calibration forwards (quantize_stage.precision, by default)."""
    float_model = tiny_llama(layers=3)
    model = copy.deepcopy(float_model)
    seen: dict[str, torch.Tensor] = {}
    original = engine.decompose_layer

    def record(name, linear, plan, stats, *args, **kwargs):
        seen[name] = stats.rxx.clone()
        return original(name, linear, plan, stats, *args, **kwargs)

    monkeypatch.setattr(engine, "decompose_layer", record)
    lqframe.compress(model, recipe(), windows.calibration, device="cpu", progress=False)
    compressed = model.model.layers
    for k in (1, 2):
        mixed = copy.deepcopy(float_model)
        _, blocks = find_blocks(mixed)
        for i in range(k):
            blocks[i] = copy.deepcopy(compressed[i])
        ref = _block_inputs(mixed.double(), windows.calibration, k)
        prefix = f"model.layers.{k}."
        layers = [n for n in seen if n.startswith(prefix)]
        assert len(layers) == 7
        for name in layers:
            torch.testing.assert_close(seen[name], ref[name.removeprefix(prefix)], rtol=1e-9, atol=1e-9)
        # and not the float model's statistics: propagation matters
        float_ref = _block_inputs(copy.deepcopy(float_model).double(), windows.calibration, k)
        assert not torch.allclose(seen[prefix + "mlp.down_proj"], float_ref["mlp.down_proj"], rtol=1e-6)


@pytest.mark.parametrize("allocate", [False, True])
def test_teacher_outputs_are_the_float_models_block_outputs(windows, allocate):
    float_model = tiny_llama(layers=3)
    _, blocks = find_blocks(float_model)
    outs: dict[int, list[torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(o[0] if isinstance(
        o, tuple) else o)) for i, b in enumerate(blocks)]
    with torch.inference_mode():
        for w in windows.calibration:
            float_model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    extra = {}
    if allocate:  # the data-aware allocation path keeps them from its float calibration pass
        extra["allocate_stage"] = {"allocator": "uniform", "candidates": [{"bits": 4}, {"bits": 3}]}
    state = RunState(recipe(**extra), copy.deepcopy(float_model), calibration=windows.calibration,
                     teacher_blocks=frozenset({0, 2}), progress=False)
    execute(state, only=engine.COMPRESSION_STAGES)
    assert set(state.teacher) == {0, 2}
    for b in (0, 2):
        assert len(state.teacher[b]) == len(windows.calibration)
        for got, want in zip(state.teacher[b], outs[b], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _tensors(path):
    with safe_open(path, framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_run_and_compress_give_the_same_checkpoint(tmp_path, windows):
    """`lqframe run` and `lqframe.compress` are one engine: the same recipe gives the same tensors."""
    from lqframe.checkpoint import save_checkpoint
    from lqframe.models import load_model
    from lqframe.run import run
    from tests.tiny import tiny_llama_dir

    model_dir = tiny_llama_dir(tmp_path / "m", layers=2)
    r = recipe("gptq", "qera-exact", save_stage={})
    run(r, str(model_dir), tmp_path / "run", device="cpu", progress=False)
    loaded = load_model(str(model_dir))
    # as run() cuts them: the source's evaluation windows are held out even without an evaluate_stage
    data = make_data(loaded.tokenizer, ["pydoc"], [], 48, 3, r.data.evaluation_windows, 0).calibration
    lqframe.compress(loaded.model, r, data, device="cpu", progress=False)
    save_checkpoint(loaded.model, tmp_path / "api")
    a, b = _tensors(tmp_path / "run" / "model.safetensors"), _tensors(tmp_path / "api" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offloaded_blocks_give_the_same_result(windows):
    """offload: blocks and activations wait in CPU memory, one block on the device at a time."""
    base = tiny_llama(layers=2)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = lqframe.compress(a, recipe(), windows.calibration, device="cpu", progress=False)
    rb = lqframe.compress(b, recipe(), windows.calibration, device="cpu", offload=True, progress=False)
    assert [r.rel_output_error for r in ra] == [r.rel_output_error for r in rb]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- statistics


def test_store_merges_partial_statistics_by_their_rules():
    x = torch.randn(300, 5, dtype=torch.float64)
    whole, parts = StatsStore(), [StatsStore(), StatsStore(), StatsStore()]
    needs = {"rxx", "sq_sum", "abs_sum", "abs_mean_max"}
    acc = whole.accumulator("in", ["a", "b"], 5, needs)
    for chunk in x.split(100):
        acc.update(chunk)
    pieces = [p.accumulator("in", ["a", "b"], 5, needs) for p in parts]
    for piece, chunk in zip(pieces, x.split(100), strict=True):
        piece.update(chunk)
    merged = pieces[0]
    merged.merge(pieces[1])
    merged.merge(pieces[2])
    got, want = merged.finalize(), whole.layer_stats("b")
    assert got.n_tokens == want.n_tokens == 300
    for name in needs:
        torch.testing.assert_close(got.get(name), want.get(name), rtol=1e-12, atol=1e-12)
    assert torch.equal(want.abs_mean_max, torch.stack([c.abs().mean(0) for c in x.split(100)]).max(0).values)
    whole.drop(["a"])
    assert whole.layer_stats("b") is not None
    whole.drop(["b"])
    assert whole.layer_stats("b") is None and not whole.inputs


@attrs.frozen
class _Needs(lqframe.ErrorReconstructor):
    """A test reconstructor that needs the statistics named in ``wants`` and records what it got."""

    wants: tuple = ()
    seen: list = attrs.field(factory=list, eq=False)

    @property
    def needs(self):  # noqa: D401 - instance-level needs for the test
        return frozenset(self.wants)

    def decompose(self, weight, quantizer, stats=None):
        _SEEN.append({n: stats.get(n) for n in self.wants})
        return lqframe.Decomposition(quantizer.quantize(weight), None)


_SEEN: list = []


class _Plugin:
    def __init__(self, kinds=()):
        self.kinds = kinds

    @lqframe.hookimpl
    def lqframe_register(self, registry):
        registry.add_reconstructor("test-needs", _Needs)
        for kind in self.kinds:
            registry.add_statistic(kind)


@pytest.fixture
def plugin_registry():
    reg = lqframe.registry()
    yield reg
    for name in ("test-engine", "test-engine-kinds"):
        reg.unregister_plugin(name)
    reg._statistics = {k: v for k, v in reg._statistics.items() if k in lqframe.STAT_NAMES}


def _needs_recipe(wants):
    doc = {"data": {"seq_len": 48, "calibration_windows": 3, "evaluation_windows": 0},
           "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "test-needs", "wants": list(wants)}}}
    return parse_recipe(doc, "<needs>")


def test_gradient_statistic_without_a_producer_is_refused_at_planning(plugin_registry, windows):
    plugin_registry.register_plugin(_Plugin((StatisticKind("orphan_grad", "sum", source="gradient"),)),
                                    "test-engine")
    model = tiny_llama(layers=1)
    with pytest.raises(lqframe.RecipeError, match="'orphan_grad'.*gradient pass.*no installed plugin produces it"):
        lqframe.compress(model, _needs_recipe(["orphan_grad"]), windows.calibration, device="cpu", progress=False)
    assert not any(isinstance(m, LQLinear) for m in model.modules())  # refused before any work
    with pytest.raises(lqframe.RecipeError, match="'nonesuch', which no installed plugin defines"):
        lqframe.compress(model, _needs_recipe(["nonesuch"]), windows.calibration, device="cpu", progress=False)


def _block_abs_max(model, windows, block_index):
    """Per-channel max |x| (float64) of every linear's input in block ``block_index`` over every token
    of ``windows``, in a plain float64 forward pass (as the engine's calibration forwards compute)."""
    _, blocks = find_blocks(model)
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in blocks[block_index].named_modules():
        if isinstance(mod, torch.nn.Linear | LQLinear):
            def hook(m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)
                out[name] = torch.maximum(out[name], x) if name in out else x
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.inference_mode(), KeepFloat64():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    return out


def test_plugin_statistics_forward_and_gradient(plugin_registry, windows, monkeypatch):
    """A plugin can add a forward statistic (merged by max) and a gradient statistic with a producer;
    components that list them in ``needs`` receive them: each layer its own values."""
    produced = {}

    def produce(ctx):  # a per-layer value (W², of the float weights) so that a mix-up of layers shows
        produced["layers"] = list(ctx.layers)
        return {name: ctx.model.get_submodule(name).weight.detach().double().square() for name in ctx.layers}

    kinds = (StatisticKind("abs_max", "max", lambda x: x.abs().max(0).values),
             StatisticKind("toy_grad", "sum", source="gradient", produce=produce))
    plugin_registry.register_plugin(_Plugin(kinds), "test-engine-kinds")
    names = []
    original = engine.decompose_layer

    def record(name, *args, **kwargs):  # the layer whose component _SEEN's next entry comes from
        names.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(engine, "decompose_layer", record)
    _SEEN.clear()
    model = tiny_llama(layers=1)
    float_model = copy.deepcopy(model)
    # one block: every layer's inputs come from the float model, computed in float64 like the engine's
    want = _block_abs_max(copy.deepcopy(model).double(), windows.calibration, 0)
    lqframe.compress(model, _needs_recipe(["abs_max", "toy_grad"]), windows.calibration, device="cpu",
                     progress=False)
    prefix = "model.layers.0."
    assert len(_SEEN) == 7 and sorted(names) == sorted(produced["layers"]) == sorted(prefix + n for n in want)
    for name, got in zip(names, _SEEN, strict=True):
        short = name.removeprefix(prefix)
        # the largest |x| per channel over every calibration token: max is exact, and both sides run the
        # same float64 operations on the same windows, so the values agree bit for bit (a "sum" merge,
        # a missed window or another layer's input cannot)
        assert got["abs_max"].dtype == torch.float64
        torch.testing.assert_close(got["abs_max"], want[short], rtol=0, atol=0,
                                   msg=lambda m, name=name: f"abs_max of {name}: {m}")
        # the producer's value for this very layer, added once
        weight = float_model.get_submodule(name).weight.detach().double()
        torch.testing.assert_close(got["toy_grad"], weight.square(), rtol=0, atol=0,
                                   msg=lambda m, name=name: f"toy_grad of {name}: {m}")


# --------------------------------------------------------------------------- devices


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(lqframe.LqframeError, match="no CUDA device is available"):
            resolve_device("cuda:0")
    with pytest.raises(lqframe.LqframeError, match="not supported"):
        resolve_device("mps")
    with pytest.raises(lqframe.RecipeError, match="device must be auto, cpu, cuda or cuda:N"):
        recipe(device="gpu0")


@CUDA
@pytest.mark.parametrize("method", [("rtn", "svd"), ("gptq", "qera-exact"), ("nf", "qera-approx")])
def test_cpu_and_cuda_agree(windows, method):
    base = tiny_llama(layers=2)
    cpu, gpu = copy.deepcopy(base), copy.deepcopy(base)
    r = recipe(*method)
    rc = lqframe.compress(cpu, r, windows.calibration, device="cpu", progress=False)
    rg = lqframe.compress(gpu, r, windows.calibration, device="cuda", progress=False)
    assert next(gpu.parameters()).device.type == "cuda"
    for a, b in zip(rc, rg, strict=True):
        assert a.rel_output_error == pytest.approx(b.rel_output_error, rel=0.05, abs=1e-4)
    x = windows.evaluation[:1]
    with torch.inference_mode():
        la = cpu(input_ids=x).logits
        lb = gpu(input_ids=x.cuda()).logits.cpu()
    assert (la - lb).abs().max() / la.abs().max() < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_compressed_model_evaluates_on_the_device(tmp_path, device):
    from lqframe.run import run
    from tests.tiny import tiny_llama_dir

    model_dir = tiny_llama_dir(tmp_path / "m", layers=2)
    report = run(recipe(evaluate_stage={}), str(model_dir), tmp_path / "o", device=device, progress=False)
    assert report["versions"]["device"].startswith(device)
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["versions"]["plugins"]) == {"quantizer:rtn", "reconstructor:qera-exact"}
    assert report["ppl"] < 2 * report["fp_ppl"]


def test_offloaded_run_evaluates_like_the_resident_one(tmp_path):
    """With --offload the evaluation moves each block onto the device just for its forward."""
    from lqframe.run import run
    from tests.tiny import tiny_llama_dir

    model_dir = tiny_llama_dir(tmp_path / "m", layers=2)
    r = recipe(evaluate_stage={})
    resident = run(r, str(model_dir), tmp_path / "a", device="cpu", progress=False)
    offloaded = run(r, str(model_dir), tmp_path / "b", device="cpu", offload=True, progress=False)
    assert offloaded["ppl"] == resident["ppl"] and offloaded["fp_ppl"] == resident["fp_ppl"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_device_cuda_without_a_gpu_is_one_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "run", "--device", "cuda", "--model",
                          str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lqframe: error:") and "no CUDA device is available" in last
    res = subprocess.run([sys.executable, "-m", "lqframe.cli", "run", "--device", "gpu"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "device must be auto, cpu, cuda or cuda:N" in res.stderr


@pytest.mark.parametrize("calibration", [0, 3])
def test_resumed_run_with_allocation_gives_the_same_checkpoint(tmp_path, monkeypatch, calibration):
    """Allocation prices every layer on the float weights, so a resumed run allocates before it
    puts the finished blocks back, and then reuses the chosen decompositions."""
    from lqframe import run as run_mod
    from tests.tiny import tiny_llama_dir

    model_dir = tiny_llama_dir(tmp_path / "m", layers=3)
    doc = {"data": {"seq_len": 48, "calibration_windows": calibration, "evaluation_windows": 2},
           "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}},
           "allocate_stage": {"allocator": "uniform", "budget_bits": 4.0, "candidates": [{"bits": 4}, {"bits": 3}]},
           "save_stage": {}}
    r = parse_recipe(doc, "<alloc>")
    run_mod.run(r, str(model_dir), tmp_path / "whole", device="cpu", progress=False)
    original = run_mod.CheckpointSink.write

    def crash_after_first(self, block, *args):
        original(self, block, *args)
        if block == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_mod.CheckpointSink, "write", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_mod.run(r, str(model_dir), tmp_path / "cut", device="cpu", progress=False)
    monkeypatch.setattr(run_mod.CheckpointSink, "write", original)
    messages = []
    report = run_mod.run(r, str(model_dir), tmp_path / "cut", device="cpu", progress=False, log=messages.append)
    assert any("resuming" in m for m in messages) and {x["bits"] for x in report["layers"]} == {3}
    a, b = _tensors(tmp_path / "whole" / "model.safetensors"), _tensors(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
