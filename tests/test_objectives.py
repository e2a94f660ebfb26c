"""The built-in loss objectives: the conformance checks of lqframe.testing, and each loss against an
independent formula."""

from __future__ import annotations

import math

import pytest
import torch

from lqframe import registry, testing

DISCREPANCIES = ["model-loss", "logit-kl", "layer-loss"]


@pytest.mark.parametrize("name", DISCREPANCIES)
def test_discrepancies_pass_the_conformance_checks(name):
    for config in registry().get("objective", name).test_configs():
        testing.check_objective(name, config, max_examples=10)


def test_causal_lm_passes_the_conformance_checks():
    testing.check_objective("causal-lm", discrepancy=False, max_examples=10)


def test_every_objective_is_a_case_of_the_suite():
    names = {c.id.split("[")[0] for c in testing.component_cases("objective")}
    assert {"model-loss", "logit-kl", "layer-loss", "causal-lm"} <= names


def _outputs(seed=0, shape=(2, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_model_loss_is_the_mean_squared_error_of_the_hidden_state():
    s, t = _outputs()
    loss = registry().create("objective", "model-loss").loss({"hidden": s}, {"hidden": t}, {})
    assert float(loss) == pytest.approx(float(((s - t) ** 2).sum() / s.numel()), rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_logit_kl_is_the_token_mean_kl_of_teacher_from_student(tau):
    s, t = _outputs(1)
    loss = registry().create("objective", "logit-kl", temperature=tau).loss({"logits": s}, {"logits": t}, {})
    p_t = torch.softmax(t.double() / tau, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s.double() / tau, -1))).sum(-1)  # per token
    assert float(loss) == pytest.approx(float(kl.mean()) * tau * tau, rel=1e-5)


def test_logit_kl_refuses_a_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        registry().create("objective", "logit-kl", temperature=0)


def test_layer_loss_weighs_blocks_by_their_size_when_normalized():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 2, 4, 5, generator=g) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    s = t * 1.1  # every block 10 % off
    norm = registry().create("objective", "layer-loss").loss({"blocks": s}, {"blocks": t}, {})
    assert float(norm) == pytest.approx(0.01, rel=1e-5)  # the same relative error in every block
    raw = registry().create("objective", "layer-loss", normalize=False).loss({"blocks": s}, {"blocks": t}, {})
    per_block = ((s - t) ** 2).mean(dim=(1, 2, 3))
    assert float(raw) == pytest.approx(float(per_block.mean()), rel=1e-6)


def test_causal_lm_is_the_next_token_cross_entropy_with_masked_positions_left_out():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # the second row's last two tokens are padding
    loss = registry().create("objective", "causal-lm").loss({"logits": logits}, {},
                                                          {"input_ids": ids, "attention_mask": mask})
    logp = torch.log_softmax(logits.double(), -1)
    terms = [-logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(5) if mask[b, t + 1]]
    assert len(terms) == 8
    assert float(loss) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)
    assert math.isfinite(float(loss))
