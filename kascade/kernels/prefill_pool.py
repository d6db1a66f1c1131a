"""Pooled post-softmax scores of prefill query tiles (the first half of anchor-layer prefill selection).

For sequence b, KV head h and query tile t (queries at sequence positions [tT, (t+1)T)), the pooled
score of key j < tT is

    pooled[j] = sum over the G query heads g of group h and the tile's rows r present in q of
                exp(q_{g,r} . k_j * scale - lse_{g,r}),    lse_{g,r} = log sum_{j' <= pos(r)} exp(q . k_j' * scale)

i.e. each row is normalised by its own causal log-sum-exp over every key it sees (the diagonal
block included), exactly as `kascade.reference.pooled_tile_scores`. One program handles one
(tile, KV head, sequence) and stacks the G x T query rows into one matrix operand:

    loop 1 (rows x keys, keys 0 .. end of the tile): running max and sum -> lse of every row
    loop 2 (keys x rows, keys 0 .. tT):              exp2(s - lse) summed over the rows -> pooled

Loop 2 puts the keys on the MMA's M side so that the sum over the G x T rows is a row reduction
(inside a thread and a quad of lanes), not a reduction across warps. When G x T exceeds the rows
one MMA tile holds (ROWS <= 128), the heads are processed in NUM_HG groups: the log-sum-exps go
through a small scratch buffer and loop 2 adds the groups' sums.

Tiles whose budget k(tT) covers all tT keys are skipped (they select every key). Memory: the
pooled scores of a chunk of C local tiles, [B, Hkv, C, N] float32; the caller bounds C.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kascade.kernels.paging import KVRows, contiguous_rows, row_offsets, seq_span

LOG2E = 1.4426950408889634
# Triton's CPU interpreter multiplies bfloat16 matrices wrongly (it reads their raw bits), so under
# TRITON_INTERPRET=1 the kernels upcast matrix operands to float32 first (exact for bf16/fp16 values).
UPCAST_DOT = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# inner pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """tl.dot(a, b, acc), through float32 operands when UPCAST (the CPU interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def mma8(a, b, UPCAST: tl.constexpr, NATIVE: tl.constexpr):
    """a @ b of two float8_e4m3fn operands into float32: FP8 tensor cores when NATIVE (compute capability 8.9 and
    newer), else both widened to bf16 (exact) first; float32 operands in the interpreter (UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif NATIVE:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def load_qs_rows(QS, b, h, hg, t, n, p0, Q_LEN, sqsb, sqsh, sqsm,
                 G: tl.constexpr, TILE: tl.constexpr, T_PAD: tl.constexpr, BLOCK_G: tl.constexpr):
    """The FP8 scales [BLOCK_G * T_PAD] of the stacked query rows of _load_q_rows (0 for rows not present)."""
    ROWS: tl.constexpr = BLOCK_G * T_PAD
    r = tl.arange(0, ROWS)
    g = hg * BLOCK_G + r // T_PAD
    i = r % T_PAD
    pos = t * TILE + i
    ok = (i < TILE) & (g < G) & (pos >= p0) & (pos < n)
    qrow = pos + (Q_LEN - n)
    off = b.to(tl.int64) * sqsb + (h * G + g).to(tl.int64) * sqsh + qrow.to(tl.int64) * sqsm
    return tl.load(QS + off, mask=ok, other=0.0)


@triton.jit
def _qk_block(q, kb, qs, K_S, b, h, kpos, kmask, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE: tl.constexpr, qk_scale,
              UPCAST: tl.constexpr, PAGED: tl.constexpr, FP8: tl.constexpr, NATIVE: tl.constexpr):
    """Scaled logits q kb^T [ROWS, BLOCK_N] (log2 units); FP8: q, kb float8 with row scales qs and the keys'
    scales read at cache positions kpos."""
    if FP8:
        ks = tl.load(K_S + row_offsets(b, h, kpos, kmask, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE, PAGED),
                     mask=kmask, other=0.0)
        return mma8(q, tl.trans(kb), UPCAST, NATIVE) * (qs * qk_scale)[:, None] * ks[None, :]
    else:
        return mma(q, tl.trans(kb), None, UPCAST) * qk_scale


@triton.jit
def _kq_block(kb, q, qs, K_S, b, h, kpos, kmask, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE: tl.constexpr, qk_scale,
              UPCAST: tl.constexpr, PAGED: tl.constexpr, FP8: tl.constexpr, NATIVE: tl.constexpr):
    """Scaled logits kb q^T [BLOCK_N, ROWS] (keys on the MMA's M side), as _qk_block."""
    if FP8:
        ks = tl.load(K_S + row_offsets(b, h, kpos, kmask, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE, PAGED),
                     mask=kmask, other=0.0)
        return mma8(kb, tl.trans(q), UPCAST, NATIVE) * (ks * qk_scale)[:, None] * qs[None, :]
    else:
        return mma(kb, tl.trans(q), None, UPCAST) * qk_scale


@triton.jit
def _tile_geometry(KV_START, KV_END, b, u, Q_LEN, N_CACHE, TILE: tl.constexpr, HAS_END: tl.constexpr):
    """(cache offset s, sequence length n, first present position p0, absolute tile number t)."""
    s, n = seq_span(b, KV_START, KV_END, N_CACHE, HAS_END)
    qv = tl.minimum(Q_LEN, n)
    p0 = n - qv
    t = p0 // TILE + u
    return s, n, p0, t


@triton.jit
def _load_q_rows(Q, b, h, hg, t, n, p0, Q_LEN, sqb, sqh, sqm,
                 G: tl.constexpr, TILE: tl.constexpr, T_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stacked query rows [BLOCK_G * T_PAD, BLOCK_D] of head group hg (row r: head r // T_PAD, position r % T_PAD)
    and their validity / positions."""
    ROWS: tl.constexpr = BLOCK_G * T_PAD
    r = tl.arange(0, ROWS)
    g = hg * BLOCK_G + r // T_PAD
    i = r % T_PAD
    pos = t * TILE + i
    ok = (i < TILE) & (g < G) & (pos >= p0) & (pos < n)
    qrow = pos + (Q_LEN - n)
    d = tl.arange(0, BLOCK_D)
    off = (b.to(tl.int64) * sqb + (h * G + g).to(tl.int64) * sqh + qrow.to(tl.int64) * sqm)
    q = tl.load(Q + off[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    return q, ok, pos


@triton.jit
def _row_lse(q, K, b, h, s, skb, skh, skn, BT, s_bt, PAGE: tl.constexpr, ok, pos, n_before, kend, qk_scale,
             ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             UPCAST: tl.constexpr, PAGED: tl.constexpr, qs=None, K_S=None, sks_seq=0, sks_head=0, sks_tok=0,
             FP8: tl.constexpr = False, NATIVE: tl.constexpr = False):
    """log2-sum-exp2 of every stacked row over its causal keys [0, pos]; +inf for rows not present.
    FP8: q and K are FP8 with scales qs (per row) and K_S (per key)."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    d = tl.arange(0, BLOCK_D)
    dmask = d[None, :] < HEAD_DIM
    n_full = (n_before // BLOCK_N) * BLOCK_N
    # keys every row sees: no mask
    for start in range(0, n_full, BLOCK_N):
        kn = start + tl.arange(0, BLOCK_N)
        koff = row_offsets(b, h, s + kn, kn < kend, skb, skh, skn, BT, s_bt, PAGE, PAGED)
        kb = tl.load(K + koff[:, None] + d[None, :], mask=dmask, other=0.0)
        if FP8:
            sc = _qk_block(q, kb, qs, K_S, b, h, s + kn, kn < kend, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE,
                           qk_scale, UPCAST, PAGED, FP8, NATIVE)
        else:
            sc = mma(q, tl.trans(kb), None, UPCAST) * qk_scale
        m_new = tl.maximum(m, tl.max(sc, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(sc - m_new[:, None]), 1)
        m = m_new
    # the last partial block before the tile and the diagonal block: causal mask
    for start in range(n_full, kend, BLOCK_N):
        kn = start + tl.arange(0, BLOCK_N)
        koff = row_offsets(b, h, s + kn, kn < kend, skb, skh, skn, BT, s_bt, PAGE, PAGED)
        kb = tl.load(K + koff[:, None] + d[None, :], mask=(kn[:, None] < kend) & dmask, other=0.0)
        if FP8:
            sc = _qk_block(q, kb, qs, K_S, b, h, s + kn, kn < kend, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE,
                           qk_scale, UPCAST, PAGED, FP8, NATIVE)
        else:
            sc = mma(q, tl.trans(kb), None, UPCAST) * qk_scale
        sc = tl.where((kn[None, :] <= pos[:, None]) & (kn[None, :] < kend), sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(sc - m_safe[:, None]), 1)
        m = m_new
    lse = m + tl.log2(l)
    return tl.where(ok, lse, float("inf"))


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


# lengths, tile offsets and the widths of per-call buffers change from call to call: not specialized, so
# a serving step with new lengths reuses the compiled kernel (tests/test_kernel_variants.py)
@triton.jit(do_not_specialize=["slb", "slh", "slu", "scb", "u0", "Q_LEN", "N_CACHE"])
def _pool_kernel(
    Q, K, KV_START, KV_END, COUNTS, POOLED, LSE_BUF,
    sqb, sqh, sqm,
    skb, skh, skn, BT, s_bt, PAGE: tl.constexpr,
    spb, sph, spu,
    slb, slh, slu,
    scb,
    qk_scale, u0, Q_LEN, N_CACHE,
    G: tl.constexpr, TILE: tl.constexpr, T_PAD: tl.constexpr, BLOCK_G: tl.constexpr, NUM_HG: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    PAGED: tl.constexpr, HAS_END: tl.constexpr,
    QS=None, sqsb=0, sqsh=0, sqsm=0, K_S=None, sks_seq=0, sks_head=0, sks_tok=0, FINAL=None,
    FP8: tl.constexpr = False, NATIVE: tl.constexpr = False, STORE_LSE: tl.constexpr = False,
):
    """POOLED[b, h, uu, j] for j < tT of local tile u = u0 + uu (see the module docstring).

    FP8 (kascade.kernels.prefill_fp8): Q and K are FP8 (float8_e4m3fn) with per-row scales QS and per-key
    scales K_S; NATIVE multiplies them on FP8 tensor cores. STORE_LSE: every row's log-sum-exp goes to
    LSE_BUF (for a re-rank), and a tile runs when its final budget FINAL[b, u] is below tT even if COUNTS
    (the candidates') covers every key."""
    tl.static_assert(BLOCK_G * T_PAD <= 256)
    tl.static_assert(T_PAD >= TILE)
    ROWS: tl.constexpr = BLOCK_G * T_PAD
    # the longest tiles of the chunk first; neighbouring programs share the KV head
    uu = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    u = u0 + uu
    s, n, p0, t = _tile_geometry(KV_START, KV_END, b, u, Q_LEN, N_CACHE, TILE, HAS_END)
    n_before = t * TILE
    kk = tl.load(COUNTS + b * scb + u)
    if STORE_LSE:
        kk = tl.load(FINAL + b * scb + u)
    if (n_before < n) & (kk < n_before):
        kend = tl.minimum(n_before + TILE, n)
        P_row = POOLED + b.to(tl.int64) * spb + h.to(tl.int64) * sph + uu.to(tl.int64) * spu
        L_row = LSE_BUF + b.to(tl.int64) * slb + h.to(tl.int64) * slh + uu.to(tl.int64) * slu
        r = tl.arange(0, ROWS)
        d = tl.arange(0, BLOCK_D)
        dmask = d[None, :] < HEAD_DIM
        if NUM_HG == 1:
            q, ok, pos = _load_q_rows(Q, b, h, 0, t, n, p0, Q_LEN, sqb, sqh, sqm,
                                      G, TILE, T_PAD, BLOCK_G, HEAD_DIM, BLOCK_D)
            qs = q
            if FP8:
                qs = load_qs_rows(QS, b, h, 0, t, n, p0, Q_LEN, sqsb, sqsh, sqsm, G, TILE, T_PAD, BLOCK_G)
            lse = _row_lse(q, K, b, h, s, skb, skh, skn, BT, s_bt, PAGE, ok, pos, n_before, kend, qk_scale,
                           ROWS, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PAGED, qs, K_S, sks_seq, sks_head, sks_tok,
                           FP8, NATIVE)
            if STORE_LSE:
                tl.store(L_row + r, lse)
            for start in range(0, n_before, BLOCK_N):
                kn = start + tl.arange(0, BLOCK_N)
                kmask = kn < n_before
                koff = row_offsets(b, h, s + kn, kmask, skb, skh, skn, BT, s_bt, PAGE, PAGED)
                kb = tl.load(K + koff[:, None] + d[None, :], mask=kmask[:, None] & dmask, other=0.0)
                if FP8:
                    st = _kq_block(kb, q, qs, K_S, b, h, s + kn, kmask, sks_seq, sks_head, sks_tok, BT, s_bt, PAGE,
                                   qk_scale, UPCAST, PAGED, FP8, NATIVE)
                else:
                    st = mma(kb, tl.trans(q), None, UPCAST) * qk_scale  # [BLOCK_N keys, ROWS]
                p = tl.exp2(st - lse[None, :])
                tl.store(P_row + kn, tl.sum(p, 1), mask=kmask)
        else:
            for hg in range(NUM_HG):
                q, ok, pos = _load_q_rows(Q, b, h, hg, t, n, p0, Q_LEN, sqb, sqh, sqm,
                                          G, TILE, T_PAD, BLOCK_G, HEAD_DIM, BLOCK_D)
                qs = q
                if FP8:
                    qs = load_qs_rows(QS, b, h, hg, t, n, p0, Q_LEN, sqsb, sqsh, sqsm, G, TILE, T_PAD, BLOCK_G)
                lse = _row_lse(q, K, b, h, s, skb, skh, skn, BT, s_bt, PAGE, ok, pos, n_before, kend, qk_scale,
                               ROWS, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PAGED, qs, K_S, sks_seq, sks_head, sks_tok,
                               FP8, NATIVE)
                tl.store(L_row + hg * ROWS + r, lse)
            tl.debug_barrier()
            for start in range(0, n_before, BLOCK_N):
                kn = start + tl.arange(0, BLOCK_N)
                kmask = kn < n_before
                koff = row_offsets(b, h, s + kn, kmask, skb, skh, skn, BT, s_bt, PAGE, PAGED)
                kb = tl.load(K + koff[:, None] + d[None, :], mask=kmask[:, None] & dmask, other=0.0)
                acc = tl.zeros([BLOCK_N], tl.float32)
                for hg2 in tl.static_range(NUM_HG):
                    qg, _ok, _pos = _load_q_rows(Q, b, h, hg2, t, n, p0, Q_LEN, sqb, sqh, sqm,
                                                 G, TILE, T_PAD, BLOCK_G, HEAD_DIM, BLOCK_D)
                    lse_g = tl.load(L_row + hg2 * ROWS + r)
                    if FP8:
                        qsg = load_qs_rows(QS, b, h, hg2, t, n, p0, Q_LEN, sqsb, sqsh, sqsm, G, TILE, T_PAD, BLOCK_G)
                        st = _kq_block(kb, qg, qsg, K_S, b, h, s + kn, kmask, sks_seq, sks_head, sks_tok, BT, s_bt,
                                       PAGE, qk_scale, UPCAST, PAGED, FP8, NATIVE)
                    else:
                        st = mma(kb, tl.trans(qg), None, UPCAST) * qk_scale
                    acc += tl.sum(tl.exp2(st - lse_g[None, :]), 1)
                tl.store(P_row + kn, acc, mask=kmask)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def row_layout(g: int, tile: int, head_dim: int = 128):
    """(T_PAD, BLOCK_G, NUM_HG): tile rows padded to a power of two >= 16, BLOCK_G heads (a power of two
    not above G) stacked per matrix tile of at most 128 rows (64 for head dims above 128)."""
    max_rows = 128 if head_dim <= 128 else 64
    t_pad = max(16, triton.next_power_of_2(tile))
    block_g = 1
    while block_g * 2 <= g and block_g * 2 * t_pad <= max_rows:
        block_g *= 2
    return t_pad, block_g, triton.cdiv(g, block_g)


def pool_config(g: int, tile: int, head_dim: int, fp8: bool = False) -> dict:
    """Launch parameters of _pool_kernel (checked for registers and shared memory on sm_90). fp8: the pass over
    the FP8 copy of the keys, whose per-key and per-row scales need more registers (benchmarks/pool_registers.py)."""
    t_pad, block_g, num_hg = row_layout(g, tile, head_dim)
    rows = block_g * t_pad
    if fp8 and num_hg == 1 and head_dim <= 128 and rows >= 128:
        # one warpgroup, capped at 168 registers (no spills): three programs per SM. H100, 8B attention shape, 128K
        # keys (benchmarks/results/fp8_pool_probe_h100.txt): 303.8 ms against 328.8 ms for exact selection in the
        # same run; at the bf16 setting below it had taken 530.8 ms (prefill_h100)
        return dict(BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=168)
    if num_hg > 1 or head_dim > 128:
        return dict(BLOCK_N=64, num_warps=8 if rows >= 128 else 4, num_stages=2)
    if rows >= 128:  # two programs per SM (127 registers, 97 KB shared): 20% faster than 3 stages at 32K
        return dict(BLOCK_N=128, num_warps=8, num_stages=2)
    return dict(BLOCK_N=128 if rows >= 64 else 64, num_warps=4, num_stages=3)


def pooled_scores_chunk(q, k, kv_start_i32, counts, pooled, lse_buf, u0: int, n_tiles: int, tile: int,
                        scale: float, config: dict | None = None, *, kv_end_i32=None, fp8: dict | None = None):
    """Fill pooled[:, :, :n_tiles, :tT] for local tiles u0 .. u0 + n_tiles - 1 of every sequence.

    q [B, Hq, Q, D]; k: the key cache, a [B, Hkv, N, D] tensor or KVRows (kascade.kernels.paging);
    kv_start_i32 [B] int32 and kv_end_i32 [B] int32 or None: each sequence's keys [start, end)
    (end N when None; a paged cache passes start 0 and end seq_lens), counts [B, U] int32 (the budget of each local tile), pooled [B, Hkv, C >= n_tiles, >= N]
    float32, lse_buf [B, Hkv, C, NUM_HG * ROWS] float32 (only used when the heads do not fit one
    matrix tile). config overrides pool_config (BLOCK_N, num_warps, num_stages, maxnreg).
    fp8 (kascade.kernels.prefill_fp8): q and k are FP8 and fp8 = dict(qs=[B, Hq, Q] float32 row scales,
    ks=KVRows of the keys' scales, native=bool, final=None or [B, U] int32: the final budgets of a re-rank,
    which also stores every row's log-sum-exp in lse_buf, then [B, Hkv, C, NUM_HG * ROWS]).
    """
    rows = k if isinstance(k, KVRows) else contiguous_rows(k)
    bsz, hq, qlen, d = q.shape
    hkv = pooled.shape[1]
    n_cache = 0 if rows.paged else rows.tensor.shape[2]
    g = hq // hkv
    t_pad, block_g, num_hg = row_layout(g, tile, d)
    cfg = dict(pool_config(g, tile, d, fp8=fp8 is not None), **(config or {}))
    grid = (n_tiles, hkv, bsz)
    _pool_kernel[grid](
        q, rows.tensor, kv_start_i32, kv_start_i32 if kv_end_i32 is None else kv_end_i32, counts, pooled, lse_buf,
        q.stride(0), q.stride(1), q.stride(2),
        *rows.args(kv_start_i32)[1:],
        pooled.stride(0), pooled.stride(1), pooled.stride(2),
        lse_buf.stride(0), lse_buf.stride(1), lse_buf.stride(2),
        counts.stride(0),
        float(scale) * LOG2E, u0, qlen, n_cache,
        G=g, TILE=tile, T_PAD=t_pad, BLOCK_G=block_g, NUM_HG=num_hg,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=UPCAST_DOT, PAGED=rows.paged,
        HAS_END=kv_end_i32 is not None, **cfg, **_fp8_args(fp8),
    )


def _fp8_args(fp8: dict | None) -> dict:
    """The FP8 keyword arguments of _pool_kernel (none for bf16 / fp16 inputs)."""
    if fp8 is None:
        return {}
    qs, ks, final = fp8["qs"], fp8["ks"], fp8.get("final")
    return dict(QS=qs, sqsb=qs.stride(0), sqsh=qs.stride(1), sqsm=qs.stride(2), K_S=ks.tensor, sks_seq=ks.s_seq,
                sks_head=ks.s_head, sks_tok=ks.s_tok, FINAL=final, FP8=True, NATIVE=bool(fp8.get("native")),
                STORE_LSE=final is not None)


def lse_scratch(bsz: int, hkv: int, chunk: int, g: int, tile: int, head_dim: int, device) -> torch.Tensor:
    """Scratch of the row log-sum-exps when the heads take several matrix tiles: [B, Hkv, C, NUM_HG * ROWS]."""
    t_pad, block_g, num_hg = row_layout(g, tile, head_dim)
    width = block_g * t_pad * num_hg if num_hg > 1 else 1
    return torch.empty(bsz, hkv, chunk, width, dtype=torch.float32, device=device)
