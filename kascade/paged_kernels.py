"""The Triton-kernel path of kascade.paged: the same functions over a paged batch, on the kernels.

A batch's requests are split by kind: decode requests (one new token) run together in one launch of
each paged decode kernel (kascade.kernels.decode.*_paged); each prefill request (more than one new
token: a prompt or a chunk of one) runs on its own through the paged prefill kernels
(kascade.kernels.prefill.*_paged), so every request is tiled from its own first token exactly as
the reference does. Selections come back as kascade.paged.PagedSelection (positions inside each
request, -1 padded). Dense prefill (layer 0, short requests) gathers the request's pages and runs
kascade.ops.dense (SDPA on CUDA).

Layout and shapes: those of kascade.paged (q [T, Hq, D], caches [num_blocks, block_size, Hkv, D],
block_table [R, max_blocks], seq_lens [R], query_start_loc [R + 1]).
"""

from __future__ import annotations

import os

import torch

from kascade import ops
from kascade.host import to_device

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def use_kernels(q: torch.Tensor, backend: str) -> bool:
    """True when `backend` sends q's batch to the kernels ("auto": CUDA fp16/bf16; "triton": required)."""
    ops.check_backend(backend)
    if backend == "reference":
        return False
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and not (on_device and q.dtype in KERNEL_DTYPES):
        raise ValueError(f"backend: 'triton' needs float16/bfloat16 tensors on CUDA (or TRITON_INTERPRET=1), "
                         f"got {q.dtype} on {q.device}; use backend='reference'")
    return q.is_cuda and q.dtype in KERNEL_DTYPES if backend == "auto" else True


def _split(lens, qsl):
    """(decode request ids, prefill request ids) of the requests with new tokens."""
    dec = [r for r in range(len(lens)) if qsl[r + 1] - qsl[r] == 1]
    pre = [r for r in range(len(lens)) if qsl[r + 1] - qsl[r] > 1]
    return dec, pre


def _cache(key_cache, value_cache, block_table, seq_lens, reqs, lens=None):
    """The requests `reqs` of the step as a PagedKV; lens: the step's host seq_lens (then no kernel call reads
    the lengths back from the device)."""
    from kascade.kernels.paging import PagedKV  # Triton is imported only when the kernels run

    idx = to_device(reqs, torch.long, block_table.device)
    return PagedKV(key_cache, value_cache, block_table[idx].to(torch.int32).contiguous(),
                   seq_lens.to(key_cache.device)[idx.to(key_cache.device)].to(torch.int32),
                   None if lens is None else tuple(int(lens[r]) for r in reqs))


def _decode_q(q, qsl, reqs):
    """[Rd, Hq, 1, D] queries of the decode requests."""
    rows = to_device([qsl[r] for r in reqs], torch.long, q.device)
    return q[rows].unsqueeze(2), rows


def _prefill_q(q, qsl, r):
    """[1, Hq, Q_r, D] queries of prefill request r, and its token slice."""
    sl = slice(qsl[r], qsl[r + 1])
    return q[sl].transpose(0, 1).unsqueeze(0), sl


def _masked(indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """indices with every slot from counts on set to -1 (the PagedSelection convention)."""
    slot = torch.arange(indices.shape[-1], device=indices.device)
    return torch.where(slot[None, None, None, :] < counts[:, None, : indices.shape[2], None], indices, -1)


def _per_request(sel, idx, i: int, decode: bool):
    """Request i of a kernel selection (indices masked: `idx`) as a batch-1 selection; it keeps the selection's
    pool rows (attribute `pool`, a kascade.kernels.paging.PoolRows, or None) for kascade.paged._stack."""
    from kascade.kernels.decode import PagedDecodeSelection
    from kascade.kernels.paging import PoolRows

    pool = getattr(sel, "pool", None)
    pool = None if pool is None else PoolRows(pool.rows[i:i + 1], pool.block_table)
    return PagedDecodeSelection(idx[i:i + 1], sel.counts[i:i + 1], sel.first_tile[i:i + 1], sel.tile, decode, pool)


def select(q, key_cache, block_table, seq_lens, lens, qsl, rho, k_min, tile, scale):
    """Per-request Selections (batch 1 each, positions inside the request, pool rows kept) keyed by request id."""
    from kascade.kernels import decode as KD, prefill as KP

    dec, pre = _split(lens, qsl)
    out = {}
    if dec:
        qd, _ = _decode_q(q, qsl, dec)
        sel = KD.select_paged(qd, _cache(key_cache, None, block_table, seq_lens, dec, lens), rho, k_min, tile, scale)
        idx = _masked(sel.indices, sel.counts)
        for i, r in enumerate(dec):
            out[r] = _per_request(sel, idx, i, True)
    for r in pre:
        qr, _ = _prefill_q(q, qsl, r)
        sel = KP.select_paged(qr, _cache(key_cache, None, block_table, seq_lens, [r], lens), rho, k_min, tile, scale)
        out[r] = _per_request(sel, _masked(sel.indices, sel.counts), 0, False)
    return out


def select_fp8(q, key_cache, key_copy, block_table, seq_lens, lens, qsl, rho, k_min, tile, scale, rerank, kv_heads):
    """`select` scored from an FP8 copy (keys [num_blocks, block_size, S, D], scales [num_blocks, block_size, S])
    of the heads whose queries q holds; a re-rank reads key_cache (KV head kv_heads[h] for copy head h)."""
    from kascade.kernels import decode as KD, prefill_fp8 as KP8

    dec, pre = _split(lens, qsl)
    out = {}
    if dec:
        qd, _ = _decode_q(q, qsl, dec)
        sel = KD.select_fp8_paged(qd, _cache(key_cache, None, block_table, seq_lens, dec, lens), key_copy, rho, k_min, tile,
                                  scale, rerank=rerank, kv_heads=kv_heads)
        idx = _masked(sel.indices, sel.counts)
        for i, r in enumerate(dec):
            out[r] = _per_request(sel, idx, i, True)
    for r in pre:
        qr, _ = _prefill_q(q, qsl, r)
        sel = KP8.select_fp8_paged(qr, _cache(key_cache, None, block_table, seq_lens, [r], lens), key_copy, rho, k_min, tile,
                                   scale, rerank=rerank, kv_heads=kv_heads)
        out[r] = _per_request(sel, _masked(sel.indices, sel.counts), 0, False)
    return out


def reuse(out, q, key_cache, value_cache, block_table, seq_lens, lens, qsl, selection, head_map, scale):
    """out[tokens] = attention of every request over its selection (a kascade.paged.PagedSelection).

    The selection's pool rows serve when they were resolved for this block table (selection.pool_table is
    block_table: the same step), so the kernels gather K/V rows by one index."""
    from kascade.kernels import decode as KD, prefill as KP
    from kascade.kernels.paging import PoolRows

    dec, pre = _split(lens, qsl)
    rows_ok = selection.pool_rows is not None and selection.pool_table is block_table
    if dec:
        qd, rows = _decode_q(q, qsl, dec)
        idx = to_device(dec, torch.long, selection.indices.device)
        cache = _cache(key_cache, value_cache, block_table, seq_lens, dec, lens)
        pool = PoolRows(selection.pool_rows[idx, :, :1], cache.block_table) if rows_ok else None
        sel = KD.PagedDecodeSelection(selection.indices[idx, :, :1], selection.counts[idx, :1],
                                      selection.first_tile[idx], selection.tile, True, pool)
        o = KD.sparse_attention_paged(qd, cache, sel, head_map=head_map, scale=scale)
        out[rows] = o[:, :, 0]
    for r in pre:
        qr, sl = _prefill_q(q, qsl, r)
        cache = _cache(key_cache, value_cache, block_table, seq_lens, [r], lens)
        req = selection.request(r)
        pool = PoolRows(selection.pool_rows[r:r + 1], cache.block_table) if rows_ok else None
        # a selection of this step (its pool rows were resolved for this block table) was made for these
        # lengths: its host spans say so, which spares the kernel reading first_tile back to check it
        spans = ((0,), (int(lens[r]),)) if rows_ok else ()
        sel = KP.PrefillSelection(req.indices, req.counts, req.first_tile, req.tile, False, host_spans=spans, pool=pool)
        o = KP.sparse_attention_paged(qr, cache, sel, head_map=head_map, scale=scale)
        out[sl] = o[0].transpose(0, 1)
    return out


def dense(out, q, key_cache, value_cache, block_table, seq_lens, lens, qsl, scale, gather_kv):
    """out[tokens] = causal dense attention of every request over its pages."""
    from kascade.kernels import decode as KD

    dec, pre = _split(lens, qsl)
    if dec:
        qd, rows = _decode_q(q, qsl, dec)
        o = KD.dense_attention_paged(qd, _cache(key_cache, value_cache, block_table, seq_lens, dec, lens), scale=scale)
        out[rows] = o[:, :, 0]
    for r in pre:
        qr, sl = _prefill_q(q, qsl, r)
        k = gather_kv(key_cache, block_table[r], lens[r])
        v = gather_kv(value_cache, block_table[r], lens[r])
        out[sl] = ops.dense(qr, k, v, scale=scale)[0].transpose(0, 1)
    return out
