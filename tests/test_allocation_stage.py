"""The allocate stage with the ilp allocator: grids of candidates (bits, group size, rank), the
budget with and without the low-rank factors, the on-disk cost cache, the metrics."""

from __future__ import annotations

import copy

import pytest
import torch

import lqframe
from lqframe.costcache import CostCache
from lqframe.data import make_windows
from lqframe.errors import BudgetError, RecipeError
from lqframe.recipe import LQLORA_GRID, parse_recipe
from lqframe.run import compress
from tests.tiny import byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def windows():
    return make_windows(byte_tokenizer(), "pydoc", 40, 3, 0, 0)


def _doc(reconstructor="qera-exact"):
    return {"data": {"seq_len": 40, "calibration_windows": 3, "evaluation_windows": 0},
            "quantize_stage": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}},
            "reconstruct_stage": {"reconstructor": {"name": reconstructor, "rank": 4}}}


def _recipe(budget, include_lowrank=False, cache=False, metric="auto", reconstructor="qera-exact", grid=None,
            reuse=False, allocator="ilp"):
    grid = grid or {"quantizer": {"bits": [2, 3, 4], "group_size": [32, 64]}, "reconstructor": {"rank": [2, 8]}}
    doc = {**_doc(reconstructor),
           "allocate_stage": {"allocator": allocator, "budget_bits": budget, "include_lowrank": include_lowrank,
                              "grid": grid, "cache": cache, "metric": metric, "reuse": reuse}}
    return parse_recipe(doc, "<alloc>")


def _avg_bits(results, include_lowrank):
    total = sum(r.storage_bits + (r.lowrank_bits if include_lowrank else 0) for r in results)
    return total / sum(r.numel for r in results)


def test_grid_expands_in_row_major_order():
    r = _recipe(3.0)
    cands = r.allocate.candidates
    assert len(cands) == 12
    assert cands[0] == {"quantizer": {"bits": 2, "group_size": 32}, "reconstructor": {"rank": 2}}
    assert cands[1] == {"quantizer": {"bits": 2, "group_size": 32}, "reconstructor": {"rank": 8}}
    assert cands[-1] == {"quantizer": {"bits": 4, "group_size": 64}, "reconstructor": {"rank": 8}}
    lq = parse_recipe({"quantize_stage": {"quantizer": {"name": "nf"}},
                       "allocate_stage": {"allocator": "ilp", "grid": "lqlora"}}, "<g>")
    assert len(lq.allocate.candidates) == 432 == 4 * 3 * 4 * 3 * 3
    assert all(c["quantizer"]["double_quant"] == "lqlora" for c in lq.allocate.candidates)
    assert LQLORA_GRID["quantizer"]["bits"] == [2, 3, 4, 8]


@pytest.mark.parametrize("change, message", [
    ({"grid": {"quantizer": {"bits": []}}}, r"allocate_stage\.grid\.quantizer\.bits: expected a non-empty list"),
    ({"grid": {"quantizer": {"bits": [3, 9]}}}, r"allocate_stage\.grid\[1\]: quantizer 'rtn': bits must be <= 8"),
    ({"grid": {}}, r"allocate_stage\.grid: a grid needs at least one option list"),
    ({"metric": "hessian"}, r"allocate_stage\.metric: expected auto, output, fisher or weight"),
    ({"cache": 3}, r"allocate_stage\.cache: expected true, false or a file path"),
])
def test_bad_allocation_options_name_the_place(change, message):
    doc = {"quantize_stage": {"quantizer": {"name": "rtn"}},
           "allocate_stage": {"allocator": "ilp", "budget_bits": 3.0, "grid": {"quantizer": {"bits": [2, 3]}},
                              **change}}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(doc, "<bad>")


@pytest.mark.parametrize("include_lowrank, budget", [(False, 3.0), (True, 4.5)])
def test_ilp_spends_the_budget_per_matrix(windows, include_lowrank, budget):
    """Bits and rank chosen per matrix; the average (with or without the factors) is within the
    budget, and the allocation is mixed (the ILP is not a uniform choice)."""
    model = tiny_llama(layers=2)
    results = compress(model, _recipe(budget, include_lowrank), windows.calibration, device="cpu", progress=False)
    assert _avg_bits(results, include_lowrank) <= budget
    assert len({(r.bits, r.group_size, r.rank) for r in results}) > 1
    if not include_lowrank:  # factors are free: every matrix takes the larger rank
        assert {r.rank for r in results} == {8}


def test_an_infeasible_budget_is_one_line_with_the_smallest_feasible_one(windows):
    with pytest.raises(BudgetError, match=r"^ilp allocator: a budget of 1 bits/parameter is infeasible; the smallest "
                                          r"feasible budget is 2\.\d+ bits/parameter"):
        compress(tiny_llama(layers=1), _recipe(1.0), windows.calibration, device="cpu", progress=False)


@pytest.mark.parametrize("reuse", [True, False])
def test_the_cost_cache_makes_a_second_budget_cost_only_the_solve(windows, tmp_path, monkeypatch, reuse):
    """A warm cache: no candidate is decomposed again except the chosen ones (by the allocate stage
    with ``reuse``, else by the decompose stage), and the result is bit for bit the one a cold run
    gives (the chosen decompositions use the same statistics)."""
    path = tmp_path / "costs.sqlite"
    base = tiny_llama(layers=1)
    compress(copy.deepcopy(base), _recipe(3.0, cache=str(path), reuse=reuse), windows.calibration, device="cpu",
             progress=False)
    n_entries = len(CostCache(path))
    assert n_entries == 7 * 12

    calls = []
    from lqframe import pipeline

    original = pipeline.decompose_candidate

    def counting(*args, **kwargs):
        calls.append(args[1].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decompose_candidate", counting)
    monkeypatch.setattr(lqframe.engine, "decompose_candidate", counting)
    warm_model = copy.deepcopy(base)
    warm = compress(warm_model, _recipe(3.5, cache=str(path), reuse=reuse), windows.calibration, device="cpu",
                    progress=False)
    assert len(calls) == (7 if reuse else 0)  # the chosen candidate of each matrix, nothing else
    assert len(CostCache(path)) == n_entries
    monkeypatch.undo()
    cold_model = copy.deepcopy(base)
    cold = compress(cold_model, _recipe(3.5, cache=False, reuse=reuse), windows.calibration, device="cpu",
                    progress=False)
    assert [(r.bits, r.group_size, r.rank) for r in warm] == [(r.bits, r.group_size, r.rank) for r in cold]
    sw, sc = warm_model.state_dict(), cold_model.state_dict()
    assert all(torch.equal(sw[k], sc[k]) for k in sw)
    # other statistics (one calibration window fewer) are other keys: all computed again
    compress(copy.deepcopy(base), _recipe(3.5, cache=str(path)), windows.calibration[:2], device="cpu",
             progress=False)
    assert len(CostCache(path)) == 2 * n_entries


def test_the_chosen_configurations_are_compressed_as_a_run_without_allocation(windows):
    """Without ``reuse`` an allocation that chooses the recipe's own configuration everywhere gives
    exactly the model a plain run gives: each layer decomposed on the inputs of the compressed
    blocks before it. With ``reuse`` the layers after the first block keep the cost table's
    decompositions, made on the float model's inputs, and differ."""
    base = tiny_llama(layers=2)
    plain = copy.deepcopy(base)
    compress(plain, parse_recipe(_doc(), "<plain>"), windows.calibration, device="cpu", progress=False)
    only = {"quantizer": {"bits": [4], "group_size": [32]}, "reconstructor": {"rank": [4]}}
    states = {}
    for reuse in (False, True):
        model = copy.deepcopy(base)
        compress(model, _recipe(None, grid=only, reuse=reuse), windows.calibration, device="cpu", progress=False)
        states[reuse] = model.state_dict()
    ref = plain.state_dict()
    assert all(torch.equal(states[False][k], ref[k]) for k in ref)
    differ = [k for k in ref if not torch.equal(states[True][k], ref[k])]
    assert differ and all(k.startswith("model.layers.1.") for k in differ), differ


_TABLES: list = []


class _RecordingILP(lqframe.BudgetAllocator):
    """The ilp allocator, keeping each cost table it is given."""

    def allocate(self, table, budget_bits):
        _TABLES.append(table)
        return lqframe.registry().create("allocator", "ilp").allocate(table, budget_bits)


class _RecordingPlugin:
    @lqframe.hookimpl
    def lqframe_register(self, registry):
        registry.add_allocator("test-recording-ilp", _RecordingILP)


def test_fisher_metric_prices_candidates_by_the_fisher(windows):
    """``metric: fisher`` prices every candidate by Σ F ⊙ (W − Ŵ)², with F the empirical Fisher of the
    float model (the engine runs the gradient pass even for a data-free reconstructor): each entry of
    the cost table the allocator receives equals that sum computed here from per-window autograd
    gradients and the candidate decomposed on its own, and differs from the weight metric's."""
    from tests.test_fisher import _reference

    reg = lqframe.registry()
    reg.register_plugin(_RecordingPlugin(), "test-recording-allocator")
    try:
        _TABLES.clear()
        grid = {"quantizer": {"bits": [2, 4]}}
        model = tiny_llama(layers=1)
        float_model = copy.deepcopy(model)
        recipe = _recipe(3.0, metric="fisher", reconstructor="lqlora", grid=grid, allocator="test-recording-ilp")
        results = compress(model, recipe, windows.calibration, device="cpu", progress=False)
    finally:
        reg.unregister_plugin("test-recording-allocator")
    assert _avg_bits(results, False) <= 3.0 and {r.bits for r in results} == {2, 4}
    (table,) = _TABLES
    fisher = dict(zip(table.layers, _reference(float_model, windows.calibration, table.layers), strict=True))
    recon = reg.create("reconstructor", "lqlora", rank=4)
    for i, name in enumerate(table.layers):
        w = float_model.get_submodule(name).weight.detach()
        for j, bits in enumerate((2, 4)):
            dense = recon.decompose(w, reg.create("quantizer", "rtn", bits=bits, group_size=32)).dense().double()
            err = (w.double() - dense) ** 2
            expected = float((fisher[name] * err).sum())
            assert table.cost[i, j] == pytest.approx(expected, rel=1e-4), (name, bits)
            assert table.cost[i, j] != pytest.approx(float(err.sum() / w.double().pow(2).sum()), rel=0.5)


def test_inspect_plot_draws_bits_and_rank_per_matrix(tmp_path, monkeypatch, capsys):
    """``lqframe inspect DIR --plot out.png`` after an ILP run: a PNG appears (written atomically,
    nothing else left in the folder); without matplotlib the command says how to install it."""
    import sys

    from lqframe.cli import main
    from lqframe.run import run
    from tests.tiny import tiny_llama_dir

    model_dir = tiny_llama_dir(tmp_path / "m", layers=2)
    doc = _recipe(3.0, include_lowrank=False)
    report = run(attrs_evolve_save(doc), str(model_dir), tmp_path / "out", device="cpu", progress=False,
                 log=lambda s: None)
    alloc = report["allocation"]
    assert alloc["allocator"] == {"name": "ilp"} and alloc["candidates"] == 12 and alloc["budget_bits"] == 3.0
    assert alloc["bits_per_param"] <= 3.0 and alloc["bits_per_param"] == pytest.approx(report["avg_bits"])
    assert len(alloc["chosen"]) == 14 and alloc["cache"] is None and alloc["solve_seconds"] >= 0
    plots = tmp_path / "plots"
    plots.mkdir()
    assert main(["inspect", str(tmp_path / "out"), "--plot", str(plots / "layers.png")]) == 0
    data = (plots / "layers.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in plots.iterdir()] == ["layers.png"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["inspect", str(tmp_path / "out"), "--plot", str(plots / "again.png")]) != 0
    assert "pip install 'lqframe[plot]'" in capsys.readouterr().err
    assert not (plots / "again.png").exists()


def attrs_evolve_save(recipe):
    import attrs

    from lqframe.recipe import SaveStage

    return attrs.evolve(recipe, save=SaveStage())


def test_candidates_that_differ_in_the_reconstructor_share_one_quantization(monkeypatch):
    """Rank (or factor format) candidates of one quantizer configuration quantize the weight once;
    an alternation's other inputs still reach the quantizer; the results equal unshared ones."""
    from lqframe.pipeline import LayerPlan, decompose_candidate
    from lqframe.recipe import ComponentSpec

    rtn_cls = type(lqframe.registry().create("quantizer", "rtn"))
    calls = []
    original = rtn_cls.quantize

    def counting(self, weight, stats=None):
        calls.append(weight.data_ptr())
        return original(self, weight, stats)

    monkeypatch.setattr(rtn_cls, "quantize", counting)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    plans = [LayerPlan(name="layer", block=0, quantizer=ComponentSpec("rtn", {"bits": 3, "group_size": 32}),
                       reconstructor=ComponentSpec(rec, {"rank": r})) for rec in ("svd", "loftq") for r in (2, 4, 8)]
    shared = {}
    got = [decompose_candidate(w, p, None, j, shared)[0] for j, p in enumerate(plans)]
    assert len(set(calls)) > 1  # loftq quantizes W − LR too
    assert calls.count(w.data_ptr()) == 1
    for p, dec in zip(plans, got, strict=True):
        assert torch.equal(dec.dense(), decompose_candidate(w, p, None, 0)[0].dense())
