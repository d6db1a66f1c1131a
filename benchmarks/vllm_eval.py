"""The accuracy harness's tasks through vLLM on the GPU: Kascade in vLLM against vLLM dense (issue 29 item 4).

SmolLM2-135M-Instruct (bf16, at /tmp/smol: benchmarks/smollm2_gpu.sh copy/prepare first) with no plan (vLLM's
own FlashAttention) and with the shipped head-granular plan (plans/smollm2-135m-instruct.json, the Kascade
backend of kascade.integrations.vllm_gpu), CUDA graphs on. Tasks niah_single, niah_multikey and doc_qa_chat
at 4096 and 8064 tokens, 20 samples each (evaluation seeds 0..19, the prompts `kascade eval` builds), greedy,
as many new tokens as `kascade eval` gives each task, scored as `kascade eval` scores them.

Each plan is one cell (its own process; `run` executes the missing ones, resumably):

    python benchmarks/vllm_eval.py run --work /tmp/vllm_eval [--budget-s 540]
    python benchmarks/vllm_eval.py report --work DIR [-o benchmarks/results/vllm_eval_<device>]

`report` (any machine) writes the per-task scores of both plans and their difference in points.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_common as VC  # noqa: E402

ROOT = VC.ROOT
MODEL_DIR = Path(os.environ.get("SMOL_DIR", "/tmp/smol"))
PLAN = ROOT / "plans" / "smollm2-135m-instruct.json"
TASKS = ("niah_single", "niah_multikey", "doc_qa_chat")
LENGTHS = (4096, 8064)
SAMPLES = 20
NEW_TOKENS_CAP = 64
PLANS = ("dense", "shipped")
TARGET_POINTS = 2.0  # Kascade within this many points of vLLM dense (issue 29)


def samples(tokenizer, tasks=TASKS, lengths=LENGTHS, count=SAMPLES) -> list:
    from kascade.eval.tasks import make_task

    return [make_task(t, n, tokenizer, seed=s) for t in tasks for n in lengths for s in range(count)]


def run_engine(args) -> dict:
    VC.engine_env()
    if args.plan != "dense":
        os.environ["KASCADE_VLLM_CHECK_LENS"] = "1"
    VC.register_plugin()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from kascade.eval.tasks import max_new_tokens, score

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    todo = samples(tok)
    ids = [tok(s.prompt).input_ids for s in todo]
    bad = [(s.task, s.length, len(i)) for s, i in zip(todo, ids) if len(i) != s.length]
    if bad:
        raise RuntimeError(f"prompts of the wrong length (task, length, tokens): {bad[:3]}")
    t0 = time.perf_counter()
    llm = LLM(str(MODEL_DIR), dtype="bfloat16", max_model_len=max(LENGTHS) + NEW_TOKENS_CAP + 8, seed=0,
              gpu_memory_utilization=0.5, additional_config=VC.kascade_config(PLAN if args.plan != "dense" else None))
    start = time.perf_counter() - t0
    params = [SamplingParams(max_tokens=max_new_tokens(s, tok, NEW_TOKENS_CAP), temperature=0.0) for s in todo]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    rows = []
    for s, o in zip(todo, outs):
        gen = list(o.outputs[0].token_ids)
        text = tok.decode(gen, skip_special_tokens=True)
        rows.append(dict(task=s.task, length=s.length, seed=s.seed, prediction=text, answers=s.answers,
                         score=score(s, text, gen, tok)))
    return dict(plan=args.plan, kascade_layers=VC.kascade_layers(), engine_start_s=start, generate_s=seconds,
                rows=rows, **VC.device_info())


def summarize(cells: dict) -> dict:
    """{plan: {task: {length: mean score in points}}} and the differences Kascade - dense."""
    by = {}
    for cell in cells.values():
        table = by.setdefault(cell["plan"], {})
        for r in cell["rows"]:
            table.setdefault(r["task"], {}).setdefault(str(r["length"]), []).append(r["score"])
    scores = {p: {t: {n: 100.0 * sum(v) / len(v) for n, v in lens.items()} for t, lens in tab.items()}
              for p, tab in by.items()}
    diff = {}
    if "dense" in scores and "shipped" in scores:
        for t, lens in scores["dense"].items():
            for n, d in lens.items():
                if n in scores["shipped"].get(t, {}):
                    diff.setdefault(t, {})[n] = scores["shipped"][t][n] - d
    return {"scores": scores, "kascade_minus_dense": diff}


def report(args) -> None:
    cells = VC.load_cells(Path(args.work))
    if not cells:
        raise SystemExit(f"--work: no cell files in {args.work}")
    first = next(iter(cells.values()))
    s = summarize(cells)
    worst = min((v for lens in s["kascade_minus_dense"].values() for v in lens.values()), default=None)
    out = {"device": first["device"], "date": max(c["date"] for c in cells.values()),
           "versions": {k: first.get(k) for k in ("vllm", "torch", "triton", "transformers")}, "samples": SAMPLES,
           "target_points": TARGET_POINTS, "worst_difference": worst,
           "target_holds": None if worst is None else worst >= -TARGET_POINTS, **s,
           "cells": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in cells.items()},
           "rows": {k: v["rows"] for k, v in cells.items()}}
    lines = [f"# Eval tasks through vLLM on {out['device']} ({out['date']})", "",
             f"vLLM {out['versions']['vllm']}, SmolLM2-135M-Instruct bf16, CUDA graphs, greedy, {SAMPLES} samples "
             "per cell; `python benchmarks/vllm_eval.py` (method in its docstring). Scores in points.", "",
             "| task | length | vLLM dense | vLLM Kascade (shipped plan) | difference |", "|---|---|---|---|---|"]
    for t in TASKS:
        for n in map(str, LENGTHS):
            d = s["scores"].get("dense", {}).get(t, {}).get(n)
            k = s["scores"].get("shipped", {}).get(t, {}).get(n)
            fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
            lines.append(f"| {t} | {n} | {fmt(d)} | {fmt(k)} | {fmt(None if d is None or k is None else k - d)} |")
    if worst is not None:
        lines += ["", f"Target: Kascade within {TARGET_POINTS:g} points of vLLM dense in every cell: "
                      f"{'holds' if out['target_holds'] else 'does not hold'} (worst {worst:+.1f})."]
    stem = Path(args.o) if args.o else ROOT / "benchmarks" / "results" / f"vllm_eval_{first['device_short']}"
    VC.write_report(stem, out, lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (benchmarks/vllm_eval.py) for the method.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing cells within a time budget")
    r.add_argument("--work", default="/tmp/vllm_eval")
    VC.add_budget_arguments(r, min_left_s=90)
    e = sub.add_parser("engine", help="one plan's generations and scores")
    e.add_argument("--plan", choices=PLANS, required=True)
    e.add_argument("--out", required=True)
    p = sub.add_parser("report", help="scores into benchmarks/results/vllm_eval_<device>.{json,md}")
    p.add_argument("--work", required=True)
    p.add_argument("-o", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        if not MODEL_DIR.is_dir():
            raise SystemExit(f"SMOL_DIR: {MODEL_DIR} is missing (benchmarks/smollm2_gpu.sh copy/prepare first)")
        cells = [(f"smol-{plan}", ["engine", "--plan", plan]) for plan in ("shipped", "dense")]
        missing = VC.run_cells(cells, Path(args.work), args.budget_s, args.min_left_s, 400, Path(__file__),
                               Path(args.copy_to) if args.copy_to else None)
        print(f"[run] missing cells: {missing or 'none'}")
    elif args.cmd == "engine":
        VC.write_json(args.out, run_engine(args))
    else:
        report(args)


if __name__ == "__main__":
    main()
