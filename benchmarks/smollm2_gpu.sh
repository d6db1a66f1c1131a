#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the lent GPU machine, in stages that fit its calls (10 minutes each; the
# machine keeps /tmp between calls made while it is warm). A call carries at most 64 MiB with the
# working tree (41.1 MB of tracked files on 2026-12-06), so the 98 MB GGUF travels in parts small enough to
# ride beside it: `split -n 5 -d -a 2 FILE .smol/p4/part_` gives part_00..04 of 19.7 MB (ignored by git; FILE
# is the GGUF that ../shared/tools/smollm2-parts unpacks, or its parts joined). Below, "the last part" is the
# highest-numbered one and "the others" all before it. Run from the repository root:
#   copy PART  carry .smol/p4/PART (each of the others, one call each): copies it to /tmp/m
#   calibrate  carry the last part and .smol/whl: joins and converts the model (scripts/smollm2-device.sh),
#              calibrates the output-aware plan (TARGET selecting-layer equivalents, default 10), then
#              measures the plans along its search path and the paper recipe's at the same costs on a few
#              cells (accuracy against cost)
#   prepare    carry the last part and .smol/whl: joins and converts the model, takes the plan of the committed
#              table (plans/smollm2-135m-instruct-prose.json, whose rows SEED holds; TABLE_PLAN=FILE another)
#   eval       the accuracy table into /tmp/eval (resumes; stops itself before the call's limit), in
#              RUNS side by side (see the stage); SEED=results.jsonl skips the cells it holds
#   decode     the same for the decode-only section (dense prefill, sparse decode): by default (RUNS unset)
#              every task of the table plus the decode-heavy copy and sequence at rho 0.1, 20 samples, for
#              dense, kascade (sparse prefill, the table's mode), kascade+dense-prefill and the decode-time
#              baselines as published (quest-decode, tidaldecode, omnikv-decode), in two runs side by side;
#              its rows join /tmp/eval (a name ending in +dense-prefill is decode-only mode)
# Everything a stage makes is also copied to $OUT (plans, results, logs). The committed table came from
#   copy (each of the others); prepare; then eval calls such as
#   SEED=benchmarks/results/eval_smollm2_results.jsonl WORKERS=1 REPORT_SAMPLES=60 \
#     RUNS="fwe|dense,oracle,kascade|||;niah_single|dense,kascade|4096,8064|0.1|60" bash benchmarks/smollm2_gpu.sh eval
#   (SEED=/tmp/eval/results.jsonl in later calls: the rows merged so far), then on this machine
#   python benchmarks/eval_smollm2_report.py --eval OUT --meta OUT/eval_meta.json.
# The decode-only section (not run yet): copy (each of the others); prepare; then
#   SEED=benchmarks/results/eval_smollm2_results.jsonl WORKERS=1 bash benchmarks/smollm2_gpu.sh decode
#   (then SEED=/tmp/eval/results.jsonl bash benchmarks/smollm2_gpu.sh decode until no run is left; the
#   committed rows give dense and kascade on the table's tasks, so those cells are not run again), then
#   python benchmarks/eval_smollm2_report.py --eval OUT --meta OUT/eval_meta.json: the report gains the
#   "Decode-only" section from the rows marked decode-only. copy's passages come from data/heldout.txt,
#   the text the output-aware plan was calibrated on (the retrieval tasks use none of it).
set -euo pipefail
stage=${1:?stage: copy, calibrate, prepare, eval or decode}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
MODEL=${MODEL:-/tmp/smol}
PAPER=plans/smollm2-135m-instruct-paper.json
OURS=${OURS:-/tmp/plan-ours.json}
kascade() { python3 -m kascade.cli "$@"; }
join_and_convert() {  # the model at $MODEL, from the parts copied earlier and the last one, carried by this call
  if [ ! -f /tmp/m/smollm2.gguf ]; then
    cp .smol/p4/part_* /tmp/m/
    cat /tmp/m/part_* > /tmp/m/smollm2.gguf.tmp && mv /tmp/m/smollm2.gguf.tmp /tmp/m/smollm2.gguf
  fi
  [ -d "$MODEL" ] || bash scripts/smollm2-device.sh "$MODEL"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
}

case "$stage" in
copy)
  mkdir -p /tmp/m && cp ".smol/p4/${2:?copy: which part}" /tmp/m/
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
calibrate)
  join_and_convert
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
prepare)  # join and convert the model; the plan of the committed table (no calibration)
  join_and_convert
  # the table's `kascade` rows (SEED) were measured with the prose plan (eval_smollm2_report.PLANS), so new rows of
  # the same table (the decode-only section, kascade-fp8, ...) must run that plan too; TABLE_PLAN=FILE for another
  cp "${TABLE_PLAN:-plans/smollm2-135m-instruct-prose.json}" "$OURS"
  ;;
eval|decode)
  python3 - > "$OUT/eval_meta.json" <<'PY'
import datetime, json, torch, triton, transformers
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}))
PY
  # RUNS: runs side by side (the GPU is mostly idle: a decode step of this small model is bound by
  # Python), separated by ';', each "tasks|strategies|lengths|budgets|samples" (empty fields: defaults).
  # Each run has its own folder under /tmp/eval-parts, seeded with SEED's rows (a results.jsonl of the
  # same plan and settings: its cells are not run again); the rows are then merged into /tmp/eval.
  all_tasks=niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe,kv,doc_qa_chat
  runs="$all_tasks||||"
  if [ "$stage" = decode ]; then  # the decode-only section: retrieval tasks in one run, decode-heavy in another
    decode_strategies=dense,kascade,kascade+dense-prefill,quest-decode,tidaldecode,omnikv-decode
    runs="$all_tasks|$decode_strategies||0.1|;copy,sequence|$decode_strategies||0.1|"
  fi
  IFS=';' read -ra groups <<< "${RUNS:-$runs}"
  start=$(date +%s)
  i=0
  for g in "${groups[@]}"; do
    IFS='|' read -r tasks strategies lengths budgets samples <<< "$g"
    dir=/tmp/eval-parts/g$i
    mkdir -p "$dir"
    [ -n "${SEED:-}" ] && [ ! -f "$dir/results.jsonl" ] && cp "$SEED" "$dir/results.jsonl"
    timeout "${EVAL_SECONDS:-540}" python3 -m kascade.cli eval "$MODEL" --plan "$OURS" --paper-plan "$PAPER" \
      --tasks "${tasks:-$all_tasks}" ${strategies:+--strategies "$strategies"} --lengths "${lengths:-2048,4096,8064}" \
      --budgets "${budgets:-0.05,0.1,0.2}" --samples "${samples:-20}" --workers "${WORKERS:-2}" --no-coverage \
      --out "$dir" > "$dir/log.txt" 2>&1 &
    i=$((i + 1))
  done
  wait || true
  echo "runs stopped after $(( $(date +%s) - start )) s (they resume)"
  python3 - <<'PY'
import glob, json, os
from kascade.eval.command import _key, read_results
rows = {}
for path in sorted(glob.glob("/tmp/eval-parts/g*/results.jsonl")) + ["/tmp/eval/results.jsonl"]:
    for row in read_results(__import__("pathlib").Path(path)):
        rows.setdefault(_key(row), row)
os.makedirs("/tmp/eval", exist_ok=True)
with open("/tmp/eval/results.jsonl.tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows.values())
os.replace("/tmp/eval/results.jsonl.tmp", "/tmp/eval/results.jsonl")
print(f"{len(rows)} rows merged into /tmp/eval/results.jsonl")
PY
  for d in /tmp/eval-parts/g*; do echo "== $d"; tail -n 2 "$d/log.txt" | tr '\r' '\n' | tail -n 2; done
  # the main table: every strategy that is sparse in prefill and decode (mechanisms too); the report adds the
  # decode-only section from the rows themselves
  every=$(python3 -c "from kascade.eval.strategies import STRATEGIES as S, DECODE_BASELINES as D
print(','.join(s for s in S if s not in D))")
  kascade eval "$MODEL" --plan "$OURS" --paper-plan "$PAPER" --tasks "$all_tasks" --lengths 2048,4096,8064 \
    --budgets 0.05,0.1,0.2 --strategies "$every" --samples "${REPORT_SAMPLES:-20}" --out /tmp/eval --report-only \
    --no-coverage > /dev/null 2>&1 || true
  for f in results.jsonl run.json summary.json summary.md accuracy_vs_budget.png; do
    [ -f "/tmp/eval/$f" ] && cp "/tmp/eval/$f" "$OUT/eval_$f"
  done
  ;;
*) echo "stage: expected copy, calibrate, prepare, eval or decode, got $stage" >&2; exit 2 ;;
esac
