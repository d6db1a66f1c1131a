"""What recomputing a request does to its continuation: greedy decoding interrupted after `cut` tokens and resumed
by prefilling the prompt and the tokens generated so far, against the uninterrupted run.

This is what vLLM does to a preempted request (its KV blocks are freed; on resumption, prompt and output so far are
prefilled again) and what a chat does when an earlier answer becomes part of the next prompt. Dense attention
continues as the uninterrupted run does. With Kascade, the recomputed positions are attended as prefill (tile-
pooled selection, or dense in decode-only mode) where the uninterrupted run attended them as decode steps
(per-query selection). So their keys and values in later layers differ, and the continuation can too.

    python benchmarks/recompute_check.py [--model models/kascade-tiny] [--plan plans/kascade-tiny.json] \\
        [--prompts 8] [--steps 40] [--cut 10] [-o benchmarks/results/recompute_check_tiny_cpu]

Random-token prompts of 600-1200 tokens, float32, the reference path on the CPU: prompt by prompt, the position
of the first differing token (or none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("dense", "kascade", "kascade-decode-only")


def greedy(model, ids, steps: int):
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, ids.shape[1]:]


def run(model, plan, mode: str, prompts: int, steps: int, cut: int, seed: int = 0) -> list[int | None]:
    """Per prompt, the index of the first token where the resumed run differs from the uninterrupted one."""
    import torch

    import kascade

    g = torch.Generator().manual_seed(seed)
    firsts = []
    for _ in range(prompts):
        n = int(torch.randint(600, 1200, (1,), generator=g))
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
        if mode != "dense":
            kascade.enable(model, plan, backend="reference", sparse_prefill=(mode == "kascade"))
        try:
            full = greedy(model, ids, steps)
            resumed = greedy(model, torch.cat([ids, full[None, :cut]], 1), steps - cut)
        finally:
            if mode != "dense":
                kascade.disable(model)
        diff = (full[cut:] != resumed).nonzero()
        firsts.append(None if len(diff) == 0 else cut + int(diff[0]))
    return firsts


def main(argv=None) -> int:
    import torch

    from kascade.models import load_model
    from kascade.plan import Plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "kascade-tiny"))
    ap.add_argument("--plan", default=str(ROOT / "plans" / "kascade-tiny.json"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cut", type=int, default=10)
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "recompute_check_tiny_cpu"))
    args = ap.parse_args(argv)
    if not 0 < args.cut < args.steps:
        raise SystemExit(f"--cut: expected 0 < cut < steps ({args.steps}), got {args.cut}")
    model, _ = load_model(args.model, "cpu", "float32")
    plan = Plan.load(args.plan)
    res = {"model": args.model, "plan": args.plan, "prompts": args.prompts, "steps": args.steps, "cut": args.cut,
           "torch": torch.__version__, "device": "cpu", "dtype": "float32", "date": datetime.date.today().isoformat(),
           "first_difference": {m: run(model, plan, m, args.prompts, args.steps, args.cut) for m in MODES}}
    out = Path(args.output)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [f"# Resuming by recompute against the uninterrupted run ({Path(args.model).name}, CPU, {res['date']})", "",
             f"`python benchmarks/recompute_check.py` (method in its docstring): {args.prompts} random-token prompts of "
             f"600-1200 tokens, {args.steps} greedy tokens, interrupted after {args.cut} and resumed by prefilling "
             f"prompt and output; torch {torch.__version__}, float32, reference path.", "",
             "| mode | resumed runs that differ | first differing token per prompt |", "|---|---|---|"]
    for m, firsts in res["first_difference"].items():
        lines.append(f"| {m} | {sum(f is not None for f in firsts)} of {len(firsts)} | "
                     f"{', '.join('-' if f is None else str(f) for f in firsts)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
