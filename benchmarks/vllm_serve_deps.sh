#!/usr/bin/env bash
# The modules vLLM 0.26.0's OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what
# `benchmarks/vllm_serving.py serve` starts) imports beyond what ../shared/tools/vllm-gpu-parts carries:
# uvicorn, uvloop, aiohttp, prometheus_client, watchfiles and their
# dependencies. Run from the repository root.
#   download   here: wheels for the GPU machine's CPython 3.12 (manylinux x86_64) into .vllm/serve_whl (ignored,
#              about 8 MiB), then carry ".vllm/serve_whl" in the call of `benchmarks/vllm_gpu.sh serve`
#   install    on the GPU machine (vllm_gpu.sh serve runs it): each wheel unpacked into /tmp/site only when its
#              module does not import already, so nothing the image has is shadowed
set -euo pipefail
WHEELS=(uvicorn==0.55.0 h11==0.16.0 click==8.5.1 uvloop==0.23.0 aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1
        frozenlist==1.8.0 aiosignal==1.4.0 attrs==26.1.0 propcache==0.5.4 aiohappyeyeballs==2.7.1
        prometheus_client==0.26.0 prometheus-fastapi-instrumentator==8.1.0 psutil==7.2.2 idna==3.21
        watchfiles==1.3.0 model_hosting_container_standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
        opentelemetry_api==1.45.3 httpx==0.29.0 httpcore==1.0.9 certifi==2026.10.19.post1 anyio==4.16.0)
declare -A MODULE=([attrs]=attr [opentelemetry_api]=opentelemetry)  # wheel name -> module, where they differ
case "${1:?download or install}" in
download)
  mkdir -p .vllm/serve_whl
  python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d .vllm/serve_whl "${WHEELS[@]}"
  ls .vllm/serve_whl
  ;;
install)
  for w in .vllm/serve_whl/*.whl; do
    name=$(basename "$w" | cut -d- -f1)
    mod=${MODULE[$name]:-$name}
    if PYTHONPATH=/tmp/site python3 -c "import $mod" 2>/dev/null; then continue; fi
    python3 -m zipfile -e "$w" /tmp/site && echo "unpacked $(basename "$w")"
  done
  PYTHONPATH=/tmp/site python3 -c "import vllm.entrypoints.openai.api_server" && echo "the server's modules import"
  ;;
*) echo "expected download or install, got $1" >&2; exit 2 ;;
esac
