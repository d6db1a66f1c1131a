#!/usr/bin/env bash
# Packs FlashAttention-3 (fa3-fwd 0.0.3, the baselines' FA3) small enough to travel beside the tree in ONE
# device call: the wheel's files as .whl/fa3.tar.xz (about 9 MiB, against 26 MiB for the wheel, which had to
# travel in two halves). Run here, from the repository root; .whl/ is ignored by git. The wheel comes from
# WHEEL (a path), else .whl/fa3_fwd-0.0.3-*.whl, else ../shared/tools/fa3-wheel fetches it. On the device,
# carry .whl/fa3.tar.xz; benchmarks/fa3_install.sh unpacks it into /tmp/site. ARCHIVE overrides the output path.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${ARCHIVE:-.whl/fa3.tar.xz}
mkdir -p .whl "$(dirname "$out")"
wheel=${WHEEL:-}
if [ -z "$wheel" ]; then
  wheel=$(compgen -G ".whl/fa3_fwd-0.0.3-*.whl" | head -n 1 || true)
fi
if [ -z "$wheel" ] && [ -x ../shared/tools/fa3-wheel ]; then
  ../shared/tools/fa3-wheel >/dev/null
  wheel=$(compgen -G ".whl/fa3_fwd-0.0.3-*.whl" | head -n 1 || true)
fi
[ -n "$wheel" ] && [ -f "$wheel" ] || { echo "fa3_pack: no wheel (set WHEEL=path/to/fa3_fwd-*.whl)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$wheel" "$tmp/site"
tar -C "$tmp/site" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01' -cf - . \
  | xz -9e -T0 > "$tmp/fa3.tar.xz"
mv "$tmp/fa3.tar.xz" "$out"
echo "fa3_pack: $out ($(( $(stat -c %s "$out") / 1048576 )) MiB) from $(basename "$wheel")"
