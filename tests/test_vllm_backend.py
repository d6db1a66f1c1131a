"""The pieces of kascade.integrations.vllm that need no engine: reading vLLM's CPU cache blocks, options.

The cache test writes K/V with vLLM's own cache-writing op (the one its CPU backend calls each step),
into random slots of several requests, and checks that the compact cache handed to kascade.paged
reads back exactly what was written, position by position.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (pip install -e '.[vllm]'; scripts/setup.sh does it)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,head_size", [(32, 64), (128, 128), (64, 80)])
def test_compact_cache_reads_what_vllm_wrote(dtype, block_size, head_size):
    from vllm import _custom_ops as vops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kascade.integrations.vllm import compact_cache
    from kascade.paged import gather_kv

    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    g = torch.Generator().manual_seed(0)
    hkv, seq_lens = 3, [70, 1, 200]
    pages_per = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages_per) + 2
    perm = torch.randperm(num_blocks, generator=g)
    kv_cache = torch.randn(num_blocks, hkv, block_size, 2 * head_size, generator=g).to(dtype)
    kc, vc = kv_cache.view(num_blocks, hkv, 2 * block_size, head_size).chunk(2, dim=2)
    block_table = torch.full((len(seq_lens), max(pages_per) + 1), 0, dtype=torch.int32)
    written, used = [], 0
    for r, n in enumerate(seq_lens):
        pages = perm[used : used + pages_per[r]]
        used += pages_per[r]
        block_table[r, : len(pages)] = pages.to(torch.int32)
        k = torch.randn(n, hkv, head_size, generator=g).to(dtype)
        v = torch.randn(n, hkv, head_size, generator=g).to(dtype)
        pos = torch.arange(n)
        slots = pages[pos // block_size] * block_size + pos % block_size
        vops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots.long(), isa, k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
        written.append((k, v))
    key_cache, value_cache, table = compact_cache(kv_cache, block_table, torch.tensor(seq_lens), isa)
    assert key_cache.shape[1:] == (block_size, hkv, head_size)
    for r, n in enumerate(seq_lens):
        k, v = written[r]
        assert torch.equal(gather_kv(key_cache, table[r], n)[0], k.transpose(0, 1)), (isa, r)
        assert torch.equal(gather_kv(value_cache, table[r], n)[0], v.transpose(0, 1)), (isa, r)


def test_plan_options(monkeypatch):
    from types import SimpleNamespace

    from kascade.integrations.vllm import PLAN_ENV, plan_options

    monkeypatch.delenv(PLAN_ENV, raising=False)
    assert plan_options(SimpleNamespace(additional_config={})) == (None, False)
    monkeypatch.setenv(PLAN_ENV, "env.json")
    assert plan_options(SimpleNamespace(additional_config=None)) == ("env.json", False)
    cfg = SimpleNamespace(additional_config={"kascade_plan": "cfg.json", "kascade_dense_anchor_output": True})
    assert plan_options(cfg) == ("cfg.json", True)
    with pytest.raises(ValueError, match="kascade_dense_anchor_output"):
        plan_options(SimpleNamespace(additional_config={"kascade_dense_anchor_output": "yes"}))


def test_missing_plan_file_is_refused(tmp_path):
    from kascade.integrations.vllm import shared_strategy

    with pytest.raises(ValueError, match="kascade_plan: expected the path of a plan file"):
        shared_strategy(str(tmp_path / "nope.json"), False, None, 1)


def test_register_replaces_the_cpu_backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kascade.integrations.vllm import BACKEND_PATH, register

    before = AttentionBackendEnum.CPU_ATTN.is_overridden()
    try:
        register()
        assert AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND_PATH
        backend = AttentionBackendEnum.CPU_ATTN.get_class()
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

        assert issubclass(backend.get_impl_cls(), CPUAttentionBackendImpl)
    finally:
        if not before:
            AttentionBackendEnum.CPU_ATTN.clear_override()
