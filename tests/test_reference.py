"""kascade.reference against the naive loops of tests/naive.py and against torch SDPA."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kascade import reference as R
from kascade.budget import budget, budget_tensor
from naive import naive_selection, naive_sparse


def _inputs(seed, B, Hq, Hkv, Q, N, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Q, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    return q, k, v


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([4, 8, 16]))
    N = draw(st.integers(1, 70))
    Q = draw(st.sampled_from([1, N, max(1, N // 2), min(N, 5)]))
    tile = draw(st.sampled_from([4, 8, 16]))
    kv_start = [draw(st.integers(0, N - 1)) for _ in range(B)]
    rho = draw(st.sampled_from([0.05, 0.1, 0.3, 0.5, 1.0]))
    k_min = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, Hq=Hkv * G, Hkv=Hkv, Q=Q, N=N, D=D, tile=tile, kv_start=kv_start, rho=rho, k_min=k_min, seed=seed)


def _selection_sets(sel, Q, N, kv_start, tile):
    """The reference Selection as {(b, h, i): set} keyed like naive_selection."""
    out = {}
    B, Hkv = sel.indices.shape[:2]
    for b in range(B):
        s0 = int(kv_start[b])
        for i in range(Q):
            p = N - Q + i - s0
            if p < 0:
                continue
            u = 0 if sel.decode else p // tile - int(sel.first_tile[b])
            for h in range(Hkv):
                out[(b, h, i)] = set(sel.sets(b, h, u).tolist())
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_reference_matches_naive(pb):
    q, k, v = _inputs(pb["seed"], pb["B"], pb["Hq"], pb["Hkv"], pb["Q"], pb["N"], pb["D"])
    qa, ka, _ = _inputs(pb["seed"] + 1, pb["B"], pb["Hq"], pb["Hkv"], pb["Q"], pb["N"], pb["D"])  # the anchor layer
    ks = torch.tensor(pb["kv_start"])
    sel = R.select(qa, ka, rho=pb["rho"], k_min=pb["k_min"], tile=pb["tile"], kv_start=ks)
    want = naive_selection(qa, ka, ks, pb["rho"], pb["k_min"], pb["tile"])
    got = _selection_sets(sel, pb["Q"], pb["N"], ks, pb["tile"])
    assert got == want
    head_map = torch.randint(0, pb["Hkv"], (pb["Hkv"],), generator=torch.Generator().manual_seed(pb["seed"]))
    out = R.sparse_attention(q, k, v, sel, head_map=head_map, kv_start=ks)
    ref = naive_sparse(q, k, v, want, head_map, ks, pb["tile"])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("Q,N", [(64, 64), (1, 64), (20, 90)])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_full_budget_equals_dense_and_sdpa(Q, N, G):
    """rho = 1: every prior key is selected, so Kascade equals dense, which equals SDPA."""
    q, k, v = _inputs(G * 100 + Q, 2, 2 * G, 2, Q, N, 16)
    dense = R.dense_attention(q, k, v)
    sel = R.select(q, k, rho=1.0, k_min=1, tile=8)
    torch.testing.assert_close(R.sparse_attention(q, k, v, sel), dense, atol=1e-6, rtol=1e-6)
    mask = torch.ones(Q, N, dtype=torch.bool).tril(N - Q)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)
    torch.testing.assert_close(dense, sdpa, atol=1e-5, rtol=1e-5)


def test_left_padding_equals_unpadded():
    """A left-padded sequence gives the rows it would give alone."""
    q, k, v = _inputs(3, 1, 4, 2, 40, 40, 8)
    pad = 9
    kp = torch.cat([torch.randn(1, 2, pad, 8), k], dim=2)
    vp = torch.cat([torch.randn(1, 2, pad, 8), v], dim=2)
    qp = torch.cat([torch.randn(1, 4, pad, 8), q], dim=2)
    for rho in (0.2, 1.0):
        a = R.sparse_attention(q, k, v, R.select(q, k, rho=rho, k_min=2, tile=8))
        ks = torch.tensor([pad])
        b = R.sparse_attention(qp, kp, vp, R.select(qp, kp, rho=rho, k_min=2, tile=8, kv_start=ks), kv_start=ks)
        torch.testing.assert_close(b[:, :, pad:], a)
        assert torch.count_nonzero(b[:, :, :pad]) == 0  # padded query rows are zeros


def test_chunked_prefill_tiles_like_whole_prompt():
    """A chunk starting on a tile boundary on top of a cache equals those rows of the whole prefill."""
    q, k, v = _inputs(5, 1, 4, 2, 96, 96, 8)
    whole = R.sparse_attention(q, k, v, R.select(q, k, rho=0.25, k_min=4, tile=16))
    qc = q[:, :, 64:]
    part = R.sparse_attention(qc, k, v, R.select(qc, k, rho=0.25, k_min=4, tile=16))
    torch.testing.assert_close(part, whole[:, :, 64:])


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_low_precision_inputs(dtype, tol):
    """Computed in float32 internally: the only error is rounding of inputs and output (~ one ulp of dtype)."""
    q, k, v = _inputs(7, 2, 8, 2, 50, 50, 16)
    sel = R.select(q, k, rho=0.3, k_min=4, tile=8)
    ref = R.sparse_attention(q, k, v, sel)
    out = R.sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), sel)
    assert out.dtype == dtype
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < tol


def test_chunking_does_not_change_results():
    """Tiny chunk budgets (one row / one tile at a time) give the same numbers as one big chunk."""
    q, k, v = _inputs(11, 1, 4, 2, 70, 70, 8)
    big = R.select(q, k, rho=0.2, k_min=3, tile=8)
    small = R.select(q, k, rho=0.2, k_min=3, tile=8, max_chunk_bytes=1)
    assert torch.equal(big.indices, small.indices)
    torch.testing.assert_close(R.sparse_attention(q, k, v, big, max_chunk_bytes=1), R.sparse_attention(q, k, v, big))
    torch.testing.assert_close(R.dense_attention(q, k, v, max_chunk_bytes=1), R.dense_attention(q, k, v))


def test_budget_definition():
    assert budget(0, 0.1, 128) == 0
    assert budget(100, 0.1, 128) == 100  # k_min > n: everything
    assert budget(2000, 0.1, 128) == 200
    assert budget(1000, 0.1, 128) == 128
    assert budget(100, 0.29, 1) == 29  # 0.29 * 100 is 28.999999999999996 in floats
    n = torch.arange(0, 5000, 7)
    assert budget_tensor(n, 0.1, 128).tolist() == [budget(int(x), 0.1, 128) for x in n]


def test_selection_counts_follow_rolling_budget():
    q, k, _ = _inputs(13, 1, 2, 1, 128, 128, 8)
    sel = R.select(q, k, rho=0.25, k_min=5, tile=16)
    assert sel.counts[0].tolist() == [budget(t * 16, 0.25, 5) for t in range(8)]
    for u in range(8):
        idx = sel.sets(0, 0, u)
        assert bool((idx < u * 16).all()) and len(set(idx.tolist())) == len(idx)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.randn(1, 4, 5), k=None, v=None), "q: expected 4 dims"),
        (dict(q=torch.randn(1, 3, 5, 8), k=torch.randn(1, 2, 5, 8)), "KV heads dividing"),
        (dict(q=torch.randn(1, 2, 5, 8), k=torch.randn(1, 2, 5, 4)), "head_dim"),
        (dict(q=torch.randn(1, 2, 6, 8), k=torch.randn(1, 2, 5, 8)), "seq_len <= the cache length"),
        (dict(q=torch.randn(1, 2, 5, 8), k=torch.randn(1, 2, 5, 8).half()), "dtype and device"),
        (dict(q=torch.randint(0, 3, (1, 2, 5, 8)), k=torch.randn(1, 2, 5, 8)), "float32, float16 or bfloat16"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    q = kwargs["q"]
    k = kwargs.get("k") if kwargs.get("k") is not None else torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=match):
        R.select(q, k)


@pytest.mark.parametrize("rho,k_min,tile,match", [(0.0, 1, 8, "rho"), (1.5, 1, 8, "rho"), (0.1, 0, 8, "k_min"),
                                                  (0.1, 1, 0, "tile")])
def test_bad_budgets_raise(rho, k_min, tile, match):
    q, k, _ = _inputs(0, 1, 2, 1, 4, 4, 8)
    with pytest.raises(ValueError, match=match):
        R.select(q, k, rho=rho, k_min=k_min, tile=tile)


def test_bad_kv_start_and_head_map_raise():
    q, k, v = _inputs(0, 2, 4, 2, 4, 10, 8)
    with pytest.raises(ValueError, match="kv_start"):
        R.select(q, k, kv_start=torch.tensor([0, 10]))
    sel = R.select(q, k, rho=0.5, k_min=1, tile=2)
    with pytest.raises(ValueError, match="head_map"):
        R.sparse_attention(q, k, v, sel, head_map=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="selection"):
        R.sparse_attention(q[:, :, :1], k, v, sel)


def test_memory_bound_has_no_quadratic_temporaries():
    """The largest temporary is bounded by max_chunk_bytes (plus one row), never N x N per head."""
    N, Hq = 2048, 4
    q, k, v = _inputs(1, 1, Hq, 2, N, N, 8)
    budget_bytes = 4 * 2**20  # 4 MiB, while one full score matrix is Hq * N * N * 4 = 64 MiB
    rows = R._rows_per_chunk(Hq, N, budget_bytes)
    assert Hq * rows * N * 4 <= budget_bytes < Hq * N * N * 4
    sel = R.select(q, k, rho=0.1, k_min=8, tile=32, max_chunk_bytes=budget_bytes)
    assert sel.indices.shape[2] == math.ceil(N / 32)


@pytest.mark.parametrize("Q", [1, 5])
def test_kv_len_equals_cutting_the_unwritten_tail(Q):
    """kv_len [B] on a preallocated cache gives what each sequence's written keys give alone; the tail
    (NaN here, as never-written memory could hold) is never read."""
    q, k, v = _inputs(7, 2, 4, 2, Q, 60, 8)
    lens, starts = [45, 60], [3, 0]
    kt = k.clone()
    vt = v.clone()
    kt[0, :, 45:] = float("nan")
    vt[0, :, 45:] = float("nan")
    kl, ks = torch.tensor(lens), torch.tensor(starts)
    for rho in (0.2, 1.0):
        sel = R.select(q, kt, rho=rho, k_min=2, tile=8, kv_start=ks, kv_len=kl)
        out = R.sparse_attention(q, kt, vt, sel, kv_start=ks, kv_len=kl)
        dense = R.dense_attention(q, kt, vt, kv_start=ks, kv_len=kl)
        for b in range(2):
            e, s = lens[b], torch.tensor([starts[b]])
            qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e]
            sel_b = R.select(qb, kb, rho=rho, k_min=2, tile=8, kv_start=s)
            assert torch.equal(sel.counts[b:b + 1, : sel_b.counts.shape[1]], sel_b.counts)
            for h in range(2):
                for u in range(sel_b.counts.shape[1]):
                    assert torch.equal(sel.sets(b, h, u), sel_b.sets(0, h, u))
            torch.testing.assert_close(out[b:b + 1], R.sparse_attention(qb, kb, vb, sel_b, kv_start=s))
            torch.testing.assert_close(dense[b:b + 1], R.dense_attention(qb, kb, vb, kv_start=s))
        assert torch.isfinite(out).all() and torch.isfinite(dense).all()


def test_bad_kv_len_raises():
    q, k, v = _inputs(8, 2, 4, 2, 3, 20, 8)
    with pytest.raises(ValueError, match="kv_len"):
        R.dense_attention(q, k, v, kv_len=torch.tensor([2, 20]))  # fewer keys than queries
    with pytest.raises(ValueError, match="kv_len"):
        R.dense_attention(q, k, v, kv_len=torch.tensor([21, 20]))  # beyond the cache
    with pytest.raises(ValueError, match="kv_len"):
        R.select(q, k, kv_start=torch.tensor([10, 0]), kv_len=torch.tensor([10, 20]))  # no real key
    with pytest.raises(ValueError, match="kv_len"):
        R.select(q, k, kv_len=torch.tensor([10.0, 20.0]))
