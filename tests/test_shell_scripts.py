"""The shell scripts parse (bash -n), so that a GPU stage never fails on a syntax error after its machine came up,
and the GPU stage scripts refuse an unknown stage by name before they touch anything."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_generalization_stages_refuse_an_unknown_stage(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "generalization_gpu.sh"), "nonsense"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "expected start, plans, all, more, recipe or cost, got nonsense" in out.stderr
