#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the lent GPU machine, in stages that fit its calls (10 minutes each; the
# machine keeps /tmp between calls made while it is warm). A call carries at most 64 MiB with the
# working tree (about 30 MB), so the 98 MB GGUF travels in three parts (`split -n 3 -d` of the file
# into .smol/p3/part_00..02, ignored by git). Run from the repository root:
#   copy PART  carry .smol/p3/PART (part_00, then part_01): copies it to /tmp/m
#   calibrate  carry .smol/p3/part_02 and .smol/whl: joins and converts the model (scripts/smollm2-device.sh),
#              calibrates the output-aware plan (TARGET selecting-layer equivalents, default 10), then
#              measures the plans along its search path and the paper recipe's at the same costs on a few
#              cells (accuracy against cost)
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
  mkdir -p /tmp/m && cp ".smol/p3/${2:?copy: which part}" /tmp/m/
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
calibrate)
  if [ ! -f /tmp/m/smollm2.gguf ]; then
    cat /tmp/m/part_00 /tmp/m/part_01 .smol/p3/part_02 > /tmp/m/smollm2.gguf.tmp && mv /tmp/m/smollm2.gguf.tmp /tmp/m/smollm2.gguf
  fi
  [ -d "$MODEL" ] || bash scripts/smollm2-device.sh "$MODEL"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  start=$(date +%s)
  kascade calibrate "$MODEL" --data data/heldout.txt --recipe output-aware --anchors "${TARGET:-10}" \
    --length "${CAL_LENGTH:-4096}" --num-prompts "${CAL_PROMPTS:-16}" --batch-size "${CAL_BATCH:-16}" -o "$OURS" --plots "$OUT/plan-plots" \
    2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/calibrate_log.txt"
  echo "calibration took $(( $(date +%s) - start )) s" | tee -a "$OUT/calibrate_log.txt"
  cp "$OURS" "$OUT/plan-ours.json"
  # accuracy against cost: the search path's plans and the paper's recipe at the same costs, one cell each
  for f in "$OUT"/plan-plots/*-*.json; do
    name=$(basename "$f" .json)
    case "${name##*-}" in 6|8|10|12|15|20) ;; *) continue ;; esac
    kascade eval "$MODEL" --plan "$f" --tasks "${PARETO_TASKS:-niah_single,niah_multikey,doc_qa_chat}" \
      --lengths 4096 --budgets 0.1 --strategies kascade --samples 20 --no-coverage --out "/tmp/pareto/$name" \
      > "/tmp/pareto-$name.log" 2>&1 || tail -n 3 "/tmp/pareto-$name.log"
    echo "$name $(python3 -c "import json,sys; d=json.load(open('/tmp/pareto/$name/summary.json')); print(json.dumps({s: r['avg'] for s, r in d['budgets']['0.1'].items()}))")"
  done | tee "$OUT/pareto.txt"
  tar -cf "$OUT/pareto.tar" -C /tmp pareto
  tar -cf "$OUT/plan-plots.tar" -C "$OUT" plan-plots && rm -rf "$OUT/plan-plots"
  ;;
eval)
  python3 - > "$OUT/eval_meta.json" <<'PY'
import datetime, json, torch, triton, transformers
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}))
PY
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
