#!/usr/bin/env bash
# Selection from an FP8 copy of the keys (kascade.fp8keys) on the lent GPU machine, in stages that each fit
# one call (10 minutes). Run from the repository root; everything a stage makes is copied to $OUT.
#   tests    the GPU tests of the FP8 kernels (full size, CUDA graphs, FP8 tensor cores) and of the kernels
#            they change (decode, prefill, top-k), log in $OUT/fp8_gpu_tests.txt
#   recall   recall / attention mass of FP8 selection on random data at 128K, decode and prefill (the
#            kernels' selections), $OUT/fp8_select_<gpu>.{json,md}; MODEL=DIR adds SmolLM2's activations
#            (the model converted as benchmarks/smollm2_gpu.sh's prepare stage does)
#   widen    the FP8 decode K pass's widening, float16 (default) against bf16 (benchmarks/fp8_widen_probe.py, B = 1
#            and 8 at 128K, FA3 beside), then the widening and GPU decode tests of tests/test_fp8_select.py: $OUT/fp8_widen_<gpu>.{json,md},
#            $OUT/fp8_widen_gpu_tests.txt (about 2 minutes)
#   decode   benchmarks/decode.py --fp8 at SIZES (default 1x131072,8x131072): FA3, the exact kernels and the FP8
#            ones per layer, the whole model with 5 anchors and with 10 selecting layers, exact and FP8 (RERANK=2
#            adds the re-rank rows: slower than exact selection on the H100, decode_h100.md), merged into benchmarks/results/decode_<gpu>.json (rows of those sizes
#            replaced, baselines re-measured in the same run); SIZES=1x131072 and SIZES=8x131072 in two
#            calls if one does not fit
#   prefill  benchmarks/prefill.py --fp8 at LENGTHS (default 131072), merged into
#            benchmarks/results/prefill_<gpu>.json likewise
# Accuracy (SmolLM2, the shipped plan, 60-sample headline cells at 4K and 8064) runs through
# benchmarks/smollm2_gpu.sh (copy stages, prepare, then eval) with the strategies kascade-fp8 and
# kascade-fp8-rerank2 beside the committed rows, e.g.
#   SEED=benchmarks/results/eval_smollm2_results.jsonl WORKERS=1 REPORT_SAMPLES=60 \
#     RUNS="niah_single,niah_multikey,niah_multivalue,niah_multiquery,fwe,doc_qa_chat|kascade-fp8,kascade-fp8-rerank2|4096,8064|0.1|60" \
#     bash benchmarks/smollm2_gpu.sh eval
set -euo pipefail
stage=${1:?stage: tests, widen, recall, decode or prefill}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# FlashAttention-3 for the decode and prefill baselines: carry .whl/fa3.tar.xz (benchmarks/fa3_pack.sh, one call;
# benchmarks/fa3_install.sh also takes the wheel or its two halves)
bash benchmarks/fa3_install.sh
gpu=$(python3 -c "import sys, torch; sys.path.insert(0, 'benchmarks'); from report_json import short_device_name; \
print(short_device_name(torch.cuda.get_device_name()))")  # h100, h200
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"

case "$stage" in
tests)
  python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_select.py tests/test_kernels_decode.py \
    tests/test_kernels_prefill.py tests/test_topk_select.py 2>&1 | tee "$OUT/fp8_gpu_tests.txt" | tail -n 30
  ;;
widen)
  python3 benchmarks/fp8_widen_probe.py --out "$OUT" 2>&1 | tail -n 12
  python3 -m pytest -q -p no:cacheprovider tests/test_fp8_select.py -k "widen or gpu_decode" 2>&1 | tee "$OUT/fp8_widen_gpu_tests.txt" | tail -n 5
  ;;
recall)
  sources=random
  extra=()
  if [ -n "${MODEL:-}" ]; then sources=random,smollm2; extra=(--model "$MODEL" --prompt-length "${PROMPT_LENGTH:-8064}"); fi
  python3 benchmarks/fp8_select.py --device cuda --sources "$sources" --length 131072 --prefill-length 131072 \
    --decode-queries 8 --prefill-tiles "${TILES:-256}" --rerank "${RERANK:-2}" "${extra[@]}" --out "$OUT/fp8_select_$gpu"
  ;;
decode)
  merge=()  # a GPU without a canonical decode file yet gets one of its own
  if [ -f "benchmarks/results/decode_$gpu.json" ]; then merge=(--merge-into "benchmarks/results/decode_$gpu.json"); fi
  python3 benchmarks/decode.py --no-sweep --no-flex --sizes "${SIZES:-1x131072,8x131072}" --fp8 --rerank "${RERANK-}" \
    "${merge[@]}" 2>&1 | tee "$OUT/decode_fp8_log.txt" | tail -n 60
  cp "benchmarks/results/decode_$gpu.json" "benchmarks/results/decode_$gpu.md" "$OUT/"
  ;;
prefill)
  # shellcheck disable=SC2086
  merge=()
  if [ -f "benchmarks/results/prefill_$gpu.json" ]; then merge=(--merge-into "benchmarks/results/prefill_$gpu.json"); fi
  python3 benchmarks/prefill.py --lengths ${LENGTHS:-131072} --fp8 --rerank "${RERANK:-2}" --no-topk-stage \
    "${merge[@]}" 2>&1 | tee "$OUT/prefill_fp8_log.txt" | tail -n 60
  cp "benchmarks/results/prefill_$gpu".{json,md,png} "$OUT/" 2>/dev/null || cp "benchmarks/results/prefill_$gpu".{json,md} "$OUT/"
  ;;
*)
  echo "unknown stage $stage (tests, widen, recall, decode or prefill)" >&2
  exit 2
  ;;
esac
