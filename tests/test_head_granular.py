"""Finer-grained anchors: plans whose reuse layers take keys per KV head from any earlier selecting
(layer, head), or select for some heads themselves (schema 2 `head_sources`).

Checked at three levels: the plan format (old files load unchanged, errors name the field); the
strategy against a hand-built reference computation on random tensors, on the reference and on the
Triton kernels (interpreter on CPU, native on CUDA); and through a whole model, where a head-granular
plan that spells out a layer-granular plan gives the same logits."""

import json

import pytest
import torch

import kascade
from kascade import reference
from kascade.integrations.transformers import _cache_kwarg
from kascade.plan import Plan
from kascade.reference import Selection
from kascade.strategy import KascadeStrategy
from models import tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP = {"model_type": "llama", "num_layers": 4, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}


def _plan(**kw):
    base = dict(anchors=[0, 2], model=dict(FP), rho=0.25, k_min=8, tile=16)
    base.update(kw)
    return Plan(**base)


# ----------------------------------------------------------------------------------------------
# format
# ----------------------------------------------------------------------------------------------


def test_schema_1_file_loads_and_means_what_it_meant(tmp_path):
    old = {"schema_version": 1, "anchors": [0, 2], "head_map": [[0, 1], [1, 0], [0, 1], [1, 1]], "rho": 0.1,
           "k_min": 128, "tile": 32, "model": FP, "provenance": {}, "tp_degree": 1}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    plan = Plan.load(path)
    assert plan.schema_version == 1 and not plan.head_granular and plan.recipe == "paper"
    assert plan.selecting_layers_equivalent == 2.0
    assert plan.sources(1, 2) == [(0, 1), (0, 0)] and plan.sources(3, 2) == [(2, 1), (2, 1)]
    assert plan.sources(2, 2) == [(2, 0), (2, 1)]
    plan.save(tmp_path / "again.json")
    assert Plan.load(tmp_path / "again.json").to_dict() == plan.to_dict()


def test_head_sources_round_trip_and_cost(tmp_path):
    plan = _plan(head_sources=[None, [[0, 1], None], None, [[1, 1], [2, 0]]], recipe="output-aware")
    assert plan.head_granular and plan.selecting_layers_equivalent == 2.5
    assert plan.selecting_heads(1, 2) == [1] and plan.selecting_heads(3, 2) == []
    assert plan.used_by_later_layers(0, 2) and plan.sources(3, 2) == [(1, 1), (2, 0)]
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.to_dict() == plan.to_dict() and back.schema_version == 2
    with pytest.raises(ValueError, match="head map per layer"):
        plan.kv_head_map(3, 2)
    with pytest.raises(ValueError, match="layer granularity only"):
        plan.require_layer_granular("the paged backend")


@pytest.mark.parametrize("sources, match", [
    ([None, [[0, 1], None], None, [[1, 0], [2, 0]]], "does not select"),   # layer 1 head 0 reuses
    ([None, [[1, 1], None], None, [[0, 0], [2, 0]]], "earlier layer"),      # a layer cannot take itself
    ([None, [[0, 1]], None, [[0, 0], [2, 0]]], "one width"),
    ([None, [[0, 1], None], [[0, 0], [0, 0]], [[0, 0], [2, 0]]], "layer 2 expected null"),
    ([None, None, None, [[0, 0], [2, 0]]], "layer 1 expected a row"),
    ([None, [[0, 1], [0, 2]], None, [[0, 0], [2, 0]]], "KV head in"),
])
def test_bad_head_sources_are_refused_by_name(sources, match):
    with pytest.raises(ValueError, match=match):
        _plan(head_sources=sources)


def test_other_inconsistencies_are_refused():
    good = [None, [[0, 1], None], None, [[1, 1], [2, 0]]]
    with pytest.raises(ValueError, match="head_map: expected null"):
        _plan(head_sources=good, head_map=[[0, 1]] * 4)
    with pytest.raises(ValueError, match="selecting_layers_equivalent"):
        _plan(head_sources=good, selecting_layers_equivalent=2.0)
    with pytest.raises(ValueError, match="schema_version 2"):
        Plan.from_dict({"schema_version": 1, "anchors": [0], "head_sources": None})
    with pytest.raises(ValueError, match="recipe"):
        _plan(recipe="magic")
    with pytest.raises(ValueError, match="tensor-parallel shard"):
        _plan(head_sources=good, tp_degree=2)


# ----------------------------------------------------------------------------------------------
# the strategy against a hand-built computation
# ----------------------------------------------------------------------------------------------


def _stack(sets):
    """Selection whose KV head h is sets[h] = (Selection, head)."""
    first = sets[0][0]
    width = max(s.indices.shape[-1] for s, _ in sets)
    rows = [torch.nn.functional.pad(s.indices[:, h : h + 1], (0, width - s.indices.shape[-1]), value=-1)
            for s, h in sets]
    return Selection(torch.cat(rows, 1), first.counts, first.first_tile, first.tile, first.decode)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("qlen", [1, 70])
def test_mixed_layers_match_hand_built_selections(backend, qlen):
    """Layer 1: head 0 reuses layer 0 head 1, head 1 selects; layer 3: head 0 from layer 1 head 1, head 1
    from anchor 2 head 0. Decode (one query) and prefill (several tiles, odd length)."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(qlen)
    b, hq, hkv, n, d = 2, 4, 2, 150, 16
    dt = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    plan = _plan(head_sources=[None, [[0, 1], None], None, [[1, 1], [2, 0]]])
    qs = [torch.randn(b, hq, qlen, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    ks = [torch.randn(b, hkv, n, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    vs = [torch.randn(b, hkv, n, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    strategy = KascadeStrategy(plan, backend=backend)
    strategy.begin_forward()
    outs = [strategy.attend(layer, qs[layer], ks[layer], vs[layer], None, None) for layer in range(4)]

    def sel(layer, heads):  # the reference selection of some KV heads of a layer
        qh = torch.cat([qs[layer][:, h * 2 : h * 2 + 2] for h in heads], 1)
        return reference.select(qh, ks[layer][:, heads], plan.rho, plan.k_min, plan.tile)

    s0, s1, s2 = sel(0, [0, 1]), sel(1, [1]), sel(2, [0, 1])
    want1 = reference.sparse_attention(qs[1], ks[1], vs[1], _stack([(s0, 1), (s1, 0)]))
    want3 = reference.sparse_attention(qs[3], ks[3], vs[3], _stack([(s1, 0), (s2, 0)]))
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5  # bf16 outputs round at ~4e-3; fp32 paths agree to ~1e-6
    for got, want in ((outs[1], want1), (outs[3], want3)):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < tol
    if backend == "reference":  # the assembled selection itself
        att, hm = strategy.attended_selection(1, hkv)
        assert hm is None
        for h, (s, row) in enumerate([(s0, 1), (s1, 0)]):
            for bb in range(b):
                for u in range(s.counts.shape[1]):
                    assert torch.equal(att.sets(bb, h, u), s.sets(bb, row, u))


def test_head_slices_cover_the_heads_with_few_evenly_spaced_runs():
    from kascade.strategy import head_slices

    assert head_slices([2]) == [slice(2, 3, 1)] and head_slices([1, 3]) == [slice(1, 4, 2)]
    assert head_slices([0, 1, 2]) == [slice(0, 3, 1)] and head_slices([0, 2, 4, 6]) == [slice(0, 7, 2)]
    assert head_slices([0, 1, 3]) == [slice(0, 2, 1), slice(3, 4, 1)]
    assert head_slices([0, 3, 4, 5, 7]) == [slice(0, 8, 7), slice(3, 6, 1)]  # the run 3-5, then 0 and 7
    assert head_slices([]) == []
    for heads in ([0, 1, 3], [1, 2, 4, 7], [0, 5, 6]):
        covered = sorted(h for sl in head_slices(heads) for h in range(sl.start, sl.stop, sl.step))
        assert covered == heads


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("qlen", [1, 70])
@pytest.mark.parametrize("in_place", [True, False])
def test_part_selecting_heads_read_the_cache_in_place(backend, qlen, in_place, monkeypatch):
    """Four KV heads. Layer 1: heads 1 and 3 select (one strided view of the cache); layer 3: heads 0, 1
    and 3 select (two views, [0, 1] and [3], stacked back in head order). In place or gathered into
    a copy (IN_PLACE_HEADS = False), both give the hand-built result."""
    import kascade.strategy as KS

    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(KS, "IN_PLACE_HEADS", in_place)
    g = torch.Generator().manual_seed(7 + qlen)
    b, hq, hkv, n, d = 2, 8, 4, 150, 16
    dt = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    fp = dict(FP, num_q_heads=hq, num_kv_heads=hkv)
    plan = Plan(anchors=[0, 2], model=fp, rho=0.25, k_min=8, tile=16, head_sources=[
        None, [[0, 0], None, [0, 2], None], None, [None, None, [2, 2], None]])
    qs = [torch.randn(b, hq, qlen, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    ks = [torch.randn(b, hkv, n, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    vs = [torch.randn(b, hkv, n, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    strategy = KascadeStrategy(plan, backend=backend)
    seen = []
    inner = strategy._select

    def spy(q, k, kw):
        seen.append(k)
        return inner(q, k, kw)

    strategy._select = spy
    strategy.begin_forward()
    outs = [strategy.attend(layer, qs[layer], ks[layer], vs[layer], None, None) for layer in range(4)]
    parts = [k for k in seen if k.shape[1] < hkv]  # the part-selecting layers' calls, in order
    storages = [k.untyped_storage().data_ptr() for k in parts]
    if in_place:
        assert [k.shape[1] for k in parts] == [2, 2, 1]
        assert storages == [ks[1].untyped_storage().data_ptr()] + [ks[3].untyped_storage().data_ptr()] * 2
    else:
        assert [k.shape[1] for k in parts] == [2, 3]
        assert not {ks[1].untyped_storage().data_ptr(), ks[3].untyped_storage().data_ptr()} & set(storages)

    def sel(layer, heads):
        qh = torch.cat([qs[layer][:, h * 2 : h * 2 + 2] for h in heads], 1)
        return reference.select(qh, ks[layer][:, heads], plan.rho, plan.k_min, plan.tile)

    s0, s1, s2, s3 = sel(0, [0, 1, 2, 3]), sel(1, [1, 3]), sel(2, [0, 1, 2, 3]), sel(3, [0, 1, 3])
    want1 = reference.sparse_attention(qs[1], ks[1], vs[1], _stack([(s0, 0), (s1, 0), (s0, 2), (s1, 1)]))
    want3 = reference.sparse_attention(qs[3], ks[3], vs[3], _stack([(s3, 0), (s3, 1), (s2, 2), (s3, 2)]))
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    for got, want in ((outs[1], want1), (outs[3], want3)):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < tol


def test_missing_source_layer_is_an_error():
    plan = _plan(head_sources=[None, [[0, 1], None], None, [[1, 1], [2, 0]]])
    strategy = KascadeStrategy(plan, backend="reference")
    strategy.begin_forward()
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16)
    with pytest.raises(RuntimeError, match="did not run in this forward"):
        strategy.attend(3, q, k, k, None, None)


# ----------------------------------------------------------------------------------------------
# whole model
# ----------------------------------------------------------------------------------------------


def _spelled_out(plan: Plan) -> Plan:
    """The same plan written with head_sources."""
    hkv = plan.model["num_kv_heads"]
    rows = [None if plan.is_anchor(layer) else [list(s) for s in plan.sources(layer, hkv)]
            for layer in range(plan.num_layers)]
    return Plan(anchors=plan.anchors, head_sources=rows, rho=plan.rho, k_min=plan.k_min, tile=plan.tile,
                model=plan.model)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_spelled_out_plan_gives_the_layer_plan_logits(backend):
    model = tiny_model("llama", num_hidden_layers=4).to(DEVICE)
    layered = Plan.for_model(model.config, [0, 2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]], rho=0.1, k_min=16)
    granular = _spelled_out(layered)
    assert granular.head_granular and granular.selecting_layers_equivalent == 2.0
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = {}
    with torch.no_grad():
        for name, plan in (("layered", layered), ("granular", granular)):
            with kascade.enable(model, plan, backend=backend, sparse_prefill=True):
                pre = model(ids, use_cache=True)
                nxt = pre.logits[:, -1:].argmax(-1)
                out[name] = (pre.logits, model(nxt, **{_cache_kwarg(model): pre.past_key_values}).logits)
    for a, b in zip(out["layered"], out["granular"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)  # same selections, same kernels: equal up to fp32 order


def test_layer_level_ablations_select_in_as_many_layers_as_the_plan_costs():
    """Two half-selecting layers cost one layer: the ablation selects in layer 0 and the earlier of them."""
    from kascade.eval import strategies as S

    plan = Plan.for_model(tiny_model("llama", num_hidden_layers=4).config, [0],
                          head_sources=[None, [None, [0, 1]], [None, [0, 0]], [[0, 0], [0, 1]]],
                          rho=0.1, k_min=16, recipe="output-aware")
    assert plan.selecting_layers_equivalent == 2.0
    assert S.selecting_layers(plan) == [0, 1]


def test_every_strategy_takes_a_head_granular_plan():
    """The ablations are defined for head-granular plans too; at rho = 1 each equals dense."""
    from kascade.eval import strategies as S

    model = tiny_model("llama", num_hidden_layers=4)
    plan = Plan.for_model(model.config, [0, 2], head_sources=[None, [[0, 1], None], None, [[1, 1], [2, 0]]],
                          rho=0.1, k_min=16, recipe="output-aware")
    assert S.selecting_layers(plan) == [0, 1, 2]
    nr = S.without_remap(plan)
    assert nr.head_sources[1] == [[0, 0], None] and nr.head_sources[3] == [[1, 1], [2, 1]]
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(ids).logits
        for name in S.STRATEGIES:
            strategy = S.make_strategy(name, plan, model.config, rho=1.0, k_min=4, paper_plan=plan)
            with kascade.enable(model, strategy=strategy):
                assert torch.allclose(model(ids).logits, dense, atol=1e-4, rtol=1e-4), name
    assert S.make_strategy("uniform", plan, model.config, 0.1, 8).plan.anchors == [0, 2]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_part_layer_in_one_pass_matches_the_general_path(backend, monkeypatch):
    """A decode step of a layer whose own heads form one view and whose other heads reuse one earlier
    layer runs as ops.part_anchor; it gives the general path's selections (bit for bit) and outputs (same
    on the reference, within rounding of the scores on the kernels), and the same attended selection."""
    import kascade.ops as ops_mod
    from kascade.strategy import KascadeStrategy as KS

    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, n, d = 2, 8, 4, 300, 16
    dt = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    fp = dict(FP, num_q_heads=hq, num_kv_heads=hkv)
    plan = Plan(anchors=[0, 2], model=fp, rho=0.25, k_min=8, tile=16, head_sources=[
        None, [[0, 3], None, [0, 0], None], None, [[2, 1], [2, 2], [2, 0], None]])  # layer 3: head 3 only
    qs = [torch.randn(b, hq, 1, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    ks = [torch.randn(b, hkv, n, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    vs = [torch.randn(b, hkv, n, d, generator=g).to(DEVICE, dt) for _ in range(4)]
    calls = []
    real = ops_mod.part_anchor
    monkeypatch.setattr(ops_mod, "part_anchor", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))

    def run(one_pass):
        s = KS(plan, backend=backend)
        if not one_pass:
            s._part_route = lambda *a: None
        s.begin_forward()
        outs = [s.attend(layer, qs[layer], ks[layer], vs[layer], None, None) for layer in range(4)]
        return outs, s

    outs1, s1 = run(True)
    assert calls == [slice(1, 4, 2), slice(3, 4, 1)]
    outs0, s0 = run(False)
    for layer in (1, 3):
        assert torch.equal(s1.state[layer].indices, s0.state[layer].indices)
        assert torch.equal(s1.attended_selection(layer, hkv)[0].indices, s0.attended_selection(layer, hkv)[0].indices)
        if backend == "reference":
            assert torch.equal(outs1[layer], outs0[layer])
        else:
            torch.testing.assert_close(outs1[layer].float(), outs0[layer].float(), atol=2e-2, rtol=2e-2)
    assert all(torch.equal(outs1[layer], outs0[layer]) for layer in (0, 2))
