"""The pluggy registry: discovery, errors that name what is known, failing and blocked plugins."""

import json
import subprocess
import sys
import types

import attrs
import pytest

import lqframe
from lqframe import Quantizer, Registry, hookimpl
from lqframe.cli import main

BUILTINS = {("quantizer", "rtn"), ("quantizer", "nf"), ("reconstructor", "svd"), ("reconstructor", "none"),
            ("allocator", "uniform")}


def test_builtins_come_from_the_entry_point_group():
    reg = Registry()
    found = {(i.kind, i.name): i for i in reg.components()}
    assert BUILTINS <= set(found)
    for key in BUILTINS:
        assert found[key].distribution == "lqframe"
        assert found[key].version == lqframe.__version__
    assert not reg.failures


def test_unknown_name_lists_known_and_closest():
    reg = Registry()
    with pytest.raises(lqframe.UnknownComponentError) as err:
        reg.create("quantizer", "nf4")
    msg = str(err.value)
    assert "did you mean 'nf'" in msg and "rtn" in msg
    with pytest.raises(lqframe.UnknownComponentError, match="kinds"):
        reg.create("quantiser", "nf")


def test_bad_options_name_the_option_and_the_allowed_ones():
    reg = Registry()
    with pytest.raises(lqframe.OptionError) as err:
        reg.create("quantizer", "nf", bitz=4)
    assert "'bitz'" in str(err.value) and "did you mean 'bits'" in str(err.value)
    assert "group_size" in str(err.value)
    with pytest.raises(lqframe.OptionError, match="double_quant"):
        reg.create("quantizer", "nf", double_quant="maybe")
    with pytest.raises(lqframe.OptionError, match="rank"):
        reg.create("reconstructor", "svd", rank=-1)


@attrs.frozen
class _Half(Quantizer):
    """A throwaway quantizer for registry tests."""

    def quantize(self, weight, stats=None):
        raise NotImplementedError

    def storage_bits(self, shape):
        return 0


class _GoodPlugin:
    @hookimpl
    def lqframe_register(self, registry):
        registry.add_quantizer("half", _Half)


def test_register_and_unregister_a_plugin_object():
    reg = Registry()
    assert reg.register_plugin(_GoodPlugin(), "good", distribution="test-dist", version="9")
    info = reg.info("quantizer", "half")
    assert (info.plugin, info.distribution, info.version) == ("good", "test-dist", "9")
    reg.unregister_plugin("good")
    assert "half" not in reg.names("quantizer")


def test_a_plugin_that_breaks_during_registration_is_reported_and_rolled_back():
    class Broken:
        @hookimpl
        def lqframe_register(self, registry):
            registry.add_quantizer("half", _Half)
            registry.add_quantizer("nf", _Half)  # clash with the built-in

    reg = Registry()
    assert not reg.register_plugin(Broken(), "broken")
    assert "half" not in reg.names("quantizer")  # nothing half-registered
    (failure,) = reg.failures
    assert failure.plugin == "broken" and "already registered" in failure.error and "'nf'" in failure.error


def test_registering_a_non_component_fails_clearly():
    class Wrong:
        @hookimpl
        def lqframe_register(self, registry):
            registry.add_quantizer("thing", dict)

    reg = Registry()
    assert not reg.register_plugin(Wrong(), "wrong")
    assert "subclass of lqframe.Quantizer" in reg.failures[0].error


def test_abstract_component_is_rejected():
    class Incomplete(Quantizer):
        pass

    class P:
        @hookimpl
        def lqframe_register(self, registry):
            registry.add_quantizer("inc", Incomplete)

    reg = Registry()
    assert not reg.register_plugin(P(), "p")
    assert "does not implement" in reg.failures[0].error


def _fake_dist(tmp_path, name, module_source, ep_name):
    """Make an importable distribution: a module and a dist-info with an ``lqframe`` entry point."""
    (tmp_path / f"{name}.py").write_text(module_source)
    info = tmp_path / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[lqframe]\n{ep_name} = {name}\n")


def _plugins_json(env_path, extra_env=None):
    import os

    env = dict(os.environ, PYTHONPATH=str(env_path), **(extra_env or {}))
    out = subprocess.run([sys.executable, "-m", "lqframe.cli", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_plugin_that_fails_to_import_shows_up_in_lqframe_plugins(tmp_path):
    _fake_dist(tmp_path, "lqframe_broken_plugin", "import does_not_exist_anywhere\n", "broken")
    entries = _plugins_json(tmp_path)
    failed = [e for e in entries if e["kind"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["name"] == "broken" and failed[0]["distribution"] == "lqframe_broken_plugin"
    assert "does_not_exist_anywhere" in failed[0]["error"]
    # the built-ins still load
    assert {("quantizer", "nf"), ("reconstructor", "svd")} <= {(e["kind"], e["name"]) for e in entries}
    # and the text listing names it too
    import os

    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    text = subprocess.run([sys.executable, "-m", "lqframe.cli", "plugins"], env=env, capture_output=True,
                          text=True, check=True).stdout
    assert "failed to load" in text and "does_not_exist_anywhere" in text


def test_block_env_var_blocks_named_plugins(tmp_path):
    entries = _plugins_json(tmp_path, {"LQFRAME_BLOCK_PLUGINS": "svd, RTN"})
    names = {e["name"] for e in entries if e["kind"] not in ("blocked", "failed")}
    assert "svd" not in names and "rtn" not in names and "nf" in names
    assert {e["name"] for e in entries if e["kind"] == "blocked"} == {"svd", "rtn"}


def test_blocked_failing_plugin_is_not_even_imported(tmp_path):
    _fake_dist(tmp_path, "lqframe_broken_plugin", "raise SystemExit('imported!')\n", "broken")
    entries = _plugins_json(tmp_path, {"LQFRAME_BLOCK_PLUGINS": "lqframe_broken_plugin"})
    assert not [e for e in entries if e["kind"] == "failed"]


def test_cli_plugins_json_lists_builtins_with_their_distribution(capsys):
    assert main(["plugins", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    got = {(e["kind"], e["name"]): e for e in entries}
    for key in BUILTINS:
        assert got[key]["distribution"] == "lqframe"
        assert set(got[key]) >= {"kind", "name", "plugin", "distribution", "version"}
    assert got[("quantizer", "nf")]["options"]["bits"] == 4


def test_cli_plugins_table(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "quantizer" in out and "uniform" in out and "lqframe" in out


def test_module_plugin_via_types_module():
    mod = types.ModuleType("inline_plugin")

    @hookimpl
    def lqframe_register(registry):
        registry.add_quantizer("half2", _Half)

    mod.lqframe_register = lqframe_register
    reg = Registry()
    assert reg.register_plugin(mod, "inline")
    assert reg.get("quantizer", "half2") is _Half
