"""Output-aware calibration: the retrieval prompts, the divergence of a plan, and the greedy search
(on a tiny random model, whose numbers mean nothing: these check the mechanics)."""

import numpy as np
import pytest
import torch

from kascade.calibrate import output_aware as OA
from kascade.calibrate.retrieval import FORMATS, calibration_prompts
from kascade.costmodel import predicted_speedup
from kascade.plan import Plan, model_fingerprint
from kascade.strategy import KascadeStrategy, Strategy
from models import tiny_model


class ByteTokenizer:
    """Bytes as tokens (ids 0..255), with an optional chat template of two marker strings."""

    def __init__(self, chat: bool = True):
        self.chat_template = "x" if chat else None

    def __call__(self, text, add_special_tokens=True):
        class Enc:
            input_ids = list(text.encode("utf-8"))
        return Enc()

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "<u>" + messages[0]["content"] + "</u><a>"


TEXT = ("The river bends twice before the mill.\nIts banks are lined with reeds and alder.\n" * 200)


@pytest.mark.parametrize("chat", [True, False])
def test_prompts_have_the_exact_length_and_hide_their_facts(chat):
    tok = ByteTokenizer(chat)
    prompts = calibration_prompts(tok, TEXT, 700, 10)
    kinds = {p.kind for p in prompts}
    assert kinds == (set(FORMATS) if chat else set(FORMATS) - {"chat"})
    for p in prompts:
        assert len(p.ids) == 700
        text = bytes(p.ids).decode()
        if p.kind in ("passkey", "chat"):
            assert "The pass key is" in text and text.rstrip().endswith(("The pass key is", "</u><a>"))
        if p.kind == "door":
            assert text.count("The code word for the") == 5  # four facts and the question
    again = calibration_prompts(tok, TEXT, 700, 10)
    assert [p.ids for p in again] == [p.ids for p in prompts]  # seeded
    with pytest.raises(ValueError, match="length"):
        calibration_prompts(tok, TEXT, 60, 1)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", num_hidden_layers=4)
    prompts = calibration_prompts(ByteTokenizer(), TEXT, 500, 4)
    batches = OA.dense_trajectories(model, prompts, steps=3, batch_size=2)
    return model, batches


def test_divergence_is_zero_for_dense_and_full_budget(setup):
    model, batches = setup
    assert batches[0].ids.shape == (2, 500) and batches[0].continuation.shape == (2, 3)
    assert OA.divergence(model, Strategy(), batches) == pytest.approx(0.0, abs=1e-9)
    full = Plan.for_model(model.config, [0, 2], rho=1.0, k_min=16)
    assert OA.divergence(model, KascadeStrategy(full), batches) == pytest.approx(0.0, abs=1e-6)
    sparse = Plan.for_model(model.config, [0], rho=0.05, k_min=16)
    assert OA.divergence(model, KascadeStrategy(sparse), batches) > 1e-6
    assert OA.agreement(model, Strategy(), batches) == 1.0


def test_units_make_valid_plans_with_best_sources():
    cfg = {"model_type": "llama", "num_layers": 4, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    sim = np.zeros((4, 4, 2, 2))
    sim[0, 3, 1, 0] = 0.9  # layer 3 head 0 is best served by layer 0 head 1
    sim[1, 3, 1, 1] = 0.8
    plan = OA.plan_of_units({(1, 1), (2, 0), (2, 1)}, sim, cfg, rho=0.1, k_min=8, tile=16)
    assert plan.anchors == [0, 2] and plan.recipe == "output-aware"
    assert plan.head_sources[1][1] is None and plan.head_sources[3] == [[0, 1], [1, 1]]
    assert plan.selecting_layers_equivalent == 2.5 == OA.units_cost({(1, 1), (2, 0), (2, 1)}, 2)
    every = OA.plan_of_units({(layer, h) for layer in range(1, 4) for h in range(2)}, sim, cfg)
    assert every.anchors == [0, 1, 2, 3] and not every.head_granular


def test_greedy_search_reaches_the_target_and_respects_the_tolerance():
    cfg = {"num_layers": 4, "num_kv_heads": 2}
    weight = {(1, 0): 5.0, (1, 1): 1.0, (2, 0): 0.1, (2, 1): 3.0, (3, 0): 0.2, (3, 1): 0.3}
    score = lambda sel: sum(w for u, w in weight.items() if u not in sel)  # noqa: E731  (additive toy)
    sel, hist = OA.greedy_search(score, cfg, target=2.0, progress=False)
    assert OA.units_cost(sel, 2) == 2.0 and sel == {(1, 0), (2, 1)}
    assert [h["cost"] for h in hist] == sorted((h["cost"] for h in hist), reverse=True)
    sel, _ = OA.greedy_search(score, cfg, tolerance=0.65, progress=False)
    assert score(sel) <= 0.65 and sel == {(1, 0), (1, 1), (2, 1)}
    with pytest.raises(ValueError, match="target"):
        OA.greedy_search(score, cfg, progress=False)


def test_calibrate_output_aware_end_to_end(setup):
    model = setup[0]
    plan, report = OA.calibrate_output_aware(model, ByteTokenizer(), TEXT, num_anchors=2.5, length=500,
                                             num_prompts=3, answer_tokens=2, batch_size=3, k_min=16, tile=16,
                                             topk=16, backend="reference", progress=False)
    assert plan.selecting_layers_equivalent <= 2.5 and plan.recipe == "output-aware"
    plan.validate(model.config)
    assert report["divergence"] == pytest.approx(report["history"][-1]["divergence"])
    assert plan.provenance["paper_plan_same_cost"]["anchors"][0] == 0
    sp = predicted_speedup(Plan(anchors=[0, 2, 8, 13, 14], model={**model_fingerprint(model.config),
                                                                   "num_layers": 32, "num_kv_heads": 8}))
    assert 2.5 < sp["decode"] < 4.5 and 1.5 < sp["prefill"] < 3.0
    assert predicted_speedup(plan)["decode"] > 0
    assert set(report["plans_along"]) == set(report["paper_plans_along"]) and 3 in report["plans_along"]


def test_cost_model_charges_the_views_of_unevenly_spaced_heads():
    """Half the heads selecting costs reuse + half a selection; heads 0, 1, 3 (two views) cost one
    extra_slice more than three evenly spaced heads would."""
    from kascade.costmodel import layer_times, load_times

    fp = {"model_type": "llama", "num_layers": 3, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}
    t = load_times()["decode_us"]

    def part(heads):
        rows = [None, [None if h in heads else [0, h] for h in range(8)], [[0, h] for h in range(8)]]
        return Plan(anchors=[0], head_sources=rows, model=fp, recipe="output-aware")

    even, uneven = layer_times(part([0, 2, 4, 6]), 8, t)[1], layer_times(part([0, 1, 3]), 8, t)[1]
    assert even == pytest.approx(t["reuse"] + 0.5 * t["select"])
    assert uneven == pytest.approx(t["reuse"] + 3 / 8 * t["select"] + t["extra_slice"])
    assert t["extra_slice"] > 0


def test_greedy_search_passes_through_its_stops():
    """With stops, no step jumps over a stop's cost, so the history holds a plan at each; without them the
    same search may skip it."""
    cfg = {"num_layers": 8, "num_kv_heads": 3}
    weight = {(layer, h): 0.01 * (layer * 3 + h) for layer in range(1, 8) for h in range(3)}
    score = lambda sel: sum(w for u, w in weight.items() if u not in sel)  # noqa: E731  (additive toy)
    sel, hist = OA.greedy_search(score, cfg, target=2.0, shrink=2, progress=False, stops=(6.0, 4.0, 3.0))
    costs = [h["cost"] for h in hist]
    assert OA.units_cost(sel, 3) == 2.0 and {6.0, 4.0, 3.0} <= set(costs)
    _, free = OA.greedy_search(score, cfg, target=2.0, shrink=2, progress=False)
    assert not {6.0, 4.0, 3.0} <= {h["cost"] for h in free}  # halving 21 units: 11, 6, 3, ... (no stop at 6.0)
    with pytest.raises(ValueError, match="stops"):
        OA.greedy_search(score, cfg, target=2.0, progress=False, stops=(9.0,))


def test_layer_granular_search_picks_whole_layers(setup):
    """granularity="layer": every plan on the path is anchors and the paper's head map (whole layers, layer 0
    first), at the target cost and at each stop."""
    from kascade.calibrate import head_map_for

    model = setup[0]
    calib = OA.calibration_set(model, ByteTokenizer(), TEXT, ("passkey",), length=300, num_prompts=2,
                               answer_tokens=2, batch_size=2, topk=16, tile=16, backend="reference", progress=False)
    kw = dict(k_min=16, tile=16, topk=16, backend="reference", progress=False, calib=calib)
    plan, report = OA.calibrate_output_aware(model, ByteTokenizer(), TEXT, num_anchors=2, granularity="layer",
                                             stops=(3,), **kw)
    assert not plan.head_granular and plan.anchors[0] == 0 and len(plan.anchors) == 2
    assert plan.selecting_layers_equivalent == 2.0 and plan.recipe == "output-aware"
    assert plan.provenance["granularity"] == "layer" and report["granularity"] == "layer"
    sim = report["similarity"]
    assert sorted(report["plans_along"]) == [2, 3, 4] == sorted(report["paper_plans_along"])
    for cost, p in report["plans_along"].items():
        assert p.head_sources is None and len(p.anchors) == cost == p.selecting_layers_equivalent
        assert p.head_map == head_map_for(sim, p.anchors)
    removed = [layer for step in report["history"] for layer in step["removed"]]
    assert all(isinstance(layer, int) for layer in removed) and set(plan.anchors).isdisjoint(removed)
    with pytest.raises(ValueError, match="granularity"):
        OA.calibrate_output_aware(model, ByteTokenizer(), TEXT, num_anchors=2, granularity="unit", **kw)


def test_worst_family_sources_pick_the_head_that_serves_every_family():
    """A reusing unit's source by the mean similarity can serve one format family well and another badly; the
    worst-family rule picks the source whose lowest family mean is highest."""
    from types import SimpleNamespace

    cfg = {"model_type": "llama", "num_layers": 3, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 16}

    def sim(a1, a2):  # layer 2 head 0 served by layer 0 (a1) or layer 1 (a2)
        s = np.zeros((3, 3, 1, 1))
        s[0, 2, 0, 0], s[1, 2, 0, 0] = a1, a2
        return s

    prompts = [SimpleNamespace(kind=k) for k in ("passkey", "passkey", "telemetry")]  # needle, needle, records
    sims = [sim(0.9, 0.6), sim(0.9, 0.6), sim(0.1, 0.5)]  # mean: layer 0 (0.63 > 0.57); records: layer 1
    calib = OA.CalibrationSet(None, prompts, [], sims, [])
    mean, worst = calib.similarity([0, 1, 2]), calib.similarity([0, 1, 2], "worst-family")
    assert mean[0, 2, 0, 0] == pytest.approx(1.9 / 3) and worst[0, 2, 0, 0] == pytest.approx(0.1)
    assert worst[1, 2, 0, 0] == pytest.approx(0.5)
    units = {(1, 0)}  # layers 0 and 1 select, layer 2 reuses
    assert OA.plan_of_units(units, mean, cfg).head_sources[2] == [[0, 0]]
    assert OA.plan_of_units(units, worst, cfg).head_sources[2] == [[1, 0]]
    with pytest.raises(ValueError, match="sources: expected one of"):
        calib.similarity([0, 1, 2], "median")


def test_calibrate_output_aware_refuses_an_unknown_source_rule(setup):
    with pytest.raises(ValueError, match="sources: expected one of"):
        OA.calibrate_output_aware(setup[0], ByteTokenizer(), TEXT, num_anchors=2.5, length=500, num_prompts=3,
                                  answer_tokens=2, batch_size=3, k_min=16, tile=16, topk=16, backend="reference",
                                  progress=False, sources="median")


def test_answer_statistics_come_from_the_prompt_and_its_dense_answer(setup):
    """statistics="answer": the similarity is measured on each prompt followed by its dense continuation, over
    the last tiles only; the prompts, continuations and divergences are those of the prompt statistics."""
    model = setup[0]
    kw = dict(length=500, num_prompts=2, answer_tokens=3, batch_size=2, topk=16, tile=16, backend="reference",
              progress=False)
    prompt = OA.calibration_set(model, ByteTokenizer(), TEXT, **kw)
    answer = OA.calibration_set(model, ByteTokenizer(), TEXT, statistics="answer", **kw)
    assert (prompt.statistics, answer.statistics) == ("prompt", "answer")
    assert torch.equal(prompt.batches[0].continuation, answer.batches[0].continuation)
    assert len(answer.sims) == 2 and answer.sims[0].shape == prompt.sims[0].shape
    assert not np.allclose(answer.sims[0], prompt.sims[0])  # other queries, other coverage
    assert OA.CalibrationSet.from_state(model, answer.state()).statistics == "answer"
    with pytest.raises(ValueError, match="statistics: expected one of"):
        OA.calibration_set(model, ByteTokenizer(), TEXT, statistics="decode", **kw)


@pytest.mark.parametrize("decode_batch", [None, 3])
def test_decode_only_measurements_share_one_dense_prompt_pass(setup, decode_batch):
    """In decode-only mode every plan's prompt pass is dense's: the set runs it once (decode_only_groups) and
    each plan then runs its decode steps only, cropping the caches back to the prompt, in the batches given or
    joined into batches of `decode_batch` prompts; every plan's divergence is still the full run's (prompt pass
    included), prompt by prompt, in any order."""
    model, batches = setup
    plans = [Plan.for_model(model.config, anchors, rho=0.05, k_min=16) for anchors in ([0], [0, 1], [0])]
    calib = OA.CalibrationSet(model, [], batches, [], [], backend="reference", decode_batch=decode_batch)
    for plan in plans[:2]:
        full = OA.divergence_per_prompt(model, KascadeStrategy(plan, backend="reference", sparse_prefill=False),
                                        batches)
        np.testing.assert_allclose(calib.per_prompt(plan, sparse_prefill=False), full, rtol=1e-4, atol=1e-6)
    groups, caches = calib.decode_only_inputs()
    assert [g.ids.shape[0] for g in groups] == ([2, 2] if decode_batch is None else [4])
    assert [c.get_seq_length() for c in caches] == [g.ids.shape[1] for g in groups]
    strategy = KascadeStrategy(plans[0], backend="reference", sparse_prefill=False)
    again = OA.divergence_per_prompt(model, strategy, groups, caches)
    np.testing.assert_array_equal(again, calib.per_prompt(plans[2], sparse_prefill=False))  # memo, same value
    assert OA.agreement(model, strategy, groups, [1, 2], caches) == OA.agreement(model, strategy, batches, [1, 2])
    assert "prompt_caches" not in calib.state()  # rebuilt by a resumed run, never saved


def test_decode_only_calibration_judges_plans_in_that_mode(setup):
    """sparse_prefill=False judges plans in decode-only mode: the first answer token is dense's (its KL is 0),
    the divergence is KascadeStrategy(plan, sparse_prefill=False)'s and is memoised apart from the sparse one;
    the plan records the mode, and running it with a sparse prefill warns."""
    import warnings

    model, batches = setup
    sparse = Plan.for_model(model.config, [0], rho=0.05, k_min=16)
    calib = OA.CalibrationSet(model, [], batches, [], [], backend="reference")
    only = calib.per_prompt(sparse, sparse_prefill=False)
    np.testing.assert_allclose(only, OA.divergence_per_prompt(model, KascadeStrategy(sparse, sparse_prefill=False),
                                                             batches))
    assert not np.allclose(only, calib.per_prompt(sparse)) and len(calib.memo) == 2
    first = OA.divergence_per_prompt(model, KascadeStrategy(sparse, sparse_prefill=False),
                                     [OA.Trajectories(b.ids, b.continuation[:, :1], b.logprobs[:, :1]) for b in batches])
    assert np.allclose(first, 0.0, atol=1e-6)  # the prompt attended densely: the first answer token is dense's
    plan, report = OA.calibrate_output_aware(model, ByteTokenizer(), TEXT, num_anchors=2.5, length=500,
                                             num_prompts=3, answer_tokens=2, batch_size=3, k_min=16, tile=16,
                                             topk=16, backend="reference", progress=False, sparse_prefill=False)
    assert plan.provenance["sparse_prefill"] is False and report["sparse_prefill"] is False
    with pytest.warns(UserWarning, match="plan: calibrated in decode-only mode"):
        KascadeStrategy(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KascadeStrategy(plan, sparse_prefill=False)
    with pytest.raises(ValueError, match="sparse_prefill: expected True"):
        OA.calibrate_output_aware(model, ByteTokenizer(), TEXT, num_anchors=2.5, length=500, num_prompts=3,
                                  backend="reference", progress=False, sparse_prefill="no")


def test_calibrate_output_aware_defaults_to_the_validated_recipe(setup):
    """No target and no tolerance: two prompts per format, search step 5 with 10 candidates, and a search that
    stops at a third of the layers (4 layers of 2 KV heads: 1.0 selecting-layer equivalent, layer 0's)."""
    model = setup[0]
    plan, _ = OA.calibrate_output_aware(model, ByteTokenizer(), TEXT, length=500, formats=("passkey", "door"),
                                        answer_tokens=2, k_min=16, tile=16, topk=16, backend="reference",
                                        progress=False)
    prov = plan.provenance
    assert (prov["num_prompts"], prov["search_step"], prov["search_candidates"]) == (4, 5, 10)
    assert prov["target"] == OA.default_target(4, 2) == 1.0 and plan.selecting_layers_equivalent == 1.0
    assert plan.anchors == [0]
