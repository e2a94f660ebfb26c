"""The package itself: ``import lqframe`` stays light (no transformers), transformers' ``from_pretrained``
still loads lqframe checkpoints afterwards whatever the import order, and the package docstring's
example runs."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lqframe
from lqframe.checkpoint import save_checkpoint
from lqframe.lqlinear import LQLinear
from lqframe.models import block_linears
from tests.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_import_does_not_import_transformers():
    proc = _python("import sys, lqframe\n"
                   "heavy = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))\n"
                   "print(heavy)\n"
                   "lqframe.registry()\n"
                   "import lqframe.plugins.gptq, lqframe.plugins.nf, lqframe.plugins.rtn\n"
                   "print('transformers' in sys.modules)")
    assert proc.stdout.split("\n")[:2] == ["[]", "False"], proc.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny compressed llama (int8 factors, so the packed-factor path of the loader runs too) and the
    logits the in-memory compressed model gives."""
    model = tiny_llama(layers=1, hidden=32, intermediate=64)
    q = lqframe.registry().create("quantizer", "rtn", bits=4, group_size=16)
    rec = lqframe.registry().create("reconstructor", "svd", rank=4, factor_dtype="int8")
    for _, _, linears in block_linears(model):
        for name, linear in linears.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    LQLinear.from_decomposition(linear, rec.decompose(linear.weight.detach(), q)))
    out = tmp_path_factory.mktemp("ckpt") / "llama"
    save_checkpoint(model, out)
    ids = torch.arange(16)[None]
    with torch.no_grad():
        logits = model(ids).logits
    torch.save((ids, logits), out.parent / "expected.pt")
    return out


LOAD = """
import sys, torch
{before}
import transformers
{after}
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids, logits = torch.load(sys.argv[2])
with torch.no_grad():
    got = model(ids).logits
assert sum(type(m).__name__ == "LQLinear" for m in model.modules()) == 7
print(float((got - logits).abs().max()))
"""


@pytest.mark.parametrize(("before", "after"), [
    ("import lqframe\nassert 'transformers' not in sys.modules", ""),  # registered when transformers needs it
    ("", "import lqframe"),  # transformers imported first, its quantizer tables not yet
    ("import transformers.quantizers.auto", "import lqframe"),  # the tables imported: registered at once
])
def test_from_pretrained_after_import(checkpoint, before, after):
    proc = _python(LOAD.format(before=before, after=after), str(checkpoint), str(checkpoint.parent / "expected.pt"))
    assert float(proc.stdout.strip()) < 1e-5


def test_lqframe_load_registers(checkpoint):
    """lqframe.load registers explicitly (and loads the same model)."""
    proc = _python("import sys, lqframe, lqframe.hf\n"
                   "assert not lqframe.hf._DONE\n"
                   "lqframe.load(sys.argv[1])\n"
                   "print(lqframe.hf._DONE)", str(checkpoint))
    assert proc.stdout.strip() == "True"


def test_package_docstring_example_runs():
    parser = doctest.DocTestParser()
    test = parser.get_doctest(lqframe.__doc__, {}, "lqframe", lqframe.__file__, 0)
    assert len(test.examples) >= 5
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)


def test_repository_root_shadows_no_installed_package():
    """A Python started in the repository root has the root first on sys.path. The top-level
    ``kernels/`` and ``plugins/`` folders must not be importable as regular packages there: Hugging Face's
    ``kernels`` distribution (which transformers imports when it is installed) must win, and transformers and
    the CLI must work as they do anywhere else."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("kernels")
    except PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` distribution is not installed: transformers >= 5.25 needs it and "
                    "constraints/cpu.txt pins it; this test proves the repository root does not shadow it")
    assert not (ROOT / "kernels" / "__init__.py").exists() and not (ROOT / "plugins" / "__init__.py").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["OMP_NUM_THREADS"] = "1"
    code = ("import sys, kernels, transformers.activations\n"
            "assert sys.path[0] in ('', sys.argv[1]), sys.path[:2]\n"
            "print(kernels.__file__)\n"
            "from kernels import CUDAProperties\n"
            "import lqframe.kernels, lqframe.plugins.gptq\n"
            "print(lqframe.kernels.__path__[0])")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_file, ours = proc.stdout.split()
    assert Path(hf_file).resolve().parent != (ROOT / "kernels").resolve(), hf_file
    assert Path(ours) == ROOT / "kernels"
    proc = subprocess.run([sys.executable, "-m", "lqframe.cli", "plugins"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gptq" in proc.stdout and "qera-exact" in proc.stdout


def test_no_script_or_folder_name_shadows_an_installed_module():
    """``python benchmarks/X.py`` puts benchmarks/ first on sys.path, and a Python started in the repository
    root puts the root there: no top-level folder that is a regular package, and no script in benchmarks/ or
    examples/, may carry the import name of an installed distribution (transformers imports Hugging Face's
    ``kernels``; benchmarks/kernels.py once shadowed it)."""
    from importlib.metadata import packages_distributions

    installed = set(packages_distributions())
    regular = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert regular <= {"lqframe", "tests"}, regular
    scripts = {p.stem for d in ("benchmarks", "examples") for p in (ROOT / d).glob("*.py")}
    clashes = sorted((regular - {"lqframe"} | scripts | {"kernels", "plugins"} & regular) & installed)
    assert not clashes, f"these names shadow installed modules when run from the checkout: {clashes}"
