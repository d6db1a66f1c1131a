"""Prefill anchor selection scored from an FP8 copy of the keys, with an optional exact re-rank.

    select_fp8(q, key_copy, rho, k_min, tile, kv_start=None, scale=None, *, kv_len=None, rerank=None, k=None,
               kv_heads=None) -> PrefillSelection
    select_fp8_paged(q, cache, key_copy, ...)    the same over a paged cache (kascade.kernels.paging.PagedKV)

Same result as kascade.fp8keys.select (the reference; its docstring defines the scores): q is quantized per
row and KV head to e4m3 on the host (one small pass over q), the two Q.K passes of
kascade.kernels.prefill_pool read the FP8 copy of the keys and its per-key scales instead of the bf16 keys,
and kascade.kernels.prefill_topk keeps the top k of each tile's pooled row. On GPUs of compute capability
8.9 and newer the products run on FP8 tensor cores (`native_dot`; KASCADE_FP8_DOT=upcast widens both
operands to bf16 instead, exact but at the bf16 rate); elsewhere, and in the interpreter, operands are
widened first.

Re-rank (rerank = c): the FP8 pooled rows choose k(tT; c rho, c k_min) candidates per tile (written to a
buffer of the chunk's tiles); _rerank_kernel then, per (tile, KV head, sequence):
    pass 1 (candidates and the diagonal tile x rows): exact logits (bf16 q and keys) and FP8 logits of
           those keys E, summed as exp2(l - lse8), so each row's denominator becomes
           lse = lse8 + log2(max(0, 1 - sum_E 2^(l8 - lse8)) + sum_E 2^(l - lse8)): exact terms for the
           candidates and the tile's own keys, FP8 terms for the other keys (the pool kernel stores lse8);
    pass 2: exact pooled score of every candidate, sum over the rows of 2^(l - lse), to a scratch list;
    the radix select of prefill_topk keeps the k(tT) largest (ties to the lowest list slot).
Extra memory of a re-rank: the candidates and their scores, 2 x [B, Hkv, C, k_c max] int32 per chunk of C
tiles (at most about twice the pooled-score buffer's c rho share).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kascade import fp8keys
from kascade.host import to_device
from kascade.kernels.paging import KVRows, PagedKV, contiguous_rows, resolve_rows, row_offsets
from kascade.kernels.paging import gather_keys as gather_keys_of
from kascade.kernels.paging import gathered_ends
from kascade.kernels.prefill import (DEFAULT_POOL_BYTES, MAX_HEAD_DIM, MAX_TILE, PrefillSelection, _check_select_args,
                                     _contiguous_spans, _host_meta, _tile_counts)
from kascade.kernels.prefill_pool import (LOG2E, UPCAST_DOT, _load_q_rows, _tile_geometry, load_qs_rows, lse_scratch,
                                          mma, mma8, pooled_scores_chunk, row_layout)
from kascade.kernels.prefill_topk import _radix_select, topk_rows_chunk, topk_rows_scratch

# rerank kernel launch settings (not tuned; 8 warps for the G x T rows held in registers beside their FP8 copy)
CONFIG = dict(BLOCK_N=64, num_warps=8, BLOCK=1024)


def native_dot(q: torch.Tensor, head_dim: int) -> bool:
    """Whether the Q.K passes multiply FP8 operands on FP8 tensor cores (compute capability >= 8.9, head dim
    >= 32, not the interpreter, KASCADE_FP8_DOT not 'upcast')."""
    mode = os.environ.get("KASCADE_FP8_DOT", "native")
    if mode not in ("native", "upcast"):
        raise ValueError(f"KASCADE_FP8_DOT: expected 'native' or 'upcast', got {mode!r}")
    return (mode == "native" and q.is_cuda and not UPCAST_DOT and head_dim >= 32
            and torch.cuda.get_device_capability(q.device) >= (8, 9))


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mass_terms(K, K8, K_S, q, q8, qs, lse8, b, h, kh, cpos, valid, mask, d, dmask, skb, skh, skn, sk8b, sk8h, sk8n,
                sksb, sksh, sksn, BT, s_bt, PAGE: tl.constexpr, PAGED_K: tl.constexpr, PAGED_C: tl.constexpr,
                qk_scale, UPCAST: tl.constexpr, NATIVE: tl.constexpr):
    """The exact and the FP8 attention-mass terms [ROWS] of a block of keys at cache positions cpos [BLOCK]
    (loaded where `valid`; counted where `mask` [BLOCK, ROWS] or [BLOCK, 1]), each normalised by lse8 [ROWS]:
    sum over the block of 2^(logit - lse8), with exact keys K (head kh) and with the copy K8, K_S (head h)."""
    koff = row_offsets(b, kh, cpos, valid, skb, skh, skn, BT, s_bt, PAGE, PAGED_K)
    kb = tl.load(K + koff[:, None] + d[None, :], mask=valid[:, None] & dmask, other=0.0)
    c8 = row_offsets(b, h, cpos, valid, sk8b, sk8h, sk8n, BT, s_bt, PAGE, PAGED_C)
    k8 = tl.load(K8 + c8[:, None] + d[None, :], mask=valid[:, None] & dmask, other=0.0)
    ks = tl.load(K_S + row_offsets(b, h, cpos, valid, sksb, sksh, sksn, BT, s_bt, PAGE, PAGED_C), mask=valid,
                 other=0.0)
    st = mma(kb, tl.trans(q), None, UPCAST) * qk_scale  # [BLOCK, ROWS]
    st8 = mma8(k8, tl.trans(q8), UPCAST, NATIVE) * (ks * qk_scale)[:, None] * qs[None, :]
    return (tl.sum(tl.where(mask, tl.exp2(st - lse8[None, :]), 0.0), 0),
            tl.sum(tl.where(mask, tl.exp2(st8 - lse8[None, :]), 0.0), 0))


@triton.jit
def _rerank_kernel(
    Q, Q8, QS, K, K8, K_S, KH, KV_START, KV_END, CAND, CNT_C, COUNTS, LSE_BUF, VALS, INDICES,
    sqb, sqh, sqm, s8b, s8h, s8m, sqsb, sqsh, sqsm,
    skb, skh, skn, sk8b, sk8h, sk8n, sksb, sksh, sksn, BT, s_bt, PAGE: tl.constexpr,
    scb, sch, scu, s_cnt, slb, slh, slu, svb, svh, svu, sib, sih, siu,
    qk_scale, u0, Q_LEN, N_CACHE,
    G: tl.constexpr, TILE: tl.constexpr, T_PAD: tl.constexpr, BLOCK_G: tl.constexpr, NUM_HG: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, NATIVE: tl.constexpr, HAS_KH: tl.constexpr, PAGED_K: tl.constexpr,
    PAGED_C: tl.constexpr, HAS_END: tl.constexpr,
):
    """INDICES[b, h, u, :COUNTS[b, u]] = the top of the CNT_C[b, u] candidates CAND[b, h, uu] by exact pooled
    score (module docstring); u = u0 + uu."""
    ROWS: tl.constexpr = BLOCK_G * T_PAD
    uu = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    u = u0 + uu
    s, n, p0, t = _tile_geometry(KV_START, KV_END, b, u, Q_LEN, N_CACHE, TILE, HAS_END)
    n_before = t * TILE
    kk = tl.load(COUNTS + b * s_cnt + u)
    kc = tl.load(CNT_C + b * s_cnt + u)
    C_row = CAND + b.to(tl.int64) * scb + h.to(tl.int64) * sch + uu.to(tl.int64) * scu
    O_row = INDICES + b.to(tl.int64) * sib + h.to(tl.int64) * sih + u.to(tl.int64) * siu
    if n_before < n:
        if kk >= kc:  # every candidate is kept (the tile selects all its keys)
            for j0 in range(0, kk, BLOCK):
                jj = j0 + tl.arange(0, BLOCK)
                tl.store(O_row + jj, tl.load(C_row + jj, mask=jj < kk, other=0), mask=jj < kk)
        else:
            if HAS_KH:
                kh = tl.load(KH + h).to(tl.int32)
            else:
                kh = h
            L_row = LSE_BUF + b.to(tl.int64) * slb + h.to(tl.int64) * slh + uu.to(tl.int64) * slu
            V_row = VALS + b.to(tl.int64) * svb + h.to(tl.int64) * svh + uu.to(tl.int64) * svu
            r = tl.arange(0, ROWS)
            d = tl.arange(0, BLOCK_D)
            dmask = d[None, :] < HEAD_DIM
            for hg in range(NUM_HG):
                q, ok, pos = _load_q_rows(Q, b, h, hg, t, n, p0, Q_LEN, sqb, sqh, sqm,
                                          G, TILE, T_PAD, BLOCK_G, HEAD_DIM, BLOCK_D)
                q8, _ok, _pos = _load_q_rows(Q8, b, h, hg, t, n, p0, Q_LEN, s8b, s8h, s8m,
                                             G, TILE, T_PAD, BLOCK_G, HEAD_DIM, BLOCK_D)
                qs = load_qs_rows(QS, b, h, hg, t, n, p0, Q_LEN, sqsb, sqsh, sqsm, G, TILE, T_PAD, BLOCK_G)
                lse8 = tl.load(L_row + hg * ROWS + r)
                a_ex = tl.zeros([ROWS], tl.float32)
                a_8 = tl.zeros([ROWS], tl.float32)
                for j0 in range(0, kc, BLOCK_N):
                    jj = j0 + tl.arange(0, BLOCK_N)
                    jm = jj < kc
                    kpos = tl.load(C_row + jj, mask=jm, other=0)
                    e, e8 = _mass_terms(K, K8, K_S, q, q8, qs, lse8, b, h, kh, kpos, jm, jm[:, None], d, dmask,
                                        skb, skh, skn, sk8b, sk8h, sk8n, sksb, sksh, sksn, BT, s_bt, PAGE,
                                        PAGED_K, PAGED_C, qk_scale, UPCAST, NATIVE)
                    a_ex += e
                    a_8 += e8
                # the diagonal tile's keys, causally: exact terms replace their FP8 ones too
                kpos = n_before + tl.arange(0, T_PAD)
                kok = (tl.arange(0, T_PAD) < TILE) & (kpos < n)
                causal = kok[:, None] & (kpos[:, None] <= pos[None, :])
                e, e8 = _mass_terms(K, K8, K_S, q, q8, qs, lse8, b, h, kh, s + kpos, kok, causal, d, dmask,
                                    skb, skh, skn, sk8b, sk8h, sk8n, sksb, sksh, sksn, BT, s_bt, PAGE,
                                    PAGED_K, PAGED_C, qk_scale, UPCAST, NATIVE)
                a_ex += e
                a_8 += e8
                lmix = lse8 + tl.log2(tl.maximum(1.0 - a_8, 0.0) + a_ex)
                tl.store(L_row + hg * ROWS + r, lmix)
            tl.debug_barrier()
            for j0 in range(0, kc, BLOCK_N):
                jj = j0 + tl.arange(0, BLOCK_N)
                jm = jj < kc
                kpos = tl.load(C_row + jj, mask=jm, other=0)
                koff = row_offsets(b, kh, kpos, jm, skb, skh, skn, BT, s_bt, PAGE, PAGED_K)
                kb = tl.load(K + koff[:, None] + d[None, :], mask=jm[:, None] & dmask, other=0.0)
                acc = tl.zeros([BLOCK_N], tl.float32)
                for hg2 in tl.static_range(NUM_HG):
                    qg, _ok2, _pos2 = _load_q_rows(Q, b, h, hg2, t, n, p0, Q_LEN, sqb, sqh, sqm,
                                                   G, TILE, T_PAD, BLOCK_G, HEAD_DIM, BLOCK_D)
                    lm = tl.load(L_row + hg2 * ROWS + r)
                    st = mma(kb, tl.trans(qg), None, UPCAST) * qk_scale
                    acc += tl.sum(tl.exp2(st - lm[None, :]), 1)
                tl.store(V_row + jj, acc.to(tl.int32, bitcast=True), mask=jm)
            tl.debug_barrier()
            _radix_select(V_row, C_row, kc, kk, O_row, 0, 0, True, BLOCK)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def _scale_rows(ks: torch.Tensor, paged: PagedKV | None = None) -> KVRows:
    """KVRows of the copy's scales: [B, S, N] contiguous, or [num_pages, page_size, S] sharing a cache's pages."""
    if paged is None:
        return KVRows(ks, ks.stride(0), ks.stride(1), ks.stride(2))
    return KVRows(ks, ks.stride(0), ks.stride(2), ks.stride(1), paged.block_table, paged.page_size)


def _supported(q, tile) -> bool:
    return (q.dtype in (torch.float16, torch.bfloat16) and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and tile <= MAX_TILE and q.shape[-1] <= MAX_HEAD_DIM and q.shape[2] > 1)


def select_fp8(q, key_copy, rho: float = 0.1, k_min: int = 128, tile: int = 32, kv_start=None, scale=None, *,
               kv_len=None, rerank: float | None = None, k=None, kv_heads=None,
               chunk_bytes: int = DEFAULT_POOL_BYTES, pool_cfg: dict | None = None):
    """Prefill selection of q's KV groups from the FP8 copy (module docstring; kascade.fp8keys.select).

    q [B, S * G, Q, D] (Q > 1); key_copy (keys [B, S, N, D] float8_e4m3fn, scales [B, S, N] float32);
    kv_start / kv_len as in kascade.kernels.prefill.select; rerank c >= 1 with k [B, Hkv, N, D], the exact
    keys (KV head kv_heads[h] for copy head h, default h). Falls back to the reference where the kernels do
    not apply (float32, Q == 1, tiles above 128, head dims above 256)."""
    k8, ks, kh = fp8keys.check_select_args(q, key_copy, rerank, k, kv_heads)
    if not _supported(q, tile):
        extra = {} if kv_len is None else {"kv_len": kv_len}
        return fp8keys.select(q, k8, ks, rho, k_min, tile, kv_start=kv_start, scale=scale, rerank=rerank, k=k,
                              kv_heads=kv_heads, **extra)
    _check_select_args(rho, k_min, tile, "threshold")
    kv_i32, kv_end, starts, lengths = _contiguous_spans(q, k8, kv_start, kv_len)
    krows = None
    if rerank is not None:
        fp8keys.check_rerank_keys(k, k8, q)
        krows = contiguous_rows(k)
    return _select(q, contiguous_rows(k8), _scale_rows(ks), krows, kh, kv_i32, kv_end, starts, lengths, rho, k_min,
                   tile, scale, chunk_bytes, rerank, pool_cfg)


def select_fp8_paged(q, cache: PagedKV, key_copy, rho: float = 0.1, k_min: int = 128, tile: int = 32, scale=None, *,
                     rerank: float | None = None, kv_heads=None, gather_keys: bool = True,
                     chunk_bytes: int = DEFAULT_POOL_BYTES, pool_cfg: dict | None = None) -> PrefillSelection:
    """`select_fp8` over a paged cache: key_copy (keys [num_pages, page_size, S, D] float8_e4m3fn, scales
    [num_pages, page_size, S]) shares the cache's pages; a re-rank reads cache.key_cache at the candidates
    (pages resolved in the kernel). gather_keys (default) copies the sequences' FP8 keys and scales into a
    contiguous scratch first, as kascade.kernels.prefill.select_paged does with the keys."""
    k8, ks, kh = fp8keys.check_select_args(q, key_copy, rerank, cache.key_cache, kv_heads, paged=True)
    if k8.shape[:2] != cache.key_cache.shape[:2] or q.dtype != cache.key_cache.dtype:
        raise ValueError(f"key_copy: expected pages {tuple(cache.key_cache.shape[:2])} like the cache and q of its "
                         f"dtype {cache.key_cache.dtype}, got keys {tuple(k8.shape)} and q {q.dtype}")
    if not _supported(q, tile):
        raise ValueError(f"q: select_fp8_paged needs a float16/bfloat16 prefill (Q > 1) on a Triton device with tile "
                         f"<= {MAX_TILE} and head dim <= {MAX_HEAD_DIM}, got {tuple(q.shape)} {q.dtype} on {q.device}")
    _check_select_args(rho, k_min, tile, "threshold")
    lengths = cache.host_lengths()
    bsz = q.shape[0]
    zeros = torch.zeros(bsz, dtype=torch.int32, device=q.device)
    copy = PagedKV(k8, None, cache.block_table, cache.seq_lens)
    if gather_keys:
        k8rows = contiguous_rows(gather_keys_of(copy, lengths))
        sc = PagedKV(ks.unsqueeze(-1), None, cache.block_table, cache.seq_lens)
        ksrows = _scale_rows(gather_keys_of(sc, lengths)[..., 0])
    else:
        k8rows, ksrows = copy.rows("key"), _scale_rows(ks, cache)
    krows = cache.rows("key") if rerank is not None else None
    ends = gathered_ends(cache, lengths, gather_keys)
    sel = _select(q, k8rows, ksrows, krows, kh, zeros, ends, (0,) * bsz, lengths, rho,
                  k_min, tile, scale, chunk_bytes, rerank, pool_cfg, cache.block_table, cache.page_size)
    sel.pool = resolve_rows(cache, sel.indices, sel.counts)
    return sel


def _select(q, k8rows: KVRows, ksrows: KVRows, krows: KVRows | None, kh, kv_i32, kv_end_i32, starts, lengths, rho,
            k_min, tile, scale, chunk_bytes, rerank, pool_cfg, block_table=None, page=1) -> PrefillSelection:
    """Selection of every local tile from the copy (k8rows, ksrows); with rerank, exact keys krows."""
    bsz, hq, qlen, d = q.shape
    hkv = k8rows.tensor.shape[2] if k8rows.paged else k8rows.tensor.shape[1]
    n_cache = k8rows.tensor.shape[2] if not k8rows.paged else 0
    g = hq // hkv
    sc = d ** -0.5 if scale is None else float(scale)
    first, ntiles = _host_meta(qlen, starts, lengths, tile)
    counts_h = _tile_counts(first, ntiles, tile, rho, k_min)
    cand_h = counts_h if rerank is None else _tile_counts(first, ntiles, tile, *fp8keys.candidate_budget(rho, k_min,
                                                                                                         rerank))
    u_max = counts_h.shape[1]
    k_max, kc_max = max(1, int(counts_h.max())), max(1, int(cand_h.max()))
    dev = q.device
    counts, counts_c = to_device(counts_h, counts_h.dtype, dev), to_device(cand_h, cand_h.dtype, dev)
    indices = torch.empty(bsz, hkv, u_max, k_max, dtype=torch.int32, device=dev)
    row_len = max(ft + nt - 1 for ft, nt in zip(first, ntiles)) * tile
    row_stride = max(32, triton.cdiv(row_len, 32) * 32)
    chunk = max(1, min(u_max, chunk_bytes // (bsz * hkv * row_stride * 4)))
    pooled = torch.empty(bsz, hkv, chunk, row_stride, dtype=torch.float32, device=dev)
    t_pad, block_g, num_hg = row_layout(g, tile, d)
    rows = block_g * t_pad
    if rerank is None:
        lse_buf = lse_scratch(bsz, hkv, chunk, g, tile, d, dev)
    else:
        lse_buf = torch.empty(bsz, hkv, chunk, num_hg * rows, dtype=torch.float32, device=dev)
        cand = torch.empty(bsz, hkv, chunk, kc_max, dtype=torch.int32, device=dev)
        vals = torch.empty_like(cand)
    scratch = topk_rows_scratch(bsz, hkv, chunk, dev)
    q8, qs = fp8keys.quantize(q)
    native = native_dot(q, d)
    fp8 = dict(qs=qs, ks=ksrows, native=native, final=counts if rerank is not None else None)
    for u0 in range(0, u_max, chunk):
        c = min(chunk, u_max - u0)
        pooled_scores_chunk(q8, k8rows, kv_i32, counts_c, pooled, lse_buf, u0, c, tile, sc, pool_cfg,
                            kv_end_i32=kv_end_i32, fp8=fp8)
        n_max = max(min(ft + u0 + c - 1, ft + nt - 1) for ft, nt in zip(first, ntiles)) * tile
        if rerank is None:
            topk_rows_chunk(pooled, indices, counts, kv_i32, scratch, u0, c, tile, qlen, n_cache, n_max,
                            kv_end_i32=kv_end_i32)
            continue
        topk_rows_chunk(pooled, cand, counts_c, kv_i32, scratch, u0, c, tile, qlen, n_cache, n_max,
                        kv_end_i32=kv_end_i32, out_u0=u0)
        _rerank_chunk(q, q8, qs, krows, k8rows, ksrows, kh, kv_i32, kv_end_i32, cand, counts_c, counts, lse_buf, vals,
                      indices, u0, c, tile, sc, n_cache, native)
    return PrefillSelection(indices, counts, to_device(first, torch.int64, dev), tile, False,
                            host_spans=(starts, lengths))


def _rerank_chunk(q, q8, qs, krows: KVRows, k8rows: KVRows, ksrows: KVRows, kh, kv_i32, kv_end_i32, cand, counts_c,
                  counts, lse_buf, vals, indices, u0, n_tiles, tile, sc, n_cache, native):
    bsz, hq, qlen, d = q.shape
    hkv = cand.shape[1]
    g = hq // hkv
    t_pad, block_g, num_hg = row_layout(g, tile, d)
    bt = krows.block_table if krows.paged else (k8rows.block_table if k8rows.paged else counts)
    page = krows.page if krows.paged else k8rows.page
    cfg = CONFIG
    _rerank_kernel[(n_tiles, hkv, bsz)](
        q, q8, qs, krows.tensor, k8rows.tensor, ksrows.tensor, kh if kh is not None else counts, kv_i32,
        kv_i32 if kv_end_i32 is None else kv_end_i32, cand, counts_c, counts, lse_buf, vals, indices,
        q.stride(0), q.stride(1), q.stride(2), q8.stride(0), q8.stride(1), q8.stride(2),
        qs.stride(0), qs.stride(1), qs.stride(2),
        krows.s_seq, krows.s_head, krows.s_tok, k8rows.s_seq, k8rows.s_head, k8rows.s_tok,
        ksrows.s_seq, ksrows.s_head, ksrows.s_tok, bt, bt.stride(0) if bt.dim() == 2 else 0, page,
        cand.stride(0), cand.stride(1), cand.stride(2), counts.stride(0),
        lse_buf.stride(0), lse_buf.stride(1), lse_buf.stride(2), vals.stride(0), vals.stride(1), vals.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        sc * LOG2E, u0, qlen, n_cache,
        G=g, TILE=tile, T_PAD=t_pad, BLOCK_G=block_g, NUM_HG=num_hg, HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=cfg["BLOCK_N"], BLOCK=cfg["BLOCK"], UPCAST=UPCAST_DOT,
        NATIVE=native, HAS_KH=kh is not None, PAGED_K=krows.paged, PAGED_C=k8rows.paged,
        HAS_END=kv_end_i32 is not None, num_warps=cfg["num_warps"],
    )
