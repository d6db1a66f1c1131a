#!/usr/bin/env bash
# The GPU run of issue 18's decode measurements, in one call of under 9 minutes, from the repository root:
#   (a) the decode kernel tests on CUDA at full size (tests/test_kernels_decode.py, test_topk_select.py,
#       test_kernels_paged.py, test_decode_shapes.py), log in $OUT/gpu_tests.txt;
#   (b) benchmarks/decode_shapes.py --out $OUT (every shape at 32K / 128K, B = 1 / 8, whole models),
#       log in $OUT/decode_shapes_log.txt; then its headline table and the programmatic-dependent-launch table.
#       The main columns use KASCADE_DECODE_PDL (default exit); every PDL mode is timed beside them at the
#       headline size, with a check that each selects the same indices and gives the same outputs.
# FlashAttention-3: carry .whl/fa3.tar.xz (benchmarks/fa3_pack.sh); benchmarks/fa3_install.sh puts it into
# /tmp/site here. Without it FA3 is skipped and the results say so.
# Environment: OUT (default /tmp/out), TEST_SECONDS (150), BENCH_SECONDS (330; the benchmark starts no new size
# after BUDGET_S, 270, beyond the 128K B=1 headline of every shape), BENCH_ARGS (extra arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
bash benchmarks/fa3_install.sh
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"

start=$(date +%s)
timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py \
  tests/test_topk_select.py tests/test_kernels_paged.py tests/test_decode_shapes.py > "$OUT/gpu_tests.txt" 2>&1
echo "tests: exit $? in $(( $(date +%s) - start )) s: $(tail -n 1 "$OUT/gpu_tests.txt")"

start=$(date +%s)
# shellcheck disable=SC2086
KASCADE_DECODE_PDL=${KASCADE_DECODE_PDL:-exit} timeout "${BENCH_SECONDS:-330}" \
  python3 benchmarks/decode_shapes.py --out "$OUT" --budget-s "${BUDGET_S:-270}" ${BENCH_ARGS:-} \
  > "$OUT/decode_shapes_log.txt" 2>&1
rc=$?
echo "benchmark: exit $rc in $(( $(date +%s) - start )) s"
json=$(ls "$OUT"/decode_shapes_*.json 2>/dev/null | head -n 1)
if [ -n "$json" ] && [ "$rc" -ne 0 ]; then  # stopped early: the report of the shapes measured so far
  python3 benchmarks/decode_shapes.py --report "$json" >> "$OUT/decode_shapes_log.txt" 2>&1
fi
grep -E "^  (B=|.*failed)" "$OUT/decode_shapes_log.txt" | tail -n 4
md=${json%.json}.md
[ -f "$md" ] && sed -n '/^| shape | model/,/^$/p' "$md" && sed -n '/^## Programmatic/,$p' "$md"
