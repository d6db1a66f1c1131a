"""Decode-only mode (dense prefill, sparse decode) and the decode-time baselines as published: Quest,
TidalDecode, OmniKV. Full budget equals dense; the prefill is the dense one; Quest's page score bounds its
keys; TidalDecode's and OmniKV's selecting layers attend densely; the `--sparse-prefill` flag."""

import pytest
import torch

import kascade
from fixtures import evaltools as E
from kascade import ops
from kascade import strategy as S_mod
from kascade.budget import budget
from kascade.eval import selectors
from kascade.eval import strategies as S
from kascade.eval.generation import step
from models import one_thread_fixture

VOCAB = 300
LAYERS = 6
PROMPT, STEPS = 140, 6

_one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def model():
    return E.tiny_llama(VOCAB, layers=LAYERS)


@pytest.fixture(scope="module")
def peaky():
    """Sharp attention (scaled queries), so that sparse selections change the outputs."""
    m = E.tiny_llama(VOCAB, seed=1, layers=LAYERS)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0**0.5)
    return m


@pytest.fixture(scope="module")
def plan(model):
    return E.plan_for(model, anchors=(0, 2, 4), k_min=8)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))


def _run(model, ids, strategy=None, plan=None, **enable_kw):
    """(prefill logits [B, V], decode-step logits [STEPS, B, V]) with teacher forcing, under `strategy`
    (or kascade.enable(model, plan, **enable_kw)); plain model attention when both are None."""
    import contextlib

    ctx = contextlib.nullcontext()
    if strategy is not None:
        ctx = kascade.enable(model, strategy=strategy)
    elif plan is not None:
        ctx = kascade.enable(model, plan, **enable_kw)
    with torch.no_grad(), ctx:
        first, cache = step(model, ids[:, :PROMPT])
        steps = []
        for i in range(PROMPT, PROMPT + STEPS):
            lg, cache = step(model, ids[:, i : i + 1], cache)
            steps.append(lg)
    return first, torch.stack(steps)


def _dense(model, ids):
    return _run(model, ids, S.make_strategy("dense", None, model.config, 0.1, 8))


# -- decode-only mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kascade", "quest", "streamingllm"])
def test_decode_only_prefill_is_dense_and_decode_is_not(peaky, plan, ids, name):
    """The prompt's logits are the dense strategy's, bit for bit; decode steps at rho 0.1 differ from dense."""
    dense_first, dense_steps = _dense(peaky, ids)
    strategy = S.make_strategy(name, plan, peaky.config, rho=0.1, k_min=8, sparse_prefill=False)
    assert strategy.name == name + S.DENSE_PREFILL and not strategy.sparse_prefill
    first, steps = _run(peaky, ids, strategy)
    assert torch.equal(first, dense_first)
    assert (steps - dense_steps).abs().max() > 1e-3
    sparse_mode_first, _ = _run(peaky, ids, S.make_strategy(name, plan, peaky.config, rho=0.1, k_min=8))
    assert (sparse_mode_first - dense_first).abs().max() > 1e-3  # the default mode is sparse in prefill


def test_enable_defaults_to_decode_only(peaky, plan, ids):
    """kascade.enable(model, plan) without sparse_prefill is decode-only mode (kascade.strategy.DEFAULT_SPARSE_PREFILL):
    the prompt's logits are dense's bit for bit, the decode steps KascadeStrategy(plan, sparse_prefill=False)'s;
    sparse_prefill=True is the paper's method, KascadeStrategy(plan)'s prefill."""
    assert S_mod.DEFAULT_SPARSE_PREFILL is False
    dense_first, _ = _dense(peaky, ids)
    first, steps = _run(peaky, ids, plan=plan)
    assert torch.equal(first, dense_first)
    _, ref_steps = _run(peaky, ids, kascade.KascadeStrategy(plan, sparse_prefill=False))
    assert torch.equal(steps, ref_steps)
    sparse_first, _ = _run(peaky, ids, plan=plan, sparse_prefill=True)
    ref_first, _ = _run(peaky, ids, kascade.KascadeStrategy(plan))
    assert torch.equal(sparse_first, ref_first) and (sparse_first - dense_first).abs().max() > 1e-3
    with pytest.raises(ValueError, match="sparse_prefill: expected True .* got 'yes'"):
        kascade.enable(peaky, plan, sparse_prefill="yes")


def test_enable_takes_sparse_prefill(peaky, plan, ids):
    """kascade.enable(model, plan, sparse_prefill=False) is KascadeStrategy(plan, sparse_prefill=False)."""
    dense_first, _ = _dense(peaky, ids)
    first, steps = _run(peaky, ids, plan=plan, sparse_prefill=False)
    assert torch.equal(first, dense_first)
    _, ref_steps = _run(peaky, ids, kascade.KascadeStrategy(plan, sparse_prefill=False))
    assert torch.equal(steps, ref_steps)
    with pytest.raises(ValueError, match="sparse_prefill: expected True"):
        kascade.KascadeStrategy(plan, sparse_prefill="no")
    with pytest.raises(ValueError, match="sparse_prefill: applies with plan="):
        kascade.enable(peaky, strategy=kascade.KascadeStrategy(plan), sparse_prefill=False)


def test_mode_names():
    assert S.canonical_strategy("kascade", sparse_prefill=False) == "kascade+dense-prefill"
    assert S.canonical_strategy("kascade+dense-prefill") == "kascade+dense-prefill"
    assert S.canonical_strategy("dense", sparse_prefill=False) == "dense"
    assert S.canonical_strategy("quest-decode+dense-prefill") == "quest-decode"
    assert S.is_decode_only("tidaldecode") and S.is_decode_only("oracle+dense-prefill")
    assert not S.is_decode_only("quest") and S.base_strategy("uniform+dense-prefill") == "uniform"
    with pytest.raises(ValueError, match="unknown strategy 'h2o\\+dense-prefill'.*NAME\\+dense-prefill"):
        S.canonical_strategy("h2o+dense-prefill")


# -- the decode-time baselines ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", S.DECODE_BASELINES)
def test_full_budget_equals_dense(model, ids, name):
    """rho = 1: every key in every set, so prefill and decode equal dense (float32; the sparse path only
    reorders the same sums)."""
    dense_first, dense_steps = _dense(model, ids)
    strategy = S.make_strategy(name, None, model.config, rho=1.0, k_min=4)
    first, steps = _run(model, ids, strategy)
    assert torch.equal(first, dense_first)
    torch.testing.assert_close(steps, dense_steps, atol=2e-5, rtol=2e-5)
    assert any(strategy.attended(layer) is not None for layer in range(LAYERS))  # the sparse path ran


@pytest.mark.parametrize("name", S.DECODE_BASELINES)
def test_small_budget_layers_and_sizes(peaky, ids, name):
    """rho 0.1: prefill dense everywhere; in decode, dense exactly in the layers the method keeps dense, k(n)
    keys elsewhere (one row per query head for Quest and TidalDecode, one shared set for OmniKV)."""
    strategy = S.make_strategy(name, None, peaky.config, rho=0.1, k_min=8)
    dense_layers = {"quest-decode": {0, 1}, "tidaldecode": {0, 1, 2}, "omnikv-decode": {0, 1, 2, 3, 4}}[name]
    with torch.no_grad(), kascade.enable(peaky, strategy=strategy):
        _, cache = step(peaky, ids[:, :PROMPT])
        assert all(strategy.attended(layer) is None for layer in range(LAYERS))
        step(peaky, ids[:, PROMPT : PROMPT + 1], cache)
    hq, hkv = peaky.config.num_attention_heads, peaky.config.num_key_value_heads
    for layer in range(LAYERS):
        used = strategy.attended(layer)
        assert (used is None) == (layer in dense_layers), layer
        if used is not None:
            sel = used[0]
            assert sel.decode and int(sel.counts[0, 0]) == budget(PROMPT + 1, 0.1, 8)
            assert sel.num_kv_heads == (hkv if name == "omnikv-decode" else hq)


def test_quest_page_score_bounds_its_keys():
    """Every key's q.k is at most its page's score (pages of 16 from key 0, the last one partial), per query
    head of a GQA group; the bound is reached when a page holds one key."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 6, 1, 32, generator=g), torch.randn(2, 2, 77, 32, generator=g) * 3
    ub = selectors.quest_page_scores(q, k, page=16)  # [2, 6, 5]
    assert ub.shape == (2, 6, 5)
    qk = torch.einsum("bhgd,bhnd->bhgn", q.view(2, 2, 3, 32), k).flatten(1, 2)  # [2, 6, 77]
    pages = torch.arange(77) // 16
    assert bool((qk <= ub[..., pages] + 1e-4).all())
    exact = selectors.quest_page_scores(q, k, page=1)
    torch.testing.assert_close(exact, qk, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="page: expected an integer >= 1"):
        selectors.quest_page_scores(q, k, page=0)


def test_quest_takes_best_pages_per_query_head():
    """Each query head takes whole pages in the order of its own scores, k(n) keys, at most one page in part."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 150, 16, generator=g)
    sel = selectors.query_head_pages(q, k, 0.3, 8, kv_start=None, page=16)
    kk = budget(150, 0.3, 8)
    assert sel.indices.shape[1] == 4 and int(sel.counts[0, 0]) == kk
    ub = selectors.quest_page_scores(q, k, page=16)[0]
    sizes = torch.bincount(torch.arange(150) // 16)
    for h in range(4):
        keys = sel.sets(0, h)
        taken = torch.bincount(keys // 16, minlength=len(sizes))
        full = taken == sizes
        assert int(((taken > 0) & ~full).sum()) <= 1
        assert float(ub[h][full].min()) >= float(ub[h][taken == 0].max())
    assert not torch.equal(sel.indices[0, 0], sel.indices[0, 1])  # heads of one group choose for themselves


def test_tidaldecode_selection_layers_are_dense():
    """A selection layer's output is dense attention; the layers after it attend, per query head, to its
    top-k keys by q.k; a re-selection replaces the set."""
    g = torch.Generator().manual_seed(5)
    strategy = S.TidalDecodeStrategy(0.2, 4, 32, selection_layers=[2, 4], num_layers=6)
    qs = [torch.randn(1, 4, 1, 16, generator=g) for _ in range(6)]
    k, v = torch.randn(1, 2, 90, 16, generator=g), torch.randn(1, 2, 90, 16, generator=g)
    strategy.begin_forward()
    for layer in range(6):
        out = strategy.attend(layer, qs[layer], k, v, None, None)
        if layer in (0, 1, 2, 4):
            assert strategy.attended(layer) is None
            torch.testing.assert_close(out, ops.dense(qs[layer], k, v), rtol=0, atol=0)
            continue
        sel = strategy.attended(layer)[0]
        source = qs[2] if layer == 3 else qs[4]
        qk = torch.einsum("hgd,hnd->hgn", source[0, :, 0].view(2, 2, 16), k[0]).flatten(0, 1)  # [4, 90]
        top = qk.topk(budget(90, 0.2, 4), dim=-1).indices.sort(-1).values
        assert torch.equal(sel.indices[0, :, 0].long(), top)
    assert S.tidal_layers(32) == [2, 13] and S.tidal_layers(30) == [2, 12] and S.tidal_layers(2) == []


def test_omnikv_keeps_generated_tokens_and_its_layers():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 120, 16, generator=g)
    kv_start = torch.tensor([0, 9])
    sel = selectors.max_logit_selection(q, k, 0.1, 20, kv_start=kv_start, keep_from=112)
    assert torch.equal(sel.indices[:, 0], sel.indices[:, 1])  # one set for all heads
    for b, n in ((0, 120), (1, 111)):
        keys = sel.sets(b, 0)
        assert len(keys) == budget(n, 0.1, 20) and set(range(112, 120)) <= set(keys.tolist())
        qk = torch.einsum("hgd,hnd->hgn", q[b, :, 0].view(2, 2, 16), k[b]).flatten(0, 1).amax(0)  # [120]
        start = int(kv_start[b])
        prompt = qk[start:112].topk(len(keys) - 8).indices + start
        assert set(prompt.tolist()) <= set(keys.tolist())
    assert S.omnikv_layers(32) == [2, 8, 18] and S.omnikv_layers(30) == [2, 8, 17]
    with pytest.raises(ValueError, match="q: max_logit_selection selects for decode steps only"):
        selectors.max_logit_selection(torch.randn(1, 4, 3, 16), k[:1], 0.1, 20)


def test_coverage_counts_each_query_heads_own_set(peaky):
    """Coverage of the decode-time baselines: the prefill is dense (1); a full budget covers everything."""
    import numpy as np

    from kascade.eval import coverage as C

    text = torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(7))
    for rho in (1.0, 0.1):
        strategies = {n: S.make_strategy(n, None, peaky.config, rho=rho, k_min=8) for n in S.DECODE_BASELINES}
        res = C.measure(peaky, text, strategies, decode_steps=2)
        for name in S.DECODE_BASELINES:
            assert np.allclose(res["prefill"][name], 1.0)
            cov = res["decode"][name]
            assert ((cov > 0) & (cov <= 1 + 1e-6)).all()
            assert np.allclose(cov, 1.0) == (rho == 1.0), (name, rho)


# -- command line ---------------------------------------------------------------------------------------------


def test_sparse_prefill_flag(tmp_path, capsys):
    import argparse

    from transformers import LlamaConfig

    from kascade.cli import main as cli_main
    from kascade.eval import command

    LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "m")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    base = [str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--tasks", "niah_single", "--lengths", "256",
            "--device", "cpu"]
    args = parser.parse_args(base + ["--strategies", "streamingllm,quest-decode,kascade-paper", "--sparse-prefill",
                                     "no", "--paper-plan", "unused.json"])
    args.paper_plan = None
    with pytest.raises(ValueError, match="--paper-plan"):  # the suffixed kascade-paper still needs its plan
        command._Setup(args)
    args.strategies = "streamingllm,quest-decode,quest,quest+dense-prefill"
    assert command._Setup(args).strategies == ["dense", "streamingllm+dense-prefill", "quest-decode",
                                               "quest+dense-prefill"]
    args.sparse_prefill = "yes"
    assert command._Setup(args).strategies == ["dense", "streamingllm", "quest-decode", "quest",
                                               "quest+dense-prefill"]
    assert cli_main(["eval"] + base + ["--sparse-prefill", "maybe"]) == 2
    err = capsys.readouterr().err
    assert "--sparse-prefill: expected yes" in err and "got 'maybe'" in err
