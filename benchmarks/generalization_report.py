"""The report of benchmarks/generalization.py: per family and length, dense against per-layer top-k
(oracle), the leave-one-family-out plan, the full-mixture plan, the previous shipped plan and the paper's
recipe; JSON + markdown + plot.

Eval runs live in EVAL/RUN/FAMILY-LENGTH/results.jsonl (RUN: baselines, mixture-COST, lofo-FAMILY-COST);
plans and search reports in WORK/plans and WORK/reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kascade.eval.command import read_results

HEADLINE_MIN = 20.0  # a family counts where dense scores at least this
TARGET_DENSE, TARGET_ORACLE = 3.0, 5.0  # points: a plan within these of dense and of per-layer top-k


def collect(eval_dir: Path) -> dict:
    """{(column, family, length): [scores]} with column one of dense, oracle, previous, paper, mixture-COST,
    lofo-COST (the leave-one-out plan of that family)."""
    cells: dict = {}
    for path in sorted(eval_dir.glob("*/*/results.jsonl")):
        run = path.parent.parent.name
        for row in read_results(path):
            strategy = row["strategy"]
            if run == "baselines":
                column = {"kascade": "previous", "kascade-paper": "paper"}.get(strategy, strategy)
            elif run.startswith("lofo-"):
                column = "lofo-" + run.rsplit("-", 1)[1]
            else:
                column = run
            cells.setdefault((column, row["task"], row["length"]), []).append(float(row["score"]))
    return cells


def _mean(v):
    return None if not v else round(100.0 * float(np.mean(v)), 2)


def rows_of(cells: dict, plans: dict, shipped: str) -> list[dict]:
    """One row per (family, length) that has a dense score."""
    out = []
    for (column, fam, length) in sorted({k for k in cells if k[0] == "dense"}, key=lambda k: (k[1], k[2])):
        get = lambda c: _mean(cells.get((c, fam, length)))  # noqa: E731
        row = {"name": fam, "length": length, "samples": len(cells[("dense", fam, length)]),
               "dense": get("dense"), "oracle": get("oracle"), "kascade_shipped": get(shipped),
               "kascade_leave_one_out": get(f"lofo-{shipped.rsplit('-', 1)[1]}"),
               "kascade_previous": get("previous"), "kascade_paper": get("paper"),
               "cost": plans.get(shipped, {}).get("selecting_layers_equivalent")}
        for c in sorted({k[0] for k in cells if k[0].startswith("mixture-") and k[0] != shipped}):
            row[f"kascade_{c.replace('-', '_')}"] = get(c)
        row["headline"] = row["dense"] is not None and row["dense"] >= HEADLINE_MIN
        row["holds"] = {k: _holds(row, k) for k in ("kascade_leave_one_out", "kascade_shipped")} if row["headline"] else {}
        out.append(row)
    return out


def _holds(row: dict, key: str):
    v = row.get(key)
    if v is None or row["oracle"] is None:
        return None
    return v >= row["dense"] - TARGET_DENSE and v >= row["oracle"] - TARGET_ORACLE


def write_report(work: Path, eval_dir: Path, output: str, meta_path: str | None) -> None:
    cells = collect(eval_dir)
    plans = {p.stem: json.loads(p.read_text()) for p in sorted((work / "plans").glob("*.json"))}
    reports = {p.stem: json.loads(p.read_text()) for p in sorted((work / "reports").glob("*.json"))}
    costs = sorted({p.rsplit("-", 1)[1] for p in plans if p.startswith("mixture-")}, key=float, reverse=True)
    shipped = f"mixture-{costs[0]}" if costs else "mixture-10"
    rows = rows_of(cells, plans, shipped)
    meta = json.loads(Path(meta_path).read_text()) if meta_path else {}
    searches = {name: {k: r.get(k) for k in ("seconds", "plans_measured", "peak_gpu_bytes", "divergence",
                                             "divergence_by_family", "paper_divergence", "leave_out", "objective")}
                | {"anchors": plans[name]["anchors"], "cost": plans[name]["selecting_layers_equivalent"],
                   "settings": plans[name]["provenance"].get("search_candidates")}
                for name, r in reports.items() if name in plans}
    doc = {"meta": meta, "model": "SmolLM2-135M-Instruct", "rho": 0.1, "shipped": shipped,
           "targets": {"dense_points": TARGET_DENSE, "oracle_points": TARGET_ORACLE, "headline_dense_min": HEADLINE_MIN},
           "families": rows, "searches": searches}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output + ".json").write_text(json.dumps(doc, indent=1))
    Path(output + ".md").write_text(markdown(doc))
    plot(doc, output + ".png")


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    rows = doc["families"]
    extra = sorted({k for r in rows for k in r if k.startswith("kascade_mixture_")})
    head = ["family", "length", "samples", "dense", "oracle", "leave-one-out", "mixture plan", "previous plan",
            "paper recipe"] + [k.replace("kascade_", "").replace("_", "-") for k in extra] + ["holds (loo / mixture)"]
    lines = [f"# Generalization to formats unlike calibration: SmolLM2-135M-Instruct, {m.get('device', '?')}, "
             f"{m.get('date', '?')}", "",
             f"torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, transformers {m.get('transformers', '?')}; "
             f"bf16, Triton kernels, greedy, rho {doc['rho']}. Leave-one-out: the plan calibrated without any "
             f"prompt of that family's kind. Mixture plan: `{doc['shipped']}` (all formats). A family counts "
             f"where dense >= {doc['targets']['headline_dense_min']:g}; target: within "
             f"{doc['targets']['dense_points']:g} points of dense and {doc['targets']['oracle_points']:g} of oracle.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        holds = " / ".join({True: "yes", False: "no", None: "-"}[r["holds"].get(k)]
                           for k in ("kascade_leave_one_out", "kascade_shipped")) if r["headline"] else "(dense < 20)"
        vals = [r["name"], str(r["length"]), str(r["samples"]), _f(r["dense"]), _f(r["oracle"]),
                _f(r["kascade_leave_one_out"]), _f(r["kascade_shipped"]), _f(r["kascade_previous"]),
                _f(r["kascade_paper"])] + [_f(r.get(k)) for k in extra] + [holds]
        lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "## Calibration searches", "", "| search | cost | anchors | mean KL | worst family KL | paper recipe KL "
              "| plans measured | seconds | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in doc["searches"].items():
        fam = s.get("divergence_by_family") or {}
        worst = max(fam.items(), key=lambda kv: kv[1]) if fam else ("-", float("nan"))
        peak = s.get("peak_gpu_bytes")
        lines.append(f"| {name} | {s['cost']:.2f} | {s['anchors']} | {s['divergence']:.4f} | {worst[0]} {worst[1]:.4f} | "
                     f"{s['paper_divergence']:.4f} | {s['plans_measured']} | {s['seconds']:.0f} | "
                     f"{'-' if peak is None else f'{peak / 2**30:.1f}'} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["families"]
    cols = [("dense", "dense"), ("oracle", "oracle (per-layer top-k)"), ("kascade_leave_one_out", "leave-one-out plan"),
            ("kascade_shipped", "mixture plan"), ("kascade_previous", "previous plan"), ("kascade_paper", "paper recipe")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.8))
    x = np.arange(len(rows))
    w = 0.8 / len(cols)
    for i, (key, label) in enumerate(cols):
        ax.bar(x + (i - len(cols) / 2 + 0.5) * w, [r.get(key) or 0 for r in rows], w, label=label)
    ax.set_xticks(x, [f"{r['name']}\n{r['length']}" for r in rows], fontsize=7)
    ax.set(ylabel="score (%)", ylim=(0, 105), title=f"SmolLM2-135M, rho {doc['rho']}: families unlike calibration")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
