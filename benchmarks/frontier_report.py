"""The report of benchmarks/frontier.py: accuracy against measured speedup for every plan of the frontier,
dense and the paper's recipe on the same axes; JSON + markdown + plot.

Eval runs live in EVAL/RUN/SET-LENGTH/results.jsonl (RUN: baselines for dense and oracle, default,
default-rhoX, head-C, layer-C, decodeonly-C, paper-C); plans, search reports and speed measurements in WORK/plans,
WORK/reports and WORK/speed (benchmarks/frontier_speed.py).

Headline: the mean score over the columns (task x length) of the tasks dense scores at least 20 on
(kascade.eval.report.headline_tasks), over both task sets: the headline tasks of the SmolLM2 evaluation
and the six structured families. A plan's `samples` is the fewest samples of its headline cells.

Two modes (frontier.MODES): the plain keys (`headline`, `samples`, `headline_vs_dense`, `goal`) are the sparse
prefill's, the mode of the prefill speedup; the same keys ending in `_decode_only` are decode-only mode's (dense
prefill, sparse decode: the default of kascade.enable and the vLLM plugin), whose speed is the decode speedup.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from frontier import (DEFAULT_PLAN, FAMILIES, HEADLINE_TASKS, LENGTHS, MODES, RHO, decode_only_plan, default_name,
                      frontier_plans)

TARGET_POINTS, TARGET_COST = 2.0, 6.0  # within 2 points of dense at no more than the paper's 6 equivalents
SERIES = {"head": "output-aware, head-granular", "layer": "output-aware, layer-granular",
          "decodeonly": "output-aware, head-granular, judged decode-only", "paper": "paper recipe",
          "default": "default plan"}
SPEED_KEYS = {  # JSON key -> speed file stem (benchmarks/frontier_speed.py)
    "decode_speedup_8b": "8b-decode-131072", "prefill_speedup_8b": "8b-prefill-131072",
    "decode_speedup_smollm2": "smollm2-decode-131072", "prefill_speedup_smollm2": "smollm2-prefill-131072",
    "decode_speedup_smollm2_8k": "smollm2-decode-8192", "prefill_speedup_smollm2_8k": "smollm2-prefill-8192"}


def collect(eval_dir: Path, runs: dict[str, float]) -> dict:
    """{(column, task, length): {seed: score}}: dense and oracle from the baselines' run, each plan's run
    (name -> its budget) from its own kascade rows (a plan run's dense rows are the baselines' or repeat them).
    Columns of decode-only mode end in "@decode-only" (column_name)."""
    from kascade.eval.command import read_results

    cells: dict = {}
    for path in sorted(Path(eval_dir).glob("*/*/results.jsonl")):
        run = path.parent.parent.name
        for row in read_results(path):
            s = row["strategy"]
            mode = next(m for m, suffix in reversed(MODES.items()) if s.endswith(suffix))  # "" ends every name
            base = s[: len(s) - len(MODES[mode])]
            if run == "baselines" and s == "dense":
                column = "dense"
            elif run == "baselines" and base == "oracle":
                column = column_name("oracle", mode)
            elif run in runs and base == "kascade" and abs(float(row["budget"]) - runs[run]) < 1e-9:
                column = column_name(run, mode)
            else:
                continue
            cells.setdefault((column, row["task"], int(row["length"])), {})[row["seed"]] = float(row["score"])
    return cells


def column_name(run: str, mode: str) -> str:
    """The cells' column of a run (a plan's name, or oracle) in a mode of MODES: the name itself with the
    sparse prefill, NAME@decode-only in decode-only mode."""
    return run if mode == "sparse" else f"{run}@{mode}"


def mode_key(key: str, mode: str) -> str:
    """A report key in a mode: `headline` -> `headline` (sparse prefill) or `headline_decode_only`."""
    return key if mode == "sparse" else f"{key}_{mode.replace('-', '_')}"


def _mean(v) -> float | None:
    return None if not v else round(100.0 * float(np.mean(list(v.values()))), 2)


def headline_tasks(cells: dict, lengths) -> list[str]:
    from kascade.eval.report import headline_tasks as pick

    dense = {f"{t}@{n}": _mean(cells.get(("dense", t, n))) for t in HEADLINE_TASKS + FAMILIES for n in lengths}
    return pick(dense, HEADLINE_TASKS + FAMILIES, lengths)


def score(cells: dict, column: str, tasks, lengths) -> tuple[float | None, int]:
    """(mean over the cells of `tasks` x `lengths`, fewest samples of a cell); (None, 0) while a cell is empty."""
    vals = [cells.get((column, t, n)) for t in tasks for n in lengths]
    if not vals or any(not v for v in vals):
        return None, 0
    return round(float(np.mean([_mean(v) for v in vals])), 2), min(len(v) for v in vals)


def paired(cells: dict, column: str, tasks, lengths) -> dict | None:
    """Mean and standard error (points) of column - dense over the samples both scored in the cells."""
    d = []
    for t in tasks:
        for n in lengths:
            a, b = cells.get((column, t, n)) or {}, cells.get(("dense", t, n)) or {}
            d += [a[k] - b[k] for k in sorted(set(a) & set(b))]
    if not d:
        return None
    d = np.array(d) * 100.0
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": round(float(d.mean()), 2), "se": round(se, 2), "samples": len(d)}


def _speeds(work: Path) -> dict:
    out = {}
    for path in sorted((Path(work) / "speed").glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def _series(name: str) -> str:
    return "default" if name.startswith("default") else name.split("-")[0]


def plan_rows(work: Path, cells: dict, heads: list[str], lengths, default_plan: Path) -> list[dict]:
    from kascade.plan import Plan

    speeds = _speeds(work)
    reports = {p.stem: json.loads(p.read_text()) for p in sorted((Path(work) / "reports").glob("*.json"))}
    held = reports.get("heldout", {})
    searched = {k: v for r in (reports.get("head", {}), reports.get("layer", {}), reports.get("decodeonly", {}))
                for k, v in r.get("plans", {}).items()}
    rows = []
    for name, (path, rho) in frontier_plans(work, default_plan).items():
        plan = Plan.load(path)
        row = {"name": name, "series": _series(name), "recipe": plan.recipe,
               "granularity": "head" if plan.head_granular else "layer", "cost": plan.selecting_layers_equivalent,
               "rho": rho, "anchors": plan.anchors, "plan_file": _relative(path)}
        for mode in MODES:
            column = column_name(name, mode)
            headline, samples = score(cells, column, heads, lengths)
            row |= {mode_key("headline", mode): headline, mode_key("samples", mode): samples,
                    mode_key("headline_vs_dense", mode): paired(cells, column, heads, lengths) if samples else None,
                    mode_key("tasks_score", mode): score(cells, column, [t for t in heads if t in HEADLINE_TASKS],
                                                         lengths)[0],
                    mode_key("families_score", mode): score(cells, column, [t for t in heads if t in FAMILIES],
                                                            lengths)[0],
                    mode_key("cells", mode): {f"{t}@{n}": _mean(cells.get((column, t, n)))
                                              for t in HEADLINE_TASKS + FAMILIES for n in lengths}}
        for key, stem in SPEED_KEYS.items():
            entry = speeds.get(stem, {}).get("plans", {}).get(name, {})
            row[key] = round(entry["speedup"], 3) if "speedup" in entry else None
            if stem.startswith("8b-") and "selecting_layers_equivalent" in entry:
                row["cost_8b"] = entry["selecting_layers_equivalent"]
                row[f"predicted_{key}"] = round(entry["predicted_speedup"], 3)
        kl = searched.get(name) or held.get("calibration", {}).get(name) or {}
        row["calibration_kl"] = kl.get("worst_family")  # in the mode the plan was judged in
        row["heldout_kl"] = held.get("plans", {}).get(name, {}).get("worst_family")
        row["heldout_kl_decode_only"] = held.get("plans_decode_only", {}).get(name, {}).get("worst_family")
        rows.append(row)
    order = list(SERIES)
    return sorted(rows, key=lambda r: (order.index(r["series"]), r["cost"], r["rho"] != RHO, r["rho"]))


def _relative(path) -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return Path(path).name


def goal(rows: list[dict], dense: float | None, mode: str = "sparse") -> dict:
    """Per series, the cheapest plan within TARGET_POINTS of dense (at rho 0.1) in `mode`, and whether one of them
    costs at most TARGET_COST."""
    key = mode_key("headline", mode)
    out = {"points_of_dense": TARGET_POINTS, "max_cost": TARGET_COST, "mode": mode, "cheapest_within": {}}
    for series in SERIES:
        ok = [r for r in rows if r["series"] == series and r["rho"] == RHO and r[key] is not None
              and dense is not None and r[key] >= dense - TARGET_POINTS]
        best = min(ok, key=lambda r: r["cost"], default=None)
        out["cheapest_within"][series] = None if best is None else {"name": best["name"], "cost": best["cost"]}
    hits = [v for v in out["cheapest_within"].values() if v and v["cost"] <= TARGET_COST]
    out["met"] = bool(hits) if dense is not None else None
    return out


def write_report(work: Path, eval_dir: Path, output: str, meta_path: str | None = None,
                 default_plan: Path = DEFAULT_PLAN, lengths=LENGTHS) -> dict:
    runs = {name: rho for name, (_, rho) in frontier_plans(work, default_plan).items()}
    cells = collect(eval_dir, runs)
    lengths = sorted({k[2] for k in cells if k[0] == "dense"}) or list(lengths)
    heads = headline_tasks(cells, lengths)
    dense, dense_n = score(cells, "dense", heads, lengths)
    oracle, _ = score(cells, "oracle", heads, lengths)
    oracle_decode_only, _ = score(cells, column_name("oracle", "decode-only"), heads, lengths)
    rows = plan_rows(work, cells, heads, lengths, default_plan)
    speed = {stem: {"device": sorted({r["device"] for r in d["runs"]}), "shape": d["fingerprint"], "phase": d["phase"],
                    "N": d["N"], "dense": [{"run": r["index"], "baseline": r["dense"]["baseline"],
                                            "ms": r["dense"]["model"][r["dense"]["baseline"]]["ms"],
                                            "best": r["dense"]["best"],
                                            "best_ms": r["dense"]["model"][r["dense"]["best"]]["ms"]}
                                           for r in d["runs"]],
                    "plans": {k: {kk: v.get(kk) for kk in ("ms", "p20", "p80", "speedup", "speedup_vs_best_dense",
                                                            "predicted_speedup", "selecting_layers_equivalent",
                                                            "anchors", "error", "run")}
                              for k, v in d["plans"].items()}}
             for stem, d in _speeds(work).items()}
    doc = {"meta": json.loads(Path(meta_path).read_text()) if meta_path else {}, "model": "SmolLM2-135M-Instruct",
           "rho": RHO, "lengths": lengths, "tasks": list(HEADLINE_TASKS), "families": list(FAMILIES),
           "headline_tasks": heads, "dense_headline": dense, "dense_samples": dense_n, "oracle_headline": oracle,
           "oracle_headline_decode_only": oracle_decode_only,
           "dense_cells": {f"{t}@{n}": _mean(cells.get(("dense", t, n))) for t in HEADLINE_TASKS + FAMILIES
                           for n in lengths},
           "goal": goal(rows, dense), "goal_decode_only": goal(rows, dense, "decode-only"), "plans": rows,
           "speed": speed}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    Path(output + ".md").write_text(markdown(doc))
    plot(doc, output + ".png")
    return doc


def _f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def _pair(v):
    return "-" if not v else f"{v['mean']:+.1f} ± {v['se']:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    devices = sorted({d for s in doc["speed"].values() for d in s["device"]})
    lines = [f"# Accuracy against measured speedup: SmolLM2-135M-Instruct, {m.get('device', '?')}, "
             f"{m.get('date', '?')}", "",
             f"torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, transformers {m.get('transformers', '?')}; "
             f"bf16, Triton kernels, greedy, rho {doc['rho']} unless named, lengths "
             f"{', '.join(map(str, doc['lengths']))}. "
             f"Headline: mean over the columns of the tasks dense scores at least 20 on "
             f"({', '.join(doc['headline_tasks']) or 'none yet'}), from the SmolLM2 headline tasks and the six "
             f"structured families. Dense {_f(doc['dense_headline'])} ({doc['dense_samples']} samples per cell), "
             f"oracle (per-layer top-k) {_f(doc['oracle_headline'])} with the sparse prefill, "
             f"{_f(doc['oracle_headline_decode_only'])} decode-only. Each plan runs in both modes: with the sparse "
             f"prefill (the prefill speedup's mode) and decode-only (dense prefill, sparse decode; the default of "
             f"kascade.enable and the vLLM plugin). Speedups: the whole model's attention, "
             f"Kascade with the plan against dense in the same process, batch 1, measured on "
             f"{', '.join(devices) or 'no GPU yet'} (benchmarks/frontier_speed.py: decode as one CUDA graph per model "
             f"step, prefill as the whole prompt pass); on the 8B shape a plan runs mapped at the same cost. "
             f"Cost: selecting-layer equivalents of 30 layers.", ""]
    for g in (doc["goal"], doc["goal_decode_only"]):
        within = ", ".join(f"{SERIES[s]}: {v['name']} ({v['cost']:g})" if v else f"{SERIES[s]}: none"
                           for s, v in g["cheapest_within"].items())
        met = {True: "met", False: "not met", None: "not known yet"}[g["met"]]
        mode = "with the sparse prefill" if g["mode"] == "sparse" else "decode-only"
        lines += [f"Goal {mode} (within {g['points_of_dense']:g} points of dense at no more than {g['max_cost']:g} "
                  f"equivalents): {met}. Cheapest plan within {g['points_of_dense']:g} points, per series: {within}.",
                  ""]
    lines += ["| plan | recipe | granularity | cost | rho | headline | - dense (paired) | samples | tasks | families | "
              "headline decode-only | - dense (paired) | "
              "decode 8B | prefill 8B | decode SmolLM2 128K | prefill SmolLM2 128K | decode SmolLM2 8K | "
              "prefill SmolLM2 8K | KL calib. | KL held out | KL held out, decode-only |", "|" + "---|" * 21]
    for r in doc["plans"]:
        lines.append(f"| {r['name']} | {r['recipe']} | {r['granularity']} | {r['cost']:g} | {r['rho']:g} | "
                     f"{_f(r['headline'])} | {_pair(r['headline_vs_dense'])} | "
                     f"{r['samples']} | {_f(r['tasks_score'])} | {_f(r['families_score'])} | "
                     f"{_f(r['headline_decode_only'])} | {_pair(r['headline_vs_dense_decode_only'])} | "
                     f"{_x(r['decode_speedup_8b'])} | {_x(r['prefill_speedup_8b'])} | "
                     f"{_x(r['decode_speedup_smollm2'])} | "
                     f"{_x(r['prefill_speedup_smollm2'])} | {_x(r['decode_speedup_smollm2_8k'])} | "
                     f"{_x(r['prefill_speedup_smollm2_8k'])} | {_f(r['calibration_kl'], '.4f')} | "
                     f"{_f(r['heldout_kl'], '.4f')} | {_f(r['heldout_kl_decode_only'], '.4f')} |")
    cols = list(doc["dense_cells"])
    lines += ["", "## Every cell (score %)", "", "| plan | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1),
              "| dense | " + " | ".join(_f(doc["dense_cells"][c]) for c in cols) + " |"]
    for r in doc["plans"]:
        if not decode_only_plan(r["name"]):
            lines.append(f"| {r['name']} | " + " | ".join(_f(r["cells"][c]) for c in cols) + " |")
        lines.append(f"| {r['name']}, decode-only | " + " | ".join(_f(r["cells_decode_only"][c]) for c in cols) + " |")
    if doc["speed"]:
        lines += ["", "## Speed measurements", "",
                  "| measurement | device | dense baseline (ms) | best dense (ms) | plan | cost there | ms | speedup | "
                  "vs best dense | cost model |", "|" + "---|" * 10]
        for stem, s in doc["speed"].items():
            dense = {d["run"]: d for d in s["dense"]}
            for name, p in s["plans"].items():
                d = dense.get(p.get("run"), {})
                lines.append(f"| {stem} | {', '.join(s['device'])} | "
                             f"{d.get('baseline', '-')} {_f(d.get('ms'), '.3f')} | "
                             f"{d.get('best', '-')} {_f(d.get('best_ms'), '.3f')} | {name} | "
                             f"{_f(p.get('selecting_layers_equivalent'), 'g')} | "
                             f"{_f(p.get('ms'), '.3f') if not p.get('error') else 'failed'} | {_x(p.get('speedup'))} | "
                             f"{_x(p.get('speedup_vs_best_dense'))} | {_x(p.get('predicted_speedup'))} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = (("cost", "selecting-layer equivalents (30 layers)", tuple(MODES)),
                 ("decode_speedup_8b", "decode attention speedup, 8B shape, 128K", tuple(MODES)),
                 ("prefill_speedup_8b", "prefill attention speedup, 8B shape, 128K", ("sparse",)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    styles = {"head": ("C0", "o"), "layer": ("C2", "s"), "decodeonly": ("C4", "v"), "paper": ("C3", "^"),
              "default": ("C1", "D")}
    lines = {"sparse": "-", "decode-only": "--"}  # decode-only: hollow markers, dashed
    dense = doc["dense_headline"]
    for ax, (key, label, modes) in zip(axes, axes_keys):
        for series, (color, marker) in styles.items():
            for mode in modes:
                y_key = mode_key("headline", mode)
                pts = sorted(((r[key], r[y_key], r) for r in doc["plans"] if r["series"] == series
                              and r[key] is not None and r[y_key] is not None), key=lambda p: p[:2])
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, ms=6,
                        label=SERIES[series] + ("" if mode == "sparse" else ", decode-only"),
                        ls="none" if series == "default" else lines[mode],
                        mfc=color if mode == "sparse" else "none")
                for x, y, r in pts:
                    tag = f"{r['cost']:g}" if series != "default" else f"rho {r['rho']:g}"
                    ax.annotate(tag, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=color)
        if dense is not None:
            ax.axhline(dense, color="k", lw=1, label="dense")
            ax.axhline(dense - TARGET_POINTS, color="k", lw=0.8, ls=":", label=f"dense - {TARGET_POINTS:g}")
            if key != "cost":
                ax.plot([1.0], [dense], "k*", ms=11)
        if doc["oracle_headline"] is not None:
            ax.axhline(doc["oracle_headline"], color="grey", lw=0.8, ls="--", label="oracle top-k")
        if key == "cost":
            ax.axvline(TARGET_COST, color="grey", lw=0.6, ls=":")
            ax.invert_xaxis()
        ax.set_xlabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("headline score (%)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"SmolLM2-135M-Instruct: accuracy against cost and measured speedup, rho {doc['rho']} (filled: "
                 f"sparse prefill; hollow: decode-only)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
