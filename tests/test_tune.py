"""The tune stage on tiny real models: only L and R learn, the objective decreases, the teacher is
computed once from the float model, early stopping keeps the best state, a killed tune resumes to
the same factors, low-precision factors stay on their grid, fine-tuning on a user's text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lqframe
import lqframe.tune as tune_module
from lqframe.data import make_tuning_windows
from lqframe.errors import LqframeError, RecipeError
from lqframe.factors import round_factor
from lqframe.lqlinear import LQLinear
from lqframe.recipe import load_recipe, parse_recipe
from lqframe.run import run
from tests.test_pipeline import _tensors
from tests.tiny import byte_tokenizer, tiny_llama, tiny_llama_dir

BASE = Path(__file__).resolve().parent.parent / "recipes" / "nf4-svd32.yaml"
SMALL = ["data.seq_len=64", "data.calibration_windows=4", "data.evaluation_windows=3",
         "quantize_stage.quantizer.bits=2", "quantize_stage.quantizer.group_size=32",
         "reconstruct_stage.reconstructor.rank=8"]
TUNE = {"objectives": {"model-loss": 0.5, "causal-lm": 0.5}, "windows": 8, "validation_windows": 4,
        "grad_accum": 2, "max_updates": 12, "eval_every": 4, "patience": 0, "lr": 1e-3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model", layers=3)


def recipe(*extra, **tune):
    return load_recipe(BASE, [*SMALL, f"tune_stage={json.dumps({**TUNE, **tune})}", *extra])


def _windows(n_train=8, n_val=4, seq=64):
    return make_tuning_windows(byte_tokenizer(), ["pydoc"], seq, n_train, n_val, 3)


def _compress(stage_options=None, seed=0, **kw):
    model = tiny_llama(seed=seed, layers=2)
    doc = {"data": {"seq_len": 64, "calibration_windows": 4},
           "quantize_stage": {"quantizer": {"name": "nf", "bits": 2, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4, **kw}},
           "tune_stage": {**TUNE, **(stage_options or {})}}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = parse_recipe(doc)
    tuning = _windows()
    state = lqframe.engine.RunState(rec, model, calibration=tuning.train[:4], progress=False, log=lambda s: None,
                                    tuning=tuning)
    stages = lqframe.engine.COMPRESSION_STAGES
    lqframe.engine.execute(state, only=[s for s in stages if s != "tune"])
    _PRE_TUNE.clear()
    _PRE_TUNE.update(_lq_state(model))  # what the decomposition stored, before tuning
    lqframe.engine.execute(state, only=["tune"])
    return model, state, before


_PRE_TUNE: dict[str, torch.Tensor] = {}


def _lq_state(model) -> dict[str, torch.Tensor]:
    """Every LQLinear's state (packed codes, scales, zero points, bias, factors), cloned."""
    return {f"{name}.{k}": v.detach().clone() for name, m in model.named_modules() if isinstance(m, LQLinear)
            for k, v in m.state_dict().items()}


def test_only_the_factors_learn_and_the_objective_decreases():
    model, state, before = _compress()
    history = state.tuned["history"]
    assert [h["update"] for h in history] == [0, 4, 8, 12]
    losses = [h["validation_loss"] for h in history]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # decreases at every check
    model_loss = [h["terms"]["model-loss"] for h in history]
    assert model_loss[-1] < 0.8 * model_loss[0], model_loss
    # everything that is not a factor is as before: embeddings, norms, head (the float model's) ...
    after = model.state_dict()
    kept = [k for k in before if k in after]
    assert len(kept) > 5
    for key in kept:
        assert torch.equal(after[key], before[key]), f"{key} changed"
    # ... and each LQLinear's packed Q and bias are, bit for bit, what the decomposition stored; only
    # L and R moved (all of them)
    tuned = _lq_state(model)
    layers = sum(isinstance(m, LQLinear) for m in model.modules())
    assert tuned.keys() == _PRE_TUNE.keys() and layers == 14 and len(tuned) >= 4 * layers
    factors = [k for k in tuned if k.endswith((".left", ".right"))]
    assert len(factors) == 2 * layers and all(not torch.equal(tuned[k], _PRE_TUNE[k]) for k in factors)
    for key in tuned.keys() - set(factors):
        assert tuned[key].dtype == _PRE_TUNE[key].dtype and torch.equal(tuned[key], _PRE_TUNE[key]), f"{key} changed"
    assert any(k.endswith(".bias") for k in tuned) or all(m.bias is None for m in model.modules()
                                                          if isinstance(m, LQLinear))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith((".left", ".right")))


def test_gradients_reach_only_l_and_r(monkeypatch):
    seen = {}
    real = tune_module.Objectives.loss

    def spy(self, student, teacher, batch):
        total, parts = real(self, student, teacher, batch)
        if total.requires_grad and not seen:
            model = spy.model
            grads = torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad],
                                        retain_graph=True, allow_unused=True)
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            seen.update(zip(names, grads, strict=True))
        return total, parts

    model = tiny_llama(seed=1, layers=2)
    spy.model = model
    monkeypatch.setattr(tune_module.Objectives, "loss", spy)
    rec = parse_recipe({"data": {"seq_len": 64, "calibration_windows": 4},
                        "quantize_stage": {"quantizer": {"name": "nf", "bits": 2, "group_size": 32}},
                        "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}},
                        "tune_stage": {**TUNE, "max_updates": 1}})
    tuning = _windows()
    state = lqframe.engine.RunState(rec, model, calibration=tuning.train[:4], progress=False, log=lambda s: None,
                                    tuning=tuning)
    lqframe.engine.execute(state, only=lqframe.engine.COMPRESSION_STAGES)
    assert seen, "no training step ran"
    trainable = {n for n in seen}
    assert trainable == {n for n in trainable if n.endswith((".left", ".right"))}
    assert len(trainable) == 2 * 14
    assert all(g is not None and bool(g.ne(0).any()) for n, g in seen.items() if n.endswith(".left"))


def test_the_teacher_is_the_float_model_computed_once(monkeypatch):
    calls = []
    real = tune_module.compute_teacher

    def counting(model, tuning, *args, **kwargs):
        calls.append(any(isinstance(m, LQLinear) for m in model.modules()))
        return real(model, tuning, *args, **kwargs)

    monkeypatch.setattr(tune_module, "compute_teacher", counting)
    float_model = tiny_llama(seed=0, layers=2)
    tuning = _windows()
    with torch.no_grad():
        expected = float_model.model(input_ids=tuning.train[:1]).last_hidden_state
    model, state, _ = _compress()
    assert calls == [False]  # once, before any layer was replaced
    stored = state.teacher_store.get(0)["hidden"]
    assert torch.allclose(stored, expected, atol=1e-5)
    assert len(state.teacher_store._memory) == 12
    assert set(state.teacher_store.names) == {"hidden"}


def test_early_stopping_restores_the_best_state():
    # a learning rate far too large: the validation loss gets worse after the first steps
    model, state, _ = _compress({"lr": 0.3, "max_updates": 40, "eval_every": 2, "patience": 2})
    rec = state.tuned
    assert rec["stopped"].startswith("early")
    assert rec["updates"] < 40
    assert rec["best_update"] < rec["updates"]
    loss, ppl, _ = tune_module._validate(model, state.tuning, state.objectives, state.teacher_store,
                                         torch.device("cpu"), 1)
    assert loss == pytest.approx(rec["validation_best"]["loss"], rel=1e-6)
    assert ppl == pytest.approx(rec["validation_best"]["ppl"], rel=1e-6)


def test_int8_and_float16_factors_stay_on_their_grid():
    for fmt in ("int8", "float16"):
        model, state, _ = _compress(factor_dtype=fmt)
        assert state.tuned["validation_best"]["update"] > 0
        for module in model.modules():
            if isinstance(module, LQLinear):
                for key in ("left", "right"):
                    value = getattr(module, key).detach()
                    assert torch.equal(round_factor(value, fmt, key), value), (fmt, key)


def test_rilq_init_starts_at_q():
    model, state, _ = _compress({"init": "rilq", "max_updates": 4, "eval_every": 4})
    rec = state.tuned
    assert rec["history"][0]["update"] == 0
    # at update 0 the factors were L = 0: the validation loss was that of Q alone
    m2 = tiny_llama(seed=0, layers=2)
    doc = {"data": {"seq_len": 64, "calibration_windows": 4},
           "quantize_stage": {"quantizer": {"name": "nf", "bits": 2, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}}}
    lqframe.compress(m2, parse_recipe(doc), state.tuning.train[:4], progress=False)
    for module in m2.modules():
        if isinstance(module, LQLinear):
            with torch.no_grad():
                module.left.zero_()
    loss, _, _ = tune_module._validate(m2, state.tuning, state.objectives, state.teacher_store,
                                       torch.device("cpu"), 1)
    assert rec["history"][0]["validation_loss"] == pytest.approx(loss, rel=1e-6)


def test_a_killed_tune_resumes_to_the_same_factors(model_dir, tmp_path, monkeypatch):
    whole = run(recipe(), str(model_dir), tmp_path / "whole", progress=False)
    real = tune_module._validate
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the validations at updates 0 and 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "_validate", crash)
    with pytest.raises(KeyboardInterrupt):
        run(recipe(), str(model_dir), tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / ".lqframe-partial" / tune_module.TUNE_STATE).is_file()
    monkeypatch.setattr(tune_module, "_validate", real)
    messages = []
    resumed = run(recipe(), str(model_dir), tmp_path / "killed", progress=False, log=messages.append)
    assert any("resuming at update 4" in m for m in messages)
    a = _tensors(tmp_path / "whole" / "model.safetensors")
    b = _tensors(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["tuning"]["history"] == whole["tuning"]["history"]
    assert resumed["ppl"] == whole["ppl"]


def test_disk_teacher_gives_the_same_result_and_the_saved_model_is_the_evaluated_one(model_dir, tmp_path):
    mem = run(recipe(), str(model_dir), tmp_path / "mem", progress=False)
    disk = run(recipe(**{"teacher": "disk"}), str(model_dir), tmp_path / "disk", progress=False)
    assert disk["tuning"]["history"] == mem["tuning"]["history"]
    assert not (tmp_path / "disk" / ".lqframe-partial").exists()  # progress removed once saved
    loaded = lqframe.load(tmp_path / "disk")
    from lqframe.data import make_windows
    from lqframe.evaluate import perplexity

    windows = make_windows(byte_tokenizer(), "pydoc", 64, 0, 3).evaluation
    assert perplexity(loaded, windows, progress=False) == pytest.approx(disk["ppl"], rel=1e-9)
    assert disk["tuning"]["validation_best"]["loss"] < disk["tuning"]["validation_before"]["loss"]


def test_fine_tuning_on_a_text_file(model_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 30, encoding="utf-8")
    report = run(recipe(**{"objectives": "causal-lm", "data": [f"text:{text}"], "windows": 6,
                           "validation_windows": 2, "max_updates": 8, "eval_every": 4}),
                 str(model_dir), tmp_path / "o", progress=False)
    tuning = report["tuning"]
    assert tuning["data"]["sources"][0]["source"] == f"text:{text}"
    # repetitive text: the adapters learn it, and the validation perplexity on it drops
    assert tuning["validation_best"]["ppl"] < 0.8 * tuning["validation_before"]["ppl"]


@pytest.mark.parametrize("body, needle", [
    ({"lr": 1e-4}, "needs 'objectives'"),
    ({"objectives": "no-such-loss"}, "no-such-loss"),
    ({"objectives": {"model-loss": 0}}, "weight 0"),
    ({"objectives": "model-loss", "init": "zeros"}, "tune_stage.init"),
    ({"objectives": "model-loss", "validation_windows": 0}, "patience"),
    ({"objectives": "model-loss", "objective": "causal-lm"}, "not both"),
    ({"objectives": "model-loss", "step": 3}, "unknown key"),
])
def test_recipe_errors_name_the_place(body, needle):
    with pytest.raises(RecipeError, match=needle):
        parse_recipe({"quantize_stage": {"quantizer": "rtn"}, "tune_stage": body})


def test_tuning_without_factors_is_refused(model_dir, tmp_path):
    doc = {"data": {"seq_len": 64, "calibration_windows": 4, "evaluation_windows": 3},
           "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4}}, "tune_stage": TUNE}
    with pytest.raises(LqframeError, match="low-rank term"):  # refused before any work
        run(parse_recipe(doc), str(model_dir), tmp_path / "o", progress=False)
    doc["reconstruct_stage"] = {"reconstructor": "none"}
    with pytest.raises(LqframeError, match="low-rank term"):  # found once the layers are compressed
        run(parse_recipe(doc), str(model_dir), tmp_path / "o2", progress=False)


def test_tuning_windows_avoid_the_evaluation_windows():
    tok = byte_tokenizer()
    tw = make_tuning_windows(tok, ["pydoc"], 64, 20, 5, 16, seed=0)
    from lqframe.data import make_windows

    ev = make_windows(tok, "pydoc", 64, 0, 16).evaluation_index
    assert not set(tw.sources[0][1]) & set(ev)
    assert tw.train.shape == (20, 64) and tw.validation.shape == (5, 64)
    again = make_tuning_windows(tok, ["pydoc"], 64, 20, 5, 16, seed=0)
    assert torch.equal(again.train, tw.train) and torch.equal(again.validation, tw.validation)


def test_python_api_takes_tuning_windows():
    model = tiny_llama(seed=2, layers=1)
    tw = _windows(n_train=4, n_val=2)
    doc = {"data": {"seq_len": 64, "calibration_windows": 2},
           "quantize_stage": {"quantizer": {"name": "nf", "bits": 2, "group_size": 32}},
           "reconstruct_stage": {"reconstructor": {"name": "svd", "rank": 4}},
           "tune_stage": {**TUNE, "max_updates": 2, "eval_every": 2}}
    with pytest.raises(RecipeError, match="no tuning windows"):
        lqframe.compress(tiny_llama(seed=2, layers=1), doc, tw.train[:2], progress=False)
    results = lqframe.compress(model, doc, tw.train[:2], progress=False, tuning=(tw.train, tw.validation))
    assert len(results) == 7
