"""Launch variants of the prefill anchor and reuse kernels, timed against FlashAttention-3 in one run.

    python benchmarks/prefill_variants.py --lengths 32768 131072 --out DIR

For each length: FA3 (when installed), the pooled-score passes of anchor selection under each
candidate configuration of kascade.kernels.prefill_pool (the top-k step switched off; each
candidate's selection checked against the default's), and the reuse kernel under each candidate of
kascade.kernels.prefill.sparse_config. Writes DIR/prefill_variants.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from prefill import (  # noqa: E402
    D, HKV, HQ, K_MIN, RHO, TILE, _same_selection, bench, dense_flops, load_fa3, select_flops, sparse_flops, stat,
)

from kascade.kernels import prefill as P  # noqa: E402

POOL = {
    "default": {},
    "BN64_w4_s3": dict(BLOCK_N=64, num_warps=4, num_stages=3),
    # the Gluon pass (kascade.kernels.prefill_pool_gluon): TMA into NBUF buffers, async wgmma ahead of the exp2
    "gluon_BN128_nb3": dict(kernel="gluon", BLOCK_N=128, NBUF=3),
    "gluon_BN128_nb2": dict(kernel="gluon", BLOCK_N=128, NBUF=2),
    "gluon_BN128_nb2_r128": dict(kernel="gluon", BLOCK_N=128, NBUF=2, maxnreg=128),  # two programs per SM
    "gluon_BN128_nb2_r128_fold": dict(kernel="gluon", BLOCK_N=128, NBUF=2, maxnreg=128, fold=True),
    "gluon_BN64_nb3": dict(kernel="gluon", BLOCK_N=64, NBUF=3),
    "gluon_BN64_nb2": dict(kernel="gluon", BLOCK_N=64, NBUF=2),
}
SPARSE = {
    "default": {},
    "BK64_w8_s3": dict(BLOCK_K=64, num_warps=8, num_stages=3),
    "BK32_w8_s4": dict(BLOCK_K=32, num_warps=8, num_stages=4),
    "BK32_w8_s5": dict(BLOCK_K=32, num_warps=8, num_stages=5),
    "BK32_w4_s4": dict(BLOCK_K=32, num_warps=4, num_stages=4),
    "BK16_w8_s6": dict(BLOCK_K=16, num_warps=8, num_stages=6),
}


def _rows_differ(a, b) -> int:
    """(sequence, KV head, tile) rows whose selected sets differ (the counts must agree)."""
    kk = a.indices.shape[-1]
    valid = torch.arange(kk, device=a.indices.device)[None, None, None, :] < a.counts[:, None, :, None]
    sa = torch.where(valid, a.indices, -1).sort(-1).values
    sb = torch.where(valid, b.indices[..., :kk], -1).sort(-1).values
    return int((sa != sb).any(-1).sum().item())


def run(n: int, fa3, parts=("pool", "sparse"), only=None) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    head_map = torch.randperm(HKV, device="cuda", generator=g)
    res = {"N": n, "pool": {}, "sparse": {}}
    if fa3 is not None:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        t = bench(lambda: fa3.flash_attn_func(qt, kt, vt, causal=True))
        res["fa3"] = dict(stat(t), tflops=dense_flops(n) / t[0] / 1e9)
        del qt, kt, vt
    sel0 = P.select(q, k, RHO, K_MIN, TILE)
    out0 = P.sparse_attention(q, k, v, sel0, head_map=head_map)
    real_topk = P.topk_rows_chunk
    for name, cfg in (POOL.items() if "pool" in parts else ()):
        if only and name != "default" and not re.search(only, name):
            continue
        try:
            sel = P.select(q, k, RHO, K_MIN, TILE, pool_cfg=cfg)
            same, differ = _same_selection(sel, sel0), _rows_differ(sel, sel0)
            P.topk_rows_chunk = lambda *a, **kw: None
            t = bench(lambda: P.select(q, k, RHO, K_MIN, TILE, pool_cfg=cfg))
            res["pool"][name] = dict(stat(t), same=same, rows_differ=differ, rows=int(sel0.counts.numel() * HKV), cfg=cfg,
                                     tflops=select_flops(n) / t[0] / 1e9)
        except Exception as e:  # noqa: BLE001
            res["pool"][name] = {"error": repr(e)[:300]}
        finally:
            P.topk_rows_chunk = real_topk
        print(n, "pool", name, res["pool"][name], flush=True)
    for name, cfg in (SPARSE.items() if "sparse" in parts else ()):
        if only and name != "default" and not re.search(only, name):
            continue
        try:
            o = P.sparse_attention(q, k, v, sel0, head_map=head_map, config=cfg)
            same = bool((o.float() - out0.float()).abs().max() < 2e-2)
            t = bench(lambda: P.sparse_attention(q, k, v, sel0, head_map=head_map, config=cfg))
            res["sparse"][name] = dict(stat(t), same=same, cfg=cfg, tflops=sparse_flops(n) / t[0] / 1e9)
        except Exception as e:  # noqa: BLE001
            res["sparse"][name] = {"error": repr(e)[:300]}
        print(n, "sparse", name, res["sparse"][name], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--parts", nargs="*", default=["pool", "sparse"], choices=["pool", "sparse"],
                    help="which kernels' variants to time (default both)")
    ap.add_argument("--only", default=None, help="regular expression: time only the variants it matches (and default)")
    args = ap.parse_args()
    import triton

    fa3 = load_fa3()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    results = [run(n, fa3, args.parts, args.only) for n in args.lengths]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_variants.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(meta)
    print("| N | part | variant | ms | / FA3 | TFLOP/s | same |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        fa = r.get("fa3", {}).get("median_ms")
        for part in ("pool", "sparse"):
            for name, x in r[part].items():
                if "median_ms" in x:
                    ratio = f"{x['median_ms'] / fa:.3f}" if fa else "-"
                    print(f"| {r['N']} | {part} | {name} | {x['median_ms']:.2f} | {ratio} | {x['tflops']:.0f} | {x['same']} |")
                else:
                    print(f"| {r['N']} | {part} | {name} | error | | | |")


if __name__ == "__main__":
    main()
