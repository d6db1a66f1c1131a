#!/usr/bin/env bash
# Plans that generalize, on the lent GPU machine (SmolLM2-135M-Instruct, bf16): calibration on the format
# mixture with its leave-one-family-out folds, and the per-family evaluation, in calls of at most 10
# minutes made back to back (the machine keeps /tmp, and processes started with setsid, between them).
# The model travels as in benchmarks/smollm2_gpu.sh: `copy PART` of every part but the last (that script's
# header), then here, carrying the last part (.smol/p4/part_04) and .smol/whl:
#   start   join and convert the model; start the calibration searches in the background (setsid,
#           benchmarks/generalization.py calibrate, log /tmp/$GEN/calibrate.log) and the coverage diagnosis of
#           the shipped and paper plans (benchmarks/diagnose_families.py); run the baseline evaluations
#           (dense, oracle, shipped plan, paper plan on every family) side by side until LIMIT seconds
#   plans   wait for the searches (at most WAIT seconds), diagnose the new plan, evaluate the new plans
#   all     both in one call (FIRST seconds of baselines, then the plans found, BUDGET seconds in all)
#   more    the committed plans and eval rows (benchmarks/results/generalization_smollm2_*) seeded into /tmp, then
#           the eval jobs of those plans for BUDGET seconds: with a larger SAMPLES only the new samples run, e.g.
#           SAMPLES=200 FAMILIES=code,json_records,records,multi_doc (the families where dense scores >= 20);
#           JOBS narrows them (a pattern of job names, default baselines|mixture|lofo|decode-only), e.g.
#           JOBS="decode-only|lofo-json_records-10-decode-only|lofo-records-10-decode-only" for decode-only mode
#   recipe  another calibration recipe: CAL_ARGS (required) for `generalization.py calibrate` in GEN (a folder under
#           /tmp, e.g. gen66), its searches in the background, then its plans' evaluations only (no baselines; the
#           report takes them from the `more` folders), e.g. GEN=gen66 GENEVAL=gen66eval LENGTHS=4096
#           CAL_ARGS="--num-prompts 66 --search-step 5 --candidates 16 --folds json_records,records --also="
#           (CALIB_FROM=gen66 starts from that folder's calibration set and measured plans: same prompts and
#           statistics, e.g. for --sources worst-family; not for --statistics answer, which measures its own)
#   cost    benchmarks/calibrate_cost.py: the calibration's time and memory on the Llama-3.1-8B shape (random
#           weights, 16 prompts of 8K), into $OUT/calibrate_cost.{json,md}
# Both stages resume what is done and copy everything (plans, reports, eval rows, logs) to $OUT as one tar.
# Settings: GEN and GENEVAL (work and eval folder names under /tmp: gen, geneval), SAMPLES (40), LENGTHS
# (4096,8064), FAMILIES (the six families' tasks and log_lookup, a records task run with the records fold's
# plan), PAR (eval processes side by side, 6), CAL_ARGS (arguments of the calibrate stage, default a lazy search:
# --search-step 5 --candidates 16), CALIBRATE (0: the start stage runs the baselines and the diagnosis only),
# LIMIT (seconds of the start stage's evaluations, 420), BUDGET (seconds of the plans stage, 540, of which at
# most WAIT, 240, waiting for the searches), CALIB_FROM (recipe stage).
set -euo pipefail
stage=${1:?stage: start, plans, all, more, recipe or cost}
case "$stage" in
start|plans|all|more|recipe|cost) ;;
*) echo "stage: expected start, plans, all, more, recipe or cost, got $stage" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/out}
GEN=${GEN:-gen} GENEVAL=${GENEVAL:-geneval}  # work and eval folders under /tmp
mkdir -p "$OUT" /tmp/$GEN /tmp/$GENEVAL
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
MODEL=${MODEL:-/tmp/smol}
SAMPLES=${SAMPLES:-40}
LENGTHS=${LENGTHS:-4096,8064}
FAMILIES=${FAMILIES:-records,json_records,table,code,multi_doc,chat_history,log_lookup}
PAR=${PAR:-6}

run_jobs() {  # run_jobs PATTERN LIMIT: the eval jobs whose names match, PAR side by side, until LIMIT seconds
  python3 benchmarks/generalization.py jobs "$MODEL" --work /tmp/$GEN --eval /tmp/$GENEVAL --families "$FAMILIES" \
    --lengths "$LENGTHS" --samples "$SAMPLES" | grep -E "^($1)[^[:space:]]*"$'\t' > /tmp/$GEN/jobs.txt || true
  # one job per (plan, family, length): many small processes keep the GPU busy and resume cleanly
  python3 - "/tmp/$GEN/jobs.txt" > /tmp/$GEN/split.txt <<'PY'
import re, sys
for line in open(sys.argv[1]):
    name, cmd = line.rstrip("\n").split("\t")
    tasks = re.search(r"--tasks (\S+)", cmd).group(1).split(",")
    lengths = re.search(r"--lengths (\S+)", cmd).group(1).split(",")
    out = re.search(r"--out (\S+)", cmd).group(1)
    for t in tasks:
        for n in lengths:
            c = re.sub(r"--tasks \S+", f"--tasks {t}", cmd)
            c = re.sub(r"--lengths \S+", f"--lengths {n}", c)
            c = re.sub(r"--out \S+", f"--out {out}/{t}-{n}", c)
            print(f"{c} > {out}-{t}-{n}.log 2>&1")
PY
  echo "$(wc -l < /tmp/$GEN/split.txt) eval processes, $PAR at a time"
  timeout "$2" xargs -P "$PAR" -I{} sh -c '{}' < /tmp/$GEN/split.txt || echo "eval stopped at its limit (rerun resumes)"
}

diagnose() {  # diagnose NAME=PLAN ...: decode-time coverage per (layer, KV head) on every family, in the background
  local args=() stem=/tmp/$GEN/diagnose
  for spec in "$@"; do args+=(--plan "$spec"); stem="$stem-${spec%%=*}"; done
  python3 benchmarks/diagnose_families.py "$MODEL" "${args[@]}" --families "$FAMILIES" --length 4096 --samples 4 \
    -o "$stem" > "$stem.log" 2>&1 &
}

collect() {
  python3 - > /tmp/$GEN/meta.json <<'PY'
import datetime, json, torch, triton, transformers
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}))
PY
  tar -cf "$OUT/gen.tar" -C /tmp --exclude="$GEN/calib.pt" "$GEN" "$GENEVAL"
  tail -n 25 /tmp/$GEN/calibrate.log 2>/dev/null || true
}

case "$stage" in
start)
  bash benchmarks/smollm2_gpu.sh prepare > /tmp/$GEN/prepare.log 2>&1 || { tail -n 20 /tmp/$GEN/prepare.log; exit 1; }
  if [ "${CALIBRATE:-1}" = 1 ] && ! pgrep -f "generalization.py calibrate" > /dev/null; then
    setsid nohup python3 benchmarks/generalization.py calibrate "$MODEL" --work /tmp/$GEN --budget-s 1500 \
      ${CAL_ARGS:---search-step 5 --candidates 16} >> /tmp/$GEN/calibrate.log 2>&1 < /dev/null &
  fi
  diagnose previous=plans/smollm2-135m-instruct-prose.json paper=plans/smollm2-135m-instruct-paper.json
  run_jobs "baselines" "${LIMIT:-420}"
  collect
  ;;
plans)
  waited=0
  while pgrep -f "generalization.py calibrate" > /dev/null && [ "$waited" -lt "${WAIT:-240}" ]; do
    sleep 10; waited=$((waited + 10))
  done
  [ -f /tmp/$GEN/plans/mixture-10.json ] && diagnose mixture=/tmp/$GEN/plans/mixture-10.json
  run_jobs "baselines|mixture|lofo" "$(( ${BUDGET:-540} - waited ))"
  collect
  ;;
all)  # one call: start, baselines for FIRST seconds, then whatever plans exist until BUDGET seconds in all
  begin=$(date +%s)
  bash benchmarks/smollm2_gpu.sh prepare > /tmp/$GEN/prepare.log 2>&1 || { tail -n 20 /tmp/$GEN/prepare.log; exit 1; }
  pgrep -f "generalization.py calibrate" > /dev/null || setsid nohup python3 benchmarks/generalization.py calibrate \
    "$MODEL" --work /tmp/$GEN --budget-s 1500 ${CAL_ARGS:---search-step 5 --candidates 16} >> /tmp/$GEN/calibrate.log \
    2>&1 < /dev/null &
  diagnose previous=plans/smollm2-135m-instruct-prose.json paper=plans/smollm2-135m-instruct-paper.json
  run_jobs "baselines" "${FIRST:-240}"
  [ -f /tmp/$GEN/plans/mixture-10.json ] && diagnose mixture=/tmp/$GEN/plans/mixture-10.json
  run_jobs "baselines|mixture|lofo" "$(( ${BUDGET:-540} - ($(date +%s) - begin) ))"
  collect
  ;;
more)
  begin=$(date +%s)
  bash benchmarks/smollm2_gpu.sh prepare > /tmp/$GEN/prepare.log 2>&1 || { tail -n 20 /tmp/$GEN/prepare.log; exit 1; }
  [ -f /tmp/$GEN/seeded ] || { python3 benchmarks/generalization.py seed --work /tmp/$GEN --eval /tmp/$GENEVAL && touch /tmp/$GEN/seeded; }
  run_jobs "${JOBS:-baselines|mixture|lofo|decode-only}" "$(( ${BUDGET:-540} - ($(date +%s) - begin) ))"
  collect
  ;;
recipe)  # another calibration recipe (CAL_ARGS) in its own folders (GEN, GENEVAL): its searches in the
  # background, at most WAIT seconds waiting for them, then its new plans' evaluations (no baselines) until BUDGET
  begin=$(date +%s)
  bash benchmarks/smollm2_gpu.sh prepare > /tmp/$GEN/prepare.log 2>&1 || { tail -n 20 /tmp/$GEN/prepare.log; exit 1; }
  # CALIB_FROM: another recipe's folder whose calibration set (prompts, statistics, measured plans) this one shares
  if [ -n "${CALIB_FROM:-}" ] && [ ! -f /tmp/$GEN/calib.pt ] && [ -f /tmp/$CALIB_FROM/calib.pt ]; then
    cp /tmp/$CALIB_FROM/calib.pt /tmp/$GEN/calib.pt
  fi
  [ -f /tmp/$GEN/searches-done ] || pgrep -f "generalization.py calibrate.*/tmp/$GEN " > /dev/null || {
    setsid nohup sh -c "python3 benchmarks/generalization.py calibrate $MODEL --work /tmp/$GEN --budget-s 1500 \
      ${CAL_ARGS:?CAL_ARGS: arguments of generalization.py calibrate} && touch /tmp/$GEN/searches-done" \
      >> /tmp/$GEN/calibrate.log 2>&1 < /dev/null & }
  waited=0
  while [ ! -f /tmp/$GEN/searches-done ] && [ "$waited" -lt "${WAIT:-240}" ]; do sleep 10; waited=$((waited + 10)); done
  run_jobs "mixture|lofo" "$(( ${BUDGET:-540} - ($(date +%s) - begin) ))"
  collect
  ;;
cost)
  python3 benchmarks/calibrate_cost.py -o "$OUT/calibrate_cost"
  ;;
esac
