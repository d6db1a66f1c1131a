"""Pool rows through the paged path: an anchor resolves its selected positions to rows of the page pool once
(kascade.kernels.paging.resolve_rows), and every reuse layer of the same step gathers K/V by those rows
instead of looking each position's page up again (the page lookup cost prefill reuse 1.3x and decode reuse
1.35x on an H200: benchmarks/results/paged_h200_notes.md).

Checked in Triton's CPU interpreter without a GPU: the rows are the pages' rows of the selected positions;
reuse through them equals reuse through the page lookup bit for bit; and in PagedKascadeStrategy every reuse
kernel call of a step takes them, for the mixed path (attend: prefill chunks beside decode steps) and the
decode path (attend_decode), layer-granular and head-granular plans, also when the engine hands each layer
new views of the same block table (as vLLM does).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():  # the kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kascade.kernels import decode as KD, paging, prefill as KP  # noqa: E402
from kascade.paged import PagedKascadeStrategy, paged_reuse, paged_select  # noqa: E402
from kascade.plan import Plan  # noqa: E402
from test_paged_head_granular import SOURCES  # noqa: E402
from test_paged_reference import make_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# a decode step, a chunk on top of earlier keys, a request of at most k_min keys, another decode step
MIX = dict(seq_lens=[300, 170, 40, 211], q_lens=[1, 64, 40, 1])
DECODE = dict(seq_lens=[300, 170, 211], q_lens=[1, 1, 1])


def _batch(mix, seed, hkv=4):
    paged, _ = make_batch(**mix, hq=8, hkv=hkv, d=32, dtype=torch.bfloat16, seed=seed)
    return {k: v.to(DEV) for k, v in paged.items()}


@pytest.fixture
def spy(monkeypatch):
    """Records, per reuse kernel call, whether it gathered by pool rows (prefill and decode kernels)."""
    calls = []
    sparse_prefill, sparse_decode = KP._sparse, KD.sparse_attention_paged

    def prefill(*args, **kwargs):
        pool = args[12] if len(args) > 12 else kwargs.get("pool")
        calls.append(("prefill", pool is not None))
        return sparse_prefill(*args, **kwargs)

    def decode(q, cache, selection, *args, **kwargs):
        pool = getattr(selection, "pool", None)
        calls.append(("decode", pool is not None and pool.block_table is cache.block_table))
        return sparse_decode(q, cache, selection, *args, **kwargs)

    monkeypatch.setattr(KP, "_sparse", prefill)
    monkeypatch.setattr(KD, "sparse_attention_paged", decode)
    return calls


def test_select_resolves_each_slot_to_its_pages_row():
    b = _batch(MIX, seed=1)
    sel = paged_select(b["q"], b["key_cache"], b["block_table"], b["seq_lens"], b["query_start_loc"], rho=0.1,
                       k_min=64, backend="triton")
    assert sel.pool_rows is not None and sel.pool_table is b["block_table"]
    page = b["key_cache"].shape[1]
    for r in range(sel.num_requests):
        for u in range(sel.counts.shape[1]):
            c = int(sel.counts[r, u])
            pos = sel.indices[r, :, u, :c].long()
            want = b["block_table"][r].long()[pos // page] * page + pos % page
            assert torch.equal(sel.pool_rows[r, :, u, :c].long(), want), (r, u)


def test_reuse_by_pool_rows_equals_reuse_by_page_lookup(spy):
    b = _batch(MIX, seed=2)
    sel = paged_select(b["q"], b["key_cache"], b["block_table"], b["seq_lens"], b["query_start_loc"], rho=0.1,
                       k_min=64, backend="triton")
    args = (b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"], b["query_start_loc"])
    by_rows = paged_reuse(*args, sel, scale=0.125, backend="triton")
    assert spy and all(took for _, took in spy)
    spy.clear()
    by_pages = paged_reuse(*args, dataclasses.replace(sel, pool_rows=None, pool_table=None), scale=0.125,
                           backend="triton")
    assert spy and not any(took for _, took in spy)
    assert torch.equal(by_rows, by_pages)


def _run(plan, batches, decode: bool):
    """Every layer through one PagedKascadeStrategy, each handed fresh views of its batch's block table."""
    s = PagedKascadeStrategy(plan, backend="triton")
    outs = []
    for layer, b in enumerate(batches):
        b = {**b, "block_table": b["block_table"][:]}  # a new tensor object per layer, same memory
        if decode:
            outs.append(s.attend_decode(layer, b["q"], b["key_cache"], b["value_cache"], b["block_table"],
                                        b["seq_lens"], scale=0.125))
        else:
            outs.append(s.attend(layer, **b, scale=0.125))
    return outs


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("path", ["mixed", "decode"])
def test_every_reuse_call_of_a_step_takes_the_anchors_pool_rows(spy, monkeypatch, granularity, path):
    if granularity == "layer":
        plan = Plan(anchors=[0, 2], head_map=[[0, 1, 2, 3], [1, 0, 3, 2], [0, 1, 2, 3], [3, 2, 1, 0]], rho=0.1,
                    k_min=64, tile=32)
    else:
        plan = Plan(anchors=[0, 2], head_sources=SOURCES[:4], rho=0.1, k_min=64, tile=32)
    layers = len(plan.head_map) if granularity == "layer" else 4
    # one step: every layer reads the same pages (its own q and cache contents do not matter here)
    base = _batch(DECODE if path == "decode" else MIX, seed=3)
    batches = [{**base, "q": _batch(DECODE if path == "decode" else MIX, seed=10 + i)["q"]} for i in range(layers)]
    outs = _run(plan, batches, decode=path == "decode")
    assert spy and all(took for _, took in spy), spy
    spy.clear()
    monkeypatch.setattr(paging, "linear_pool", lambda cache: False)  # no pool rows: every layer looks pages up
    plain = _run(plan, batches, decode=path == "decode")
    assert spy and not any(took for _, took in spy)
    for layer, (a, b) in enumerate(zip(outs, plain)):
        assert torch.equal(a, b), layer
