"""Plans that generalize: calibrate on the format mixture, validate leave-one-family-out, report per family.

Three stages (the GPU recipe is benchmarks/generalization_gpu.sh):

    python benchmarks/generalization.py calibrate MODEL_DIR --work DIR [--budget-s 540]
        One calibration set (the mixture of kascade.calibrate.retrieval.MIXTURE, --num-prompts prompts of
        --length tokens), then the output-aware searches that share its measurements: the full mixture at
        --target selecting-layer equivalents and at each --also cost, then one leave-one-family-out search per
        --folds family. Writes DIR/plans/NAME.json and DIR/reports/NAME.json per search, and DIR/calib.pt
        (prompts, continuations, statistics, every plan's per-prompt divergence) after each one: a rerun
        resumes, and a search is skipped when its plan exists. Stops starting searches after --budget-s.
    python benchmarks/generalization.py jobs --work DIR --families F,... --lengths 4096,8064 --samples 40
        Prints one `kascade eval` command line per (plan, family): dense, oracle, the shipped plan, the paper
        plan and the new full-mixture plans on every family, each leave-one-out plan on the tasks of the family it
        left out (the records fold's plan on records and log_lookup).
    python benchmarks/generalization.py report --work DIR --eval EVALDIR -o benchmarks/results/generalization_smollm2
        Reads every DIR/EVALDIR/*/results.jsonl and writes the .json, .md and .png of the results.
    python benchmarks/generalization.py export --work DIR --eval EVALDIR [--prefix RECIPE] [--append]
        The reverse of seed: every row of EVALDIR/RUN/*/results.jsonl, named by its run, into --rows, and
        DIR's plans and search reports into --plans and --searches; with --prefix the runs, plans and reports
        are named RECIPE-NAME (another calibration recipe, reported in its own table).
    python benchmarks/generalization.py seed --work DIR --eval EVALDIR [--plans P] [--rows R] [--searches S]
        Puts committed plans (P, default benchmarks/results/generalization_smollm2_plans) into DIR/plans, their
        search reports (S, default benchmarks/results/generalization_smollm2_searches) into DIR/reports, and
        committed eval rows (R, default benchmarks/results/generalization_smollm2_results.jsonl.gz, each row
        naming its run) back into EVALDIR/RUN/TASK-LENGTH/results.jsonl, so that a later run evaluates the
        same plans and only the samples not yet scored (e.g. more samples per cell).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDS = ("records", "json_records", "table", "code", "multi_doc", "chat_history")  # leave-one-family-out folds
# evaluated tasks: each fold's own task, and log_lookup (family "records": run with the records fold's plan)
FAMILIES = FOLDS + ("log_lookup",)
ONLY_AT = {"log_lookup": (4096,)}  # tasks run at some lengths only: dense finds 3 of 20 log lookups at 8064
SHIPPED = ROOT / "plans" / "smollm2-135m-instruct.json"  # the default recipe's plan (kascade calibrate)
PROSE = ROOT / "plans" / "smollm2-135m-instruct-prose.json"  # the plan shipped before, calibrated on prose formats
PAPER = ROOT / "plans" / "smollm2-135m-instruct-paper.json"


def cmd_calibrate(args) -> int:
    import torch

    from kascade.calibrate.output_aware import CalibrationSet, calibrate_output_aware, calibration_set
    from kascade.models import load_model

    work = Path(args.work)
    (work / "plans").mkdir(parents=True, exist_ok=True)
    (work / "reports").mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = load_model(args.model_dir, args.device, args.dtype)
    text = Path(args.data).read_text(encoding="utf-8", errors="replace")
    cache = work / "calib.pt"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    calib, loaded = CalibrationSet.cached(cache, model, lambda: calibration_set(
        model, tok, text, length=args.length, num_prompts=args.num_prompts, answer_tokens=args.answer_tokens,
        batch_size=args.batch_size, statistics=args.statistics))
    if calib.statistics != args.statistics:
        raise SystemExit(f"--statistics: {cache} holds {calib.statistics!r} statistics, not {args.statistics!r}; "
                         "use another --work")
    if loaded:
        print(f"calibration set: {len(calib.prompts)} prompts, {len(calib.memo)} plans measured (from {cache})")
    else:
        print(f"calibration set: {len(calib.prompts)} prompts of {args.length} tokens "
              f"({', '.join(sorted(set(calib.kinds)))}) in {time.time() - t:.0f} s")
    jobs = [(f"mixture-{args.target:g}", None, args.target)] + [(f"lofo-{f}-{args.target:g}", f, args.target)
                                                                for f in args.folds]
    jobs += [(f"mixture-{c:g}", None, c) for c in args.also]
    for name, leave_out, target in jobs:
        if (work / "plans" / f"{name}.json").is_file():
            continue
        if time.time() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached; rerun to go on")
            return 0
        t, before = time.time(), len(calib.memo)
        plan, report = calibrate_output_aware(model, tok, text, num_anchors=target, rho=args.rho, shrink=args.search_step,
                                              candidates=args.candidates, objective=args.objective,
                                              leave_out=leave_out, calib=calib, progress=False, sources=args.sources,
                                              data_name={"name": Path(args.data).name},
                                              sparse_prefill=args.sparse_prefill == "yes")
        seconds = time.time() - t
        plan.save(work / "plans" / f"{name}.json")
        keep = {k: report[k] for k in ("history", "divergence", "objective", "leave_out", "divergence_by_family",
                                       "paper_anchors", "paper_divergence", "paper_divergence_by_family",
                                       "agreement", "paper_agreement")}
        keep.update(seconds=seconds, plans_measured=len(calib.memo) - before,
                    peak_gpu_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
        (work / "reports" / f"{name}.json").write_text(json.dumps(keep, indent=1))
        calib.save(cache)
        worst = max(report["divergence_by_family"].items(), key=lambda kv: kv[1])
        print(f"{name}: cost {plan.selecting_layers_equivalent:.2f}, anchors {plan.anchors}, mean KL "
              f"{report['divergence']:.4f}, worst family {worst[0]} {worst[1]:.4f} (paper recipe "
              f"{report['paper_divergence']:.4f}), {keep['plans_measured']} new plans in {seconds:.0f} s", flush=True)
    print(f"all searches done in {time.time() - start:.0f} s")
    return 0


def eval_jobs(work: Path, model_dir: str, families, lengths: str, samples: int, out: str) -> list[tuple[str, str]]:
    """(job name, kascade eval command line) for every evaluation the report needs: per length, the families run
    there (ONLY_AT keeps a task to the lengths where dense answers it)."""
    from kascade.eval.families import FAMILY

    jobs = []
    for n in [int(x) for x in str(lengths).split(",") if x]:
        base = (f"python3 -m kascade.cli eval {model_dir} --lengths {n} --budgets 0.1 --samples {samples} "
                "--no-coverage --workers 2")
        here = [t for t in families if n in ONLY_AT.get(t, (n,))]
        if not here:
            continue
        fams = ",".join(here)
        # the baselines' `kascade` is the prose plan (the rows committed before the default recipe's plan shipped)
        jobs.append(("baselines", f"{base} --tasks {fams} --plan {PROSE} --paper-plan {PAPER} "
                                  f"--strategies dense,oracle,kascade,kascade-paper --out {out}/baselines"))
        # decode-only mode (dense prefill, sparse decode) of per-layer top-k and the prose plan: its own run
        # folder, so that a stage running the baselines does not wait for it
        jobs.append(("decode-only", f"{base} --tasks {fams} --plan {PROSE} "
                                    f"--strategies oracle,kascade --sparse-prefill no --out {out}/decode-only"))
        # the shipped plan (the default recipe's), in both modes
        jobs.append(("shipped", f"{base} --tasks {fams} --plan {SHIPPED} --strategies kascade --out {out}/shipped"))
        jobs.append(("shipped-decode-only", f"{base} --tasks {fams} --plan {SHIPPED} --strategies kascade "
                                            f"--sparse-prefill no --out {out}/shipped-decode-only"))
        for plan in sorted((work / "plans").glob("mixture-*.json")):
            jobs.append((plan.stem, f"{base} --tasks {fams} --plan {plan} --strategies kascade "
                                    f"--out {out}/{plan.stem}"))
            jobs.append((plan.stem + "-decode-only", f"{base} --tasks {fams} --plan {plan} --strategies kascade "
                                                     f"--sparse-prefill no --out {out}/{plan.stem}-decode-only"))
        for plan in sorted((work / "plans").glob("lofo-*.json")):
            fold = next(f for f in FOLDS if plan.stem.startswith(f"lofo-{f}-"))
            tasks = [t for t in here if FAMILY.get(t, t) == fold]  # the tasks of the family it left out
            if tasks:
                jobs.append((plan.stem, f"{base} --tasks {','.join(tasks)} --plan {plan} --strategies kascade "
                                        f"--out {out}/{plan.stem}"))
                jobs.append((plan.stem + "-decode-only", f"{base} --tasks {','.join(tasks)} --plan {plan} "
                                                         f"--strategies kascade --sparse-prefill no "
                                                         f"--out {out}/{plan.stem}-decode-only"))
    return jobs


def cmd_jobs(args) -> int:
    for name, line in eval_jobs(Path(args.work), args.model_dir, args.families.split(","), args.lengths,
                                args.samples, args.eval):
        print(f"{name}\t{line}")
    return 0


def cmd_seed(args) -> int:
    import shutil

    work, ev = Path(args.work), Path(args.eval)
    (work / "plans").mkdir(parents=True, exist_ok=True)
    plans = sorted(Path(args.plans).glob("*.json"))
    if not plans:
        raise SystemExit(f"--plans: no plan files in {args.plans}")
    for plan in plans:
        shutil.copyfile(plan, work / "plans" / plan.name)
    (work / "reports").mkdir(parents=True, exist_ok=True)
    for report in sorted(Path(args.searches).glob("*.json")):
        shutil.copyfile(report, work / "reports" / report.name)
    cells: dict = {}
    with _open_rows(args.rows, "r") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                run = row.pop("run", None)
                if run is None:
                    raise SystemExit(f"--rows: {args.rows} has a row without its run: {line[:120]}")
                cells.setdefault((run, row["task"], int(row["length"])), []).append(row)
    for (run, task, length), rows in sorted(cells.items()):
        path = ev / run / f"{task}-{length}" / "results.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        done = {(r["strategy"], r["budget"], r["sample"]) for r in _read(path)}
        with open(path, "a", encoding="utf-8") as f:
            for row in rows:
                if (row["strategy"], row["budget"], row["sample"]) not in done:
                    f.write(json.dumps(row) + "\n")
    print(f"seeded {len(plans)} plans into {work / 'plans'} and {sum(map(len, cells.values()))} rows of "
          f"{len(cells)} cells into {ev}")
    return 0


def cmd_export(args) -> int:
    import shutil

    import re

    if args.prefix is not None and not re.fullmatch(r"[a-z0-9]+", args.prefix):
        raise SystemExit(f"--prefix: expected lowercase letters and digits (a recipe's name), got {args.prefix!r}")
    work, ev = Path(args.work), Path(args.eval)
    name = (lambda n: f"{args.prefix}-{n}") if args.prefix else (lambda n: n)
    runs = sorted(ev.glob("*/*/results.jsonl"))
    if not runs:
        raise SystemExit(f"--eval: no RUN/CELL/results.jsonl under {ev}")
    count = 0
    with _open_rows(args.rows, "a" if args.append else "w") as f:
        for path in runs:
            for row in _read(path):
                f.write(json.dumps({"run": name(path.parent.parent.name), **row}) + "\n")
                count += 1
    for sub, dest in (("plans", args.plans), ("reports", args.searches)):
        Path(dest).mkdir(parents=True, exist_ok=True)
        for src in sorted((work / sub).glob("*.json")):
            shutil.copyfile(src, Path(dest) / f"{name(src.stem)}.json")
    print(f"{count} rows of {len(runs)} cells into {args.rows}")
    return 0


def _open_rows(path, mode: str):
    """The committed rows file, text mode; gzip-compressed when its name ends in .gz (the committed one is, to
    keep the tree that travels to the GPU machine small)."""
    import gzip

    if str(path).endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _read(path: Path) -> list[dict]:
    from kascade.eval.command import read_results

    return read_results(path)


def cmd_report(args) -> int:
    from generalization_report import write_report

    write_report(Path(args.work), Path(args.eval), args.output, args.meta, SHIPPED, args.loo_cost, PROSE)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("calibrate")
    p.add_argument("model_dir")
    p.add_argument("--work", required=True)
    p.add_argument("--data", default=str(ROOT / "data" / "heldout.txt"))
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--num-prompts", type=int, default=22)
    p.add_argument("--batch-size", type=int, default=22)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--target", type=float, default=10.0)
    p.add_argument("--also", type=lambda s: [float(x) for x in s.split(",") if x], default=[6.0])
    p.add_argument("--folds", type=lambda s: [x for x in s.split(",") if x], default=list(FOLDS))
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--search-step", type=int, default=10)
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--objective", default="worst-family")
    p.add_argument("--sources", default="mean", help="how reusing heads pick their source: mean or worst-family")
    p.add_argument("--statistics", default="prompt", help="where head similarity is measured: prompt or answer")
    p.add_argument("--sparse-prefill", default="yes", choices=["yes", "no"],
                   help="the mode plans are judged in (no: decode-only mode, e.g. for a recipe of cheaper "
                        "decode-only plans in its own GEN folder)")
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("jobs")
    p.add_argument("model_dir")
    p.add_argument("--work", required=True)
    p.add_argument("--eval", required=True, help="folder of the eval runs")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--lengths", default="4096,8064")
    p.add_argument("--samples", type=int, default=40)
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("seed")
    p.add_argument("--work", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--plans", default=str(ROOT / "benchmarks" / "results" / "generalization_smollm2_plans"))
    p.add_argument("--rows", default=str(ROOT / "benchmarks" / "results" / "generalization_smollm2_results.jsonl.gz"))
    p.add_argument("--searches", default=str(ROOT / "benchmarks" / "results" / "generalization_smollm2_searches"),
                   help="the searches' reports (time, divergences), for the report's table")
    p.set_defaults(func=cmd_seed)
    p = sub.add_parser("export")
    p.add_argument("--work", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--prefix", default=None, help="another recipe's name (lowercase letters and digits)")
    p.add_argument("--append", action="store_true", help="add to --rows instead of replacing it")
    p.add_argument("--plans", default=str(ROOT / "benchmarks" / "results" / "generalization_smollm2_plans"))
    p.add_argument("--rows", default=str(ROOT / "benchmarks" / "results" / "generalization_smollm2_results.jsonl.gz"))
    p.add_argument("--searches", default=str(ROOT / "benchmarks" / "results" / "generalization_smollm2_searches"))
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--meta", default=None, help="JSON of device and versions written on the GPU machine")
    p.add_argument("--loo-cost", default="10", help="cost of the leave-one-out plans reported (their name's suffix)")
    p.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "generalization_smollm2"))
    p.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    raise SystemExit(main())
