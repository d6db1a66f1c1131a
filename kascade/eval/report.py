"""Tables and plots of `kascade eval` results: mean scores per strategy, task, length and budget.

Scores are in percent. Dense does not depend on the budget (it is run once) and is shown in every
budget's table, first, with each strategy's gap to it in the last column.
"""

from __future__ import annotations

from collections import defaultdict


def length_label(n: int) -> str:
    """2048 -> "2K", 131072 -> "128K", 1000 -> "1000"."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarise(rows, tasks, lengths, budgets, strategies) -> dict:
    """{"budgets": {budget: {strategy: {"task@length": mean %, ..., "avg": mean of the cells}}},
    "counts": {...same keys: samples}, "tasks", "lengths", "strategies"}; dense appears under every budget."""
    cells = defaultdict(list)  # (budget or None, strategy, task, length) -> scores
    for r in rows:
        cells[(r["budget"], r["strategy"], r["task"], int(r["length"]))].append(100.0 * float(r["score"]))
    cols = [(t, n) for t in tasks for n in lengths]
    out = {"tasks": list(tasks), "lengths": list(lengths), "strategies": list(strategies),
           "columns": [f"{t}@{n}" for t, n in cols], "budgets": {}, "counts": {}}
    for b in budgets:
        table, counts = {}, {}
        for s in strategies:
            key_b = None if s == "dense" else b
            row = {f"{t}@{n}": _mean(cells[(key_b, s, t, n)]) for t, n in cols}
            vals = [v for v in row.values() if v is not None]
            row["avg"] = _mean(vals) if len(vals) == len(cols) else None
            table[s] = row
            counts[s] = {f"{t}@{n}": len(cells[(key_b, s, t, n)]) for t, n in cols}
        out["budgets"][str(b)] = table
        out["counts"][str(b)] = counts
    return out


def _fmt(v):
    return "-" if v is None else f"{v:.1f}"


def markdown(summary: dict, title: str = "Accuracy (%)") -> str:
    """One markdown table per budget: rows strategies (dense first), columns task x length, then the
    average and the gap to dense."""
    tasks, lengths = summary["tasks"], summary["lengths"]
    cols = [(t, n) for t in tasks for n in lengths]
    head = ["strategy"] + [f"{t} {length_label(n)}" for t, n in cols] + ["avg", "avg - dense"]
    s = summary.get("setting") or {}
    lines = [f"# {title}", ""]
    if s:
        lines += [f"model `{s.get('model_dir')}`, k_min {s.get('k_min')}, max new tokens {s.get('max_new_tokens')}, "
                  f"haystack {s.get('haystack')}, device {s.get('device')}, dtype {s.get('dtype')}", ""]
    for b, table in summary["budgets"].items():
        counts = summary["counts"][b]
        n_min = min((c for row in counts.values() for c in row.values()), default=0)
        n_max = max((c for row in counts.values() for c in row.values()), default=0)
        n_text = f"{n_min}" if n_min == n_max else f"{n_min}-{n_max}"
        lines += [f"## rho = {b} ({n_text} samples per cell)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        dense_avg = table.get("dense", {}).get("avg")
        for name, row in table.items():
            gap = None if (row["avg"] is None or dense_avg is None) else row["avg"] - dense_avg
            gap_text = "" if name == "dense" else ("-" if gap is None else f"{gap:+.1f}")
            vals = [_fmt(row[f"{t}@{n}"]) for t, n in cols] + [_fmt(row["avg"]), gap_text]
            lines.append("| " + " | ".join([name] + vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(summary: dict, path) -> str:
    """Mean score against budget, one line per strategy (dense: a dashed line), one panel per task and
    one for the average over tasks. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [float(b) for b in summary["budgets"]]
    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    keys = list(summary["budgets"])
    panels = summary["tasks"] + ["all tasks"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        cols = [c for c in summary["columns"] if panel == "all tasks" or c.split("@")[0] == panel]
        for name in summary["strategies"]:
            ys = []
            for i in order:
                row = summary["budgets"][keys[i]][name]
                vals = [row[c] for c in cols if row[c] is not None]
                ys.append(sum(vals) / len(vals) if len(vals) == len(cols) and vals else float("nan"))
            xs = [budgets[i] for i in order]
            if name == "dense":
                ax.plot(xs, ys, "k--", lw=1.2, label="dense")
            else:
                ax.plot(xs, ys, marker="o", ms=4, label=name)
        ax.set_title(panel)
        ax.set_xlabel("budget rho")
        ax.set_xscale("log")
        ax.set_xticks([budgets[i] for i in order])
        ax.set_xticklabels([f"{budgets[i]:g}" for i in order])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
