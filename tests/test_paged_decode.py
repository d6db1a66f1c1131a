"""PagedKascadeStrategy.attend_decode: a decode-only batch on the paged kernels without host synchronisation.

The serving path of a decode step (vLLM's CUDA-graph batch): every request has one new token, lengths stay
on the device, one launch of each paged decode kernel per layer. Checked against `attend` (the host-split
path, itself checked against the reference in test_paged_kernels / test_paged_head_granular) on the same
batch, layer by layer, for a head-granular plan (layer 0, an anchor, part-selecting layers with one and two
head views attending through stacked selections) and a layer-granular one (a head map over the anchor's
pool rows): the same counts, selections that differ at most in near-tied keys, outputs within bf16
rounding. A request padding the batch (seq_len 0, as vLLM pads a graph batch) is allowed and leaves the
other rows as they are. (The Triton interpreter is slow: the layers run are the ones whose code differs.)

No host synchronisation: on the CPU, those decode calls run with every tensor method that reads device
values (tolist, item, bool/int/float/index conversion, cpu, numpy, nonzero, boolean-mask indexing,
torch.equal / nonzero / unique / masked_select) failing when kascade code calls it, directly or through
torch's Python code (no_host_reads); the host-split path fails the same guard, so the guard sees what it
must. On a GPU (marked gpu): torch.cuda's sync debug mode in "error", and a CUDA graph of all layers
replayed for new lengths gives the eager result bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():  # the kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kascade.paged import PagedKascadeStrategy  # noqa: E402
from kascade.plan import Plan  # noqa: E402
from test_paged_head_granular import SOURCES  # noqa: E402
from test_paged_reference import make_batch  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# decode steps over 300 and 150 keys, one of at most k_min (40), and one padding request (0 keys)
LENS = [300, 40, 150]


def _plans():
    head = Plan(anchors=[0, 2], head_sources=SOURCES, rho=0.1, k_min=64, tile=32)
    layer = Plan(anchors=[0, 2], head_map=[[0, 1, 2, 3], [1, 0, 3, 2], [0, 1, 2, 3], [3, 3, 0, 1]], rho=0.1, k_min=64)
    return {"head_granular": head, "layer_granular": layer}


def _decode_batch(seed, lens=LENS, hq=8, hkv=4, d=32, block_size=16, pad=True, dev=DEV):
    """A decode batch (layout of kascade.paged) plus, with pad, one request of 0 keys (vLLM's null block 0)."""
    paged, _ = make_batch(lens, [1] * len(lens), hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=torch.bfloat16,
                          seed=seed)
    b = {k: v.to(dev) for k, v in paged.items()}
    if pad:
        b["q"] = torch.cat([b["q"], torch.randn_like(b["q"][:1])])
        b["block_table"] = torch.cat([b["block_table"], torch.zeros_like(b["block_table"][:1])])
        b["seq_lens"] = torch.cat([b["seq_lens"], torch.zeros_like(b["seq_lens"][:1])])
    return b


def _decode_args(b):
    return dict(q=b["q"], key_cache=b["key_cache"], value_cache=b["value_cache"], block_table=b["block_table"],
                seq_lens=b["seq_lens"])


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name,layers", [("head_granular", 4), ("layer_granular", 2)])
def test_decode_path_equals_host_split_path_without_reading_the_device(name, layers):
    """Head-granular layers 0-3: layer 0 (dense, selects), a part-selecting layer of one head view, an anchor,
    one of two views (the others' stacked selections); layer-granular 0-1: a head map over the anchor's pool
    rows. attend_decode runs under no_host_reads."""
    plan = _plans()[name]
    dec = PagedKascadeStrategy(plan, backend="triton")
    host = PagedKascadeStrategy(plan, backend="triton")
    n = len(LENS)
    same = total = 0
    for layer in range(layers):
        b = _decode_batch(seed=60 + layer)
        with no_host_reads():
            got = dec.attend_decode(layer, **_decode_args(b), scale=0.125)
        unpadded = {k: v[:n] for k, v in b.items() if k not in ("key_cache", "value_cache")}
        want = host.attend(layer, unpadded["q"], b["key_cache"], b["value_cache"], unpadded["block_table"],
                           unpadded["seq_lens"], torch.arange(n + 1, dtype=torch.int32, device=DEV), scale=0.125)
        assert got.shape == (n + 1, 8, 32) and got.dtype == torch.bfloat16 and not torch.isnan(got[:n]).any()
        # bf16 outputs round at 2^-8 relative; sets that differ in a near-tied key, and the request of at most
        # k_min keys (dense there, every key selected here: another summation order), move them by less
        assert _rel(got[:n], want) < 2e-2, (layer, _rel(got[:n], want))
        assert _rel(got[1], want[1]) < 2e-2, (layer, "short request")
        if layer in host.state:
            long_reqs, sh = host.state[layer]
            step, sd = dec.state[layer]
            assert step == ("decode", n + 1) and sd.num_kv_heads == sh.num_kv_heads
            for i, r in enumerate(long_reqs):
                c = int(sh.counts[i, 0])
                assert int(sd.counts[r, 0]) == c
                for h in range(sh.num_kv_heads):
                    same += set(sd.indices[r, h, 0, :c].tolist()) == set(sh.indices[i, h, 0, :c].tolist())
                    total += 1
            assert int(sd.counts[1, 0]) == LENS[1]  # the short request selects all of its keys
    assert total > 0 and same >= 0.95 * total, (same, total)  # the rest differ only in near-tied keys


@pytest.mark.parametrize("name,layers", [("head_granular", 4), ("layer_granular", 2)])
def test_decode_path_writes_into_the_callers_output(name, layers):
    """attend_decode(..., out=) (the vLLM backend hands its output buffer): the layers after 0 write into a strided
    view of it and return that view, bit for bit what they return without it; layer 0 (the dense callable's or
    the dense kernel's output) may return another tensor."""
    plan = _plans()[name]
    a, c = PagedKascadeStrategy(plan, backend="triton"), PagedKascadeStrategy(plan, backend="triton")
    for layer in range(layers):
        b = _decode_batch(seed=70 + layer)
        want = a.attend_decode(layer, **_decode_args(b), scale=0.125)
        buf = torch.full((b["q"].shape[0] + 2, 8 * 32 + 16), float("nan"), dtype=torch.bfloat16, device=DEV)
        out = buf[:, :8 * 32].view(-1, 8, 32)[: b["q"].shape[0]]  # rows of 8 x 32 at a wider stride, like vLLM's
        got = c.attend_decode(layer, **_decode_args(b), scale=0.125, out=out)
        assert torch.equal(got, want), layer
        if layer > 0:
            assert got.data_ptr() == out.data_ptr() and torch.equal(out, want)
            assert torch.isnan(buf[:, 8 * 32:]).all() and torch.isnan(buf[b["q"].shape[0]:]).all()  # nothing else
    b = _decode_batch(seed=79)
    s = PagedKascadeStrategy(plan, backend="triton")
    s.attend_decode(0, **_decode_args(b), scale=0.125)
    wrong = torch.empty(b["q"].shape[0], 8, 32, dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match=r"out: expected shape .* dtype torch.bfloat16"):
        s.attend_decode(1, **_decode_args(b), scale=0.125, out=wrong)


def test_decode_path_checks_its_batch():
    plan = _plans()["layer_granular"]
    b = _decode_batch(seed=1)
    with pytest.raises(ValueError, match="q / seq_lens / block_table: expected"):
        PagedKascadeStrategy(plan, backend="triton").attend_decode(0, **{**_decode_args(b), "seq_lens": b["seq_lens"][:2]})
    s = PagedKascadeStrategy(plan, backend="triton")
    with pytest.raises(RuntimeError, match="reuses anchor 0, which did not run"):
        s.attend_decode(1, **_decode_args(b))


def test_reference_backend_runs_attend_with_one_query_per_request():
    """On the reference backend attend_decode is attend with query_start_loc = 0..R (the CPU plugin's path)."""
    plan = _plans()["head_granular"]
    a, r = PagedKascadeStrategy(plan, backend="reference"), PagedKascadeStrategy(plan, backend="reference")
    n = len(LENS)
    for layer in range(3):
        b = _decode_batch(seed=90 + layer, pad=False, dev="cpu")
        b32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
        got = a.attend_decode(layer, **_decode_args(b32))
        want = r.attend(layer, b32["q"], b32["key_cache"], b32["value_cache"], b32["block_table"], b32["seq_lens"],
                        torch.arange(n + 1, dtype=torch.int32))
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# no host synchronisation
# ----------------------------------------------------------------------------------------------


class SyncFromKascade(AssertionError):
    pass


def _called_from_kascade() -> bool:
    """Whether the first frame above the patched method that is not torch's own belongs to kascade."""
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod == "torch" or mod.startswith("torch."):
            f = f.f_back
            continue
        return mod == "kascade" or mod.startswith("kascade.")
    return False


@contextlib.contextmanager
def no_host_reads():
    """Every way kascade code could read a device value on the host fails inside the context."""

    def guard(name, orig):
        def wrapper(*args, **kwargs):
            if _called_from_kascade():
                raise SyncFromKascade(f"kascade read a device value: {name}")
            return orig(*args, **kwargs)

        return wrapper

    getitem = torch.Tensor.__getitem__

    def masked_getitem(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts) and _called_from_kascade():
            raise SyncFromKascade("kascade indexed with a boolean mask")
        return getitem(self, idx)

    with contextlib.ExitStack() as stack:
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name))))
        for name in ("equal", "nonzero", "unique", "masked_select"):
            stack.enter_context(mock.patch.object(torch, name, guard(f"torch.{name}", getattr(torch, name))))
        stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__", masked_getitem))
        yield


def test_the_guard_catches_host_reads():
    """Not vacuous: the host-split path reads the lengths back (seq_lens.tolist()), and is caught."""
    s = PagedKascadeStrategy(_plans()["layer_granular"], backend="triton")
    b = _decode_batch(seed=3, pad=False)
    with no_host_reads(), pytest.raises(SyncFromKascade, match="Tensor.tolist"):
        s.attend(0, b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
                 torch.arange(b["q"].shape[0] + 1, dtype=torch.int32, device=DEV))
    with no_host_reads(), pytest.raises(SyncFromKascade, match="Tensor.__int__"):
        from kascade import reference
        reference.Selection(b["block_table"][:, None, None], b["seq_lens"][:, None], b["seq_lens"], 32, True).sets(0, 0)
    assert b["seq_lens"].tolist() == LENS  # and nothing is left patched


# ----------------------------------------------------------------------------------------------
# GPU: sync debug mode and CUDA-graph replay
# ----------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _full_plan():
    """32 q / 8 KV heads, 6 layers: anchors 0 and 2, part-selecting layers with one and two head views."""
    rows = [None, [[0, 0], None, [0, 2], None, [0, 4], None, [0, 6], None], None,
            [None, None, [2, 2], None, [2, 4], None, [2, 6], [2, 7]], [[1, 1], [3, 0], [2, 0], [0, 3]] * 2,
            [[2, 1], [2, 0], [2, 3], [2, 2], [2, 5], [2, 4], [2, 7], [2, 6]]]
    return Plan(anchors=[0, 2], head_sources=rows, rho=0.1, k_min=128, tile=32)


def _full_batch(lens, seed, pages=16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hq, hkv, d, r = 32, 8, 128, len(lens)
    max_pages = -(-max(lens) // pages) + 2
    num_blocks = r * max_pages + 5
    kc = torch.randn(num_blocks, pages, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
    vc = torch.randn(num_blocks, pages, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
    bt = torch.randperm(num_blocks, device="cuda", generator=g)[: r * max_pages].view(r, max_pages).to(torch.int32)
    q = torch.randn(r, hq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    return dict(q=q, key_cache=kc, value_cache=vc, block_table=bt,
                seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"))


@gpu
@needs_cuda
def test_decode_path_under_sync_debug_mode():
    plan = _full_plan()
    s = PagedKascadeStrategy(plan)
    b = _full_batch([40000, 777, 100, 20000], seed=0)
    for layer in range(6):  # warm-up: compiles the kernels, builds the routes' device tensors
        s.attend_decode(layer, **b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [s.attend_decode(layer, **b) for layer in range(6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(not torch.isnan(o).any() for o in outs)


@gpu
@needs_cuda
def test_decode_step_replays_in_a_cuda_graph():
    """All layers of a decode step captured once, replayed for other lengths and queries: the eager result."""
    plan = _full_plan()
    s = PagedKascadeStrategy(plan)
    b = _full_batch([40000, 777, 100, 20000, 0], seed=1)  # the last request pads the batch
    static = {k: v.clone() for k, v in b.items()}

    def step():
        return [s.attend_decode(layer, **static) for layer in range(6)]

    step()  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    new = _full_batch([30001, 5000, 128, 129, 3], seed=2)
    for k in ("q", "seq_lens"):
        static[k].copy_(new[k])
    graph.replay()
    torch.cuda.synchronize()
    eager = PagedKascadeStrategy(plan)
    want = [eager.attend_decode(layer, **{**static}) for layer in range(6)]
    for layer in range(6):
        assert torch.equal(outs[layer][:4], want[layer][:4]), layer
