"""The accuracy harness's tasks through vLLM on the GPU: Kascade in vLLM against vLLM dense (issue 29 item 4).

SmolLM2-135M-Instruct (bf16, at /tmp/smol: benchmarks/smollm2_gpu.sh copy/prepare first) with no plan (vLLM's
own FlashAttention) and with the shipped head-granular plan (plans/smollm2-135m-instruct.json, the Kascade
backend of kascade.integrations.vllm_gpu), CUDA graphs on. Tasks niah_single, niah_multikey and doc_qa_chat
at 4096 and 8064 tokens, 20 samples each (evaluation seeds 0..19, the prompts `kascade eval` builds), greedy,
as many new tokens as `kascade eval` gives each task, scored as `kascade eval` scores them.

Each plan is one cell (its own process; `run` executes the missing ones, resumably):

    python benchmarks/vllm_eval.py run --work /tmp/vllm_eval [--budget-s 540]
    python benchmarks/vllm_eval.py report --work DIR [-o benchmarks/results/vllm_eval_<device>]

`run --variants default,no-prefix-cache,chunk512,eager,decode-only` adds cells with other engine settings (VARIANTS;
cells smol-PLAN-VARIANT; decode-only: the plugin's default mode, dense prefill and sparse decode, where every other
cell runs sparse prefill as the paper does): the first table keeps the default cells, the second gives every cell's
difference from vLLM dense, the paired comparison lists every cell. `run --plans` picks the plans (PLANS: the shipped
plan, `prose` the prose-calibrated plan the transformers rows of the accuracy table were measured with, dense);
`run --samples 60` makes cells of 60 samples (named -n60), each compared with the dense cell of as many, so that
one sample weighs 1.7 points of a cell instead of 5.

`report` (any machine) writes the per-task scores of both plans and their difference in points, and, where
--transformers names the accuracy table's rows (default benchmarks/results/eval_smollm2_results.jsonl: the same
tasks, lengths and seeds through transformers with the Triton kernels, rho 0.1), the paired comparison with
them: per plan, the transformers score of the same samples and how many answers differ (vLLM dense against
transformers dense, vLLM with the prose plan against transformers' `kascade` strategy, which ran that plan; the
shipped plan has no transformers rows there). Dense's count is the rounding floor of two engines; a larger count
for Kascade is what the vLLM path changes beyond it.
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
PLAN_FILES = {"dense": None, "shipped": ROOT / "plans" / "smollm2-135m-instruct.json",
              "prose": ROOT / "plans" / "smollm2-135m-instruct-prose.json"}
TASKS = ("niah_single", "niah_multikey", "doc_qa_chat")
LENGTHS = (4096, 8064)
SAMPLES = 20
NEW_TOKENS_CAP = 64
PLANS = tuple(PLAN_FILES)
# --variant: engine settings beside vLLM's defaults, to tell where a difference from transformers comes from
VARIANTS = {
    "default": {},
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "chunk512": dict(enable_prefix_caching=False, max_num_batched_tokens=512, max_num_seqs=4),
    "eager": dict(enforce_eager=True),
    "decode-only": {},  # vLLM's defaults, with Kascade's sparse prefill off (SPARSE_PREFILL_OFF)
}
SPARSE_PREFILL_OFF = ("decode-only",)
REPEAT_ENV = "KASCADE_EVAL_REPEAT"  # 1: generate everything a second time and record its time (generate_again_s)
TARGET_POINTS = 2.0  # Kascade within this many points of vLLM dense (issue 29)


def samples(tokenizer, tasks=TASKS, lengths=LENGTHS, count=SAMPLES) -> list:
    from kascade.eval.tasks import make_task

    return [make_task(t, n, tokenizer, seed=s) for t in tasks for n in lengths for s in range(count)]


def cell_name(plan: str, variant: str, samples: int = SAMPLES) -> str:
    """smol-PLAN[-VARIANT][-nSAMPLES]: the variant unless default, the sample count unless SAMPLES."""
    return (f"smol-{plan}" + ("" if variant == "default" else f"-{variant}")
            + ("" if samples == SAMPLES else f"-n{samples}"))


def engine_config(plan: str, variant: str) -> dict:
    """vLLM's additional_config of a cell: the plan's (sparse prefill on), or decode-only mode for SPARSE_PREFILL_OFF."""
    config = VC.kascade_config(PLAN_FILES[plan])
    if config and variant in SPARSE_PREFILL_OFF:
        config["kascade_sparse_prefill"] = False
    return config


def run_engine(args) -> dict:
    VC.engine_env()
    if args.plan != "dense":
        os.environ["KASCADE_VLLM_CHECK_LENS"] = "1"
    VC.register_plugin()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from kascade.eval.tasks import max_new_tokens, score

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    todo = samples(tok, count=args.samples)
    ids = [tok(s.prompt).input_ids for s in todo]
    bad = [(s.task, s.length, len(i)) for s, i in zip(todo, ids) if len(i) != s.length]
    if bad:
        raise RuntimeError(f"prompts of the wrong length (task, length, tokens): {bad[:3]}")
    t0 = time.perf_counter()
    llm = LLM(str(MODEL_DIR), dtype="bfloat16", max_model_len=max(LENGTHS) + NEW_TOKENS_CAP + 8, seed=0,
              gpu_memory_utilization=0.5, additional_config=engine_config(args.plan, args.variant),
              **VARIANTS[args.variant])
    start = time.perf_counter() - t0
    at_start = VC.triton_variants()  # compiled by vLLM's warm-up and graph capture; the rest compile while generating
    params = [SamplingParams(max_tokens=max_new_tokens(s, tok, NEW_TOKENS_CAP), temperature=0.0) for s in todo]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    warm = None
    if os.environ.get(REPEAT_ENV) == "1":  # the same requests again: no compilation left, prefix cache off or warm
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        warm = time.perf_counter() - t0
    rows = []
    for s, o in zip(todo, outs):
        gen = list(o.outputs[0].token_ids)
        text = tok.decode(gen, skip_special_tokens=True)
        rows.append(dict(task=s.task, length=s.length, seed=s.seed, prediction=text, answers=s.answers,
                         score=score(s, text, gen, tok)))
    return dict(plan=args.plan, variant=args.variant, samples=args.samples, kascade_layers=VC.kascade_layers(),
                triton_variants=VC.triton_variants(), triton_variants_at_start=at_start,
                triton_differences=VC.triton_variant_differences(), engine_start_s=start, generate_s=seconds, generate_again_s=warm,
                rows=rows, **VC.device_info())


def summarize(cells: dict) -> dict:
    """{plan: {task: {length: mean score in points}}} and the differences Kascade - dense."""
    by = {}
    for cell in cells.values():
        if cell.get("variant", "default") != "default" or cell.get("samples", SAMPLES) != SAMPLES:
            continue
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


# plan -> (strategy, budget) of its rows in --transformers; the table's `kascade` rows ran the prose plan
def cell_differences(cells: dict) -> dict:
    """{Kascade cell: {"against": dense cell, "points": {task: {length: difference}}, "worst": min}} for every cell
    with a plan, against the dense cell of the same engine settings (the default one for decode-only, whose
    engine is vLLM's default)."""
    def points(cell):
        by = {}
        for r in cell["rows"]:
            by.setdefault(r["task"], {}).setdefault(str(r["length"]), []).append(r["score"])
        return {t: {n: 100.0 * sum(v) / len(v) for n, v in lens.items()} for t, lens in by.items()}

    def count(cell):
        return cell.get("samples", SAMPLES)

    dense = {(c.get("variant", "default"), count(c)): name for name, c in cells.items() if c["plan"] == "dense"}
    out = {}
    for name, cell in sorted(cells.items()):
        variant = cell.get("variant", "default")
        against = dense.get(("default" if variant in SPARSE_PREFILL_OFF else variant, count(cell)))
        if cell["plan"] == "dense" or against is None:
            continue
        mine, base = points(cell), points(cells[against])
        diff = {t: {n: v - base[t][n] for n, v in lens.items() if n in base.get(t, {})} for t, lens in mine.items()}
        worst = min((v for lens in diff.values() for v in lens.values()), default=None)
        ref = {(r["task"], r["length"], r["seed"]): r["score"] for r in cells[against]["rows"]}
        each = [100.0 * (r["score"] - ref[k]) for r in cell["rows"] if (k := (r["task"], r["length"], r["seed"])) in ref]
        mean = sum(each) / len(each) if each else None
        se = (sum((x - mean) ** 2 for x in each) / (len(each) - 1) / len(each)) ** 0.5 if len(each) > 1 else None
        out[name] = dict(plan=cell["plan"], variant=variant, against=against, points=diff, worst=worst,
                         holds=None if worst is None else worst >= -TARGET_POINTS, samples=len(each),
                         mean_difference=mean, standard_error=se)
    return out


TRANSFORMERS_STRATEGY = {"dense": ("dense", None), "prose": ("kascade", 0.1)}


def paired(cells: dict, rows_path: Path) -> dict:
    """{cell name: {plan, variant, samples, vllm_points, transformers_points, answers_differ}} over the samples
    that both the vLLM cells and the transformers rows (a results.jsonl of `kascade eval`) hold; an answer differs when the two
    predictions' first 12 non-blank characters do (the scored part of every task's answer)."""
    import json

    if not rows_path.is_file():
        return {}
    ref = {}
    for line in rows_path.read_text().splitlines():
        r = json.loads(line)
        ref[(r["task"], r["length"], r["strategy"], r["budget"], r["seed"])] = r
    out = {}
    for name, cell in cells.items():
        if cell["plan"] not in TRANSFORMERS_STRATEGY:
            continue
        strategy, budget = TRANSFORMERS_STRATEGY[cell["plan"]]
        if cell.get("variant") in SPARSE_PREFILL_OFF and strategy != "dense":
            strategy += "+dense-prefill"  # `kascade eval`'s name for a strategy in decode-only mode
        pairs = [(r, ref.get((r["task"], r["length"], strategy, budget, r["seed"]))) for r in cell["rows"]]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if not pairs:
            continue
        key = lambda text: text.strip()[:12]  # noqa: E731
        out[name] = dict(plan=cell["plan"], variant=cell.get("variant", "default"), samples=len(pairs), vllm_points=100.0 * sum(a["score"] for a, _ in pairs) / len(pairs),
                                 transformers_points=100.0 * sum(b["score"] for _, b in pairs) / len(pairs),
                                 answers_differ=sum(key(a["prediction"]) != key(b["prediction"]) for a, b in pairs))
    return out


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
           "paired_with_transformers": paired(cells, Path(args.transformers)),
           "every_cell_minus_dense": cell_differences(cells),
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
    every = out["every_cell_minus_dense"]
    if len(every) > 1:
        lines += ["", "Every Kascade cell against vLLM dense with the same engine settings (points; decode-only: dense "
                      "prefill, sparse decode, the plugin's default mode; the other cells run sparse prefill):", "",
                  "| cell | " + " | ".join(f"{t} {n}" for t in TASKS for n in LENGTHS) + " | worst | within "
                  f"{TARGET_POINTS:g} | all samples (paired, ± s.e.) |", "|---|" + "---|" * (len(TASKS) * len(LENGTHS) + 3)]
        for name, c in every.items():
            vals = [c["points"].get(t, {}).get(str(n)) for t in TASKS for n in LENGTHS]
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:+.1f}" for v in vals)
                         + f" | {'-' if c['worst'] is None else format(c['worst'], '+.1f')} | "
                         f"{'-' if c['holds'] is None else ('yes' if c['holds'] else 'no')} | "
                         + ("-" if c["mean_difference"] is None else
                            f"{c['mean_difference']:+.1f} ± {c['standard_error'] or 0:.1f} ({c['samples']})") + " |")
        lines += ["", f"One sample is {100 / SAMPLES:g} points of a cell of {SAMPLES} samples (cells named -nCOUNT "
                      "hold COUNT); the last column pairs every sample with the dense cell's answer to it."]
    if out["paired_with_transformers"]:
        lines += ["", f"Paired with transformers on the same samples ({Path(args.transformers).name}: Triton kernels, "
                      "rho 0.1):", "", "| plan | samples | vLLM (points) | transformers (points) | answers that differ |",
                  "|---|---|---|---|---|"]
        for p in out["paired_with_transformers"].values():
            name = p["plan"] + ("" if p["variant"] == "default" else f" ({p['variant']}: {VARIANTS[p['variant']]})")
            lines.append(f"| {name} | {p['samples']} | {p['vllm_points']:.1f} | {p['transformers_points']:.1f} | "
                         f"{p['answers_differ']} |")
    lines += ["", "Engine time per cell (start: load, compile, graph capture; generate: all samples at once) and the "
                  "Triton kernel variants Kascade compiled in it (a variant compiles the first time it is met):", ""]
    for name, c in sorted(cells.items()):
        variants = c.get("triton_variants")
        if "generate_s" not in c:
            continue
        again = c.get("generate_again_s")
        lines.append(f"- {name}: start {c.get('engine_start_s', float('nan')):.0f} s, generate {c['generate_s']:.1f} s"
                     + ("" if again is None else f" (again in the same engine: {again:.1f} s)")
                     + ("" if variants is None else f", {sum(variants.values())} Triton variants of "
                        f"{len(variants)} kernels")
                     + ("" if c.get("triton_variants_at_start") is None else
                        f" ({sum(c['triton_variants_at_start'].values())} of them compiled before generating)"))
    stem = Path(args.o) if args.o else ROOT / "benchmarks" / "results" / f"vllm_eval_{first['device_short']}"
    if every:
        lines += ["", f"![every cell against vLLM dense]({Path(stem).with_suffix('.png').name})"]
    VC.write_report(stem, out, lines)
    if every:
        plot_differences(every, Path(stem).with_suffix(".png"), out["device"])


def plot_differences(every: dict, path: Path, device: str) -> None:
    """Each Kascade cell's paired mean difference from vLLM dense (points, ± one standard error), the target band
    shaded: one bar per cell, decode-only cells in their own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, c in every.items() if c["mean_difference"] is not None]
    means = [every[n]["mean_difference"] for n in names]
    errs = [every[n]["standard_error"] or 0.0 for n in names]
    colors = ["tab:green" if every[n]["variant"] in SPARSE_PREFILL_OFF else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.axvspan(-TARGET_POINTS, TARGET_POINTS, color="0.9", label=f"within {TARGET_POINTS:g} points")
    ax.barh(names, means, xerr=errs, color=colors, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Kascade - vLLM dense, points (paired over each cell's samples, ± s.e.)")
    ax.set_title(f"Eval tasks through vLLM, SmolLM2 ({device})\ngreen: decode-only, blue: sparse prefill", fontsize=9)
    ax.invert_yaxis()
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (benchmarks/vllm_eval.py) for the method.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing cells within a time budget")
    r.add_argument("--work", default="/tmp/vllm_eval")
    r.add_argument("--variants", default="default",
                   help=f"comma-separated engine settings, from {', '.join(VARIANTS)} (default %(default)s)")
    r.add_argument("--samples", type=int, default=SAMPLES,
                   help="samples per task and length, evaluation seeds 0.. (default %(default)s; other counts make "
                        "cells named ...-nCOUNT, compared with the dense cell of the same count)")
    r.add_argument("--plans", default="shipped,dense",
                   help=f"comma-separated plans, from {', '.join(PLANS)}, run in that order (default %(default)s)")
    VC.add_budget_arguments(r, min_left_s=90)
    e = sub.add_parser("engine", help="one plan's generations and scores")
    e.add_argument("--plan", choices=PLANS, required=True)
    e.add_argument("--variant", choices=list(VARIANTS), default="default")
    e.add_argument("--samples", type=int, default=SAMPLES)
    e.add_argument("--out", required=True)
    p = sub.add_parser("report", help="scores into benchmarks/results/vllm_eval_<device>.{json,md}")
    p.add_argument("--work", required=True)
    p.add_argument("-o", default=None)
    p.add_argument("--transformers", default=str(ROOT / "benchmarks" / "results" / "eval_smollm2_results.jsonl"),
                   help="transformers' rows of the same samples, for the paired comparison (default %(default)s)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        if not MODEL_DIR.is_dir():
            raise SystemExit(f"SMOL_DIR: {MODEL_DIR} is missing (benchmarks/smollm2_gpu.sh copy/prepare first)")
        variants = args.variants.split(",")
        plans = args.plans.split(",")
        if sorted(set(plans) - set(PLANS)):
            raise SystemExit(f"--plans: expected names from {list(PLANS)}, got {sorted(set(plans) - set(PLANS))}")
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"--variants: expected names from {sorted(VARIANTS)}, got {unknown}")
        more = [] if args.samples == SAMPLES else ["--samples", str(args.samples)]
        cells = [(cell_name(plan, v, args.samples), ["engine", "--plan", plan, "--variant", v, *more])
                 for v in variants for plan in plans]
        missing = VC.run_cells(cells, Path(args.work), args.budget_s, args.min_left_s, 400, Path(__file__),
                               Path(args.copy_to) if args.copy_to else None)
        print(f"[run] missing cells: {missing or 'none'}")
    elif args.cmd == "engine":
        VC.write_json(args.out, run_engine(args))
    else:
        report(args)


if __name__ == "__main__":
    main()
