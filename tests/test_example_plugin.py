"""The example plugin in ``examples/lqframe-example-plugin`` works as a separately installed
distribution: built and installed into a scratch directory (never into the test environment),
found through its ``lqframe`` entry point, listed by ``lqframe plugins``, usable through the
registry, composable with a built-in reconstructor, and blockable with ``LQFRAME_BLOCK_PLUGINS``.

Everything that needs the plugin runs in a subprocess whose ``PYTHONPATH`` points at the scratch
directory, so this process (and lqframe itself) never sees it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lqframe
from lqframe.registry import BLOCK_ENV, Registry

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "lqframe-example-plugin"
DIST_NAME = "lqframe-example-plugin"
MODULE_NAME = "lqframe_example_plugin"


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


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin installed (once per module) into a scratch target directory."""
    root = tmp_path_factory.mktemp("example-plugin")
    # Build from a copy: setuptools builds in the source tree and would leave build/ and
    # *.egg-info directories in the repository.
    source = root / "src"
    shutil.copytree(
        EXAMPLE_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist")
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
    assert (target / f"{MODULE_NAME}.py").is_file(), sorted(p.name for p in target.iterdir())
    return target


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


def test_absent_without_installation() -> None:
    if importlib.util.find_spec(MODULE_NAME) is not None:
        pytest.skip(f"{MODULE_NAME} is installed in this environment; nothing to check")
    assert "binary" not in lqframe.registry().names("quantizer")
    assert "binary" not in Registry().names("quantizer")
    with pytest.raises(lqframe.UnknownComponentError, match="binary"):
        lqframe.registry().create("quantizer", "binary")


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
