"""Triton kernels for Kascade decode (one new query per sequence, Q == 1).

Same signatures and results as kascade.reference (select, sparse_attention), plus `anchor`, which
selects and attends in one pass over K. Layout: q [B, Hq, 1, D], k/v [B, Hkv, N, D] with any
strides but a contiguous last dim (transformers' cache), kv_start [B] left padding, kv_len [B] valid
keys of a preallocated (static) cache (keys >= kv_len[b] are unwritten; budgets are k(kv_len - kv_start)).

Anchor layer (select; anchor):
    1. _decode_logits_kernel    grid (B * Hkv, S1)     split-K over the valid keys of each KV head.
                                The G query heads of the group are the rows of one tl.dot tile
                                (padded to 16); writes the log2-scaled logits [B * Hkv, N, G] fp32 and
                                each split's running max / sum (and, for a dense output, the
                                flash-decoding partial output). Also writes k(n_b) and zeroes the
                                radix histograms, so nothing is computed on the host.
    2. _decode_pool_kernel      grid (B * Hkv, C)      s_h[n] = sum_g exp2(logit_g[n] - lse_g), the
                                pooled post-softmax scores, plus the level-1 radix histogram.
    3. exact top-k(n_b) (kascade.kernels.topk_select): by default the candidate path (level 2, one
                                pass writing the keys above the threshold's 16-bit prefix and collecting
                                the candidates, one program per row finishing on those); else levels 2-4
                                and the compaction over every key.
    4. _decode_sparse_kernel    grid (B * Hkv, S2)     sparse output from the stored logits (the G
                                logits of a key are 16 contiguous bytes): only the selected V rows
                                are read. Then _decode_combine_kernel, one program per (query head,
                                32 output columns).
Programmatic dependent launch (CONFIG["pdl"], KASCADE_DECODE_PDL=off|start|exit; Hopper and newer, not
in the interpreter): the kernels of the anchor and reuse layers are launched so that each one's launch
overlaps the end of the kernel before it (topk_select.pdl_start); same results bit for bit. Default "exit"
(measured fastest, benchmarks/results/decode_shapes_h200.md).
Reuse layer (sparse_attention): _decode_sparse_kernel gathers the K and V rows of the mapped
anchor head's indices, split over S2 programs per (sequence, KV head), then the combine.
Dense layer (dense_attention): step 1 with the flash-decoding output only (no logits kept), then the
combine: dense decode over [kv_start, kv_len) that needs no mask tensor and captures in a graph.
Selection from an FP8 copy of the keys (select_fp8, select_fp8_paged; kascade.fp8keys): step 1 reads the
e4m3 rows and their per-token scales instead of K (half the bytes), steps 2-3 as above; with a re-rank,
step 3 keeps c k candidates, _rerank_logits_kernel computes their exact logits from K (split over the
candidates), _rerank_scores_kernel their exact pooled scores, and the radix select of kascade.kernels.topk_select,
split over each row's candidates, keeps the top k(n). The anchor's output then gathers K and V rows
(sparse_attention) instead of reading stored logits.

Splits are sized from the number of SMs and the batch only: no recompilation per sequence length
(lengths, budgets and counts are runtime values) and no host synchronisation in the hot path, so
a decode step can be captured in a CUDA graph. Under capture the data-dependent argument checks
(kv_start, kv_len and head_map ranges) are skipped; pass them as device tensors there.

References: flash-decoding (split-K over the cache, log-sum-exp combine), Tri Dao et al. 2023;
the Triton fused-attention tutorial (online softmax in base 2).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kascade import fp8keys
from kascade.budget import _GUARD, budget, check_budget
from kascade.checks import check_attention_inputs, check_head_map, resolve_kv_len, resolve_kv_start
from kascade.kernels import topk_select as ts
from kascade.kernels.paging import (
    KVRows, PagedKV, PoolRows, check_paged_q, contiguous_rows, pool_rows, resolve_rows, row_offsets,
)
from kascade.reference import Selection

LOG2E = 1.4426950408889634
NO_CHUNKED_FINISH = 1 << 30  # a finish_max no row reaches


def finish_max_from_env() -> int:
    """CONFIG["select"]["finish_max"]'s default: KASCADE_DECODE_FINISH_MAX (an integer >= 1) or no chunked finish."""
    raw = os.environ.get("KASCADE_DECODE_FINISH_MAX")
    if raw is None:
        return NO_CHUNKED_FINISH
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"KASCADE_DECODE_FINISH_MAX: expected an integer >= 1 (4096 turns the chunked top-k finish "
                         f"on for rows of more candidates), got {raw!r}")
    return value


# Launch settings; benchmarks/decode.py may override them for a sweep.
# per_sm: programs per SM that the split count aims at (splits are powers of two).
CONFIG = {
    # select / sparse-output anchor; fp8_widen: what the FP8 K pass widens each e4m3 key to, "f16" (q's rows
    # scaled into float16: one conversion per two keys, _f16_rows) or "q" (q's dtype: bf16 adds one conversion
    # per key on a quarter-rate unit); kept selectable to measure one against the other on a GPU
    "logits": dict(BLOCK_N=128, num_warps=4, num_stages=3, per_sm=4, fp8_widen="f16"),
    "logits_dense": dict(BLOCK_N=128, num_warps=4, num_stages=2, per_sm=4),  # anchor with dense output
    # pool + radix kernels: chunks per row; candidates: finish levels 3-4 on the keys sharing the
    # threshold's 16-bit prefix only (kascade.kernels.topk_select.radix_candidates)
    # prefetch: the level-2 and split passes request each block of scores one block ahead
    # finish_max: rows with more candidates take the chunked finish (topk_select.FINISH_MAX = 4096 turns it on,
    # also by the environment: KASCADE_DECODE_FINISH_MAX=4096, which reaches vLLM's worker processes); off by
    # default: in CUDA-graph replays its three extra launches cost peaked scores (real weights) 1.01-1.05x an
    # anchor, and it takes flat ones (tiny random weights) to 0.49-0.95x (H100, B = 1-16,
    # benchmarks/results/flat_topk_h100.json). Rows whose candidates tie exactly (vLLM's dummy weights) need
    # neither: the single finish copies their first ties (topk_select module docstring)
    "select": dict(per_sm=4, candidates=True, prefetch=True, finish_max=finish_max_from_env()),
    # pool: prefetch keeps the next block of logits in flight (register double buffering)
    "pool": dict(BLOCK=512, num_warps=8, prefetch=True),
    # reuse layers (K and V rows gathered): "sparse" below sparse_large_from selected slots in all
    # (rows x Kmax), "sparse_large" from there on (fewer, longer programs: a large batch or context)
    "sparse": dict(BLOCK_K=32, num_warps=4, num_stages=2, per_sm=4),
    "sparse_large": dict(BLOCK_K=64, num_warps=4, num_stages=3, per_sm=2),
    "sparse_large_from": 262144,
    "sparse_out": dict(BLOCK_K=64, num_warps=4, num_stages=2, per_sm=2),  # the anchor's output (logits, V rows)
    "combine": dict(DBLK=32, num_warps=4),
    # select_fp8 with rerank: exact logits of the candidates (split over per_sm programs per SM), then one
    # program per row for the exact pooled scores and the radix select of the k(n) kept
    "rerank": dict(BLOCK_K=32, num_warps=4, per_sm=4, BLOCK=1024, select_warps=8),
    # programmatic dependent launch of the anchor's and reuse layer's kernels: "off", "start" (each
    # kernel lets the next one launch as it starts) or "exit" (as its programs exit); see pdl_mode().
    # "exit" measured fastest on every shape of benchmarks/decode_shapes.py (H200: anchor -1 to -2 us,
    # whole model +1-2%; "start" slows the anchor by up to 4 us)
    "pdl": os.environ.get("KASCADE_DECODE_PDL", "exit"),
    # batch_invariant: each request's keys are split as if it were alone (splits from one request's rows, the
    # "sparse" setting at every size), so its output does not depend on the batch it runs in (bitwise, for a
    # given GPU and lengths); what vLLM's VLLM_BATCH_INVARIANT asks of every kernel, which sets it
    # (kascade.integrations.vllm_gpu). Costs large batches some speed: more, shorter splits.
    "batch_invariant": os.environ.get("KASCADE_BATCH_INVARIANT", "0") == "1",
}


def pdl_mode(device) -> int:
    """The kernels' PDL constexpr (topk_select.PDL_MODES) for CONFIG["pdl"] on this device (0 where the
    device or the Triton has no programmatic dependent launch)."""
    name = CONFIG["pdl"]
    if name not in ts.PDL_MODES:
        raise ValueError(f"CONFIG['pdl'] (KASCADE_DECODE_PDL): expected one of {sorted(ts.PDL_MODES)}, got {name!r}")
    return ts.PDL_MODES[name] if ts.pdl_available(device) else 0


# ----------------------------------------------------------------------------------------------
# hardware / shape helpers
# ----------------------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def split_pad(nsplit: int) -> int:
    """The constexpr range (16 or 256) the pool and combine kernels read nsplit <= 256 split partials through: two
    compiled variants for every batch size instead of one per power of 2."""
    if not 1 <= nsplit <= 256:
        raise ValueError(f"nsplit: expected 1..256 splits per row, got {nsplit}")
    return 16 if nsplit <= 16 else 256


def _splits(rows: int, device, per_sm: int) -> int:
    """Splits per row so that rows * splits is about per_sm programs per SM (a power of 2).

    Independent of the sequence length, so a new length compiles nothing; splits (and chunks)
    beyond a short sequence's work are empty programs that return at once.
    """
    return max(1, min(256, _pow2(triton.cdiv(per_sm * ts.num_sms(device), max(1, rows)))))


def _step_splits(dm, device, per_sm: int) -> int:
    """Splits per row of a step: sized for the rows of the whole batch (B * Hkv), or, with
    CONFIG["batch_invariant"], for one request's rows (Hkv): a request's keys are then split alike in every batch."""
    rows = dm["HKV"] if CONFIG["batch_invariant"] else dm["B"] * dm["HKV"]
    return _splits(rows, device, per_sm)


def _f32_parts(x: float):
    """Three float32 values whose float64 sum is exactly x (kernels get Python floats as float32)."""
    f32 = lambda y: struct.unpack("f", struct.pack("f", y))[0]  # noqa: E731
    a = f32(x)
    b = f32(x - a)
    c = f32(x - a - b)
    if a + b + c != x:
        raise ValueError(f"rho: {x!r} cannot be passed exactly to the kernels")
    return a, b, c


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _budget(n, RHO_A, RHO_B, RHO_C, GUARD_A, GUARD_B, GUARD_C, K_MIN):
    """k(n) = min(n, max(k_min, floor(rho * n + guard))) in float64, bit for bit kascade.budget."""
    rho = tl.cast(RHO_A, tl.float64) + tl.cast(RHO_B, tl.float64) + tl.cast(RHO_C, tl.float64)
    guard = tl.cast(GUARD_A, tl.float64) + tl.cast(GUARD_B, tl.float64) + tl.cast(GUARD_C, tl.float64)
    frac = (n.to(tl.float64) * rho + guard).to(tl.int64)
    return tl.minimum(n.to(tl.int64), tl.maximum(frac, K_MIN)).to(tl.int32)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST (CPU interpreter with bf16, whose bf16 dot is wrong) multiplies in float32."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=DOT_PREC)
    return r


@triton.jit
def _f16_rows(q):
    """q [GPAD, DP] as float16 rows for the product with widened e4m3 keys, each row scaled by a power of two that
    puts its largest magnitude in [2^13, 2^14), and the [GPAD] factors that undo the scaling; float32 q is kept
    (with factors 1). A bf16 or fp16 value scaled so is exactly a float16 unless it lies 2^27 below its row's
    largest (its products fall far under the float32 sum's rounding), so the logits are those of widening each
    key to q's dtype. Why: e4m3 widens to float16 in one conversion per two keys (F2FP), where bf16 takes one more
    per key on a quarter-rate unit (F2F; benchmarks/results/decode_fp8_sass_sm90_cpu.md), and the FP8 pass widening
    to bf16 moved 2.3 TB/s against 2.9 for bf16 keys (decode_h100.md)."""
    if q.dtype == tl.float32:
        return q, tl.full([q.shape[0]], 1.0, tl.float32)
    q32 = q.to(tl.float32)
    big = tl.max(tl.abs(q32), 1)
    up = tl.exp2(13.0 - tl.floor(tl.log2(tl.maximum(big, 1e-30))))
    return (q32 * up[:, None]).to(tl.float16), 1.0 / up


# NSPLIT (the splits per row, a power of 2 set by the batch size) only sizes each split's range here: a runtime
# value, so the batch sizes a serving engine meets share one compiled kernel; HKV too (1 in head-granular views).
# The pool and combine kernels read the NSPLIT partials through a padded constexpr range SPAD (split_pad).
@triton.jit(do_not_specialize=["N", "K_MIN", "NSPLIT", "HKV"])
def _decode_logits_kernel(Q, K, V, LG, MP, LP, OP, KV_START, KV_LEN, START32, END32, KB, FT, HIST,
                          N, stride_lg, sqb, sqh, skb, skh, skn, BT, s_bt, PAGE: tl.constexpr, svb, svh, svn,
                          scale_log2, HKV, RHO_A, RHO_B, RHO_C, GUARD_A, GUARD_B, GUARD_C, K_MIN,
                          G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          DV: tl.constexpr, DVP: tl.constexpr, NSPLIT, BLOCK_N: tl.constexpr,
                          HAS_START: tl.constexpr, HAS_LEN: tl.constexpr, DENSE_OUT: tl.constexpr,
                          SELECT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                          PAGED: tl.constexpr = False, PDL: tl.constexpr = 0,
                          KS=None, sks_seq=0, sks_head=0, sks_tok=0, FP8: tl.constexpr = False,
                          WIDEN_F16: tl.constexpr = True):
    """FP8 (select_fp8): K is the FP8 copy of the keys (float8_e4m3fn rows, addressed like K) and KS its
    per-row scales (addressed by sks_*): each key row is widened to float16 (exact) for the product with q's rows
    scaled into float16 (_f16_rows; float32 q: widened to float32), and its logits multiplied by its scale and
    the row's factor. The bytes read halve; the widening must stay cheap for that to show (_f16_rows)."""
    tl.static_assert(GPAD >= 16 and GPAD >= G)
    tl.static_assert(not (FP8 and DENSE_OUT))
    ts.pdl_start(PDL)
    row = tl.program_id(0)  # b * HKV + h
    sp = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    if HAS_START:
        start = tl.load(KV_START + b).to(tl.int32)
    else:
        start = 0
    if HAS_LEN:
        end = tl.load(KV_LEN + b).to(tl.int32)
    else:
        end = N
    if SELECT:
        if sp == 0:
            z = tl.arange(0, 1024)
            tl.store(HIST + row * 1024 + z, tl.zeros([1024], tl.int32))
            if h == 0:
                tl.store(START32 + b, start)
                tl.store(END32 + b, end)
                tl.store(KB + b, _budget(end - start, RHO_A, RHO_B, RHO_C, GUARD_A, GUARD_B, GUARD_C, K_MIN))
                tl.store(FT + b, b.to(tl.int64) * 0)
    per = tl.cdiv(tl.cdiv(end - start, NSPLIT), BLOCK_N) * BLOCK_N
    lo = start + sp * per
    hi = tl.minimum(lo + per, end)

    g = tl.arange(0, GPAD)
    gm = g < G
    hq = h * G + g
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sqb + hq[:, None] * sqh + d[None, :], mask=gm[:, None] & (d[None, :] < D), other=0.0)
    if FP8 and WIDEN_F16:
        q, q_unscale = _f16_rows(q)
    else:
        q_unscale = tl.full([GPAD], 1.0, tl.float32)
    lg_row = LG + row.to(tl.int64) * stride_lg  # logits [N, G] of this KV head

    m_i = tl.full([GPAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GPAD], tl.float32)
    acc = tl.zeros([GPAD, DVP], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nm = offs < hi
        koff = row_offsets(b, h, offs, nm, skb, skh, skn, BT, s_bt, PAGE, PAGED)
        kt = tl.load(K + koff[:, None] + d[None, :], mask=nm[:, None] & (d[None, :] < D), other=0.0)
        if FP8:
            soff = row_offsets(b, h, offs, nm, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE, PAGED)
            ksc = tl.load(KS + soff, mask=nm, other=0.0)
            s = _dot(q, tl.trans(kt.to(q.dtype)), DOT_PREC, UPCAST) * (ksc * scale_log2)[None, :] * q_unscale[:, None]
        else:
            s = _dot(q, tl.trans(kt), DOT_PREC, UPCAST) * scale_log2  # [GPAD, BLOCK_N]
        s = tl.where(nm[None, :], s, float("-inf"))
        if SELECT:
            tl.store(lg_row + offs[None, :] * G + g[:, None], s, mask=gm[:, None] & nm[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DENSE_OUT:
            voff = row_offsets(b, h, offs, nm, svb, svh, svn, BT, s_bt, PAGE, PAGED)
            vt = tl.load(V + voff[:, None] + dv[None, :],
                         mask=nm[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, DOT_PREC, UPCAST)
        m_i = m_new
    prow = (b * HKV * G + hq) * NSPLIT + sp  # [GPAD]
    tl.store(MP + prow, m_i, mask=gm)
    tl.store(LP + prow, l_i, mask=gm)
    if DENSE_OUT:
        tl.store(OP + prow[:, None] * DVP + dv[None, :], acc, mask=gm[:, None])


@triton.jit
def _logit_block(lg_row, n0, hi, g, gm, G: tl.constexpr, BLOCK: tl.constexpr):
    """Logits [BLOCK, GP] of keys [n0, n0 + BLOCK) of a row ([N, G] layout); -inf from hi on and for g >= G."""
    offs = n0 + tl.arange(0, BLOCK)
    return tl.load(lg_row + offs[:, None] * G + g[None, :], mask=(offs < hi)[:, None] & gm[None, :],
                   other=float("-inf"))


@triton.jit(do_not_specialize=["N", "CHUNK", "HKV", "NSPLIT"])
def _decode_pool_kernel(LG, MP, LP, S, HIST, START32, END32, N, stride_lg, stride_s, CHUNK, HKV,
                        G: tl.constexpr, GP: tl.constexpr, NSPLIT, SPAD: tl.constexpr, BLOCK: tl.constexpr,
                        PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False):
    """s[row, n] = sum_g exp2(logit_g[n] - lse_g) over the G heads of the row's KV group; level-1 histogram.

    PREFETCH: the loop keeps the next block's logits in flight (register double buffering), so a
    program waits for memory once rather than once per block. PDL: started by programmatic dependent launch.
    """
    ts.pdl_start(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    g = tl.arange(0, GP)
    gm = g < G
    lse = _lse2(MP, LP, b * HKV * G + h * G + g, gm, NSPLIT, SPAD)  # [GP]
    start = tl.load(START32 + b)
    end = tl.load(END32 + b)
    lo = tl.maximum(c * CHUNK, start)
    hi = tl.minimum(c * CHUNK + CHUNK, end)
    lg_row = LG + row.to(tl.int64) * stride_lg
    s_row = S + row.to(tl.int64) * stride_s
    acc = tl.zeros([256], tl.int32)
    if PREFETCH:  # the next block's logits are requested before this block is pooled
        x_next = _logit_block(lg_row, lo, hi, g, gm, G, BLOCK)
    for n0 in range(lo, hi, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        nm = offs < hi
        if PREFETCH:
            x = x_next
            x_next = _logit_block(lg_row, n0 + BLOCK, hi, g, gm, G, BLOCK)
        else:
            x = _logit_block(lg_row, n0, hi, g, gm, G, BLOCK)
        s = tl.sum(tl.exp2(x - lse[None, :]), 1)
        tl.store(s_row + offs, s, mask=nm)
        key = s.to(tl.int32, bitcast=True)
        acc += tl.histogram((key >> 23) & 255, 256, mask=nm)
    tl.atomic_add(HIST + row * 1024 + tl.arange(0, 256), acc, mask=acc > 0, sem="relaxed")


@triton.jit
def _sparse_walk(q, K, V, i_base, sik, lg_row, b, h, lo, hi, g, gm, d, dv, skb, skh, skn, svb, svh, svn, BT, s_bt,
                 PAGE: tl.constexpr, scale_log2, G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr,
                 DV: tl.constexpr, DVP: tl.constexpr, BLOCK_K: tl.constexpr, FROM_LOGITS: tl.constexpr,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr):
    """Online softmax of the G heads of KV head h over the selected slots [lo, hi) at i_base: (m, l, acc).

    FROM_LOGITS: the scores are read from the stored logits row lg_row ([N, G]) instead of being
    recomputed from K (q unused). The V rows are requested first in each block."""
    m_i = tl.full([GPAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GPAD], tl.float32)
    acc = tl.zeros([GPAD, DVP], tl.float32)
    for j0 in range(lo, hi, BLOCK_K):
        offs = j0 + tl.arange(0, BLOCK_K)
        km = offs < hi
        idx = tl.load(i_base + offs * sik, mask=km, other=0)
        voff = row_offsets(b, h, idx, km, svb, svh, svn, BT, s_bt, PAGE, PAGED)
        vt = tl.load(V + voff[:, None] + dv[None, :], mask=km[:, None] & (dv[None, :] < DV), other=0.0)
        if FROM_LOGITS:
            s = tl.load(lg_row + idx.to(tl.int64)[None, :] * G + g[:, None], mask=gm[:, None] & km[None, :],
                        other=0.0)
        else:
            koff = row_offsets(b, h, idx, km, skb, skh, skn, BT, s_bt, PAGE, PAGED)
            kt = tl.load(K + koff[:, None] + d[None, :], mask=km[:, None] & (d[None, :] < D), other=0.0)
            s = _dot(q, tl.trans(kt), DOT_PREC, UPCAST) * scale_log2
        s = tl.where(km[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, DOT_PREC, UPCAST)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["NSPLIT"])  # as in _decode_logits_kernel
def _decode_sparse_kernel(Q, K, V, LG, IDX, CNT, HMAP, OP, MP, LP,
                          stride_lg, sqb, sqh, skb, skh, skn, BT, s_bt, PAGE: tl.constexpr, svb, svh, svn, sib, sih, sik, scb,
                          scale_log2, HKV,
                          G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          DV: tl.constexpr, DVP: tl.constexpr, NSPLIT, BLOCK_K: tl.constexpr,
                          FROM_LOGITS: tl.constexpr, HAS_MAP: tl.constexpr, DOT_PREC: tl.constexpr,
                          UPCAST: tl.constexpr, PAGED: tl.constexpr = False,
                          MIXED: tl.constexpr = False, IDX2=None, sib2=0, sih2=0, S_OWN=1,
                          PDL: tl.constexpr = 0):
    """Attention of the G heads of KV head h over the selected keys of anchor head head_map[h].

    Split s of S2 takes a contiguous range of the count[b] valid slots. FROM_LOGITS: the scores are
    read from the anchor's stored logits instead of being recomputed from K. The V rows are requested
    first in each block, before the scores are read or computed.
    MIXED (a part-selecting layer): head_map[h] >= 0 reuses row head_map[h] of IDX (K and V gathered);
    head_map[h] = -1 - j makes h the layer's own selecting head j: its selection is row j of IDX2
    ([B, S_OWN, Kmax] by strides sib2, sih2) and its scores the logits row b * S_OWN + j of LG.
    PDL: started by programmatic dependent launch (topk_select.pdl_start).
    """
    tl.static_assert(GPAD >= 16 and GPAD >= G)
    ts.pdl_start(PDL)
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    if HAS_MAP:
        src = tl.load(HMAP + h)
    else:
        src = h
    cnt = tl.load(CNT + b * scb)
    per = tl.cdiv(tl.cdiv(cnt, BLOCK_K), NSPLIT) * BLOCK_K
    lo = sp * per
    hi = tl.minimum(lo + per, cnt)

    g = tl.arange(0, GPAD)
    gm = g < G
    hq = h * G + g
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    b64 = b.to(tl.int64)
    q = tl.zeros([GPAD, DP], Q.dtype.element_ty)
    if not FROM_LOGITS:
        q = tl.load(Q + b64 * sqb + hq[:, None] * sqh + d[None, :], mask=gm[:, None] & (d[None, :] < D), other=0.0)
    if MIXED:
        if src < 0:  # one of the layer's own selecting heads: its selection and its logits
            j = -1 - src
            m_i, l_i, acc = _sparse_walk(
                q, K, V, IDX2 + b64 * sib2 + j.to(tl.int64) * sih2, sik,
                LG + (b * S_OWN + j).to(tl.int64) * stride_lg, b, h, lo, hi, g, gm, d, dv, skb, skh, skn,
                svb, svh, svn, BT, s_bt, PAGE, scale_log2, G, GPAD, D, DV, DVP, BLOCK_K, True, DOT_PREC, UPCAST, PAGED)
        else:
            m_i, l_i, acc = _sparse_walk(
                q, K, V, IDX + b64 * sib + src.to(tl.int64) * sih, sik, LG, b, h, lo, hi, g, gm, d, dv,
                skb, skh, skn, svb, svh, svn, BT, s_bt, PAGE, scale_log2, G, GPAD, D, DV, DVP, BLOCK_K, False,
                DOT_PREC, UPCAST, PAGED)
    else:
        m_i, l_i, acc = _sparse_walk(
            q, K, V, IDX + b64 * sib + src.to(tl.int64) * sih, sik, LG + row.to(tl.int64) * stride_lg, b, h, lo, hi,
            g, gm, d, dv, skb, skh, skn, svb, svh, svn, BT, s_bt, PAGE, scale_log2, G, GPAD, D, DV, DVP, BLOCK_K,
            FROM_LOGITS, DOT_PREC, UPCAST, PAGED)
    prow = (b * HKV * G + hq) * NSPLIT + sp
    tl.store(MP + prow, m_i, mask=gm)
    tl.store(LP + prow, l_i, mask=gm)
    tl.store(OP + prow[:, None] * DVP + dv[None, :], acc, mask=gm[:, None])


@triton.jit
def _combine_block(OP, MP, LP, OUT, i, b, hq, c, sob, soh,
                   DV: tl.constexpr, DVP: tl.constexpr, NSPLIT, SPAD: tl.constexpr, DBLK: tl.constexpr):
    """out[b, hq, columns c*DBLK..] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s (empty splits: m_s = -inf);
    i = b * Hq + hq indexes the partials; NSPLIT <= SPAD of them."""
    sp = tl.arange(0, SPAD)
    sm = sp < NSPLIT
    dv = c * DBLK + tl.arange(0, DBLK)
    m = tl.load(MP + i * NSPLIT + sp, mask=sm, other=float("-inf"))
    lsum = tl.load(LP + i * NSPLIT + sp, mask=sm, other=0.0)
    o = tl.load(OP + (i * NSPLIT + sp)[:, None] * DVP + dv[None, :], mask=sm[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    den = tl.sum(lsum * w, 0)
    res = tl.sum(o * w[:, None], 0) / den
    tl.store(OUT + b.to(tl.int64) * sob + hq * soh + dv, res.to(OUT.dtype.element_ty), mask=dv < DV)


@triton.jit(do_not_specialize=["HQ", "NSPLIT"])
def _decode_combine_kernel(OP, MP, LP, OUT, sob, soh, HQ,
                           DV: tl.constexpr, DVP: tl.constexpr, NSPLIT, SPAD: tl.constexpr, DBLK: tl.constexpr,
                           PDL: tl.constexpr = 0):
    """The split partials combined (_combine_block): one program per (query head, block of DBLK output
    columns), so the partials of a step are read by many SMs at once. PDL: programmatic dependent launch."""
    ts.pdl_start(PDL)
    i = tl.program_id(0)
    _combine_block(OP, MP, LP, OUT, i, i // HQ, i % HQ, tl.program_id(1), sob, soh, DV, DVP, NSPLIT, SPAD, DBLK)


@triton.jit
def _lse2(MP, LP, hq_row, gm, NSPLIT, SPAD: tl.constexpr):
    """Log2-sum-exp2 of each query head's logits over every key, from the K pass's NSPLIT <= SPAD split
    statistics (0 for the padding rows g >= G)."""
    sp = tl.arange(0, SPAD)
    ok = gm[:, None] & (sp < NSPLIT)[None, :]
    mp = tl.load(MP + hq_row[:, None] * NSPLIT + sp[None, :], mask=ok, other=float("-inf"))
    lp = tl.load(LP + hq_row[:, None] * NSPLIT + sp[None, :], mask=ok, other=0.0)
    mx = tl.where(gm, tl.max(mp, 1), 0.0)
    lse = mx + tl.log2(tl.sum(lp * tl.exp2(mp - mx[:, None]), 1))
    return tl.where(gm, lse, 0.0)


@triton.jit(do_not_specialize=["KCMAX"])
def _rerank_logits_kernel(Q, K, LG, MP, LP, CAND, CNT, KH, EX, PA, P8,
                          stride_lg, sqb, sqh, skb, skh, skn, BT, s_bt, PAGE: tl.constexpr, scale_log2, HKV, KCMAX,
                          G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          NSPLIT: tl.constexpr, NS3: tl.constexpr, BLOCK_K: tl.constexpr, HAS_KH: tl.constexpr,
                          DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr = False):
    """Exact logits of the candidates of row (b, h) (split s of NS3 over its CNT[b] candidates): the bf16 key
    rows of KV head KH[h] at the candidate positions, times the G queries. Writes them to EX [R, KCMAX, G]
    and, per query head, the split's sums of exp2(l - lse8) over the candidates for the exact logits (PA)
    and for the FP8 logits stored by the K pass (P8), lse8 the FP8 log-sum-exp over every key."""
    tl.static_assert(GPAD >= 16 and GPAD >= G)
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    if HAS_KH:
        kh = tl.load(KH + h).to(tl.int32)
    else:
        kh = h
    cnt = tl.load(CNT + b)
    per = tl.cdiv(tl.cdiv(cnt, BLOCK_K), NS3) * BLOCK_K
    lo = sp * per
    hi = tl.minimum(lo + per, cnt)
    g = tl.arange(0, GPAD)
    gm = g < G
    hq = h * G + g
    d = tl.arange(0, DP)
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sqb + hq[:, None] * sqh + d[None, :], mask=gm[:, None] & (d[None, :] < D), other=0.0)
    lse = _lse2(MP, LP, b * HKV * G + hq, gm, NSPLIT, NSPLIT)
    lg_row = LG + row.to(tl.int64) * stride_lg
    c_row = CAND + row.to(tl.int64) * KCMAX
    e_row = EX + row.to(tl.int64) * KCMAX * G
    a_ex = tl.zeros([GPAD], tl.float32)
    a_8 = tl.zeros([GPAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_K):
        offs = j0 + tl.arange(0, BLOCK_K)
        km = offs < hi
        idx = tl.load(c_row + offs, mask=km, other=0)
        koff = row_offsets(b, kh, idx, km, skb, skh, skn, BT, s_bt, PAGE, PAGED)
        kt = tl.load(K + koff[:, None] + d[None, :], mask=km[:, None] & (d[None, :] < D), other=0.0)
        le = _dot(q, tl.trans(kt), DOT_PREC, UPCAST) * scale_log2  # [GPAD, BLOCK_K]
        ok = gm[:, None] & km[None, :]
        l8 = tl.load(lg_row + idx.to(tl.int64)[None, :] * G + g[:, None], mask=ok, other=float("-inf"))
        a_ex += tl.sum(tl.where(ok, tl.exp2(le - lse[:, None]), 0.0), 1)
        a_8 += tl.sum(tl.exp2(l8 - lse[:, None]), 1)
        tl.store(e_row + offs[None, :] * G + g[:, None], le, mask=ok)
    part = (row * NS3 + sp) * GPAD + g
    tl.store(PA + part, a_ex)
    tl.store(P8 + part, a_8)


@triton.jit(do_not_specialize=["KCMAX"])
def _rerank_scores_kernel(EX, PA, P8, MP, LP, CNT, START32, END32, COUNTS, VALS, HKV, KCMAX,
                          RHO_A, RHO_B, RHO_C, GUARD_A, GUARD_B, GUARD_C, K_MIN,
                          G: tl.constexpr, GPAD: tl.constexpr, NSPLIT: tl.constexpr, NS3: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Exact pooled scores of row (b, h)'s candidates (split s over its CNT[b] candidates) to VALS [R, KCMAX]
    float32, and k(n_b) to COUNTS[b]. Each query head's softmax denominator takes the exact terms of the
    candidates and the FP8 terms of every other key: lse = lse8 + log2(max(0, 1 - P8) + PA);
    score = sum_g exp2(l_g - lse_g). The top k(n_b) of them are then kept by kascade.kernels.topk_select."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    kc = tl.load(CNT + b)
    if (h == 0) & (sp == 0):
        kk = _budget(tl.load(END32 + b) - tl.load(START32 + b), RHO_A, RHO_B, RHO_C, GUARD_A, GUARD_B, GUARD_C,
                     K_MIN)
        tl.store(COUNTS + b, kk)
    g = tl.arange(0, GPAD)
    gm = g < G
    lse8 = _lse2(MP, LP, b * HKV * G + h * G + g, gm, NSPLIT, NSPLIT)
    parts = tl.arange(0, NS3)
    part = (row * NS3 + parts)[:, None] * GPAD + g[None, :]
    a_ex = tl.sum(tl.load(PA + part), 0)
    a_8 = tl.sum(tl.load(P8 + part), 0)
    lmix = lse8 + tl.log2(tl.maximum(1.0 - a_8, 0.0) + a_ex)
    per = tl.cdiv(tl.cdiv(kc, BLOCK), tl.num_programs(1)) * BLOCK
    lo = sp * per
    hi = tl.minimum(lo + per, kc)
    e_row = EX + row.to(tl.int64) * KCMAX * G
    v_row = VALS + row.to(tl.int64) * KCMAX
    for j0 in range(lo, hi, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        km = offs < hi
        le = tl.load(e_row + offs[:, None] * G + g[None, :], mask=km[:, None] & gm[None, :], other=float("-inf"))
        tl.store(v_row + offs, tl.sum(tl.exp2(le - lmix[None, :]), 1), mask=km)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _last_dim_contiguous(*ts_):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts_]


def _scale_log2(q, scale):
    return (q.shape[-1] ** -0.5 if scale is None else float(scale)) * LOG2E


def _dims(q, k, v):
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    dv = v.shape[-1] if v is not None else d
    g = hq // hkv
    return dict(B=b, HQ=hq, HKV=hkv, N=n, D=d, DV=dv, G=g, GPAD=max(16, _pow2(g)), DP=max(16, _pow2(d)),
                DVP=max(16, _pow2(dv)))


def _dot_prec(q):
    return "ieee" if q.dtype == torch.float32 else None


def _upcast(q):
    return q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _kv_start(kv_start, q, k):
    """kv_start as a device integer tensor [B] (checked unless capturing), or None for no padding."""
    if kv_start is None:
        return None
    if _capturing(q):
        return torch.as_tensor(kv_start, device=q.device)
    return resolve_kv_start(kv_start, q, k)


def _kv_len(kv_len, q, k, kv_start):
    """kv_len as a device integer tensor [B] (checked unless capturing), or None (the whole cache)."""
    if kv_len is None:
        return None
    if _capturing(q):
        return torch.as_tensor(kv_len, device=q.device)
    return resolve_kv_len(kv_len, q, k, kv_start)


def _combine(op, mp, lp, out, dims, nsplit, pdl=0):
    dblk = min(dims["DVP"], CONFIG["combine"]["DBLK"])
    _decode_combine_kernel[(dims["B"] * dims["HQ"], dims["DVP"] // dblk)](
        op, mp, lp, out, out.stride(0), out.stride(1), dims["HQ"],
        DV=dims["DV"], DVP=dims["DVP"], NSPLIT=nsplit, SPAD=split_pad(nsplit), DBLK=dblk, PDL=pdl,
        num_warps=CONFIG["combine"]["num_warps"],
        **ts.pdl_kwargs(pdl))
    return out


def _anchor_pass(q, k, v, rho, k_min, tile, kv_start, scale, output, kv_len=None):
    """Shared body of select / anchor on a contiguous cache. output: None, "sparse" or "dense"."""
    check_attention_inputs(q, k, v)
    _check_anchor_args(q, rho, k_min, tile)
    q, k = _last_dim_contiguous(q, k)
    if v is not None:
        (v,) = _last_dim_contiguous(v)
    start = _kv_start(kv_start, q, k)
    end = _kv_len(kv_len, q, k, start)
    krows = contiguous_rows(k)
    vrows = contiguous_rows(v) if v is not None else krows
    return _anchor_core(q, krows, vrows, _dims(q, k, v), start, end, rho, k_min, tile, scale, output)


def _check_anchor_args(q, rho, k_min, tile):
    check_budget(rho, k_min)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    if q.shape[2] != 1:
        raise ValueError(f"q: decode kernels take one query per sequence, got {tuple(q.shape)}; "
                         "use kascade.kernels.prefill for Q > 1")


def _anchor_core(q, krows: KVRows, vrows: KVRows, dm, start, end, rho, k_min, tile, scale, output,
                 key_scales: KVRows | None = None, out: torch.Tensor | None = None):
    """Selection (and output) over the keys [start, end) of each sequence; krows/vrows address the cache.

    key_scales: krows is an FP8 copy of the keys and these its per-row scales (select_fp8); output must
    be None or "fp8", which also returns the pass's buffers for a re-rank (a dict). out: where the
    attention output goes (output "sparse" or "dense"; checked by _output_tensor), else a new tensor."""
    B, HQ, HKV, N = dm["B"], dm["HQ"], dm["HKV"], dm["N"]
    R = B * HKV
    dev = q.device
    kmax = triton.cdiv(max(1, budget(N, rho, k_min)), 16) * 16  # padded: strides keep their alignment class
    ln = triton.cdiv(N, 16) * 16
    dense = output == "dense"
    cl = CONFIG["logits_dense" if dense else "logits"]
    s1 = _step_splits(dm, dev, cl["per_sm"])
    nchunk, chunk = ts.plan_chunks(R, N, dev, CONFIG["select"]["per_sm"])
    lg = torch.empty(R, ln, dm["G"], dtype=torch.float32, device=dev)  # logits, G contiguous per key
    mp = torch.empty(B * HQ, s1, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    op = torch.empty(B * HQ, s1, dm["DVP"], dtype=torch.float32, device=dev) if dense else mp
    start32 = torch.empty(B, dtype=torch.int32, device=dev)
    end32 = torch.empty(B, dtype=torch.int32, device=dev)
    counts = torch.empty(B, 1, dtype=torch.int32, device=dev)
    first_tile = torch.empty(B, dtype=torch.int64, device=dev)
    ws = ts.RadixWorkspace(R, nchunk, dev)
    pdl = pdl_mode(dev)
    ra, rb, rc = _f32_parts(float(rho))
    ga, gb, gc = _f32_parts(_GUARD)
    stages = cl["num_stages"]
    per_stage = cl["BLOCK_N"] * (dm["DP"] + (dm["DVP"] if dense else 0)) * q.element_size()
    stages = max(1, min(stages, (160 * 1024) // per_stage))  # K (and V) tiles in shared memory
    _decode_logits_kernel[(R, s1)](
        q, krows.tensor, vrows.tensor, lg, mp, lp, op, start if start is not None else start32,
        end if end is not None else end32, start32, end32, counts, first_tile, ws.hist, N, lg.stride(0),
        q.stride(0), q.stride(1), *krows.args(start32)[1:], vrows.s_seq, vrows.s_head, vrows.s_tok,
        _scale_log2(q, scale), HKV, ra, rb, rc, ga, gb, gc, k_min,
        G=dm["G"], GPAD=dm["GPAD"], D=dm["D"], DP=dm["DP"], DV=dm["DV"], DVP=dm["DVP"], NSPLIT=s1,
        BLOCK_N=cl["BLOCK_N"], HAS_START=start is not None, HAS_LEN=end is not None, DENSE_OUT=dense, SELECT=True,
        DOT_PREC=_dot_prec(q), UPCAST=_upcast(q), PAGED=krows.paged, PDL=pdl, num_warps=cl["num_warps"],
        num_stages=stages, **_fp8_kwargs(key_scales, cl), **ts.pdl_kwargs(pdl))
    scores = torch.empty(R, ln, dtype=torch.float32, device=dev)
    cp = CONFIG["pool"]
    _decode_pool_kernel[(R, nchunk)](
        lg, mp, lp, scores, ws.hist, start32, end32, N, lg.stride(0), ln, chunk, HKV,
        G=dm["G"], GP=_pow2(dm["G"]), NSPLIT=s1, SPAD=split_pad(s1), BLOCK=cp["BLOCK"], PREFETCH=cp["prefetch"],
        PDL=pdl,
        num_warps=cp["num_warps"], **ts.pdl_kwargs(pdl))
    idx = torch.empty(R, kmax, dtype=torch.int32, device=dev)
    if CONFIG["select"]["candidates"]:
        ts.radix_candidates(scores, N, ws, counts, start32, HKV, nchunk, chunk, idx, end_b=end32,
                            prefetch=CONFIG["select"]["prefetch"], pdl=pdl,
                            finish_max=CONFIG["select"]["finish_max"])
    else:
        ts.radix_levels(scores, N, ws, counts, start32, HKV, nchunk, chunk, idx, first_level=2, end_b=end32)
    sel = Selection(idx.view(B, HKV, 1, kmax), counts, first_tile, tile, True)
    if output is None:
        return None, sel
    if output == "fp8":
        return dict(lg=lg, mp=mp, lp=lp, start32=start32, end32=end32, s1=s1, idx=idx, kmax=kmax), sel
    if output == "logits":  # the stored logits [B * Hkv, N', G] for a later sparse output
        return lg, sel
    out = _output_tensor(out, q, dm)
    if dense:
        return _combine(op, mp, lp, out, dm, s1, pdl), sel
    return _sparse(q, krows, vrows, idx, (kmax * HKV, kmax, 1), counts, None, scale, out, dm, logits=lg,
                   pdl=pdl), sel


def _output_tensor(out, q, dm) -> torch.Tensor:
    """out [B, Hq, 1, Dv] for a decode output: a new tensor, or the caller's (q's dtype and device, last dimension
    contiguous: the combine writes each (b, head) row by out's first two strides), checked."""
    shape = (dm["B"], dm["HQ"], 1, dm["DV"])
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    if tuple(out.shape) != shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out: expected shape {shape}, dtype {q.dtype} on {q.device} with a contiguous last "
                         f"dimension, got shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}, strides "
                         f"{tuple(out.stride())}")
    return out


def _fp8_kwargs(key_scales: KVRows | None, launch: dict) -> dict:
    """The FP8 arguments of _decode_logits_kernel (none for bf16 / fp16 / fp32 keys); launch: its CONFIG section."""
    if key_scales is None:
        return {}
    widen = launch.get("fp8_widen", "f16")
    if widen not in ("f16", "q"):
        raise ValueError(f'CONFIG["logits"]["fp8_widen"]: expected "f16" or "q", got {widen!r}')
    return dict(KS=key_scales.tensor, sks_seq=key_scales.s_seq, sks_head=key_scales.s_head,
                sks_tok=key_scales.s_tok, FP8=True, WIDEN_F16=widen == "f16")


def _sparse(q, krows: KVRows, vrows: KVRows, idx, idx_strides, counts, head_map, scale, out, dm, logits=None,
            pdl=0, own=None):
    """Sparse attention over idx, then the combine (pdl: topk_select.PDL_MODES value of both launches).

    own (a part-selecting layer): (own indices [B, S, Kmax'] with unit last stride, their logits
    [B * S, N', G]); head_map then routes each KV head (_decode_sparse_kernel's MIXED)."""
    B, HQ, HKV = dm["B"], dm["HQ"], dm["HKV"]
    R = B * HKV
    dev = q.device
    if logits is not None and own is None:
        cs = CONFIG["sparse_out"]
    else:
        large = R * idx.shape[-1] >= CONFIG["sparse_large_from"] and not CONFIG["batch_invariant"]
        cs = CONFIG["sparse_large" if large else "sparse"]
    s2 = _step_splits(dm, dev, cs["per_sm"])
    op = torch.empty(B * HQ, s2, dm["DVP"], dtype=torch.float32, device=dev)
    mp = torch.empty(B * HQ, s2, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    lg, stride_lg = (logits, logits.stride(0)) if logits is not None else (mp, 0)
    mixed = {}
    if own is not None:
        own_idx, lg = own
        stride_lg = lg.stride(0)
        mixed = dict(MIXED=True, IDX2=own_idx, sib2=own_idx.stride(0), sih2=own_idx.stride(1), S_OWN=own_idx.shape[1])
    _decode_sparse_kernel[(R, s2)](
        q, krows.tensor, vrows.tensor, lg, idx, counts, head_map if head_map is not None else counts, op, mp, lp,
        stride_lg, q.stride(0), q.stride(1), *krows.args(counts)[1:], vrows.s_seq, vrows.s_head, vrows.s_tok,
        idx_strides[0], idx_strides[1], idx_strides[2], counts.stride(0), _scale_log2(q, scale), HKV,
        G=dm["G"], GPAD=dm["GPAD"], D=dm["D"], DP=dm["DP"], DV=dm["DV"], DVP=dm["DVP"], NSPLIT=s2,
        BLOCK_K=cs["BLOCK_K"], FROM_LOGITS=logits is not None and own is None, HAS_MAP=head_map is not None,
        DOT_PREC=_dot_prec(q), UPCAST=_upcast(q), PAGED=krows.paged, PDL=pdl, num_warps=cs["num_warps"],
        num_stages=cs["num_stages"], **mixed, **ts.pdl_kwargs(pdl))
    return _combine(op, mp, lp, out, dm, s2, pdl)


def _dense_core(q, krows: KVRows, vrows: KVRows, dm, start, end, scale):
    """Flash-decoding over the keys [start, end) of each sequence, then the combine."""
    B, HQ, HKV, N = dm["B"], dm["HQ"], dm["HKV"], dm["N"]
    R, dev = B * HKV, q.device
    cl = CONFIG["logits_dense"]
    s1 = _step_splits(dm, dev, cl["per_sm"])
    mp = torch.empty(B * HQ, s1, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    op = torch.empty(B * HQ, s1, dm["DVP"], dtype=torch.float32, device=dev)
    i32 = torch.empty(B, dtype=torch.int32, device=dev)  # unused pointers (SELECT=False)
    per_stage = cl["BLOCK_N"] * (dm["DP"] + dm["DVP"]) * q.element_size()
    stages = max(1, min(cl["num_stages"], (160 * 1024) // per_stage))
    _decode_logits_kernel[(R, s1)](
        q, krows.tensor, vrows.tensor, mp, mp, lp, op, start if start is not None else i32,
        end if end is not None else i32, i32, i32, i32, i32, i32, N, 0, q.stride(0), q.stride(1),
        *krows.args(i32)[1:], vrows.s_seq, vrows.s_head, vrows.s_tok,
        _scale_log2(q, scale), HKV, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0,
        G=dm["G"], GPAD=dm["GPAD"], D=dm["D"], DP=dm["DP"], DV=dm["DV"], DVP=dm["DVP"], NSPLIT=s1,
        BLOCK_N=cl["BLOCK_N"], HAS_START=start is not None, HAS_LEN=end is not None, DENSE_OUT=True, SELECT=False,
        DOT_PREC=_dot_prec(q), UPCAST=_upcast(q), PAGED=krows.paged, num_warps=cl["num_warps"], num_stages=stages)
    out = torch.empty(B, HQ, 1, dm["DV"], dtype=q.dtype, device=dev)
    return _combine(op, mp, lp, out, dm, s1)


# ----------------------------------------------------------------------------------------------
# public API (signatures of kascade.reference)
# ----------------------------------------------------------------------------------------------


def select(q, k, rho: float = 0.1, k_min: int = 128, tile: int = 32, kv_start=None, scale=None,
           kv_len=None) -> Selection:
    """Decode top-k selection, as kascade.reference.select for Q == 1.

    Returns a Selection with indices [B, Hkv, 1, Kmax] int32 where Kmax = k(N) (the budget of the
    longest possible sequence) rounded up to a multiple of 16, so the shape depends on N only;
    counts [B, 1] = k(n_b), n_b = kv_len[b] - kv_start[b] (kv_len default N). Valid slots
    hold the selected positions in the order kascade.kernels.topk_select documents for the path
    in use (groups of ascending positions, ties at the k-th pooled score last); slots from counts
    on hold -1.
    """
    return _anchor_pass(q, k, None, rho, k_min, tile, kv_start, scale, None, kv_len)[1]


def anchor(q, k, v, rho: float = 0.1, k_min: int = 128, tile: int = 32, kv_start=None, scale=None,
           dense_output: bool = False, kv_len=None):
    """Anchor layer in one pass over K: (out [B, Hq, 1, Dv], Selection).

    dense_output=False: attention over the selected keys, from the stored logits (V is read at the
    selected rows only). dense_output=True: dense attention, computed in the same pass over K and V.
    """
    return _anchor_pass(q, k, v, rho, k_min, tile, kv_start, scale, "dense" if dense_output else "sparse", kv_len)


def dense_attention(q, k, v, kv_start=None, scale=None, kv_len=None):
    """Dense decode attention over the valid keys [kv_start[b], kv_len[b]): [B, Hq, 1, Dv].

    One split-K pass (flash-decoding) and the combine; no mask tensor, no host synchronisation.
    """
    check_attention_inputs(q, k, v)
    if q.shape[2] != 1:
        raise ValueError(f"q: decode kernels take one query per sequence, got {tuple(q.shape)}")
    q, k, v = _last_dim_contiguous(q, k, v)
    start = _kv_start(kv_start, q, k)
    end = _kv_len(kv_len, q, k, start)
    return _dense_core(q, contiguous_rows(k), contiguous_rows(v), _dims(q, k, v), start, end, scale)


def sparse_attention(q, k, v, selection: Selection, head_map=None, kv_start=None, scale=None, kv_len=None):
    """Decode attention over an anchor's selected keys, as kascade.reference.sparse_attention for Q == 1.

    Accepts the Selection of the reference or of `select` (absolute positions, counts[b, 0] valid
    slots). kv_start and kv_len are accepted for symmetry: absolute positions already skip the padding
    and the unwritten tail.
    head_map [Hkv]: device tensor when capturing a CUDA graph.
    """
    check_attention_inputs(q, k, v)
    if q.shape[2] != 1 or not selection.decode or selection.indices.shape[0] != q.shape[0]:
        raise ValueError(
            f"selection: made for batch {selection.indices.shape[0]} with decode={selection.decode}, "
            f"got q of shape {tuple(q.shape)}; select again for this step"
        )
    q, k, v = _last_dim_contiguous(q, k, v)
    dm = _dims(q, k, v)
    if _capturing(q):
        if selection.num_kv_heads != dm["HKV"]:
            raise ValueError(f"selection: expected {dm['HKV']} KV heads like k, got {selection.num_kv_heads}")
        hm = None if head_map is None else torch.as_tensor(head_map, device=q.device)
    else:
        _kv_len(kv_len, q, k, _kv_start(kv_start, q, k))
        hm = None if head_map is None else check_head_map(head_map, dm["HKV"], selection.num_kv_heads, q.device)
    idx = selection.indices
    out = torch.empty(dm["B"], dm["HQ"], 1, dm["DV"], dtype=q.dtype, device=q.device)
    return _sparse(q, contiguous_rows(k), contiguous_rows(v), idx, (idx.stride(0), idx.stride(1), idx.stride(3)),
                   selection.counts, hm, scale, out, dm, pdl=pdl_mode(q.device))


def part_anchor(q, k, v, heads: slice, sources: Selection, route, rho: float = 0.1, k_min: int = 128, tile: int = 32,
                kv_start=None, scale=None, kv_len=None):
    """A part-selecting layer in one sparse pass: (out [B, Hq, 1, Dv], Selection of its own heads [B, S, 1, Kmax]).

    The KV heads `heads` (a slice of the head axis: read in place through strides) select like an
    anchor; the others reuse an earlier layer's selection `sources` ([B, Hs, 1, Kmax']). route [Hkv]
    int (a device tensor under CUDA-graph capture): route[h] >= 0 is the row of `sources` that head h
    reuses, route[h] = -1 - j makes h own selecting head j (the j-th head of the slice). One sparse
    launch then attends every head: own heads from the logits of their selection pass (V read at their
    selected rows), the others by gathering K and V. Equal to selecting the own heads, stacking their
    selection with `sources` in head order and calling sparse_attention (outputs within rounding of
    the scores, which come from the stored logits here).
    """
    check_attention_inputs(q, k, v)
    _check_anchor_args(q, rho, k_min, tile)
    B, HQ, HKV = q.shape[0], q.shape[1], k.shape[1]
    if not isinstance(heads, slice):
        raise ValueError(f"heads: expected a slice of the {HKV} KV heads, got {heads!r}")
    own = range(HKV)[heads]
    if len(own) == 0:
        raise ValueError(f"heads: {heads!r} selects no KV head of {HKV}")
    if not sources.decode or sources.indices.shape[0] != B:
        raise ValueError(f"sources: expected a decode Selection for batch {B}, got indices of shape "
                         f"{tuple(sources.indices.shape)} with decode={sources.decode}")
    if _capturing(q):
        rt = torch.as_tensor(route, device=q.device)
    else:
        rt = torch.as_tensor(route, device=q.device, dtype=torch.int64)
        if rt.shape != (HKV,):
            raise ValueError(f"route: expected [{HKV}] entries (one per KV head), got shape {tuple(rt.shape)}")
        want = [-1 - own.index(h) if h in own else None for h in range(HKV)]
        got = rt.tolist()
        bad = [h for h in range(HKV) if (got[h] != want[h] if want[h] is not None
                                        else not 0 <= got[h] < sources.num_kv_heads)]
        if bad:
            raise ValueError(f"route: expected [{HKV}] entries, -1 - j for own head j of {list(own)} and a row of "
                             f"the {sources.num_kv_heads} source heads otherwise, got {got} (wrong at heads {bad})")
    q, k, v = _last_dim_contiguous(q, k, v)
    g = HQ // HKV
    qv = q.unflatten(1, (HKV, g))[:, heads].flatten(1, 2)
    kv = k[:, heads]
    start = _kv_start(kv_start, q, k)
    end = _kv_len(kv_len, q, k, start)
    logits, sel = _anchor_core(qv, contiguous_rows(kv), contiguous_rows(kv), _dims(qv, kv, None), start, end,
                               rho, k_min, tile, scale, "logits")
    dm = _dims(q, k, v)
    out = torch.empty(B, HQ, 1, dm["DV"], dtype=q.dtype, device=q.device)
    src = sources.indices
    own_idx = sel.indices.view(B, len(own), -1)
    _sparse(q, contiguous_rows(k), contiguous_rows(v), src, (src.stride(0), src.stride(1), src.stride(3)), sel.counts,
            rt.to(torch.int32) if rt.dtype != torch.int32 else rt, scale, out, dm, pdl=pdl_mode(q.device),
            own=(own_idx, logits))
    return out, sel


# ----------------------------------------------------------------------------------------------
# selection from an FP8 copy of the keys (kascade.fp8keys)
# ----------------------------------------------------------------------------------------------


def _fp8_select(q, k8rows: KVRows, ksrows: KVRows, krows: KVRows | None, kv_heads, dm, start, end, rho, k_min,
                tile, scale, rerank) -> Selection:
    """Selection of q's KV groups scored from the FP8 copy (k8rows, ksrows); with rerank, the candidates'
    exact logits from krows (KV head kv_heads[h] for copy head h; None: h) and the top k(n) of them."""
    if rerank is None:
        return _anchor_core(q, k8rows, k8rows, dm, start, end, rho, k_min, tile, scale, None, key_scales=ksrows)[1]
    rho_c, kmin_c = fp8keys.candidate_budget(rho, k_min, rerank)
    buf, cand = _anchor_core(q, k8rows, k8rows, dm, start, end, rho_c, kmin_c, tile, scale, "fp8", key_scales=ksrows)
    B, HKV, G = dm["B"], dm["HKV"], dm["G"]
    R, dev = B * HKV, q.device
    kcmax = buf["kmax"]
    kmax = triton.cdiv(max(1, budget(dm["N"], rho, k_min)), 16) * 16
    cr = CONFIG["rerank"]
    s3 = _step_splits(dm, dev, cr["per_sm"])
    ex = torch.empty(R, kcmax, G, dtype=torch.float32, device=dev)
    pa = torch.empty(R, s3, dm["GPAD"], dtype=torch.float32, device=dev)
    p8 = torch.empty_like(pa)
    kh = kv_heads if kv_heads is not None else cand.counts
    _rerank_logits_kernel[(R, s3)](
        q, krows.tensor, buf["lg"], buf["mp"], buf["lp"], buf["idx"], cand.counts, kh, ex, pa, p8,
        buf["lg"].stride(0), q.stride(0), q.stride(1), *krows.args(cand.counts)[1:], _scale_log2(q, scale), HKV, kcmax,
        G=G, GPAD=dm["GPAD"], D=dm["D"], DP=dm["DP"], NSPLIT=buf["s1"], NS3=s3, BLOCK_K=cr["BLOCK_K"],
        HAS_KH=kv_heads is not None, DOT_PREC=_dot_prec(q), UPCAST=_upcast(q), PAGED=krows.paged,
        num_warps=cr["num_warps"])
    counts = torch.empty(B, 1, dtype=torch.int32, device=dev)
    vals = torch.empty(R, kcmax, dtype=torch.float32, device=dev)
    ra, rb, rc = _f32_parts(float(rho))
    ga, gb, gc = _f32_parts(_GUARD)
    nchunk, chunk = ts.plan_chunks(R, kcmax, dev)
    _rerank_scores_kernel[(R, nchunk)](
        ex, pa, p8, buf["mp"], buf["lp"], cand.counts, buf["start32"], buf["end32"], counts, vals,
        HKV, kcmax, ra, rb, rc, ga, gb, gc, k_min, G=G, GPAD=dm["GPAD"], NSPLIT=buf["s1"], NS3=s3,
        BLOCK=cr["BLOCK"], num_warps=cr["select_warps"])
    # the top k(n_b) of each row's candidates, split over the row like the anchor's own top-k, as columns of
    # the candidate list, then the columns' cache positions
    ws = ts.RadixWorkspace(R, nchunk, dev)
    ws.hist.zero_()
    cols = torch.empty(R, kmax, dtype=torch.int32, device=dev)
    ts.radix_levels(vals, kcmax, ws, counts.view(B), torch.zeros(B, dtype=torch.int32, device=dev), HKV, nchunk,
                    chunk, cols, end_b=cand.counts.view(B))
    picked = buf["idx"].view(R, kcmax).gather(1, cols.clamp(min=0).long())
    idx = torch.where(cols >= 0, picked, cols)
    return Selection(idx.view(B, HKV, 1, kmax), counts, cand.first_tile, tile, True)


def select_fp8(q, key_copy, rho: float = 0.1, k_min: int = 128, tile: int = 32, kv_start=None, scale=None,
               kv_len=None, *, rerank: float | None = None, k=None, kv_heads=None) -> Selection:
    """`select` scored from an FP8 copy of the keys (kascade.fp8keys.select is the reference).

    q [B, S * G, 1, D]; key_copy (keys [B, S, N, D] float8_e4m3fn, scales [B, S, N] float32); kv_start,
    kv_len as in `select`. rerank c >= 1: the FP8 scores choose k(n; c rho, c k_min) candidates, whose
    exact logits come from k [B, Hkv, N, D] (KV head kv_heads[h] for copy head h, default h), and the top
    k(n) by exact pooled score are kept. Same Selection layout as `select` (slots past k(n) hold -1)."""
    k8, ks, kh = fp8keys.check_select_args(q, key_copy, rerank, k, kv_heads)
    _check_anchor_args(q, rho, k_min, tile)
    (q,) = _last_dim_contiguous(q)
    start = _kv_start(kv_start, q, k8)
    end = _kv_len(kv_len, q, k8, start)
    krows = None
    if rerank is not None:
        fp8keys.check_rerank_keys(k, k8, q)
        krows = contiguous_rows(k)
    dm = _dims(q, k8, None)
    return _fp8_select(q, contiguous_rows(k8), KVRows(ks, ks.stride(0), ks.stride(1), ks.stride(2)), krows, kh, dm,
                       start, end, rho, k_min, tile, scale, rerank)


# ----------------------------------------------------------------------------------------------
# paged KV cache (kascade.kernels.paging.PagedKV): pages resolved inside the kernels
# ----------------------------------------------------------------------------------------------


def _paged_setup(q, cache: PagedKV, need_values: bool, check: bool = True):
    """(q, key rows, value rows, dims, seq_lens) of a decode step over a paged cache.

    N (the longest possible sequence: max_pages x page_size) sizes the buffers and Kmax, so a step
    captured in a CUDA graph serves every length the block table allows. Lengths are checked
    (one device-to-host copy) unless capturing or check=False.
    """
    check_paged_q(q, cache)
    if q.shape[2] != 1:
        raise ValueError(f"q: decode kernels take one query per sequence, got {tuple(q.shape)}")
    if need_values and cache.value_cache is None:
        raise ValueError("cache: this step reads values, but value_cache is None")
    if check and not _capturing(q):
        cache.host_lengths()
    (q,) = _last_dim_contiguous(q)
    kc, vc = cache.key_cache, cache.value_cache if cache.value_cache is not None else cache.key_cache
    b, hq, _, d = q.shape
    hkv, dv = cache.num_kv_heads, vc.shape[-1]
    g = hq // hkv
    dm = dict(B=b, HQ=hq, HKV=hkv, N=cache.block_table.shape[1] * cache.page_size, D=d, DV=dv, G=g,
              GPAD=max(16, _pow2(g)), DP=max(16, _pow2(d)), DVP=max(16, _pow2(dv)))
    vrows = cache.rows("value") if cache.value_cache is not None else cache.rows("key")
    return q, cache.rows("key"), vrows, dm, cache.seq_lens


@dataclass
class PagedDecodeSelection(Selection):
    """A decode Selection over a paged cache that also holds its positions resolved to pool rows."""

    pool: PoolRows | None = None


def _with_pool(sel: Selection, cache: PagedKV) -> PagedDecodeSelection:
    return PagedDecodeSelection(sel.indices, sel.counts, sel.first_tile, sel.tile, sel.decode,
                                pool=resolve_rows(cache, sel.indices, sel.counts))


def select_paged(q, cache: PagedKV, rho: float = 0.1, k_min: int = 128, tile: int = 32,
                 scale=None, check: bool = True) -> PagedDecodeSelection:
    """`select` over a paged cache: q [B, Hq, 1, D], sequence b's keys are positions 0 .. seq_lens[b]-1.

    Selected positions count from 0 in each sequence (as `select` with no padding); they are also
    resolved to pool rows once here, for the reuse layers. check=False (here and in the other paged
    functions) skips the checks that read device values (the seq_lens range; the head map's), as a
    CUDA-graph capture does: the call then never synchronises with the device."""
    _check_anchor_args(q, rho, k_min, tile)
    q, kr, vr, dm, lens = _paged_setup(q, cache, False, check)
    return _with_pool(_anchor_core(q, kr, vr, dm, None, lens, rho, k_min, tile, scale, None)[1], cache)


def anchor_paged(q, cache: PagedKV, rho: float = 0.1, k_min: int = 128, tile: int = 32, scale=None,
                 dense_output: bool = False, check: bool = True, out: torch.Tensor | None = None):
    """`anchor` over a paged cache: (out [B, Hq, 1, Dv], PagedDecodeSelection). out: written in place when
    given (q's dtype and device, last dimension contiguous; e.g. a view of an engine's output buffer)."""
    _check_anchor_args(q, rho, k_min, tile)
    q, kr, vr, dm, lens = _paged_setup(q, cache, True, check)
    out, sel = _anchor_core(q, kr, vr, dm, None, lens, rho, k_min, tile, scale, "dense" if dense_output else "sparse",
                            out=out)
    return out, _with_pool(sel, cache)


def dense_attention_paged(q, cache: PagedKV, scale=None, check: bool = True):
    """`dense_attention` over a paged cache: [B, Hq, 1, Dv]."""
    q, kr, vr, dm, lens = _paged_setup(q, cache, True, check)
    return _dense_core(q, kr, vr, dm, None, lens, scale)


def sparse_attention_paged(q, cache: PagedKV, selection: Selection, head_map=None, scale=None, check: bool = True,
                           out: torch.Tensor | None = None):
    """`sparse_attention` over a paged cache; selection positions count from 0 in each sequence.

    head_map [Hkv]: a device tensor when capturing a CUDA graph or with check=False. out [B, Hq, 1, Dv]: written
    in place when given (as in anchor_paged)."""
    q, kr, vr, dm, _ = _paged_setup(q, cache, True, check)
    if not selection.decode or selection.indices.shape[0] != q.shape[0]:
        raise ValueError(f"selection: made for batch {selection.indices.shape[0]} with decode={selection.decode}, "
                         f"got q of shape {tuple(q.shape)}; select again for this step")
    if _capturing(q) or not check:
        if selection.num_kv_heads != dm["HKV"]:
            raise ValueError(f"selection: expected {dm['HKV']} KV heads like the cache, got {selection.num_kv_heads}")
        hm = None if head_map is None else torch.as_tensor(head_map, device=q.device)
    else:
        hm = None if head_map is None else check_head_map(head_map, dm["HKV"], selection.num_kv_heads, q.device)
    pool = getattr(selection, "pool", None)
    if pool is not None and pool.block_table is cache.block_table:  # pages resolved by the anchor
        idx, kr, vr = pool.rows, pool_rows(cache, "key"), pool_rows(cache, "value")
    else:
        idx = selection.indices
    out = _output_tensor(out, q, dm)
    return _sparse(q, kr, vr, idx, (idx.stride(0), idx.stride(1), idx.stride(3)), selection.counts, hm, scale, out, dm,
                   pdl=pdl_mode(q.device))


def select_fp8_paged(q, cache: PagedKV, key_copy, rho: float = 0.1, k_min: int = 128, tile: int = 32, scale=None,
                     check: bool = True, *, rerank: float | None = None, kv_heads=None) -> PagedDecodeSelection:
    """`select_fp8` over a paged cache: key_copy (keys [num_pages, page_size, S, D] float8_e4m3fn, scales
    [num_pages, page_size, S] float32) shares the cache's pages (cache.block_table, cache.seq_lens); with
    rerank the candidates' exact logits read cache.key_cache (KV head kv_heads[h] for copy head h)."""
    k8, ks, kh = fp8keys.check_select_args(q, key_copy, rerank, cache.key_cache, kv_heads, paged=True)
    _check_anchor_args(q, rho, k_min, tile)
    kc = cache.key_cache
    if k8.shape[:2] != kc.shape[:2] or q.dtype != kc.dtype or q.shape[0] != cache.block_table.shape[0]:
        raise ValueError(f"key_copy: expected pages {tuple(kc.shape[:2])} like the cache and q of its dtype {kc.dtype} "
                         f"and batch {cache.block_table.shape[0]}, got keys {tuple(k8.shape)} and q {tuple(q.shape)} "
                         f"{q.dtype}")
    if check and not _capturing(q):
        cache.host_lengths()
    (q,) = _last_dim_contiguous(q)
    copy = PagedKV(k8, None, cache.block_table, cache.seq_lens)
    b, hq, _, d = q.shape
    s = k8.shape[2]
    dm = dict(B=b, HQ=hq, HKV=s, N=cache.block_table.shape[1] * cache.page_size, D=d, DV=d, G=hq // s,
              GPAD=max(16, _pow2(hq // s)), DP=max(16, _pow2(d)), DVP=max(16, _pow2(d)))
    ksrows = KVRows(ks, ks.stride(0), ks.stride(2), ks.stride(1), cache.block_table, cache.page_size)
    krows = cache.rows("key") if rerank is not None else None
    sel = _fp8_select(q, copy.rows("key"), ksrows, krows, kh, dm, None, cache.seq_lens, rho, k_min, tile, scale, rerank)
    return _with_pool(sel, cache)
