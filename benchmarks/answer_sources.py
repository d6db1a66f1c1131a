"""The shipped plan's selecting units with their reusing heads routed by decode-step statistics: head similarity
measured on the question's end and the dense answer (`calibration_set(statistics="answer")`) instead of every
prompt tile (the shipped recipe's "prompt"). Same calibration prompts as the shipped plan (its provenance: the
format mixture over data/heldout.txt, 22 prompts of 4,096 tokens, seeds 0-21), so only the routing changes; a
"prompt" rebuild on the same machine checks that the shipped sources come back.

    python benchmarks/answer_sources.py MODEL_DIR -o DIR [--device cpu --dtype float32]

Writes DIR/prompt.json and DIR/answer.json (the two plans) and prints how many reusing heads each routes
differently from the shipped plan. Judge them with benchmarks/answer_logprob.py --plan DIR/answer.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def selecting_units(plan) -> set:
    """(layer, KV head) units that select in `plan` (anchors: every head)."""
    H = plan.model["num_kv_heads"]
    return {(layer, h) for layer in range(plan.model["num_layers"]) for h in plan.selecting_heads(layer, H)}


def routed_differently(a, b) -> int:
    """Reusing heads whose source differs between the plans a and b (same selecting units)."""
    H = a.model["num_kv_heads"]
    return sum(1 for layer in range(a.model["num_layers"])
               for h, (sa, sb) in enumerate(zip(a.sources(layer, H), b.sources(layer, H)))
               if sa[0] != layer and sa != sb)


def main() -> None:
    from kascade.calibrate.output_aware import calibration_set, plan_of_units
    from kascade.models import load_model
    from kascade.plan import Plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--plan", default=str(ROOT / "plans" / "smollm2-135m-instruct.json"))
    ap.add_argument("--data", default=str(ROOT / "data" / "heldout.txt"))
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    shipped = Plan.load(a.plan)
    pv = shipped.provenance["settings"]
    model, tok = load_model(a.model_dir, a.device, a.dtype)
    text = Path(a.data).read_text(encoding="utf-8", errors="replace")
    units = selecting_units(shipped)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for statistics in ("prompt", "answer"):
        calib = calibration_set(model, tok, text, pv["formats"], length=pv["length"], num_prompts=pv["num_prompts"],
                                answer_tokens=pv["answer_tokens"], batch_size=pv["batch_size"], topk=pv["topk"],
                                statistics=statistics)
        plan = plan_of_units(units, calib.similarity(range(len(calib.prompts)), "mean"), shipped.model,
                             rho=shipped.rho, k_min=shipped.k_min, tile=shipped.tile)
        plan.provenance = {"from": Path(a.plan).name, "statistics": statistics, "units": "the shipped plan's",
                           "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)}
        plan.save(out / f"{statistics}.json")
        print(f"{statistics}: {routed_differently(plan, shipped)} reusing heads routed unlike the shipped plan",
              flush=True)


if __name__ == "__main__":
    main()
