"""The accuracy-speed frontier on SmolLM2-135M-Instruct (issue 26 item 1): plans of 4 to 15 selecting-layer
equivalents, head- and layer-granular, against the paper's recipe and dense, by accuracy and measured speedup.

Stages (the GPU recipe is benchmarks/frontier_gpu.sh):

    python benchmarks/frontier.py calibrate MODEL_DIR --work DIR [--budget-s 1500]
        One calibration set (the format mixture of kascade.calibrate.retrieval.MIXTURE, --num-prompts prompts
        of --length tokens, as benchmarks/generalization.py), then two output-aware searches sharing its
        measurements, each down to the smallest of --costs with a stop at every other cost: over (layer, KV
        head) units ("head") and over whole layers ("layer", anchors and the paper's head map). Writes
        DIR/plans/head-C.json and layer-C.json (the search path's plan at each cost C), paper-C.json (the
        paper's recipe at C anchors on the same statistics), DIR/reports/{head,layer}.json, and the
        divergence of every plan (and of the default plan) on held-out prompts of the same formats
        (DIR/reports/heldout.json). DIR/calib.pt keeps the prompts and every plan's measurement, saved every
        few minutes during a search: a rerun resumes, and a search whose plans exist is skipped. Stops
        starting searches after --budget-s. A third search, off by default (`--searches head,layer,decodeonly`),
        is head-granular and judges plans in decode-only mode (dense prompt pass, sparse decode steps; plans
        DIR/plans/decodeonly-C.json), the mode kascade.enable and the vLLM plugin run by default; on held-out
        prompts its plans did no better in that mode than the head search's
        (benchmarks/results/answer_logprob_decode_only_calibration_smollm2_cpu.md). The held-out report gives
        every plan's divergence in both modes.
    python benchmarks/frontier.py jobs MODEL_DIR --work DIR --eval EVALDIR [--samples 60] [--pending]
        Prints one `kascade eval` command line per (plan, task set, length), tab-separated after its name
        RUN/SET-LENGTH: the task sets are the headline tasks of benchmarks/results/eval_smollm2.json
        (HEADLINE_TASKS) and the families of the generalization benchmark (FAMILIES), at 4096 and 8064
        tokens, rho 0.1; dense and oracle once ("baselines"), the default plan (--default-plan) at rho 0.1,
        0.05 and 0.2, and every plan of DIR/plans at rho 0.1 (--pending: only the runs not complete in EVALDIR).
        Oracle and every plan run in both modes (MODES): with the sparse prefill and decode-only; the decodeonly
        search's plans, judged in decode-only mode, run in that mode only.
    python benchmarks/frontier.py seed --work DIR --eval EVALDIR
        Gives every plan run's folder that has no results yet the dense rows of the baselines' run of the same
        task set and length (a `kascade eval` run always scores dense too; dense is the same prompt for prompt,
        so the plan runs skip it).
    python benchmarks/frontier.py speed --work DIR --shape 8b|smollm2 --phase decode|prefill [--lengths N,...]
        The whole model's decode or prefill attention time at batch 1 for dense and for Kascade with each
        plan, in one process (benchmarks/frontier_speed.py), into DIR/speed/SHAPE-PHASE-N.json; resumes.
        SPEED_RUNS lists the measurements the report reads; `speed-missing --work DIR` prints those not made.
    python benchmarks/frontier.py report --work DIR --eval EVALDIR -o benchmarks/results/frontier_smollm2
        The .json, .md and .png of the frontier (benchmarks/frontier_report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from generalization import FAMILIES, ONLY_AT  # the structured families, and the lengths where each is run
from kascade.calibrate.output_aware import DEFAULT_CANDIDATES, DEFAULT_SEARCH_STEP  # the shipped recipe's search
from kascade.eval.strategies import DENSE_PREFILL  # the name suffix of a strategy in decode-only mode

ROOT = Path(__file__).resolve().parent.parent
COSTS = (4, 6, 8, 10, 12, 15)  # selecting-layer equivalents on the frontier
ORDER = (6, 4, 8, 10, 12, 15)  # evaluation order: the paper's cost first, so a cut run keeps the goal's points
PAPER_FIRST = (6, 10)  # the paper's recipe at its own cost and the default plan's runs with its cost's plans; at
# the other costs it runs after every output-aware plan (a cut run keeps the frontier's own points first)
HEADLINE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe", "doc_qa_chat")
TASK_SETS = {"tasks": HEADLINE_TASKS, "families": FAMILIES}
LENGTHS = (4096, 8064)
RHO = 0.1
DEFAULT_RHOS = (0.05, 0.2)  # the default plan is also evaluated at these budgets
DEFAULT_PLAN = ROOT / "plans" / "smollm2-135m-instruct.json"
# plan file prefixes: output-aware head- and layer-granular (judged with the sparse prefill), output-aware
# head-granular judged in decode-only mode, the paper's recipe
RECIPES = ("head", "layer", "decodeonly", "paper")
# search -> (granularity, sparse_prefill: the mode its plans are judged in)
SEARCHES = {"head": ("head", True), "layer": ("layer", True), "decodeonly": ("head", False)}
# every plan runs in both modes, in one process: sparse prefill and decode (the prefill speedup's mode) and
# decode-only (dense prefill, sparse decode: the default of kascade.enable and the vLLM plugin); the decodeonly
# search's plans, judged in decode-only mode, run in that mode only (and are timed in decode only)
PLAN_STRATEGIES = ("kascade", "kascade" + DENSE_PREFILL)
DECODE_ONLY_STRATEGIES = ("kascade" + DENSE_PREFILL,)
MODES = {"sparse": "", "decode-only": DENSE_PREFILL}  # mode -> strategy name suffix


def decode_only_plan(name: str) -> bool:
    """Whether a frontier plan (by name) was judged in decode-only mode, so runs in that mode only."""
    return name.split("-")[0] == "decodeonly"


HELDOUT_SEED = 1000  # first seed of the held-out prompts (the calibration set's are 0..num_prompts-1)


# ----------------------------------------------------------------------------------------------
# the plans of the frontier
# ----------------------------------------------------------------------------------------------


def default_name(rho: float) -> str:
    """The default plan's run at budget rho: "default" at RHO, else "default-rho0.05"."""
    return "default" if rho == RHO else f"default-rho{rho:g}"


def frontier_plans(work: Path, default_plan: Path = DEFAULT_PLAN) -> dict[str, tuple[Path, float]]:
    """name -> (plan file, rho) of every plan the frontier evaluates, in evaluation order: the default plan at
    RHO and DEFAULT_RHOS, then for each cost of ORDER the head-granular, layer-granular and (at PAPER_FIRST's
    costs) paper plans that exist in WORK/plans (any other cost found there after them), then the other paper
    plans."""
    out = {default_name(r): (Path(default_plan), r) for r in (RHO, *DEFAULT_RHOS)} if default_plan else {}
    found = {p.stem: p for p in sorted((Path(work) / "plans").glob("*.json"))}
    suffixes = {stem.rsplit("-", 1)[1] for stem in found}
    costs = list(ORDER) + sorted({int(c) for c in suffixes if c.isdigit()} - set(ORDER))
    later = []  # the paper's recipe away from PAPER_FIRST: after every output-aware plan
    for c in costs:
        for recipe in RECIPES:
            name = f"{recipe}-{c}"
            if name not in found:
                continue
            if recipe == "paper" and c not in PAPER_FIRST:
                later.append(name)
            else:
                out[name] = (found[name], RHO)
    return out | {name: (found[name], RHO) for name in later}


def load_plans(work: Path, default_plan: Path = DEFAULT_PLAN) -> dict:
    """name -> Plan (at its budget) of frontier_plans."""
    from kascade.plan import Plan

    out = {}
    for name, (path, rho) in frontier_plans(work, default_plan).items():
        plan = Plan.load(path)
        out[name] = plan if plan.rho == rho else dataclasses.replace(plan, rho=rho)
    return out


# ----------------------------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------------------------


def _checkpointed(calib, path: Path, every_s: float):
    """Save the calibration set (with its memo of measured plans) at most every `every_s` seconds while a
    search measures new plans, so that a search cut short resumes where it was."""
    measure, last = calib.per_prompt, [time.time()]

    def per_prompt(plan, *args, **kwargs):
        before = len(calib.memo)
        out = measure(plan, *args, **kwargs)
        if len(calib.memo) > before and time.time() - last[0] > every_s:
            calib.save(path)
            last[0] = time.time()
        return out

    calib.per_prompt = per_prompt
    return calib


def _divergences(calib, plan, idx=None, sparse_prefill: bool = True) -> dict:
    import numpy as np

    from kascade.calibrate.output_aware import family_divergences

    idx = list(range(len(calib.prompts))) if idx is None else idx
    values = calib.per_prompt(plan, sparse_prefill)
    fam = family_divergences(values, calib.kinds, idx)
    return {"mean": float(np.mean(values[idx])), "worst_family": max(fam.values()), "by_family": fam}


def _load_set(model, tok, text, path: Path, args, first_seed: int, count: int, label: str):
    from kascade.calibrate.output_aware import CalibrationSet, calibration_set

    t = time.time()
    calib, loaded = CalibrationSet.cached(path, model, lambda: calibration_set(
        model, tok, text, length=args.length, num_prompts=count, answer_tokens=args.answer_tokens,
        batch_size=args.batch_size, progress=False, first_seed=first_seed))
    if loaded:
        print(f"{label}: {len(calib.prompts)} prompts, {len(calib.memo)} plans measured (from {path})", flush=True)
    else:
        print(f"{label}: {len(calib.prompts)} prompts of {args.length} tokens ({', '.join(sorted(set(calib.kinds)))}) "
              f"in {time.time() - t:.0f} s", flush=True)
    calib.decode_batch = getattr(args, "decode_batch", None)
    return calib


def cmd_calibrate(args) -> int:
    import torch

    import kascade
    from kascade.calibrate.output_aware import calibrate_output_aware
    from kascade.models import load_model

    work = Path(args.work)
    for sub in ("plans", "reports"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = load_model(args.model_dir, args.device, args.dtype)
    text = Path(args.data).read_text(encoding="utf-8", errors="replace")
    cache = work / "calib.pt"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    calib = _checkpointed(_load_set(model, tok, text, cache, args, 0, args.num_prompts, "calibration set"), cache,
                          args.save_every_s)
    costs = sorted(args.costs)
    for name in args.searches:
        granularity, sparse = SEARCHES[name]
        if all((work / "plans" / f"{name}-{c:g}.json").is_file() for c in costs):
            continue
        if time.time() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached; rerun to go on")
            return 0
        t, before = time.time(), len(calib.memo)
        _, report = calibrate_output_aware(model, tok, text, num_anchors=costs[0], stops=costs[1:], rho=RHO,
                                           shrink=args.search_step, candidates=args.candidates,
                                           objective=args.objective, calib=calib, progress=False,
                                           granularity=granularity, sparse_prefill=sparse,
                                           data_name={"name": Path(args.data).name})
        seconds = time.time() - t
        rows = {}
        kinds = [(name, report["plans_along"])] + ([("paper", report["paper_plans_along"])] if sparse else [])
        for kind, along in kinds:
            for c in costs:
                plan = along.get(c)
                if plan is None:
                    print(f"{name} search: no plan of cost {c} on its path", flush=True)
                    continue
                div = _divergences(calib, plan, sparse_prefill=sparse)
                plan.provenance = {
                    "data": {"name": Path(args.data).name}, "num_prompts": len(calib.prompts),
                    "prompt_tokens": len(calib.prompts[0].ids), "formats": sorted(set(calib.kinds)),
                    "search": None if kind == "paper" else name,
                    "granularity": "layer" if kind == "paper" else granularity, "sparse_prefill": sparse,
                    "objective": args.objective, "search_step": args.search_step,
                    "search_candidates": args.candidates, "divergence": div["mean"],
                    "divergence_by_family": div["by_family"], "date": time.strftime("%Y-%m-%d"),
                    "kascade_version": kascade.__version__}
                path = work / "plans" / f"{kind}-{c:g}.json"
                if kind == name or not path.is_file():
                    plan.save(path)
                rows[f"{kind}-{c:g}"] = {"cost": plan.selecting_layers_equivalent, "anchors": plan.anchors, **div}
        keep = {"granularity": granularity, "sparse_prefill": sparse, "history": report["history"],
                "objective": args.objective, "plans": rows,
                "seconds": seconds, "plans_measured": len(calib.memo) - before,
                "settings": {"search_step": args.search_step, "candidates": args.candidates, "costs": costs,
                             "num_prompts": len(calib.prompts), "length": args.length},
                "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
        (work / "reports" / f"{name}.json").write_text(json.dumps(keep, indent=1))
        calib.save(cache)
        for key, r in rows.items():
            print(f"{key}: cost {r['cost']:.2f}, anchors {r['anchors']}, mean KL {r['mean']:.4f}, worst family "
                  f"{r['worst_family']:.4f}", flush=True)
        print(f"{name} search: {keep['plans_measured']} new plans in {seconds:.0f} s", flush=True)
    heldout = work / "reports" / "heldout.json"
    if args.heldout_prompts and not heldout.is_file():
        if time.time() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached; rerun to go on")
            return 0
        held = _load_set(model, tok, text, work / "heldout.pt", args, HELDOUT_SEED, args.heldout_prompts,
                         "held-out set")
        plans = {}
        for name, plan in load_plans(work, Path(args.default_plan)).items():
            try:
                plan.validate(model.config)
            except ValueError as e:
                print(f"held out: {name} left out: {e}", flush=True)
                continue
            if plan.rho == RHO:
                plans[name] = plan
        sparse = {name: plan for name, plan in plans.items() if not decode_only_plan(name)}
        doc = {"num_prompts": len(held.prompts), "first_seed": HELDOUT_SEED,
               "plans": {name: _divergences(held, plan) for name, plan in sparse.items()},
               "calibration": {name: _divergences(calib, plan) for name, plan in sparse.items()},
               "plans_decode_only": {name: _divergences(held, plan, sparse_prefill=False)
                                     for name, plan in plans.items()},
               "calibration_decode_only": {name: _divergences(calib, plan, sparse_prefill=False)
                                           for name, plan in plans.items()}}
        held.save(work / "heldout.pt")
        calib.save(cache)
        heldout.write_text(json.dumps(doc, indent=1))
        for mode, key in (("", "plans"), (", decode-only", "plans_decode_only")):
            calibration = doc["calibration" + key[len("plans"):]]
            for name, d in doc[key].items():
                print(f"held out{mode}, {name}: mean KL {d['mean']:.4f}, worst family {d['worst_family']:.4f} "
                      f"(calibration {calibration[name]['worst_family']:.4f})", flush=True)
    print(f"calibration done in {time.time() - start:.0f} s")
    return 0


# ----------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One `kascade eval` run: a plan (or the baselines) on one task set at one length."""

    name: str  # RUN/SET-LENGTH, also its folder under the eval folder
    command: str
    tasks: tuple
    strategies: tuple  # besides dense, which every run scores
    budget: float

    def done(self, eval_dir: Path, samples: int) -> bool:
        """Whether the folder's results.jsonl holds `samples` rows of every task for every strategy and dense."""
        from collections import Counter

        from kascade.eval.command import read_results

        have = Counter((r["task"], r["strategy"], r["budget"]) for r in read_results(Path(eval_dir) / self.name /
                                                                                     "results.jsonl"))
        want = [(t, s, None if s == "dense" else self.budget) for t in self.tasks for s in ("dense", *self.strategies)]
        return all(have[w] >= samples for w in want)


def eval_jobs(work: Path, model_dir: str, out: str, samples: int = 60, lengths=LENGTHS,
              default_plan: Path = DEFAULT_PLAN) -> list[Job]:
    """Every evaluation the report needs: dense and oracle ("baselines"), then each plan of frontier_plans at its
    budget; per run, both task sets at each length."""
    base = f"python3 -m kascade.cli eval {model_dir} --samples {samples} --no-coverage --workers 2"
    oracle = ("oracle", "oracle" + DENSE_PREFILL)
    runs = [("baselines", RHO, oracle, f"--budgets {RHO:g} --strategies dense,{','.join(oracle)}")]
    for name, (path, rho) in frontier_plans(work, default_plan).items():
        strategies = DECODE_ONLY_STRATEGIES if decode_only_plan(name) else PLAN_STRATEGIES
        runs.append((name, rho, strategies, f"--budgets {rho:g} --plan {path} --strategies {','.join(strategies)}"))
    jobs = []
    for run, rho, strategies, opts in runs:
        for n in lengths:
            for set_name, every in TASK_SETS.items():
                tasks = tuple(t for t in every if n in ONLY_AT.get(t, (n,)))
                name = f"{run}/{set_name}-{n}"
                jobs.append(Job(name, f"{base} --tasks {','.join(tasks)} --lengths {n} {opts} --out {out}/{name}",
                                tasks, strategies, rho))
    return jobs


def cmd_jobs(args) -> int:
    lengths = [int(x) for x in args.lengths.split(",")]
    for job in eval_jobs(Path(args.work), args.model_dir, args.eval, args.samples, lengths, Path(args.default_plan)):
        if not (args.pending and job.done(Path(args.eval), args.samples)):
            print(f"{job.name}\t{job.command}")
    return 0


def seed_dense(eval_dir: Path, runs) -> list[str]:
    """Copy the baselines' dense rows of each (task set, length) into the folder of that (task set, length) of
    every run of `runs` (names) that has no results.jsonl yet; returns the folders seeded."""
    from kascade.eval.command import read_results

    seeded = []
    for base in sorted((Path(eval_dir) / "baselines").glob("*/results.jsonl")):
        rows = [r for r in read_results(base) if r["strategy"] == "dense"]
        if not rows:
            continue
        for run in runs:
            target = Path(eval_dir) / run / base.parent.name / "results.jsonl"
            if run == "baselines" or target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, target)
            seeded.append(str(target.parent))
    return seeded


def cmd_seed(args) -> int:
    folders = seed_dense(Path(args.eval), list(frontier_plans(Path(args.work), Path(args.default_plan))))
    print(f"dense rows seeded into {len(folders)} folders")
    return 0


# ----------------------------------------------------------------------------------------------
# speed, report
# ----------------------------------------------------------------------------------------------


SPEED_RUNS = (("smollm2", "decode", (8192, 131072)), ("8b", "decode", (131072,)),
              ("smollm2", "prefill", (8192, 131072)), ("8b", "prefill", (131072,)))  # SmolLM2's context is 8K


def timed_in(phase: str, names) -> list[str]:
    """The plans (names) the speed stage times in `phase`: all in decode, those with a sparse prefill in prefill."""
    return [n for n in names if phase == "decode" or not decode_only_plan(n)]


def speed_missing(work: Path, default_plan: Path = DEFAULT_PLAN) -> list[str]:
    """"SHAPE-PHASE-N PLAN" for every measurement of SPEED_RUNS not in WORK/speed yet (or failed)."""
    out = []
    for shape_name, phase, lengths in SPEED_RUNS:
        names = timed_in(phase, frontier_plans(work, default_plan))
        for n in lengths:
            path = Path(work) / "speed" / f"{shape_name}-{phase}-{n}.json"
            have = json.loads(path.read_text())["plans"] if path.is_file() else {}
            out += [f"{path.stem} {name}" for name in names if "ms" not in have.get(name, {})]
    return out


def cmd_speed_missing(args) -> int:
    for line in speed_missing(Path(args.work), Path(args.default_plan)):
        print(line)
    return 0


def cmd_speed(args) -> int:
    import frontier_speed

    plans = load_plans(Path(args.work), Path(args.default_plan))
    plans = {name: plans[name] for name in timed_in(args.phase, plans)}
    start = time.time()
    for n in [int(x) for x in args.lengths.split(",")]:
        left = args.budget_s - (time.time() - start)
        out = Path(args.work) / "speed" / f"{args.shape}-{args.phase}-{n}.json"
        if not frontier_speed.measure(plans, args.shape, args.phase, n, out, left):
            print("budget reached; rerun to go on")
            return 0
    return 0


def cmd_report(args) -> int:
    from frontier_report import write_report

    write_report(Path(args.work), Path(args.eval), args.output, args.meta, Path(args.default_plan))
    return 0


def _searches(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in SEARCHES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected names of {', '.join(SEARCHES)}, got {text!r}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("calibrate")
    p.add_argument("model_dir")
    p.add_argument("--work", required=True)
    p.add_argument("--data", default=str(ROOT / "data" / "heldout.txt"))
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--num-prompts", type=int, default=22)
    p.add_argument("--heldout-prompts", type=int, default=11, help="prompts of the held-out set (0: none)")
    p.add_argument("--batch-size", type=int, default=22)
    p.add_argument("--decode-batch", type=int, default=None,
                   help="prompts per batch of the decode-only measurements (default: --batch-size's batches)")
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--costs", type=lambda s: [float(x) for x in s.split(",")], default=list(COSTS))
    p.add_argument("--search-step", type=int, default=DEFAULT_SEARCH_STEP, help="default: the shipped recipe's")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="default: the shipped recipe's")
    p.add_argument("--objective", default="worst-family")
    p.add_argument("--searches", type=_searches, default=["head", "layer"],
                   help=f"comma-separated, of {', '.join(SEARCHES)} (default: head,layer)")
    p.add_argument("--budget-s", type=float, default=1500.0)
    p.add_argument("--save-every-s", type=float, default=120.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("jobs")
    p.add_argument("model_dir")
    p.add_argument("--work", required=True)
    p.add_argument("--eval", required=True, help="folder of the eval runs")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--pending", action="store_true", help="only the runs whose results are not complete")
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("seed")
    p.add_argument("--work", required=True)
    p.add_argument("--eval", required=True)
    p.set_defaults(func=cmd_seed)
    p = sub.add_parser("speed")
    p.add_argument("--work", required=True)
    p.add_argument("--shape", required=True, choices=["8b", "smollm2"])
    p.add_argument("--phase", required=True, choices=["decode", "prefill"])
    p.add_argument("--lengths", default="131072")
    p.add_argument("--budget-s", type=float, default=520.0)
    p.set_defaults(func=cmd_speed)
    p = sub.add_parser("speed-missing", help="the speed measurements not made yet")
    p.add_argument("--work", required=True)
    p.set_defaults(func=cmd_speed_missing)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--meta", default=None, help="JSON of device and versions written on the GPU machine")
    p.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "frontier_smollm2"))
    p.set_defaults(func=cmd_report)
    for name in ("calibrate", "jobs", "seed", "speed", "speed-missing", "report"):
        sub.choices[name].add_argument("--default-plan", default=str(DEFAULT_PLAN),
                                       help="the plan also evaluated at rho 0.05 and 0.2 (default: the shipped plan)")
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    raise SystemExit(main())
