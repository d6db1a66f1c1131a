"""python benchmarks/head_granular_in_place_check.py -- SmolLM2 on the CPU (reference path): the shipped head-granular plan gives the same logits whether the
part-selecting heads are read in place (strided views) or gathered into a copy."""
import dataclasses, datetime, torch, transformers
import kascade, kascade.strategy as KS
from kascade.models import load_model
from kascade.plan import Plan
from kascade.integrations.transformers import _cache_kwarg
from kascade.calibrate.retrieval import calibration_prompts
torch.manual_seed(0)
model, tok = load_model("models/smollm2-135m-instruct", "cpu")
plan = Plan.load("plans/smollm2-135m-instruct.json")
prompts = calibration_prompts(tok, open("data/heldout.txt").read(), 1024, 2, first_seed=3000)
ids = torch.tensor([p.ids for p in prompts])
res = {}
for in_place in (True, False):
    KS.IN_PLACE_HEADS = in_place
    st = KS.KascadeStrategy(plan, backend="reference")
    with torch.no_grad(), kascade.enable(model, strategy=st):
        out = model(ids, use_cache=True)
        logits, cache = [out.logits[:, -1]], out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            o = model(nxt, **{_cache_kwarg(model): cache}, use_cache=True)
            cache = o.past_key_values; logits.append(o.logits[:, -1]); nxt = o.logits[:, -1:].argmax(-1)
    res[in_place] = torch.stack(logits)
same = torch.equal(res[True], res[False])
print(f"{datetime.date.today()} torch {torch.__version__} transformers {transformers.__version__}, CPU, reference path; "
      f"plans/smollm2-135m-instruct.json (head-granular, 10 equivalents), 2 held-out prompts of 1024 tokens "
      f"(calibration formats, seeds 3000-3001), prefill + 4 decode steps: logits in place vs copied bit-identical: {same}; "
      f"max abs difference {float((res[True] - res[False]).abs().max()):.3g}")
