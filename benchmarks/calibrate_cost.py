"""What the output-aware calibration costs on a large model: the Llama-3.1-8B shape on the GPU (issue 25 item 4).

Random weights of kascade/configs/llama-3.1-8b-shape.json (bf16), NUM_PROMPTS prompts of LENGTH tokens from
the calibration mixture (kascade.calibrate.retrieval.MIXTURE; tokenizer: SmolLM2's at /tmp/smol when present,
else kascade-tiny's, both of which fit the 8B vocabulary). Measured, in one process:

- the calibration set: the dense pass with the paper's statistics and the dense continuations (seconds, peak
  GPU memory);
- one plan measurement (the divergence of a plan on every prompt, what each search step repeats per candidate):
  the median of `--plans` random 10-equivalent head-granular plans (seconds, peak GPU memory);
- the number of plan measurements the search makes with the given settings (the same greedy search run with
  a stand-in score: the count depends on the settings and the unit count, not on the values).

The whole search does not fit a call of the GPU machine at this size, so its time is written down as
set + measurements x one measurement, named as such (`search_s_extrapolated`).

    python benchmarks/calibrate_cost.py [--length 8192] [--num-prompts 16] [--search-step 5] [--candidates 16] \
        [-o benchmarks/results/calibrate_cost_<device>]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "kascade" / "configs" / "llama-3.1-8b-shape.json"


def search_measurements(num_layers: int, num_kv_heads: int, target: float, shrink: int, candidates) -> int:
    """Plan measurements of greedy_search for these settings (a stand-in score with fixed per-unit harms)."""
    from kascade.calibrate.output_aware import greedy_search

    rng = random.Random(0)
    harm = {(layer, h): rng.random() for layer in range(num_layers) for h in range(num_kv_heads)}
    calls = [0]

    def score(selecting):
        calls[0] += 1
        return sum(harm[u] for u in harm if u[0] != 0 and u not in selecting)

    greedy_search(score, {"num_layers": num_layers, "num_kv_heads": num_kv_heads}, target=target, shrink=shrink,
                  progress=False, candidates=candidates)
    return calls[0]


def random_plan(cfg: dict, target: float, seed: int, sim):
    """A head-granular plan of `target` selecting-layer equivalents with randomly chosen selecting units."""
    from kascade.calibrate.output_aware import plan_of_units

    L, H = cfg["num_layers"], cfg["num_kv_heads"]
    units = [(layer, h) for layer in range(1, L) for h in range(H)]
    keep = set(random.Random(seed).sample(units, int(round((target - 1.0) * H))))
    return plan_of_units(keep, sim, cfg, rho=0.1, k_min=128, tile=32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--target", type=float, default=10.0)
    ap.add_argument("--search-step", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--plans", type=int, default=3, help="plan measurements timed (the median is used)")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from kascade.calibrate.output_aware import calibration_set
    from kascade.models import random_model
    from kascade.plan import model_fingerprint

    if not torch.cuda.is_available():
        raise SystemExit("calibrate_cost: needs a CUDA GPU (the 8B shape in bf16)")
    tok_dir = Path(os.environ.get("SMOL_DIR", "/tmp/smol"))
    tok = AutoTokenizer.from_pretrained(tok_dir if tok_dir.is_dir() else ROOT / "models" / "kascade-tiny",
                                        local_files_only=True)
    model = random_model(CONFIG, dtype=torch.bfloat16, device="cuda")
    cfg = model_fingerprint(model.config)
    text = (ROOT / "data" / "heldout.txt").read_text(encoding="utf-8", errors="replace")
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    calib = calibration_set(model, tok, text, length=args.length, num_prompts=args.num_prompts,
                            answer_tokens=args.answer_tokens, batch_size=args.batch_size, progress=False)
    torch.cuda.synchronize()
    set_s, set_peak = time.perf_counter() - t, torch.cuda.max_memory_allocated()
    sim = calib.similarity(range(len(calib.prompts)))
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.plans):
        plan = random_plan(cfg, args.target, i, sim)
        t = time.perf_counter()
        calib.per_prompt(plan)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    plan_s, plan_peak = statistics.median(times), torch.cuda.max_memory_allocated()
    count = search_measurements(cfg["num_layers"], cfg["num_kv_heads"], args.target, args.search_step, args.candidates)
    out = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "triton": __import__("triton").__version__, "model": CONFIG.name, "dtype": "bfloat16",
        "prompts": len(calib.prompts), "length": args.length, "formats": sorted(set(calib.kinds)),
        "answer_tokens": args.answer_tokens, "target": args.target, "search_step": args.search_step,
        "candidates": args.candidates, "weights_gib": weights / 2**30,
        "calibration_set_s": set_s, "calibration_set_peak_gib": set_peak / 2**30,
        "plan_measurement_s": plan_s, "plan_measurement_times_s": times, "plan_measurement_peak_gib": plan_peak / 2**30,
        "search_measurements": count, "search_s_extrapolated": set_s + count * plan_s,
    }
    from report_json import short_device_name  # benchmarks/report_json.py (this script's folder is on the path)

    stem = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / (
        "calibrate_cost_" + short_device_name(out["device"]))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    lines = [f"# Output-aware calibration on the Llama-3.1-8B shape: {out['device']} ({out['date']})", "",
             f"Random weights (bf16), {out['prompts']} prompts of {args.length} tokens ({', '.join(out['formats'])}), "
             f"{args.answer_tokens} answer tokens, target {args.target:g} selecting-layer equivalents, search step "
             f"{args.search_step}, {args.candidates} candidates; torch {out['torch']}, transformers "
             f"{out['transformers']}, triton {out['triton']}. `python benchmarks/calibrate_cost.py`.", "",
             "| part | seconds | peak GPU memory (GiB) |", "|---|---|---|",
             f"| weights | - | {out['weights_gib']:.1f} |",
             f"| calibration set (dense statistics and continuations) | {set_s:.1f} | {out['calibration_set_peak_gib']:.1f} |",
             f"| one plan measurement (median of {args.plans}) | {plan_s:.2f} | {out['plan_measurement_peak_gib']:.1f} |",
             f"| search: {count} plan measurements (extrapolated: set + count x one) | {out['search_s_extrapolated']:.0f} | - |"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
