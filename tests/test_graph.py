"""Static cache and CUDA graphs: kascade on transformers' StaticCache, eager on the CPU and captured
in one CUDA graph on a GPU (-m gpu cases skip without CUDA).

CPU: StaticGenerator (preallocated cache, unwritten tail passed as kv_len) gives the tokens of
model.generate on a DynamicCache, dense and Kascade, with and without left padding, single-shot and
chunked prefill; the key-state mask and the bounds derived from it. GPU: graph capture + replay give
the tokens of the eager static path, and the captured decode step contains no host sync (capture
would fail on one).
"""

import pytest
import torch

import kascade
from kascade.integrations.transformers import (PADDING, REAL, UNWRITTEN, StaticGenerator, _key_padding_mask,
                                               _kv_bounds)
from kascade.plan import Plan
from models import left_padded, tiny_model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ids(seed, batch, length, vocab=256):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _dynamic_tokens(model, ids, mask, n):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_key_states_mark_padding_and_unwritten_tail():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    st = _key_padding_mask(2, 2, 8, q_offset=torch.tensor(3), attention_mask=am)  # 5 keys written of 8
    assert st.tolist() == [[PADDING, PADDING, REAL, REAL, REAL, UNWRITTEN, UNWRITTEN, UNWRITTEN],
                           [REAL] * 5 + [UNWRITTEN] * 3]
    assert _key_padding_mask(2, 5, 5, q_offset=0, attention_mask=None) is None  # nothing to mark
    k = torch.zeros(2, 1, 8, 4)
    start, length = _kv_bounds(st, k)
    assert start.tolist() == [2, 0] and length.tolist() == [5, 5]
    start, length = _kv_bounds(_key_padding_mask(2, 1, 8, q_offset=7, attention_mask=None), k)
    assert start is None and length is None  # every key written and real
    right = st.clone()
    right[1, 4] = PADDING  # right padding inside the written keys
    with pytest.raises(ValueError, match="left padding only"):
        _kv_bounds(right, k)


@pytest.mark.parametrize("mode", ["dense", "kascade"])
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_matches_dynamic_cache_on_cpu(mode, padded):
    model = tiny_model("llama", seed=3)
    plan = Plan.for_model(model.config, [0, 2, 4], rho=0.1, k_min=16, tile=32)
    if padded:
        # padding of a whole tile: chunk boundaries (multiples of 32) stay tile boundaries of both sequences
        # (a tile cut by a chunk pools only its rows present, so unaligned chunks select differently)
        ids, mask = left_padded([_ids(20, 1, 230)[0], _ids(21, 1, 198)[0]])
    else:
        ids = _ids(22, 2, 210)
        mask = torch.ones_like(ids)
    n = 6
    with torch.no_grad():
        if mode == "kascade":
            kascade.enable(model, plan, sparse_prefill=True)
        try:
            want = _dynamic_tokens(model, ids, mask, n)
            gen = StaticGenerator(model, batch_size=2, max_cache_len=ids.shape[1] + 40)
            assert not gen.cuda_graph
            got = gen.generate(ids, mask, max_new_tokens=n)
            chunked = StaticGenerator(model, batch_size=2, max_cache_len=ids.shape[1] + 40, prefill_chunk=64)
            got_chunked = chunked.generate(ids, mask, max_new_tokens=n)
        finally:
            kascade.disable(model)
    assert got.tolist() == want.tolist()
    assert got_chunked.tolist() == want.tolist()


def test_static_decode_passes_kv_len_to_the_strategy():
    """The decode step on a StaticCache hands the strategy the whole preallocated cache and kv_len."""
    model = tiny_model("llama", seed=4)
    plan = Plan.for_model(model.config, [0, 3], rho=0.1, k_min=8)
    seen = []
    with torch.no_grad(), kascade.enable(model, plan, sparse_prefill=True) as h:
        attend = h.strategy.attend

        def spy(layer, q, k, v, kv_start, scale, kv_len=None):
            seen.append((q.shape[2], k.shape[2], None if kv_len is None else kv_len.tolist()))
            return attend(layer, q, k, v, kv_start, scale, kv_len=kv_len)

        h.strategy.attend = spy
        StaticGenerator(model, batch_size=1, max_cache_len=300).generate(_ids(5, 1, 200), max_new_tokens=3)
    prefill = [s for s in seen if s[0] > 1]
    decode = [s for s in seen if s[0] == 1]
    assert prefill and all(s == (200, 200, None) for s in prefill)  # prefill: the tail is cut off
    assert decode and {tuple(s[2]) for s in decode} == {(201,), (202,)} and all(s[1] == 300 for s in decode)


def test_generator_errors():
    model = tiny_model("llama")
    gen = StaticGenerator(model, batch_size=1, max_cache_len=64)
    with pytest.raises(ValueError, match="input_ids"):
        gen.prefill(_ids(0, 2, 10))
    gen.prefill(_ids(0, 1, 60))
    with pytest.raises(ValueError, match="do not fit"):
        gen.decode(10)
    with pytest.raises(ValueError, match="cuda_graph"):
        StaticGenerator(model, batch_size=1, max_cache_len=64, cuda_graph=True) if not torch.cuda.is_available() \
            else (_ for _ in ()).throw(ValueError("cuda_graph"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["dense", "kascade"])
def test_gpu_graph_replay_matches_eager(mode):
    model = tiny_model("llama", seed=5, num_hidden_layers=4).to("cuda", torch.bfloat16)
    plan = Plan.for_model(model.config, [0, 2], rho=0.1, k_min=16)
    ids, mask = left_padded([_ids(30, 1, 700)[0], _ids(31, 1, 555)[0]])
    n = 12
    with torch.no_grad():
        if mode == "kascade":
            kascade.enable(model, plan, sparse_prefill=True)
        try:
            eager = StaticGenerator(model, 2, 800, cuda_graph=False).generate(ids, mask, n)
            gen = StaticGenerator(model, 2, 800, cuda_graph=True)
            graphed = gen.generate(ids, mask, n)
            assert gen.graph is not None
            again = gen.generate(ids, mask, n)  # a second request replays the same graph
            if mode == "kascade":
                dynamic = _dynamic_tokens(model, ids.cuda(), mask.cuda(), n).cpu()
        finally:
            kascade.disable(model)
    assert graphed.tolist() == eager.tolist()
    assert again.tolist() == eager.tolist()
    if mode == "kascade":  # kernels on a static cache vs kernels on a dynamic cache: same tokens
        assert graphed.cpu().tolist() == dynamic.tolist()
