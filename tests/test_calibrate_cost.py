"""benchmarks/calibrate_cost.py: the count of plan measurements a search makes (what its time is extrapolated by)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import calibrate_cost as C  # noqa: E402


def test_search_measurements_counts_every_score_call():
    # 3 reusable layers x 2 heads, keep 2 units: the start, then 6 + 5 + 4 + 3 single removals
    assert C.search_measurements(4, 2, target=2.0, shrink=5, candidates=None) == 1 + 6 + 5 + 4 + 3
    # with candidates the later steps measure fewer units than every remaining one
    assert C.search_measurements(30, 3, 10.0, 5, 4) < C.search_measurements(30, 3, 10.0, 5, None)


def test_help_runs_without_a_gpu():
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate_cost.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--num-prompts" in out.stdout, out.stderr
