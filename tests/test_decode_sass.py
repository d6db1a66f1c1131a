"""The FP8 decode K pass compiled for sm_90 on the host (benchmarks/decode_sass.py, in a process without the
interpreter): widened to float16 it keeps the tensor-core product and has none of the per-key bf16 conversions
(F2F.BF16.F16) that widening to bf16 compiles to. Skipped where Triton's cuobjdump is missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
    pytest.skip("Triton's cuobjdump is not installed", allow_module_level=True)


def test_f16_widening_drops_the_per_key_bf16_conversions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_sass.py"), "--json"], capture_output=True,
                         text=True, timeout=300, env=env, check=True).stdout
    found = json.loads(out.splitlines()[-1])
    to_bf16 = found['FP8, widened to bf16 ("q")']["ops"]
    to_f16 = found['FP8, widened to float16 ("f16", default)']["ops"]
    assert to_bf16.get("F2F.BF16.F16", 0) >= 64  # the control: one conversion per key element of a warp's block
    assert to_f16.get("F2F.BF16.F16", 0) == 0
    assert to_f16["F2FP.F16.E4M3.UNPACK_B"] == to_bf16["F2FP.F16.E4M3.UNPACK_B"] > 0
    assert sum(c for op, c in to_f16.items() if op.startswith("HMMA")) == 32
    assert sum(to_f16.values()) < sum(to_bf16.values())
