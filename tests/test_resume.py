"""Requests resumed by recomputation (kascade.resume): their generated tokens attend as the decode steps they were.

A step's batch holds a resumed request (its whole prompt and 40 generated tokens at once), a chunk that crosses
its prompt's end, a decode step, a whole prompt, a request of at most k_min keys and one without new tokens.
With each request's prompt length (`decode_from`), PagedKascadeStrategy.attend must give every generated token
exactly what it got as a decode step of its own pass, and every prompt token what the prompt's prefill gave.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kascade.paged import PagedKascadeStrategy, paged_dense
from kascade.plan import Plan
from kascade.resume import split_generated
from test_paged_head_granular import SOURCES
from test_paged_reference import make_batch

LAYERS = len(SOURCES)
# seq_lens, new tokens and prompt lengths of the step's requests
SEQ = [300, 333, 211, 257, 40, 90]
NEW = [300, 45, 1, 257, 40, 0]
PROMPT = [260, 300, 150, 257, 30, 80]
PLANS = {"head": dict(anchors=[0, 2], head_sources=SOURCES),
         "layer": dict(anchors=[0, 2, 4], head_map=[[0, 1, 2, 3], [1, 0, 3, 2]] * (LAYERS // 2))}


def _plan(kind) -> Plan:
    return Plan(**{**PLANS[kind], "rho": 0.1, "k_min": 64, "tile": 32})


def _batches():
    return [make_batch(SEQ, NEW, hq=8, hkv=4, d=32, seed=70 + layer)[0] for layer in range(LAYERS)]


def _one_request(b, r, first, last):
    """Request r's tokens at positions first..last-1 as a batch of their own (the keys up to `last`)."""
    qsl = torch.tensor([0] + NEW).cumsum(0).tolist()
    rows = slice(qsl[r] + first - (SEQ[r] - NEW[r]), qsl[r] + last - (SEQ[r] - NEW[r]))
    return dict(q=b["q"][rows], key_cache=b["key_cache"], value_cache=b["value_cache"],
                block_table=b["block_table"][r : r + 1], seq_lens=torch.tensor([last], dtype=torch.int32),
                query_start_loc=torch.tensor([0, last - first], dtype=torch.int32)), rows


def _uninterrupted(plan, batches, r):
    """Request r's output rows as an engine that never preempted it computes them: its prompt part in one pass,
    then each generated token in a pass of its own (a decode step)."""
    first, n = SEQ[r] - NEW[r], SEQ[r]
    pieces = ([(first, min(n, PROMPT[r]))] if PROMPT[r] > first else []) + [(p, p + 1) for p in
                                                                             range(max(first, PROMPT[r]), n)]
    out = [[] for _ in range(LAYERS)]
    for a, b in pieces:
        s = PagedKascadeStrategy(plan, backend="reference")
        for layer in range(LAYERS):
            batch, _ = _one_request(batches[layer], r, a, b)
            out[layer].append(s.attend(layer, **batch, scale=0.125))
    return [torch.cat(o) for o in out]


def test_split_generated_cuts_each_request_at_its_prompt_length():
    split = split_generated(SEQ, torch.tensor([0] + NEW).cumsum(0).tolist(), PROMPT)
    # request 0: its prompt (260 tokens) then 40 decode steps; request 1: the chunk's 12 prompt tokens (288..299)
    # then 33 decode steps; requests 2-5 unchanged (a decode step, a prompt, a short request cut like the
    # others, a request without new tokens)
    assert split.origin == (0,) * 41 + (1,) * 34 + (2, 3) + (4,) * 11 + (5,)
    assert split.seq_lens == ((260,) + tuple(range(261, 301)) + (300,) + tuple(range(301, 334)) + (211, 257) +
                              (30,) + tuple(range(31, 41)) + (90,))
    qsl = split.query_start_loc
    assert qsl[0] == 0 and qsl[1] == 260 and qsl[-1] == sum(NEW)
    assert all(b - a == 1 for a, b in zip(qsl[1:41], qsl[2:42]))  # the generated tokens: one new token each
    assert qsl[42] - qsl[41] == 12


def test_nothing_to_split():
    qsl = [0, 1, 301, 301]
    assert split_generated([500, 300, 90], qsl, [400, 300, 10]) is None  # a decode step, a prompt, no tokens
    assert split_generated([500, 300, 90], qsl, [10**9] * 3) is None
    with pytest.raises(ValueError, match=r"decode_from: expected one entry per request \(3"):
        split_generated([500, 300, 90], qsl, [1, 2])


@pytest.mark.parametrize("kind", ["head", "layer"])
def test_resumed_request_continues_as_if_never_interrupted(kind):
    plan = _plan(kind)
    batches = _batches()
    resumed = PagedKascadeStrategy(plan, backend="reference")
    plain = PagedKascadeStrategy(plan, backend="reference")
    got = [resumed.attend(layer, **batches[layer], scale=0.125, decode_from=PROMPT) for layer in range(LAYERS)]
    as_prefill = [plain.attend(layer, **batches[layer], scale=0.125) for layer in range(LAYERS)]
    qsl = torch.tensor([0] + NEW).cumsum(0).tolist()
    for r in (0, 1, 4):  # the requests with generated tokens among several new ones
        want = _uninterrupted(plan, batches, r)
        for layer in range(LAYERS):
            torch.testing.assert_close(got[layer][qsl[r] : qsl[r + 1]], want[layer], rtol=1e-5, atol=1e-5)
    for r in (2, 3):  # the decode step and the prompt: as without decode_from
        for layer in range(LAYERS):
            torch.testing.assert_close(got[layer][qsl[r] : qsl[r + 1]], as_prefill[layer][qsl[r] : qsl[r + 1]],
                                       rtol=0, atol=0)
    # not vacuous: re-attended as a prefill chunk, the generated tokens of request 0 attend to other keys
    gen = slice(qsl[0] + PROMPT[0], qsl[1])
    assert max((got[layer][gen] - as_prefill[layer][gen]).abs().max() for layer in range(1, LAYERS)) > 1e-3


def test_engine_dense_callback_is_called_with_the_steps_own_requests():
    """An engine's dense(requests) sees the step's requests (not the pieces); its rows land where they belong."""
    plan = _plan("head")
    batches = _batches()
    calls = []

    def engine_dense(layer):
        def dense(reqs):
            calls.append((layer, reqs))
            b = batches[layer]
            qsl = torch.tensor([0] + NEW).cumsum(0).tolist()
            rows = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in reqs])
            full = paged_dense(**b, scale=0.125)
            return full[rows]
        return dense

    with_engine = PagedKascadeStrategy(plan, backend="reference")
    alone = PagedKascadeStrategy(plan, backend="reference")
    for layer in range(LAYERS):
        a = with_engine.attend(layer, **batches[layer], scale=0.125, decode_from=PROMPT, dense=engine_dense(layer))
        b = alone.attend(layer, **batches[layer], scale=0.125, decode_from=PROMPT)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls[0] == (0, [0, 1, 2, 3, 4])  # layer 0: one call for every request with new tokens
    assert all(reqs == [4] for layer, reqs in calls[1:])  # then the short request only


def test_decode_only_mode_counts_generated_tokens_as_decode_steps():
    plan = _plan("layer")
    s = PagedKascadeStrategy(plan, backend="reference", sparse_prefill=False)
    qsl = [0, 300, 557]  # a resumed request (40 generated tokens) and a prompt
    assert s.dense_step(qsl)  # without prompt lengths: no request with one new token
    assert not s.dense_step(qsl, [300, 257], [260, 257])  # its generated tokens are decode steps
    assert s.dense_step(qsl, [300, 257], [300, 257])


def test_vllm_runners_record_prompt_lengths_in_batch_order(monkeypatch):
    """The adapter's wrappers of the two model runners' input preparation (no vLLM needed: stand-in classes with
    the attributes read) record each request's prompt length in batch order; prompt_lens answers for that step
    only, and gives requests past the recorded ones (padding, no new tokens) no limit."""
    import numpy as np

    from kascade.integrations import vllm_adapter as adapter

    monkeypatch.setitem(adapter._STEP, "record", None)
    assert adapter.prompt_lens([0, 5, 6]) is None

    class V1:
        input_batch = SimpleNamespace(num_prompt_tokens=np.array([260, 300, 150, 999]))

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            return "v1 inputs"

    class V2:
        req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.array([7, 150, 260, 300])))

        def prepare_inputs(self, scheduler_output, batch_desc):
            return SimpleNamespace(idx_mapping_np=np.array([2, 3, 1]), num_scheduled_tokens=np.array([300, 45, 1]))

    adapter._wrap_v1(V1)
    adapter._wrap_v2(V2)
    assert V1()._prepare_inputs(None, np.array([300, 45, 1])) == "v1 inputs"
    qsl = [0, 300, 345, 346]
    assert adapter.prompt_lens(qsl) == [260, 300, 150]
    assert adapter.prompt_lens(qsl + [346]) == [260, 300, 150, 2**62]  # a padding request
    assert adapter.prompt_lens([0, 300, 346]) is None  # another batch (a dummy run): nothing to read
    V2().prepare_inputs(None, None)
    assert adapter.prompt_lens(qsl) == [260, 300, 150]
