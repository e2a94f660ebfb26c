"""Tiny real models for end-to-end tests: a random LLaMA-architecture causal LM with a byte-level
tokenizer (256 tokens, no merges), saved as an ordinary transformers folder."""

from __future__ import annotations

from pathlib import Path

import torch

from lqframe.testing import byte_tokenizer  # noqa: F401 - (tests import it from here)


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 160, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make the random model less flat so compression errors show in perplexity
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return model


def tiny_llama_dir(path: Path, **kwargs) -> Path:
    path = Path(path)
    tiny_llama(**kwargs).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
