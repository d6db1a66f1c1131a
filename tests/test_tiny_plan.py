"""The shipped model with its shipped plans (output-aware, and the paper's recipe for the paths that need a
layer-granular plan): each fits, and Kascade agrees with dense on a 2K needle prompt."""

import pytest
import torch

import kascade
from kascade.models import TINY_MODEL_DIR, TINY_PLAN, load_model
from kascade.plan import Plan

pytestmark = pytest.mark.skipif(not (TINY_MODEL_DIR / "config.json").is_file(), reason="models/kascade-tiny absent")


@pytest.fixture(scope="module")
def loaded():
    return load_model(TINY_MODEL_DIR, device="cpu")


@pytest.fixture(scope="module", params=["output-aware", "paper"])
def tiny(loaded, request):
    path = TINY_PLAN if request.param == "output-aware" else TINY_PLAN.with_name("kascade-tiny-paper.json")
    plan = Plan.load(path)
    assert (plan.recipe or "paper") == request.param
    return (*loaded, plan)


def test_plan_validates_and_was_calibrated(tiny):
    model, _, plan = tiny
    plan.validate(model.config)
    assert plan.anchors[0] == 0 and plan.selecting_layers_equivalent >= 2
    assert plan.provenance["num_prompts"] >= 1 and plan.provenance["data"]


def test_needle_at_2k_dense_and_kascade_agree(tiny):
    from kascade.eval.tasks import make_task

    model, tok, plan = tiny
    sample = make_task("niah_single", 2048, tok, seed=11)
    ids = tok(sample.prompt, return_tensors="pt").input_ids
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        dense_logits = model(ids).logits[0]
        dense = tok.decode(model.generate(ids, **gen)[0, ids.shape[1]:])
        with kascade.enable(model, plan, sparse_prefill=True):
            kas_logits = model(ids).logits[0]
            kas = tok.decode(model.generate(ids, **gen)[0, ids.shape[1]:])
    agreement = (dense_logits.argmax(-1) == kas_logits.argmax(-1)).float().mean()
    assert agreement > 0.97  # measured 99.9% at 4K with the shipped plan (kascade demo)
    assert sample.answers[0] in dense and sample.answers[0] in kas
