"""The report of benchmarks/generalization.py: per family and length, dense against per-layer top-k
(oracle), the leave-one-family-out plan, the shipped plan (the default recipe's), the prose plan (shipped
before it), the full-mixture plans and the paper's recipe, with paired differences against dense (mean and
standard error over the same samples); JSON + markdown + plot.

Eval runs live in EVAL/RUN/FAMILY-LENGTH/results.jsonl (RUN: baselines, whose `kascade` is the prose plan;
shipped; mixture-COST, lofo-FAMILY-COST; RECIPE-mixture-COST, RECIPE-lofo-FAMILY-COST for the plans of another
calibration recipe, e.g. p66 for 66 calibration prompts; each with a -decode-only twin); plans and search
reports in WORK/plans and WORK/reports under the same names.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from kascade.eval.command import read_results
from report_json import repo_relative

HEADLINE_MIN = 20.0  # a family counts where dense scores at least this
TARGET_DENSE, TARGET_ORACLE = 3.0, 5.0  # points: a plan within these of dense and of per-layer top-k


def recipe_of(run: str) -> tuple[str, str]:
    """(recipe, run within it): ("p66", "mixture-10") for "p66-mixture-10"; ("", run) for the main recipe."""
    m = re.fullmatch(r"([a-z0-9]+)-((?:mixture|lofo)-.+)", run)
    return (m.group(1), m.group(2)) if m else ("", run)


def collect(eval_dir: Path) -> dict:
    """{(column, family, length): {seed: score}} with column one of dense, oracle, prose (the plan shipped before
    the default recipe's, run as `kascade` in the baselines), shipped (its own run), paper, mixture-COST, lofo-COST
    (each family's leave-one-out plan, run on that family only), and RECIPE:mixture-COST, RECIPE:lofo-COST for
    another recipe's plans; a decode-only row's column ends with DECODE_ONLY."""
    cells: dict = {}
    for path in sorted(eval_dir.glob("*/*/results.jsonl")):
        recipe, run = recipe_of(path.parent.parent.name)
        prefix = f"{recipe}:" if recipe else ""
        if run == DECODE_ONLY_RUN:  # decode-only runs: their rows' names say the mode
            run = "baselines"
        elif run.endswith("-" + DECODE_ONLY_RUN):
            run = run[: -len(DECODE_ONLY_RUN) - 1]
        for row in read_results(path):
            strategy, mode = _mode(row["strategy"])
            if run == "baselines":
                column = {"kascade": "prose", "kascade-paper": "paper"}.get(strategy, strategy)
            elif strategy != "kascade":  # a plan's run also scores dense: the baselines' dense is the one reported
                continue
            elif run.startswith("lofo-"):
                column = prefix + "lofo-" + run.rsplit("-", 1)[1]
            else:
                column = prefix + run
            column += mode
            cells.setdefault((column, row["task"], row["length"]), {})[row["seed"]] = float(row["score"])
    return cells


DECODE_ONLY = "+dense-prefill"  # a strategy's name in decode-only mode (dense prefill, sparse decode)
DECODE_ONLY_RUN = "decode-only"  # run folders of decode-only mode: decode-only (the baselines'), PLAN-decode-only


def _mode(strategy: str) -> tuple[str, str]:
    """("kascade", "+dense-prefill") for "kascade+dense-prefill"; (strategy, "") for a sparse-prefill one."""
    return (strategy[: -len(DECODE_ONLY)], DECODE_ONLY) if strategy.endswith(DECODE_ONLY) else (strategy, "")


def _mean(v):
    return None if not v else round(100.0 * float(np.mean(list(v.values()))), 2)


def _paired(a: dict | None, b: dict | None):
    """(mean, standard error) in points of a - b over the samples both scored; None without a common sample."""
    common = sorted(set(a or {}) & set(b or {}))
    if not common:
        return None
    d = np.array([a[k] - b[k] for k in common]) * 100.0
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    lost, gained = int((d < 0).sum()), int((d > 0).sum())
    return {"mean": round(float(d.mean()), 2), "se": round(se, 2), "samples": len(common), "lost": lost,
            "gained": gained, "sign_p": round(sign_test(lost, gained), 4)}


def sign_test(lost: int, gained: int) -> float:
    """Exact two-sided sign test of the samples one side lost against those it gained (ties left out): the
    probability, were either side equally likely to win each changed sample, of a split at least this uneven."""
    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def rows_of(cells: dict, shipped_cost, loo_cost: str) -> list[dict]:
    """One row per (family, length) that has a dense score."""
    out = []
    mixtures = sorted({k[0].removesuffix(DECODE_ONLY) for k in cells if k[0].startswith("mixture-")},
                      key=lambda c: -float(c.split("-")[1]))
    for (column, fam, length) in sorted({k for k in cells if k[0] == "dense"}, key=lambda k: (k[1], k[2])):
        cell = lambda c: cells.get((c, fam, length))  # noqa: E731
        dense = cell("dense")
        row = {"name": fam, "length": length, "samples": len(dense), "dense": _mean(dense), "oracle": _mean(cell("oracle")),
               "kascade_leave_one_out": _mean(cell(f"lofo-{loo_cost}")), "kascade_shipped": _mean(cell("shipped")),
               "kascade_prose": _mean(cell("prose")), "kascade_paper": _mean(cell("paper")), "cost": float(loo_cost),
               "cost_shipped": shipped_cost}
        for c in mixtures:
            row[f"kascade_{c.replace('-', '_')}"] = _mean(cell(c))
        p = row["dense"] / 100.0
        row["dense_se"] = round(100.0 * float(np.sqrt(p * (1 - p) / len(dense))), 2)
        plans = (("kascade_leave_one_out", f"lofo-{loo_cost}"), ("kascade_shipped", "shipped"),
                 ("kascade_prose", "prose"))
        row["paired_vs_dense"] = {k: _paired(cell(c), dense) for k, c in plans + (("oracle", "oracle"),)}
        # the loss of reuse alone: a plan against per-layer top-k at the same budget, sample by sample
        row["paired_vs_oracle"] = {k: _paired(cell(c), cell("oracle")) for k, c in plans}
        row["headline"] = row["dense"] is not None and row["dense"] >= HEADLINE_MIN
        row["holds"] = {k: _holds(row, k) for k in HOLDS} if row["headline"] else {}
        # decode-only mode: the same strategies with a dense prefill; held against dense and its own oracle
        only = {"oracle": cell("oracle" + DECODE_ONLY), "kascade_shipped": cell("shipped" + DECODE_ONLY),
                "kascade_prose": cell("prose" + DECODE_ONLY),
                "kascade_leave_one_out": cell(f"lofo-{loo_cost}" + DECODE_ONLY),
                **{f"kascade_{c.replace('-', '_')}": cell(c + DECODE_ONLY) for c in mixtures}}
        if any(only.values()):
            do = {k: _mean(v) for k, v in only.items()}
            do["paired_vs_dense"] = {k: _paired(v, dense) for k, v in only.items()}
            do["holds"] = {k: _holds(dict(do, dense=row["dense"]), k) for k in HOLDS} if row["headline"] else {}
            row["decode_only"] = do
        row["recipes"] = {}
        for recipe in sorted({k[0].split(":")[0] for k in cells if ":" in k[0]}):
            plans = {c.split(":")[1]: cells[(c, fam, length)] for c in {k[0] for k in cells}
                     if c.startswith(recipe + ":") and (c, fam, length) in cells}
            got = {name: {"score": _mean(v), "paired_vs_dense": _paired(v, dense)} for name, v in sorted(plans.items())}
            if got:
                row["recipes"][recipe] = got
        out.append(row)
    return out


HOLDS = ("kascade_leave_one_out", "kascade_shipped", "kascade_prose")
HOLDS_LABEL = "holds (loo / shipped / prose)"


def _holds(row: dict, key: str):
    v = row.get(key)
    if v is None or row["oracle"] is None:
        return None
    return v >= row["dense"] - TARGET_DENSE and v >= row["oracle"] - TARGET_ORACLE


def targets_hold(rows: list[dict]) -> dict:
    """Per mode and plan, over the counting cells the plan ran: {"cells": n, "held": m}; "decode_only" is
    kascade.enable's default mode, "sparse_prefill" the paper's."""
    out = {}
    for mode, holds_of in (("decode_only", lambda r: (r.get("decode_only") or {}).get("holds", {})),
                           ("sparse_prefill", lambda r: r["holds"])):
        out[mode] = {}
        for key in HOLDS:
            got = [holds_of(r).get(key) for r in rows if r["headline"]]
            got = [g for g in got if g is not None]
            out[mode][key] = {"cells": len(got), "held": sum(got)}
    return out


def write_report(work: Path, eval_dir: Path, output: str, meta_path: str | None, shipped_plan: Path | None = None,
                 loo_cost: str = "10", prose_plan: Path | None = None) -> None:
    cells = collect(eval_dir)
    plans = {p.stem: json.loads(p.read_text()) for p in sorted((work / "plans").glob("*.json"))}
    reports = {p.stem: json.loads(p.read_text()) for p in sorted((work / "reports").glob("*.json"))}
    shipped = json.loads(Path(shipped_plan).read_text()) if shipped_plan and Path(shipped_plan).is_file() else {}
    rows = rows_of(cells, shipped.get("selecting_layers_equivalent"), loo_cost)
    meta = json.loads(Path(meta_path).read_text()) if meta_path else {}
    searches = {name: {k: r.get(k) for k in ("seconds", "plans_measured", "peak_gpu_bytes", "divergence",
                                             "divergence_by_family", "paper_divergence", "leave_out", "objective")}
                | {"anchors": plans[name]["anchors"], "cost": plans[name]["selecting_layers_equivalent"],
                   "settings": {k: plans[name]["provenance"].get(k) for k in ("search_step", "search_candidates",
                                                                               "num_prompts", "prompt_tokens")}}
                for name, r in reports.items() if name in plans}
    doc = {"meta": meta, "model": "SmolLM2-135M-Instruct", "rho": 0.1,
           "shipped_plan": repo_relative(shipped_plan) if shipped_plan else None,
           "prose_plan": repo_relative(prose_plan) if prose_plan else None, "leave_one_out_cost": float(loo_cost),
           "targets": {"dense_points": TARGET_DENSE, "oracle_points": TARGET_ORACLE, "headline_dense_min": HEADLINE_MIN},
           "families": rows, "targets_hold": targets_hold(rows), "searches": searches}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output + ".json").write_text(json.dumps(doc, indent=1))
    Path(output + ".md").write_text(markdown(doc))
    plot(doc, output + ".png")


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def _pair(v):
    return "-" if not v else f"{v['mean']:+.1f} ± {v['se']:.1f}"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    rows = doc["families"]
    mixtures = sorted({k for r in rows for k in r if k.startswith("kascade_mixture_")},
                      key=lambda k: -float(k.rsplit("_", 1)[1]))
    head = (["family", "length", "samples", "dense", "oracle", "leave-one-out", "shipped plan", "prose plan",
             "paper recipe"] + [k.replace("kascade_", "").replace("_", "-") for k in mixtures]
            + ["leave-one-out - dense (paired)", "shipped - dense (paired)", "prose - dense (paired)", HOLDS_LABEL])
    lines = [f"# Generalization to formats unlike calibration: SmolLM2-135M-Instruct, {m.get('device', '?')}, "
             f"{m.get('date', '?')}", "",
             f"torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, transformers {m.get('transformers', '?')}; "
             f"bf16, Triton kernels, greedy, rho {doc['rho']}, scores in points. Leave-one-out: the plan of "
             f"{doc['leave_one_out_cost']:g} selecting-layer equivalents calibrated on the format mixture without any "
             f"prompt of that family's kind. Shipped plan: `{doc['shipped_plan']}`, `kascade calibrate`'s default "
             f"recipe (the whole mixture). Prose plan: `{doc.get('prose_plan')}`, the plan shipped before it, "
             f"calibrated on prose formats only. mixture-C: calibrated on the whole "
             f"mixture at C equivalents. Paired difference: mean ± standard error over the same samples. A family "
             f"counts where dense >= {doc['targets']['headline_dense_min']:g}; target: within "
             f"{doc['targets']['dense_points']:g} points of dense and {doc['targets']['oracle_points']:g} of oracle.",
             "", _summary(doc), "", "## With the sparse prefill", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        holds = " / ".join({True: "yes", False: "no", None: "-"}[r["holds"].get(k)] for k in HOLDS) \
            if r["headline"] else "(dense < 20)"
        vals = ([r["name"], str(r["length"]), str(r["samples"]), f"{_f(r['dense'])} ± {r['dense_se']:.1f}",
                 _f(r["oracle"]), _f(r["kascade_leave_one_out"]), _f(r["kascade_shipped"]), _f(r.get("kascade_prose")),
                 _f(r["kascade_paper"])]
                + [_f(r.get(k)) for k in mixtures]
                + [_pair(r["paired_vs_dense"].get(k)) for k in HOLDS] + [holds])
        lines.append("| " + " | ".join(vals) + " |")
    lines += _sources_table(rows)
    lines += _decode_only_table(rows)
    lines += _churn_table(rows)
    lines += _recipe_tables(rows)
    lines += ["", "## Calibration searches", "", "| search | prompts | cost | anchors | mean KL | worst family KL | "
              "paper recipe KL | plans measured | seconds | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in doc["searches"].items():
        fam = s.get("divergence_by_family") or {}
        worst = max(fam.items(), key=lambda kv: kv[1]) if fam else ("-", float("nan"))
        peak = s.get("peak_gpu_bytes")
        prompts = (s.get("settings") or {}).get("num_prompts")
        lines.append(f"| {name} | {prompts or '-'} | {s['cost']:.2f} | {s['anchors']} | {s['divergence']:.4f} | {worst[0]} {worst[1]:.4f} | "
                     f"{s['paper_divergence']:.4f} | {s['plans_measured']} | {s['seconds']:.0f} | "
                     f"{'-' if peak is None else f'{peak / 2**30:.1f}'} |")
    return "\n".join(lines) + "\n"


def _summary(doc: dict) -> str:
    """One line per mode: over the counting cells each plan ran, how many hold the targets."""
    names = {"kascade_leave_one_out": "leave-one-out plans", "kascade_shipped": "shipped plan",
             "kascade_prose": "prose plan"}
    lines = []
    for mode, label in (("decode_only", "Decode-only mode (kascade.enable's default)"),
                        ("sparse_prefill", "With the sparse prefill (the paper's method)")):
        got = doc.get("targets_hold", {}).get(mode, {})
        parts = [f"{names[k]} {v['held']} of {v['cells']}" for k, v in got.items() if v["cells"]]
        lines.append(f"- {label}: cells holding the targets: " + (", ".join(parts) if parts else "none run") + ".")
    return "\n".join(lines)


def _sources_table(rows: list[dict]) -> list[str]:
    """The loss split in two, on the cells where dense counts: the budget's (per-layer top-k against dense)
    and the reuse's (a plan against per-layer top-k), each paired over the same samples."""
    cells = [r for r in rows if r["headline"] and r.get("paired_vs_oracle")]
    if not cells:
        return []
    out = ["", "## Where the loss comes from", "",
           "Paired differences in points (mean ± standard error over the same samples): the budget's loss is "
           "per-layer top-k (oracle) against dense; the reuse's loss is a plan against per-layer top-k.", "",
           "| family | length | budget: oracle - dense | reuse: shipped - oracle | reuse: prose - oracle | "
           "reuse: leave-one-out - oracle |", "|---|---|---|---|---|---|"]
    for r in cells:
        vo = r["paired_vs_oracle"]
        out.append(f"| {r['name']} | {r['length']} | {_pair(r['paired_vs_dense']['oracle'])} | "
                   f"{_pair(vo.get('kascade_shipped'))} | {_pair(vo.get('kascade_prose'))} | "
                   f"{_pair(vo.get('kascade_leave_one_out'))} |")
    return out


def _decode_only_table(rows: list[dict]) -> list[str]:
    """The cells run in decode-only mode (dense prefill, sparse decode: `NAME+dense-prefill`), held against dense
    and against per-layer top-k in the same mode."""
    cells = [r for r in rows if r.get("decode_only")]
    if not cells:
        return []
    # whole-mixture plans run in this mode: a column each (score, and in brackets its paired difference to dense)
    mixtures = sorted({k for r in cells for k, v in r["decode_only"].items() if k.startswith("kascade_mixture_")
                       and v is not None}, key=lambda k: -float(k.rsplit("_", 1)[1]))
    out = ["", "## Decode-only mode (dense prefill, sparse decode)", "",
           "The same strategies with the prompt attended densely and every decode step sparsely "
           "(`kascade eval --sparse-prefill no`); targets as above, against dense and against per-layer top-k in this "
           "mode. Paired differences against dense" + (" (in brackets for the whole-mixture plans)" if mixtures else "")
           + ".", "",
           "| family | length | dense | oracle | shipped plan | prose plan | leave-one-out | oracle - dense | "
           "shipped - dense | prose - dense | leave-one-out - dense | " + HOLDS_LABEL + " |"
           + "".join(f" {k[len('kascade_'):].replace('_', '-')} |" for k in mixtures),
           "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(mixtures)]
    for r in cells:
        d = r["decode_only"]
        holds = " / ".join({True: "yes", False: "no", None: "-"}[d["holds"].get(k)] for k in HOLDS) \
            if r["headline"] else "(dense < 20)"
        pv = d["paired_vs_dense"]
        extra = "".join(f" {_f(d.get(k))} ({_pair(pv.get(k))}) |" if d.get(k) is not None else " - |" for k in mixtures)
        out.append(f"| {r['name']} | {r['length']} | {_f(r['dense'])} | {_f(d['oracle'])} | {_f(d['kascade_shipped'])} | "
                   f"{_f(d.get('kascade_prose'))} | {_f(d['kascade_leave_one_out'])} | {_pair(pv['oracle'])} | "
                   f"{_pair(pv['kascade_shipped'])} | {_pair(pv.get('kascade_prose'))} | "
                   f"{_pair(pv['kascade_leave_one_out'])} | {holds} |{extra}")
    return out


def _churn_table(rows: list[dict]) -> list[str]:
    """Per counting cell, the samples each strategy lost and gained against dense, with the sign test's p: how
    much of a difference is answers moving both ways (a small model's greedy answers flip under any change)."""
    cells = [r for r in rows if r["headline"]]
    if not cells:
        return []
    keys = (("oracle", "oracle"), ("kascade_shipped", "shipped plan"), ("kascade_prose", "prose plan"),
            ("kascade_leave_one_out", "leave-one-out"))
    out = ["", "## Answers lost and gained against dense", "",
           "Samples where the strategy scores below dense / above dense (ties left out), and the exact two-sided sign "
           "test's p of that split: a small p says the strategy's loss is not answers moving both ways by chance.", "",
           "| family | length | " + " | ".join(name for _, name in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in cells:
        vals = []
        for k, _ in keys:
            v = r["paired_vs_dense"].get(k)
            vals.append("-" if not v or "lost" not in v else f"{v['lost']} / {v['gained']} (p {v['sign_p']:.2f})")
        out.append(f"| {r['name']} | {r['length']} | " + " | ".join(vals) + " |")
    return out


def _recipe_tables(rows: list[dict]) -> list[str]:
    """One table per other recipe, on the cells where dense counts: its plans beside dense, oracle and the
    prose plan, each with its paired difference against dense, and the mean over the cells every plan ran."""
    out = []
    for recipe in sorted({k for r in rows for k in r.get("recipes", {})}):
        names = sorted({n for r in rows for n in r["recipes"].get(recipe, {})})
        cells = [r for r in rows if r["headline"] and recipe in r["recipes"]]
        head = ["family", "length", "samples", "dense", "oracle", "prose plan"] + [f"{recipe} {n}" for n in names]
        out += ["", f"## Calibration recipe {recipe}", "", "Scores, and in brackets the paired difference against "
                "dense (mean ± standard error), on the cells where dense >= 20 that the recipe's plans ran.", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in cells:
            got = r["recipes"][recipe]
            vals = [r["name"], str(r["length"]), str(r["samples"]), _f(r["dense"]), _f(r["oracle"]),
                    f"{_f(r['kascade_prose'])} ({_pair(r['paired_vs_dense']['kascade_prose'])})"]
            vals += [f"{_f(got[n]['score'])} ({_pair(got[n]['paired_vs_dense'])})" if n in got else "-" for n in names]
            out.append("| " + " | ".join(vals) + " |")
        every = [n for n in names if all(n in r["recipes"][recipe] for r in cells)]  # plans run on every cell
        if cells and every:
            mean = lambda xs: f"{np.mean(xs):.1f}"  # noqa: E731
            out.append(f"| mean of the {len(cells)} cells | | | {mean([r['dense'] for r in cells])} | "
                       f"{mean([r['oracle'] for r in cells])} | {mean([r['kascade_prose'] for r in cells])} | "
                       + " | ".join(mean([r["recipes"][recipe][n]["score"] for r in cells]) if n in every else "-"
                                    for n in names) + " |")
    return out


def plot(doc: dict, path: str) -> None:
    """Scores per counting-or-not cell, one panel per mode (decode-only: the default); a strategy not run in a
    mode has no bar there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["families"]
    cols = [("dense", "dense"), ("oracle", "oracle (per-layer top-k)"), ("kascade_leave_one_out", "leave-one-out plan"),
            ("kascade_shipped", "shipped plan"), ("kascade_prose", "prose plan"), ("kascade_mixture_10", "mixture-10"),
            ("kascade_paper", "paper recipe")]
    decode_rows = [r for r in rows if r.get("decode_only")]
    panels = [("with the sparse prefill", rows, lambda r, k: r.get(k))]
    if decode_rows:
        panels.insert(0, ("decode-only mode (the default)", decode_rows,
                          lambda r, k: r["dense"] if k == "dense" else r["decode_only"].get(k)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.1 * len(rows)), 3.6 * len(panels)), squeeze=False)
    w = 0.8 / len(cols)
    for ax, (title, cells, value) in zip(axes[:, 0], panels):
        x = np.arange(len(cells))
        for i, (key, label) in enumerate(cols):
            vals = [value(r, key) for r in cells]
            xs = [x[j] + (i - len(cols) / 2 + 0.5) * w for j, v in enumerate(vals) if v is not None]
            if xs:
                ax.bar(xs, [v for v in vals if v is not None], w, label=label, color=f"C{i}")
        ax.set_xticks(x, [f"{r['name']}\n{r['length']}" for r in cells], fontsize=7)
        ax.set(ylabel="score (%)", ylim=(0, 105), title=f"SmolLM2-135M, rho {doc['rho']}, {title}")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
