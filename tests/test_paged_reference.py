"""kascade.paged (the paged-KV reference) against kascade.reference on the same keys laid out contiguously.

Each request's keys are scattered into randomly chosen pages of a shared cache; a batch mixes decode
steps, whole prompts and prompt chunks on top of earlier chunks, so every request's positions,
tiles and budgets differ. The paged result must equal the contiguous reference run per request.
"""

from __future__ import annotations

import pytest
import torch

from kascade import reference
from kascade.paged import (
    PagedKascadeStrategy,
    PagedSelection,
    gather_kv,
    paged_anchor,
    paged_dense,
    paged_reuse,
    paged_select,
)
from kascade.plan import Plan
from kascade.strategy import KascadeStrategy


def make_batch(seq_lens, q_lens, hq=8, hkv=4, d=64, block_size=16, extra_blocks=3, seed=0, dtype=torch.float32,
               hnd=False):
    """Random per-request K/V [1, Hkv, n, D] and q [1, Hq, Q, D], plus the same data paged.

    hnd: store the cache as [num_blocks, Hkv, block_size, D] and pass its NHD view (strided)."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages_per) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    shape = (num_blocks, hkv, block_size, d) if hnd else (num_blocks, block_size, hkv, d)
    kc = torch.randn(shape, generator=g).to(dtype)  # junk everywhere a request does not write
    vc = torch.randn(shape, generator=g).to(dtype)
    if hnd:
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    bt = torch.full((len(seq_lens), max(pages_per) + 1), -7, dtype=torch.int32)
    ks, vs, qs = [], [], []
    used = 0
    for r, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        pages = perm[used : used + pages_per[r]]
        used += pages_per[r]
        bt[r, : len(pages)] = pages.to(torch.int32)
        k = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        v = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        for j in range(n):
            kc[pages[j // block_size], j % block_size] = k[0, :, j]
            vc[pages[j // block_size], j % block_size] = v[0, :, j]
        ks.append(k)
        vs.append(v)
        qs.append(torch.randn(1, hq, ql, d, generator=g).to(dtype))
    q = torch.cat([x[0].transpose(0, 1) for x in qs])  # [T, Hq, D]
    qsl = torch.tensor([0] + list(q_lens)).cumsum(0).to(torch.int32)
    return dict(q=q, key_cache=kc, value_cache=vc, block_table=bt, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                query_start_loc=qsl), (qs, ks, vs)


# decode steps, a whole prompt, chunks of a prompt on top of a cache (tile-aligned and not), a request
# shorter than k_min, one with no new token this step
MIXED = dict(seq_lens=[300, 257, 170, 333, 40, 90], q_lens=[1, 257, 64, 45, 40, 0])


def test_gather_kv_reads_the_pages_in_order():
    paged, (_, ks, vs) = make_batch(**MIXED)
    for r, n in enumerate(MIXED["seq_lens"]):
        assert torch.equal(gather_kv(paged["key_cache"], paged["block_table"][r], n), ks[r])
        assert torch.equal(gather_kv(paged["value_cache"], paged["block_table"][r], n), vs[r])


@pytest.mark.parametrize("hnd", [False, True])
def test_dense_equals_contiguous_reference(hnd):
    paged, (qs, ks, vs) = make_batch(**MIXED, hnd=hnd)
    out = paged_dense(**paged, scale=0.1)
    qsl = paged["query_start_loc"].tolist()
    for r in range(len(qs)):
        if qs[r].shape[2] == 0:
            assert qsl[r] == qsl[r + 1]
            continue
        want = reference.dense_attention(qs[r], ks[r], vs[r], scale=0.1)[0].transpose(0, 1)
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], want, rtol=0, atol=0)


def test_select_equals_contiguous_reference():
    paged, (qs, ks, _) = make_batch(**MIXED, block_size=32)
    sel = paged_select(paged["q"], paged["key_cache"], paged["block_table"], paged["seq_lens"],
                       paged["query_start_loc"], rho=0.2, k_min=16, tile=32)
    assert isinstance(sel, PagedSelection) and sel.num_requests == len(qs)
    assert sel.decode.tolist() == [ql == 1 for ql in MIXED["q_lens"]]
    for r in range(len(qs)):
        if qs[r].shape[2] == 0:
            assert int(sel.counts[r].sum()) == 0
            continue
        want = reference.select(qs[r], ks[r], rho=0.2, k_min=16, tile=32)
        got = sel.request(r)
        assert int(got.first_tile[0]) == int(want.first_tile[0])
        for u in range(want.counts.shape[1]):
            for h in range(ks[r].shape[1]):
                assert torch.equal(got.sets(0, h, u), want.sets(0, h, u)), (r, h, u)
    # the chunk of positions 288..332 lies in tiles 9 and 10, with budgets k(288) = 57 and k(320) = 64
    assert int(sel.first_tile[3]) == 9
    assert sel.counts[3, :2].tolist() == [57, 64]


def test_reuse_with_head_map_equals_contiguous_reference():
    paged, (qs, ks, vs) = make_batch(**MIXED, seed=1)
    sel = paged_select(paged["q"], paged["key_cache"], paged["block_table"], paged["seq_lens"],
                       paged["query_start_loc"], rho=0.1, k_min=8, tile=32)
    hm = torch.tensor([3, 3, 0, 1])
    out = paged_reuse(**paged, selection=sel, head_map=hm)
    qsl = paged["query_start_loc"].tolist()
    for r in range(len(qs)):
        if qs[r].shape[2] == 0:
            continue
        want = reference.sparse_attention(qs[r], ks[r], vs[r], reference.select(qs[r], ks[r], 0.1, 8, 32), head_map=hm)
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], want[0].transpose(0, 1), rtol=0, atol=0)


def test_full_budget_anchor_equals_dense():
    """rho = 1: every tile selects every key before it, so the anchor's sparse output is dense attention."""
    paged, _ = make_batch(**MIXED, seed=2)
    out, _ = paged_anchor(**paged, rho=1.0, k_min=1, tile=32)
    torch.testing.assert_close(out, paged_dense(**paged), rtol=1e-5, atol=1e-5)
    sparse, _ = paged_anchor(**paged, rho=0.05, k_min=4, tile=32)
    assert (sparse - paged_dense(**paged)).abs().max() > 1e-3  # a real budget changes the result


@pytest.mark.parametrize("dense_anchor_output", [False, True])
def test_strategy_matches_contiguous_strategy_layer_by_layer(dense_anchor_output):
    """Four layers of a plan (dense layer 0, reuse, anchor, reuse with a head map) on a mixed batch with
    short requests: PagedKascadeStrategy equals KascadeStrategy run per request on contiguous caches."""
    plan = Plan(anchors=[0, 2], head_map=[[0, 1, 2, 3], [1, 0, 3, 3], [0, 1, 2, 3], [2, 2, 0, 1]], rho=0.1, k_min=64)
    strat = PagedKascadeStrategy(plan, dense_anchor_output=dense_anchor_output)
    ref = KascadeStrategy(plan, backend="reference", dense_anchor_output=dense_anchor_output)
    batches = [make_batch(**MIXED, seed=10 + layer) for layer in range(4)]  # new q/k/v per layer
    qsl = batches[0][0]["query_start_loc"].tolist()
    outs = [strat.attend(layer, **batches[layer][0], scale=0.125) for layer in range(4)]
    for r in range(len(MIXED["seq_lens"])):
        if MIXED["q_lens"][r] == 0:
            continue
        for layer in range(4):
            qs, ks, vs = batches[layer][1]
            if layer == 0:
                ref.begin_forward()
            want = ref.attend(layer, qs[r], ks[r], vs[r], None, 0.125)[0].transpose(0, 1)
            torch.testing.assert_close(outs[layer][qsl[r] : qsl[r + 1]], want, rtol=0, atol=0)


def test_strategy_refuses_reuse_without_its_anchor():
    plan = Plan(anchors=[0, 2], rho=0.1, k_min=8)
    paged, _ = make_batch(**MIXED)
    with pytest.raises(RuntimeError, match="layer 1 reuses anchor 0"):
        PagedKascadeStrategy(plan).attend(1, **paged)


def test_errors_name_the_argument():
    paged, _ = make_batch(**MIXED)
    with pytest.raises(ValueError, match="q: expected"):
        paged_dense(**{**paged, "q": paged["q"][None]})
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_dense(**{**paged, "query_start_loc": paged["query_start_loc"][:-1]})
    with pytest.raises(ValueError, match="block_table: request 0 needs"):
        paged_dense(**{**paged, "block_table": paged["block_table"][:, :2]})
    with pytest.raises(ValueError, match="key_cache: expected a number of KV heads"):
        paged_dense(**{**paged, "key_cache": paged["key_cache"][:, :, :3], "value_cache": paged["value_cache"][:, :, :3]})
    sel = paged_select(paged["q"], paged["key_cache"], paged["block_table"], paged["seq_lens"], paged["query_start_loc"])
    with pytest.raises(ValueError, match="selection: request 0 was selected with decode=True"):
        q2 = torch.cat([paged["q"][:1], paged["q"]])
        qsl2 = paged["query_start_loc"] + 1
        qsl2[0] = 0
        paged_reuse(**{**paged, "q": q2, "query_start_loc": qsl2}, selection=sel)
