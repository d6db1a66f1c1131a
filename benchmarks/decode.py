"""Decode attention (one new token per sequence): Kascade's kernels against dense baselines.

Llama-3.1-8B attention shapes: 32 query heads, 8 KV heads, head dim 128, bf16, rho 0.1, k_min 128.
Per layer, at cache lengths 8K, 32K, 128K, 512K (batch 1) and 128K (batch 8):
    FlashAttention-3 (fa3-fwd wheel, flash_attn_with_kvcache; default heuristic and a few
    num_splits / pack_gqa settings, best kept), torch SDPA with the cuDNN and the flash backend,
    FlexAttention (compiled, dense), and ours: select only, anchor (select + sparse output),
    anchor with dense output, reuse (sparse attention over a selection with a random head map).
Every provider is captured in a CUDA graph and timed by triton.testing.do_bench on the replays
(median, p20, p80; L2 flushed between replays), so launch overhead is out of every number alike;
eager medians are kept in the JSON. Effective bandwidth = bytes the step must read / time.
Whole model: 32 layers, anchors [0, 2, 8, 13, 14] (layer 0 dense + select, other anchors select
+ sparse output, the rest reuse the last anchor's selection under a random head map), captured as
ONE CUDA graph, against 32 x FA3 captured likewise, on distinct per-layer KV caches (cycled
when they do not all fit in memory; each cache is far larger than L2). Beside it the same graph with
10 selecting layers of 32 (anchors ANCHORS_10, what an accurate plan may need), against the same FA3
graph. The kernels' programmatic-dependent-launch mode is KASCADE_DECODE_PDL (default exit).

--fp8 adds selection from an FP8 copy of the keys (kascade.fp8keys; the copy is made before timing, as a
cache keeps it): per layer `ours_select_fp8` and `ours_anchor_fp8` (FP8 selection, then attention over the
selected keys gathering K and V), with --rerank C also `ours_anchor_fp8_rerankC`; whole model
`whole_model_fp8` / `whole_model_10_fp8` (and `_rerankC`): the same graphs with the anchors selecting from
their copies (layer 0 as in the exact run: its selection comes from its dense pass), against the FA3 graph
of the same size. --merge-into FILE replaces the measured sizes' rows of an existing results JSON (the
baselines re-measured in this run) and keeps its other sizes.

    python benchmarks/decode.py                 # tests nothing; sweeps configs, then measures:
                                                # writes results/decode_<gpu>.json and .md (e.g. decode_h200)
    python benchmarks/decode.py --no-sweep --no-flex --sizes 1x131072,8x131072 --fp8 --rerank 2 \
        --merge-into benchmarks/results/decode_h200.json          # the FP8 rows at 128K, B = 1 and 8
    python benchmarks/decode.py --plot FILE     # PNG of the speedups from a results JSON (FILE .png beside it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_json import short_device_name  # noqa: E402  (benchmarks/report_json.py: the GPU's name in file names)

HQ, HKV, D = 32, 8, 128
RHO, K_MIN = 0.1, 128
LAYERS, ANCHORS = 32, (0, 2, 8, 13, 14)
ANCHORS_10 = (0, 2, 5, 8, 11, 13, 14, 17, 21, 26)  # 10 selecting layers (as benchmarks/head_granular_decode.py)
SIZES = [(1, 8192), (1, 32768), (1, 131072), (1, 524288), (8, 131072)]
DT = torch.bfloat16
KV_BUDGET_BYTES = 36e9  # per-layer caches of the whole-model run
FLEX_SIZES = (131072,)  # FlexAttention compiles per shape; measured where the targets are


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def graphed(fn, warm=2):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def bench(fn, graph=True, rep=60):
    import triton

    if graph:
        g = graphed(fn)
        run = g.replay
    else:
        fn()
        run = fn
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(run, warmup=10, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return dict(ms=med, p20=p20, p80=p80)


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------


def fa3_module():
    try:
        import fa3_fwd_interface

        return fa3_fwd_interface
    except Exception as e:  # noqa: BLE001
        log("FA3 unavailable:", repr(e))
        return None


def dense_providers(q, k, v, q_fa, k_fa, v_fa, seqlens, fa3):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    out = {}
    if fa3 is not None:
        for ns, pg in [(0, None), (0, True), (8, True), (16, True), (32, True), (64, True)]:
            out[f"fa3[splits={ns},pack_gqa={pg}]"] = (
                lambda ns=ns, pg=pg: fa3.flash_attn_with_kvcache(q_fa, k_fa, v_fa, cache_seqlens=seqlens,
                                                                 num_splits=ns, pack_gqa=pg))
    for name, be in [("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)]:
        def f(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        out[name] = f
    return out


def flex_provider(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    comp = torch.compile(flex_attention, dynamic=False)
    return lambda: comp(q, k, v, enable_gqa=True)


# ----------------------------------------------------------------------------------------------
# config sweep
# ----------------------------------------------------------------------------------------------


def sweep(K, B, N, log_rows):
    """Pick launch settings by graph-replay time at (B, N): the reuse kernel's (the setting this size
    uses: "sparse" or "sparse_large") by the reuse layer, the prefetch switches, the sparse-output
    kernel and the K pass by the anchor layer, the dense-output K pass by the dense-output anchor."""
    q, k, v = (torch.randn(B, HQ, 1, D, device="cuda", dtype=DT), torch.randn(B, HKV, N, D, device="cuda", dtype=DT),
               torch.randn(B, HKV, N, D, device="cuda", dtype=DT))
    sel = K.select(q, k, RHO, K_MIN, 32)
    hm = torch.randperm(HKV, device="cuda")

    def pick(section, variants, fn):
        best = None
        for var in variants:
            old = dict(K.CONFIG[section])
            K.CONFIG[section].update(var)
            try:
                t = bench(fn, rep=30)["ms"]
            except Exception as e:  # noqa: BLE001
                t = float("inf")
                log("  failed", section, var, repr(e)[:200])
            log_rows.append(dict(section=section, B=B, N=N, **var, ms=t))
            log(f"  {section} {var} {t * 1e3:.1f} us")
            if best is None or t < best[1]:
                best = (dict(K.CONFIG[section]), t)
            K.CONFIG[section].clear()
            K.CONFIG[section].update(old)
        K.CONFIG[section].update(best[0])
        return best

    sp = [dict(BLOCK_K=bk, num_warps=w, num_stages=st, per_sm=ps)
          for bk, w, st, ps in [(32, 4, 2, 4), (64, 4, 3, 2), (64, 4, 2, 2), (64, 4, 2, 1), (128, 8, 2, 1)]]
    large = B * HKV * sel.indices.shape[-1] >= K.CONFIG["sparse_large_from"]  # the setting this size uses
    pick("sparse_large" if large else "sparse", sp, lambda: K.sparse_attention(q, k, v, sel, head_map=hm))
    anchor = lambda: K.anchor(q, k, v, RHO, K_MIN, 32)  # noqa: E731
    pick("select", [dict(per_sm=ps, candidates=True, prefetch=p) for ps, p in [(4, False), (4, True), (2, True),
                                                                               (8, True)]], anchor)
    pick("pool", [dict(prefetch=p) for p in (False, True)], anchor)
    so = [dict(BLOCK_K=bk, num_warps=4, num_stages=st, per_sm=ps) for bk, st, ps in [(32, 2, 4), (64, 2, 2), (64, 2, 1)]]
    pick("sparse_out", so, anchor)
    kp = [dict(BLOCK_N=bn, num_warps=w, num_stages=st, per_sm=ps)
          for bn, w, st, ps in [(128, 4, 3, 4), (128, 4, 3, 2), (128, 4, 3, 1)]]
    pick("logits", kp, anchor)
    ld = [dict(BLOCK_N=bn, num_warps=w, num_stages=st, per_sm=ps)
          for bn, w, st, ps in [(64, 4, 4, 4), (128, 4, 2, 4), (128, 4, 2, 2), (128, 4, 2, 1), (64, 4, 4, 2)]]
    pick("logits_dense", ld, lambda: K.anchor(q, k, v, RHO, K_MIN, 32, dense_output=True))
    del q, k, v, sel


# ----------------------------------------------------------------------------------------------
# per-layer and whole-model measurements
# ----------------------------------------------------------------------------------------------


def kernel_profile(fn, steps=10):
    """GPU time per kernel name (us per call), eager, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows[e.key[:60]] = round(t / steps, 2)
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def per_layer(K, B, N, fa3, flex_ok, fp8=None):
    """fp8: None, or the re-rank factors (a list, None for plain FP8) of the FP8 rows to add."""
    from kascade import fp8keys
    from kascade.budget import budget

    g = torch.Generator(device="cuda").manual_seed(N + B)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DT, generator=g)
    k = torch.randn(B, HKV, N, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(B, HKV, N, D, device="cuda", dtype=DT, generator=g)
    # FA3's own layout [B, N, Hkv, D], separate storage
    q_fa = q.transpose(1, 2).contiguous()
    k_fa = k.transpose(1, 2).contiguous()
    v_fa = v.transpose(1, 2).contiguous()
    seqlens = torch.full((B,), N, dtype=torch.int32, device="cuda")
    kk = budget(N, RHO, K_MIN)
    kv_bytes = B * HKV * N * D * 2
    need = {"dense": 2 * kv_bytes, "select": kv_bytes, "anchor_sparse": kv_bytes + B * HKV * kk * D * 2,
            "anchor_dense": 2 * kv_bytes, "reuse": 2 * B * HKV * kk * D * 2}
    res = {}
    provs = dense_providers(q, k, v, q_fa, k_fa, v_fa, seqlens, fa3)
    sel = K.select(q, k, RHO, K_MIN, 32)
    hm = torch.randint(0, HKV, (HKV,), device="cuda")
    provs.update({
        "ours_select": lambda: K.select(q, k, RHO, K_MIN, 32),
        "ours_anchor_sparse": lambda: K.anchor(q, k, v, RHO, K_MIN, 32),
        "ours_anchor_dense": lambda: K.anchor(q, k, v, RHO, K_MIN, 32, dense_output=True),
        "ours_reuse": lambda: K.sparse_attention(q, k, v, sel, head_map=hm),
    })
    copy = None
    if fp8 is not None:
        copy = fp8keys.quantize(k)  # kept beside the cache: made before timing
        sel8 = K.select_fp8(q, copy, RHO, K_MIN, 32)
        res["fp8_recall_vs_exact"] = _recall(sel8, sel, B)
        provs["ours_select_fp8"] = lambda: K.select_fp8(q, copy, RHO, K_MIN, 32)
        need["select_fp8"] = B * HKV * N * (D + 4)
        for rr in fp8:
            name = "ours_anchor_fp8" + ("" if rr is None else f"_rerank{rr:g}")
            provs[name] = (lambda rr=rr: K.sparse_attention(q, k, v, K.select_fp8(q, copy, RHO, K_MIN, 32, rerank=rr,
                                                                                      k=k)))
            need[name[5:]] = need["select_fp8"] + 2 * B * HKV * kk * D * 2 + (0 if rr is None else
                                                                             int(rr * kk) * B * HKV * D * 2)
            if rr is not None:
                res[f"fp8_rerank{rr:g}_recall_vs_exact"] = _recall(
                    K.select_fp8(q, copy, RHO, K_MIN, 32, rerank=rr, k=k), sel, B)
    if flex_ok[0] and N in FLEX_SIZES:
        t0 = time.time()
        try:
            f = flex_provider(q, k, v)
            f()
            torch.cuda.synchronize()
            provs["flex"] = f
            log(f"  flex compiled in {time.time() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001
            res["flex"] = dict(error=repr(e)[:300])
            log("  flex failed:", repr(e)[:300])
        if time.time() - t0 > 90:
            flex_ok[0] = False  # compiling again per size would not fit the run
    for name, fn in provs.items():
        try:
            r = bench(fn)
            try:
                r["eager_ms"] = bench(fn, graph=False, rep=30)["ms"]
            except Exception as e:  # noqa: BLE001
                r["eager_error"] = repr(e)[:200]
        except Exception as e:  # noqa: BLE001
            res[name] = dict(error=repr(e)[:300])
            log(f"  {name}: failed {repr(e)[:300]}")
            continue
        kind = ("select" if name == "ours_select" else "anchor_sparse" if name == "ours_anchor_sparse" else
                "anchor_dense" if name == "ours_anchor_dense" else "reuse" if name == "ours_reuse" else
                name[5:] if name[5:] in need else "dense")
        r["bytes"] = need[kind]
        r["TBps"] = need[kind] / (r["ms"] * 1e-3) / 1e12
        res[name] = r
        log(f"  {name:34s} {r['ms'] * 1e3:9.1f} us  [{r['p20'] * 1e3:.1f}, {r['p80'] * 1e3:.1f}]  "
            f"{r['TBps']:.2f} TB/s  eager {r.get('eager_ms', float('nan')) * 1e3:.1f} us")
    # sanity: our outputs against SDPA / the kernels' own dense output
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
        od, _ = K.anchor(q, k, v, RHO, K_MIN, 32, dense_output=True)
        res["check_dense_maxerr_vs_sdpa"] = (od.float() - ref).abs().max().item()
    fa3_names = [n for n in res if n.startswith("fa3") and "ms" in res[n]]
    if fa3_names:
        best = min(fa3_names, key=lambda n: res[n]["ms"])
        res["fa3"] = dict(res[best], variant=best)
    dense_names = [n for n in ["fa3", "sdpa_cudnn", "sdpa_flash", "flex"] if n in res and "ms" in res[n]]
    res["best_dense"] = min(dense_names, key=lambda n: res[n]["ms"])
    if N == 131072:
        res["profile_anchor_sparse"] = kernel_profile(lambda: K.anchor(q, k, v, RHO, K_MIN, 32))
        res["profile_reuse"] = kernel_profile(lambda: K.sparse_attention(q, k, v, sel, head_map=hm))
        res["profile_anchor_dense"] = kernel_profile(lambda: K.anchor(q, k, v, RHO, K_MIN, 32, dense_output=True))
        saved = {s: dict(K.CONFIG[s]) for s in ("pool", "select")}
        for s in saved:
            K.CONFIG[s]["prefetch"] = False
        res["profile_anchor_sparse_no_prefetch"] = kernel_profile(lambda: K.anchor(q, k, v, RHO, K_MIN, 32))
        for s in saved:
            K.CONFIG[s].clear()
            K.CONFIG[s].update(saved[s])
        if copy is not None:
            res["profile_anchor_fp8"] = kernel_profile(
                lambda: K.sparse_attention(q, k, v, K.select_fp8(q, copy, RHO, K_MIN, 32)))
            log("  profile anchor fp8:", res["profile_anchor_fp8"])
        log("  profile anchor:", res["profile_anchor_sparse"])
        log("  profile anchor, prefetch off:", res["profile_anchor_sparse_no_prefetch"])
        log("  profile reuse:", res["profile_reuse"])
    del q, k, v, q_fa, k_fa, v_fa
    return res


def _recall(got, want, B):
    """Mean share of the exact selection's keys that `got` holds (decode selections of B sequences)."""
    kk = want.counts[:, 0].long()
    total = 0.0
    for b in range(B):
        n = int(kk[b])
        a = got.indices[b, :, 0, :n].long()
        e = want.indices[b, :, 0, :n].long()
        hit = torch.zeros(e.shape[0], int(max(a.max(), e.max())) + 1, dtype=torch.bool, device=e.device)
        hit.scatter_(1, e, True)
        total += hit.gather(1, a).float().mean().item()
    return total / B


def whole_model(K, B, N, fa3, layer_res, hq=HQ, hkv=HKV, d=D, layers=LAYERS, anchors=ANCHORS, fp8=False,
                rerank=None):
    """One decode step of a whole model's attention (layers of [hq, hkv, d]) as ONE CUDA graph, against
    `layers` x FA3 likewise. layer_res: per_layer()'s dict at (B, N) (best dense kernel, FA3 variant,
    ours_select, ours_anchor_dense), which picks layer 0's kernels and FA3's setting. Shared with
    benchmarks/decode_shapes.py. fp8: anchors other than 0 select from an FP8 copy of their keys (made
    before the capture, as a cache keeps it; rerank c: re-rank) and attend by gathering K and V."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    HQ, HKV, D, LAYERS, ANCHORS = hq, hkv, d, layers, tuple(anchors)  # noqa: N806 (the module's names)
    per_layer_bytes = 2 * B * HKV * N * D * 2 + (B * HKV * N * (D + 4) if fp8 else 0)
    nbuf = int(max(2, min(LAYERS, KV_BUDGET_BYTES // per_layer_bytes)))
    caches = [(torch.randn(B, HKV, N, D, device="cuda", dtype=DT), torch.randn(B, HKV, N, D, device="cuda", dtype=DT))
              for _ in range(nbuf)]
    if fp8:
        from kascade import fp8keys

        copies = [fp8keys.quantize(kc) for kc, _ in caches]
    qs = [torch.randn(B, HQ, 1, D, device="cuda", dtype=DT) for _ in range(LAYERS)]
    hms = [torch.randint(0, HKV, (HKV,), device="cuda") for _ in range(LAYERS)]
    # layer 0: the faster of (best dense kernel + select) and our one-pass anchor with dense output
    bd = layer_res["best_dense"]
    t_split = layer_res[bd]["ms"] + layer_res["ours_select"]["ms"]
    use_fused0 = layer_res["ours_anchor_dense"]["ms"] <= t_split
    backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}.get(bd)

    def dense0(q, kc, vc):
        if backend is not None:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
        if bd == "fa3":
            return fa3.flash_attn_with_kvcache(q.transpose(1, 2), kc.view(B, N, HKV, D), vc.view(B, N, HKV, D))
        return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    def ours():
        sel = None
        for layer in range(LAYERS):
            kc, vc = caches[layer % nbuf]
            q = qs[layer]
            if layer == 0:
                if use_fused0:
                    _, sel = K.anchor(q, kc, vc, RHO, K_MIN, 32, dense_output=True)
                else:
                    dense0(q, kc, vc)
                    sel = K.select(q, kc, RHO, K_MIN, 32)
            elif layer in ANCHORS and fp8:
                sel = K.select_fp8(q, copies[layer % nbuf], RHO, K_MIN, 32, rerank=rerank, k=kc)
                K.sparse_attention(q, kc, vc, sel)
            elif layer in ANCHORS:
                _, sel = K.anchor(q, kc, vc, RHO, K_MIN, 32)
            else:
                K.sparse_attention(q, kc, vc, sel, head_map=hms[layer])

    seqlens = torch.full((B,), N, dtype=torch.int32, device="cuda")
    fa3_var = layer_res.get("fa3", {}).get("variant", "fa3[splits=0,pack_gqa=None]")
    ns = int(fa3_var.split("splits=")[1].split(",")[0])
    pg = {"None": None, "True": True}[fa3_var.split("pack_gqa=")[1].rstrip("]")]
    qs_fa = [q.transpose(1, 2).contiguous() for q in qs]

    def fa3_model():
        for layer in range(LAYERS):
            kc, vc = caches[layer % nbuf]
            fa3.flash_attn_with_kvcache(qs_fa[layer], kc.view(B, N, HKV, D), vc.view(B, N, HKV, D),
                                        cache_seqlens=seqlens, num_splits=ns, pack_gqa=pg)

    res = dict(distinct_caches=nbuf, layer0="ours_anchor_dense" if use_fused0 else f"{bd} + ours_select",
               fa3_variant=fa3_var, anchors=list(ANCHORS))
    if fp8:
        res["fp8"] = dict(rerank=rerank)
    res["ours"] = bench(ours, rep=100)
    if fa3 is not None:
        res["fa3"] = bench(fa3_model, rep=100)
        res["speedup_vs_fa3"] = res["fa3"]["ms"] / res["ours"]["ms"]
    bdn = layer_res["best_dense"]
    res[f"best_dense_x{LAYERS}_ms_from_layer"] = LAYERS * layer_res[bdn]["ms"]
    res[f"speedup_vs_best_dense_x{LAYERS}"] = res[f"best_dense_x{LAYERS}_ms_from_layer"] / res["ours"]["ms"]
    log(f"  whole model: ours {res['ours']['ms']:.3f} ms, fa3 x{LAYERS} {res.get('fa3', {}).get('ms', float('nan')):.3f} ms,"
        f" speedup {res.get('speedup_vs_fa3', float('nan')):.2f}x (caches {nbuf}, layer 0: {res['layer0']})")
    del caches
    if fp8:
        del copies
    return res


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def markdown(meta, results):
    L = [f"# Decode attention, {meta['device']}", "",
         f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; bf16, {HQ} q / {HKV} KV heads, D {D}, "
         f"rho {RHO}, k_min {K_MIN}. CUDA-graph replay medians [p20, p80] of triton.testing.do_bench (L2 flushed). "
         f"Launch settings: `{json.dumps(meta['config'])}`."]
    for run in meta.get("merged_runs", []):
        L[-1] += (f" Rows of sizes {run.get('sizes')} re-measured on {run.get('date')} ({run.get('device')}, triton "
                  f"{run.get('triton')}), with FP8 selection {run.get('fp8')}, baselines in the same run.")
    L += ["",
         "## Per layer (us) and effective bandwidth (bytes the step must read / time)", "",
         "| B | N | FA3 | cuDNN | flash | Flex | best dense | ours select | ours anchor (sparse out) | "
         "ours anchor (dense out) | ours reuse | reuse / best dense | anchor / FA3 |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, n):
        x = r.get(n, {})
        if "ms" not in x:
            return "—"
        return f"{x['ms'] * 1e3:.1f} ({x['TBps']:.2f} TB/s)"

    for key, r in results["per_layer"].items():
        B, N = r["B"], r["N"]
        bd = r["best_dense"]
        rr = r["ours_reuse"]["ms"] / r[bd]["ms"] if "ms" in r.get("ours_reuse", {}) else float("nan")
        ra = r["ours_anchor_sparse"]["ms"] / r["fa3"]["ms"] if "ms" in r.get("fa3", {}) else float("nan")
        L.append(f"| {B} | {N // 1024}K | {cell(r, 'fa3')} | {cell(r, 'sdpa_cudnn')} | {cell(r, 'sdpa_flash')} | "
                 f"{cell(r, 'flex')} | {bd} | {cell(r, 'ours_select')} | {cell(r, 'ours_anchor_sparse')} | "
                 f"{cell(r, 'ours_anchor_dense')} | {cell(r, 'ours_reuse')} | {rr:.3f} | {ra:.3f} |")
    fp8_rows = [(key, r) for key, r in results["per_layer"].items() if "ours_anchor_fp8" in r]
    if fp8_rows:
        names = sorted({n for _, r in fp8_rows for n in r if n.startswith("ours_anchor_fp8")})
        L += ["", "## Per layer, selection from an FP8 copy of the keys (us; ratio to FA3 of the same run)", "",
              "| B | N | FA3 | ours anchor (exact) | ours select fp8 | " + " | ".join(names) + " | recall vs exact |",
              "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
        for key, r in fp8_rows:
            fa = r.get("fa3", {}).get("ms")

            def rat(n):
                x = r.get(n, {})
                if "ms" not in x:
                    return "—"
                return f"{x['ms'] * 1e3:.1f} ({x['ms'] / fa:.3f}x)" if fa else f"{x['ms'] * 1e3:.1f}"
            rec = ", ".join(f"{k_[:-len('_recall_vs_exact')]} {v:.4f}" for k_, v in r.items()
                            if k_.endswith("recall_vs_exact"))
            L.append(f"| {r['B']} | {r['N'] // 1024}K | {cell(r, 'fa3')} | {rat('ours_anchor_sparse')} | "
                     f"{rat('ours_select_fp8')} | " + " | ".join(rat(n) for n in names) + f" | {rec} |")
    L += ["", "## Whole model: 32 layers, anchors [0, 2, 8, 13, 14], one CUDA graph (ms)", "",
          "| B | N | ours | 32 x FA3 (graph) | speedup vs FA3 | vs 32 x best dense | layer 0 | distinct KV caches |",
          "|---|---|---|---|---|---|---|---|"]
    tables = [("whole_model", ANCHORS), ("whole_model_10", ANCHORS_10)]
    tables += [(name, ANCHORS_10 if name.startswith("whole_model_10") else ANCHORS)
               for name in sorted(results, key=lambda x: (x.startswith("whole_model_10"), x))
               if name.startswith("whole_model") and "fp8" in name]
    for name, anchors in tables:
        if not results.get(name):
            continue
        if name != "whole_model":
            what = "" if "fp8" not in name else ", anchors selecting from an FP8 copy of their keys"
            what += f" (re-rank {name.split('rerank')[1]})" if "rerank" in name else ""
            L += ["", f"## Whole model with {len(anchors)} selecting layers of 32: anchors {list(anchors)}{what}, "
                  "one CUDA graph (ms), against the FA3 graph above", "",
                  "| B | N | ours | 32 x FA3 (graph) | speedup vs FA3 | vs 32 x best dense | layer 0 | distinct KV caches |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, w in results[name].items():
            B, N = w["B"], w["N"]
            L.append(f"| {B} | {N // 1024}K | {w['ours']['ms']:.3f} | {w.get('fa3', {}).get('ms', float('nan')):.3f} | "
                     f"{w.get('speedup_vs_fa3', float('nan')):.2f}x | {w['speedup_vs_best_dense_x32']:.2f}x | "
                     f"{w['layer0']} | {w['distinct_caches']} |")
    return "\n".join(L) + "\n"


def plot(path_json, path_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(path_json))
    rows = [r for r in res["per_layer"].values() if r["B"] == 1]
    rows.sort(key=lambda r: r["N"])
    xs = [r["N"] // 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["fa3"]["ms"] / r["ours_reuse"]["ms"] for r in rows], "o-", label="reuse layer vs FA3")
    ax.plot(xs, [r[r["best_dense"]]["ms"] / r["ours_reuse"]["ms"] for r in rows], "o--",
            label="reuse layer vs best dense")
    ax.plot(xs, [r["fa3"]["ms"] / r["ours_anchor_sparse"]["ms"] for r in rows], "s-",
            label="anchor layer (sparse out) vs FA3")
    wm = sorted([w for w in res["whole_model"].values() if w["B"] == 1 and "speedup_vs_fa3" in w],
                key=lambda w: w["N"])
    if wm:
        ax.plot([w["N"] // 1024 for w in wm], [w["speedup_vs_fa3"] for w in wm], "D-", lw=2.5,
                label="whole model (32 layers, 1 graph) vs 32 x FA3")
    for w in res["whole_model"].values():
        if w["B"] == 8 and "speedup_vs_fa3" in w:
            ax.plot([w["N"] // 1024], [w["speedup_vs_fa3"]], "k*", ms=12, label="whole model, B=8")
    wm10 = sorted([w for w in res.get("whole_model_10", {}).values() if w["B"] == 1 and "speedup_vs_fa3" in w],
                  key=lambda w: w["N"])
    if wm10:
        ax.plot([w["N"] // 1024 for w in wm10], [w["speedup_vs_fa3"] for w in wm10], "D--", lw=1.5,
                label="whole model, 10 selecting layers")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x}K" for x in xs])
    ax.set_xlabel("context length (batch 1)")
    ax.set_ylabel("speedup (x)")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_title(f"Kascade decode attention, {res['meta']['device']}, bf16, rho 0.1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=130)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--plot", help="results JSON to plot (no measurement)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-at", default="1x131072", help="sizes the launch settings are swept at, e.g. 1x131072,8x131072")
    ap.add_argument("--sweep-only", action="store_true", help="log the sweep and stop")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sizes", default=None, help="e.g. 1x8192,8x131072")
    ap.add_argument("--tag", default=None, help="result file suffix (default: the GPU's short name, e.g. h200)")
    ap.add_argument("--fp8", action="store_true", help="add selection from an FP8 copy of the keys (module docstring)")
    ap.add_argument("--rerank", default="", help="with --fp8: comma-separated re-rank factors measured too, e.g. 2")
    ap.add_argument("--merge-into", default=None, help="existing results JSON whose rows of the measured sizes this "
                    "run replaces (other sizes kept); written back to the same file")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.plot.replace(".json", ".png"))
        return
    import triton

    from kascade.kernels import decode as K

    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    sizes = SIZES if args.sizes is None else [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    fa3 = fa3_module()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=str(datetime.date.today()), sms=torch.cuda.get_device_properties(0).multi_processor_count)
    results = dict(meta=meta, sweep=[], per_layer={}, whole_model={}, whole_model_10={})
    tag = args.tag or short_device_name(torch.cuda.get_device_name())
    path = os.path.join(args.out, f"decode_{tag}.json")
    fp8 = [None] + [float(x) for x in args.rerank.split(",") if x] if args.fp8 else None
    if args.merge_into:
        path = args.merge_into
        results = json.load(open(path))
        results["meta"].setdefault("merged_runs", []).append(dict(meta, sizes=args.sizes, fp8=fp8))
        meta = results["meta"]

    def save():
        meta["config"] = K.CONFIG
        json.dump(results, open(path, "w"), indent=1, default=str)

    if not args.no_sweep:
        t0 = time.time()
        for size in args.sweep_at.split(","):
            B, N = (int(x) for x in size.split("x"))
            log(f"sweep at B={B}, N={N}")
            sweep(K, B, N, results["sweep"])
        log(f"sweep done in {time.time() - t0:.0f} s; config {K.CONFIG}")
        save()
        if args.sweep_only:
            return
    flex_ok = [not args.no_flex]
    for B, N in sizes:
        log(f"B={B} N={N}")
        r = per_layer(K, B, N, fa3, flex_ok, fp8)
        r.update(B=B, N=N)
        results["per_layer"][f"{B}x{N}"] = r
        save()
        torch.cuda.empty_cache()
        try:
            w = whole_model(K, B, N, fa3, r)
            w.update(B=B, N=N)
            results["whole_model"][f"{B}x{N}"] = w
            variants = [("whole_model_10", ANCHORS_10, False, None)]
            for rr in fp8 or []:
                sfx = "_fp8" + ("" if rr is None else f"_rerank{rr:g}")
                variants += [("whole_model" + sfx, ANCHORS, True, rr), ("whole_model_10" + sfx, ANCHORS_10, True, rr)]
            for name, anchors, use8, rr in variants:  # against the FA3 graph just measured
                wv = whole_model(K, B, N, None, r, anchors=anchors, fp8=use8, rerank=rr)
                wv.update(B=B, N=N, anchors=list(anchors))
                if "ms" in w.get("fa3", {}):
                    wv["fa3"] = w["fa3"]
                    wv["speedup_vs_fa3"] = w["fa3"]["ms"] / wv["ours"]["ms"]
                results.setdefault(name, {})[f"{B}x{N}"] = wv
                log(f"  {name}: ours {wv['ours']['ms']:.3f} ms, {wv.get('speedup_vs_fa3', float('nan')):.2f}x FA3")
                save()
        except Exception as e:  # noqa: BLE001
            log("  whole model failed:", repr(e)[:300])
        save()
        torch.cuda.empty_cache()
    md = markdown(meta, results)
    md_path = path[:-len(".json")] + ".md" if args.merge_into else os.path.join(args.out, f"decode_{tag}.md")
    open(md_path, "w").write(md)
    log(md)


if __name__ == "__main__":
    main()
