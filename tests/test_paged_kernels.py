"""kascade.paged on the Triton kernels (kascade.paged_kernels) against kascade.paged on the reference.

The mixed batch of test_paged_reference (decode steps, a whole prompt, prompt chunks on top of a
cache, a short request, one without new tokens) in bf16, through the kernels in Triton's CPU
interpreter: the same counts, selections that differ at most in near-tied keys, and outputs within
bf16 rounding of the reference path's.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kascade.paged import PagedKascadeStrategy, paged_select  # noqa: E402
from kascade.plan import Plan  # noqa: E402
from test_paged_reference import MIXED, make_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _on(batch, values=True):
    return {k: v.to(DEV) for k, v in batch.items() if values or k != "value_cache"}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_paged_select_kernels_match_reference():
    paged, _ = make_batch(**MIXED, hq=8, hkv=2, dtype=torch.bfloat16, seed=3)
    paged = _on(paged, values=False)
    a = paged_select(**paged, rho=0.1, k_min=16, backend="triton")
    b = paged_select(**paged, rho=0.1, k_min=16, backend="reference")
    assert torch.equal(a.counts, b.counts) and torch.equal(a.first_tile, b.first_tile)
    assert torch.equal(a.decode, b.decode)
    same = total = 0
    for r in range(a.num_requests):
        for u in range(a.counts.shape[1]):
            c = int(a.counts[r, u])
            for h in range(a.num_kv_heads):
                sa, sb = set(a.indices[r, h, u, :c].tolist()), set(b.indices[r, h, u, :c].tolist())
                assert -1 not in sa and len(sa) == c
                same += sa == sb
                total += 1
            assert (a.indices[r, :, u, c:] == -1).all()
    assert same >= 0.95 * total, (same, total)  # the rest differ only in near-tied keys


def test_paged_strategy_kernels_match_reference():
    plan = Plan(anchors=[0, 2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]], rho=0.1, k_min=64)
    batches = [_on(make_batch(**MIXED, hq=8, hkv=2, dtype=torch.bfloat16, seed=20 + layer)[0]) for layer in range(4)]
    kern = PagedKascadeStrategy(plan, backend="triton")
    ref = PagedKascadeStrategy(plan, backend="reference")
    for layer in range(4):
        a = kern.attend(layer, **batches[layer], scale=0.125)
        b = ref.attend(layer, **batches[layer], scale=0.125)
        assert a.dtype == torch.bfloat16 and not torch.isnan(a).any()
        assert _rel(a, b) < 2e-2, (layer, _rel(a, b))


def test_triton_backend_refuses_float32():
    paged, _ = make_batch(**MIXED)
    with pytest.raises(ValueError, match="backend: 'triton' needs float16/bfloat16"):
        paged_select(**_on(paged, values=False), backend="triton")
