"""Docs that cannot rot: every fenced code block of README.md and docs/*.md is run, parsed or
checked against what it quotes, so a fresh machine catches what broke.

* ``COVERAGE`` names, for every block (keyed by its file and the start of its text), the test that
  covers it, or why it is not code. A block added to the docs without an entry fails
  :func:`test_every_fenced_block_is_covered`, and so does an entry whose block is gone.
* Shell blocks (``bash``, ``sh``, ``console`` and unlabelled blocks of commands) run command by
  command through :class:`Shell`, from a scratch mirror of the checkout (symlinks), so outputs such
  as ``runs/`` land in a temporary folder. Set-up commands (``python3 -m venv``, ``pip install``) are
  never run: their structure is checked (the constraint file, the extras, the paths, the packages
  they install are installed here), and a local plugin they install goes into a scratch
  ``--target`` on ``PYTHONPATH``. Every other command must be a key of ``COMMANDS``, whose handler
  says how it runs: ``lqframe run`` on a tiny random LLaMA with little data instead of the default
  model, benchmarks with small sizes or ``--help``, pytest with ``--collect-only``.
* Python blocks run in a fresh namespace (README's blocks as one session, as a reader types them),
  with the substitutions, preludes and checks each test lists; ``print(x)  # 4.127`` must print a
  number that rounds to the value the comment states.
* Recipes (YAML) go through lqframe's recipe parser with component validation; TOML through
  tomllib, compared with the file it quotes; quoted source (``class …`` from a plugin) is compared
  statement by statement with the module it quotes, and executed.

The package docstring's example runs in tests/test_package.py.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement

from tests.docblocks import (
    Block,
    Command,
    check_stated_values,
    exec_session,
    fenced_blocks,
    match_lines,
    quotes,
    shell_commands,
)
from tests.tiny import tiny_llama, tiny_llama_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = ROOT / "examples" / "lqframe-example-plugin"
EXAMPLE_RECONSTRUCTOR = ROOT / "examples" / "lqframe-example-reconstructor"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_ENV = "LQFRAME_BLOCK_PLUGINS"
NOT_CODE = "not code: "
NOT_RUN = "not run here: "

#: every fenced block of README.md and docs/*.md → the test that runs or checks it, or why it is not code
COVERAGE: dict[tuple[str, str], str] = {
    ("README.md", "python3 -m venv .venv && .venv/bin/pip install -c constraints/cpu.txt -e . "):
        "test_readme_main_job",
    ("README.md", "python3 -m venv .venv && .venv/bin/pip install -c constraints/cpu.txt -e '.[test]'"):
        "test_readme_test_command_is_what_ci_runs",
    ("README.md", "import torch, lqframe"): "test_readme_python_session",
    ("README.md", "from transformers import AutoModelForCausalLM"): "test_readme_python_session",
    ("README.md", "$ lqframe plugins"): "test_shell_block",
    ("docs/formats.md", "value = lut(q) · scale[block] + offset"): NOT_CODE + "the decoding rule (a formula)",
    ("docs/kernels.md", "bytes = out·in·k/8"): NOT_CODE + "the bytes-read bound (a formula)",
    ("docs/kernels.md", "python benchmarks/kernel_speed.py --device cuda "): "test_kernel_benchmark_commands",
    ("docs/kernels.md", "python -m pytest tests/test_triton_kernels.py "): "test_shell_block",
    ("docs/peers.md", "python3 -m venv ~/.venvs/lqframe-peers"): "test_peers_commands",
    ("docs/peers.md", "V=~/.venvs/lqframe-peers"):
        NOT_RUN + "a second venv installed from PyPI (llmcompressor); run by hand, its figures are in the text",
    ("docs/plugins.md", "min over rank-r C of ‖S (Δ − C) T‖_F"): NOT_CODE + "the weighted low-rank problem (math)",
    ("docs/plugins.md", "@attrs.frozen\nclass QERAApproxReconstructor"): "test_lowrank_class_quotes",
    ("docs/plugins.md", "Q_1 = q(W)"): NOT_CODE + "pseudocode of the alternation",
    ("docs/plugins.md", "from lqframe.stats import StatisticKind"): "test_statistic_kind_snippet",
    ("docs/plugins.md", "value = lut(q) * scale[block] + offset"): NOT_CODE + "the decoding rule (a formula)",
    ("docs/plugins.md", "import lqframe\n\n@lqframe.hookimpl"): "test_hook_snippets",
    ("docs/plugins.md", "[project.entry-points.lqframe]"): "test_entry_point_toml",
    ("docs/plugins.md", "import lqframe\nfrom lqframe import testing"): "test_conformance_file_quote",
    ("docs/plugins.md", "pip install 'lqframe[test]' ./examples/lqframe-example-plugin"): "test_shell_block",
    ("docs/plugins.md", "pip install -e 'path/to/lqframe[test]'"): "test_shell_block",
    ("docs/plugins.md", "import lqframe\nfrom lqframe.registry import Registry"): "test_private_registry_snippet",
    ("docs/plugins.md", 'subprocess.run([sys.executable, "-m", "pip", "install"'): "test_packaging_snippet",
    ("docs/plugins.md", "kind           name"): "test_listing_with_the_example_plugin",
    ("docs/plugins.md", "plugins that failed to load:"): "test_failed_plugin_listing",
    ("docs/plugins.md", "LQFRAME_BLOCK_PLUGINS=binary lqframe plugins"): "test_shell_block",
    ("docs/plugins.md", "@lqframe.hookimpl"): "test_hook_snippets",
    ("docs/plugins.md", "pip install ./examples/lqframe-example-plugin"): "test_shell_block",
    ("docs/plugins.md", "import lqframe, torch"): "test_binary_example",
    ("docs/plugins.md", "min over rank-r C of ‖(Δ − C) diag(s)‖_F"): NOT_CODE + "abs-mean's problem (math)",
    ("docs/plugins.md", "@attrs.frozen\nclass AbsMeanReconstructor"): "test_lowrank_class_quotes",
    ("docs/recipes.md", "model: default"): "test_recipe_reference_parses",
    ("docs/recipes.md", "lqframe: error: my.yaml:"): "test_recipe_error_message",
    ("docs/recipes.md", "tune_stage:"): "test_tune_stage_parses",
    ("docs/recipes.md", "quantize_stage:\n  quantizer: {name: gptq, bits: 4, group_size: 128}\n  experts:"):
        "test_experts_options_parse",
    ("docs/recipes.md", "lqframe run recipes/nf4-svd32.yaml --set"): "test_set_command",
    ("docs/recipes.md", "lqframe run recipes/correct-qera32.yaml"): "test_correct_and_serve_blocks",
    ("docs/recipes.md", "import torch\nfrom peft import PeftModel"): "test_correct_and_serve_blocks",
    ("docs/recipes.md", "vllm serve"): NOT_RUN + "vLLM serves on a GPU; this machine has none (the docs say so)",
}

#: `lqframe run` commands compress the tiny model (tests/tiny.py) with this little data
SMALL = ["data.seq_len=64", "data.calibration_windows=4", "data.evaluation_windows=2"]
#: placeholders of the docs' commands → paths in the checkout
PLACEHOLDERS = {"path/to/lqframe": ".", "path/to/your-plugin": "examples/lqframe-example-plugin"}
#: pip options the docs may use (anything else is a new case for this test)
PIP_FLAGS = {"--no-deps"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in fenced_blocks(path, ROOT)]


def _matches(block: Block, key: tuple[str, str]) -> bool:
    return block.path == key[0] and block.text.startswith(key[1])


def block_for(key: tuple[str, str]) -> Block:
    assert key in COVERAGE, f"{key} is not in COVERAGE"
    found = [b for b in all_blocks() if _matches(b, key)]
    assert len(found) == 1, f"{key} matches {len(found)} blocks: {[str(b) for b in found]}"
    return found[0]


def keys_of(test: str) -> list[tuple[str, str]]:
    return [k for k, v in COVERAGE.items() if v == test]


def _key_id(key: tuple[str, str]) -> str:
    return f"{Path(key[0]).name}:{key[1].splitlines()[0][:40]}"


def _replace(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` (which must occur exactly once: else the docs changed) replaced."""
    assert text.count(old) == 1, f"substitution {old!r}: found {text.count(old)} times in\n{text}"
    return text.replace(old, new)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", BLOCK_ENV)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # commands that import from the checkout leave no __pycache__
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env or _base_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{argv} (in {cwd}) exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                    f"\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def _lqframe() -> list[str]:
    """The ``lqframe`` console script of the environment running the tests."""
    script = Path(sys.executable).with_name("lqframe")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lqframe.cli"]


def _pyproject(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- scratch installs, the shell


class Installer:
    """Installs a plugin's source folder the way tests/test_example_plugin.py does: from a copy,
    ``pip install --no-deps --no-build-isolation --no-index --target SITE``; once per folder."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sites: dict[Path, Path] = {}

    def site_for(self, source: Path) -> Path:
        source = source.resolve()
        if source not in self.sites:
            root = self.tmp / f"{source.name}-{len(self.sites)}"
            copy = root / "src"
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist",
                                                                        ".pytest_cache", ".hypothesis"))
            _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                  "--target", str(root / "site"), str(copy)], root,
                 {**_base_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
            self.sites[source] = root / "site"
        return self.sites[source]


class Shell:
    """Runs the commands of shell blocks from ``home``, a mirror of the checkout (a symlink per
    top-level entry) in a temporary folder. ``context`` holds what handlers substitute (``model``:
    the tiny model folder; ``DIR``: an lqframe output folder)."""

    def __init__(self, tmp: Path, installer: Installer, **context):
        self.home = tmp / "checkout"
        self.home.mkdir(parents=True)
        for entry in ROOT.iterdir():
            if entry.name not in (".git", "runs", ".tox", ".pytest_cache", ".hypothesis"):
                (self.home / entry.name).symlink_to(entry)
        self.cwd = self.home
        self.installer = installer
        self.sites: list[Path] = []
        self.venvs: set[str] = set()
        self.context = context
        self.results: dict[str, subprocess.CompletedProcess[str]] = {}

    # -- helpers for handlers
    def path(self, word: str) -> Path:
        for placeholder, real in PLACEHOLDERS.items():
            if word == placeholder or word.startswith(placeholder + "/"):
                return self.home / real / word[len(placeholder) + 1:]
        return self.cwd / word

    def env(self, cmd: Command) -> dict[str, str]:
        env = _base_env()
        if self.sites:
            env["PYTHONPATH"] = os.pathsep.join(map(str, self.sites))
        return {**env, **cmd.env}

    def program(self, word: str) -> list[str]:
        """``lqframe`` (any venv's) → this environment's console script; ``python…`` → this interpreter."""
        name = word.rsplit("/", 1)[-1]
        if name == "lqframe":
            return _lqframe()
        assert name.startswith("python"), f"no rule for the program {word!r}"
        return [sys.executable]

    def run(self, cmd: Command, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = _run(argv, self.cwd, self.env(cmd), check)
        self.results[cmd.text] = proc
        return proc

    # -- the block
    def execute(self, commands: list[Command]) -> None:
        saved = None
        for i, cmd in enumerate(commands):
            if cmd.subshell and saved is None:
                saved = self.cwd
            self.dispatch(cmd)
            if saved is not None and (i + 1 == len(commands) or commands[i + 1].line != cmd.line):
                self.cwd, saved = saved, None

    def dispatch(self, cmd: Command) -> None:
        prog = cmd.argv[0]
        if "/bin/" in prog:  # a venv's program: the block made that venv
            assert prog.rsplit("/bin/", 1)[0] in self.venvs, f"{cmd.text}: no earlier `python3 -m venv` made it"
        if prog == "cd":
            self.cwd = self.path(cmd.argv[1])
            assert self.cwd.is_dir(), f"{cmd.text}: no folder {self.cwd}"
        elif cmd.argv[1:3] == ["-m", "venv"]:
            assert prog == "python3" and len(cmd.argv) == 4, cmd.text
            assert importlib.util.find_spec("venv") is not None
            self.venvs.add(cmd.argv[3])
        elif prog.rsplit("/", 1)[-1] == "pip":
            self.check_pip(cmd)
        else:
            handler = COMMANDS.get(cmd.text)
            assert handler is not None, f"no rule for the documented command {cmd.text!r}: add it to COMMANDS"
            handler(self, cmd)

    def check_pip(self, cmd: Command) -> None:
        """A ``pip install`` is not run: its constraint file must exist and pin torch, its local paths
        must be projects, its extras must exist; what it installs into the environment running the
        tests (a bare ``pip`` or ``.venv``'s) must be installed here, at versions its extras allow; a
        local plugin goes into a scratch target on ``PYTHONPATH`` for the commands after it."""
        assert cmd.argv[1] == "install", cmd.text
        own = "/" not in cmd.argv[0] or cmd.argv[0].rsplit("/bin/", 1)[0] == ".venv"
        args, requirements = cmd.argv[2:], []
        while args:
            word = args.pop(0)
            if word in ("-c", "--constraint"):
                constraints = self.path(args.pop(0))
                assert constraints.is_file(), f"{cmd.text}: no constraint file {constraints}"
                assert re.search(r"^torch==", constraints.read_text(encoding="utf-8"), re.M), constraints
            elif word in ("-e", "--editable"):
                requirements.append(args.pop(0))
            elif word.startswith("-"):
                assert word in PIP_FLAGS, f"{cmd.text}: pip option {word} is new to this test"
            else:
                requirements.append(word)
        assert requirements, cmd.text
        for req in requirements:
            self.check_requirement(cmd, req, own)

    def check_requirement(self, cmd: Command, req: str, own: bool) -> None:
        m = re.fullmatch(r"(?P<name>[^\[\]]+)(\[(?P<extras>[^\]]+)\])?", req)
        assert m, f"{cmd.text}: cannot read the requirement {req!r}"
        name, extras = m["name"], [e.strip() for e in (m["extras"] or "").split(",") if e.strip()]
        local = name.startswith((".", "/")) or "/" in name
        path = self.path(name) if local else (ROOT if name == "lqframe" else None)
        assert path is None or (path / "pyproject.toml").is_file(), f"{cmd.text}: {name} is not a project folder"
        project = _pyproject(path)["project"] if path is not None else {"name": name}
        for extra in extras:
            assert extra in project.get("optional-dependencies", {}), f"{cmd.text}: no extra {extra} in {path}"
        if project["name"] != "lqframe" and local:
            self.sites.append(self.installer.site_for(path))
        elif own:
            _check_installed(project["name"])
            for extra in extras:
                for spec in project["optional-dependencies"][extra]:
                    _check_installed(spec)


def _check_installed(spec: str) -> None:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate():
        return
    try:
        have = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed, but the docs' set-up installs it ({spec})")
    assert req.specifier.contains(have, prereleases=True), f"{req.name} {have} does not satisfy {spec}"


# --------------------------------------------------------------------------- command handlers


def _lqframe_run(shell: Shell, cmd: Command) -> None:
    """``lqframe run …`` as written, plus ``--model <tiny model>`` and ``--set`` of SMALL."""
    argv = [*shell.program(cmd.argv[0]), *cmd.argv[1:], "--model", str(shell.context["model"])]
    for s in SMALL:
        argv += ["--set", s]
    shell.run(cmd, argv)


def _this_suite(shell: Shell, cmd: Command) -> None:
    """The test suite: this very file is part of it (pytest's testpaths), so it is not run again."""
    assert _pyproject(ROOT)["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert Path(__file__).parent == ROOT / "tests"


def _plugins(shell: Shell, cmd: Command) -> None:
    """``lqframe plugins``: a console block's output must match (see :func:`_compare_listing`); a
    comment ``# NAME, from DIST VERSION`` names a row it lists; with LQFRAME_BLOCK_PLUGINS the
    blocked plugins are absent and the listing ends by naming them."""
    out = shell.run(cmd, [*shell.program(cmd.argv[0]), *cmd.argv[1:]]).stdout
    rows = [line.split() for line in out.split("\n\n")[0].splitlines()[2:]]
    if cmd.expected is not None:
        _compare_listing(cmd.expected, out, {"lqframe"})
    m = re.fullmatch(r"(?P<name>[\w.-]+), from (?P<dist>[\w.-]+) (?P<version>\S+)", cmd.comment)
    if m:
        assert [r for r in rows if r[1] == m["name"] and r[3:5] == [m["dist"], m["version"]]], out
    blocked = cmd.env.get(BLOCK_ENV)
    if blocked:
        names = set(blocked.split(","))
        assert not [r for r in rows if r[2] in names or r[3] in names], out
        assert out.strip().splitlines()[-1].startswith(f"blocked by {BLOCK_ENV}: "), out


_COLLECTED: dict[tuple, subprocess.CompletedProcess[str]] = {}


def _collect(shell: Shell, cmd: Command) -> None:
    """``python -m pytest …`` with ``--collect-only`` (tests/test_example_plugin.py runs the example's
    own tests; the property suite's cases of one plugin take minutes): it must collect tests, each
    of them matching ``-k``. The same collection in the same folder with the same plugins is reused."""
    argv = [sys.executable, *cmd.argv[1:], "--collect-only", "-q", "-p", "no:cacheprovider"]
    where = shell.cwd.relative_to(shell.home) if shell.cwd.is_relative_to(shell.home) else shell.cwd
    memo = (tuple(argv), str(where), shell.env(cmd).get("PYTHONPATH"))
    if memo not in _COLLECTED:
        _COLLECTED[memo] = shell.run(cmd, argv)
    shell.results[cmd.text] = _COLLECTED[memo]
    ids = [line for line in _COLLECTED[memo].stdout.splitlines() if "::" in line]
    assert ids, _COLLECTED[memo].stdout
    if "-k" in cmd.argv:
        keyword = cmd.argv[cmd.argv.index("-k") + 1]
        assert all(keyword in i for i in ids), [i for i in ids if keyword not in i]


def _kernel_tests(shell: Shell, cmd: Command) -> None:
    """The kernel tests, collected (see :func:`_collect`; compiled or interpreted, the same tests are
    collected); with ``-k cuda``, as many cases of the GPU-only test as docs/kernels.md states."""
    _collect(shell, cmd)
    if "-k" in cmd.argv:
        ids = [line for line in shell.results[cmd.text].stdout.splitlines() if "::" in line]
        stated = re.search(r"`(test_cuda_\w+)`, (\d+) cases", (ROOT / "docs" / "kernels.md").read_text())
        assert stated, "docs/kernels.md no longer states the GPU-only test's case count"
        assert sum(f"::{stated[1]}[" in i for i in ids) == int(stated[2]), ids


def _help(shell: Shell, cmd: Command) -> None:
    """A benchmark the tests cannot afford (or install): ``--help`` only; the test checks its flags."""
    shell.run(cmd, [*shell.program(cmd.argv[0]), *cmd.argv[1:], "--help"])


def _kernel_layers(shell: Shell, cmd: Command) -> None:
    """The per-layer kernel benchmark on one LLaMA-7B shape, int4, batch 1, one timed call (on the
    CPU when there is no GPU)."""
    argv = [*shell.program(cmd.argv[0]), *cmd.argv[1:]]
    argv[argv.index("cuda")] = DEVICE
    shell.run(cmd, [*argv, "--shapes", "7B q/k/v/o", "--bits", "4", "--batches", "1", "--repeats", "1"])


def _kernel_generate(shell: Shell, cmd: Command) -> None:
    """Decode speed of an lqframe output folder: DIR is the README run's, 4 new tokens."""
    argv = [*shell.program(cmd.argv[0]), *cmd.argv[1:]]
    argv[argv.index("cuda")] = DEVICE
    argv[argv.index("DIR")] = str(shell.context["DIR"])
    shell.run(cmd, [*argv, "--new-tokens", "4"])


def _correct(shell: Shell, cmd: Command) -> None:
    """The commands of "Correcting an existing quantized model": the placeholders are the tiny float
    model and a quantized checkpoint of it; ``lqframe run`` gets SMALL's data."""
    words = {"path/to/float-model": str(shell.context["float"]),
             "path/to/quantized-model": str(shell.context["quantized"])}
    argv = [*shell.program(cmd.argv[0]), *(words.get(w, w) for w in cmd.argv[1:])]
    if cmd.argv[1] == "run":
        for s in SMALL:
            argv += ["--set", s]
    shell.run(cmd, argv)


CORRECT = ("lqframe run recipes/correct-qera32.yaml --model path/to/float-model --from path/to/quantized-model "
           "--output runs/corrected")

#: every command of the docs that is not set-up (venv, pip) or `cd`, with how it runs
COMMANDS = {
    ".venv/bin/lqframe run": _lqframe_run,
    "lqframe run recipes/nf4-svd32.yaml --set quantize_stage.quantizer.bits=3 "
    "--set reconstruct_stage.reconstructor.rank=64": _lqframe_run,
    ".venv/bin/python -m pytest -q": _this_suite,
    "lqframe plugins": _plugins,
    "LQFRAME_BLOCK_PLUGINS=binary lqframe plugins": _plugins,
    "LQFRAME_BLOCK_PLUGINS=lqframe-example-plugin,rtn lqframe plugins": _plugins,
    "python -m pytest": _collect,
    "python -m pytest tests/test_properties.py -k binary": _collect,
    "python -m pytest tests/test_triton_kernels.py": _kernel_tests,
    "TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py": _kernel_tests,
    "python -m pytest tests/test_triton_kernels.py -k cuda": _kernel_tests,
    "OMP_NUM_THREADS=1 ~/.venvs/lqframe-peers/bin/python benchmarks/peers.py": _help,
    "python benchmarks/kernel_speed.py --device cuda": _kernel_layers,
    "python benchmarks/kernel_speed.py --device cuda --generate DIR": _kernel_generate,
    CORRECT: _correct,
    "lqframe export runs/corrected --to peft runs/corrected-adapter --base-model path/to/quantized-model": _correct,
    "lqframe generate runs/corrected def fibonacci(n): --compare --max-new-tokens 24": _correct,
}


def _compare_listing(expected: list[str], output: str, dists: set[str]) -> None:
    """The ``lqframe plugins`` table equals the docs' (``...`` standing for any lines), except for
    rows of distributions other than ``dists`` installed here (their columns widen the table: then
    the rows are compared word by word)."""
    table = output.split("\n\n")[0].splitlines()
    foreign = [line for line in table[2:] if line.split()[3] not in dists]
    if not foreign:
        assert match_lines(expected, table), "\n".join(["the docs show:", *expected, "lqframe prints:", *table])
    else:
        kept = [" ".join(line.split()) for line in table if line not in foreign]
        assert match_lines([" ".join(e.split()) for e in expected], kept), (expected, kept)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-block LLaMA with a byte tokenizer, standing in for the default model."""
    return tiny_llama_dir(tmp_path_factory.mktemp("docs-model") / "tiny-llama")


@pytest.fixture(scope="module")
def installer(tmp_path_factory) -> Installer:
    """Scratch installs of local plugins, shared by the module's shell blocks."""
    return Installer(tmp_path_factory.mktemp("docs-sites"))


@pytest.fixture(scope="module")
def example_site(installer) -> Path:
    """The example quantizer plugin (`binary`) installed into a scratch target."""
    return installer.site_for(EXAMPLE_PLUGIN)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, installer, tiny_model) -> Shell:
    """README's main job (set-up checked, `lqframe run` on the tiny model), shared with the
    kernel benchmark's `--generate DIR`."""
    key = keys_of("test_readme_main_job")[0]
    shell = Shell(tmp_path_factory.mktemp("docs-readme"), installer, model=tiny_model)
    shell.execute(shell_commands(block_for(key).text))
    return shell


def _load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # attrs and inspect look classes' modules up there
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- coverage


def test_every_fenced_block_is_covered():
    """Every fenced block of README.md and docs/*.md is claimed by exactly one COVERAGE entry whose
    test exists (or which says why the block is not code), and every entry claims exactly one
    block: a new block, or a changed first line, fails here until it is covered."""
    blocks = all_blocks()
    assert len(blocks) >= len(COVERAGE) > 0
    problems = []
    for b in blocks:
        keys = [k for k in COVERAGE if _matches(b, k)]
        if len(keys) != 1:
            problems.append(f"{b}: claimed by {keys or 'no COVERAGE entry'}\n{b.text}")
    for key, how in COVERAGE.items():
        n = sum(_matches(b, key) for b in blocks)
        if n != 1:
            problems.append(f"COVERAGE entry {key} matches {n} blocks")
        if not how.startswith((NOT_CODE, NOT_RUN)) and not (how.startswith("test_") and callable(globals().get(how))):
            problems.append(f"COVERAGE entry {key}: no test {how!r} in this file")
    assert not problems, "\n\n".join(problems)


def test_markdown_fences_are_read_as_commonmark(tmp_path):
    """The fence parser: backtick and tilde fences, info strings, indented fences, longer closing
    fences, and unclosed fences (an error)."""
    doc = tmp_path / "x.md"
    doc.write_text("text ```not a fence```\n```python title\na = 1\n````\n\n  ~~~\n  b\n  ~~~\n")
    blocks = fenced_blocks(doc, tmp_path)
    assert [(b.line, b.lang, b.text) for b in blocks] == [(2, "python", "a = 1\n"), (6, "", "b\n")]
    doc.write_text("```\nopen\n")
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks(doc, tmp_path)


def test_shell_commands_are_split_like_a_shell():
    """The command parser: `&&` chains, NAME=value prefixes, comments outside quotes, subshells,
    continuation lines, console blocks with output."""
    cmds = shell_commands("A=1 b 'c # d' && e  # note\n(cd x && y)\nf \\\n  g\n")
    assert [(c.text, c.env, c.comment, c.subshell) for c in cmds] == [
        ("A=1 b c # d", {"A": "1"}, "", False), ("e", {}, "note", False), ("cd x", {}, "", True),
        ("y", {}, "", True), ("f g", {}, "", False)]
    (c,) = shell_commands("$ lqframe plugins\nkind  name\n----\n", console=True)
    assert c.text == "lqframe plugins" and c.expected == ["kind  name", "----"]


# --------------------------------------------------------------------------- README


@pytest.mark.slow
def test_readme_main_job(readme_run: Shell):
    """README's main job: the set-up is what the checkout offers, and `lqframe run` (the tiny model
    for the default one) compresses every decoder linear with the default recipe as README describes
    it (GPTQ int4 g64 + QERA-exact r32, calibrated on pydoc + news, scored on pydoc, news and wiki),
    prints the per-layer table, saves to runs/<model name>/ with report.json's figures per text,
    windows, stage timings and versions, and refuses to overwrite when run again."""
    cmd = ".venv/bin/lqframe run"
    proc = readme_run.results[cmd]
    out = readme_run.home / "runs" / "tiny-llama"
    assert "saved to runs/tiny-llama" in proc.stdout and proc.stdout.startswith("layer ")
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 2 * 7
    assert {(r["quantizer"], r["bits"], r["group_size"], r["reconstructor"], r["rank"]) for r in report["layers"]} \
        == {("gptq", 4, 64, "qera-exact", 32)}
    assert [c["source"] for c in report["data"]["calibration"]] == ["pydoc", "news"]
    assert list(report["perplexity"]) == ["pydoc", "news", "wiki"]
    assert report["stage_seconds"] and report["versions"]["lqframe"]
    again = _run([*_lqframe(), "run", "--model", str(readme_run.context["model"]),
                  *[w for s in SMALL for w in ("--set", s)]], readme_run.home, check=False)
    assert again.returncode == 2 and "already holds a finished checkpoint" in again.stderr


def test_readme_test_command_is_what_ci_runs(tmp_path, installer):
    """README's test command is, line for line, what .ci/run runs; its set-up is what the checkout
    offers (the constraint file, the `test` extra, installed here) and it ends in this suite."""
    block = block_for(keys_of("test_readme_test_command_is_what_ci_runs")[0])
    assert block.text.strip() in (ROOT / ".ci" / "run").read_text().splitlines()
    Shell(tmp_path, installer).execute(shell_commands(block.text))


def test_readme_python_session(monkeypatch, tiny_model):
    """README's Python blocks, run in order in one namespace from the checkout: the printed bits per
    parameter is the stated 4.127 and `decompose` returns the stated types; `lqframe.compress` takes
    the recipe file and windows and compresses every linear of a model (the tiny model for
    "path/to/model", random token windows for `windows`, the CPU when there is no GPU)."""
    import lqframe
    from lqframe.lqlinear import LQLinear

    monkeypatch.chdir(ROOT)
    first = block_for(("README.md", "import torch, lqframe"))
    second = block_for(("README.md", "from transformers import AutoModelForCausalLM"))
    code = _replace(second.text, '"path/to/model"', repr(str(tiny_model)))
    code = _replace(code, 'device="cuda"', f'device="{DEVICE}"')
    prelude = "windows = torch.randint(0, 256, (4, 64))  # 4 windows of 64 token ids of the tiny model\n"
    ns: dict = {"__name__": "__docs__"}
    printed = exec_session([("README.md:1", first.text), ("prelude", prelude), ("README.md:2", code)], ns)
    assert check_stated_values("README.md:1", first.text, printed) == 1
    dec = ns["dec"]
    assert type(dec) is lqframe.Decomposition and isinstance(dec.qweight, lqframe.QuantizedWeight)
    assert isinstance(dec.lowrank, lqframe.LowRank)
    assert len(ns["results"]) == 2 * 7
    assert isinstance(ns["model"].model.layers[1].mlp.down_proj, LQLinear)
    assert "tuning" in inspect.signature(lqframe.compress).parameters  # the block's last comment


# --------------------------------------------------------------------------- shell blocks (docs/plugins.md, README)


@pytest.mark.slow
@pytest.mark.parametrize("key", keys_of("test_shell_block"), ids=_key_id)
def test_shell_block(key, tmp_path, installer, example_site):
    """Each command of the block runs as COMMANDS says, after its set-up is checked. Blocks that
    talk about the example plugin as installed (plugins.md §5) start with it in the scratch site."""
    block = block_for(key)
    shell = Shell(tmp_path, installer)
    if key[1].startswith(BLOCK_ENV):
        shell.sites.append(example_site)
    commands = shell_commands(block.text, console=block.lang == "console")
    shell.execute(commands)
    assert set(shell.results) == {c.text for c in commands if c.text in COMMANDS}


# --------------------------------------------------------------------------- docs/recipes.md


def test_recipe_reference_parses():
    """The annotated recipe is a valid recipe (components and options checked) with the 2 listed
    candidates plus the 3 × 2 × 3 = 18 of its grid."""
    from lqframe.recipe import parse_recipe

    block = block_for(("docs/recipes.md", "model: default"))
    recipe = parse_recipe(yaml.safe_load(block.text), str(block))
    assert recipe.stages() == ["allocate", "quantize", "reconstruct", "evaluate", "save"]
    assert len(recipe.allocate.candidates) == 2 + 18


def test_tune_stage_parses():
    """The tune_stage example, added to the default recipe, is a valid recipe."""
    from lqframe.recipe import DEFAULT_RECIPE, parse_recipe

    block = block_for(("docs/recipes.md", "tune_stage:"))
    doc = {**yaml.safe_load(DEFAULT_RECIPE), **yaml.safe_load(block.text)}
    recipe = parse_recipe(doc, str(block))
    assert recipe.tune is not None and recipe.tune.windows == 64 and recipe.tune.max_updates == 250


def test_experts_options_parse():
    """The quantize_stage.experts example, in the default recipe, is a valid recipe with the values shown."""
    from lqframe.recipe import DEFAULT_RECIPE, parse_recipe

    block = block_for(("docs/recipes.md", "quantize_stage:\n  quantizer: {name: gptq, bits: 4, group_size: 128}\n"
                                          "  experts:"))
    doc = {**yaml.safe_load(DEFAULT_RECIPE), **yaml.safe_load(block.text)}
    experts = parse_recipe(doc, str(block)).quantize.experts
    assert experts.calibration == "routed" and experts.threshold(24576) == 123


#: the recipe behind the error message docs/recipes.md shows
MY_YAML = "quantize_stage:\n  quantizer: {name: nf, bitz: 4}\n"


def test_recipe_error_message(tmp_path):
    """`lqframe run my.yaml` with a misspelt option prints exactly the documented error line."""
    block = block_for(("docs/recipes.md", "lqframe: error: my.yaml:"))
    (tmp_path / "my.yaml").write_text(MY_YAML)
    proc = _run([*_lqframe(), "run", "my.yaml"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == block.text.strip()


@pytest.mark.slow
def test_set_command(tmp_path, installer, tiny_model):
    """`lqframe run RECIPE --set …` runs (on the tiny model) and the --set values reach every
    layer: 3-bit NF with SVD rank 64 (clipped to the matrix)."""
    block = block_for(("docs/recipes.md", "lqframe run recipes/nf4-svd32.yaml --set"))
    shell = Shell(tmp_path, installer, model=tiny_model)
    shell.execute(shell_commands(block.text))
    report = json.loads((shell.home / "runs" / "tiny-llama" / "report.json").read_text())
    shapes = {n: m.weight.shape for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    for layer in report["layers"]:
        assert (layer["quantizer"], layer["bits"], layer["reconstructor"]) == ("nf", 3, "svd")
        assert layer["rank"] == min(64, *shapes[layer["name"]])


@pytest.mark.slow
def test_correct_and_serve_blocks(tmp_path, installer):
    """"Correcting an existing quantized model" on the tiny model and a compressed-tensors checkpoint
    of it written by the compressed-tensors library (llm-compressor's layout): the commands run as
    written (Q imported, QERA's term added, the adapter exported, both continuations printed), and
    the "Serving it" block — transformers loading that checkpoint, PEFT attaching the adapter —
    computes lqframe's corrected model."""
    import lqframe
    from lqframe.testing import byte_tokenizer
    from tests.test_imports import _library_checkpoint

    float_dir = tiny_llama_dir(tmp_path / "float", layers=2)
    quantized = tmp_path / "quantized"
    _library_checkpoint(float_dir, quantized, symmetric=True)
    byte_tokenizer().save_pretrained(quantized)
    shell = Shell(tmp_path / "shell", installer, float=float_dir, quantized=quantized)
    commands = shell_commands(block_for(("docs/recipes.md", "lqframe run recipes/correct-qera32.yaml")).text)
    shell.execute(commands)
    runs = shell.home / "runs"
    report = json.loads((runs / "corrected" / "report.json").read_text())
    assert {r["quantizer"] for r in report["layers"]} == {"imported:compressed-tensors"}
    assert all(r["info"]["output_error"] < r["info"]["output_error_none"] for r in report["layers"])
    assert (runs / "corrected-adapter" / "adapter_config.json").is_file()
    assert shell.results[commands[-1].text].stdout.strip()
    code = block_for(("docs/recipes.md", "import torch\nfrom peft import PeftModel")).text
    assert code.count('"path/to/quantized-model"') == 2
    code = code.replace('"path/to/quantized-model"', repr(str(quantized)))
    code = _replace(code, '"runs/corrected-adapter"', repr(str(runs / "corrected-adapter")))
    namespace: dict = {}
    exec(compile(code, str(block_for(("docs/recipes.md", "import torch\nfrom peft import PeftModel"))), "exec"),
         namespace)
    with torch.no_grad():
        got = namespace["model"](input_ids=namespace["ids"]).logits
        want = lqframe.load(runs / "corrected")(input_ids=namespace["ids"]).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


# --------------------------------------------------------------------------- docs/kernels.md, docs/peers.md


@pytest.mark.slow
def test_kernel_benchmark_commands(tmp_path, installer, readme_run):
    """Both benchmark commands run (small sizes; the README run's folder as DIR): a table per layer
    shape, and decode tokens/s of the float and the compressed model; on a CPU they say that GPU
    figures need a GPU."""
    block = block_for(("docs/kernels.md", "python benchmarks/kernel_speed.py --device cuda "))
    shell = Shell(tmp_path, installer, DIR=readme_run.home / "runs" / "tiny-llama")
    shell.execute(shell_commands(block.text))
    layers, generate = shell.results.values()
    assert "| 7B q/k/v/o | 4096 × 4096 | 4 | 1 |" in layers.stdout
    assert "| float |" in generate.stdout and "| compressed, reference |" in generate.stdout
    if DEVICE == "cpu":
        assert "GPU figures need a GPU" in layers.stderr and "GPU figures need a GPU" in generate.stderr


@pytest.mark.slow
def test_peers_commands(tmp_path, installer):
    """The peers' set-up names what exists (the `peers` extra, a separate venv), benchmarks/peers.py
    takes every option docs/peers.md lists and the peers it names, and the table it prints from its
    cached rows holds the rows docs/peers.md shows (the benchmark itself needs llmcompressor and
    minutes: not run)."""
    block = block_for(("docs/peers.md", "python3 -m venv ~/.venvs/lqframe-peers"))
    shell = Shell(tmp_path, installer)
    shell.execute(shell_commands(block.text))
    (help_text,) = [p.stdout for p in shell.results.values()]
    doc = (ROOT / "docs" / "peers.md").read_text()
    options = re.findall(r"^\* `(--[a-z-]+)", doc, re.M)
    assert {"--peers", "--force", "--table", "--tiny"} <= set(options)
    for option in options:
        assert re.search(rf"(^|[\s\[]){option}\b", help_text, re.M), f"peers.py has no {option}"
    for peer in re.search(r"`--peers ([a-z -]+)`", doc)[1].split():
        assert peer in help_text
    table = _run([sys.executable, "benchmarks/peers.py", "--table"], ROOT).stdout.splitlines()
    rows = [line for line in doc.splitlines() if line.startswith(("| llm-compressor gptq |", "| peft nf4 |"))]
    assert len(rows) == 3 and all(r in table for r in rows), (rows, table)


# --------------------------------------------------------------------------- docs/plugins.md: Python


_LOWRANK_IMPORTS = ("from typing import ClassVar\n\nimport attrs\n\nfrom lqframe.lowrank import LowRankReconstructor, "
                    "real\nfrom lqframe.numerics import DiagonalScaling\n")


@pytest.mark.parametrize("key", keys_of("test_lowrank_class_quotes"), ids=_key_id)
def test_lowrank_class_quotes(key):
    """The quoted reconstructor classes are their modules' classes (statement for statement,
    comments and docstrings aside) and, executed with the modules' imports, behave exactly like
    them: the same options, defaults, needs and test configurations, the same decomposition."""
    import attrs

    import lqframe
    from lqframe.testing import synthetic_stats

    block = block_for(key)
    if "QERAApprox" in key[1]:
        real = lqframe.registry().get("reconstructor", "qera-approx")
    else:
        real = _load_module(EXAMPLE_RECONSTRUCTOR / "lqframe_example_reconstructor.py", "_doc_abs_mean")
        real = real.AbsMeanReconstructor
    source = Path(sys.modules[real.__module__].__file__).read_text()
    faithful = quotes(block.text, source)
    assert faithful, f"{block} is not what {real.__module__} holds"
    ns: dict = {}
    exec_session([("imports", _LOWRANK_IMPORTS), (str(block), block.text)], ns)
    quoted = ns[real.__name__]
    assert [(f.name, f.default) for f in attrs.fields(quoted)] == [(f.name, f.default) for f in attrs.fields(real)]
    assert (quoted.label, quoted.needs, quoted.test_configs()) == (real.label, real.needs, real.test_configs())
    w = torch.randn(24, 40)
    stats = synthetic_stats(24, 40, real.needs)
    q = lqframe.registry().create("quantizer", "rtn")
    a, b = quoted(rank=4).decompose(w, q, stats), real(rank=4).decompose(w, q, stats)
    assert torch.equal(a.dense(), b.dense())


def test_statistic_kind_snippet():
    """The plugin-defined statistic: registered by the documented hook (with a reconstructor that
    needs it), accumulated with the max merge rule across batches, and what `stats.get` returns."""
    import attrs

    import lqframe
    from lqframe.lowrank import LowRankReconstructor
    from lqframe.numerics import DiagonalScaling
    from lqframe.registry import Registry
    from lqframe.stats import StatsAccumulator

    @attrs.frozen
    class MyReconstructor(LowRankReconstructor):  # the reconstructor the snippet registers
        needs = frozenset({"abs_max"})

        def column_scaling(self, stats):
            return DiagonalScaling(stats.get("abs_max"))

    block = block_for(("docs/plugins.md", "from lqframe.stats import StatisticKind"))
    ns = {"lqframe": lqframe, "MyReconstructor": MyReconstructor}
    exec_session([(str(block), block.text)], ns)
    reg = Registry(load_entry_points=False)
    assert reg.register_plugin(types.SimpleNamespace(lqframe_register=ns["lqframe_register"]), "my-plugin"), \
        reg.failures
    acc = StatsAccumulator(40, {"abs_max"}, reg.statistics())
    x = torch.randn(96, 40)
    for chunk in x.split(32):
        acc.update(chunk)
    stats = acc.finalize()
    assert torch.equal(stats.get("abs_max"), x.double().abs().max(0).values)
    q = lqframe.registry().create("quantizer", "rtn")
    assert reg.create("reconstructor", "my-method", rank=4).decompose(torch.randn(24, 40), q, stats).rank == 4


@pytest.mark.parametrize("key", keys_of("test_hook_snippets"), ids=_key_id)
def test_hook_snippets(key):
    """The hook implementations register `binary` (the example's class) into a private registry;
    the walkthrough's is the example module's own."""
    from lqframe.registry import Registry

    example = _load_module(EXAMPLE_PLUGIN / "lqframe_example_plugin.py", "_doc_binary")
    block = block_for(key)
    ns = {"BinaryQuantizer": example.BinaryQuantizer}
    if "import lqframe" not in block.text:  # the walkthrough's quote of the module's hook
        faithful = quotes(block.text, Path(example.__file__).read_text())
        assert faithful, f"{block} is not the hook of {example.__file__}"
        ns["lqframe"] = importlib.import_module("lqframe")
    exec_session([(str(block), block.text)], ns)
    reg = Registry(load_entry_points=False)
    assert reg.register_plugin(types.SimpleNamespace(lqframe_register=ns["lqframe_register"]), "binary")
    assert reg.create("quantizer", "binary").quantize(torch.randn(4, 64)).bits == 1


def test_entry_point_toml():
    """The entry-point table is valid TOML and is what the example plugin's pyproject.toml declares."""
    block = block_for(("docs/plugins.md", "[project.entry-points.lqframe]"))
    quoted = tomllib.loads(block.text)
    assert quoted["project"]["entry-points"]["lqframe"] == _pyproject(EXAMPLE_PLUGIN)["project"]["entry-points"][
        "lqframe"]


def test_conformance_file_quote():
    """The quoted conformance tests are the whole of the example's tests/test_conformance.py
    (docstrings aside, `...` for the statements left out)."""
    block = block_for(("docs/plugins.md", "import lqframe\nfrom lqframe import testing"))
    faithful = quotes(block.text, (EXAMPLE_PLUGIN / "tests" / "test_conformance.py").read_text(), whole=True)
    assert faithful, f"{block} is not the whole of the example's tests/test_conformance.py"


def test_private_registry_snippet():
    """The registration test from "Your own tests" passes with the example's BinaryQuantizer."""
    example = _load_module(EXAMPLE_PLUGIN / "lqframe_example_plugin.py", "_doc_binary")
    block = block_for(("docs/plugins.md", "import lqframe\nfrom lqframe.registry import Registry"))
    ns = {"BinaryQuantizer": example.BinaryQuantizer}
    exec_session([(str(block), block.text)], ns)
    ns["test_registers"]()


@pytest.mark.slow
def test_packaging_snippet(tmp_path):
    """The install-into-a-scratch-directory snippet works: the installed example is listed by
    `lqframe plugins --json` (its elided arguments: capture the output, fail on errors)."""
    block = block_for(("docs/plugins.md", 'subprocess.run([sys.executable, "-m", "pip", "install"'))
    code = _replace(block.text, "...)", "capture_output=True, text=True, check=True)")
    code = _replace(code, 'subprocess.run([sys.executable, "-m", "lqframe.cli"',
                    'listing = subprocess.run([sys.executable, "-m", "lqframe.cli"')
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    ns = {"os": os, "sys": sys, "subprocess": subprocess, "site": tmp_path / "site", "plugin_source": source}
    exec_session([(str(block), code)], ns)
    entries = json.loads(ns["listing"].stdout)
    assert {"kind": "quantizer", "name": "binary", "distribution": "lqframe-example-plugin"}.items() <= next(
        e for e in entries if e["name"] == "binary").items()


@pytest.mark.slow
def test_binary_example(tmp_path, example_site):
    """The walkthrough's session runs with the example installed (in a subprocess, the plugin on
    PYTHONPATH): the stated storage (4800 code bits + 192 float16 scales) and the svd correction
    lowering the error."""
    block = block_for(("docs/plugins.md", "import lqframe, torch"))
    check = ("assert qw.storage_bits() == 4800 + 192 * 16\n"
             "assert torch.linalg.norm(W - dec.dense()) < torch.linalg.norm(W - qw.dequantize())\n")
    spec, result = tmp_path / "spec.json", tmp_path / "printed.json"
    spec.write_text(json.dumps([[str(block), block.text], ["check", check]]))
    _run([sys.executable, "-m", "tests.docblocks", str(spec), str(result)], ROOT,
         {**_base_env(), "PYTHONPATH": str(example_site)})
    printed = json.loads(result.read_text())
    check_stated_values(str(block), block.text, [tuple(p) for p in printed])
    assert [p[0] for p in printed] == [str(block)]


# --------------------------------------------------------------------------- docs/plugins.md: listings


def test_listing_with_the_example_plugin(example_site):
    """`lqframe plugins` with the example installed starts as docs/plugins.md §5 shows."""
    block = block_for(("docs/plugins.md", "kind           name"))
    out = _run([*_lqframe(), "plugins"], ROOT, {**_base_env(), "PYTHONPATH": str(example_site)}).stdout
    _compare_listing(block.text.splitlines(), out, {"lqframe", "lqframe-example-plugin"})


def test_failed_plugin_listing(tmp_path):
    """A plugin whose import fails (the docs' `broken` of `lqframe-broken` 0.1.0, importing a module
    that does not exist) is reported in exactly the documented lines."""
    block = block_for(("docs/plugins.md", "plugins that failed to load:"))
    site = tmp_path / "site"
    info = site / "lqframe_broken-0.1.0.dist-info"
    info.mkdir(parents=True)
    (site / "lqframe_broken.py").write_text("import nonexistent_dep\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lqframe-broken\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lqframe]\nbroken = lqframe_broken\n")
    out = _run([*_lqframe(), "plugins"], tmp_path, {**_base_env(), "PYTHONPATH": str(site)}).stdout
    assert match_lines(["...", *block.text.splitlines(), "..."], out.splitlines()), out
