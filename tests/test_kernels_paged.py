"""Paged-KV variants of the kernels (kascade.kernels.paging) against the contiguous ones and the reference.

A left-padded contiguous batch is scattered into a page pool in a random page order (pages of
other sequences and unused pages interleaved); the paged kernels must select the same keys (as
sets, with the tolerance of test_kernels_prefill) and attend to the same values. Selected
positions of a paged cache count from 0 in each sequence; those of the left-padded reference from
kv_start[b]. Also: a preallocated cache whose tail is unwritten (kv_len), and bad paged inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import test_kernels_decode as TD  # noqa: E402
from kascade import reference as R  # noqa: E402
from kascade.kernels import decode as KD  # noqa: E402
from kascade.kernels import prefill as P  # noqa: E402
from kascade.kernels.paging import PagedKV, gather_contiguous, linear_pool  # noqa: E402
from test_kernels_prefill import DEV, _inputs, check_output, check_selection, gpu, needs_cuda  # noqa: E402


def to_paged(k, v, kv_start, page_size, head_major=False, seed=0):
    """Scatter a left-padded [B, Hkv, N, D] batch into a shuffled page pool -> PagedKV."""
    bsz, hkv, n_cache, d = k.shape
    lengths = [n_cache - int(s) for s in kv_start]
    pages_of = [-(-n // page_size) for n in lengths]
    n_pages = sum(pages_of) + 3  # a few pages nobody owns
    order = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))
    shape = (n_pages, hkv, page_size, d) if head_major else (n_pages, page_size, hkv, d)
    kc = torch.randn(shape, dtype=k.dtype, device=k.device)  # unused slots hold garbage, not zeros
    vc = torch.randn(shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    if head_major:  # the kernels read [num_pages, page_size, Hkv, D] through strides
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    bt = torch.full((bsz, max(pages_of) + 2), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        s = n_cache - n
        for j in range(pages_of[b]):
            page = int(order[used])
            used += 1
            bt[b, j] = page
            lo, hi = j * page_size, min(n, (j + 1) * page_size)
            kc[page, : hi - lo] = k[b, :, s + lo : s + hi].transpose(0, 1)
            vc[page, : hi - lo] = v[b, :, s + lo : s + hi].transpose(0, 1)
    lens = torch.tensor(lengths, dtype=torch.int32, device=k.device)
    return PagedKV(kc, vc, bt.to(k.device), lens)


def shifted(sel, kv_start):
    """The selection with positions moved from per-sequence (paged) to left-padded cache positions."""
    idx = sel.indices.clone()
    valid = torch.arange(idx.shape[-1], device=idx.device)[None, None, :] < sel.counts[:, :, None]  # [B, U, K]
    for b, s in enumerate(kv_start):
        idx[b] = torch.where(valid[b][None], idx[b] + int(s), idx[b])
    return R.Selection(idx, sel.counts, sel.first_tile, sel.tile, sel.decode)


def _check_prefill_paged(Hq, Hkv, D, dtype, B, Q, N, kv_start, page_size, rho, k_min, head_major=False, seed=0,
                         gather_keys=True):
    q, k, v = _inputs(B, Hq, Hkv, Q, N, D, dtype, seed)
    ks = torch.tensor(kv_start, device=DEV)
    cache = to_paged(k, v, kv_start, page_size, head_major, seed)
    k2, v2, ks2 = gather_contiguous(cache)
    assert torch.equal(ks2.cpu(), ks.cpu()) and torch.equal(k2, torch.where(_valid(ks, N), k, 0))
    sel = P.select_paged(q, cache, rho=rho, k_min=k_min, tile=32, gather_keys=gather_keys)
    assert (sel.pool is None) == (not linear_pool(cache))  # head-major pages (Hkv > 1) are not one linear pool
    ref = R.select(q, k, rho=rho, k_min=k_min, tile=32, kv_start=ks)
    check_selection(shifted(sel, kv_start), ref, q, k, ks)
    head_map = torch.arange(Hkv, device=DEV).flip(0)
    out = P.sparse_attention_paged(q, cache, sel, head_map=head_map)
    check_output(out, q, k, v, shifted(sel, kv_start), head_map, ks)
    want = P.sparse_attention(q, k, v, shifted(sel, kv_start), head_map=head_map, kv_start=ks)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # same kernel, same order: bit-identical


def _valid(ks, n):
    return (torch.arange(n, device=ks.device)[None, :] >= ks[:, None])[:, None, :, None]


@pytest.mark.parametrize("Hq,Hkv,D,dtype,page_size,head_major,gather_keys", [
    (8, 2, 64, torch.bfloat16, 16, False, True),  # G = 4
    (8, 2, 64, torch.bfloat16, 16, False, False),  # pages resolved inside the pooled-score passes
    (4, 2, 32, torch.float16, 7, True, False),  # G = 2, a page size that is no power of two, head-major pages
    (2, 2, 64, torch.bfloat16, 64, False, True),  # G = 1
])
def test_prefill_paged_small(Hq, Hkv, D, dtype, page_size, head_major, gather_keys):
    # chunked prefill on top of a cache, sequences of different lengths
    _check_prefill_paged(Hq, Hkv, D, dtype, B=2, Q=70, N=170, kv_start=[37, 0], page_size=page_size,
                         rho=0.25, k_min=5, head_major=head_major, gather_keys=gather_keys)


@pytest.mark.parametrize("kv_start", [[0], [0, 0]])
def test_prefill_paged_small_sequences_of_one_length(kv_start):
    # keys gathered and every sequence as long as the scratch: the selection runs without per-sequence ends
    q, k, v = _inputs(len(kv_start), 8, 2, 70, 170, 64, torch.bfloat16, 0)
    ks = torch.tensor(kv_start, device=DEV)
    sel = P.select_paged(q, to_paged(k, v, kv_start, 16, False, 0), rho=0.25, k_min=5, tile=32)
    check_selection(shifted(sel, kv_start), R.select(q, k, rho=0.25, k_min=5, tile=32, kv_start=ks), q, k, ks)


def test_prefill_kv_len_small():
    # a preallocated cache: keys at positions >= kv_len[b] are garbage and must not be seen
    q, k, v = _inputs(2, 8, 2, 40, 160, 32, torch.bfloat16, seed=4)
    ks, kl = [10, 0], [150, 120]
    sel = P.select(q, k, rho=0.25, k_min=5, tile=32, kv_start=torch.tensor(ks, device=DEV),
                   kv_len=torch.tensor(kl, device=DEV))
    out = P.sparse_attention(q, k, v, sel, kv_start=torch.tensor(ks, device=DEV), kv_len=torch.tensor(kl, device=DEV))
    for b in range(2):  # each sequence alone, cut at its end
        e = kl[b]
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e]
        ksb = torch.tensor([ks[b]], device=DEV)
        ref = R.select(qb, kb, rho=0.25, k_min=5, tile=32, kv_start=ksb)
        mine = R.Selection(sel.indices[b:b + 1], sel.counts[b:b + 1], sel.first_tile[b:b + 1], 32, False)
        check_selection(mine, ref, qb, kb, ksb)
        check_output(out[b:b + 1], qb, kb, vb, mine, None, ksb)


def test_paged_bad_inputs():
    q, k, v = _inputs(1, 4, 2, 40, 40, 32, torch.bfloat16)
    cache = to_paged(k, v, [0], 16)
    with pytest.raises(ValueError, match="block_table"):
        PagedKV(cache.key_cache, cache.value_cache, cache.block_table.long(), cache.seq_lens)
    with pytest.raises(ValueError, match="seq_lens"):
        PagedKV(cache.key_cache, cache.value_cache, cache.block_table, cache.seq_lens[:0])
    with pytest.raises(ValueError, match="value_cache"):
        PagedKV(cache.key_cache, cache.value_cache[:, :, :1], cache.block_table, cache.seq_lens)
    too_long = PagedKV(cache.key_cache, cache.value_cache, cache.block_table, cache.seq_lens + 1000)
    with pytest.raises(ValueError, match="seq_lens: expected values in"):
        P.select_paged(q, too_long)
    with pytest.raises(ValueError, match="q: expected batch"):
        P.select_paged(q.expand(2, -1, -1, -1), cache)
    with pytest.raises(ValueError, match="kv_len"):
        P.select(q, k, kv_len=torch.tensor([41], device=DEV))


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------


def _check_decode_paged(B, Hkv, G, N, D, dtype, kv_start, page_size, head_major=False, rho=0.1, k_min=16):
    """Paged decode kernels = the contiguous ones on the left-padded batch (same splits: bit-identical),
    and the selection is the reference's."""
    q, k, v = TD.make(B, Hkv, G, N, D, dtype, seed=N + page_size)
    ks = torch.tensor(kv_start, device=DEV)
    cache = to_paged(k, v, kv_start, page_size, head_major, seed=N)
    sel = KD.select_paged(q, cache, rho, k_min)
    TD.check_selection(shifted(sel, kv_start), q, k, rho, k_min, ks)
    sel_c = KD.select(q, k, rho, k_min, kv_start=ks)
    assert torch.equal(sel.counts, sel_c.counts)
    mine = shifted(sel, kv_start)
    for b in range(B):
        c = int(sel.counts[b, 0])
        assert torch.equal(mine.indices[b, :, 0, :c], sel_c.indices[b, :, 0, :c])  # same order too
    head_map = torch.tensor([(h + 1) % Hkv for h in range(Hkv)], device=DEV)
    assert (sel.pool is None) == (not linear_pool(cache))  # head-major pages (Hkv > 1) are not one linear pool
    out = KD.sparse_attention_paged(q, cache, sel, head_map=head_map)
    assert torch.equal(out, KD.sparse_attention(q, k, v, sel_c, head_map=head_map, kv_start=ks))
    plain = R.Selection(sel.indices, sel.counts, sel.first_tile, sel.tile, True)  # pages resolved in the kernel
    assert torch.equal(KD.sparse_attention_paged(q, cache, plain, head_map=head_map), out)
    for dense in (False, True):
        out_a, sel_a = KD.anchor_paged(q, cache, rho, k_min, dense_output=dense)
        want, _ = KD.anchor(q, k, v, rho, k_min, kv_start=ks, dense_output=dense)
        assert torch.equal(sel_a.indices, sel.indices) and torch.equal(out_a, want)
    assert torch.equal(KD.dense_attention_paged(q, cache), KD.dense_attention(q, k, v, kv_start=ks))
    ref = R.dense_attention(q, k, v, kv_start=ks)
    TD.assert_close_to64(KD.dense_attention_paged(q, cache), ref, TD.dense64(q, k, v, ks), v)


@pytest.mark.parametrize("B,Hkv,G,N,D,dtype,kv_start,page_size,head_major", [
    (2, 2, 4, 150, 64, torch.bfloat16, [0, 41], 16, False),
    (2, 1, 2, 97, 32, torch.float16, [5, 0], 7, True),
    (1, 1, 8, 80, 16, torch.bfloat16, [0], 64, False),
])
def test_decode_paged_small(B, Hkv, G, N, D, dtype, kv_start, page_size, head_major):
    _check_decode_paged(B, Hkv, G, N, D, dtype, kv_start, page_size, head_major)


def test_decode_paged_errors():
    q, k, v = TD.make(1, 2, 2, 64, 32, torch.bfloat16)
    cache = to_paged(k, v, [0], 16)
    with pytest.raises(ValueError, match="decode kernels take one query"):
        KD.select_paged(q.expand(-1, -1, 2, -1), cache)
    with pytest.raises(ValueError, match="value_cache"):
        KD.dense_attention_paged(q, PagedKV(cache.key_cache, None, cache.block_table, cache.seq_lens))
    sel = KD.select_paged(q, cache)
    with pytest.raises(ValueError, match="head_map"):
        KD.sparse_attention_paged(q, cache, sel, head_map=torch.tensor([0, 5], device=DEV))


@gpu
@needs_cuda
@pytest.mark.parametrize("B,Hkv,G,N,D,dtype,page_size", [
    (1, 8, 4, 131072, 128, torch.bfloat16, 16),
    (3, 8, 4, 40000, 128, torch.float16, 128),
    (2, 4, 2, 30000, 64, torch.bfloat16, 32),
])
def test_decode_paged_full(B, Hkv, G, N, D, dtype, page_size):
    _check_decode_paged(B, Hkv, G, N, D, dtype, [0, 777, 20000][:B], page_size, rho=0.1, k_min=128)


@gpu
@needs_cuda
@pytest.mark.parametrize("Hq,Hkv,D,dtype,page_size", [
    (32, 8, 128, torch.bfloat16, 16),
    (32, 8, 128, torch.float16, 256),
    (16, 8, 64, torch.bfloat16, 32),
])
def test_prefill_paged_full(Hq, Hkv, D, dtype, page_size):
    _check_prefill_paged(Hq, Hkv, D, dtype, B=3, Q=3000, N=5000, kv_start=[0, 1111, 4000], page_size=page_size,
                         rho=0.1, k_min=128)
