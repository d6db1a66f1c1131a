#!/usr/bin/env bash
# Kascade in vLLM 0.26.0 on the lent GPU machine: the correctness check, then the serving benchmark, in stages
# that each fit one call (10 minutes; the machine keeps /tmp between calls made while it is warm). Run from the
# repository root. vLLM itself comes first, as ../shared/tools/vllm-gpu-parts says (run it here once: it fills
# .vllm/ with parts, install.sh and env.sh), one call per part, each right after the last:
#   carry [".vllm/parts/partNN", ".vllm/install.sh", ".vllm/env.sh"]   command: bash .vllm/install.sh
# then, while the machine stays warm (carry [".vllm/env.sh"] in every call; add ".vllm_cells" to resume from
# cell files returned by earlier calls, copied there from $OUT: see SEED below):
#   bash benchmarks/vllm_gpu.sh tests      the GPU tests of the decode path and the paged kernels (sync debug
#                                          mode, CUDA-graph replay), about 2 minutes
#   bash benchmarks/vllm_gpu.sh check      benchmarks/vllm_gpu_check.py: kascade-tiny (and SmolLM2 when /tmp/smol
#                                          holds it: benchmarks/smollm2_gpu.sh copy/prepare first), 6 vLLM engines
#                                          and 2 transformers references per model; repeat until "missing cells: none"
#   bash benchmarks/vllm_gpu.sh eval       benchmarks/vllm_eval.py: niah_single, niah_multikey, doc_qa_chat at 4096 and
#                                          8064 tokens through vLLM, dense and the shipped plan (needs /tmp/smol);
#                                          VARIANTS=default,no-prefix-cache,chunk512,eager,decode-only adds cells with
#                                          other engine settings (benchmarks/vllm_eval.py VARIANTS); PLANS=shipped,
#                                          prose,dense picks the plans (prose: the plan of the transformers rows);
#                                          SAMPLES=60 runs 60 samples a cell (cells ...-n60)
#   bash benchmarks/vllm_gpu.sh bench      benchmarks/vllm_serving.py run: 12 cells (3 providers x graph/eager x
#                                          long/mid, 2-4 minutes each); repeat until "missing cells: none"
#                                          (PROVIDERS, MODES, WORKLOADS narrow it, e.g. MODES=graph first;
#                                          PROFILE=1 adds each cell's kernel breakdown: benchmarks/vllm_profile.py;
#                                          anchors5-fp8 and selecting10-fp8 in PROVIDERS: the same plans selecting
#                                          from the FP8 copy of the keys; anchors5-chunked and selecting10-chunked:
#                                          the same plans with the decode top-k's chunked finish (flat scores);
#                                          WEIGHTS=init draws the weights at the initializer's scale, not vLLM's
#                                          near-zero dummy ones: cells named ...-init)
#   bash benchmarks/vllm_gpu.sh serve      benchmarks/vllm_serving.py serve: vllm serve + 16 concurrent requests,
#                                          with the plan and on vLLM dense (the control); the server needs uvicorn,
#                                          uvloop, aiohttp, ...: run `bash benchmarks/vllm_serve_deps.sh download`
#                                          here once and also carry ".vllm/serve_whl"; INVARIANT=1 runs both
#                                          in vLLM's batch-invariant mode instead (VLLM_BATCH_INVARIANT=1:
#                                          serve_invariant*.json)
#   bash benchmarks/vllm_gpu.sh report     both reports from the cells in /tmp (they also run on this machine:
#                                          python benchmarks/vllm_serving.py report --work DIR; same for the check)
# Every stage copies what it makes to $OUT (cell JSON files and logs). SEED=DIR (default .vllm_cells, if carried)
# first copies DIR/check/*.json, DIR/bench/*.json and DIR/eval/*.json into the work folders, so a cold machine
# resumes too.
set -euo pipefail
stage=${1:?stage: tests, check, eval, bench, serve or report}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
EP=/tmp/kascade-ep
export PYTHONPATH=/tmp/site:$EP:$PWD PYTHONUNBUFFERED=1
if [ -f .vllm/env.sh ]; then
  source .vllm/env.sh
else  # what vllm-gpu-parts' env.sh sets
  export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TVM_FFI_DISABLE_TORCH_C_DLPACK=1
fi
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import vllm_common as V; V.install_entry_point()"
python3 -c "import vllm, importlib.metadata as m; eps = [e.value for e in m.entry_points(group='vllm.general_plugins')]; \
print('vllm', vllm.__version__, 'plugins', eps); assert 'kascade.integrations.vllm:register' in eps" \
  || { echo "vLLM 0.26.0 is not importable from /tmp/site (run .vllm/install.sh with each part first)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SEED=${SEED:-.vllm_cells}
for kind in check bench eval; do
  if [ -d "$SEED/$kind" ]; then mkdir -p "/tmp/vllm_$kind" && cp -n "$SEED/$kind"/*.json "/tmp/vllm_$kind/" 2>/dev/null || true; fi
done
case "$stage" in
tests)
  python3 -m pytest -q -m gpu tests/test_paged_decode.py tests/test_kernels_paged.py 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.txt"
  ;;
check)
  python3 benchmarks/vllm_gpu_check.py run --work /tmp/vllm_check --models "${MODELS:-tiny,smol}" \
    --budget-s "${BUDGET:-540}" --copy-to "$OUT/check"
  python3 benchmarks/vllm_gpu_check.py report --work /tmp/vllm_check -o "$OUT/vllm_check" || true
  ;;
eval)
  python3 benchmarks/vllm_eval.py run --work /tmp/vllm_eval --variants "${VARIANTS:-default}" \
    --plans "${PLANS:-shipped,dense}" --samples "${SAMPLES:-20}" --budget-s "${BUDGET:-540}" \
    --copy-to "$OUT/eval"
  python3 benchmarks/vllm_eval.py report --work /tmp/vllm_eval -o "$OUT/vllm_eval" || true
  ;;
bench)
  python3 benchmarks/vllm_serving.py run --work /tmp/vllm_bench --providers "${PROVIDERS:-flash,anchors5,selecting10}" \
    --modes "${MODES:-graph,eager}" --workloads "${WORKLOADS:-long,mid}" --budget-s "${BUDGET:-540}" --copy-to "$OUT/bench" \
    --weights "${WEIGHTS:-dummy}" ${PROFILE:+--profile}
  ;;
serve)  # with the plan, then the same run on vLLM dense (the control: what preemption does without Kascade)
  # vLLM's OpenAI server needs modules the parts leave out (benchmarks/vllm_serve_deps.sh; carry .vllm/serve_whl)
  bash benchmarks/vllm_serve_deps.sh install
  mkdir -p "$OUT/bench" /tmp/vllm_bench
  name=serve flags=()
  if [ "${INVARIANT:-0}" = 1 ]; then name=serve_invariant flags=(--batch-invariant); fi
  python3 benchmarks/vllm_serving.py serve "${flags[@]}" --out "/tmp/vllm_bench/$name.json" || true
  python3 benchmarks/vllm_serving.py serve "${flags[@]}" --plan none --out "/tmp/vllm_bench/${name}_dense.json" || true
  cp /tmp/vllm_bench/serve*.json /tmp/vllm_bench/serve*.server.log "$OUT/bench/"
  ;;
report)
  python3 benchmarks/vllm_gpu_check.py report --work /tmp/vllm_check -o "$OUT/vllm_check" || true
  python3 benchmarks/vllm_serving.py report --work /tmp/vllm_bench -o "$OUT/vllm"
  ;;
*)
  echo "unknown stage $stage: tests, check, eval, bench, serve or report"; exit 2 ;;
esac
