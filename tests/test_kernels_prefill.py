"""Prefill kernels (kascade.kernels.prefill) against the reference.

Without CUDA the kernels run in Triton's CPU interpreter at small shapes (N up to ~200); the tests
marked `gpu` run the same checks at full size on a CUDA device.

Selections are compared as sets per (sequence, KV head, tile). Two float32 summations in different
orders can swap keys whose pooled scores agree to ~1e-6, so a key may differ only if its reference
score is within 1e-4 (relative) of the tile's k-th largest score; with random data that is rare.

Outputs: the reference computes in float32 and rounds the result to the input dtype once; the kernel
also rounds the probabilities to the input dtype before the P @ V product (as flash attention does),
which adds about one more rounding of the same size. So the kernel's error against the float32
result may be at most 3x the reference's own error in that dtype (measured: ~1.5-2x).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from kascade import reference as R  # noqa: E402
from kascade.budget import budget  # noqa: E402
from kascade.kernels import prefill as P  # noqa: E402
from kascade.kernels import prefill_topk  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# TRITON_INTERPRET is read when a function is decorated, so it must be set before triton is first
# imported (tests/conftest.py does that for the whole suite).
assert CUDA or type(triton.language.standard.zeros).__name__.startswith("Interpreted"), (
    "triton was imported before TRITON_INTERPRET=1 was set; run the tests through pytest from the repo root")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(P, "POISON_BUFFERS", True)


def _inputs(B, Hq, Hkv, Q, N, D, dtype, seed=0, dv=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Q, D, generator=g, device=DEV).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, N, dv or D, generator=g, device=DEV).to(dtype)
    return q, k, v


def _pooled_reference(q, k, kv_start, tile, scale):
    """{(b, t): [Hkv, tT] float32} reference pooled scores of every tile present in q."""
    kv = R.resolve_kv_start(kv_start, q, k)
    out = {}
    for b, s, *_, p0, i0 in R._sequences(q, k, kv):
        for ta, pooled in R.pooled_tile_scores(q[b, :, i0:], k[b, :, s:], p0, tile, scale):
            for u in range(pooled.shape[1]):
                out[(b, ta + u)] = pooled[:, u, : (ta + u) * tile]
    return out


def check_selection(sel, ref, q, k, kv_start=None, rel=1e-4):
    assert sel.tile == ref.tile and not sel.decode
    assert sel.first_tile.tolist() == ref.first_tile.tolist()
    u_ref = ref.counts.shape[1]
    assert torch.equal(sel.counts[:, :u_ref].cpu(), ref.counts.cpu())
    assert int(sel.counts[:, u_ref:].abs().sum()) == 0
    pooled = _pooled_reference(q, k, kv_start, ref.tile, q.shape[-1] ** -0.5)
    kv = R.resolve_kv_start(kv_start, q, k)
    n_diff = 0
    for b in range(q.shape[0]):
        s = int(kv[b])
        ft = int(ref.first_tile[b])
        for u in range(u_ref):
            c = int(ref.counts[b, u])
            for h in range(k.shape[1]):
                mine = sel.sets(b, h, u).cpu()
                theirs = ref.sets(b, h, u).cpu()
                assert mine.numel() == c and len(set(mine.tolist())) == c, (b, h, u)
                if c == 0:
                    continue
                n_keys = (ft + u) * ref.tile
                assert int(mine.min()) >= s and int(mine.max()) < s + n_keys, (b, h, u)
                diff = set(mine.tolist()) ^ set(theirs.tolist())
                if diff:
                    sc = pooled[(b, ft + u)][h].cpu()
                    kth = torch.topk(sc, c).values[-1]
                    for x in diff:
                        assert abs(float(sc[x - s] - kth)) <= rel * float(kth), (b, h, u, x)
                    n_diff += len(diff)
    return n_diff


def check_output(out, q, k, v, sel, head_map=None, kv_start=None, factor=3.0):
    assert not torch.isnan(out).any()
    exact = R.sparse_attention(q.float(), k.float(), v.float(), sel, head_map=head_map, kv_start=kv_start).float()
    own = R.sparse_attention(q, k, v, sel, head_map=head_map, kv_start=kv_start).float()
    e_ref = ((own - exact).norm() / exact.norm()).item()
    e_ker = ((out.float() - exact).norm() / exact.norm()).item()
    assert e_ker <= factor * e_ref + 1e-6, (e_ker, e_ref)
    return e_ker, e_ref


def _poisoned_out(q, v):
    return torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)


# ----------------------------------------------------------------------------------------------
# CPU interpreter (small) and GPU (full size) shapes
# ----------------------------------------------------------------------------------------------

SMALL = [  # (Hq, Hkv, D, dtype)
    (2, 2, 64, torch.bfloat16),  # G = 1
    (4, 2, 128, torch.float16),  # G = 2
    (8, 2, 64, torch.bfloat16),  # G = 4
    (8, 1, 16, torch.float16),  # G = 8: 256 stacked rows, two head groups
]
FULL = [  # (Hq, Hkv, D, dtype, N); N > 4096 + 32 sends the last tiles through the sampled-threshold path
    (32, 8, 128, torch.bfloat16, 8192),
    (32, 8, 128, torch.float16, 6000),
    (32, 32, 128, torch.bfloat16, 4500),
    (16, 8, 64, torch.bfloat16, 6000),
    (64, 8, 64, torch.bfloat16, 6000),
]


def _select_and_attend(Hq, Hkv, D, dtype, B, Q, N, rho, k_min, tile, kv_start=None, head_map=None, seed=0):
    q, k, v = _inputs(B, Hq, Hkv, Q, N, D, dtype, seed)
    ks = None if kv_start is None else torch.tensor(kv_start, device=DEV)
    sel = P.select(q, k, rho=rho, k_min=k_min, tile=tile, kv_start=ks)
    ref = R.select(q, k, rho=rho, k_min=k_min, tile=tile, kv_start=ks)
    check_selection(sel, ref, q, k, ks)
    hm = None if head_map is None else torch.tensor(head_map, device=DEV)
    out = P.sparse_attention(q, k, v, ref, head_map=hm, kv_start=ks, out=_poisoned_out(q, v))
    check_output(out, q, k, v, ref, hm, ks)
    out2 = P.sparse_attention(q, k, v, sel, head_map=hm, kv_start=ks)  # our own selection is accepted too
    check_output(out2, q, k, v, sel, hm, ks)


@pytest.mark.parametrize("Hq,Hkv,D,dtype", SMALL)
def test_select_and_sparse_small(Hq, Hkv, D, dtype):
    head_map = list(range(Hkv))[::-1]
    _select_and_attend(Hq, Hkv, D, dtype, B=1, Q=141, N=141, rho=0.3, k_min=8, tile=32, head_map=head_map)


def test_varlen_chunked_prefill_small():
    # two sequences, left padding 37 and 0, 70 new queries on top of a 170-key cache (partial first tiles)
    _select_and_attend(8, 2, 32, torch.bfloat16, B=2, Q=70, N=170, rho=0.25, k_min=5, tile=32, kv_start=[37, 0])


def test_padding_longer_than_queries_small():
    # the second sequence has fewer keys than there are query rows: its first rows are padding (zeros)
    q, k, v = _inputs(2, 4, 2, 40, 50, 32, torch.float16, seed=3)
    ks = torch.tensor([0, 30], device=DEV)
    sel = P.select(q, k, rho=0.5, k_min=4, tile=16, kv_start=ks)
    ref = R.select(q, k, rho=0.5, k_min=4, tile=16, kv_start=ks)
    check_selection(sel, ref, q, k, ks)
    out = P.sparse_attention(q, k, v, sel, kv_start=ks, out=_poisoned_out(q, v))
    assert torch.equal(out[1, :, :20], torch.zeros_like(out[1, :, :20]))
    check_output(out, q, k, v, sel, None, ks)


@pytest.mark.parametrize("tile", [16, 24])
def test_other_tiles_small(tile):
    _select_and_attend(4, 2, 64, torch.bfloat16, B=1, Q=100, N=100, rho=0.4, k_min=3, tile=tile, seed=tile)


def test_full_budget_equals_dense_small():
    # rho = 1 keeps every key: sparse attention is dense attention
    q, k, v = _inputs(1, 8, 2, 90, 90, 64, torch.bfloat16, seed=5)
    sel = P.select(q, k, rho=1.0, k_min=1, tile=32)
    assert sel.counts[0].tolist() == [32 * u for u in range(3)]
    out = P.sparse_attention(q, k, v, sel, out=_poisoned_out(q, v))
    dense = R.dense_attention(q.float(), k.float(), v.float())
    own = R.dense_attention(q, k, v).float()
    assert (out.float() - dense).norm() / dense.norm() <= 3 * (own - dense).norm() / dense.norm()


def test_k_min_above_n_selects_everything_small():
    q, k, _ = _inputs(1, 4, 1, 80, 80, 32, torch.float16, seed=6)
    sel = P.select(q, k, rho=0.1, k_min=1000, tile=32)
    for u in range(3):
        assert sorted(sel.sets(0, 0, u).tolist()) == list(range(32 * u))


def test_float32_falls_back_to_reference():
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, torch.float32, seed=7)
    sel = P.select(q, k, rho=0.3, k_min=4, tile=16)
    ref = R.select(q, k, rho=0.3, k_min=4, tile=16)
    assert torch.equal(sel.indices, ref.indices)
    torch.testing.assert_close(P.sparse_attention(q, k, v, sel), R.sparse_attention(q, k, v, ref))


def test_bad_selection_raises():
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, torch.bfloat16, seed=8)
    ref = R.select(q[:, :, 16:], k, rho=0.3, k_min=4, tile=16)  # made for other query positions
    with pytest.raises(ValueError, match="tiles"):
        P.sparse_attention(q, k, v, ref)


# ----------------------------------------------------------------------------------------------
# the top-k kernel on its own: threshold bracket, fallback, ties
# ----------------------------------------------------------------------------------------------


def _run_topk_rows(pooled, tile, counts, cap, sample):
    bsz, hkv, u_n, width = pooled.shape
    n_cache = u_n * tile
    indices = torch.full((bsz, hkv, u_n, int(counts.max())), -7, dtype=torch.int32, device=DEV)
    scratch = prefill_topk.topk_rows_scratch(bsz, hkv, u_n, DEV, cap=cap)
    kv = torch.zeros(bsz, dtype=torch.int32, device=DEV)
    prefill_topk.topk_rows_chunk(pooled, indices, counts, kv, scratch, 0, u_n, tile, n_cache, n_cache, width,
                                 cap=cap, sample=sample, block=128)
    return indices


@pytest.mark.parametrize("levels", [None, 3])
def test_topk_rows_bracket_fallback_and_ties(levels):
    # small CAP / SAMPLE so that rows of a few hundred keys take the sampled-bracket path; with only
    # three distinct values the bracket overflows and the radix select runs on the whole row, where
    # ties must go to the lowest positions
    tile, u_n, hkv = 32, 20, 2
    g = torch.Generator(device=DEV).manual_seed(11)
    pooled = torch.rand(1, hkv, u_n, u_n * tile, generator=g, device=DEV) * 3
    if levels is not None:
        pooled = torch.floor(pooled)
    n = torch.arange(u_n, device=DEV) * tile
    counts = torch.tensor([[budget(int(x), 0.3, 20) for x in n]], dtype=torch.int32, device=DEV)
    indices = _run_topk_rows(pooled, tile, counts, cap=64, sample=32)
    for h in range(hkv):
        for u in range(u_n):
            c, nk = int(counts[0, u]), int(n[u])
            got = sorted(indices[0, h, u, :c].tolist())
            row = pooled[0, h, u, :nk]
            # expected: the c largest, ties broken towards lower positions
            order = sorted(range(nk), key=lambda j: (-float(row[j]), j))[:c]
            assert got == sorted(order), (h, u)


# ----------------------------------------------------------------------------------------------
# GPU, full size
# ----------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("Hq,Hkv,D,dtype,N", FULL)
def test_select_and_sparse_full(Hq, Hkv, D, dtype, N):
    head_map = torch.randperm(Hkv, generator=torch.Generator().manual_seed(1)).tolist()
    _select_and_attend(Hq, Hkv, D, dtype, B=1, Q=N, N=N, rho=0.1, k_min=128, tile=32, head_map=head_map)


@gpu
@needs_cuda
def test_varlen_chunked_prefill_full():
    _select_and_attend(32, 8, 128, torch.bfloat16, B=3, Q=3000, N=5000, rho=0.1, k_min=128, tile=32,
                       kv_start=[0, 1111, 4000])


@gpu
@needs_cuda
def test_small_chunks_full():
    # a small chunk budget forces many pooled-score chunks; results must not change
    q, k, _ = _inputs(1, 32, 8, 4096, 4096, 128, torch.bfloat16, seed=9)
    a = P.select(q, k, rho=0.1, k_min=128, tile=32)
    b = P.select(q, k, rho=0.1, k_min=128, tile=32, chunk_bytes=8 * 4096 * 4 * 7)
    assert torch.equal(a.counts, b.counts)
    for u in range(a.counts.shape[1]):
        c = int(a.counts[0, u])
        assert torch.equal(a.indices[0, :, u, :c].sort(-1).values, b.indices[0, :, u, :c].sort(-1).values)


@gpu
@needs_cuda
def test_torch_topk_method_matches_full():
    q, k, _ = _inputs(1, 32, 8, 4096, 4096, 128, torch.bfloat16, seed=10)
    a = P.select(q, k, rho=0.1, k_min=128, tile=32)
    b = P.select(q, k, rho=0.1, k_min=128, tile=32, method="torch")
    ref = R.select(q, k, rho=0.1, k_min=128, tile=32)
    check_selection(a, ref, q, k)
    check_selection(b, ref, q, k)


def test_pool_kernel_name_is_checked():
    q, k, _ = _inputs(1, 4, 2, 64, 64, 16, torch.float16 if CUDA else torch.float32, seed=2)
    if q.dtype == torch.float32:  # the reference fallback takes float32: no kernel, nothing to check
        q, k = q.half(), k.half()
    with pytest.raises(ValueError, match=r"pool kernel .*expected 'triton' or 'gluon', got 'cuda'"):
        P.select(q, k, rho=0.5, k_min=8, tile=16, pool_cfg={"kernel": "cuda"})


@gpu
@needs_cuda
@pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability()[0] == 9), reason="needs a Hopper GPU (wgmma)")
@pytest.mark.parametrize("N,cfg", [(8192, {}), (5000, dict(BLOCK_N=128, NBUF=3, maxnreg=None)),
                                   (5000, dict(BLOCK_N=64, NBUF=3))])
def test_gpu_gluon_pooled_pass_matches_triton(N, cfg):
    """The Gluon pooled-score pass (kascade.kernels.prefill_pool_gluon) selects the Triton pass's keys:
    the same sets but for near-ties (the two kernels round the log-sum-exps in a different order), and
    both agree with the float64-checked reference rule."""
    from kascade.kernels import prefill_pool_gluon as PG

    q, k, _ = _inputs(1, 32, 8, N, N, 128, torch.bfloat16, seed=N % 97)
    assert PG.supported(q, k, 4, 32, 1, False)
    a = P.select(q, k, rho=0.1, k_min=128, tile=32, pool_cfg={"kernel": "triton"})
    b = P.select(q, k, rho=0.1, k_min=128, tile=32, pool_cfg=dict(cfg, kernel="gluon"))
    assert torch.equal(a.counts, b.counts)
    ref = R.select(q, k, rho=0.1, k_min=128, tile=32)
    check_selection(a, ref, q, k)
    check_selection(b, ref, q, k)
