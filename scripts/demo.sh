#!/usr/bin/env bash
# Installs what is needed, then runs `kascade demo` on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
kascade demo "$@"
