"""The pieces of kascade.integrations.vllm that need no engine: reading vLLM's CPU cache blocks, options,
and the CPU Impl's forward in decode-only mode (kascade_sparse_prefill false) on steps built as vLLM builds
them: prefill requests dense (a step without decode requests through vLLM's own CPU attention), decode
requests as in a decode-only batch, decode steps unchanged by the mode.

The cache test writes K/V with vLLM's own cache-writing op (the one its CPU backend calls each step),
into random slots of several requests, and checks that the compact cache handed to kascade.paged
reads back exactly what was written, position by position.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
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


def test_select_options_are_read_and_checked():
    from types import SimpleNamespace

    from kascade.integrations.vllm import select_options

    assert select_options(SimpleNamespace(additional_config=None)) == ("exact", None)
    cfg = SimpleNamespace(additional_config={"kascade_select_keys": "fp8", "kascade_rerank": 2.0})
    assert select_options(cfg) == ("fp8", 2.0)
    with pytest.raises(ValueError, match="kascade_select_keys"):
        select_options(SimpleNamespace(additional_config={"kascade_select_keys": "fp4"}))
    with pytest.raises(ValueError, match="kascade_rerank"):
        select_options(SimpleNamespace(additional_config={"kascade_select_keys": "fp8", "kascade_rerank": 0}))


def test_fp8_selection_on_the_cpu_backend(monkeypatch, tiny_vllm_config):
    """The CPU backend takes kascade_select_keys = "fp8": its strategy scores from FP8 copies made per step."""
    import copy

    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm as kv

    args = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=4, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto")
    monkeypatch.setattr(kv, "_STRATEGIES", {})
    monkeypatch.setenv(kv.PLAN_ENV, str(ROOT / "plans" / "kascade-tiny.json"))
    cfg = copy.deepcopy(tiny_vllm_config)
    cfg.additional_config = {"kascade_select_keys": "fp8", "kascade_rerank": 2.0}
    with set_current_vllm_config(cfg):
        strategy = kv.KascadeCPUImpl(**args).kascade
    assert strategy.select_keys == "fp8" and strategy.rerank == 2.0


def test_missing_plan_file_is_refused(tmp_path):
    from kascade.integrations.vllm import shared_strategy

    with pytest.raises(ValueError, match="kascade_plan: expected the path of a plan file"):
        shared_strategy(str(tmp_path / "nope.json"), False, None, 1)


@pytest.fixture(scope="module")
def tiny_vllm_config():
    from vllm.config import ModelConfig, VllmConfig

    return VllmConfig(model_config=ModelConfig(model=str(ROOT / "models" / "kascade-tiny"), dtype="float32"))


@pytest.mark.parametrize("setting,expect", [
    (dict(sliding_window=4096), "sliding_window: kascade's vLLM backend supports"),
    (dict(alibi_slopes=[0.5] * 8), "alibi_slopes: kascade's vLLM backend supports"),
    (dict(logits_soft_cap=30.0), "logits_soft_cap: kascade's vLLM backend supports"),
    (dict(attn_type="encoder_only"), "attn_type: kascade's vLLM backend supports"),
    (dict(pipeline_parallel_size=2), "pipeline_parallel_size: kascade's vLLM backend needs all layers"),
    (dict(num_kv_heads=2), "plan: made for another model"),  # the plan is checked against the model once
    (dict(), None),
])
def test_backend_settings(monkeypatch, tiny_vllm_config, setting, expect):
    """With a plan configured the backend refuses what Kascade does not support, naming the setting;
    without one it is vLLM's CPU attention and refuses nothing."""
    import copy

    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm as kv

    cfg = copy.deepcopy(tiny_vllm_config)
    setting = dict(setting)
    cfg.parallel_config.pipeline_parallel_size = setting.pop("pipeline_parallel_size", 1)
    if setting.pop("num_kv_heads", None):
        cfg.model_config.hf_config.num_key_value_heads = 2
    args = {**dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=4, alibi_slopes=None, sliding_window=None,
                   kv_cache_dtype="auto"), **setting}
    monkeypatch.setattr(kv, "_STRATEGIES", {})
    monkeypatch.setenv(kv.PLAN_ENV, str(ROOT / "plans" / "kascade-tiny-paper.json"))
    with set_current_vllm_config(cfg):
        if expect is None:
            assert kv.KascadeCPUImpl(**args).kascade.plan.anchors == [0, 2, 4, 11]
        else:
            with pytest.raises(ValueError, match=expect):
                kv.KascadeCPUImpl(**args)
        monkeypatch.delenv(kv.PLAN_ENV)
        assert kv.KascadeCPUImpl(**args).kascade is None  # no plan: nothing refused, nothing changed


def test_head_granular_plan_is_taken_unless_it_crosses_tp_shards(monkeypatch, tiny_vllm_config):
    """plans/kascade-tiny.json (head sources) runs; at TP = 2 it is refused, naming its first crossing entry."""
    import copy

    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm as kv

    args = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=4, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto")
    monkeypatch.setattr(kv, "_STRATEGIES", {})
    monkeypatch.setenv(kv.PLAN_ENV, str(ROOT / "plans" / "kascade-tiny.json"))
    cfg = copy.deepcopy(tiny_vllm_config)
    with set_current_vllm_config(cfg):
        assert kv.KascadeCPUImpl(**args).kascade.plan.head_granular
    cfg.parallel_config.tensor_parallel_size = 2
    monkeypatch.setattr(kv, "_STRATEGIES", {})
    with set_current_vllm_config(cfg), pytest.raises(ValueError, match=r"head_sources: crosses tensor-parallel "
                                                                       r"shards at TP degree 2 \(19 entries; first"):
        kv.KascadeCPUImpl(**args)


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


# ----------------------------------------------------------------------------------------------
# decode-only mode (kascade_sparse_prefill false) on the CPU backend
# ----------------------------------------------------------------------------------------------

ARGS = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=4, alibi_slopes=None, sliding_window=None,
            kv_cache_dtype="auto")
DECODE_ONLY = {"kascade_sparse_prefill": False}
SPARSE = {"kascade_sparse_prefill": True}


def test_sparse_prefill_option_is_read_and_checked(monkeypatch):
    from types import SimpleNamespace

    from kascade.integrations.vllm import SPARSE_PREFILL_ENV, prefill_option

    monkeypatch.delenv(SPARSE_PREFILL_ENV, raising=False)
    assert prefill_option(SimpleNamespace(additional_config=None)) is False  # decode-only unless asked
    assert prefill_option(SimpleNamespace(additional_config={})) is False
    assert prefill_option(SimpleNamespace(additional_config=DECODE_ONLY)) is False
    for env, want in (("0", False), ("false", False), ("FALSE", False), ("1", True), ("true", True)):
        monkeypatch.setenv(SPARSE_PREFILL_ENV, env)
        assert prefill_option(SimpleNamespace(additional_config={})) is want, env
    assert prefill_option(SimpleNamespace(additional_config={"kascade_sparse_prefill": True})) is True  # config wins
    with pytest.raises(ValueError, match=r"additional_config\['kascade_sparse_prefill'\]: expected true \(sparse "
                                         r"prefill and decode\) or false \(dense prefill, sparse decode\), got 'no'"):
        prefill_option(SimpleNamespace(additional_config={"kascade_sparse_prefill": "no"}))
    monkeypatch.setenv(SPARSE_PREFILL_ENV, "no")
    with pytest.raises(ValueError, match="KASCADE_SPARSE_PREFILL: expected 1 / true .* got 'no'"):
        prefill_option(SimpleNamespace(additional_config={}))


def _cpu_impls(cfg, monkeypatch, extra, n):
    """n KascadeCPUImpl (one per layer) with plans/kascade-tiny.json and additional_config `extra`."""
    import copy

    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm as kv

    monkeypatch.setattr(kv, "_STRATEGIES", {})
    monkeypatch.setenv(kv.PLAN_ENV, str(ROOT / "plans" / "kascade-tiny.json"))
    monkeypatch.delenv(kv.SPARSE_PREFILL_ENV, raising=False)
    cfg = copy.deepcopy(cfg)
    cfg.additional_config = dict(extra)
    with set_current_vllm_config(cfg):
        return [kv.KascadeCPUImpl(**ARGS) for _ in range(n)]


def _cpu_forward(impl, layer, b):
    """impl.forward of one layer on batch b (test_paged_reference.make_batch, block size 32), its pages written
    into vLLM's CPU layer tensor through vLLM's own op and the metadata built as vLLM's CPU builder does."""
    from types import SimpleNamespace

    from vllm import _custom_ops as vops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, _get_attn_isa

    nb, bs, hkv, d = b["key_cache"].shape
    isa = _get_attn_isa(torch.float32, bs, d)
    kv_cache = torch.zeros(nb, hkv, bs, 2 * d)
    kc, vc = kv_cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    vops.cpu_attn_reshape_and_cache(b["key_cache"].reshape(-1, hkv, d), b["value_cache"].reshape(-1, hkv, d), kc, vc,
                                    torch.arange(nb * bs), isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    qsl, lens = b["query_start_loc"], b["seq_lens"]
    sched = vops.cpu_attn_get_scheduler_metadata(len(lens), 8, hkv, d, lens, torch.float32, qsl, True, -1, isa, True)
    n_tok = int(qsl[-1])
    md = CPUAttentionMetadata(num_actual_tokens=n_tok, max_query_len=int((qsl[1:] - qsl[:-1]).max()),
                              query_start_loc=qsl, max_seq_len=int(lens.max()), seq_lens=lens,
                              block_table=b["block_table"].clamp(min=0), scheduler_metadata=sched,
                              slot_mapping=torch.zeros(n_tok, dtype=torch.long))
    layer_ = SimpleNamespace(layer_name=f"model.layers.{layer}.self_attn.attn", isa=isa, _k_scale_float=1.0,
                             _v_scale_float=1.0)
    output = torch.zeros(n_tok, 8 * d)
    return impl.forward(layer_, b["q"], None, None, kv_cache, md, output).view(n_tok, 8, d)


def _dense(b):
    from kascade.paged import paged_dense

    return paged_dense(b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
                       b["query_start_loc"], scale=0.125, backend="reference")


def test_cpu_decode_only_mixed_step(tiny_vllm_config, monkeypatch):
    """Decode-only mode on a mixed step, layers 0-3 of plans/kascade-tiny.json: the prefill requests (a whole
    prompt, a chunk on top of a cache, a short prompt) get dense attention, the decode requests (300 and 90 keys)
    what PagedKascadeStrategy.attend_decode gives them in a decode-only batch of their own."""
    from kascade.paged import PagedKascadeStrategy
    from kascade.plan import Plan
    from test_paged_reference import make_batch

    impls = _cpu_impls(tiny_vllm_config, monkeypatch, DECODE_ONLY, 4)
    alone = PagedKascadeStrategy(Plan.load(ROOT / "plans" / "kascade-tiny.json"), backend="reference")
    mix = dict(seq_lens=[300, 257, 170, 40, 90], q_lens=[1, 257, 64, 40, 1])
    decode, prefill = [0, 4], [1, 2, 3]
    for layer in range(4):
        b, _ = make_batch(**mix, block_size=32, seed=50 + layer)
        qsl = b["query_start_loc"].tolist()
        got, dense = _cpu_forward(impls[layer], layer, b), _dense(b)
        rows = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in prefill])
        assert torch.equal(got[rows], dense[rows]), layer
        idx = torch.tensor(decode)
        want = alone.attend_decode(layer, b["q"][[qsl[r] for r in decode]], b["key_cache"], b["value_cache"],
                                   b["block_table"][idx], b["seq_lens"][idx], scale=0.125)
        assert torch.equal(got[[qsl[r] for r in decode]], want), layer
    assert not torch.allclose(got[0], dense[0], atol=1e-3)  # not vacuous: the long decode request ran Kascade


def test_cpu_decode_only_step_without_decode_requests_is_vllms_attention(tiny_vllm_config, monkeypatch):
    """Decode-only mode on a step of prefill chunks only: vLLM's CPU attention for the whole step (no pages
    gathered), equal to the dense reference within float32 rounding of another summation order (about 1e-6
    here, 1e-5 allowed)."""
    import kascade.integrations.vllm as kv
    from test_paged_reference import make_batch

    impls = _cpu_impls(tiny_vllm_config, monkeypatch, DECODE_ONLY, 2)
    monkeypatch.setattr(kv, "compact_cache", None)  # Kascade's path would call it
    for layer in range(2):
        b, _ = make_batch([257, 170, 40], [257, 64, 40], block_size=32, seed=70 + layer)
        torch.testing.assert_close(_cpu_forward(impls[layer], layer, b), _dense(b), atol=1e-5, rtol=1e-5)


def test_cpu_decode_step_is_unchanged_by_decode_only_mode(tiny_vllm_config, monkeypatch):
    """A decode step gives the same output with kascade_sparse_prefill false as without, right after a prefill
    step (sparse in one mode, dense in the other): decode steps select at every step."""
    from test_paged_reference import make_batch

    outs = {}
    for extra in (SPARSE, DECODE_ONLY):
        impls = _cpu_impls(tiny_vllm_config, monkeypatch, extra, 3)
        for layer in range(3):
            _cpu_forward(impls[layer], layer, make_batch([300, 257], [300, 64], block_size=32, seed=90 + layer)[0])
        outs[extra["kascade_sparse_prefill"]] = [
            _cpu_forward(impls[layer], layer, make_batch([300, 90, 257], [1, 1, 1], block_size=32, seed=30 + layer)[0])
            for layer in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
