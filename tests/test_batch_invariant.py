"""Batch invariance of the paged decode kernels (kascade.kernels.decode CONFIG["batch_invariant"], which vLLM's
VLLM_BATCH_INVARIANT=1 turns on): a request's output in every layer is bitwise the same alone and beside other
requests. Without it the splits per row follow the batch size, so the partial sums, and the output's rounding,
change with the batch. Run in Triton's CPU interpreter (bf16, as the kernels run) at a few hundred keys a request,
and on a GPU at tens of thousands, where a batch of one spreads each request over many more splits than a batch
of four (at a few hundred keys both take the few splits their keys fill, and round alike).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from test_paged_reference import make_batch  # noqa: E402

from kascade.kernels import decode  # noqa: E402
from kascade.paged import PagedKascadeStrategy  # noqa: E402
from kascade.plan import Plan  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = Plan(anchors=[0, 2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]], rho=0.1, k_min=16)
HKV = 2


def outputs(batch: dict, requests: int) -> list:
    """Every layer's decode output of the first `requests` requests of batch, run as one step."""
    strategy = PagedKascadeStrategy(PLAN, backend="triton")
    q, bt, lens = batch["q"][:requests], batch["block_table"][:requests], batch["seq_lens"][:requests]
    return [strategy.attend_decode(layer, q, batch["key_cache"], batch["value_cache"], bt, lens, scale=0.25)
            for layer in range(PLAN.num_layers)]


SCALE = 40 if DEVICE.type == "cuda" else 1  # keys per request: see the module docstring


@pytest.fixture
def batch():
    lens = [n * SCALE for n in (700, 310, 520, 260)]
    b, _ = make_batch(lens, [1, 1, 1, 1], hq=8, hkv=HKV, d=16, dtype=torch.bfloat16, seed=3)
    return {k: v.to(DEVICE) for k, v in b.items()}


def test_a_request_decodes_alike_alone_and_in_a_batch(batch, monkeypatch):
    dims = lambda b: dict(B=b, HKV=HKV)  # noqa: E731 - what _step_splits reads
    per_sm = decode.CONFIG["logits"]["per_sm"]
    monkeypatch.setitem(decode.CONFIG, "batch_invariant", False)
    assert decode._step_splits(dims(1), DEVICE, per_sm) != decode._step_splits(dims(4), DEVICE, per_sm)
    alone, together = outputs(batch, 1), outputs(batch, 4)
    assert any(not torch.equal(a[0], t[0]) for a, t in zip(alone, together)), "the batch should change the rounding"
    monkeypatch.setitem(decode.CONFIG, "batch_invariant", True)
    assert decode._step_splits(dims(1), DEVICE, per_sm) == decode._step_splits(dims(4), DEVICE, per_sm)
    alone, together = outputs(batch, 1), outputs(batch, 4)
    for layer, (a, t) in enumerate(zip(alone, together)):
        assert torch.equal(a[0], t[0]), f"layer {layer}: request 0 differs between a batch of 1 and of 4"


def test_vllm_batch_invariant_mode_turns_it_on(monkeypatch):
    pytest.importorskip("vllm")
    from vllm import envs

    from kascade.integrations import vllm_adapter

    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert vllm_adapter.batch_invariant() == bool(envs.VLLM_BATCH_INVARIANT) is True
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    assert vllm_adapter.batch_invariant() is False
