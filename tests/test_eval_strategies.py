"""Baseline strategies: full budget equals dense (prefill and decode), equal budgets, selection shapes,
coverage (the oracle bounds every strategy), factory errors."""

import numpy as np
import pytest
import torch

import kascade
from fixtures import evaltools as E
from kascade import reference as R
from kascade.budget import budget
from kascade.eval import coverage as C
from kascade.eval import selectors
from kascade.eval import strategies as S
from kascade.eval.generation import step
from kascade.plan import Plan
from models import one_thread_fixture

VOCAB = 300
SPARSE_PREFILL = [s for s in S.STRATEGIES if s not in S.DECODE_BASELINES]  # tests/test_decode_baselines.py: the others
SPARSE = [s for s in SPARSE_PREFILL if s != "dense"]


_one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def model():
    return E.tiny_llama(VOCAB, layers=4)


@pytest.fixture(scope="module")
def plan(model):
    return E.plan_for(model, anchors=(0, 2))


def _ids(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _peaky(seed=1):
    """A random model with sharp attention (scaled queries), so that selections differ."""
    m = E.tiny_llama(VOCAB, seed=seed, layers=4)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0**0.5)
    return m


@pytest.mark.parametrize("name", SPARSE_PREFILL)
def test_full_budget_equals_dense(model, plan, name):
    """rho = 1: every strategy attends to every key, in prefill (odd length, several tiles) and decode."""
    ids = _ids(151)
    with torch.no_grad():
        dense_logits, cache = step(model, ids[:, :140])
        dense_steps = []
        for i in range(140, 151):
            lg, cache = step(model, ids[:, i : i + 1], cache)
            dense_steps.append(lg)
        full = model(ids).logits
        strategy = S.make_strategy(name, plan, model.config, rho=1.0, k_min=4, paper_plan=plan)
        with kascade.enable(model, strategy=strategy):
            out = model(ids).logits
            logits, cache = step(model, ids[:, :140])
            steps = []
            for i in range(140, 151):
                lg, cache = step(model, ids[:, i : i + 1], cache)
                steps.append(lg)
    # float32 everywhere; the sparse path only reorders the same sums (observed ~3e-7)
    torch.testing.assert_close(out, full, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(logits, dense_logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(torch.stack(steps), torch.stack(dense_steps), atol=2e-5, rtol=2e-5)
    if name != "dense":
        assert any(strategy.attended(layer) is not None for layer in range(4))  # the sparse path ran


@pytest.mark.parametrize("name", SPARSE)
def test_equal_budget_in_both_phases(model, plan, name):
    rho, k_min, tile = 0.1, 8, 32
    ids = _ids(200, seed=3)
    strategy = S.make_strategy(name, plan, model.config, rho=rho, k_min=k_min, paper_plan=plan)
    with torch.no_grad(), kascade.enable(model, strategy=strategy):
        _, cache = step(model, ids[:, :199])
        prefill = [strategy.attended(layer) for layer in range(4)]
        step(model, ids[:, 199:], cache)
        decode = [strategy.attended(layer) for layer in range(4)]
    assert prefill[0] is None and decode[0] is None  # layer 0 is dense for every strategy
    sparse_layers = 0
    for used in prefill[1:]:
        if used is None:
            continue
        sparse_layers += 1
        sel, _ = used
        if isinstance(sel, list):  # oracle-shared-budget: per KV head, the tile's budget shared by the heads
            for u in range(sel[0].counts.shape[1]):
                assert sum(int(x.counts[0, u]) for x in sel) == len(sel) * budget(u * tile, rho, k_min)
                for x in sel:
                    idx = x.indices[0, 0, u, : int(x.counts[0, u])]
                    assert bool((idx < u * tile).all()) and bool((idx >= 0).all())
            continue
        assert not sel.decode and sel.tile == tile
        for u in range(sel.counts.shape[1]):
            assert int(sel.counts[0, u]) == budget(u * tile, rho, k_min)
            idx = sel.indices[0, :, u, : int(sel.counts[0, u])]
            assert bool((idx < u * tile).all()) and bool((idx >= 0).all())
    for used in decode[1:]:
        if used is not None and isinstance(used[0], list):
            assert sum(int(x.counts[0, 0]) for x in used[0]) == len(used[0]) * budget(200, rho, k_min)
        elif used is not None:
            assert used[0].decode and int(used[0].counts[0, 0]) == budget(200, rho, k_min)
    dense_anchor = name in ("omnikv", "kascade-dense-anchors")  # layer 2 (filter layer, anchor) attends densely
    assert sparse_layers >= (1 if dense_anchor else 3)


def test_selection_shapes(model, plan):
    q = torch.randn(2, 4, 100, 16, generator=torch.Generator().manual_seed(0))
    k = torch.randn(2, 2, 100, 16, generator=torch.Generator().manual_seed(1))
    kv_start = torch.tensor([0, 7])
    # StreamingLLM: 4 sinks and the most recent keys
    sel = selectors.window_selection(q, k, 0.25, 6, 32, kv_start=kv_start)
    idx = sel.sets(1, 0, 2) - 7  # second sequence (7 padding keys), tile 2: 64 keys before it
    assert idx.tolist() == [0, 1, 2, 3] + list(range(64 - 12, 64))
    # one set for all KV heads
    for pool in ("sum", "max"):
        sel = selectors.pooled_selection(q, k, 0.25, 6, 32, kv_start=kv_start, pool=pool)
        assert torch.equal(sel.indices[:, 0], sel.indices[:, 1])
    # Quest: whole pages, best first; at most one page taken in part
    sel = selectors.page_selection(q, k, 0.3, 6, 32, kv_start=kv_start, page=8)
    for h in range(2):
        pages = torch.bincount(sel.sets(0, h, 3) // 8)
        assert int((pages[pages > 0] < 8).sum()) <= 1
    dsel = selectors.page_selection(q[:, :, -1:], k, 0.3, 6, 32, kv_start=kv_start, page=8)
    assert dsel.decode and int(dsel.counts[1, 0]) == budget(93, 0.3, 6)


def test_shared_set_with_one_kv_head_is_the_reference_selection():
    """With a single KV head, pooling over all query heads is Kascade's own pooling: same selection,
    including left padding and a decode step."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 90, 16, generator=g), torch.randn(2, 1, 90, 16, generator=g)
    kv_start = torch.tensor([5, 0])
    for qq in (q, q[:, :, -1:]):
        ours = selectors.pooled_selection(qq, k, 0.2, 4, 32, kv_start=kv_start)
        ref = R.select(qq, k, 0.2, 4, 32, kv_start=kv_start)
        assert torch.equal(ours.counts, ref.counts) and torch.equal(ours.first_tile, ref.first_tile)
        assert torch.equal(ours.indices, ref.indices)


def test_coverage_oracle_bounds_everyone(plan):
    peaky = _peaky()
    strategies = {n: S.make_strategy(n, plan, peaky.config, rho=0.1, k_min=8, paper_plan=plan) for n in SPARSE_PREFILL}
    res = C.measure(peaky, _ids(260, seed=5), strategies, decode_steps=4)
    for mode in ("prefill", "decode"):
        oracle = res[mode]["oracle"]
        assert oracle.shape == (4, 2)
        assert np.allclose(res[mode]["dense"], 1.0) and np.allclose(oracle[0], 1.0)
        assert (oracle[1:] < 0.999).all()  # a real budget
        for name, cov in res[mode].items():
            assert ((cov > 0) & (cov <= 1 + 1e-9)).all()
            if name == "dense":
                continue
            # omnikv's filter layer and the dense-anchors ablation's anchor attend densely
            dense_layers = [2] if name in ("omnikv", "kascade-dense-anchors") else []
            for layer in range(1, 4):
                if name.endswith("shared-budget"):  # where it selects, the same keys in all, to the largest scores
                    # of any head: more mass than per-head top-k over the heads together (equal head totals)
                    if name == "oracle-shared-budget" or layer == 2:
                        assert cov[layer].mean() >= oracle[layer].mean() - 1e-6, (mode, name, layer)
                        assert not np.allclose(cov[layer], oracle[layer])  # the heads' budgets moved
                elif layer not in dense_layers:
                    assert (cov[layer] <= oracle[layer] + 1e-6).all(), (mode, name, layer)
        # kascade's anchor layer 2 is a per-head top-k: it equals the oracle there; its reuse layers fall
        # short of it on this random model (no cross-layer stability to exploit)
        assert np.allclose(res[mode]["kascade"][2], oracle[2])
        assert res[mode]["kascade"][1].mean() < oracle[1].mean() - 0.05
    full = {n: S.make_strategy(n, plan, peaky.config, rho=1.0, k_min=8) for n in ("kascade", "quest")}
    res = C.measure(peaky, _ids(100, seed=5), full)
    assert all(np.allclose(a, 1.0) for a in res["prefill"].values())


def test_coverage_plot(tmp_path):
    res = {"prefill": {"a": np.full((4, 2), 0.5), "b": np.ones((4, 2))}, "decode": {"a": np.full((4, 2), 0.7)}}
    path = C.plot(res, tmp_path / "cov.png")
    assert (tmp_path / "cov.png").stat().st_size > 1000 and path.endswith("cov.png")


def test_plans_behind_the_names(model, plan):
    uni = S.make_strategy("uniform", plan, model.config, 0.1, 8)
    assert len(uni.plan.anchors) == len(plan.anchors) and uni.plan.head_map is None
    assert uni.plan.anchors == kascade.uniform_anchors(4, 2)
    assert S.make_strategy("kascade-no-remap", plan, model.config, 0.1, 8).plan.head_map is None
    ks = S.make_strategy("kascade", plan, model.config, 0.2, 8)
    assert (ks.plan.rho, ks.plan.k_min, ks.plan.head_map) == (0.2, 8, plan.head_map)
    assert S.make_strategy("oracle", None, model.config, 0.1, 8).plan.anchors == [0, 1, 2, 3]
    omni = S.make_strategy("omnikv", plan, model.config, 0.1, 8)
    assert omni.anchors == plan.anchors and omni.dense_anchor_output and omni.pool == "max"


def test_factory_errors(model, plan):
    with pytest.raises(ValueError, match="oracle.*quest"):
        S.make_strategy("h2o", plan, model.config, 0.1, 8)
    with pytest.raises(ValueError, match="needs a calibrated plan"):
        S.make_strategy("kascade", None, model.config, 0.1, 8)
    with pytest.raises(ValueError, match="rho"):
        S.make_strategy("quest", None, model.config, 0.0, 8)
    other = Plan.for_model(E.tiny_llama(VOCAB, layers=6).config, [0, 3])
    with pytest.raises(ValueError, match="another model"):
        S.make_strategy("kascade", other, model.config, 0.1, 8)


def test_paper_strategy_needs_its_plan(model, plan):
    with pytest.raises(ValueError, match="paper_plan"):
        S.make_strategy("kascade-paper", plan, model.config, 0.1, 8)
    paper = S.make_strategy("kascade-paper", None, model.config, 0.2, 8, paper_plan=plan)
    assert paper.plan.anchors == plan.anchors and paper.plan.rho == 0.2


def test_shared_budget_keeps_the_largest_scores_of_all_heads():
    """selectors.shared_budget_selections: per tile (and decode step) Hkv k(n) keys in all, every kept pooled
    score at least every dropped one across the KV heads; with left padding, positions are absolute."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, 96, 16, generator=g) * 2, torch.randn(2, 2, 96, 16, generator=g)
    kv_start = torch.tensor([0, 9])
    rho, k_min, tile = 0.2, 4, 32
    for qq in (q, q[:, :, -1:]):
        sels = selectors.shared_budget_selections(qq, k, rho, k_min, tile, kv_start=kv_start)
        assert len(sels) == 2 and all(s.indices.shape[1] == 1 for s in sels)
        for b, s0 in enumerate((0, 9)):
            i0 = s0 if qq.shape[2] > 1 else 0  # prefill: the padded rows hold no query
            qb, kb = qq[b : b + 1, :, i0:], k[b : b + 1, :, s0:]
            if qq.shape[2] == 1:
                p = selectors._decode_probs(qb, kb, 16**-0.5).sum(2)[0]  # [Hkv, n]
                tiles = [(0, p, kb.shape[2])]
            else:
                pooled = next(iter(R.pooled_tile_scores(qb[0], kb[0], 0, tile, 16**-0.5)))[1]  # [Hkv, U, n]
                tiles = [(u, pooled[:, u], u * tile) for u in range(1, pooled.shape[1])]
            for u, scores, n_before in tiles:
                kept = [sels[h].indices[b, 0, u, : int(sels[h].counts[b, u])].long() - s0 for h in range(2)]
                assert sum(x.numel() for x in kept) == 2 * budget(n_before, rho, k_min)
                mask = torch.zeros(2, n_before, dtype=torch.bool)
                for h in range(2):
                    assert bool((kept[h] >= 0).all()) and bool((kept[h] < n_before).all())
                    mask[h, kept[h]] = True
                sc = scores[:, :n_before]
                assert float(sc[mask].min()) >= float(sc[~mask].max())
