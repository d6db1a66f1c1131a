"""Batched exact top-k of the pooled score rows of prefill tiles (the second half of anchor selection).

Row (b, h, u) holds the n = tT pooled scores of local tile u (all >= 0, float32) and keeps the
k = counts[b, u] largest. For x >= 0 the int32 bit pattern of a float32 orders like the value, so
every comparison below is on int32 bits. One program per row:

    k >= n      write every position 0 .. n-1
    n <= CAP    radix select on the row itself (below)
    otherwise   1. sample SAMPLE scores at a fixed stride, sort them, and take NT thresholds around the
                   sample's k-th largest (spread over about +-4 standard deviations of its rank);
                2. one pass counts the keys >= each threshold, which brackets the k-th largest score
                   in [lo, hi) with count(>= hi) < k <= count(>= lo);
                3. if the bracket holds at most CAP keys, one pass writes the keys >= hi to the output
                   and compacts the bracket's keys (bits and positions) into a scratch list, and the
                   radix select finishes on that list; else (rare) the radix select runs on the row.

Radix select of the k_rem largest of a list: four 256-bin histograms of the bits 31..24, 23..16,
15..8, 7..0 of the keys that match the digits chosen so far give the exact k-th largest bit pattern
thr; a last pass writes the keys > thr and the first k_rem - count(> thr) keys == thr in list order
(so ties go to the lowest positions: the result is deterministic).

Two to three reads of the row in the common case, against a full sort-based torch.topk. Output
slots [0, k) hold absolute cache positions (s + position), in no particular order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kascade.kernels.paging import seq_span


# ----------------------------------------------------------------------------------------------
# inner pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def _radix_select(VALS, POSS, n_src, k_rem, OUT, out_off, s, HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    """Write the positions of the k_rem largest of VALS[0:n_src] (int32 bits of floats >= 0) to OUT[out_off:].

    Positions are POSS[i] when HAS_POS, else i; s is added to each.
    """
    prefix = tl.zeros([], tl.int32)
    pmask = tl.zeros([], tl.int32)
    want = k_rem
    bins = tl.arange(0, 256)
    for d in tl.static_range(4):
        SHIFT = 24 - 8 * d
        hist = tl.zeros([256], tl.int32)
        for start in range(0, n_src, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n_src
            x = tl.load(VALS + offs, mask=valid, other=0)
            match = valid & ((x & pmask) == prefix)
            hist += tl.histogram((x >> SHIFT) & 255, 256, mask=match)
        # suffix counts: keys matching the prefix whose digit is >= bin
        suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        dsel = tl.max(tl.where(suffix >= want, bins, 0), 0)
        want = want - tl.sum(tl.where(bins > dsel, hist, 0), 0)
        prefix = prefix | (dsel << SHIFT)
        pmask = pmask | (tl.full([], 255, tl.int32) << SHIFT)
    thr = prefix
    off = out_off
    eq_seen = tl.zeros([], tl.int32)
    for start in range(0, n_src, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n_src
        x = tl.load(VALS + offs, mask=valid, other=-1)
        gt = (valid & (x > thr)).to(tl.int32)
        eq = (valid & (x == thr)).to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(eq, 0) - eq
        take = (gt | (eq & (eq_rank < want).to(tl.int32))).to(tl.int32)
        slot = off + tl.cumsum(take, 0) - take
        if HAS_POS:
            p = tl.load(POSS + offs, mask=valid, other=0)
        else:
            p = offs
        tl.store(OUT + slot, s + p, mask=take != 0)
        off += tl.sum(take, 0)
        eq_seen += tl.sum(eq, 0)


@triton.jit
def _pick(vec, j, at, default):
    """vec[at] for a scalar index at (default when at is outside [0, len))."""
    return tl.where((at >= 0) & (at < vec.shape[0]), tl.sum(tl.where(j == at, vec, 0), 0), default)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["sib", "sih", "siu", "scb", "u0", "Q_LEN", "N_CACHE", "OUT_U0"])  # lengths
def _topk_rows_kernel(
    POOLED, INDICES, COUNTS, KV_START, KV_END, SCRATCH,
    spb, sph, spu,
    sib, sih, siu,
    scb,
    ssb, ssh, ssu,
    u0, Q_LEN, N_CACHE,
    TILE: tl.constexpr, CAP: tl.constexpr, SAMPLE: tl.constexpr, NT: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, HAS_END: tl.constexpr, OUT_U0=0,
):
    """INDICES[b, h, u - OUT_U0, :counts[b, u]] = top positions of POOLED[b, h, u - u0, :tT] (absolute, + kv_start[b])."""
    tl.static_assert(SAMPLE <= CAP)
    uu = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    u = u0 + uu
    s, n_seq = seq_span(b, KV_START, KV_END, N_CACHE, HAS_END)
    p0 = n_seq - tl.minimum(Q_LEN, n_seq)
    t = p0 // TILE + u
    n = t * TILE
    kk = tl.load(COUNTS + b * scb + u)
    OUT = INDICES + b.to(tl.int64) * sib + h.to(tl.int64) * sih + (u - OUT_U0).to(tl.int64) * siu
    ROW = POOLED + b.to(tl.int64) * spb + h.to(tl.int64) * sph + uu.to(tl.int64) * spu
    if n < n_seq:  # the tile exists in this sequence
        if kk >= n:
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                tl.store(OUT + offs, s + offs, mask=offs < n)
        elif n <= CAP:
            _radix_select(ROW, ROW, n, kk, OUT, 0, s, False, BLOCK)
        else:
            # 1. thresholds from a strided sample, around the sample's k-th largest
            stride = n // SAMPLE
            js = tl.arange(0, SAMPLE)
            xs = tl.sort(tl.load(ROW + js.to(tl.int64) * stride + stride // 2))  # ascending bits
            rank_top = kk.to(tl.float32) * SAMPLE / n.to(tl.float32)
            sigma = tl.sqrt(rank_top * (1.0 - rank_top / SAMPLE)) + 1.0
            spacing = tl.maximum(8.0 * sigma / NT, 1.0)
            jt = tl.arange(0, NT)
            at = (SAMPLE - rank_top) + (jt.to(tl.float32) - (NT - 1) / 2.0) * spacing
            at = tl.minimum(tl.maximum(at + 0.5, 0.0), SAMPLE - 1.0).to(tl.int32)
            thr = tl.sum(tl.where(js[None, :] == at[:, None], xs[None, :], 0), 1)  # [NT] non-decreasing
            # 2. count the keys >= each threshold
            acc = tl.zeros([BLOCK_C, NT], tl.int32)
            for start in range(0, n, BLOCK_C):
                offs = start + tl.arange(0, BLOCK_C)
                x = tl.load(ROW + offs, mask=offs < n, other=-1)
                acc += (x[:, None] >= thr[None, :]).to(tl.int32)
            cnt = tl.sum(acc, 0)  # non-increasing
            a = tl.sum((cnt >= kk).to(tl.int32), 0) - 1  # last threshold with count >= k (-1: none)
            lo = _pick(thr, jt, a, -1)
            hi = _pick(thr, jt, a + 1, 2147483647)
            n_lo = _pick(cnt, jt, a, n)
            n_sure = _pick(cnt, jt, a + 1, 0)
            n_cand = n_lo - n_sure
            if n_cand <= CAP:
                # 3. keys >= hi go straight out; keys in [lo, hi) to the scratch list, in position order
                SV = SCRATCH + b.to(tl.int64) * ssb + h.to(tl.int64) * ssh + uu.to(tl.int64) * ssu
                SP = SV + CAP
                o_sure = tl.zeros([], tl.int32)
                o_cand = tl.zeros([], tl.int32)
                for start in range(0, n, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    valid = offs < n
                    x = tl.load(ROW + offs, mask=valid, other=-1)
                    sure = (valid & (x >= hi)).to(tl.int32)
                    cand = (valid & (x >= lo) & (x < hi)).to(tl.int32)
                    tl.store(OUT + o_sure + tl.cumsum(sure, 0) - sure, s + offs, mask=sure != 0)
                    slot = o_cand + tl.cumsum(cand, 0) - cand
                    tl.store(SV + slot, x, mask=cand != 0)
                    tl.store(SP + slot, offs, mask=cand != 0)
                    o_sure += tl.sum(sure, 0)
                    o_cand += tl.sum(cand, 0)
                tl.debug_barrier()
                _radix_select(SV, SP, n_cand, kk - n_sure, OUT, n_sure, s, True, BLOCK)
            else:
                _radix_select(ROW, ROW, n, kk, OUT, 0, s, False, BLOCK)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

CAP = 4096
NT = 8


def sample_size(n_max: int) -> int:
    """Sample of the threshold estimate: larger for longer rows so the bracket stays under CAP keys."""
    if n_max <= 32768:
        return 1024
    if n_max <= 131072:
        return 2048
    return 4096


def topk_rows_scratch(bsz: int, hkv: int, chunk: int, device, cap: int = CAP) -> torch.Tensor:
    """Scratch of the bracket lists: [B, Hkv, C, 2 * cap] int32 (bits, then positions)."""
    return torch.empty(bsz, hkv, chunk, 2 * cap, dtype=torch.int32, device=device)


def topk_rows_chunk(pooled, indices, counts, kv_start_i32, scratch, u0: int, n_tiles: int, tile: int,
                    q_len: int, n_cache: int, n_max: int, *, cap: int = CAP, sample: int | None = None,
                    nt: int = NT, block: int = 1024, block_c: int = 512, num_warps: int = 8, kv_end_i32=None,
                    out_u0: int = 0):
    """indices[:, :, u0:u0+n_tiles, :k] from pooled[:, :, :n_tiles] (float32, read as int32 bits).

    pooled [B, Hkv, C, >= n_max] float32 >= 0, indices [B, Hkv, U, Kmax] int32, counts [B, U] int32,
    kv_start_i32 [B], scratch from topk_rows_scratch(cap=cap). n_cache: the cache length N;
    kv_end_i32 [B] or None: each sequence's end of keys (N when None; a paged cache's seq_lens);
    n_max: the longest row of the chunk (sizes the threshold sample unless sample is given).
    out_u0: local tile u is written to indices[:, :, u - out_u0] (a buffer of the chunk's tiles only).
    """
    bsz, hkv = pooled.shape[0], pooled.shape[1]
    bits = pooled.view(torch.int32)
    sample = min(cap, sample_size(n_max) if sample is None else sample)
    if scratch.shape[-1] < 2 * cap:
        raise ValueError(f"scratch: expected a last dim >= {2 * cap}, got {tuple(scratch.shape)}")
    grid = (n_tiles, hkv, bsz)
    _topk_rows_kernel[grid](
        bits, indices, counts, kv_start_i32, kv_start_i32 if kv_end_i32 is None else kv_end_i32, scratch,
        bits.stride(0), bits.stride(1), bits.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0),
        scratch.stride(0), scratch.stride(1), scratch.stride(2),
        u0, q_len, n_cache,
        TILE=tile, CAP=cap, SAMPLE=sample, NT=nt, BLOCK=block, BLOCK_C=min(block, block_c),
        HAS_END=kv_end_i32 is not None, OUT_U0=out_u0, num_warps=num_warps,
    )
