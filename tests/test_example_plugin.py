"""The example plugins in ``examples/`` work as separately installed distributions: built and
installed into a scratch directory (never into the test environment), found through their
``lqframe`` entry points, listed by ``lqframe plugins``, usable through the registry, composable
with built-in components, blockable with ``LQFRAME_BLOCK_PLUGINS``, and passing their own
conformance tests (``tests/`` of each example, written against :mod:`lqframe.testing`) with only
lqframe and the plugin installed.

* ``lqframe-example-plugin``: the ``binary`` quantizer;
* ``lqframe-example-reconstructor``: the ``abs-mean`` reconstructor.

Everything that needs a plugin runs in a subprocess whose ``PYTHONPATH`` points at its scratch
directory, so this process (and lqframe itself) never sees it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lqframe
from lqframe.registry import BLOCK_ENV, Registry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_DIR = EXAMPLES / "lqframe-example-plugin"
DIST_NAME = "lqframe-example-plugin"
MODULE_NAME = "lqframe_example_plugin"
RECON_DIR = EXAMPLES / "lqframe-example-reconstructor"
RECON_DIST = "lqframe-example-reconstructor"
RECON_MODULE = "lqframe_example_reconstructor"


def _run(cmd: list[str], env: dict[str, str], cwd: Path, hint: str = "") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"command failed with exit code {proc.returncode}: {cmd}\n{hint}"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def _setuptools_hint() -> str:
    """Why an offline, non-isolated build may fail: it uses the environment's own setuptools."""
    try:
        found = f"setuptools {importlib.metadata.version('setuptools')}"
    except importlib.metadata.PackageNotFoundError:
        found = "no setuptools"
    return (
        f"(the build runs without isolation and offline, with {found} from this environment; "
        "it needs setuptools>=70.1, or an older setuptools>=64 plus the 'wheel' package)\n"
    )


def _install(tmp_path_factory: pytest.TempPathFactory, example: Path, module: str) -> Path:
    """Install an example (from a copy kept in ``<root>/src``) into the scratch target ``<root>/site``."""
    root = tmp_path_factory.mktemp(example.name)
    # Build from a copy: setuptools builds in the source tree and would leave build/ and
    # *.egg-info directories in the repository.
    source = root / "src"
    shutil.copytree(
        example, source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist", ".pytest_cache", ".hypothesis"),
    )
    target = root / "site"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        env,
        root,
        hint=_setuptools_hint(),
    )
    assert (target / f"{module}.py").is_file(), sorted(p.name for p in target.iterdir())
    assert not (target / "tests").exists(), "the example's tests must not be installed"
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example quantizer plugin installed (once per module) into a scratch target directory."""
    return _install(tmp_path_factory, EXAMPLE_DIR, MODULE_NAME)


@pytest.fixture(scope="module")
def recon_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example reconstructor plugin installed (once per module) into its own scratch target."""
    return _install(tmp_path_factory, RECON_DIR, RECON_MODULE)


def _env(site: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that sees the installed example plugin and nothing else added."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", BLOCK_ENV)}
    env["PYTHONPATH"] = str(site)
    env.update(extra)
    return env


def _plugins_json(site: Path, **extra: str) -> list[dict]:
    proc = _run([sys.executable, "-m", "lqframe.cli", "plugins", "--json"], _env(site, **extra), site.parent)
    return json.loads(proc.stdout)


def _find(entries: list[dict], kind: str, name: str) -> dict | None:
    found = [e for e in entries if e.get("kind") == kind and e.get("name") == name]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_plugins_lists_the_installed_example(site: Path) -> None:
    entries = _plugins_json(site)
    binary = _find(entries, "quantizer", "binary")
    assert binary is not None, entries
    assert binary["plugin"] == "binary"
    assert binary["distribution"] == DIST_NAME
    assert binary["version"] == "0.1.0"
    assert binary["options"] == {"group_size": 64, "scale_dtype": "float16"}
    nf = _find(entries, "quantizer", "nf")
    assert nf is not None and nf["distribution"] == "lqframe", entries
    assert not [e for e in entries if e.get("kind") == "failed"], entries


USE_SCRIPT = textwrap.dedent(
    """
    import json
    import lqframe, torch

    r = lqframe.registry()
    info = r.info("quantizer", "binary")
    q = r.create("quantizer", "binary", group_size=32)
    W = torch.randn(48, 100, generator=torch.Generator().manual_seed(1234))
    qw = q.quantize(W)
    deq = qw.dequantize(torch.float32)

    # expected values: sign(x) * mean|x| over each group of 32 columns (the last group has 4)
    expected = torch.empty_like(W)
    for start in range(0, W.shape[1], 32):
        g = W[:, start:start + 32]
        s = g.abs().mean(dim=1, keepdim=True)
        expected[:, start:start + 32] = torch.where(g >= 0, s, -s)

    err_q = float(torch.linalg.norm(W - deq))
    dec = r.create("reconstructor", "svd", rank=4, factor_dtype="float32").decompose(W, q)
    err_lr = float(torch.linalg.norm(W - dec.dense(torch.float32)))

    print(json.dumps({
        "module": type(q).__module__,
        "distribution": info.distribution,
        "format": qw.format,
        "bits": qw.bits,
        "block_size": qw.block_size,
        "shape": list(qw.shape),
        "packed_bytes": qw.codes.numel(),
        "scale_dtype": str(qw.scale.dtype),
        "storage_bits": qw.storage_bits(),
        "predicted_bits": q.storage_bits((48, 100)),
        "max_rel_diff": float(((deq - expected).abs() / expected.abs()).max()),
        "same_signs": bool(torch.equal(deq > 0, W >= 0)),
        "not_below_mean": bool((deq.abs() >= expected.abs()).all()),
        "roundtrip_equal": bool(torch.equal(q.roundtrip(W), deq)),
        "within_error_bound": bool(((W - deq).abs() <= qw.error_bound(W) + 1e-6).all()),
        "dec_format": dec.qweight.format,
        "rank": dec.rank,
        "err_q": err_q,
        "err_lr": err_lr,
    }))
    """
)


def test_quantizer_used_through_the_registry(site: Path) -> None:
    proc = _run([sys.executable, "-c", USE_SCRIPT], _env(site), site.parent)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["module"] == MODULE_NAME
    assert res["distribution"] == DIST_NAME
    assert res["format"] == "binary" and res["bits"] == 1 and res["block_size"] == 32
    assert res["shape"] == [48, 100]
    assert res["packed_bytes"] == 48 * 100 // 8
    assert res["scale_dtype"] == "torch.float16"
    # 4800 one-bit codes + 48 rows × 4 groups of float16 scales
    assert res["storage_bits"] == res["predicted_bits"] == 4800 + 48 * 4 * 16
    # float16 scales are rounded up: at most one unit in the last place (2^-10 relative) above
    assert res["max_rel_diff"] <= 2.0**-10
    assert res["same_signs"] and res["not_below_mean"]
    assert res["roundtrip_equal"]
    assert res["within_error_bound"]
    # composed with the built-in svd reconstructor, the rank-4 term reduces the weight error
    assert res["dec_format"] == "binary" and res["rank"] == 4
    assert res["err_lr"] < res["err_q"] * 0.999


@pytest.mark.parametrize("module,kind,name", [(MODULE_NAME, "quantizer", "binary"),
                                               (RECON_MODULE, "reconstructor", "abs-mean")])
def test_absent_without_installation(module: str, kind: str, name: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed in this environment; nothing to check")
    assert name not in lqframe.registry().names(kind)
    assert name not in Registry().names(kind)
    with pytest.raises(lqframe.UnknownComponentError, match=name):
        lqframe.registry().create(kind, name)


@pytest.mark.parametrize("blocked", ["binary", DIST_NAME])
def test_block_env_hides_the_plugin(site: Path, blocked: str) -> None:
    entries = _plugins_json(site, **{BLOCK_ENV: blocked})
    assert _find(entries, "quantizer", "binary") is None, entries
    assert _find(entries, "quantizer", "nf") is not None, entries
    assert not [e for e in entries if e.get("kind") == "failed"], entries
    # the human-readable listing says what was blocked
    proc = _run([sys.executable, "-m", "lqframe.cli", "plugins"], _env(site, **{BLOCK_ENV: blocked}),
                site.parent)
    assert f"blocked by {BLOCK_ENV}: binary" in proc.stdout


def _own_tests(site: Path) -> dict[str, int]:
    """Run an example's own tests (``tests/`` of its source copy, run from that folder as its author
    would) with only lqframe and the installed plugin importable; the counts of the outcomes."""
    source = site.parent / "src"
    # -P: the source folder is not put on sys.path, so the plugin comes from the installed copy;
    # TRITON_INTERPRET as conftest.py left it (the interpreter without a GPU, compiled kernels with one)
    proc = _run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider"], _env(site), source)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?)", proc.stdout)}
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors"), proc.stdout
    return counts


def test_example_plugin_passes_its_own_tests(site: Path) -> None:
    counts = _own_tests(site)
    reg = lqframe.registry()
    n_pairs = 2 * sum(len(reg.get("reconstructor", r).test_configs()) for r in ("none", "svd", "qera-exact"))
    # 1 registration test, 2 configs × 2 devices, the pairs × 2 devices, 2 Eckart–Young tests
    assert counts.get("passed", 0) + counts.get("skipped", 0) == 1 + 2 * 2 + 2 * n_pairs + 2, counts
    assert counts.get("passed", 0) >= 1 + 2 + n_pairs + 2, counts  # all but the CUDA cases run everywhere


def test_example_reconstructor_passes_its_own_tests(recon_site: Path) -> None:
    counts = _own_tests(recon_site)
    reg = lqframe.registry()
    n_pairs = 3 * sum(len(reg.get("quantizer", q).test_configs()) for q in reg.names("quantizer"))
    # 1 registration test, every quantizer config × 3 configs × 2 devices, 2 optimum tests, alpha 0
    assert counts.get("passed", 0) + counts.get("skipped", 0) == 1 + 2 * n_pairs + 2 + 1, counts
    assert counts.get("passed", 0) >= 1 + n_pairs + 1 + 1, counts


def test_plugins_lists_the_installed_reconstructor(recon_site: Path) -> None:
    entries = _plugins_json(recon_site)
    found = _find(entries, "reconstructor", "abs-mean")
    assert found is not None, entries
    assert (found["plugin"], found["distribution"], found["version"]) == ("abs-mean", RECON_DIST, "0.1.0")
    # the low-rank options come from lqframe's base class, alpha and scale_floor from the plugin
    assert found["options"] == {"rank": 32, "method": "exact", "factor_dtype": "float16", "oversample": 10,
                                "niter": 2, "seed": 0, "iterations": 1, "precision": "float64", "alpha": 1.0,
                                "scale_floor": 1e-6}
    assert _find(entries, "reconstructor", "svd") is not None, entries
    assert _find(entries, "quantizer", "binary") is None, entries  # each example in its own site
    assert not [e for e in entries if e.get("kind") == "failed"], entries


RECON_SCRIPT = textwrap.dedent(
    """
    import json
    import lqframe, torch
    from lqframe.stats import StatsAccumulator

    r = lqframe.registry()
    g = torch.Generator().manual_seed(7)
    W = torch.randn(48, 96, generator=g)
    x = torch.randn(400, 96, generator=g)
    x[:, :6] *= 30                                        # a few outlier input channels
    acc = StatsAccumulator(96, {"abs_sum"})
    acc.update(x)
    stats = acc.finalize()
    q = r.create("quantizer", "rtn", bits=3, group_size=32)
    rec = r.create("reconstructor", "abs-mean", rank=8, factor_dtype="float32")
    dec = rec.decompose(W, q, stats)
    svd = r.create("reconstructor", "svd", rank=8, factor_dtype="float32").decompose(W, q)
    weight = (stats.abs_sum / stats.n_tokens).float()
    try:
        rec.decompose(W, q)
        missing = ""
    except lqframe.MissingStatisticError as err:
        missing = str(err)
    print(json.dumps({
        "module": type(rec).__module__,
        "distribution": r.info("reconstructor", "abs-mean").distribution,
        "rank": dec.rank,
        "lowrank_bits": rec.lowrank_bits((48, 96)),
        "actual_bits": dec.lowrank.storage_bits(),
        "same_q": bool(torch.equal(dec.qweight.codes, svd.qweight.codes)),
        "weighted": [float(torch.linalg.norm((W - d.dense()) * weight)) for d in (dec, svd)],
        "output": [float(torch.linalg.norm(x @ (W - d.dense()).T)) for d in (dec, svd)],
        "missing": missing,
    }))
    """
)


def test_reconstructor_used_through_the_registry(recon_site: Path) -> None:
    proc = _run([sys.executable, "-c", RECON_SCRIPT], _env(recon_site), recon_site.parent)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["module"] == RECON_MODULE and res["distribution"] == RECON_DIST
    assert res["rank"] == 8
    assert res["lowrank_bits"] == res["actual_bits"] == (48 * 8 + 8 * 96) * 32
    assert res["same_q"]  # one-shot: the same Q = q(W), only the correction differs
    # optimal in its own weighting, and better than plain SVD on the outputs of the outlier inputs
    assert res["weighted"][0] < res["weighted"][1]
    assert res["output"][0] < res["output"][1]
    assert "abs_sum" in res["missing"]

