"""Recipes: validation errors name the file, the YAML path and the allowed values."""

import pytest

import lqframe
from lqframe.recipe import DEFAULT_RECIPE, apply_sets, load_recipe, parse_recipe


def write(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_recipe():
    r = load_recipe(None)
    assert r.stages() == ["quantize", "reconstruct", "evaluate", "save"]
    # GPTQ's own defaults (act-order, static groups) apply
    assert r.quantize.quantizer.name == "gptq" and r.quantize.quantizer.options == {"bits": 4, "group_size": 64}
    assert r.reconstruct.reconstructor.name == "qera-exact" and r.reconstruct.reconstructor.options == {
        "rank": 32, "iterations": 3}
    assert r.data.source == "pydoc" and r.data.seq_len == 512 and r.data.calibration_windows == 48
    assert r.data.calibration_sources() == (("pydoc", None), ("news", None))
    assert r.evaluation_sources() == ("pydoc", "news", "wiki")
    from pathlib import Path

    shipped = Path(__file__).parent.parent / "recipes" / "gptq4-qera32.yaml"
    assert load_recipe(shipped) == r  # the file form of the default is the default
    assert "quantize_stage" in r.to_yaml()


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ should hold example recipes"
    for path in recipes:
        load_recipe(path)


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "quantize_stag:\n  quantizer: nf\n")
    with pytest.raises(lqframe.RecipeError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert str(p) in msg and "quantize_stag" in msg and "did you mean 'quantize_stage'" in msg


def test_unknown_option_names_the_path(tmp_path):
    p = write(tmp_path, "quantize_stage:\n  quantizer: {name: nf, bitz: 4}\n")
    with pytest.raises(lqframe.RecipeError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert "quantize_stage.quantizer" in msg and "'bitz'" in msg and "did you mean 'bits'" in msg


def test_unknown_plugin_lists_known(tmp_path):
    p = write(tmp_path, "quantize_stage:\n  quantizer: {name: gptq2}\n")
    expected = r"quantize_stage\.quantizer: unknown quantizer 'gptq2'.*known quantizers: .*\bnf\b.*\brtn\b"
    with pytest.raises(lqframe.RecipeError, match=expected):
        load_recipe(p)


@pytest.mark.parametrize(
    "text,where",
    [
        ("quantize_stage:\n  quantizer: {name: nf, bits: 9}\n", "quantize_stage.quantizer"),
        ("quantize_stage:\n  quantizer: nf\nreconstruct_stage:\n  reconstructor: {name: svd, rank: -2}\n",
         "reconstruct_stage.reconstructor"),
        ("data: {seq_len: 1}\nquantize_stage: {quantizer: nf}\n", "data.seq_len"),
        ("data: {calibration_windows: many}\nquantize_stage: {quantizer: nf}\n", "data.calibration_windows"),
        ("quantize_stage:\n  quantizer: nf\n  overrides:\n    - targets: [down_proj]\n      quantizer: {bits: 1}\n",
         "quantize_stage.overrides[0].quantizer"),
        ("quantize_stage:\n  quantizer: nf\n  targets: 5\n", "quantize_stage.targets"),
        ("reconstruct_stage:\n  reconstructor: svd\n", "reconstruct_stage"),
        ("evaluate_stage: {float_baseline: maybe}\n", "evaluate_stage.float_baseline"),
        ("evaluate_stage: {data: []}\n", "evaluate_stage.data"),
        ("evaluate_stage: {data: [pydoc, 3]}\n", "evaluate_stage.data[1]"),
        ("evaluate_stage: {data: [pydoc, pydoc]}\n", "evaluate_stage.data: a source is listed twice"),
        ("data: {calibration: [pydoc, {windows: 2}]}\nquantize_stage: {quantizer: nf}\n", "data.calibration[1]"),
        ("data: {calibration: [{source: news, windows: -1}]}\nquantize_stage: {quantizer: nf}\n",
         "data.calibration[0].windows"),
        ("data: {calibration: [{source: news, count: 2}]}\nquantize_stage: {quantizer: nf}\n",
         "data.calibration[0].count"),
        ("data: {calibration: [news, news]}\nquantize_stage: {quantizer: nf}\n", "data.calibration[1]"),
        ("model: default\n", "names no stage"),
    ],
)
def test_bad_values(tmp_path, text, where):
    p = write(tmp_path, text)
    with pytest.raises(lqframe.RecipeError) as err:
        load_recipe(p)
    assert where in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_yaml_gives_the_line(tmp_path):
    p = write(tmp_path, "quantize_stage:\n  quantizer: [nf\n")
    with pytest.raises(lqframe.RecipeError, match=r"invalid YAML \(line \d+"):
        load_recipe(p)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(lqframe.RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(lqframe.RecipeError, match="empty"):
        load_recipe(write(tmp_path, ""))


def test_sets_override_values():
    sets = ["quantize_stage.quantizer.bits=3", "data.seq_len=128", "reconstruct_stage.reconstructor.rank=0"]
    r = load_recipe(None, sets)
    assert r.quantize.quantizer.options["bits"] == 3 and r.data.seq_len == 128
    assert r.reconstruct.reconstructor.options["rank"] == 0
    with pytest.raises(lqframe.RecipeError, match="KEY=VALUE"):
        apply_sets({}, ["nonsense"])
    with pytest.raises(lqframe.RecipeError, match="not a mapping"):
        apply_sets({"data": 3}, ["data.seq_len=2"])


def test_overrides_resolve_per_layer():
    import yaml

    doc = yaml.safe_load(DEFAULT_RECIPE)
    doc["quantize_stage"]["overrides"] = [{"targets": ["re:.*down_proj$"], "quantizer": {"bits": 8}},
                                          {"targets": ["layers\\.0\\."], "quantizer": {"name": "rtn", "bits": 3}}]
    doc["reconstruct_stage"]["overrides"] = [{"targets": ["mlp"], "reconstructor": {"rank": 64}}]
    r = parse_recipe(doc)
    assert r.quantizer_for("model.layers.3.mlp.down_proj").options == {"bits": 8, "group_size": 64}
    assert r.quantizer_for("model.layers.3.self_attn.q_proj").options == {"bits": 4, "group_size": 64}
    # a different name replaces the component; later overrides win
    assert r.quantizer_for("model.layers.0.mlp.down_proj").name == "rtn"
    assert r.quantizer_for("model.layers.0.mlp.down_proj").options == {"bits": 3}
    assert r.reconstructor_for("model.layers.1.mlp.up_proj").options == {"rank": 64, "iterations": 3}
    assert r.reconstructor_for("model.layers.1.self_attn.o_proj").options == {"rank": 32, "iterations": 3}


def test_fingerprint_tracks_content():
    a = load_recipe(None)
    b = load_recipe(None, ["quantize_stage.quantizer.bits=3"])
    assert a.fingerprint() == load_recipe(None).fingerprint() != b.fingerprint()


def test_several_data_sources(tmp_path):
    r = load_recipe(write(tmp_path, "data: {source: pydoc, calibration: [pydoc, {source: news, windows: 4}]}\n"
                                    "quantize_stage: {quantizer: nf}\nevaluate_stage: {data: [pydoc, news]}\n"))
    assert r.data.calibration_sources() == (("pydoc", None), ("news", 4))
    assert r.evaluation_sources() == ("pydoc", "news")
    plain = load_recipe(write(tmp_path, "data: {source: news}\nquantize_stage: {quantizer: nf}\nevaluate_stage: {}\n"))
    assert plain.data.calibration_sources() == (("news", None),) and plain.evaluation_sources() == ("news",)
    assert load_recipe(write(tmp_path, "quantize_stage: {quantizer: nf}\n")).evaluation_sources() == ()
    one = load_recipe(write(tmp_path, "data: {calibration: news}\nquantize_stage: {quantizer: nf}\n"))
    assert one.data.calibration_sources() == (("news", None),)
