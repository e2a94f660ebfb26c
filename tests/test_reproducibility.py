"""Figures that hold on any machine: a compression's codes and factors must not depend on the
floating-point path that computed them (BLAS kernels, SIMD width, thread count), and rounding-level
changes of the calibration statistics must not move them.

Measured on the default model (benchmarks/spread.py, docs/design.md "Reproducibility"): with float32
arithmetic a 1e-7 relative change of one layer's ``Σxxᵀ`` changed 6–34 % of the codes of GPTQ +
QERA-exact alternated three times, and BLAS paths moved the default job's perplexity by up to 1 %.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lqframe
from lqframe.types import LayerStats

ROOT = Path(__file__).resolve().parents[1]


def _layer(seed: int = 0, n: int = 96, m: int = 128, tokens: int = 4096):
    """A weight and the Σxxᵀ of correlated activations with a few outlier channels (like an LLM layer's)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(m, m, generator=g, dtype=torch.float64) / m ** 0.5
    x = torch.randn(tokens, m, generator=g, dtype=torch.float64) @ (torch.eye(m, dtype=torch.float64) + mix)
    x[:, :4] *= 20.0
    w = (torch.randn(n, m, generator=g) * 0.05).to(torch.float32)
    return w, x.T @ x, tokens


def _perturbed(rxx: torch.Tensor, relative: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rxx.shape, generator=g, dtype=torch.float64)
    return rxx * (1 + relative * (noise + noise.T) / 2)


def _decompose(w, rxx, tokens, **precision):
    reg = lqframe.registry()
    q = reg.create("quantizer", "gptq", bits=4, group_size=32, **precision)
    r = reg.create("reconstructor", "qera-exact", rank=8, iterations=3, **precision)
    return r.decompose(w, q, LayerStats(n_tokens=tokens, rxx=rxx.clone()))


def test_rounding_level_changes_of_the_statistics_move_no_code():
    """The default decomposition (GPTQ + QERA-exact, alternated) on statistics changed at 1e-12 relative —
    far above float64 rounding, far below float32's — returns the same codes and factors bit for bit."""
    w, rxx, tokens = _layer()
    a = _decompose(w, rxx, tokens)
    for relative in (1e-13, 1e-12):
        b = _decompose(w, _perturbed(rxx, relative), tokens)
        assert torch.equal(a.qweight.codes, b.qweight.codes), f"codes moved under a {relative:g} change of Σxxᵀ"
        assert torch.equal(a.lowrank.left, b.lowrank.left) and torch.equal(a.lowrank.right, b.lowrank.right)


def test_float32_precision_is_what_amplified_rounding():
    """The same check with the former float32 arithmetic fails: this is the amplifier the float64 solves remove
    (kept as an option for GPUs with slow float64)."""
    w, rxx, tokens = _layer()
    a = _decompose(w, rxx, tokens, precision="float32")
    moved = 0
    for seed in range(4):
        b = _decompose(w, _perturbed(rxx, 1e-9, seed), tokens, precision="float32")
        moved += int((a.qweight.unpacked_codes() != b.qweight.unpacked_codes()).sum())
    assert moved > 0


def test_perturbed_statistics_keep_the_output_error():
    """A perturbation at float32's rounding level (1e-7, what another machine's float32 forward gives)
    may move codes, but not the quality: the layer's output error changes by far less than 1 %."""
    w, rxx, tokens = _layer()
    a = _decompose(w, rxx, tokens)
    for seed in range(3):
        b = _decompose(w, _perturbed(rxx, 1e-7, seed), tokens)
        assert abs(b.info["output_error"] / a.info["output_error"] - 1) < 5e-3


CHILD = r"""
import hashlib, json, sys
import torch
import lqframe
from lqframe.evaluate import perplexity
from tests.tiny import tiny_llama

precision = sys.argv[1]
model = tiny_llama(layers=2, hidden=128, intermediate=320)
g = torch.Generator().manual_seed(0)
calibration = torch.randint(0, 256, (8, 128), generator=g)
evaluation = torch.randint(0, 256, (4, 128), generator=g)
recipe = {
    "quantize_stage": {"precision": precision,
                       "quantizer": {"name": "gptq", "bits": 4, "group_size": 32, "precision": precision}},
    "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 8, "iterations": 3,
                                            "precision": precision}},
}
lqframe.compress(model, recipe, calibration, device="cpu", progress=False)
digest = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
print(json.dumps({"hash": digest.hexdigest(), "ppl": perplexity(model, evaluation, progress=False)}))
"""

#: the floating-point paths reachable on one x86 machine: MKL's kernels for this CPU, SSE2-only code (what any
#: x86 machine can run), AVX2; one and two threads
PATHS = [(None, 2), ("COMPATIBLE", 1), ("AVX2", 2), (None, 1)]


def _run(precision: str, cbwr: str | None, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if cbwr:
        env["MKL_CBWR"] = cbwr
    proc = subprocess.run([sys.executable, "-c", CHILD, precision], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_same_checkpoint_on_every_floating_point_path():
    """A small model compressed (GPTQ + QERA-exact alternated, float64 numerics: the defaults) under each BLAS
    path and thread count gives the same checkpoint bit for bit, and so the same perplexity to rounding."""
    runs = [_run("float64", cbwr, threads) for cbwr, threads in PATHS]
    assert len({r["hash"] for r in runs}) == 1, runs
    ppls = [r["ppl"] for r in runs]
    assert max(ppls) / min(ppls) - 1 < 1e-5, ppls


def test_float64_forwards_restore_the_block_bit_for_bit():
    """The executor runs calibration forwards in float64 by casting the block's own parameters for the call:
    afterwards every parameter is the very same float32 tensor (so the weights a quantizer reads, and anything
    holding a reference to them, are untouched), and the float64 forward agrees with the float32 one."""
    from lqframe.executor import BlockExecutor
    from lqframe.models import find_blocks
    from tests.tiny import tiny_llama

    model = tiny_llama(layers=1, hidden=64, intermediate=128)
    _, blocks = find_blocks(model)
    block = blocks[0]
    before = {n: (p, p.detach().clone()) for n, p in block.named_parameters()}
    ex = BlockExecutor(model, "cpu", progress=False, precision=torch.float64)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = ex.first_inputs(windows)
    assert all(x.dtype == torch.float64 for x in inputs) and ex.model_dtype == torch.float32
    with ex.computing(block):
        assert all(p.dtype == torch.float64 for p in block.parameters())
    out64 = ex.forward(block, inputs)
    for n, p in block.named_parameters():
        assert p is before[n][0] and p.dtype == torch.float32 and torch.equal(p, before[n][1]), n
    ref = BlockExecutor(model, "cpu", progress=False)
    out32 = ref.forward(block, ref.first_inputs(windows))
    assert out64[0].dtype == torch.float64
    torch.testing.assert_close(out64[0].float(), out32[0], rtol=1e-4, atol=1e-5)
