"""lqframe's GPTQ export loaded by GPTQModel, the GPTQ loader transformers uses — an optional test:
it runs where ``gptqmodel`` (and ``optimum``, for the transformers path) is installed, and is skipped
elsewhere, CI included (GPTQModel 7.7 is not in the lock: it asks for torch ≥ 2.14.1, and installs
on CPU as a pure-Python sdist; docs/recipes.md "Serving it" has the commands).

The oracle is lqframe's own model with the export's rounding applied: the GPTQ export stores every
tensor outside Q in float16, so the reference is ``lqframe.load`` with those tensors rounded to
float16 (L·R left out for the Q-only comparison)."""

from __future__ import annotations

import pytest
import torch

import lqframe
from lqframe.export import export
from lqframe.lqlinear import LQLinear
from lqframe.recipe import parse_recipe
from lqframe.run import run
from tests.tiny import tiny_llama_dir

pytest.importorskip("gptqmodel")

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptqmodel")
    model = tiny_llama_dir(root / "float", layers=2)
    doc = {"data": {"seq_len": 32, "calibration_windows": 2, "evaluation_windows": 2, "source": "pydoc"},
           "quantize_stage": {"quantizer": {"name": "gptq", "bits": 4, "group_size": 32, "symmetric": False}},
           "reconstruct_stage": {"reconstructor": {"name": "qera-exact", "rank": 4}}, "save_stage": {}}
    run(parse_recipe(doc, "<gptqmodel>"), str(model), root / "ckpt", progress=False, log=lambda s: None)
    for version in (1, 2):
        export(root / "ckpt", "gptq", root / f"gptq-v{version}", gptq_version=version)
    export(root / "ckpt", "peft", root / "adapter", base_model=str(root / "gptq-v2"))
    return root


def _reference(ckpt, lowrank: bool) -> torch.Tensor:
    """lqframe's logits with the float tensors rounded to float16 as the export stores them."""
    model = lqframe.load(ckpt)
    inside = {id(p) for m in model.modules() if isinstance(m, LQLinear) for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in inside:
                p.copy_(p.half().float())
        for m in model.modules():
            if isinstance(m, LQLinear) and not lowrank:
                m.left.zero_()
        return model(input_ids=IDS).logits.float()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("version", [1, 2])
def test_transformers_with_gptqmodel_loads_q(exported, version):
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported / f"gptq-v{version}", device_map="cpu",
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    want = _reference(exported / "ckpt", lowrank=False)
    assert _rel(got, want) <= 2e-3  # (measured 3.6e-4: GPTQModel's CPU kernel)
    assert _rel(got, _reference(exported / "ckpt", lowrank=True)) > 5 * _rel(got, want)


def test_gptqmodel_loads_q_and_the_adapter(exported):
    """GPTQModel's own loader (its torch kernel, float16 on CPU) with the PEFT export as its LoRA: Q + L·R.
    It reads asymmetric GPTQ written by another tool only in the v2 format (zero points as stored)."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.adapter.adapter import Lora

    loaded = GPTQModel.load(str(exported / "gptq-v2"), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16,
                            adapter=Lora(rank=4, path=str(exported / "adapter")))
    with torch.no_grad():
        got = loaded.model(input_ids=IDS).logits
    assert _rel(got, _reference(exported / "ckpt", lowrank=True)) <= 5e-3  # (float16 compute)
