"""python benchmarks/head_granular_in_place_check.py -- SmolLM2 on the CPU (reference path): the shipped
head-granular plan gives the same logits whichever way its part-selecting layers run: in one pass
(ops.part_anchor, the default where a layer's selecting heads form one view and its other heads reuse
one earlier layer), assembled (the selecting heads read in place, their selection stacked with the
sources', then a reuse pass), or copied (the selecting heads gathered into a copy first)."""
import contextlib
import datetime
from unittest import mock

import torch
import transformers

import kascade
import kascade.strategy as KS
from kascade.calibrate.retrieval import calibration_prompts
from kascade.integrations.transformers import _cache_kwarg
from kascade.models import load_model
from kascade.plan import Plan

WAYS = {
    "one pass": {},
    "assembled": {"kascade.strategy.KascadeStrategy._part_route": lambda self, *a: None},
    "copied": {"kascade.strategy.IN_PLACE_HEADS": False},
}

torch.manual_seed(0)
model, tok = load_model("models/smollm2-135m-instruct", "cpu")
plan = Plan.load("plans/smollm2-135m-instruct.json")
prompts = calibration_prompts(tok, open("data/heldout.txt").read(), 1024, 2, first_seed=3000)
ids = torch.tensor([p.ids for p in prompts])
res, one_pass_calls = {}, [0]
real_part_anchor = kascade.ops.part_anchor


def counted_part_anchor(q, k, *a, **kw):
    one_pass_calls[0] += 1
    return real_part_anchor(q, k, *a, **kw)


for way, patches in WAYS.items():
    with contextlib.ExitStack() as stack:
        for target, value in patches.items():
            stack.enter_context(mock.patch(target, value))
        stack.enter_context(mock.patch("kascade.ops.part_anchor", counted_part_anchor))
        st = KS.KascadeStrategy(plan, backend="reference")
        with torch.no_grad(), kascade.enable(model, strategy=st):
            out = model(ids, use_cache=True)
            logits, cache = [out.logits[:, -1]], out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            one_pass_calls[0] = 0  # count the decode steps' calls only
            for _ in range(4):
                o = model(nxt, **{_cache_kwarg(model): cache}, use_cache=True)
                cache = o.past_key_values
                logits.append(o.logits[:, -1])
                nxt = o.logits[:, -1:].argmax(-1)
    res[way] = (torch.stack(logits), one_pass_calls[0])
base = res["one pass"][0]
same = {w: torch.equal(base, r[0]) for w, r in res.items() if w != "one pass"}
diff = {w: float((base - r[0]).abs().max()) for w, r in res.items() if w != "one pass"}
print(f"{datetime.date.today()} torch {torch.__version__} transformers {transformers.__version__}, CPU, reference path; "
      f"plans/smollm2-135m-instruct.json (head-granular, 10 equivalents), 2 held-out prompts of 1024 tokens "
      f"(calibration formats, seeds 3000-3001), prefill + 4 decode steps. Part-layer calls in one pass over the 4 "
      f"decode steps: {res['one pass'][1]} (assembled {res['assembled'][1]}, copied {res['copied'][1]}). "
      f"Logits of one pass against assembled / copied bit-identical: {same['assembled']} / {same['copied']}; "
      f"max abs difference {diff['assembled']:.3g} / {diff['copied']:.3g}")
