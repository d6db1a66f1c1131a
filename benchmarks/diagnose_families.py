"""Where reuse breaks on a format: per (layer, KV head), the share of the dense attention mass that a
plan's keys cover while the answer is generated, against per-layer top-k (oracle) at the same budget.

For each family, prompts of the evaluation task (seeds from --first-seed, outside the range the
evaluation tables use) are run densely with their expected answer appended; the answer tokens are fed
as decode steps, and at every layer each strategy picks its keys from the dense model's q and k
(kascade.eval.coverage). A unit whose coverage falls far below the oracle's is one whose borrowed keys
miss what that head attends to on this format.

    python benchmarks/diagnose_families.py MODEL_DIR --plan previous=plans/smollm2-135m-instruct.json \\
        --plan mixture=/tmp/gen/plans/mixture-10.json --families records,table --length 4096 --samples 4 \\
        -o benchmarks/results/diagnose_families_smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--plan", action="append", required=True, metavar="NAME=FILE")
    ap.add_argument("--families", default="records,json_records,table,code,multi_doc,chat_history")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=950_000)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--gap", type=float, default=0.2, help="list units whose coverage is this far below the oracle's")
    ap.add_argument("-o", "--output", required=True, help="output stem (.json, .md, .png)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)

    import torch

    from kascade.eval.coverage import measure
    from kascade.eval.strategies import make_strategy
    from kascade.eval.tasks import make_task
    from kascade.models import load_model
    from kascade.plan import Plan

    model, tok = load_model(args.model_dir, args.device, args.dtype)
    plans = dict(spec.split("=", 1) for spec in args.plan)
    result: dict = {"length": args.length, "samples": args.samples, "rho": args.rho, "gap": args.gap,
                    "plans": dict(plans), "families": {}}
    for fam in args.families.split(","):
        sums: dict = {}
        for i in range(args.samples):
            s = make_task(fam, args.length, tok, seed=args.first_seed + i)
            ids = tok(s.prompt + s.target).input_ids
            answer = len(ids) - len(tok(s.prompt).input_ids)
            strategies = {"oracle": make_strategy("oracle", None, model.config, args.rho, 128)}
            for name, path in plans.items():
                strategies[name] = make_strategy("kascade", Plan.load(path), model.config, args.rho, 128)
            res = measure(model, torch.tensor([ids]), strategies, decode_steps=max(1, answer))
            for name, cov in res["decode"].items():
                sums[name] = sums.get(name, 0) + cov / args.samples
        fam_out = {name: cov.tolist() for name, cov in sums.items()}
        gaps = {}
        for name in plans:
            diff = sums["oracle"] - sums[name]
            units = [(float(diff[layer, h]), layer, h) for layer in range(diff.shape[0]) for h in range(diff.shape[1])
                     if diff[layer, h] >= args.gap]
            gaps[name] = [{"layer": layer, "head": h, "gap": g, "coverage": float(sums[name][layer, h]),
                           "oracle": float(sums["oracle"][layer, h]),
                           "source": Plan.load(plans[name]).sources(layer, diff.shape[1])[h]}
                          for g, layer, h in sorted(units, reverse=True)]
        result["families"][fam] = {"coverage": fam_out, "gaps": gaps}
        print(f"{fam}: " + "; ".join(f"{n}: {len(g)} units >= {args.gap} below oracle, mean coverage "
                                     f"{np.mean(sums[n]):.3f} (oracle {np.mean(sums['oracle']):.3f})"
                                     for n, g in gaps.items()), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Decode-time coverage of the dense attention mass per (layer, KV head), {result['length']} tokens, "
             f"rho {result['rho']}, {result['samples']} prompts per family", "",
             f"Units whose coverage falls at least {result.get('gap', 0.2):g} below per-layer top-k (oracle) while the "
             "answer is generated; "
             "`source` is the (layer, head) whose keys the unit reads.", ""]
    for fam, r in result["families"].items():
        lines += [f"## {fam}", ""]
        for name, gaps in r["gaps"].items():
            cov = np.mean(r["coverage"][name])
            lines.append(f"- {name}: mean coverage {cov:.3f} (oracle {np.mean(r['coverage']['oracle']):.3f}); "
                         + (", ".join(f"L{g['layer']}h{g['head']} {g['coverage']:.2f}/{g['oracle']:.2f} "
                                      f"from L{g['source'][0]}h{g['source'][1]}" for g in gaps[:10]) or "no unit"))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(result["families"])
    names = [n for n in next(iter(result["families"].values()))["coverage"] if n != "oracle"]
    fig, axes = plt.subplots(len(names), len(fams), figsize=(2.2 * len(fams), 3.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, fam in enumerate(fams):
            cov = result["families"][fam]["coverage"]
            gap = np.array(cov["oracle"]) - np.array(cov[name])
            im = axes[i][j].imshow(gap, vmin=0, vmax=1, cmap="magma_r", aspect="auto")
            axes[i][j].set_title(f"{fam}\n{name}", fontsize=8)
            axes[i][j].set_xlabel("KV head", fontsize=7)
            if j == 0:
                axes[i][j].set_ylabel("layer", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="oracle coverage - plan coverage (decode)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
