"""Prefill attention, one layer and a whole model: Kascade kernels against dense baselines.

    python benchmarks/prefill.py --out benchmarks/results [--lengths 8192 32768 131072] [--long 524288]

Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head dim 128), batch 1, bf16, causal,
rho = 0.1, k_min = 128, tile 32, random normal inputs. Baselines measured in the same run:
FlashAttention-3 (fa3_fwd wheel), cuDNN and flash SDPA, FlexAttention dense (causal block mask) and
FlexAttention block-sparse with a random 128x128 block mask of about our density (plus the causal
diagonal block). Ours: the anchor layer (selection + sparse attention over the selection), the
reuse layer (sparse attention over an anchor's selection with a permuted head map), the selection
alone, and the selection with torch.topk instead of the threshold kernel.

Whole model: 32 layers with anchors [0, 2, 8, 13, 14]; layer 0 dense on FA3, the other 4 anchors
anchor layers, 27 reuse layers; sum of the per-layer medians, against 32 x FA3 from the same run.
Beside it the same sum with 10 selecting layers of 32 (layer 0 on FA3, 9 anchors, 22 reuse layers).
`python benchmarks/prefill.py --report FILE` recomputes both sums, the markdown and the plot from a
results JSON.

--fp8 adds selection from an FP8 copy of the keys (kascade.kernels.prefill_fp8; the copy is made before
timing, as a cache keeps it): `ours_select_fp8` and `ours_anchor_fp8` (FP8 selection, then the sparse
attention), with --rerank C also `ours_anchor_fp8_rerankC`, and the whole-model sums `whole_model_fp8` /
`whole_model_10_fp8` with that anchor. --merge-into FILE replaces the measured lengths' rows of an existing
results JSON (baselines re-measured in this run) and keeps the other rows.

    python benchmarks/prefill.py --lengths 131072 --fp8 --rerank 2 --merge-into benchmarks/results/prefill_h200.json

Times: median with p20/p80 of CUDA-event-timed runs after a warm-up run (triton.testing.do_bench
for short calls). TFLOP/s: dense 4 * Hq * D * N(N+1)/2; sparse counts the attended keys only
(selected + causal diagonal); selection counts its two Q.K passes (2 * Hq * D per score).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_json import short_device_name  # noqa: E402  (benchmarks/report_json.py: the GPU's name in file names)

from kascade.budget import budget_tensor  # noqa: E402
from kascade.kernels import prefill as P  # noqa: E402
from kascade.kernels import prefill_topk  # noqa: E402

HQ, HKV, D = 32, 8, 128
RHO, K_MIN, TILE = 0.1, 128, 32
ANCHORS = [0, 2, 8, 13, 14]
LAYERS = 32


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _timed(fn) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def bench(fn, budget_ms: float = 1500.0, min_reps: int = 3, max_reps: int = 100):
    """(median, p20, p80) ms of fn: one warm-up run, then triton.testing.do_bench for calls under 20 ms,
    else CUDA-event-timed runs (at least min_reps, about budget_ms in all)."""
    fn()
    torch.cuda.synchronize()
    first = _timed(fn)
    if first < 20:
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=min(budget_ms, 300), quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    reps = int(max(min_reps, min(max_reps, budget_ms // first)))
    times = sorted([first] + [_timed(fn) for _ in range(reps - 1)])
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def stat(t):
    return {"median_ms": t[0], "p20_ms": t[1], "p80_ms": t[2]}


# ----------------------------------------------------------------------------------------------
# FLOP counts
# ----------------------------------------------------------------------------------------------


def dense_flops(n: int) -> float:
    return 4.0 * HQ * D * n * (n + 1) / 2


def sparse_flops(n: int) -> float:
    t = torch.arange(triton.cdiv(n, TILE), dtype=torch.int64)
    k = budget_tensor(t * TILE, RHO, K_MIN).double()
    rows = torch.clamp(n - t * TILE, max=TILE).double()
    keys = (k * rows + rows * (rows + 1) / 2).sum().item()
    return 4.0 * HQ * D * keys


def select_flops(n: int) -> float:
    # LSE pass: every causal score; pooled pass: scores before each tile (skipped tiles ignored)
    t = torch.arange(triton.cdiv(n, TILE), dtype=torch.float64)
    before = (t * TILE * TILE).sum().item()
    return 2.0 * HQ * D * (n * (n + 1) / 2 + before)


def density(n: int) -> float:
    return sparse_flops(n) / dense_flops(n)


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


def load_fa3():
    try:
        import fa3_fwd_interface as fa3

        return fa3
    except Exception as e:  # noqa: BLE001
        print("FA3 unavailable:", repr(e))
        return None


def sdpa_fn(backend, q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return run


_FLEX = {}


def flex_fns(n, q, k, v, sparse_density):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]

    def causal(b, h, qi, ki):
        return qi >= ki

    # random block-sparse mask: per (query head, 128-query block i) the diagonal block (causal) plus
    # max(1, round(d * i)) random earlier blocks, d chosen to give our density of attended keys
    nb = triton.cdiv(n, 128)
    i = torch.arange(nb, device="cuda")
    want = torch.clamp(torch.round(sparse_density * (i + 0.5)), min=1)
    nfull = torch.minimum(want, i.to(want.dtype)).to(torch.int32)  # [nb]
    g = torch.Generator(device="cuda").manual_seed(0)
    r = torch.rand(1, HQ, nb, nb, device="cuda", generator=g)
    r = torch.where(torch.arange(nb, device="cuda")[None, None, None, :] < i[None, None, :, None], r, -1.0)
    full_idx = torch.argsort(r, dim=-1, descending=True).to(torch.int32)  # the first nfull[i] are earlier blocks
    full_num = nfull[None, None, :].expand(1, HQ, nb).contiguous()
    part_num = torch.ones(1, HQ, nb, dtype=torch.int32, device="cuda")
    part_idx = torch.zeros(1, HQ, nb, nb, dtype=torch.int32, device="cuda")
    part_idx[..., 0] = i.to(torch.int32)
    # forward only: no transposed (query-block) index, which at 128K took more memory than the GPU has
    sparse_mask = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=128, mask_mod=causal,
                                           compute_q_blocks=False)
    # dense causal: every earlier block full, the diagonal block partial (no N x N mask is built)
    dense_full_idx = torch.arange(nb, device="cuda", dtype=torch.int32).expand(1, 1, nb, nb).contiguous()
    dense_mask = BlockMask.from_kv_blocks(part_num[:, :1], part_idx[:, :1], i.to(torch.int32)[None, None].contiguous(),
                                          dense_full_idx, BLOCK_SIZE=128, mask_mod=causal, compute_q_blocks=False)
    blocks = (full_num.double().sum() * 128 * 128 + nb * HQ * 128 * 129 / 2).item()
    flex_density = blocks / (HQ * n * (n + 1) / 2)

    def dense():
        return flex(q, k, v, block_mask=dense_mask, enable_gqa=True)

    def sparse():
        return flex(q, k, v, block_mask=sparse_mask, enable_gqa=True)

    return dense, sparse, flex_density


# ----------------------------------------------------------------------------------------------
# one length
# ----------------------------------------------------------------------------------------------


def run_length(n, fa3, do_baselines=True, flex_dense=True, topk_stage=False, fp8=None):
    """fp8: None, or the re-rank factors (a list, None for plain FP8) of the FP8 rows to add."""
    res = {"N": n, "density": density(n)}
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    head_map = torch.randperm(HKV, device="cuda", generator=g)
    fd, fs = dense_flops(n), sparse_flops(n)

    def record(name, fn, flops, **kw):
        try:
            t = bench(fn, **kw)
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            return None
        res[name] = dict(stat(t), tflops=flops / t[0] / 1e9 if flops else None)
        print(f"  {name:28s} {t[0]:10.3f} ms  (p20 {t[1]:.3f}, p80 {t[2]:.3f})"
              + (f"  {flops / t[0] / 1e9:7.1f} TFLOP/s" if flops else ""), flush=True)
        torch.cuda.empty_cache()
        return t

    if fa3 is not None:
        qf, kf, vf = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, S, H, D]
        record("fa3", lambda: fa3.flash_attn_func(qf, kf, vf, causal=True), fd,
               **(dict(budget_ms=1.0, min_reps=2) if n > 131072 else {}))
        del qf, kf, vf
        torch.cuda.empty_cache()
    if do_baselines:
        record("sdpa_cudnn", sdpa_fn("cudnn", q, k, v), fd)
        record("sdpa_flash", sdpa_fn("flash", q, k, v), fd)
        try:
            fdense, fsparse, fdens = flex_fns(n, q, k, v, res["density"])
            res["flex_sparse_density"] = fdens
            if flex_dense:
                record("flex_dense", fdense, fd)
            record("flex_block_sparse", fsparse, fdens * fd)
        except Exception as e:  # noqa: BLE001
            print("  flex: FAILED", repr(e)[:300])
        torch.cuda.empty_cache()

    # ours (at most one selection alive at a time: 27.5 GB at 512K)
    long = n > 131072
    kw = dict(budget_ms=1.0, min_reps=2) if long else {}
    sel = P.select(q, k, RHO, K_MIN, TILE)
    torch.cuda.synchronize()
    record("ours_reuse", lambda: P.sparse_attention(q, k, v, sel, head_map=head_map), fs, **kw)
    del sel
    torch.cuda.empty_cache()
    if not long:
        record("ours_select", lambda: P.select(q, k, RHO, K_MIN, TILE), select_flops(n), **kw)
    record("ours_anchor", lambda: P.sparse_attention(q, k, v, P.select(q, k, RHO, K_MIN, TILE)), None, **kw)
    if fp8 is not None:
        from kascade import fp8keys
        from kascade.kernels import prefill_fp8

        copy = fp8keys.quantize(k)  # kept beside the cache: made before timing
        res["fp8_native_dot"] = prefill_fp8.native_dot(q, D)
        record("ours_select_fp8", lambda: prefill_fp8.select_fp8(q, copy, RHO, K_MIN, TILE), select_flops(n), **kw)
        for rr in fp8:
            name = "ours_anchor_fp8" + ("" if rr is None else f"_rerank{rr:g}")
            record(name, lambda rr=rr: P.sparse_attention(q, k, v, prefill_fp8.select_fp8(
                q, copy, RHO, K_MIN, TILE, rerank=rr, k=k)), None, **kw)
        if not long:
            exact = P.select(q, k, RHO, K_MIN, TILE)
            for rr in fp8:
                got = prefill_fp8.select_fp8(q, copy, RHO, K_MIN, TILE, rerank=rr, k=k)
                res["fp8" + ("" if rr is None else f"_rerank{rr:g}") + "_recall_vs_exact"] = _recall(got, exact)
                del got
            del exact
        del copy
        torch.cuda.empty_cache()
    if not long:
        record("ours_select_torch_topk", lambda: P.select(q, k, RHO, K_MIN, TILE, method="torch"), None)
    # the pooled-score passes alone (top-k step replaced by nothing)
    real = P.topk_rows_chunk
    P.topk_rows_chunk = lambda *a, **kw: None
    try:
        if not long:
            record("ours_pool_only", lambda: P.select(q, k, RHO, K_MIN, TILE), select_flops(n), **kw)
    finally:
        P.topk_rows_chunk = real
    # peak memory of the selection
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_sel = _timed(lambda: P.select(q, k, RHO, K_MIN, TILE))  # the result is dropped; timed once
    if long:
        res["ours_select"] = {"median_ms": t_sel, "p20_ms": t_sel, "p80_ms": t_sel, "runs": 1,
                              "tflops": select_flops(n) / t_sel / 1e9}
        print(f"  ours_select (one run)          {t_sel:10.3f} ms")
    sel = P.select(q, k, RHO, K_MIN, TILE)
    torch.cuda.synchronize()
    res["select_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    res["select_result_bytes"] = sel.indices.numel() * 4 + sel.counts.numel() * 4
    print(f"  selection peak extra {res['select_peak_extra_bytes'] / 2**30:.2f} GiB "
          f"(result {res['select_result_bytes'] / 2**30:.2f} GiB)")
    del sel
    torch.cuda.empty_cache()
    if topk_stage:
        res["topk_stage"] = topk_stage_bench(q, k, n)
    return res


def _recall(got, want) -> float:
    """Mean share of the exact selection's keys that `got` holds, over every (head, tile) that selects."""
    kk = want.indices.shape[-1]
    pos = torch.arange(kk, device=want.indices.device)
    valid = pos[None, None, None, :] < want.counts[:, None, :, None]
    n = int(want.indices.max()) + 2
    hits, total = 0, 0
    for h in range(want.indices.shape[1]):  # one head at a time: [U, n] bitmaps
        e = torch.where(valid[0, 0], want.indices[0, h].long(), n - 1)
        a = torch.where(valid[0, 0], got.indices[0, h, :, :kk].long(), n - 1)
        bitmap = torch.zeros(e.shape[0], n, dtype=torch.bool, device=e.device).scatter_(1, e, True)
        bitmap[:, n - 1] = False
        hits += int(bitmap.gather(1, a).sum())
        total += int(valid.sum())
    return hits / max(1, total)


def topk_stage_bench(q, k, n):
    """The top-k step alone on the last 256 tiles' pooled rows (8 heads x 256 rows of ~n keys)."""
    u_max = triton.cdiv(n, TILE)
    c = min(256, u_max - 1)
    u0 = u_max - c
    counts = budget_tensor((torch.arange(u_max) * TILE), RHO, K_MIN).to(torch.int32)[None].cuda()
    pooled = torch.empty(1, HKV, c, n, dtype=torch.float32, device="cuda")
    lse = P.lse_scratch(1, HKV, c, HQ // HKV, TILE, D, "cuda")
    kv = torch.zeros(1, dtype=torch.int32, device="cuda")
    P.pooled_scores_chunk(q, k, kv, counts, pooled, lse, u0, c, TILE, D ** -0.5)
    kmax = int(counts.max())
    idx = torch.empty(1, HKV, u_max, kmax, dtype=torch.int32, device="cuda")
    scratch = prefill_topk.topk_rows_scratch(1, HKV, c, "cuda")
    out = {}
    t = bench(lambda: P.topk_rows_chunk(pooled, idx, counts, kv, scratch, u0, c, TILE, n, n, (u_max - 1) * TILE))
    out["threshold_kernel"] = stat(t)
    rows = pooled.view(HKV * c, n)
    nb = (u0 + torch.arange(c, device="cuda")) * TILE
    masked = torch.where(torch.arange(n, device="cuda")[None, :] < nb.repeat(HKV)[:, None], rows, -1.0)
    t2 = bench(lambda: torch.topk(masked, kmax, dim=-1, sorted=False))
    out["torch_topk_unsorted"] = stat(t2)
    out["rows"] = HKV * c
    print(f"  top-k step, {HKV * c} rows of ~{n} keys: threshold kernel {t[0]:.3f} ms, torch.topk {t2[0]:.3f} ms")
    return out


def _same_selection(a, b) -> bool:
    """Same counts, and the same sets in all but 0.5% of the (head, tile) rows (float32 near-ties may swap)."""
    if not torch.equal(a.counts, b.counts):
        return False
    kk = a.indices.shape[-1]
    pos = torch.arange(kk, device=a.indices.device)
    valid = pos[None, None, None, :] < a.counts[:, None, :, None]
    sa = torch.where(valid, a.indices, -1).sort(-1).values
    sb = torch.where(valid, b.indices[..., :kk], -1).sort(-1).values
    bad = (sa != sb).any(-1).sum().item()
    return bad <= 0.005 * sa.shape[1] * sa.shape[2]


POOL_CANDIDATES = [dict(BLOCK_N=128, num_warps=8, num_stages=2), dict(BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=128, num_warps=8, num_stages=3)]
SPARSE_CANDIDATES = [dict(BLOCK_K=32, num_warps=8, num_stages=3), dict(BLOCK_K=32, num_warps=8, num_stages=4),
                     dict(BLOCK_K=16, num_warps=8, num_stages=3), dict(BLOCK_K=64, num_warps=4, num_stages=3),
                     dict(BLOCK_K=64, num_warps=8, num_stages=3)]
TOPK_CANDIDATES = [dict(block=1024, block_c=512), dict(block=2048, block_c=1024), dict(block=4096, block_c=1024)]


def sweep_and_pick(n=32768):
    """Time launch variants at N = n, check each against the default's result, keep the fastest."""
    from kascade.kernels import prefill_pool

    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    head_map = torch.randperm(HKV, device="cuda", generator=g)
    sel0 = P.select(q, k, RHO, K_MIN, TILE)
    out0 = P.sparse_attention(q, k, v, sel0, head_map=head_map)
    res = {"N": n, "pool": {}, "sparse": {}, "topk": {}}
    real_topk = P.topk_rows_chunk

    def best(d):
        ok = {kk: x for kk, x in d.items() if "median_ms" in x and x.get("same")}
        return min(ok, key=lambda kk: ok[kk]["median_ms"]) if ok else None

    for cfg in POOL_CANDIDATES:
        key = "BN{BLOCK_N}_w{num_warps}_s{num_stages}".format(**cfg)
        try:
            same = _same_selection(P.select(q, k, RHO, K_MIN, TILE, pool_cfg=cfg), sel0)
            P.topk_rows_chunk = lambda *a, **kw: None
            t = bench(lambda: P.select(q, k, RHO, K_MIN, TILE, pool_cfg=cfg))
            res["pool"][key] = dict(stat(t), same=same, cfg=cfg)
            print(f"  sweep pool {key}: {t[0]:.3f} ms (pooled passes only), same selection: {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            res["pool"][key] = {"error": repr(e)[:200]}
            print(f"  sweep pool {key}: FAILED {repr(e)[:200]}")
        finally:
            P.topk_rows_chunk = real_topk
    for cfg in SPARSE_CANDIDATES:
        key = "BK{BLOCK_K}_w{num_warps}_s{num_stages}".format(**cfg)
        try:
            o = P.sparse_attention(q, k, v, sel0, head_map=head_map, config=cfg)
            same = bool((o.float() - out0.float()).abs().max() < 2e-2)
            t = bench(lambda: P.sparse_attention(q, k, v, sel0, head_map=head_map, config=cfg))
            res["sparse"][key] = dict(stat(t), same=same, cfg=cfg)
            print(f"  sweep sparse {key}: {t[0]:.3f} ms, same output: {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            res["sparse"][key] = {"error": repr(e)[:200]}
            print(f"  sweep sparse {key}: FAILED {repr(e)[:200]}")
    for cfg in TOPK_CANDIDATES:
        key = "B{block}_C{block_c}".format(**cfg)
        try:
            P.topk_rows_chunk = lambda *a, **kw: real_topk(*a, **kw, **cfg)
            same = _same_selection(P.select(q, k, RHO, K_MIN, TILE), sel0)
            t = bench(lambda: P.select(q, k, RHO, K_MIN, TILE))
            res["topk"][key] = dict(stat(t), same=same, cfg=cfg)
            print(f"  sweep topk {key}: {t[0]:.3f} ms (whole select), same selection: {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            res["topk"][key] = {"error": repr(e)[:200]}
            print(f"  sweep topk {key}: FAILED {repr(e)[:200]}")
        finally:
            P.topk_rows_chunk = real_topk
    # install the winners for the rest of the run
    pick = {part: best(res[part]) for part in ("pool", "sparse", "topk")}
    res["picked"] = pick
    print("  picked:", pick, flush=True)
    if pick["pool"]:
        cfg_p = res["pool"][pick["pool"]]["cfg"]
        base = prefill_pool.pool_config
        prefill_pool.pool_config = lambda g_, t_, d_, _c=cfg_p, _b=base: dict(_b(g_, t_, d_), **_c) if g_ == 4 and d_ == 128 else _b(g_, t_, d_)
    if pick["sparse"]:
        cfg_s = res["sparse"][pick["sparse"]]["cfg"]
        base_s = P.sparse_config
        P.sparse_config = lambda rows, _c=cfg_s, _b=base_s: dict(_c) if rows == 128 else _b(rows)
    if pick["topk"]:
        cfg_t = res["topk"][pick["topk"]]["cfg"]
        P.topk_rows_chunk = lambda *a, _c=cfg_t, **kw: real_topk(*a, **kw, **_c)
    del q, k, v, sel0, out0
    torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------------
# whole model, report
# ----------------------------------------------------------------------------------------------


def whole_model(r, selecting: int | None = None, anchor: str = "ours_anchor"):
    """32 layers from the per-layer medians: layer 0 on FA3, `selecting` - 1 anchors (default: the plan
    ANCHORS; each costing r[anchor]), the rest reuse layers."""
    if "fa3" not in r or "median_ms" not in r.get("fa3", {}) or "median_ms" not in r.get(anchor, {}):
        return None
    fa3 = r["fa3"]["median_ms"]
    selecting = len(ANCHORS) if selecting is None else selecting
    n_anchor = selecting - 1
    n_reuse = LAYERS - selecting
    ours = fa3 + n_anchor * r[anchor]["median_ms"] + n_reuse * r["ours_reuse"]["median_ms"]
    dense = LAYERS * fa3
    return {"ours_ms": ours, "fa3_ms": dense, "speedup": dense / ours,
            "composition": f"1 x FA3 (layer 0) + {n_anchor} x {anchor} + {n_reuse} x reuse, sums of per-layer medians"}


def whole_models(r) -> None:
    """r's whole-model sums: exact anchors, and (where measured) anchors selecting from the FP8 copy."""
    r["whole_model"], r["whole_model_10"] = whole_model(r), whole_model(r, 10)
    for name in [x for x in r if x.startswith("ours_anchor_fp8")]:
        sfx = name[len("ours_anchor"):]
        r["whole_model" + sfx], r["whole_model_10" + sfx] = whole_model(r, anchor=name), whole_model(r, 10, name)


def write_report(results, out_dir, meta):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"prefill_{meta['tag']}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = [
        f"# Prefill attention, one layer ({meta['device']}, bf16, 32 q / 8 KV heads, D 128, B 1, rho 0.1, k_min 128, T 32)",
        "",
        f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. "
        "Median ms (p20-p80); ratio = time / FA3 time in the same run."
        + "".join(f" Rows of {run.get('lengths')} re-measured on {run.get('date')} ({run.get('device')}, triton "
                  f"{run.get('triton')}) with FP8 selection {run.get('fp8')}, baselines in the same run."
                  for run in meta.get("merged_runs", [])),
        "",
        "| N | FA3 | cuDNN SDPA | flash SDPA | Flex dense | Flex block-sparse | ours reuse | ours anchor | ours select | select w/ torch.topk |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, key):
        x = r.get(key)
        if not x:
            return "—"
        if "error" in x:
            return "fail"
        s = f"{x['median_ms']:.2f}"
        if "fa3" in r and "median_ms" in r["fa3"] and key != "fa3":
            s += f" ({x['median_ms'] / r['fa3']['median_ms']:.3f}x)"
        return s

    for r in results:
        lines.append(f"| {r['N'] // 1024}K | " + " | ".join(cell(r, kk) for kk in [
            "fa3", "sdpa_cudnn", "sdpa_flash", "flex_dense", "flex_block_sparse", "ours_reuse", "ours_anchor",
            "ours_select", "ours_select_torch_topk"]) + " |")
    lines += ["", "Achieved TFLOP/s (sparse: attended keys only; select: its two Q.K passes):", "",
              "| N | FA3 | cuDNN | Flex block-sparse | ours reuse | ours select | density |", "|---|---|---|---|---|---|---|"]
    for r in results:
        def tf(key):
            x = r.get(key) or {}
            return f"{x['tflops']:.0f}" if x.get("tflops") else "—"
        lines.append(f"| {r['N'] // 1024}K | {tf('fa3')} | {tf('sdpa_cudnn')} | {tf('flex_block_sparse')} | "
                     f"{tf('ours_reuse')} | {tf('ours_select')} | {r['density']:.3f} |")
    lines += ["", f"Whole model, {LAYERS} layers, anchors {ANCHORS} (layer 0 dense on FA3):", "",
              "| N | ours (ms) | 32 x FA3 (ms) | speedup |", "|---|---|---|---|"]
    for r in results:
        w = r.get("whole_model")
        if w:
            lines.append(f"| {r['N'] // 1024}K | {w['ours_ms']:.1f} | {w['fa3_ms']:.1f} | {w['speedup']:.2f}x |")
    if any(r.get("whole_model_10") for r in results):
        lines += ["", f"The same with 10 selecting layers of {LAYERS} (layer 0 on FA3, 9 anchors, "
                  f"{LAYERS - 10} reuse layers: what an accurate plan may need):", "",
                  "| N | ours (ms) | 32 x FA3 (ms) | speedup |", "|---|---|---|---|"]
        for r in results:
            w = r.get("whole_model_10")
            if w:
                lines.append(f"| {r['N'] // 1024}K | {w['ours_ms']:.1f} | {w['fa3_ms']:.1f} | {w['speedup']:.2f}x |")
    fp8_names = sorted({x for r in results for x in r if x.startswith("ours_anchor_fp8")})
    if fp8_names:
        lines += ["", "Selection from an FP8 copy of the keys (anchor = FP8 selection + sparse attention; ratio to FA3 "
                  "of the same run; recall: share of the exact selection's keys kept; whole model: the same sums with "
                  "that anchor):", "",
                  "| N | ours anchor (exact) | ours select fp8 | " + " | ".join(fp8_names) + " | recall vs exact | "
                  + " | ".join(f"whole model {x[len('ours_anchor_'):]} (5 / 10 selecting)" for x in fp8_names) + " |",
                  "|---|---|---|" + "---|" * (2 * len(fp8_names) + 1)]
        for r in results:
            if not any(x in r for x in fp8_names):
                continue
            rec = ", ".join(f"{x[:-len('_recall_vs_exact')]} {v:.4f}" for x, v in r.items() if x.endswith("recall_vs_exact"))
            wm = []
            for x in fp8_names:
                a, b = r.get("whole_model" + x[len("ours_anchor"):]), r.get("whole_model_10" + x[len("ours_anchor"):])
                wm.append(f"{a['speedup']:.2f}x / {b['speedup']:.2f}x" if a and b else "—")
            lines.append(f"| {r['N'] // 1024}K | {cell(r, 'ours_anchor')} | {cell(r, 'ours_select_fp8')} | "
                         + " | ".join(cell(r, x) for x in fp8_names) + f" | {rec or '—'} | " + " | ".join(wm) + " |")
    lines += ["", "Sums of per-layer medians. Selection memory:", "", "| N | selection (GiB) | peak extra during select (GiB) |",
              "|---|---|---|"]
    for r in results:
        if "select_peak_extra_bytes" in r:
            lines.append(f"| {r['N'] // 1024}K | {r['select_result_bytes'] / 2**30:.2f} | "
                         f"{r['select_peak_extra_bytes'] / 2**30:.2f} |")
    with open(os.path.join(out_dir, f"prefill_{meta['tag']}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["N"] for r in results if "fa3" in r and "median_ms" in r["fa3"]]
        for key, label in [("ours_reuse", "reuse layer"), ("ours_anchor", "anchor layer"),
                           ("flex_block_sparse", "Flex block-sparse (same density)")]:
            ys = [r["fa3"]["median_ms"] / r[key]["median_ms"] for r in results
                  if "fa3" in r and "median_ms" in r["fa3"] and "median_ms" in r.get(key, {})]
            if len(ys) == len(xs):
                ax.plot(xs, ys, marker="o", label=label)
        ys = [r["whole_model"]["speedup"] for r in results if r.get("whole_model")]
        if len(ys) == len(xs):
            ax.plot(xs, ys, marker="s", label="whole model (32 layers)")
        ys = [r["whole_model_10"]["speedup"] for r in results if r.get("whole_model_10")]
        if len(ys) == len(xs):
            ax.plot(xs, ys, marker="s", ls="--", label="whole model, 10 selecting layers")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length N")
        ax.set_ylabel("speedup over FA3 (x)")
        ax.set_title(f"Kascade prefill attention, {meta['device']} bf16")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"prefill_{meta['tag']}.png"), dpi=120)
    except Exception as e:  # noqa: BLE001
        print("plot failed:", repr(e))


def rewrite_report(path):
    """The whole-model sums, markdown and plot of a results JSON again, beside it (same tag)."""
    with open(path) as f:
        res = json.load(f)
    for r in res["results"]:
        whole_models(r)
    write_report(res["results"], os.path.dirname(os.path.abspath(path)), res["meta"])
    print(open(os.path.join(os.path.dirname(os.path.abspath(path)), f"prefill_{res['meta']['tag']}.md")).read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--long", type=int, nargs="*", default=[])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-flex-dense-above", type=int, default=32768)
    ap.add_argument("--tag", default=None, help="result file suffix (default: the GPU's short name, e.g. h200)")
    ap.add_argument("--report", help="results JSON: its whole-model sums, .md and .png again (no measurement)")
    ap.add_argument("--fp8", action="store_true", help="add selection from an FP8 copy of the keys (module docstring)")
    ap.add_argument("--rerank", default="", help="with --fp8: comma-separated re-rank factors measured too, e.g. 2")
    ap.add_argument("--no-topk-stage", action="store_true", help="skip the top-k step study at 128K")
    ap.add_argument("--merge-into", default=None, help="existing results JSON whose rows of the measured lengths this "
                    "run replaces (other rows kept); its .md and .png are written beside it")
    args = ap.parse_args()
    if args.report:
        rewrite_report(args.report)
        return
    args.tag = args.tag or short_device_name(torch.cuda.get_device_name())
    fa3 = load_fa3()
    fp8 = [None] + [float(x) for x in args.rerank.split(",") if x] if args.fp8 else None
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "tag": args.tag, "python": platform.python_version(), "shapes": dict(Hq=HQ, Hkv=HKV, D=D, B=1),
            "rho": RHO, "k_min": K_MIN, "tile": TILE, "anchors": ANCHORS, "layers": LAYERS}
    results = []
    if args.merge_into:
        old = json.load(open(args.merge_into))
        old["meta"].setdefault("merged_runs", []).append(dict(meta, lengths=args.lengths + args.long, fp8=fp8))
        meta, results = old["meta"], old["results"]
        args.out = os.path.dirname(os.path.abspath(args.merge_into))
        args.tag = meta["tag"] = os.path.basename(args.merge_into)[len("prefill_"):-len(".json")]
    if args.sweep:
        print("launch-parameter sweep at N = 32768", flush=True)
        meta["sweep"] = sweep_and_pick(32768)

    def put(r):
        results[:] = [x for x in results if x["N"] != r["N"]] + [r]
        results.sort(key=lambda x: x["N"])

    for n in args.lengths:
        print(f"N = {n}", flush=True)
        r = run_length(n, fa3, flex_dense=n <= args.no_flex_dense_above,
                       topk_stage=n == 131072 and not args.no_topk_stage, fp8=fp8)
        whole_models(r)
        put(r)
        write_report(results, args.out, meta)
    for n in args.long:
        print(f"N = {n} (ours and FA3 only)", flush=True)
        r = run_length(n, fa3, do_baselines=False, fp8=fp8)
        whole_models(r)
        put(r)
        write_report(results, args.out, meta)
    print()
    print(open(os.path.join(args.out, f"prefill_{args.tag}.md")).read())


if __name__ == "__main__":
    main()
