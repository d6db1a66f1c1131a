#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the lent GPU machine, in stages that fit its calls (10 minutes each; the
# machine keeps /tmp between calls made while it is warm). Run from the repository root:
#   copy       carry .smol/part_aa: puts the first half of the GGUF in /tmp/m
#   calibrate  carry .smol/part_ab and .smol/whl: joins and converts the model (scripts/smollm2-device.sh),
#              calibrates the output-aware plan (TARGET selecting-layer equivalents, default 10), then a
#              quick needle check of dense, kascade, kascade-paper and oracle
#   eval       the full accuracy table into /tmp/eval (resumes; stops itself before the call's limit)
# Everything a stage makes is also copied to $OUT (plans, results, logs).
set -euo pipefail
stage=${1:?stage: copy, calibrate or eval}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
MODEL=/tmp/smol
PAPER=plans/smollm2-135m-instruct-paper.json
OURS=${OURS:-/tmp/plan-ours.json}
kascade() { python3 -m kascade.cli "$@"; }

case "$stage" in
copy)
  mkdir -p /tmp/m && cp .smol/part_aa /tmp/m/
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
calibrate)
  [ -d "$MODEL" ] || bash scripts/smollm2-device.sh "$MODEL"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  start=$(date +%s)
  kascade calibrate "$MODEL" --data data/heldout.txt --recipe output-aware --anchors "${TARGET:-10}" \
    --length "${CAL_LENGTH:-4096}" --num-prompts "${CAL_PROMPTS:-16}" -o "$OURS" --plots "$OUT/plan-plots" \
    2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/calibrate_log.txt"
  echo "calibration took $(( $(date +%s) - start )) s" | tee -a "$OUT/calibrate_log.txt"
  cp "$OURS" "$OUT/plan-ours.json"
  kascade eval "$MODEL" --plan "$OURS" --paper-plan "$PAPER" --tasks niah_single,niah_multikey --lengths 4096 \
    --budgets 0.1 --strategies kascade,kascade-paper,oracle --samples 20 --no-coverage --out /tmp/quick \
    2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 5
  cp /tmp/quick/summary.md "$OUT/quick_summary.md"; cp /tmp/quick/results.jsonl "$OUT/quick_results.jsonl"
  cat /tmp/quick/summary.md
  ;;
eval)
  start=$(date +%s)
  timeout "${EVAL_SECONDS:-540}" python3 -m kascade.cli eval "$MODEL" --plan "$OURS" --paper-plan "$PAPER" \
    --tasks "${TASKS:-niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe,kv,doc_qa_chat}" \
    --lengths "${LENGTHS:-2048,4096,8192}" --budgets 0.05,0.1,0.2 --samples "${SAMPLES:-20}" --out /tmp/eval \
    2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 20 || echo "eval stopped after $(( $(date +%s) - start )) s (resumes)"
  kascade eval "$MODEL" --plan "$OURS" --paper-plan "$PAPER" \
    --tasks "${TASKS:-niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe,kv,doc_qa_chat}" \
    --lengths "${LENGTHS:-2048,4096,8192}" --budgets 0.05,0.1,0.2 --samples "${SAMPLES:-20}" --out /tmp/eval \
    --report-only --no-coverage > /dev/null 2>&1 || true
  for f in results.jsonl run.json summary.json summary.md accuracy_vs_budget.png coverage.png coverage.json; do
    [ -f "/tmp/eval/$f" ] && cp "/tmp/eval/$f" "$OUT/eval_$f"
  done
  wc -l /tmp/eval/results.jsonl
  ;;
*) echo "stage: expected copy, calibrate or eval, got $stage" >&2; exit 2 ;;
esac
