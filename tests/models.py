"""Tiny randomly initialised decoders of the architectures kascade supports, for tests."""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=10000.0)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A float32 model in eval mode with 6 layers, 4 query / 2 KV heads, head dim 16."""
    torch.manual_seed(seed)
    kw = {**COMMON, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kw))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw))
    else:
        raise ValueError(arch)
    return model.eval()


def left_padded(prompts):
    """(ids, attention_mask) [B, width] of 1-D token tensors, left-padded with 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def one_thread_fixture():
    """A module-scoped autouse fixture that runs a module's tests on one torch thread (tiny tensors: one
    thread is much faster than two contending ones). Use as `_one_thread = one_thread_fixture()`."""

    @pytest.fixture(autouse=True, scope="module")
    def _one_thread():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)

    return _one_thread
