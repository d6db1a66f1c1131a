"""Pooled post-softmax scores of prefill query tiles, in Gluon for Hopper: the two passes of
kascade.kernels.prefill_pool with the tensor cores running ahead of the exponentials.

Same result as `prefill_pool.pooled_scores_chunk` (module docstring there): per (tile, KV head,
sequence) one program stacks the G x T query rows of the tile into one matrix operand, then

    loop 1 (rows x keys):  running max and sum of exp2 -> the log-sum-exp of every row
    loop 2 (keys x rows):  exp2(s - lse) summed over the rows -> the pooled score of every key

Why a second kernel: in the Triton kernel each warp waits for its Q.K product before it starts the
exponentials of that product, so the tensor cores and the exp unit take turns (benchmarks/notes_prefill.md).
Here K blocks arrive by TMA into a ring of NBUF shared-memory buffers, and the product of block j + 1 is
issued asynchronously (wgmma) before the exponentials of block j, so the two overlap.

Measured (H200, Llama-3.1-8B shape, 128K; benchmarks/notes_prefill.md): 300.5 ms against 312.7 ms for
the Triton pass in the same run (the scale folded into the exponent; 307.4 ms rounding like the Triton
pass), the same selections on the benchmark's data; with one program per SM 329 ms. The overlap
inside a program buys about what the Triton kernel gets from two programs per SM.

Scope: CUDA devices of compute capability 9 (wgmma), bf16/fp16, a contiguous [B, Hkv, N, D] cache,
G x T_PAD == 64 or 128 stacked rows (one matrix tile of heads), D in (64, 128). `supported` says
whether a call qualifies; prefill.select uses it only when asked (CONFIG["pool_kernel"] == "gluon").
Gluon kernels do not run in Triton's CPU interpreter: the CPU suite covers the Triton kernel, and
tests/test_kernels_prefill.py checks this one against it on the GPU.
"""

from __future__ import annotations

import os

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA load was renamed after Triton 3.6 (async_copy_global_to_shared -> async_load), same arguments
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    HAS_GLUON = True
except ImportError:  # a Triton without Gluon: `supported` is always False
    HAS_GLUON = False

LOG2E = 1.4426950408889634


def supported(q: torch.Tensor, k: torch.Tensor, g: int, t_pad: int, num_hg: int, paged: bool) -> bool:
    """True when this kernel can take the call (module docstring, Scope)."""
    return (HAS_GLUON and q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and not paged
            and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and num_hg == 1 and g * t_pad in (64, 128) and q.shape[-1] in (64, 128)
            and k.is_contiguous() and q.stride(-1) == 1)


if HAS_GLUON:

    @gluon.jit
    def _load_block(k_desc, bars, k_smem, j, row0, nb, BLOCK_N: gl.constexpr, NBUF: gl.constexpr):
        """TMA of K rows [row0 + j * BLOCK_N, + BLOCK_N) into buffer j % NBUF, if j < nb."""
        buf = j % NBUF
        ok = j < nb
        mbarrier.expect(bars.index(buf), k_desc.block_type.nbytes, pred=ok)
        _tma_load(k_desc, [row0 + j * BLOCK_N, 0], bars.index(buf), k_smem.index(buf), pred=ok)

    @gluon.jit
    def _pool_gluon_kernel(Q, k_desc, KV_START, COUNTS, POOLED,
                           sqb, sqh, sqm, spb, sph, spu, scb,
                           qk_scale, u0, Q_LEN, N_CACHE, HKV,
                           G: gl.constexpr, TILE: gl.constexpr, T_PAD: gl.constexpr, D: gl.constexpr,
                           BLOCK_N: gl.constexpr, NBUF: gl.constexpr, FOLD: gl.constexpr, num_warps: gl.constexpr):
        ROWS: gl.constexpr = G * T_PAD
        uu = gl.num_programs(0) - 1 - gl.program_id(0)  # the longest tiles of the chunk first
        h = gl.program_id(1)
        b = gl.program_id(2)
        u = u0 + uu
        s = gl.load(KV_START + b).to(gl.int32)
        n = N_CACHE - s
        qv = gl.minimum(Q_LEN, n)
        p0 = n - qv
        t = p0 // TILE + u
        n_before = t * TILE
        kk = gl.load(COUNTS + b * scb + u)
        if (n_before < n) & (kk < n_before):
            kend = gl.minimum(n_before + TILE, n)
            row0 = (b * HKV + h) * N_CACHE + s  # first cache row of this sequence and KV head

            # the stacked query rows (row r: head r // T_PAD, position r % T_PAD) into shared memory
            ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
            r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld))
            d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
            i = r % T_PAD
            pos_l = t * TILE + i
            ok_l = (i < TILE) & (pos_l >= p0) & (pos_l < n)
            qoff = (b.to(gl.int64) * sqb + (h * G + r // T_PAD).to(gl.int64) * sqh
                    + (pos_l + (Q_LEN - n)).to(gl.int64) * sqm)
            qt = gl.load(Q + qoff[:, None] + d[None, :], mask=ok_l[:, None], other=0.0)
            q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, D], Q.dtype.element_ty)
            q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [ROWS, D], q_layout, qt)
            k_smem = gl.allocate_shared_memory(k_desc.dtype, [NBUF, BLOCK_N, D], k_desc.layout)
            gl.static_assert(NBUF >= 2)
            bars = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())  # loop 1
            bars2 = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())  # loop 2
            for j in gl.static_range(NBUF):
                mbarrier.init(bars.index(j), count=1)
                mbarrier.init(bars2.index(j), count=1)
            fence_async_shared()

            # loop 1: rows on the MMA's M side, keys [0, kend) in blocks; causal and length masks
            s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                               instr_shape=[16, BLOCK_N, 16])
            row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
            col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
            rr = gl.arange(0, ROWS, layout=row_l)
            pos = t * TILE + rr % T_PAD
            ok = ((rr % T_PAD) < TILE) & (pos >= p0) & (pos < n)
            cols = gl.arange(0, BLOCK_N, layout=col_l)
            zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
            m = gl.full([ROWS], float("-inf"), gl.float32, row_l)
            l = gl.zeros([ROWS], gl.float32, row_l)
            nb = (kend + BLOCK_N - 1) // BLOCK_N
            n_full = n_before // BLOCK_N  # blocks of keys that every row sees
            for jj in gl.static_range(NBUF):
                _load_block(k_desc, bars, k_smem, jj, row0, nb, BLOCK_N, NBUF)
            mbarrier.wait(bars.index(0), 0)
            tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            # Each step: the product of block j + 1 is issued, block j's is waited for (block j + 1's runs on
            # through the exponentials), and block j's buffer, free now, takes block j + NBUF.
            for j in range(n_full):  # keys every row sees: no mask
                buf = (j + 1) % NBUF
                mbarrier.wait(bars.index(buf), ((j + 1) // NBUF) & 1, pred=j + 1 < nb)
                tok_next = warpgroup_mma(q_smem, k_smem.index(buf).permute((1, 0)), zero_s, use_acc=False,
                                         is_async=True)
                acc = warpgroup_mma_wait(1, deps=[tok])
                _load_block(k_desc, bars, k_smem, j + NBUF, row0, nb, BLOCK_N, NBUF)
                if FOLD:  # the scale folded into the exponent's argument: one fma a score
                    m_new = gl.maximum(m, gl.max(acc, 1) * qk_scale)
                    l = l * gl.exp2(m - m_new) + gl.sum(gl.exp2(gl.fma(acc, qk_scale, -m_new[:, None])), 1)
                else:  # the Triton pass's arithmetic, rounding for rounding
                    sc = acc * qk_scale
                    m_new = gl.maximum(m, gl.max(sc, 1))
                    l = l * gl.exp2(m - m_new) + gl.sum(gl.exp2(sc - m_new[:, None]), 1)
                m = m_new
                tok = tok_next
            for j in range(n_full, nb):  # the last partial block before the tile and the diagonal block: masked
                buf = (j + 1) % NBUF
                mbarrier.wait(bars.index(buf), ((j + 1) // NBUF) & 1, pred=j + 1 < nb)
                tok_next = warpgroup_mma(q_smem, k_smem.index(buf).permute((1, 0)), zero_s, use_acc=False,
                                         is_async=True)
                sc = warpgroup_mma_wait(1, deps=[tok]) * qk_scale
                _load_block(k_desc, bars, k_smem, j + NBUF, row0, nb, BLOCK_N, NBUF)
                kn = j * BLOCK_N + cols
                sc = gl.where((kn[None, :] <= pos[:, None]) & (kn[None, :] < kend), sc, float("-inf"))
                m_new = gl.maximum(m, gl.max(sc, 1))
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                l = l * gl.exp2(m - m_safe) + gl.sum(gl.exp2(sc - m_safe[:, None]), 1)
                m = m_new
                tok = tok_next
            warpgroup_mma_wait(0, deps=[tok])  # the extra product issued by the last step
            lse = gl.where(ok, m + gl.log2(l), float("inf"))

            # loop 2: keys on the M side, keys [0, n_before): pooled[key] = sum over rows of exp2(s - lse)
            p_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                               instr_shape=[16, ROWS, 16])
            key_l: gl.constexpr = gl.SliceLayout(1, p_layout)
            lse_p = gl.convert_layout(lse, gl.SliceLayout(0, p_layout))
            zero_p = gl.zeros([BLOCK_N, ROWS], gl.float32, p_layout)
            keys = gl.arange(0, BLOCK_N, layout=key_l)
            P_row = POOLED + b.to(gl.int64) * spb + h.to(gl.int64) * sph + uu.to(gl.int64) * spu
            nb2 = (n_before + BLOCK_N - 1) // BLOCK_N
            for jj in gl.static_range(NBUF):
                _load_block(k_desc, bars2, k_smem, jj, row0, nb2, BLOCK_N, NBUF)
            mbarrier.wait(bars2.index(0), 0)
            tok = warpgroup_mma(k_smem.index(0), q_smem.permute((1, 0)), zero_p, use_acc=False, is_async=True)
            for j in range(nb2):  # the same steps as loop 1
                buf = (j + 1) % NBUF
                mbarrier.wait(bars2.index(buf), ((j + 1) // NBUF) & 1, pred=j + 1 < nb2)
                tok_next = warpgroup_mma(k_smem.index(buf), q_smem.permute((1, 0)), zero_p, use_acc=False,
                                         is_async=True)
                acc = warpgroup_mma_wait(1, deps=[tok])
                _load_block(k_desc, bars2, k_smem, j + NBUF, row0, nb2, BLOCK_N, NBUF)
                kn = j * BLOCK_N + keys
                if FOLD:
                    e = gl.exp2(gl.fma(acc, qk_scale, -lse_p[None, :]))
                else:
                    e = gl.exp2(acc * qk_scale - lse_p[None, :])
                gl.store(P_row + kn, gl.sum(e, 1), mask=kn < n_before)
                tok = tok_next
            warpgroup_mma_wait(0, deps=[tok])
            for j in gl.static_range(NBUF):
                mbarrier.invalidate(bars.index(j))
                mbarrier.invalidate(bars2.index(j))


def pooled_scores_chunk(q, k, kv_start_i32, counts, pooled, u0: int, n_tiles: int, tile: int, scale: float,
                        block_n: int = 128, nbuf: int = 2, num_warps: int | None = None, maxnreg: int | None = 128,
                        fold: bool = True):
    """prefill_pool.pooled_scores_chunk for the calls `supported` accepts: pooled[:, :, :n_tiles, :tT].

    Defaults: the fastest setting measured (H200, 128K; results/history/prefill_variants_h200_v6-v7.json):
    128-key blocks, two K buffers, registers capped at 128 so that two programs share an SM, the scale
    folded into the exponent.
    fold: the scale folded into the exponent's argument (one fma a score instead of a multiply and a
    subtraction); rounds differently from the Triton pass, so near-tie selections may differ."""
    from kascade.kernels.prefill_pool import row_layout

    bsz, hq, qlen, d = q.shape
    hkv, n_cache = k.shape[1], k.shape[2]
    g = hq // hkv
    t_pad, block_g, num_hg = row_layout(g, tile, d)
    if num_warps is None:  # the MMA tiles the rows over the warps in 16-row steps: 8 warps need 128 rows
        num_warps = 8 if g * t_pad >= 128 else 4
    gd = gl.bfloat16 if k.dtype == torch.bfloat16 else gl.float16
    k2 = k.view(bsz * hkv * n_cache, d)
    layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gd)
    desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_n, d], layout)
    _pool_gluon_kernel[(n_tiles, hkv, bsz)](
        q, desc, kv_start_i32, counts, pooled,
        q.stride(0), q.stride(1), q.stride(2), pooled.stride(0), pooled.stride(1), pooled.stride(2), counts.stride(0),
        float(scale) * LOG2E, u0, qlen, n_cache, hkv,
        G=g, TILE=tile, T_PAD=t_pad, D=d, BLOCK_N=block_n, NBUF=nbuf, FOLD=bool(fold), num_warps=num_warps,
        **({} if maxnreg is None else {"maxnreg": maxnreg}))
