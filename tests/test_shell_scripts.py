"""The shell scripts parse (bash -n), so that a GPU stage never fails on a syntax error after its machine came up,
and the GPU stage scripts refuse an unknown stage by name before they touch anything."""

import subprocess
import sys
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


_PATH = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # the scripts' python3: this interpreter's, else the system's


def test_fa3_pack_then_install_round_trip(tmp_path):
    """benchmarks/fa3_pack.sh repacks a wheel's files as .tar.xz and fa3_install.sh makes them importable (a stand-in
    wheel holding a one-line fa3_fwd_interface module)."""
    import zipfile

    wheel = tmp_path / "fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fa3_fwd_interface.py", "MARK = 'stand-in'\n")
        z.writestr("fa3_fwd-0.0.3.dist-info/METADATA", "Name: fa3-fwd\nVersion: 0.0.3\n")
    env = {"PATH": _PATH, "WHEEL": str(wheel), "ARCHIVE": str(tmp_path / "fa3.tar.xz"),
           "TARGET": str(tmp_path / "site")}
    packed = subprocess.run(["bash", str(ROOT / "benchmarks" / "fa3_pack.sh")], capture_output=True, text=True,
                            timeout=60, env=env)
    assert packed.returncode == 0, packed.stderr
    assert (tmp_path / "fa3.tar.xz").stat().st_size > 0
    installed = subprocess.run(["bash", str(ROOT / "benchmarks" / "fa3_install.sh")], capture_output=True, text=True,
                               timeout=60, env=env)
    assert installed.returncode == 0, installed.stderr
    assert "FA3: fa3_fwd_interface imports" in installed.stdout
    assert (tmp_path / "site" / "fa3_fwd_interface.py").read_text() == "MARK = 'stand-in'\n"


def test_fa3_install_says_when_nothing_was_carried(tmp_path):
    env = {"PATH": _PATH, "ARCHIVE": str(tmp_path / "absent.tar.xz"), "TARGET": str(tmp_path / "site")}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "fa3_install.sh")], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "FA3: not importable" in out.stdout
