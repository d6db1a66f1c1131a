#!/usr/bin/env bash
# The accuracy-speed frontier on the lent GPU machine (SmolLM2-135M-Instruct, bf16; benchmarks/frontier.py),
# in calls of at most 10 minutes made back to back: the machine keeps /tmp, and processes started with setsid,
# between calls made while it is warm. Every stage resumes what is done and returns everything made so far
# (plans, search reports, eval rows, speed measurements, logs; not the calibration caches) as
# $OUT/frontier.tar.gz.
#
# The command sequence, from the repository root (the model travels as in benchmarks/smollm2_gpu.sh):
#   1-4. bash benchmarks/smollm2_gpu.sh copy part_0N   carry .smol/p4/part_0N, for N = 0 .. 3 (every part but
#        the last, one call each)
#   5. bash benchmarks/frontier_gpu.sh eval             carry .smol/p4/part_04 and .smol/whl; repeat (same
#      carry) until it prints "0 eval runs pending" and "calibration: done". The first call joins and converts
#      the model, starts the calibration in the background (setsid: the calibration set, the head- and
#      layer-granular searches, the held-out divergences; log /tmp/frontier/calibrate.log) and runs the
#      baselines (dense, oracle) and the default plan at three budgets while the searches run; later calls run
#      the plans as they appear, PAR `kascade eval` processes side by side.
#   6. bash benchmarks/frontier_gpu.sh speed            carry .whl/fa3.tar.xz (benchmarks/fa3_pack.sh: the FA3
#      baseline); repeat until it prints "speed: done". Waits
#      for the evaluations and the calibration to stop (the GPU must be otherwise idle while it times), then
#      measures decode on both shapes, prefill on SmolLM2's, then prefill on the 8B shape.
#   On this machine: tar -xzf frontier.tar.gz -C /tmp (the last call's), then
#      python benchmarks/frontier.py report --work /tmp/frontier --eval /tmp/frontier-eval \
#        --meta /tmp/frontier/meta.json -o benchmarks/results/frontier_smollm2
# If the machine went back between calls (/tmp is gone): `RESUME=.smol/frontier.tar.gz bash
# benchmarks/frontier_gpu.sh restore` carrying the last returned tar as .smol/frontier.tar.gz (alone: the
# call's 64 MiB hold the tree and one model part), then steps 1-4 again, then go on with step 5 or 6.
#
# Estimate (H100; about 0.3 s per sample per process with 6 processes side by side, the rate of the
# generalization runs): 23 evaluations (dense and oracle, the default plan at rho 0.05, 0.1 and 0.2, 18 frontier
# plans at rho 0.1) of 60 samples x 12 tasks x 2 lengths, oracle and every plan in both modes (sparse prefill and
# decode-only) = 63,360 samples; the plan runs take the baselines' dense rows (`frontier.py seed`), so dense runs
# once: 63,360 x 0.3 s / 6 = 53 min, plus about 5 min of process starts (88 runs, each loading the model and its
# prompt workers) and the calibration sharing the GPU (about 12 min of searches in the background of the first
# two calls): 7 to 8 eval calls. Speed: decode about 3 min, prefill on SmolLM2's shape about 2 min, on the 8B
# shape about 6 min (21 plans x 4 passes of 3-7 s at 128K): 2 calls. With the 4 copy calls: about 14 calls,
# 100 to 110 device minutes, over several sessions (restore, below). CAL_ARGS="--searches head,layer,decodeonly"
# adds the search judged decode-only (6 plans run in that mode alone: about 13% more evaluation).
# Settings: WORK (/tmp/frontier) and EVAL (/tmp/frontier-eval), the folders of the work and of the eval runs
# (in one parent folder: the tar holds both); MODEL (/tmp/smol); PREPARE (0: the model is at MODEL already);
# SAMPLES (60); PAR (eval processes side by side, 6); LIMIT (seconds from an eval call's start after which no
# run goes on, 500); CAL_ARGS (arguments of frontier.py calibrate); CALIBRATE (0: no calibration in this call);
# SPEED_BUDGET (seconds of a speed call, 500); WAIT (seconds the speed stage waits for evaluations to stop,
# 60). The speed stage measures benchmarks/frontier.py's SPEED_RUNS in order (SmolLM2's shape at 8K, its
# context, and 128K; the 8B shape at 128K).
set -euo pipefail
stage=${1:?stage: eval, speed or restore}
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/frontier}
EVAL=${EVAL:-/tmp/frontier-eval}
mkdir -p "$OUT" "$WORK" "$EVAL"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
MODEL=${MODEL:-/tmp/smol}
SAMPLES=${SAMPLES:-60}
PAR=${PAR:-6}
begin=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - begin) )); }

calibrating() { pgrep -f "frontier.py calibrate" > /dev/null; }

pending() {  # the eval runs not complete, as "name<TAB>command" lines
  python3 benchmarks/frontier.py jobs "$MODEL" --work "$WORK" --eval "$EVAL" --samples "$SAMPLES" --pending
}

run_jobs() {  # the pending runs, PAR side by side, until LIMIT seconds; listed again while the searches add plans
  local limit=$1
  : > "$WORK/runs.prev"
  while [ "$(left "$limit")" -gt 30 ]; do
    python3 benchmarks/frontier.py seed --work "$WORK" --eval "$EVAL"
    pending > "$WORK/pending.txt"
    # the baselines first, alone: the plan runs then take their dense rows instead of scoring dense again
    grep "^baselines/" "$WORK/pending.txt" > "$WORK/batch.txt" || cp "$WORK/pending.txt" "$WORK/batch.txt"
    awk -F'\t' -v ev="$EVAL" '{n=$1; gsub("/", "-", n); print $2 " > " ev "/" n ".log 2>&1"}' "$WORK/batch.txt" \
      > "$WORK/runs.txt"
    if [ ! -s "$WORK/runs.txt" ] || cmp -s "$WORK/runs.txt" "$WORK/runs.prev"; then
      calibrating || break  # nothing new to run (a run that failed twice in a row is left for the next call)
      sleep 20; continue  # the searches will add plans
    fi
    cp "$WORK/runs.txt" "$WORK/runs.prev"
    echo "$(wc -l < "$WORK/runs.txt") eval runs, $PAR at a time"
    timeout "$(left "$limit")" xargs -P "$PAR" -I{} sh -c '{}' < "$WORK/runs.txt" || echo "eval stopped at its limit (rerun resumes)"
  done
}

collect() {
  python3 - > "$WORK/meta.tmp" <<'PY' && mv "$WORK/meta.tmp" "$WORK/meta.json" || echo "(no device name: meta.json kept)"
import datetime, json, torch, triton, transformers
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}))
PY
  tar -czf "$OUT/frontier.tar.gz" -C "$(dirname "$WORK")" --exclude=calib.pt --exclude=heldout.pt --exclude='*.tmp' \
    "$(basename "$WORK")" "$(basename "$EVAL")"
  echo "$(pending | wc -l) eval runs pending; plans: $(ls "$WORK/plans" 2>/dev/null | tr '\n' ' ')"
  if calibrating; then echo "calibration: running"; elif [ -f "$WORK/reports/heldout.json" ]; then
    echo "calibration: done"; else echo "calibration: not running, not done"; fi
  tail -n 12 "$WORK/calibrate.log" 2>/dev/null || true
  ls "$WORK/speed" 2>/dev/null | sed 's/^/speed file: /' || true
}

case "$stage" in
restore)  # the tar an earlier call returned, when /tmp was lost since
  if [ -d "$WORK/plans" ]; then echo "restore: $WORK/plans exists; nothing done"; exit 0; fi
  tar -xzf "${RESUME:?restore: RESUME=path of the carried frontier.tar.gz}" -C "$(dirname "$WORK")"
  echo "restored: $(ls "$WORK/plans" 2>/dev/null | wc -l) plans, $(find "$EVAL" -name results.jsonl | wc -l) eval folders"
  ;;
eval)
  if [ "${PREPARE:-1}" = 1 ]; then
    bash benchmarks/smollm2_gpu.sh prepare > "$WORK/prepare.log" 2>&1 || { tail -n 20 "$WORK/prepare.log"; exit 1; }
  fi
  if [ "${CALIBRATE:-1}" = 1 ] && ! calibrating && [ ! -f "$WORK/reports/heldout.json" ]; then
    setsid nohup python3 benchmarks/frontier.py calibrate "$MODEL" --work "$WORK" --budget-s 3000 ${CAL_ARGS:-} \
      >> "$WORK/calibrate.log" 2>&1 < /dev/null &
    sleep 2
  fi
  run_jobs "${LIMIT:-500}"
  collect
  ;;
speed)
  busy() { calibrating || pgrep -f "kascade.cli eval" > /dev/null; }
  while busy && [ $(( $(date +%s) - begin )) -lt "${WAIT:-60}" ]; do sleep 5; done
  if busy; then echo "speed: evaluations or the calibration still run on the GPU; call again later"; collect; exit 0; fi
  bash benchmarks/fa3_install.sh  # the dense baseline is FA3 where it imports (carry .whl/fa3.tar.xz), else flash SDPA
  specs=$(python3 -c 'import sys; sys.path[:0] = ["benchmarks"]; from frontier import SPEED_RUNS
for shape, phase, lengths in SPEED_RUNS: print(shape, phase, ",".join(map(str, lengths)))')
  while read -r shape phase lengths; do
    [ "$(left "${SPEED_BUDGET:-500}")" -gt 20 ] || break
    python3 benchmarks/frontier.py speed --work "$WORK" --shape "$shape" --phase "$phase" --lengths "$lengths" \
      --budget-s "$(left "${SPEED_BUDGET:-500}")" < /dev/null 2>&1 | tee -a "$WORK/speed.log" || true
  done <<< "$specs"
  missing=$(python3 benchmarks/frontier.py speed-missing --work "$WORK" | wc -l)
  if [ "$missing" = 0 ]; then echo "speed: done"; else echo "speed: $missing measurements left (call again)"; fi
  collect
  ;;
*) echo "stage: expected eval, speed or restore, got $stage" >&2; exit 2 ;;
esac
