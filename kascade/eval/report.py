"""Tables and plots of `kascade eval` results: mean scores per strategy, task, length and budget.

Scores are in percent. Dense does not depend on the budget (it is run once) and is shown in every
budget's table, first, with each strategy's gap to it.

Headline: the tasks on which dense scores at least `HEADLINE_MIN` (20) on average over the lengths are the
`headline_tasks`; a strategy's `headline` is its mean over the columns (task x length) of those tasks. Tasks
the model cannot do even densely say nothing about a sparse method, so the headline leaves them out; the
full average (`avg`) stays beside it.

    summary = summarise(rows, tasks, lengths, budgets, strategies)
    summary["headline_tasks"]                       # ["niah_single", "vt", ...]
    summary["budgets"]["0.1"]["kascade"]["headline"]  # mean % over the headline tasks' columns
    markdown(summary); plot_accuracy(summary, "accuracy_vs_budget.png")
"""

from __future__ import annotations

from collections import defaultdict


def length_label(n: int) -> str:
    """2048 -> "2K", 131072 -> "128K", 1000 -> "1000"."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


HEADLINE_MIN = 20.0


def headline_tasks(dense_row: dict, tasks, lengths, minimum: float = HEADLINE_MIN) -> list[str]:
    """The tasks whose dense score, averaged over the lengths that have one, is at least `minimum` (%)."""
    out = []
    for t in tasks:
        vals = [dense_row.get(f"{t}@{n}") for n in lengths]
        mean = _mean([v for v in vals if v is not None])
        if mean is not None and mean >= minimum:
            out.append(t)
    return out


def summarise(rows, tasks, lengths, budgets, strategies) -> dict:
    """{"budgets": {budget: {strategy: {"task@length": mean %, ..., "avg": mean of the cells, "headline": mean
    of the headline tasks' cells}}}, "counts": {...same keys: samples}, "tasks", "lengths", "strategies",
    "columns", "headline_tasks"}; dense appears under every budget. A mean over cells is None while one of
    them has no result."""
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
    dense_row = {f"{t}@{n}": _mean(cells[(None, "dense", t, n)]) for t, n in cols}
    heads = headline_tasks(dense_row, tasks, lengths) if "dense" in strategies else []
    head_cols = [f"{t}@{n}" for t in heads for n in lengths]
    for table in out["budgets"].values():
        for row in table.values():
            vals = [row[c] for c in head_cols if row[c] is not None]
            row["headline"] = _mean(vals) if head_cols and len(vals) == len(head_cols) else None
    out["headline_tasks"] = heads
    return out


def _fmt(v):
    return "-" if v is None else f"{v:.1f}"


def markdown(summary: dict, title: str = "Accuracy (%)") -> str:
    """One markdown table per budget: rows strategies (dense first), columns task x length, then the
    average and the gap to dense."""
    tasks, lengths = summary["tasks"], summary["lengths"]
    cols = [(t, n) for t in tasks for n in lengths]
    heads = summary.get("headline_tasks")
    head = (["strategy"] + [f"{t} {length_label(n)}" for t, n in cols] + ["avg", "avg - dense"]
            + (["headline", "headline - dense"] if heads is not None else []))
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
        lines += [f"## rho = {b} ({n_text} samples per cell)", ""]
        if heads is not None:
            lines += [f"Headline tasks (dense >= {HEADLINE_MIN:g} on average over lengths): "
                      + (", ".join(heads) if heads else "none") + ".", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        dense = table.get("dense", {})

        def gap(name, row, key):
            if name == "dense":
                return ""
            g = None if (row.get(key) is None or dense.get(key) is None) else row[key] - dense[key]
            return "-" if g is None else f"{g:+.1f}"

        for name, row in table.items():
            vals = [_fmt(row[f"{t}@{n}"]) for t, n in cols] + [_fmt(row["avg"]), gap(name, row, "avg")]
            if heads is not None:
                vals += [_fmt(row.get("headline")), gap(name, row, "headline")]
            lines.append("| " + " | ".join([name] + vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(summary: dict, path) -> str:
    """Score against budget, one line per strategy (dense: a dashed line). First panel: the headline (mean
    over the headline tasks; the average over every task when there is no headline); then one panel per task.
    Returns the path written."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [float(b) for b in summary["budgets"]]
    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    keys = list(summary["budgets"])
    heads = summary.get("headline_tasks")
    first = ("headline: " + ", ".join(heads)) if heads else "all tasks"
    first_tasks = heads if heads else summary["tasks"]
    panels = [(first, first_tasks)] + [(t, [t]) for t in summary["tasks"]]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, (title, tasks) in zip(axes.flat, panels):
        cols = [c for c in summary["columns"] if c.split("@")[0] in tasks]
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
        ax.set_title(title if len(title) < 60 else title[:57] + "...", fontsize=9)
        ax.set_xlabel("budget rho")
        ax.set_xscale("log")
        ax.set_xticks([budgets[i] for i in order])
        ax.set_xticklabels([f"{budgets[i]:g}" for i in order])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    for r in range(nrows):
        axes[r][0].set_ylabel("score (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:  # the legend in the first empty slot, else right of the panels
        spare[0].legend(handles, labels, fontsize=8, loc="center")
    else:
        fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
