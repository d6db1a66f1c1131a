#!/usr/bin/env bash
# The decode top-k on tied, flat and peaked scores, on the lent GPU machine, in one call (about 3 minutes): the GPU
# tests of the chunked finish (128K keys, eagerly and in a CUDA graph, against the single finish), then
# benchmarks/flat_topk.py at BATCHES (default 1,4,8), merged into $OUT/flat_topk_<gpu>.{json,md,png}. Run from the
# repository root, no carry; copy the merged files to benchmarks/results/ (and the per-batch runs, if wanted, to
# keep beside them). What it decides: whether the chunked finish (finish_max 4096) costs nothing on peaked rows,
# so that it can become the default (docs/serving.md).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/test_kernels_decode.py -k "chunked_finish or crowded" 2>&1 | tail -n 5 \
  | tee "$OUT/flat_topk_gpu_tests.txt"
gpu=$(python3 -c "import sys, torch; sys.path.insert(0, 'benchmarks'); from report_json import short_device_name; \
print(short_device_name(torch.cuda.get_device_name()))")  # h100, h200
runs=()
IFS=, read -ra batches <<< "${BATCHES:-1,4,8}"
for b in "${batches[@]}"; do
  python3 benchmarks/flat_topk.py --batch "$b" -o "$OUT/flat_topk_${gpu}_b$b.json"
  runs+=("$OUT/flat_topk_${gpu}_b$b.json")
done
python3 benchmarks/flat_topk.py --merge "${runs[@]}" --date "$(date +%F)" -o "$OUT/flat_topk_$gpu"
cat "$OUT/flat_topk_$gpu.md"
