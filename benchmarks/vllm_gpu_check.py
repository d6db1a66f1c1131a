"""Correctness of Kascade in vLLM 0.26.0 on the GPU (the FlashAttention backend of kascade.integrations.vllm_gpu).

Models: models/kascade-tiny (shipped with the tree; plans/kascade-tiny.json) and, when /tmp/smol holds it
(benchmarks/smollm2_gpu.sh's `prepare` converts it there), SmolLM2-135M-Instruct with
plans/smollm2-135m-instruct.json; both bf16. Prompts: 20 held-out passages (data/heldout.txt, different
offsets) of increasing lengths (kascade-tiny 200-6000 tokens, SmolLM2 1000-6000), 24 greedy new tokens each.

Cells (each its own process; `run` executes the missing ones within a time budget, resumably):
- vLLM engines: plan `dense` (no plan: vLLM's own FlashAttention), `full` (the shipped plan with rho = 1:
  every key selected), `shipped` (the shipped head-granular plan), each with CUDA graphs (vLLM's default:
  torch.compile, FULL_AND_PIECEWISE) and with enforce_eager. The scheduler is pushed: at most 4 requests at
  once and 512 tokens per step, so prompts are prefilled in chunks beside other requests' decode steps
  (mixed steps run piecewise, pure decode steps in full graphs). Kascade engines run with
  KASCADE_VLLM_CHECK_LENS=1 (the host lengths the backend uses are compared with the device's every step).
- transformers references on the same GPU: dense (sdpa) and `kascade.enable(model, plan)` (Triton kernels),
  each prompt alone, greedy.
- last, selection from an FP8 copy of the keys (kascade.fp8keys): vLLM engines with the shipped plan and
  `kascade_select_keys: "fp8"` (graphs and eager; the copy written beside vLLM's cache writes), and
  `kascade.enable(model, plan, select_keys="fp8")` on transformers.
`report` compares (any machine): rho = 1 against vLLM dense (the same tokens expected, up to bf16 rounding of
a different summation order); vLLM Kascade against kascade.enable on transformers, next to vLLM dense against
transformers dense (how closely two dense implementations agree: the yardstick, issue 29 item 4); graphs
against eager. Agreement: prompts with identical continuations, and the mean share of tokens before the
first difference. Writes benchmarks/results/vllm_check_<device>.{json,md}.

    python benchmarks/vllm_gpu_check.py run --work /tmp/vllm_check [--models tiny,smol] [--budget-s 540]
    python benchmarks/vllm_gpu_check.py report --work DIR [-o STEM]
GPU only but `report` and --help.
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
MODELS = {
    "tiny": dict(dir=ROOT / "models" / "kascade-tiny", plan=ROOT / "plans" / "kascade-tiny.json", lengths=(200, 6000)),
    "smol": dict(dir=Path(os.environ.get("SMOL_DIR", "/tmp/smol")), plan=ROOT / "plans" / "smollm2-135m-instruct.json",
                 lengths=(1000, 6000)),
}
PLANS = ("dense", "full", "shipped", "fp8")  # fp8: the shipped plan selecting from an FP8 copy of the keys
NUM_PROMPTS, NEW_TOKENS = 20, 24
ENGINE = dict(dtype="bfloat16", max_model_len=6144, max_num_seqs=4, max_num_batched_tokens=512, seed=0,
              gpu_memory_utilization=0.5)


def prompts(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    m = MODELS[model]
    tok = AutoTokenizer.from_pretrained(m["dir"], local_files_only=True)
    ids = tok((ROOT / "data" / "heldout.txt").read_text()[:400_000])["input_ids"]
    lo, hi = m["lengths"]
    out = []
    for i in range(NUM_PROMPTS):
        n = lo + (hi - lo) * i // (NUM_PROMPTS - 1)
        start = (i * 3001) % (len(ids) - n)
        out.append(ids[start : start + n])
    return out


def plan_path(model: str, plan: str, work: Path) -> Path | None:
    if plan == "dense":
        return None
    src = MODELS[model]["plan"]
    if plan in ("shipped", "fp8"):
        return src
    from kascade.plan import Plan

    p = Plan.load(src)
    p.rho = 1.0
    path = work / "inputs" / f"plan-{model}-full.json"  # beside the cells' files, not among them
    path.parent.mkdir(parents=True, exist_ok=True)
    p.save(path)
    return path


def run_engine(args) -> dict:
    VC.engine_env()
    plan = plan_path(args.model, args.plan, Path(args.work))
    if plan is not None:
        os.environ["KASCADE_VLLM_CHECK_LENS"] = "1"
    VC.register_plugin()
    from vllm import LLM, SamplingParams

    ps = prompts(args.model)
    t0 = time.perf_counter()
    extra = VC.kascade_config(plan)
    if args.plan == "fp8":
        extra["kascade_select_keys"] = "fp8"
    llm = LLM(str(MODELS[args.model]["dir"]), enforce_eager=args.mode == "eager", additional_config=extra, **ENGINE)
    start = time.perf_counter() - t0
    layers = VC.kascade_layers()
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
    return dict(kind="vllm", model=args.model, plan=args.plan, mode=args.mode, kascade_layers=layers,
                triton_variants=VC.triton_variants(), triton_differences=VC.triton_variant_differences(),
                engine_start_s=start, generate_s=time.perf_counter() - t0, lengths=[len(p) for p in ps],
                tokens=[list(o.outputs[0].token_ids) for o in outs], **VC.device_info())


def run_reference(args) -> dict:
    import torch

    import kascade
    from kascade.eval.generation import greedy
    from kascade.models import load_model

    model, _ = load_model(MODELS[args.model]["dir"], device="cuda", dtype="bfloat16")
    ps = prompts(args.model)
    t0 = time.perf_counter()
    if args.plan == "dense":
        toks = [greedy(model, torch.tensor([p]), NEW_TOKENS) for p in ps]
    else:
        options = {"select_keys": "fp8"} if args.plan == "fp8" else {}
        with kascade.enable(model, kascade.Plan.load(MODELS[args.model]["plan"]), sparse_prefill=True, **options):
            toks = [greedy(model, torch.tensor([p]), NEW_TOKENS) for p in ps]
    return dict(kind="transformers", model=args.model, plan=args.plan, generate_s=time.perf_counter() - t0,
                lengths=[len(p) for p in ps], tokens=toks, **VC.device_info())


def agreement(a: list, b: list) -> dict:
    """Prompts with identical continuations; mean share of tokens before the first difference."""
    firsts = [next((j for j, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t))) for s, t in zip(a, b)]
    return {"identical": sum(s == t for s, t in zip(a, b)), "of": len(a),
            "prefix_share": sum(f / max(1, len(s)) for f, s in zip(firsts, a)) / max(1, len(a)),
            "first_difference": firsts}


def cell_list(args) -> list:
    """Every model's exact-selection cells first, then every model's FP8-selection cells."""
    models = []
    for model in args.models.split(","):
        if not MODELS[model]["dir"].is_dir():
            print(f"[check] {model}: {MODELS[model]['dir']} is missing; skipped", flush=True)
            continue
        models.append(model)
    cells = []
    for model in models:
        for mode in args.modes.split(","):  # the shipped plan with graphs first: it exercises the most
            for plan in ("shipped", "dense", "full"):
                cells.append((f"{model}-vllm-{plan}-{mode}", ["engine", "--model", model, "--plan", plan, "--mode",
                                                              mode, "--work", args.work]))
        for plan in ("dense", "shipped"):
            cells.append((f"{model}-transformers-{plan}", ["reference", "--model", model, "--plan", plan,
                                                           "--work", args.work]))
    for model in models:  # selection from an FP8 copy of the keys
        for mode in args.modes.split(","):
            cells.append((f"{model}-vllm-fp8-{mode}", ["engine", "--model", model, "--plan", "fp8", "--mode", mode,
                                                       "--work", args.work]))
        cells.append((f"{model}-transformers-fp8", ["reference", "--model", model, "--plan", "fp8",
                                                    "--work", args.work]))
    return cells


def report(args) -> None:
    cells = VC.load_cells(Path(args.work))
    if not cells:
        raise SystemExit(f"--work: no cell files in {args.work}")
    first = next(iter(cells.values()))
    out = {"device": first["device"], "date": max(c["date"] for c in cells.values()),
           "versions": {k: first.get(k) for k in ("vllm", "torch", "triton", "transformers")}, "models": {}}
    lines = [f"# Kascade in vLLM: correctness on {out['device']} ({out['date']})", "",
             f"vLLM {out['versions']['vllm']}, bf16, {NUM_PROMPTS} held-out prompts, {NEW_TOKENS} greedy tokens; "
             "`python benchmarks/vllm_gpu_check.py` (method in its docstring).", "",
             "| model | comparison | mode | identical | tokens before the first difference |", "|---|---|---|---|---|"]
    for model in MODELS:
        c = {k[len(model) + 1:]: v for k, v in cells.items() if k.startswith(model + "-")}
        if not c:
            continue
        res = {}
        for mode in ("graph", "eager"):
            pairs = {"full_vs_dense": ("vllm-full-" + mode, "vllm-dense-" + mode),
                     "kascade_vs_transformers_kascade": ("vllm-shipped-" + mode, "transformers-shipped"),
                     "dense_vs_transformers_dense": ("vllm-dense-" + mode, "transformers-dense"),
                     "kascade_vs_vllm_dense": ("vllm-shipped-" + mode, "vllm-dense-" + mode),
                     "fp8_vs_transformers_fp8": ("vllm-fp8-" + mode, "transformers-fp8"),
                     "fp8_vs_exact": ("vllm-fp8-" + mode, "vllm-shipped-" + mode)}
            for name, (x, y) in pairs.items():
                if x in c and y in c:
                    res[f"{name}_{mode}"] = agreement(c[x]["tokens"], c[y]["tokens"])
        for plan in PLANS:
            x, y = c.get(f"vllm-{plan}-graph"), c.get(f"vllm-{plan}-eager")
            if x and y:
                res[f"graph_vs_eager_{plan}"] = agreement(x["tokens"], y["tokens"])
        res["kascade_layers"] = {k: v.get("kascade_layers") for k, v in c.items() if v["kind"] == "vllm"}
        out["models"][model] = res
        for name, r in res.items():
            if name == "kascade_layers":
                continue
            mode = name.rsplit("_", 1)[-1] if name.endswith(("graph", "eager")) else ""
            lines.append(f"| {model} | {name.removesuffix('_' + mode) if mode else name} | {mode} | "
                         f"{r['identical']} / {r['of']} | {r['prefix_share']:.3f} |")
    lines += ["", "Attention layers running Kascade per engine: " +
              "; ".join(f"{m}: {r['kascade_layers']}" for m, r in out["models"].items())]
    stem = Path(args.o) if args.o else ROOT / "benchmarks" / "results" / f"vllm_check_{first['device_short']}"
    VC.write_report(stem, {**out, "cells": cells}, lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (benchmarks/vllm_gpu_check.py) for the method.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing cells within a time budget")
    r.add_argument("--work", default="/tmp/vllm_check")
    r.add_argument("--models", default="tiny,smol")
    r.add_argument("--modes", default="graph,eager")
    VC.add_budget_arguments(r, min_left_s=120)
    for name, helptext in (("engine", "one vLLM engine's greedy tokens"), ("reference", "transformers' greedy tokens")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--model", choices=list(MODELS), required=True)
        e.add_argument("--plan", choices=PLANS if name == "engine" else ("dense", "shipped", "fp8"), required=True)
        if name == "engine":
            e.add_argument("--mode", choices=["graph", "eager"], required=True)
        e.add_argument("--work", default="/tmp/vllm_check")
        e.add_argument("--out", required=True)
    p = sub.add_parser("report", help="agreement tables into benchmarks/results/vllm_check_<device>.{json,md}")
    p.add_argument("--work", required=True)
    p.add_argument("-o", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        missing = VC.run_cells(cell_list(args), Path(args.work), args.budget_s, args.min_left_s, 500, Path(__file__),
                               Path(args.copy_to) if args.copy_to else None)
        print(f"[run] missing cells: {missing or 'none'}")
    elif args.cmd == "engine":
        VC.write_json(args.out, run_engine(args))
    elif args.cmd == "reference":
        VC.write_json(args.out, run_reference(args))
    else:
        report(args)


if __name__ == "__main__":
    main()
