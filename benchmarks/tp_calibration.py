"""What keeping the head map inside tensor-parallel shards costs (paper recipe), for TP = 1, 2, 4.

kascade-tiny on the CPU, the prompts `kascade calibrate` cuts from data/heldout.txt (8 of 4096 tokens): one
dense pass with the calibration statistics, then kascade.calibrate.tp_loss at each TP degree (what
`kascade calibrate --tp-degree TP` prints): the anchors chosen, the anchor objective against the unconstrained
one, and the mean coverage of the chosen head against a free map with the same anchors.

    python benchmarks/tp_calibration.py [--model models/kascade-tiny] [--anchors 4] > benchmarks/results/tp_calibration_tiny_cpu.txt
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "kascade-tiny"))
    ap.add_argument("--data", default=str(ROOT / "data" / "heldout.txt"))
    ap.add_argument("--anchors", type=int, default=4)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--tp", default="1,2,4")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from kascade.calibrate import calibrate_report, tp_loss
    from kascade.cli import _read_prompts
    from kascade.models import load_model

    model, tok = load_model(args.model, "cpu")
    prompts = _read_prompts(Path(args.data), tok, args.length, args.num_prompts)
    _, report = calibrate_report(model, prompts, args.anchors, tokenizer=tok, max_length=args.length, progress=False)
    print(f"# {Path(args.model).name}, paper recipe, {args.anchors} anchors, {len(prompts)} prompts of {args.length} "
          f"tokens of {Path(args.data).name}; CPU, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{datetime.date.today().isoformat()}")
    for tp in (int(x) for x in args.tp.split(",")):
        r = tp_loss(report["similarity"], report["importance"], args.anchors, tp)
        print(f"TP {tp}: anchors {r['anchors']}, objective {r['objective']:.4f} vs {r['objective_unconstrained']:.4f} "
              f"unconstrained ({-100 * r['objective_loss']:.2f}%), coverage {r['coverage']:.3f} "
              f"(free map, same anchors {r['coverage_unconstrained']:.3f}, {-r['coverage_loss']:+.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
