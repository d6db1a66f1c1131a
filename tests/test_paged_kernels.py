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


def test_kernel_calls_take_the_steps_host_lengths(monkeypatch):
    """Every PagedKV the kernel path builds carries the step's host lengths, so no kernel call reads seq_lens
    back from the device (one copy per request and layer otherwise)."""
    from kascade.kernels.paging import PagedKV

    seen = []
    host_lengths = PagedKV.host_lengths

    def spy(self):
        seen.append(self.host_seq_lens)
        return host_lengths(self)

    monkeypatch.setattr(PagedKV, "host_lengths", spy)
    plan = Plan(anchors=[0, 2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]], rho=0.1, k_min=64)
    batch = _on(make_batch(**MIXED, hq=8, hkv=2, dtype=torch.bfloat16, seed=21)[0])
    kern = PagedKascadeStrategy(plan, backend="triton")
    for layer in range(4):
        kern.attend(layer, **batch, scale=0.125)
    assert seen and all(h is not None for h in seen), seen
    lens = MIXED["seq_lens"]
    assert {h for h in seen if len(h) == 1} <= {(n,) for n in lens}


def test_paged_kv_checks_its_host_lengths():
    from kascade.kernels.paging import PagedKV

    kc = torch.zeros(4, 16, 2, 8)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    sl = torch.tensor([5, 17], dtype=torch.int32)
    assert PagedKV(kc, None, bt, sl, (5, 17)).host_lengths() == (5, 17)
    assert PagedKV(kc, None, bt, sl).host_lengths() == (5, 17)
    with pytest.raises(ValueError, match="host_seq_lens: expected None or a tuple of 2 ints"):
        PagedKV(kc, None, bt, sl, (5,))
    with pytest.raises(ValueError, match="seq_lens: expected values in"):
        PagedKV(kc, None, bt, sl, (5, 99)).host_lengths()
