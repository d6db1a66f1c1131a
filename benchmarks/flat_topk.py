"""The decode anchor on flat attention (every score nearly equal, as tiny random weights give) against peaked
attention, with the chunked finish for crowded rows (finish_max 4096) and without it (finish_max above every
row, the default: the single-program finish walks the whole row), beside torch's SDPA decode on the same shapes
(a reference point, not FlashAttention-3). GPU only. Writes a JSON with the medians (triton.testing.do_bench, ms).

    python benchmarks/flat_topk.py [--batch 3] [--keys 131072] -o OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode import graphed  # noqa: E402  (benchmarks/decode.py, beside this file: fn captured in a CUDA graph)
from kascade.kernels import decode as K  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=3, help="requests (default %(default)s)")
    ap.add_argument("--keys", type=int, default=131072, help="keys per request (default %(default)s)")
    ap.add_argument("-o", required=True, help="the JSON to write")
    a = ap.parse_args()
    torch.manual_seed(0)
    B, Hkv, G, N, D = a.batch, 8, 4, a.keys, 128
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_peaked = torch.randn(B, Hkv * G, 1, D, device="cuda", dtype=torch.bfloat16)
    q_flat = q_peaked * 1e-4  # scores ~1e-4 * N(0, sqrt(D)): softmax uniform to float precision
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "batch": B, "keys": N, "kv_heads": Hkv, "group": G, "head_dim": D, "ms": {}}
    sdpa = lambda q: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    res["ms"]["sdpa_decode"] = triton.testing.do_bench(lambda: sdpa(q_peaked), warmup=50, rep=300)
    for name, q in (("peaked", q_peaked), ("flat", q_flat)):
        for finish_max in (4096, 1 << 30):
            K.CONFIG["select"]["finish_max"] = finish_max
            fn = lambda: K.anchor(q, k, v, 0.1, 128, 32)  # noqa: E731
            fn()
            key = f"anchor_{name}_{'chunked' if finish_max == 4096 else 'single'}_finish"
            res["ms"][key] = triton.testing.do_bench(fn, warmup=50, rep=300)
            res["ms"][key + "_graph"] = triton.testing.do_bench(graphed(fn).replay, warmup=50, rep=300)
    default = K.CONFIG["select"]["finish_max"]
    K.CONFIG["select"]["finish_max"] = 4096
    out1, sel1 = K.anchor(q_flat, k, v, 0.1, 128, 32)
    K.CONFIG["select"]["finish_max"] = 1 << 30
    out2, sel2 = K.anchor(q_flat, k, v, 0.1, 128, 32)
    same = all(torch.equal(sel1.indices[b, h, 0].sort().values, sel2.indices[b, h, 0].sort().values)
               for b in range(B) for h in range(Hkv))
    K.CONFIG["select"]["finish_max"] = default
    res["flat_same_sets"] = same
    Path(a.o).write_text(json.dumps(res, indent=1))
    for kk, vv in res["ms"].items():
        print(f"{kk:40s} {vv:.3f} ms")
    print("flat: same selected sets with both finishes:", same)


if __name__ == "__main__":
    main()
