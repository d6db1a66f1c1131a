"""Mechanisms beyond the plan, judged on the model's outputs: divergence from dense on fresh held-out prompts.

    python benchmarks/mechanisms.py MODEL_DIR --plan plans/smollm2-135m-instruct.json --out DIR

Each mechanism is a strategy built on the calibrated plan (same budget, same selecting units). The
prompts are the calibration set's retrieval formats over `data/heldout.txt`, from seeds the plan's
calibration did not use (`--first-seed`), so neither the plan nor the choice between mechanisms sees
an evaluation task. Reported per mechanism: mean KL(dense || mechanism) of the next-token
distributions along the dense greedy continuation (nats) and the share of positions whose argmax is
the dense token, each also per prompt format. Writes DIR/mechanisms.json, .md and .png;
`python benchmarks/mechanisms.py --report IN.json OUT_STEM` rewrites them from a measured JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def mechanisms(plan, backend: str):
    """name -> (what it is, strategy)."""
    from kascade.eval import strategies as S

    return {
        "kascade": ("the plan as shipped", S.PlanStrategy("kascade", plan, backend)),
        "no-remap": ("identity head sources (`without_remap`)", S.PlanStrategy("no-remap", S.without_remap(plan), backend)),
        "sinks4+window64": ("4 sinks and the 64 newest keys kept in every set",
                            S.ForcedKeysStrategy("s", plan, sinks=4, window=64, backend=backend)),
        "sinks4+window256": ("4 sinks and the 256 newest keys kept in every set",
                             S.ForcedKeysStrategy("s", plan, sinks=4, window=256, backend=backend)),
        "sinks4": ("4 sinks kept in every set", S.ForcedKeysStrategy("s", plan, sinks=4, window=0, backend=backend)),
        "dense-anchors": ("anchors (all heads selecting) attend densely; the layers after them reuse",
                          S.PlanStrategy("d", plan, backend, dense_anchor_output=True)),
    }


def _mean(values) -> float:
    return sum(values) / len(values)


def write_report(data: dict, stem: Path) -> None:
    """stem.json, stem.md and stem.png (divergence per mechanism and prompt format) from the measurements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = data["meta"], data["rows"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    fmts = meta["formats"]
    lines = [f"# Mechanisms on the plan, {meta['device']}, {meta['date']}", "",
             f"`{meta['plan']}` at rho {meta['rho']}; {meta['prompts']} fresh held-out prompts of {meta['length']} "
             f"tokens (seeds {meta['seeds'][0]}-{meta['seeds'][1]}, formats {', '.join(fmts)}), "
             f"{meta['answer_tokens']} continuation tokens each; KL(dense || mechanism) in nats and argmax "
             f"agreement with dense. torch {meta['torch']}, triton {meta['triton']}, transformers "
             f"{meta['transformers']}.", "",
             "| mechanism | what | divergence | agreement | " + " | ".join(fmts) + " |",
             "|---|---|---|---|" + "---|" * len(fmts)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['what']} | {r['divergence']:.4f} | {r['agreement']:.3f} | "
                     + " | ".join(f"{r['divergence_by_format'][f]:.4f}" for f in fmts) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = list(rows)
    width = 0.8 / (len(fmts) + 1)
    for i, f in enumerate(["all"] + fmts):
        vals = [rows[n]["divergence"] if f == "all" else rows[n]["divergence_by_format"][f] for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=f, color=None if f != "all" else "k")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_ylabel("KL(dense || mechanism), nats")
    ax.set_title(f"{Path(meta['plan']).stem}, rho {meta['rho']}, {meta['length']} tokens, {meta['device']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print("\n".join(lines))


def main(argv=None) -> int:
    from report_json import rewrite_only

    if rewrite_only(argv, write_report):
        return 0
    import torch
    import transformers
    import triton

    from kascade.calibrate.output_aware import agreement, dense_trajectories, divergence
    from kascade.calibrate.retrieval import FORMATS, calibration_prompts
    from kascade.models import load_model
    from kascade.plan import Plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--data", default=ROOT / "data" / "heldout.txt", type=Path)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=1000, help="prompt seeds (the plan's calibration used 0..)")
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--only", default=None, help="comma-separated mechanism names (default: all)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model_dir)
    plan = dataclasses.replace(Plan.load(args.plan), rho=args.rho)
    plan.validate(model.config)
    provenance = plan.provenance or {}
    if args.first_seed < provenance.get("num_prompts", 0):
        raise ValueError(f"--first-seed: the plan was calibrated on seeds 0..{provenance['num_prompts'] - 1}; "
                         f"expected a first seed of at least {provenance['num_prompts']}, got {args.first_seed}")
    text = args.data.read_text(encoding="utf-8", errors="replace")
    prompts = calibration_prompts(tok, text, args.length, args.num_prompts, FORMATS, first_seed=args.first_seed)
    batches = dense_trajectories(model, prompts, args.answer_tokens, batch_size=1, backend=args.backend)
    kinds = [p.kind for p in prompts]
    table = mechanisms(plan, args.backend)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    rows = {}
    for name, (what, strategy) in table.items():
        t0 = time.perf_counter()  # one prompt per batch, all of one length: the mean over prompts is the mean
        div = [divergence(model, strategy, [b]) for b in batches]
        agree = [agreement(model, strategy, [b]) for b in batches]
        rows[name] = {"what": what, "divergence": _mean(div), "agreement": _mean(agree), "per_prompt": div,
                      "divergence_by_format": {f: _mean([d for d, k in zip(div, kinds) if k == f])
                                               for f in sorted(set(kinds))},
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:22s} divergence {rows[name]['divergence']:.4f}  agreement {rows[name]['agreement']:.3f}"
              f"  ({rows[name]['seconds']} s)", flush=True)
    meta = {"model": args.model_dir, "plan": str(args.plan), "rho": args.rho, "length": args.length,
            "prompts": len(prompts), "seeds": [args.first_seed, args.first_seed + len(prompts) - 1],
            "formats": sorted(set(kinds)), "answer_tokens": args.answer_tokens,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat()}
    write_report({"meta": meta, "rows": rows}, args.out / "mechanisms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
