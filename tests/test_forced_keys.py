"""Attention sinks and a local window kept in Kascade's sets (`selectors.head_selection`, the
`kascade-sinks` strategy): with none kept it is the reference selection; with some kept they are in
every set and the rest is the top of the other keys, at the same budget; the strategy runs a
head-granular plan and equals kascade when nothing is forced."""

import pytest
import torch

import kascade
from kascade import reference as R
from kascade.budget import budget
from kascade.eval import selectors
from kascade.eval import strategies as S
from kascade.integrations.transformers import _cache_kwarg
from kascade.plan import Plan
from models import one_thread_fixture, tiny_model

_one_thread = one_thread_fixture()


def _qk(b=2, hq=4, hkv=2, qlen=1, n=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, qlen, d, generator=g) * 3
    k = torch.randn(b, hkv, n, d, generator=g)
    return q, k


def _same_sets(a: R.Selection, b: R.Selection):
    assert torch.equal(a.counts, b.counts) and torch.equal(a.first_tile, b.first_tile)
    for bb in range(a.indices.shape[0]):
        for h in range(a.indices.shape[1]):
            for u in range(a.indices.shape[2]):
                assert torch.equal(a.sets(bb, h, u).sort().values, b.sets(bb, h, u).sort().values), (bb, h, u)


@pytest.mark.parametrize("qlen", [1, 70])
def test_nothing_forced_is_the_reference_selection(qlen):
    q, k = _qk(qlen=qlen, n=300)
    kv_start = torch.tensor([0, 37])
    ours = selectors.head_selection(q, k, 0.1, 16, 32, kv_start=kv_start)
    _same_sets(ours, R.select(q, k, 0.1, 16, 32, kv_start=kv_start))


def test_decode_keeps_sinks_and_window_then_the_best_of_the_rest():
    q, k = _qk(b=1, n=500, seed=3)
    sinks, window, rho, k_min = 4, 16, 0.1, 32
    sel = selectors.head_selection(q, k, rho, k_min, 32, sinks=sinks, window=window)
    n = k.shape[2]
    kk = budget(n, rho, k_min)
    assert int(sel.counts[0, 0]) == kk
    probs = torch.softmax(torch.einsum("hgd,hnd->hgn", q[0, :, 0].view(2, 2, -1), k[0]) * 16**-0.5, -1).sum(1)
    forced = set(range(sinks)) | set(range(n - window, n))
    for h in range(2):
        got = set(sel.sets(0, h).tolist())
        rest = torch.tensor([j for j in range(n) if j not in forced])
        best = rest[probs[h, rest].topk(kk - len(forced)).indices]
        assert got == forced | set(best.tolist())


def test_prefill_keeps_sinks_and_the_keys_before_each_tile():
    q, k = _qk(b=1, qlen=160, n=160, seed=5)
    sinks, window, tile = 2, 8, 32
    sel = selectors.head_selection(q, k, 0.1, 16, tile, sinks=sinks, window=window)
    ref = R.select(q, k, 0.1, 16, tile)
    assert torch.equal(sel.counts, ref.counts)
    for u in range(1, sel.indices.shape[2]):  # tile u sees the u * tile keys before it
        start = u * tile
        for h in range(2):
            got = set(sel.sets(0, h, u).tolist())
            assert set(range(sinks)) | set(range(start - window, start)) <= got
            assert max(got) < start


def test_a_budget_below_sinks_plus_window_keeps_the_sinks_and_the_newest():
    q, k = _qk(b=1, n=100, seed=7)
    sel = selectors.head_selection(q, k, 0.05, 8, 32, sinks=4, window=64)  # k(100) = 8
    for h in range(2):
        assert sel.sets(0, h).tolist() == [0, 1, 2, 3, 96, 97, 98, 99]


@pytest.mark.parametrize("bad", [{"sinks": -1}, {"window": 1.5}, {"sinks": True}])
def test_bad_counts_are_refused_by_name(bad):
    q, k = _qk()
    with pytest.raises(ValueError, match=next(iter(bad))):
        selectors.head_selection(q, k, 0.1, 16, 32, **bad)


def _granular_plan(config):
    return Plan.for_model(config, [0, 2], head_sources=[None, [[0, 1], None], None, [[1, 1], [2, 0]]],
                          rho=0.1, k_min=16, recipe="output-aware")


def test_strategy_with_nothing_forced_equals_kascade():
    model = tiny_model("llama", num_hidden_layers=4)
    plan = _granular_plan(model.config)
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    logits = {}
    with torch.no_grad():
        for name, strategy in (("kascade", S.PlanStrategy("kascade", plan)),
                               ("forced", S.ForcedKeysStrategy("kascade-sinks", plan, sinks=0, window=0))):
            with kascade.enable(model, strategy=strategy):
                pre = model(ids, use_cache=True)
                nxt = pre.logits[:, -1:].argmax(-1)
                logits[name] = (pre.logits, model(nxt, **{_cache_kwarg(model): pre.past_key_values}).logits)
    for a, b in zip(logits["kascade"], logits["forced"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_strategy_keeps_the_window_in_what_each_layer_attends():
    model = tiny_model("llama", num_hidden_layers=4)
    strategy = S.make_strategy("kascade-sinks", _granular_plan(model.config), model.config, rho=0.1, k_min=80)
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), kascade.enable(model, strategy=strategy):
        pre = model(ids, use_cache=True)
        model(pre.logits[:, -1:].argmax(-1), **{_cache_kwarg(model): pre.past_key_values})  # decode: 201 keys
    n = 201
    for layer in (1, 2, 3):
        sel, head_map = strategy.attended(layer)
        hm = S.head_map_tensor(head_map, 2, "cpu")
        for h in range(2):
            got = set(sel.sets(0, int(hm[h])).tolist())
            assert set(range(S.SINKS)) | set(range(n - S.LOCAL_WINDOW, n)) <= got, (layer, h)
