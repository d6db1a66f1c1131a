#!/usr/bin/env bash
# The decode top-k on tied, flat and peaked scores, on the lent GPU machine, in one call (about 3 minutes): the GPU
# tests of the chunked finish (128K keys, eagerly and in a CUDA graph, against the single finish), then
# benchmarks/flat_topk.py at BATCHES (default 1,4,8), merged into $OUT/flat_topk_<gpu>.{json,md,png} (the per-batch
# runs stay in /tmp/flat_topk, so that a call that runs more beside it keeps within the 8 files a call returns). Run
# from the repository root, no carry; copy the merged files to benchmarks/results/. What it shows: what the chunked
# finish (finish_max 4096) costs on peaked rows, and what tied rows cost since the single finish copies their ties
# (docs/serving.md, benchmarks/notes_decode.md).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pytest -q tests/test_kernels_decode.py tests/test_topk_select.py -k "gpu_chunked_finish or crowded or tie" 2>&1 | tail -n 5 \
  | tee "$OUT/flat_topk_gpu_tests.txt"
gpu=$(python3 -c "import sys, torch; sys.path.insert(0, 'benchmarks'); from report_json import short_device_name; \
print(short_device_name(torch.cuda.get_device_name()))")  # h100, h200
runs=()
mkdir -p /tmp/flat_topk
IFS=, read -ra batches <<< "${BATCHES:-1,4,8}"
for b in "${batches[@]}"; do
  python3 benchmarks/flat_topk.py --batch "$b" -o "/tmp/flat_topk/flat_topk_${gpu}_b$b.json"
  runs+=("/tmp/flat_topk/flat_topk_${gpu}_b$b.json")
done
python3 benchmarks/flat_topk.py --merge "${runs[@]}" --date "$(date +%F)" -o "$OUT/flat_topk_$gpu"
cat "$OUT/flat_topk_$gpu.md"
