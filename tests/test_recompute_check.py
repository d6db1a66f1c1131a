"""benchmarks/recompute_check.py: dense attention, and Kascade at full budget, resume by recompute exactly as the
uninterrupted run continues (the check's control); a cut outside the run is refused."""

import sys
from pathlib import Path

import pytest

from kascade.plan import Plan
from models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import recompute_check as RC  # noqa: E402


def test_dense_and_full_budget_resume_as_the_uninterrupted_run():
    model = tiny_model("llama", num_hidden_layers=3)
    full = Plan.for_model(model.config, [0, 2], rho=1.0, k_min=16)
    assert RC.run(model, None, "dense", prompts=2, steps=6, cut=3) == [None, None]
    assert RC.run(model, full, "kascade", prompts=2, steps=6, cut=3) == [None, None]


def test_cut_outside_the_run_is_refused():
    with pytest.raises(SystemExit, match="--cut: expected 0 < cut < steps"):
        RC.main(["--steps", "5", "--cut", "5", "-o", "/nonexistent/x"])
