#!/usr/bin/env bash
# Installs what the demo needs into .venv (CPU PyTorch, kascade; no test tools, no vLLM), then runs
# `kascade demo` on the embedded default model. Arguments go to `kascade demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "demo: kascade demo${*:+ $*} ..."
kascade demo "$@"
