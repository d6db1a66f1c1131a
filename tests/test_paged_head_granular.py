"""Head-granular plans (schema 2 `head_sources`) over a paged KV cache: kascade.paged.PagedKascadeStrategy.

The plan below has four KV heads and every kind of layer: layer 1 selects on heads 1 and 3 (one strided
view) and reads layer 0 for heads 0 and 2; layer 3 selects on heads 0, 1 and 3 (two views) and reads the
anchor for head 2; layer 4 selects nothing and reads four layers; layer 5 reads the anchor through a
permutation. On a mixed batch (decode steps, a whole prompt, prompt chunks on top of earlier keys, a
request of at most k_min keys, one without new tokens) the paged strategy must equal the contiguous
KascadeStrategy run on each request alone, layer by layer: bit for bit on the reference path, within
bf16 rounding on the Triton kernels (Triton's CPU interpreter without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the kernels run in Triton's CPU interpreter (as in test_paged_kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kascade.paged import (  # noqa: E402
    PagedKascadeStrategy,
    PagedSelection,
    paged_dense,
    paged_gather_heads,
    paged_select,
)
from kascade.plan import Plan  # noqa: E402
from kascade.strategy import KascadeStrategy  # noqa: E402
from test_paged_reference import make_batch  # noqa: E402

SOURCES = [None, [[0, 0], None, [0, 2], None], None, [None, None, [2, 2], None], [[1, 1], [3, 0], [2, 0], [0, 3]],
           [[2, 1], [2, 0], [2, 3], [2, 2]]]
LAYERS = len(SOURCES)
# decode steps (300 and 211 keys), a whole prompt (257), chunks on top of earlier keys (64 of 170, 45 of 333),
# a request of at most k_min keys (40), one without new tokens (90)
MIXED = dict(seq_lens=[300, 257, 170, 333, 40, 211, 90], q_lens=[1, 257, 64, 45, 40, 1, 0])


def _plan(**kw) -> Plan:
    return Plan(**{**dict(anchors=[0, 2], head_sources=SOURCES, rho=0.1, k_min=64, tile=32), **kw})


def _batches(dtype=torch.float32, d=32, mix=MIXED):
    return [make_batch(**mix, hq=8, hkv=4, d=d, dtype=dtype, seed=40 + layer) for layer in range(LAYERS)]


def _rows(r):
    qsl = torch.tensor([0] + MIXED["q_lens"]).cumsum(0).tolist()
    return slice(qsl[r], qsl[r + 1])


def test_paged_equals_contiguous_strategy_layer_by_layer():
    plan = _plan()
    batches = _batches()
    paged = PagedKascadeStrategy(plan, backend="reference")
    outs, kept = [], {}
    for layer in range(LAYERS):
        outs.append(paged.attend(layer, **batches[layer][0], scale=0.125))
        kept[layer] = paged.state.get(layer)
    assert [layer for layer, s in kept.items() if s is not None] == [0, 1, 2, 3]  # layers 4, 5 select nothing
    assert kept[1][1].num_kv_heads == 2 and kept[3][1].num_kv_heads == 3  # their selecting heads only
    contiguous = KascadeStrategy(plan, backend="reference")
    for r, ql in enumerate(MIXED["q_lens"]):
        if ql == 0:
            continue
        contiguous.begin_forward()
        for layer in range(LAYERS):
            qs, ks, vs = batches[layer][1]
            want = contiguous.attend(layer, qs[r], ks[r], vs[r], None, 0.125)[0].transpose(0, 1)
            torch.testing.assert_close(outs[layer][_rows(r)], want, rtol=0, atol=0)
            if layer in (1, 3) and MIXED["seq_lens"][r] > plan.k_min:  # the own heads' selections themselves
                reqs, sel = kept[layer]  # selected over the long requests only, in batch order
                got, ref = sel.request(reqs.index(r)), contiguous.state[layer]
                for u in range(ref.counts.shape[1]):
                    for h in range(ref.num_kv_heads):
                        assert torch.equal(got.sets(0, h, u), ref.sets(0, h, u)), (layer, r, h, u)
    dense = [paged_dense(**batches[layer][0], scale=0.125) for layer in range(LAYERS)]
    for layer in range(1, LAYERS):  # not vacuous: at rho = 0.1 every sparse layer changes the long requests
        assert (outs[layer][_rows(3)] - dense[layer][_rows(3)]).abs().max() > 1e-3, layer


def test_full_budget_equals_dense():
    """rho = 1: every selection is every key before the query, so each layer is dense attention."""
    plan = _plan(rho=1.0, k_min=16)
    batches = _batches(d=16)
    paged = PagedKascadeStrategy(plan, backend="reference")
    for layer in range(LAYERS):
        got = paged.attend(layer, **batches[layer][0], scale=0.125)
        torch.testing.assert_close(got, paged_dense(**batches[layer][0], scale=0.125), rtol=1e-5, atol=1e-5)


def test_tp_ranks_concatenate_to_unsharded():
    """A plan whose sources stay inside TP=2 shards, run by each rank on its two KV heads (tp_rank), gives the
    rank's heads of the unsharded output; a plan whose sources cross is refused naming the entry."""
    inside = [None, [[0, 1], None, None, [0, 2]], None, [None, [2, 0], [1, 2], None], [[3, 0], [1, 1], [2, 3], [3, 3]],
              [[2, 1], [2, 0], [2, 3], [2, 2]]]
    plan = _plan(head_sources=inside, tp_degree=2)
    batches = _batches(d=16)
    full = PagedKascadeStrategy(plan, backend="reference")
    ranks = [PagedKascadeStrategy(plan, backend="reference") for _ in range(2)]
    for layer in range(LAYERS):
        b = batches[layer][0]
        want = full.attend(layer, **b, scale=0.125)
        got = []
        for rank, s in enumerate(ranks):
            heads = slice(2 * rank, 2 * rank + 2)
            local = {**b, "q": b["q"][:, 4 * rank : 4 * rank + 4], "key_cache": b["key_cache"][:, :, heads],
                     "value_cache": b["value_cache"][:, :, heads]}
            got.append(s.attend(layer, **local, scale=0.125, tp_rank=rank))
        torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=0)
    crossing = _plan()  # SOURCES: only layer 4 KV head 2 (rank 1) reads another shard, layer 2's head 0
    b = batches[0][0]
    local = {**b, "q": b["q"][:, 4:], "key_cache": b["key_cache"][:, :, 2:], "value_cache": b["value_cache"][:, :, 2:]}
    with pytest.raises(ValueError, match=r"head_sources: crosses tensor-parallel shards at TP degree 2 \(1 entries; "
                       r"first: layer 4 KV head 2 on rank 1 takes layer 2 head 0 on rank 0\)"):
        PagedKascadeStrategy(crossing, backend="reference").attend(0, **local, tp_rank=1)


def test_errors_name_the_argument():
    plan = _plan()
    batches = _batches()
    paged = PagedKascadeStrategy(plan, backend="reference")
    with pytest.raises(RuntimeError, match=r"layer 3 takes keys from layers \[2\], which did not run"):
        paged.attend(3, **batches[3][0])  # layer 2 did not run
    b = batches[0][0]
    with pytest.raises(ValueError, match="num_kv_heads: expected the plan's 4 KV heads or a shard of them"):
        paged.attend(0, **{**b, "q": b["q"][:, :6], "key_cache": b["key_cache"][:, :, :3],
                           "value_cache": b["value_cache"][:, :, :3]})
    sel = paged_select(b["q"], b["key_cache"], b["block_table"], b["seq_lens"], b["query_start_loc"], k_min=64)
    other = paged_select(b["q"], b["key_cache"], b["block_table"], b["seq_lens"], b["query_start_loc"], rho=0.5,
                         k_min=64)  # another budget: other counts
    with pytest.raises(ValueError, match="selections: expected selections of one step"):
        paged_gather_heads([sel, other], torch.tensor([0, 1, 4, 5]))
    with pytest.raises(ValueError, match="selections: expected PagedSelections, got Selection"):
        paged_gather_heads([sel, sel.request(0)], torch.tensor([0, 1, 4, 5]))
    assert isinstance(paged_gather_heads([sel, sel], torch.tensor([0, 5, 2, 7])), PagedSelection)


# ----------------------------------------------------------------------------------------------
# the Triton kernels (CPU interpreter without a GPU)
# ----------------------------------------------------------------------------------------------


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_kernels_match_reference():
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    plan = _plan()
    mix = dict(seq_lens=[300, 170, 40, 211], q_lens=[1, 64, 40, 1])  # MIXED less its costliest prefills (interpreter)
    batches = [{k: v.to(dev) for k, v in b[0].items()} for b in _batches(dtype=torch.bfloat16, mix=mix)]
    kern = PagedKascadeStrategy(plan, backend="triton")
    ref = PagedKascadeStrategy(plan, backend="reference")
    same = total = 0
    for layer in range(LAYERS):
        a = kern.attend(layer, **batches[layer], scale=0.125)
        b = ref.attend(layer, **batches[layer], scale=0.125)
        assert a.dtype == torch.bfloat16 and not torch.isnan(a).any()
        # bf16 outputs round at 2^-8 relative (~4e-3); a set that differs in a near-tied key moves the
        # output by less than that key's small weight: 2e-2 as in test_paged_kernels
        assert _rel(a, b) < 2e-2, (layer, _rel(a, b))
        if layer in kern.state:
            sa, sb = kern.state[layer][1], ref.state[layer][1]
            assert torch.equal(sa.counts, sb.counts) and sa.num_kv_heads == sb.num_kv_heads
            for r in range(sa.num_requests):
                for u in range(sa.counts.shape[1]):
                    c = int(sa.counts[r, u])
                    for h in range(sa.num_kv_heads):
                        same += set(sa.indices[r, h, u, :c].tolist()) == set(sb.indices[r, h, u, :c].tolist())
                        total += 1
    assert total > 0 and same >= 0.95 * total, (same, total)  # the rest differ only in near-tied keys
