"""Paged KV cache vs contiguous cache: the cost of resolving pages inside Kascade's kernels.

Llama-3.1-8B attention shapes (32 q / 8 KV heads, D 128, bf16, rho 0.1), one layer, batch 1,
128K keys. The same keys are stored once contiguously ([1, Hkv, N, D]) and once in a shuffled page
pool (vLLM's [num_pages, page_size, Hkv, D], page sizes 16 and 128); each kernel runs on both and
its median time (triton.testing.do_bench; decode steps captured in a CUDA graph) is compared:

    decode:  anchor (select + sparse output), reuse (sparse attention over a selection)
    prefill: select (pooled scores + top-k; pages resolved in the kernel, and keys gathered into a
             contiguous scratch first: "-gather"), reuse (sparse attention over a selection)
    --end-variant: also the contiguous selection with per-sequence ends (kv_len: "contiguous-ends"), as is and
             with the pooled-score kernel held to 128 registers ("-maxnreg128")
    --chunk C: also the selection as vLLM's chunked prefill runs it, C queries at a time on top of the
             cache of the chunks before (keys gathered; "paged-P-chunk-C", the sum of the chunks' medians)

    python benchmarks/paged.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kascade.kernels import decode as KD  # noqa: E402
from kascade.kernels import prefill as KP  # noqa: E402
from kascade.kernels.paging import PagedKV  # noqa: E402
from report_json import short_device_name  # noqa: E402  (benchmarks/report_json.py: the GPU's name in file names)

HQ, HKV, D = 32, 8, 128
RHO, K_MIN, TILE = 0.1, 128, 32
DT = torch.bfloat16


def to_pages(k, v, page_size, seed=0):
    """[1, Hkv, N, D] -> PagedKV over a shuffled pool of N / page_size pages (+ a few spare)."""
    n = k.shape[2]
    n_pages = -(-n // page_size)
    pool = n_pages + 8
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n_pages].to(k.device)
    kc = torch.randn(pool, page_size, HKV, D, dtype=k.dtype, device=k.device)
    vc = torch.randn(pool, page_size, HKV, v.shape[-1], dtype=v.dtype, device=v.device)
    pad = n_pages * page_size - n
    kp = torch.nn.functional.pad(k[0], (0, 0, 0, pad)).view(HKV, n_pages, page_size, D).permute(1, 2, 0, 3)
    vp = torch.nn.functional.pad(v[0], (0, 0, 0, pad)).view(HKV, n_pages, page_size, -1).permute(1, 2, 0, 3)
    kc[order], vc[order] = kp, vp
    bt = order.to(torch.int32)[None, :]
    return PagedKV(kc, vc, bt, torch.tensor([n], dtype=torch.int32, device=k.device))


def timed(fn, graph: bool):
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    med, p20, p80 = triton.testing.do_bench(run, warmup=25, rep=300, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80)}


def chunked_select(q, cache: PagedKV, chunk: int) -> dict:
    """select_paged of q's positions chunk by chunk, each on top of the cache of the chunks before (the cache
    holding the keys up to the chunk's end, as vLLM's chunked prefill writes them): sums of the medians."""
    n = q.shape[2]
    total = {"median_ms": 0.0, "p20_ms": 0.0, "p80_ms": 0.0}
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        part = PagedKV(cache.key_cache, cache.value_cache, cache.block_table,
                       torch.tensor([end], dtype=torch.int32, device=q.device))
        qc = q[:, :, start:end]
        res = timed(lambda: KP.select_paged(qc, part, RHO, K_MIN, TILE), False)
        for key in total:
            total[key] += res[key]
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--pages", type=int, nargs="*", default=[16, 128])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--chunk", type=int, default=0, help="also time chunked prefill selection, C queries a chunk")
    ap.add_argument("--end-variant", action="store_true",
                    help="also time the contiguous prefill selection with per-sequence ends (kv_len), as is and with "
                         "the pooled-score kernel held to 128 registers (two programs per SM)")
    args = ap.parse_args()
    n = args.n
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=DT, generator=g)
    qd = torch.randn(1, HQ, 1, D, device="cuda", dtype=DT, generator=g)
    head_map = torch.randperm(HKV, device="cuda", generator=g)
    rows = []

    def record(mode, step, layout, res):
        rows.append(dict(mode=mode, step=step, layout=layout, **res))
        print(f"{mode:8s} {step:8s} {layout:12s} {res['median_ms'] * 1e3 if mode == 'decode' else res['median_ms']:10.3f} "
              f"{'us' if mode == 'decode' else 'ms'}", flush=True)

    # decode
    sel = KD.select(qd, k, RHO, K_MIN)
    record("decode", "anchor", "contiguous", timed(lambda: KD.anchor(qd, k, v, RHO, K_MIN), True))
    record("decode", "reuse", "contiguous", timed(lambda: KD.sparse_attention(qd, k, v, sel, head_map), True))
    for p in args.pages:
        cache = to_pages(k, v, p)
        sel_p = KD.select_paged(qd, cache, RHO, K_MIN)
        record("decode", "anchor", f"paged-{p}", timed(lambda: KD.anchor_paged(qd, cache, RHO, K_MIN), True))
        record("decode", "reuse", f"paged-{p}",
               timed(lambda: KD.sparse_attention_paged(qd, cache, sel_p, head_map), True))
        del cache, sel_p
        torch.cuda.empty_cache()
    # prefill
    if not args.no_prefill:
        q = torch.randn(1, HQ, n, D, device="cuda", dtype=DT, generator=g)
        sel = KP.select(q, k, RHO, K_MIN, TILE)
        record("prefill", "select", "contiguous", timed(lambda: KP.select(q, k, RHO, K_MIN, TILE), False))
        record("prefill", "reuse", "contiguous",
               timed(lambda: KP.sparse_attention(q, k, v, sel, head_map=head_map), False))
        if args.end_variant:
            end = torch.tensor([n], device="cuda")
            record("prefill", "select", "contiguous-ends",
                   timed(lambda: KP.select(q, k, RHO, K_MIN, TILE, kv_len=end), False))
            record("prefill", "select", "contiguous-ends-maxnreg128",
                   timed(lambda: KP.select(q, k, RHO, K_MIN, TILE, kv_len=end, pool_cfg={"maxnreg": 128}), False))
        for p in args.pages:
            cache = to_pages(k, v, p)
            record("prefill", "select", f"paged-{p}",
                   timed(lambda: KP.select_paged(q, cache, RHO, K_MIN, TILE, gather_keys=False), False))
            record("prefill", "select", f"paged-{p}-gather", timed(lambda: KP.select_paged(q, cache, RHO, K_MIN, TILE),
                                                                     False))
            if args.chunk:
                record("prefill", "select", f"paged-{p}-chunk-{args.chunk}", chunked_select(q, cache, args.chunk))
            sel_p = KP.select_paged(q, cache, RHO, K_MIN, TILE)
            record("prefill", "reuse", f"paged-{p}",
                   timed(lambda: KP.sparse_attention_paged(q, cache, sel_p, head_map=head_map), False))
            del cache, sel_p
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "N": n, "B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "rho": RHO,
            "dtype": "bf16"}
    tag = short_device_name(torch.cuda.get_device_name())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"paged_{tag}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    base = {(r["mode"], r["step"]): r["median_ms"] for r in rows if r["layout"] == "contiguous"}
    lines = [f"# Paged vs contiguous KV cache, {meta['device']}",
             "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; bf16, {HQ} q / {HKV} KV heads, D {D}, "
             f"B 1, N {n}, rho {RHO}. Medians of triton.testing.do_bench (decode: CUDA-graph replays). "
             "Pages shuffled in a pool; paged / contiguous = the cost of resolving pages in the kernel.",
             "",
             "| mode | step | layout | median | p20-p80 | paged / contiguous |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        unit, f = ("us", 1e3) if r["mode"] == "decode" else ("ms", 1.0)
        ratio = r["median_ms"] / base[(r["mode"], r["step"])]
        lines.append(f"| {r['mode']} | {r['step']} | {r['layout']} | {r['median_ms'] * f:.1f} {unit} | "
                     f"{r['p20_ms'] * f:.1f}-{r['p80_ms'] * f:.1f} | {ratio:.3f} |")
    with open(os.path.join(args.out, f"paged_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
