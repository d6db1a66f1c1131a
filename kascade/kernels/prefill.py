"""Triton kernels for Kascade prefill (Q > 1 queries): anchor selection and sparse attention.

    select(q, k, rho, k_min, tile, kv_start=None, scale=None) -> PrefillSelection (a Selection)
    sparse_attention(q, k, v, selection, head_map=None, kv_start=None, scale=None) -> [B, Hq, Q, Dv]
    select_paged(q, cache, ...), sparse_attention_paged(q, cache, selection, ...): the same over a
    paged cache (kascade.kernels.paging.PagedKV: pages resolved inside the kernels)

Same signatures and semantics as `kascade.reference.select` / `sparse_attention` (see that module for
the layout: q [B, Hq, Q, D], k/v [B, Hkv, N, D], kv_start [B] left padding; tiles of T positions
counted from each sequence's start, so a chunk on top of a cache tiles like the whole prompt).

Sparse attention (reuse layers, and the anchor's own output): one program per (local tile, group of
query heads, KV head, sequence) stacks the BLOCK_G x T query rows that share the KV head into one
matrix operand (4 x 32 = 128 rows for Llama-3.1-8B), gathers the mapped anchor head's selected K/V
rows by int32 position, BLOCK_K at a time, then the tile's own keys causally, with an online
softmax. Programs are ordered tile-fastest (longest tiles first) so the tiles of one head run
together and share the K/V rows of their overlapping selections in L2.

Selection: kascade.kernels.prefill_pool (pooled post-softmax scores of every tile, two flash-style
passes) then kascade.kernels.prefill_topk (exact top-k of each pooled row by a sampled threshold
bracket and a radix select), chunk by chunk over the tiles so the pooled scores never exceed
`chunk_bytes` (default 1 GiB): extra memory is O(chunk x N), not O(N^2 / T).

Memory of the returned selection: indices [B, Hkv, U, Kmax] int32 with U = ceil(Q / T) (+1 for a
partial first tile) and Kmax = k(T * (U - 1)) ~ rho * N, i.e. about 4 * Hkv * rho * N^2 / T bytes
per sequence: 1.7 GB at 128K and 27.5 GB at 512K (Llama-3.1-8B shapes, rho = 0.1), which fits one
80 GB GPU next to q, k, v and the output.

Falls back to the reference for float32 inputs, tiles above 128 and head dims above 256.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kascade import reference
from kascade.budget import budget_tensor, check_budget
from kascade.checks import check_attention_inputs, check_head_map, resolve_kv_start
from kascade.host import to_device
from kascade.kernels import prefill_pool_gluon
from kascade.kernels.prefill_pool import LOG2E, UPCAST_DOT, lse_scratch, mma, pooled_scores_chunk, row_layout
from kascade.kernels.paging import (
    KVRows, PagedKV, PoolRows, check_paged_q, contiguous_rows, resolve_rows, row_offsets, seq_span,
)
from kascade.kernels.paging import gather_keys as gather_keys_of
from kascade.kernels.paging import gathered_ends
from kascade.kernels.prefill_topk import topk_rows_chunk, topk_rows_scratch

DEFAULT_POOL_BYTES = 2**30
MAX_TILE = 128
MAX_HEAD_DIM = 256
# Tests set this to fill the selection and the pooled scores with garbage before the kernels run.
POISON_BUFFERS = False
# The pooled-score kernel of the selection: "triton" (kascade.kernels.prefill_pool, every case) or "gluon"
# (kascade.kernels.prefill_pool_gluon where it applies, else triton); pool_cfg={"kernel": ...} overrides it.
POOL_KERNEL = os.environ.get("KASCADE_PREFILL_POOL", "triton")


@dataclass
class PrefillSelection(reference.Selection):
    """A Selection that also remembers, on the host, the (starts, lengths) it was made for (saves a sync),
    and over a paged cache its positions resolved to pool rows (kascade.kernels.paging.PoolRows)."""

    host_spans: tuple = ()
    pool: PoolRows | None = None


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _online_update(q, kb, vb, valid, m, l, acc, qk_scale, UPCAST: tl.constexpr):
    """One block of the online softmax: scores q kb^T (invalid entries -inf), acc += p vb."""
    sc = mma(q, tl.trans(kb), None, UPCAST) * qk_scale
    sc = tl.where(valid, sc, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(sc - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = mma(p.to(vb.dtype), vb, acc * alpha[:, None], UPCAST)
    return m_new, l, acc


@triton.jit(do_not_specialize=["sib", "sih", "siu", "scb", "U_RUN", "Q_LEN", "N_CACHE"])  # lengths
def _sparse_prefill_kernel(
    Q, K, V, O, IDX, COUNTS, KV_START, KV_END, HEAD_MAP,
    sqb, sqh, sqm,
    skb, skh, skn, BT, s_bt, PAGE: tl.constexpr,
    svb, svh, svn,
    sob, soh, som,
    sib, sih, siu,
    scb,
    qk_scale, U_RUN, Q_LEN, N_CACHE,
    G: tl.constexpr, TILE: tl.constexpr, T_PAD: tl.constexpr, BLOCK_G: tl.constexpr, NUM_HG: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr, HAS_END: tl.constexpr,
    IDX_POOL: tl.constexpr = False,
):
    """O rows of local tile u, heads h*G + hg*BLOCG_G + [0, BLOCK_G): selected keys, then the diagonal tile."""
    tl.static_assert(T_PAD >= TILE)
    ROWS: tl.constexpr = BLOCK_G * T_PAD
    pid = tl.program_id(0)
    u = U_RUN - 1 - pid // NUM_HG
    hg = pid % NUM_HG
    h = tl.program_id(1)
    b = tl.program_id(2)
    s, n = seq_span(b, KV_START, KV_END, N_CACHE, HAS_END)
    p0 = n - tl.minimum(Q_LEN, n)
    t = p0 // TILE + u
    if t * TILE < n:
        r = tl.arange(0, ROWS)
        g = hg * BLOCK_G + r // T_PAD
        i = r % T_PAD
        pos = t * TILE + i
        row_ok = (i < TILE) & (g < G) & (pos >= p0) & (pos < n)
        qrow = (pos + (Q_LEN - n)).to(tl.int64)
        hq = (h * G + g).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        dmask = d[None, :] < HEAD_DIM
        dvmask = dv[None, :] < HEAD_DIM_V
        q = tl.load(Q + b.to(tl.int64) * sqb + hq[:, None] * sqh + qrow[:, None] * sqm + d[None, :],
                    mask=row_ok[:, None] & dmask, other=0.0)
        hm = tl.load(HEAD_MAP + h)
        I_row = IDX + b.to(tl.int64) * sib + hm.to(tl.int64) * sih + u.to(tl.int64) * siu
        cnt = tl.load(COUNTS + b * scb + u)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
        # selected keys (absolute cache positions)
        for j0 in range(0, cnt, BLOCK_K):
            jj = j0 + tl.arange(0, BLOCK_K)
            jm = jj < cnt
            kidx = tl.load(I_row + jj, mask=jm, other=0)
            if IDX_POOL:  # rows of the page pool, resolved once by the anchor
                koff = row_offsets(b, h, kidx, jm, 0, skh, skn, BT, s_bt, PAGE, False)
                voff = row_offsets(b, h, kidx, jm, 0, svh, svn, BT, s_bt, PAGE, False)
            else:
                koff = row_offsets(b, h, kidx, jm, skb, skh, skn, BT, s_bt, PAGE, PAGED)
                voff = row_offsets(b, h, kidx, jm, svb, svh, svn, BT, s_bt, PAGE, PAGED)
            kb = tl.load(K + koff[:, None] + d[None, :], mask=jm[:, None] & dmask, other=0.0)
            vb = tl.load(V + voff[:, None] + dv[None, :], mask=jm[:, None] & dvmask, other=0.0)
            m, l, acc = _online_update(q, kb, vb, jm[None, :], m, l, acc, qk_scale, UPCAST)
        # the diagonal tile, causally
        kpos = t * TILE + tl.arange(0, T_PAD)
        kok = (tl.arange(0, T_PAD) < TILE) & (kpos < n)
        koff = row_offsets(b, h, s + kpos, kok, skb, skh, skn, BT, s_bt, PAGE, PAGED)
        voff = row_offsets(b, h, s + kpos, kok, svb, svh, svn, BT, s_bt, PAGE, PAGED)
        kb = tl.load(K + koff[:, None] + d[None, :], mask=kok[:, None] & dmask, other=0.0)
        vb = tl.load(V + voff[:, None] + dv[None, :], mask=kok[:, None] & dvmask, other=0.0)
        causal = kok[None, :] & (kpos[None, :] <= pos[:, None])
        m, l, acc = _online_update(q, kb, vb, causal, m, l, acc, qk_scale, UPCAST)
        out = acc / l[:, None]
        tl.store(O + b.to(tl.int64) * sob + hq[:, None] * soh + qrow[:, None] * som + dv[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & dvmask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def _supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, tile: int) -> bool:
    import os

    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    dv = v.shape[-1] if v is not None else q.shape[-1]
    return tile <= MAX_TILE and q.shape[-1] <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _host_meta(qlen: int, starts: tuple, lengths: tuple, tile: int):
    """Per sequence (host ints): first tile and number of local tiles of the queries."""
    first, ntiles = [], []
    for s, n in zip(starts, lengths):
        qv = min(qlen, n)
        p0 = n - qv
        first.append(p0 // tile)
        ntiles.append((p0 + qv - 1) // tile - p0 // tile + 1)
    return tuple(first), tuple(ntiles)


def _contiguous_spans(q, k, kv_start, kv_len):
    """(kv_start [B] int32 and kv_end [B] int32 or None on device, host starts, host lengths)."""
    kv_t = resolve_kv_start(kv_start, q, k)
    bsz, n_cache = q.shape[0], k.shape[2]
    starts = (0,) * bsz if kv_start is None else tuple(int(x) for x in kv_t.tolist())
    if kv_len is None:
        return kv_t.to(torch.int32), None, starts, tuple(n_cache - s for s in starts)
    end = torch.as_tensor(kv_len, device=q.device)
    if end.shape != (bsz,) or end.dtype.is_floating_point:
        raise ValueError(f"kv_len: expected an integer tensor of shape ({bsz},), got {tuple(end.shape)} {end.dtype}")
    ends = tuple(int(x) for x in end.tolist())
    for b, (s, e) in enumerate(zip(starts, ends)):
        if not s < e <= n_cache:
            raise ValueError(f"kv_len: expected kv_start[b] < kv_len[b] <= {n_cache} (the cache length), "
                             f"got kv_len {e} and kv_start {s} for sequence {b}")
    return kv_t.to(torch.int32), end.to(torch.int32), starts, tuple(e - s for s, e in zip(starts, ends))


def _tile_counts(first, ntiles, tile: int, rho: float, k_min: int) -> torch.Tensor:
    """counts [B, U] int32 (host): k(tT) of every local tile, 0 past a sequence's last tile."""
    u_max = max(ntiles)
    u = torch.arange(u_max)
    ft = torch.tensor(first)[:, None]
    counts = budget_tensor((ft + u) * tile, rho, k_min)
    return torch.where(u[None, :] < torch.tensor(ntiles)[:, None], counts, 0).to(torch.int32)


def _check_select_args(rho, k_min, tile, method):
    check_budget(rho, k_min)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    if method not in ("threshold", "torch"):
        raise ValueError(f"method: expected 'threshold' or 'torch', got {method!r}")


def select(q, k, rho: float = 0.1, k_min: int = 128, tile: int = 32, kv_start=None, scale=None, *,
           kv_len=None, chunk_bytes: int = DEFAULT_POOL_BYTES, method: str = "threshold",
           pool_cfg: dict | None = None) -> reference.Selection:
    """Anchor-layer prefill top-k (see kascade.reference.select).

    chunk_bytes bounds the pooled-score buffer [B, Hkv, C, N] float32 (C tiles at a time).
    method: "threshold" (the kernel of kascade.kernels.prefill_topk) or "torch" (torch.topk on the
    pooled rows; for comparison). pool_cfg overrides the pooled-score kernel's launch parameters.
    kv_len [B] (a preallocated cache): keys at positions >= kv_len[b] are not written yet.
    """
    check_attention_inputs(q, k, None)
    _check_select_args(rho, k_min, tile, method)
    if q.shape[2] == 1 or not _supported(q, k, None, tile):
        extra = {} if kv_len is None else {"kv_len": kv_len}
        return reference.select(q, k, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start, scale=scale, **extra)
    kv_i32, kv_end, starts, lengths = _contiguous_spans(q, k, kv_start, kv_len)
    return _select(_last_dim_contiguous(q), contiguous_rows(k), kv_i32, kv_end, starts, lengths,
                   rho, k_min, tile, scale, chunk_bytes, method, pool_cfg)


def select_paged(q, cache: PagedKV, rho: float = 0.1, k_min: int = 128, tile: int = 32, scale=None, *,
                 gather_keys: bool = True, chunk_bytes: int = DEFAULT_POOL_BYTES, method: str = "threshold",
                 pool_cfg: dict | None = None) -> PrefillSelection:
    """`select` over a paged cache (kascade.kernels.paging.PagedKV).

    q [B, Hq, Q, D]: the queries of sequence b are its last min(Q, seq_lens[b]) positions, in the last
    rows of q (earlier rows are ignored). Selected positions count from 0 in every sequence; they
    are also resolved to pool rows once here, for the reuse layers.

    gather_keys=True (default): the sequences' keys are first copied into a contiguous scratch
    [B, Hkv, max(seq_lens), D] (one read and write of the keys, against about Q / 16 reads of them by
    the two pooled-score passes) and the contiguous kernels run on it. gather_keys=False: no scratch;
    the passes resolve each key's page themselves, which measured 1.8-1.9x the contiguous time at
    128K on an H200 (benchmarks/results/paged_h200.md).
    """
    check_paged_q(q, cache)
    _check_select_args(rho, k_min, tile, method)
    if q.shape[2] == 1 or not _supported(q, cache.key_cache, None, tile):
        raise ValueError(f"q: select_paged needs a float16/bfloat16 prefill (Q > 1) on a Triton device with "
                         f"tile <= {MAX_TILE} and head dim <= {MAX_HEAD_DIM}, got {tuple(q.shape)} {q.dtype} "
                         f"on {q.device}, tile {tile}")
    lengths = cache.host_lengths()
    zeros = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
    krows = contiguous_rows(gather_keys_of(cache, lengths)) if gather_keys else cache.rows("key")
    sel = _select(_last_dim_contiguous(q), krows, zeros, gathered_ends(cache, lengths, gather_keys),
                  (0,) * q.shape[0], lengths, rho, k_min, tile, scale, chunk_bytes, method, pool_cfg)
    sel.pool = resolve_rows(cache, sel.indices, sel.counts)
    return sel


def _select(q, krows: KVRows, kv_i32, kv_end_i32, starts, lengths, rho, k_min, tile, scale, chunk_bytes,
            method, pool_cfg):
    """Selection of every local tile; krows addresses the key cache (contiguous or paged)."""
    bsz, hq, qlen, d = q.shape
    hkv = krows.tensor.shape[1] if not krows.paged else krows.tensor.shape[2]
    n_cache = krows.tensor.shape[2] if not krows.paged else 0
    sc = d ** -0.5 if scale is None else float(scale)
    first, ntiles = _host_meta(qlen, starts, lengths, tile)
    counts_h = _tile_counts(first, ntiles, tile, rho, k_min)
    u_max = counts_h.shape[1]
    k_max = max(1, int(counts_h.max()))
    dev = q.device
    counts = to_device(counts_h, counts_h.dtype, dev)
    indices = torch.empty(bsz, hkv, u_max, k_max, dtype=torch.int32, device=dev)
    if POISON_BUFFERS:
        indices.fill_(-7)
    # the longest row any tile pools: keys before the last tile
    row_len = max(ft + nt - 1 for ft, nt in zip(first, ntiles)) * tile
    row_stride = max(32, triton.cdiv(row_len, 32) * 32)
    chunk = max(1, min(u_max, chunk_bytes // (bsz * hkv * row_stride * 4)))
    pooled = torch.empty(bsz, hkv, chunk, row_stride, dtype=torch.float32, device=dev)
    if POISON_BUFFERS:
        pooled.fill_(float("nan"))
    lse_buf = lse_scratch(bsz, hkv, chunk, hq // hkv, tile, d, dev)
    scratch = topk_rows_scratch(bsz, hkv, chunk, dev) if method == "threshold" else None
    pool_cfg = dict(pool_cfg or {})
    kernel = pool_cfg.pop("kernel", POOL_KERNEL)
    if kernel not in ("triton", "gluon"):
        raise ValueError(f"pool kernel (KASCADE_PREFILL_POOL or pool_cfg['kernel']): expected 'triton' or 'gluon', "
                         f"got {kernel!r}")
    t_pad, _, num_hg = row_layout(hq // hkv, tile, d)
    gluon = (kernel == "gluon" and kv_end_i32 is None
             and prefill_pool_gluon.supported(q, krows.tensor, hq // hkv, t_pad, num_hg, krows.paged))
    for u0 in range(0, u_max, chunk):
        c = min(chunk, u_max - u0)
        if gluon:
            prefill_pool_gluon.pooled_scores_chunk(q, krows.tensor, kv_i32, counts, pooled, u0, c, tile, sc,
                                                   **{k.lower(): v for k, v in pool_cfg.items()})
        else:
            pooled_scores_chunk(q, krows, kv_i32, counts, pooled, lse_buf, u0, c, tile, sc, pool_cfg or None,
                                kv_end_i32=kv_end_i32)
        n_max = max(min(ft + u0 + c - 1, ft + nt - 1) for ft, nt in zip(first, ntiles)) * tile
        if method == "threshold":
            topk_rows_chunk(pooled, indices, counts, kv_i32, scratch, u0, c, tile, qlen, n_cache, n_max,
                            kv_end_i32=kv_end_i32)
        else:
            _torch_topk_chunk(pooled, indices, counts_h, starts, first, u0, c, tile, n_max)
    return PrefillSelection(indices, counts, to_device(first, torch.int64, dev), tile, False,
                            host_spans=(starts, lengths))


def _torch_topk_chunk(pooled, indices, counts_h, starts, first, u0, c, tile, n_max):
    """torch.topk on the pooled rows of local tiles u0 .. u0 + c - 1 (the stock-PyTorch selection)."""
    dev = pooled.device
    kc = int(counts_h[:, u0:u0 + c].max())
    if kc == 0 or n_max == 0:
        return
    ft = torch.tensor(first, device=dev)[:, None]
    n_bu = (ft + u0 + torch.arange(c, device=dev)[None, :]) * tile  # [B, c] keys before each tile
    k_bu = counts_h[:, u0:u0 + c].to(dev)
    pos = torch.arange(n_max, device=dev)
    vals = pooled[:, :, :c, :n_max]
    inside = pos < n_bu[:, None, :, None]
    take_all = (k_bu >= n_bu)[:, None, :, None]
    vals = torch.where(inside, torch.where(take_all, 1.0, vals), -1.0)
    top = torch.topk(vals, min(kc, n_max), dim=-1, sorted=True).indices
    s = torch.tensor(starts, device=dev)[:, None, None, None]
    indices[:, :, u0:u0 + c, : top.shape[-1]] = (top + s).to(torch.int32)


def sparse_config(rows: int) -> dict:
    """Launch parameters of _sparse_prefill_kernel (checked for registers and shared memory on sm_90)."""
    if rows >= 128:  # 121 registers, 64 KB shared: two programs per SM (BLOCK_K 64: one, 20% slower)
        return dict(BLOCK_K=32, num_warps=8, num_stages=3)
    if rows >= 64:
        return dict(BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_K=32, num_warps=4, num_stages=3)


def sparse_attention(q, k, v, selection: reference.Selection, head_map=None, kv_start=None, scale=None,
                     *, kv_len=None, out: torch.Tensor | None = None, config: dict | None = None):
    """Attention over an anchor's selected keys plus the causal diagonal tile (see kascade.reference).

    Accepts any valid Selection (the reference's too). Returns [B, Hq, Q, Dv] in q's dtype.
    out: optional [B, Hq, Q, Dv] buffer (q's dtype, last dim contiguous) to write into.
    config overrides sparse_config (BLOCK_K, num_warps, num_stages). kv_len as in `select`.
    """
    check_attention_inputs(q, k, v)
    if selection.decode or q.shape[2] == 1 or not _supported(q, k, v, selection.tile):
        extra = {} if kv_len is None else {"kv_len": kv_len}
        return reference.sparse_attention(q, k, v, selection, head_map=head_map, kv_start=kv_start, scale=scale,
                                          **extra)
    kv_i32, kv_end, starts, lengths = _contiguous_spans(q, k, kv_start, kv_len)
    return _sparse(_last_dim_contiguous(q), contiguous_rows(k), contiguous_rows(v), kv_i32, kv_end,
                   starts, lengths, selection, head_map, scale, out, config)


def sparse_attention_paged(q, cache: PagedKV, selection: reference.Selection, head_map=None, scale=None, *,
                           out: torch.Tensor | None = None, config: dict | None = None):
    """`sparse_attention` over a paged cache (kascade.kernels.paging.PagedKV; see select_paged)."""
    check_paged_q(q, cache)
    if cache.value_cache is None:
        raise ValueError("cache: sparse_attention_paged needs value_cache, got None")
    if selection.decode or q.shape[2] == 1 or not _supported(q, cache.key_cache, cache.value_cache, selection.tile):
        raise ValueError(f"q: sparse_attention_paged needs a float16/bfloat16 prefill selection (Q > 1) on a "
                         f"Triton device, got q {tuple(q.shape)} {q.dtype} on {q.device}, decode={selection.decode}")
    lengths = cache.host_lengths()
    zeros = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
    pool = getattr(selection, "pool", None)
    pool = pool if pool is not None and pool.block_table is cache.block_table else None
    return _sparse(_last_dim_contiguous(q), cache.rows("key"), cache.rows("value"), zeros,
                   cache.seq_lens.to(torch.int32), (0,) * q.shape[0], lengths, selection, head_map, scale, out, config,
                   pool)


def _sparse(q, krows: KVRows, vrows: KVRows, kv_i32, kv_end_i32, starts, lengths, selection, head_map, scale,
            out, config, pool: PoolRows | None = None):
    """Sparse prefill over krows/vrows; pool: the selection's positions as pool rows (paged caches)."""
    hkv = krows.tensor.shape[2] if krows.paged else krows.tensor.shape[1]
    n_cache = 0 if krows.paged else krows.tensor.shape[2]
    hm = check_head_map(head_map, hkv, selection.num_kv_heads, q.device).to(torch.int32)
    if selection.indices.shape[0] != q.shape[0]:
        raise ValueError(
            f"selection: made for batch {selection.indices.shape[0]} with decode={selection.decode}, "
            f"got q of shape {tuple(q.shape)}; select again for this step"
        )
    tile = selection.tile
    bsz, hq, qlen, d = q.shape
    first, ntiles = _host_meta(qlen, starts, lengths, tile)
    mine = isinstance(selection, PrefillSelection) and selection.host_spans == (starts, lengths)
    if not mine and tuple(int(x) for x in selection.first_tile.tolist()) != first:
        raise ValueError("selection: tiles do not match this step's query positions; select again")
    u_run = max(ntiles)
    if selection.indices.shape[2] < u_run or selection.counts.shape[1] < u_run:
        raise ValueError(f"selection: expected at least {u_run} tiles, got {selection.indices.shape[2]}; "
                         "select again for this step")
    dv = vrows.tensor.shape[-1]
    g = hq // hkv
    t_pad, block_g, num_hg = row_layout(g, tile, max(d, dv))
    rows = block_g * t_pad
    sc = d ** -0.5 if scale is None else float(scale)
    idx = selection.indices if pool is None else pool.rows
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    counts = selection.counts.to(torch.int32)
    if out is None:
        out = torch.empty(bsz, hq, qlen, dv, dtype=q.dtype, device=q.device)
    elif out.shape != (bsz, hq, qlen, dv) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected a [{bsz}, {hq}, {qlen}, {dv}] {q.dtype} tensor with a contiguous last dim, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    for b, n in enumerate(lengths):  # padding query rows are zeros
        pad = qlen - min(qlen, n)
        if pad > 0:
            out[b, :, :pad].zero_()
    cfg = dict(sparse_config(rows), **(config or {}))
    grid = (u_run * num_hg, hkv, bsz)
    _sparse_prefill_kernel[grid](
        q, krows.tensor, vrows.tensor, out, idx, counts, kv_i32,
        kv_i32 if kv_end_i32 is None else kv_end_i32, hm,
        q.stride(0), q.stride(1), q.stride(2),
        *krows.args(kv_i32)[1:],
        vrows.s_seq, vrows.s_head, vrows.s_tok,
        out.stride(0), out.stride(1), out.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2),
        counts.stride(0),
        sc * LOG2E, u_run, qlen, n_cache,
        G=g, TILE=tile, T_PAD=t_pad, BLOCK_G=block_g, NUM_HG=num_hg,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        HEAD_DIM_V=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        UPCAST=UPCAST_DOT, PAGED=krows.paged, HAS_END=kv_end_i32 is not None, IDX_POOL=pool is not None, **cfg,
    )
    return out
