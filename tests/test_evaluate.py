"""Token perplexity (GPTQ protocol) on tiny random models built here."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from lqframe.errors import DataError
from lqframe.evaluate import nll_sum, perplexity

VOCAB = 128


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config)


def random_windows(n: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)


def reference_perplexity(model, windows) -> float:
    """exp(mean NLL) with every window run on its own, straight from torch's cross_entropy."""
    losses = []
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0].double()
            losses.append(F.cross_entropy(logits[:-1], row[1:], reduction="none"))
    return math.exp(torch.cat(losses).mean().item())


def test_matches_hand_computed_mean_nll():
    model = tiny_llama()
    windows = random_windows(5, 24)
    expected = reference_perplexity(model, windows)
    got = perplexity(model, windows, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)
    # a random model over 128 tokens is near-uniform but not exactly so
    assert 50 < got < 400 and abs(got - VOCAB) > 1e-3


def test_nll_sum_counts_predicted_tokens():
    model = tiny_llama()
    windows = random_windows(3, 10)
    total, count = nll_sum(model, windows, progress=False)
    assert count == 3 * 9
    assert math.exp(total / count) == pytest.approx(perplexity(model, windows, progress=False), rel=1e-12)


def test_pooled_nll_not_mean_of_window_perplexities():
    """The NLL is pooled over all predicted tokens before exp: with equal-length windows that is the
    geometric mean of the per-window perplexities, not their arithmetic mean."""
    model = tiny_llama()
    windows = random_windows(4, 16)
    per_window = [perplexity(model, windows[i : i + 1], progress=False) for i in range(4)]
    pooled = math.exp(sum(math.log(p) for p in per_window) / 4)
    assert perplexity(model, windows, progress=False) == pytest.approx(pooled, rel=1e-9)
    assert pooled < sum(per_window) / 4 * (1 - 1e-6)  # the per-window values really differ


def test_uniform_model_gives_vocab_size():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, random_windows(3, 32), progress=False) == pytest.approx(VOCAB, abs=1e-4)


def test_batch_size_does_not_change_the_result():
    model = tiny_llama()
    windows = random_windows(7, 20)  # 7 = 3 + 3 + 1: the last batch is short
    one = perplexity(model, windows, batch_size=1, progress=False)
    three = perplexity(model, windows, batch_size=3, progress=False)
    assert three == pytest.approx(one, rel=1e-6)
    assert perplexity(model, windows, batch_size=100, progress=False) == pytest.approx(one, rel=1e-6)


def test_windows_are_independent():
    """No state is carried from one window to the next: reversing the order changes nothing."""
    model = tiny_llama()
    windows = random_windows(4, 12)
    a = perplexity(model, windows, progress=False)
    b = perplexity(model, windows.flip(0), batch_size=2, progress=False)
    assert b == pytest.approx(a, rel=1e-9)


def test_eval_mode_inference_and_training_flag_restored():
    model = tiny_llama()
    model.config.attention_dropout = 0.5  # would make results random in training mode
    seen = {}

    def record(module, args, output):
        seen["training"] = module.training
        seen["grad"] = torch.is_grad_enabled()
        seen["inference"] = torch.is_inference_mode_enabled()

    model.model.register_forward_hook(record)
    model.train()
    windows = random_windows(2, 16)
    a = perplexity(model, windows, progress=False)
    assert model.training is True
    assert seen == {"training": False, "grad": False, "inference": True}
    assert perplexity(model, windows, progress=False) == a
    model.eval()
    perplexity(model, windows, progress=False)
    assert model.training is False


def test_int32_windows_and_bfloat16_model():
    model = tiny_llama()
    windows = random_windows(2, 16)
    a = perplexity(model, windows, progress=False)
    assert perplexity(model, windows.to(torch.int32), progress=False) == pytest.approx(a, rel=1e-9)
    b = perplexity(model.to(torch.bfloat16), windows, progress=False)
    assert math.isfinite(b) and b == pytest.approx(a, rel=0.05)


def test_progress_bar_goes_to_stderr(capsys):
    model = tiny_llama()
    windows = random_windows(3, 8)
    perplexity(model, windows, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    perplexity(model, windows, progress=True, desc="held-out ppl")
    out = capsys.readouterr()
    assert out.out == "" and "held-out ppl" in out.err


class ConstantLogits(torch.nn.Module):
    """A causal LM stub whose logits at every position are a fixed vector."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("row", logits)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        b, t = input_ids.shape
        return types.SimpleNamespace(logits=self.row.expand(b, t, -1).clone())


def test_nan_logits_give_nan_without_crashing():
    row = torch.zeros(VOCAB)
    row[5] = float("nan")
    assert math.isnan(perplexity(ConstantLogits(row), random_windows(2, 8), progress=False))


def test_huge_nll_gives_inf_without_crashing():
    row = torch.full((VOCAB,), -1e4)
    row[0] = 1e4  # every target other than token 0 costs ~2e4 nats: exp overflows
    windows = torch.ones(2, 8, dtype=torch.long)
    assert perplexity(ConstantLogits(row), windows, progress=False) == float("inf")


def test_any_module_with_logits_works():
    row = torch.zeros(VOCAB)
    assert perplexity(ConstantLogits(row), random_windows(2, 8), progress=False) == pytest.approx(VOCAB, rel=1e-6)


@pytest.mark.parametrize(
    "windows",
    [
        torch.zeros(0, 8, dtype=torch.long),
        torch.zeros(3, 1, dtype=torch.long),
        torch.zeros(8, dtype=torch.long),
        torch.zeros(2, 8),
    ],
)
def test_unusable_windows(windows):
    with pytest.raises(DataError):
        perplexity(tiny_llama(), windows, progress=False)


def test_bad_batch_size():
    with pytest.raises(DataError, match="batch_size"):
        perplexity(tiny_llama(), random_windows(2, 8), batch_size=0, progress=False)
