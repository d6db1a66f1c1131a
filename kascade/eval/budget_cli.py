"""The command line shared by the budget calibrations (kascade.eval.layer_budgets, kascade.eval.top_p).

Both calibrate a budget mechanism at equal total keys against uniform top-k at rho, on the prose retrieval
formats over data/heldout.txt (kascade.calibrate.retrieval) from seeds the evaluations do not use, so the
structured families that measure the result stay held out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kascade.budget import check_budget

ROOT = Path(__file__).resolve().parents[2]


def budget_parser(description: str, output_help: str, rho_help: str) -> argparse.ArgumentParser:
    """The arguments of a budget calibration: the model, the output, the prompts and the uniform budget."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("model_dir")
    ap.add_argument("-o", "--output", required=True, help=output_help)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rho", type=float, default=0.1, help=rho_help)
    ap.add_argument("--k-min", type=int, default=128)
    ap.add_argument("--first-seed", type=int, default=800_000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    return ap


def model_and_prompts(args: argparse.Namespace):
    """(model, prompts, formats) for parsed `budget_parser` arguments; prompts are token id lists.

    Checks the budget first, so a bad --rho or --k-min fails before the model loads.
    """
    check_budget(args.rho, args.k_min)
    from kascade.calibrate.retrieval import FORMATS, calibration_prompts
    from kascade.models import load_model

    model, tok = load_model(args.model_dir, args.device, args.dtype)
    text = (ROOT / "data" / "heldout.txt").read_text()
    prompts = [p.ids for p in calibration_prompts(tok, text, args.length, args.prompts, formats=FORMATS,
                                                   first_seed=args.first_seed)]
    return model, prompts, list(FORMATS)
