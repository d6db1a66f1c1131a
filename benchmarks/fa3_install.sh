#!/usr/bin/env bash
# Makes FlashAttention-3 importable on the device machine (into TARGET, default /tmp/site, which the GPU
# scripts put on PYTHONPATH), from what the call carried, first found: .whl/fa3.tar.xz (benchmarks/fa3_pack.sh;
# one call), the wheel .whl/fa3_fwd-*.whl, or its two halves (.whl/fa3parts/p0 copied to /tmp/fa3 by an
# earlier call, p1 carried now); ARCHIVE names another archive. Does nothing when fa3_fwd_interface already imports (a warm machine).
# Never fails the caller: it prints whether FA3 imports, and the benchmarks skip FA3 when it does not.
set -uo pipefail
cd "$(dirname "$0")/.."
target=${TARGET:-/tmp/site}
archive=${ARCHIVE:-.whl/fa3.tar.xz}
mkdir -p "$target"
imports() { PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import fa3_fwd_interface" 2>/dev/null; }
if ! imports; then
  if [ -f "$archive" ]; then
    tar -C "$target" -xJf "$archive"
  elif compgen -G ".whl/fa3_fwd-*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$target" .whl/fa3_fwd-*.whl 2>&1 | tail -n 2
  else
    if [ -f .whl/fa3parts/p1 ]; then mkdir -p /tmp/fa3 && cp .whl/fa3parts/p1 /tmp/fa3/; fi
    if [ -f /tmp/fa3/p0 ] && [ -f /tmp/fa3/p1 ]; then
      cat /tmp/fa3/p0 /tmp/fa3/p1 > /tmp/fa3/fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl
      python3 -m pip install -q --no-index --no-deps --target "$target" /tmp/fa3/fa3_fwd-*.whl 2>&1 | tail -n 2
    fi
  fi
fi
if imports; then echo "FA3: fa3_fwd_interface imports"; else echo "FA3: not importable (carry .whl/fa3.tar.xz)"; fi
exit 0
