"""benchmarks/results/eval_tiny.{json,md,png} (+ _pareto.png, _results.jsonl) from a kascade-tiny `kascade eval` folder.

    python benchmarks/eval_tiny_report.py --eval OUT --command "kascade eval ..." --runs "CPU, dates, how"

OUT is the run's --out folder (summary.json, results.jsonl, accuracy_vs_budget.png). The JSON keeps the
keys of `kascade eval`'s summary (`columns`, `budgets` -> strategy -> column / `avg` / `headline`,
`counts`) and adds the plans (file, sha256, recipe, selecting-layer equivalents), versions, a headline
per length and the accuracy-against-cost points of the Pareto plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_smollm2_report import (_plan_info, headline_per_length, pareto_points, plot_pareto,  # noqa: E402
                                 sample_counts)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLANS = {"kascade": ROOT / "plans" / "kascade-tiny.json", "kascade-paper": ROOT / "plans" / "kascade-tiny-paper.json"}
NUM_LAYERS = 12


def main(argv=None) -> int:
    import torch
    import transformers

    from kascade.eval import report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", required=True, type=Path, help="the kascade eval --out folder")
    ap.add_argument("--command", required=True, help="the kascade eval command, for the header")
    ap.add_argument("--runs", required=True, help="where and when the rows ran, for the header")
    ap.add_argument("--out", default=RESULTS / "eval_tiny", type=Path)
    args = ap.parse_args(argv)
    summary = json.loads((args.eval / "summary.json").read_text())
    plans = {s: _plan_info(p) for s, p in PLANS.items()}
    summary.update(plans=plans, versions={"torch": torch.__version__, "transformers": transformers.__version__},
                   runs=args.runs, command=args.command)
    summary["headline_per_length"] = headline_per_length(summary)
    summary["pareto"] = pareto_points(summary, plans, None, num_layers=NUM_LAYERS)
    out = args.out
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# kascade-tiny accuracy: Kascade and baselines at equal budget (CPU)", "",
             f"Command: `{args.command}`", "", f"Runs: {args.runs}", "",
             f"float32, greedy, the pure-PyTorch reference; torch {torch.__version__}, transformers "
             f"{transformers.__version__}; {sample_counts(summary)} (counts in the JSON).", ""]
    for s, p in plans.items():
        lines.append(f"- `{s}`: `{p['file']}` ({p['recipe']}, anchors {p['anchors']}, "
                     f"{p['selecting_layers_equivalent']:g} selecting-layer equivalents, sha256 {p['sha256'][:16]})")
    lines += ["", f"Headline tasks (dense >= 20 on average over lengths): {', '.join(summary['headline_tasks'])}.", "",
              "## Headline per length (mean over the headline tasks' cells of that length)", "",
              "| rho | strategy | " + " | ".join(str(n) for n in summary["lengths"]) + " |",
              "|---|---|" + "---|" * len(summary["lengths"])]
    for b, table in summary["headline_per_length"].items():
        for st, per in table.items():
            lines.append(f"| {b} | {st} | " + " | ".join(f"{per[n]:.1f}" if n in per else "-"
                                                       for n in summary["lengths"]) + " |")
    lines += ["", report.markdown(summary, title="Accuracy (%)").split("\n", 2)[2]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    shutil.copy(args.eval / "accuracy_vs_budget.png", out.with_suffix(".png"))
    shutil.copy(args.eval / "results.jsonl", out.parent / (out.name + "_results.jsonl"))
    plot_pareto(summary["pareto"], out.parent / (out.name + "_pareto.png"), num_layers=NUM_LAYERS,
                title="kascade-tiny, rho 0.1, 2K-4K")
    print(f"wrote {out}.json/.md/.png, {out.name}_results.jsonl, {out.name}_pareto.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
