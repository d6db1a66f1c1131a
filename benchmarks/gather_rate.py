"""How fast the GPU serves the row gathers of a reuse layer, without any attention arithmetic.

A reuse layer reads, per KV head, the K and V rows (256 bytes each at D = 128, bf16) at the anchor's
selected positions: ~10% of the rows, scattered over the cache. This script times a minimal Triton
kernel that only loads those rows and sums them (one [D] partial per program, so the writes are
negligible), on the same program grid as the reuse kernel, for several index patterns:

    selected    the positions kascade.kernels.decode.select picks on random q, k (what the reuse
                layer of benchmarks/decode.py gathers)
    random      as many uniformly random distinct positions per head, ascending
    contiguous  the first k positions of each head (a dense stream of the same size)
    all         every position (the stream a dense decode kernel reads)

Kernel durations come from torch.profiler (as the per-kernel profiles of benchmarks/decode.py), so
they compare with the reuse kernel's duration there. Bandwidth = K + V bytes read / duration.

    python benchmarks/gather_rate.py [--out DIR]     # writes DIR/gather_rate_<gpu>.json and .md (e.g. _h200)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_json import short_device_name  # noqa: E402  (benchmarks/report_json.py: the GPU's name in file names)

HKV, D = 8, 128
RHO, K_MIN = 0.1, 128


@triton.jit
def _gather_sum_kernel(K, V, IDX, CNT, OUT, skh, svh, sih, NSPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
                       D: tl.constexpr):
    """Program (h, s): sum of the K and V rows at IDX[h, slots of split s] (fp32), written to OUT[h, s]."""
    h = tl.program_id(0)
    sp = tl.program_id(1)
    cnt = tl.load(CNT + h)
    per = tl.cdiv(tl.cdiv(cnt, BLOCK_K), NSPLIT) * BLOCK_K
    lo = sp * per
    hi = tl.minimum(lo + per, cnt)
    d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_K, D], tl.float32)
    for j0 in range(lo, hi, BLOCK_K):
        offs = j0 + tl.arange(0, BLOCK_K)
        km = offs < hi
        idx = tl.load(IDX + h * sih + offs, mask=km, other=0).to(tl.int64)
        kt = tl.load(K + h * skh + idx[:, None] * D + d[None, :], mask=km[:, None], other=0.0)
        vt = tl.load(V + h * svh + idx[:, None] * D + d[None, :], mask=km[:, None], other=0.0)
        acc += kt.to(tl.float32) + vt.to(tl.float32)
    tl.store(OUT + (h * NSPLIT + sp) * D + d, tl.sum(acc, 0))


def gather_sum(k, v, idx, cnt, nsplit, block_k, num_warps=4, num_stages=2):
    """k, v [Hkv, N, D] contiguous; idx [Hkv, Kcap] int32; cnt [Hkv] int32."""
    out = torch.empty(k.shape[0], nsplit, D, dtype=torch.float32, device=k.device)
    _gather_sum_kernel[(k.shape[0], nsplit)](k, v, idx, cnt, out, k.stride(0), v.stride(0), idx.stride(0),
                                              NSPLIT=nsplit, BLOCK_K=block_k, D=D, num_warps=num_warps,
                                              num_stages=num_stages)
    return out


def patterns(n, q, k):
    """Index patterns [Hkv, Kcap] int32 with their counts [Hkv]."""
    from kascade.budget import budget
    from kascade.kernels import decode as K

    kk = budget(n, RHO, K_MIN)
    sel = K.select(q, k.unsqueeze(0), RHO, K_MIN, 32)
    dev = k.device
    cnt = torch.full((HKV,), kk, dtype=torch.int32, device=dev)
    rand = torch.stack([torch.randperm(n, device=dev)[:kk].sort().values for _ in range(HKV)]).to(torch.int32)
    contiguous = torch.arange(kk, device=dev, dtype=torch.int32).expand(HKV, kk).contiguous()
    full = torch.arange(n, device=dev, dtype=torch.int32).expand(HKV, n).contiguous()
    return {
        "selected": (sel.indices[0, :, 0].contiguous(), sel.counts[0, 0].expand(HKV).to(torch.int32).contiguous()),
        "random": (rand, cnt),
        "contiguous": (contiguous, cnt),
        "all": (full, torch.full((HKV,), n, dtype=torch.int32, device=dev)),
    }


def run(out_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    from decode import kernel_profile

    from kascade.kernels.decode import _splits

    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n in (131072, 524288):
        q = torch.randn(1, HKV * 4, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(HKV, n, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(HKV, n, D, device="cuda", dtype=torch.bfloat16)
        for name, (idx, cnt) in patterns(n, q, k).items():
            nbytes = 2 * int(cnt.sum()) * D * 2
            for per_sm, block_k in ((4, 32), (2, 64), (8, 32)):
                nsplit = _splits(HKV, k.device, per_sm)  # the reuse kernel's split count
                fn = lambda: gather_sum(k, v, idx, cnt, nsplit, block_k)  # noqa: E731
                prof = kernel_profile(fn)
                us = prof.get("_gather_sum_kernel", float("nan"))
                rows.append(dict(N=n, pattern=name, per_sm=per_sm, BLOCK_K=block_k, splits=nsplit, us=us,
                                 bytes=nbytes, TBps=nbytes / (us * 1e-6) / 1e12))
                print(f"N={n:7d} {name:10s} per_sm={per_sm} BLOCK_K={block_k:3d} {us:8.1f} us "
                      f"{rows[-1]['TBps']:.2f} TB/s", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=str(datetime.date.today()), sms=sms)
    os.makedirs(out_dir, exist_ok=True)
    tag = short_device_name(torch.cuda.get_device_name())
    json.dump(dict(meta=meta, rows=rows), open(os.path.join(out_dir, f"gather_rate_{tag}.json"), "w"), indent=1)
    lines = [f"# Row-gather rate, {meta['device']}", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; K and V rows of 8 KV heads, D 128, "
             "bf16; kernel durations (torch.profiler); best launch setting per row.", "",
             "| N | pattern | rows per head | us | TB/s | setting |", "|---|---|---|---|---|---|"]
    for n in sorted({r["N"] for r in rows}):
        for name in ("selected", "random", "contiguous", "all"):
            rs = [r for r in rows if r["N"] == n and r["pattern"] == name]
            best = min(rs, key=lambda r: r["us"])
            lines.append(f"| {n // 1024}K | {name} | {best['bytes'] // (4 * D * HKV)} | {best['us']:.1f} | "
                         f"{best['TBps']:.2f} | per_sm {best['per_sm']}, BLOCK_K {best['BLOCK_K']} |")
    md = "\n".join(lines) + "\n"
    open(os.path.join(out_dir, f"gather_rate_{tag}.md"), "w").write(md)
    print(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    run(ap.parse_args().out)
