"""kascade.kernels.decode against kascade.reference (and float64 attention) for one query per sequence.

CPU: the Triton interpreter at small shapes (G in {1, 2, 4, 8}, D in {16, 64, 128}, bf16/fp16/fp32,
left padding, k = n, k_min > n, transformers-like strides). GPU (-m gpu): Llama-3.1-8B shapes at
128K, varlen batches, no recompilation across lengths, CUDA-graph capture.

Selections are compared as sets with the reference's; a key may differ only where its float64
pooled score ties the k-th largest within 1e-5 (relative): float32 scores of different summation
order can swap such near-ties. Outputs are checked against float64 attention over the same keys:
the kernel's error must stay within 2x the reference's own error in the input dtype plus 2 u max|v|
(u the dtype's unit roundoff): the kernel rounds the probabilities to the input dtype before the P.V
product, as flash attention does, the reference rounds only its output. Every buffer the kernels allocate is poisoned first
(NaN / -7), so unwritten outputs fail.
"""

import contextlib
import dataclasses
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from kascade import reference as R  # noqa: E402
from kascade.budget import budget  # noqa: E402
from kascade.kernels import decode as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like return NaN (floats) or -7 (ints) while the kernels run."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    torch.empty = lambda *a, **kw: fill(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: fill(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def make(B, Hkv, G, N, D, dtype, seed=0, layout="bhnd"):
    """Random q/k/v on DEV. layout 'bnhd' stores k/v as [B, N, Hkv, D] (and q as [B, 1, Hq, D]) and
    returns [B, H, N, D] views, so the kernels see non-contiguous strides."""
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    if layout == "bnhd":
        q = torch.randn(B, 1, Hq, D, generator=g).to(dtype).to(DEV).transpose(1, 2)
        k = torch.randn(B, N, Hkv, D, generator=g).to(dtype).to(DEV).transpose(1, 2)
        v = torch.randn(B, N, Hkv, D, generator=g).to(dtype).to(DEV).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, 1, D, generator=g).to(dtype).to(DEV)
        k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
        v = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    return q, k, v


def starts(kv_start, B):
    return torch.zeros(B, dtype=torch.int64) if kv_start is None else torch.as_tensor(kv_start)


def pooled64(q, k, kv_start):
    """Pooled post-softmax scores [B, Hkv, N] in float64 (padding keys: -inf)."""
    B, Hq, _, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    s = torch.einsum("bhgd,bhnd->bhgn", q.double().reshape(B, Hkv, Hq // Hkv, D), k.double()) * D**-0.5
    pad = torch.arange(N, device=q.device)[None, :] < starts(kv_start, B).to(q.device)[:, None]
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1).sum(2)
    return p.masked_fill(pad[:, None, :], float("-inf"))


def check_selection(sel, q, k, rho, k_min, kv_start, kernel_made=True):
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    ref = R.select(q, k, rho, k_min, 32, kv_start=kv_start)
    p64 = pooled64(q, k, kv_start).cpu()
    st = starts(kv_start, B)
    assert sel.decode and sel.indices.shape[:3] == (B, Hkv, 1) and sel.indices.dtype == torch.int32
    assert torch.equal(sel.counts.cpu(), ref.counts.cpu())
    assert torch.equal(sel.first_tile.cpu(), torch.zeros(B, dtype=torch.int64))
    idx = sel.indices.cpu()
    for b in range(B):
        kk = budget(N - int(st[b]), rho, k_min)
        assert int(sel.counts[b, 0]) == kk
        if kernel_made:
            assert (idx[b, :, 0, kk:] == -1).all()
        for h in range(Hkv):
            got = idx[b, h, 0, :kk].long()
            assert got.unique().numel() == kk and got.min() >= int(st[b]) and got.max() < N
            want = ref.sets(b, h).cpu()
            diff = torch.tensor(sorted(set(got.tolist()) ^ set(want.tolist())), dtype=torch.long)
            if diff.numel():
                thr = torch.sort(p64[b, h], descending=True).values[kk - 1]
                assert ((p64[b, h, diff] - thr).abs() <= 1e-5 * thr).all(), (b, h, diff.tolist())


def sparse64(q, k, v, sel, head_map=None):
    """float64 attention over the selected keys (head-mapped): [B, Hq, 1, Dv]."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    hm = list(range(Hkv)) if head_map is None else [int(x) for x in head_map]
    out = torch.empty(B, Hq, 1, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hkv):
            idx = sel.sets(b, hm[h]).to(q.device)
            s = q[b, h * G:(h + 1) * G, 0].double() @ k[b, h, idx].double().T * D**-0.5
            out[b, h * G:(h + 1) * G, 0] = torch.softmax(s, -1) @ v[b, h, idx].double()
    return out


def dense64(q, k, v, kv_start):
    """float64 dense attention over the valid keys [kv_start[b], N): [B, Hq, 1, Dv]."""
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    st = starts(kv_start, B)
    idx = torch.full((B, Hkv, 1, N), -1, dtype=torch.int32)
    for b in range(B):
        idx[b, :, 0, : N - int(st[b])] = torch.arange(int(st[b]), N, dtype=torch.int32)
    sel = R.Selection(idx.to(q.device), (N - st).to(torch.int32).view(B, 1), torch.zeros(B, dtype=torch.int64), 32, True)
    return sparse64(q, k, v, sel)


UNIT_ROUNDOFF = {BF16: 2.0**-8, FP16: 2.0**-11, FP32: 2.0**-24}


def assert_close_to64(out, ref, exact64, v):
    """Kernel error <= 2x the reference's own error + 2 u max|v| (u: unit roundoff of the input dtype).

    The kernel rounds the probabilities to the input dtype before the P.V product (relative error
    <= u each, weighing rows of V: <= u max|v| on the output) and rounds the output like the reference.
    """
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    err = (out.double() - exact64).abs().max().item()
    err_ref = (ref.double() - exact64).abs().max().item()
    bound = 2 * err_ref + 2 * UNIT_ROUNDOFF[out.dtype] * v.abs().max().item() + 1e-6
    assert err <= bound, (err, err_ref, bound)


CPU_CASES = [  # B, Hkv, G, N, D, dtype, kv_start, layout
    (2, 2, 1, 300, 64, BF16, [0, 41], "bhnd"),
    (2, 2, 2, 257, 128, FP16, [5, 0], "bnhd"),
    (1, 2, 4, 400, 16, FP32, None, "bhnd"),
    (2, 1, 8, 333, 64, BF16, [0, 200], "bnhd"),
    (1, 2, 4, 520, 128, BF16, [17], "bhnd"),
]


@pytest.mark.parametrize("B,Hkv,G,N,D,dtype,kv_start,layout", CPU_CASES)
def test_select_sparse_anchor(B, Hkv, G, N, D, dtype, kv_start, layout):
    q, k, v = make(B, Hkv, G, N, D, dtype, seed=N + G, layout=layout)
    rho, k_min = 0.1, 16
    with poisoned():
        sel = K.select(q, k, rho, k_min, 32, kv_start=kv_start)
    check_selection(sel, q, k, rho, k_min, kv_start)

    # reuse over a reference Selection with a non-identity head map
    ref_sel = R.select(q, k, rho, k_min, 32, kv_start=kv_start)
    head_map = torch.tensor([(h + 1) % Hkv for h in range(Hkv)])
    with poisoned():
        out = K.sparse_attention(q, k, v, ref_sel, head_map=head_map, kv_start=kv_start)
    ref = R.sparse_attention(q, k, v, ref_sel, head_map=head_map, kv_start=kv_start)
    assert_close_to64(out, ref, sparse64(q, k, v, ref_sel, head_map), v)

    # anchor: sparse output from the stored logits, and dense output
    with poisoned():
        out_s, sel_s = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start)
        out_d, _ = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start, dense_output=True)
    assert torch.equal(sel_s.indices, sel.indices)
    ref_s = R.sparse_attention(q, k, v, sel_s, kv_start=kv_start)
    assert_close_to64(out_s, ref_s, sparse64(q, k, v, sel_s), v)
    ref_d = R.dense_attention(q, k, v, kv_start=kv_start)
    assert_close_to64(out_d, ref_d, dense64(q, k, v, kv_start), v)


@pytest.mark.parametrize("N,k_min,rho,kv_start", [(50, 128, 0.1, [0, 45]), (40, 1, 1.0, [3, 0]), (1, 4, 0.5, None),
                                                  (200, 19, 0.1, [181, 0])])
def test_budget_edges(N, k_min, rho, kv_start):
    """k_min > n (every key), rho = 1, a single key, k = n for a short padded row."""
    B = 1 if kv_start is None else len(kv_start)
    q, k, v = make(B, 2, 4, N, 64, BF16, seed=N)
    with poisoned():
        out, sel = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start)
    check_selection(sel, q, k, rho, k_min, kv_start)
    ref = R.sparse_attention(q, k, v, sel, kv_start=kv_start)
    assert_close_to64(out, ref, sparse64(q, k, v, sel), v)
    if k_min >= N or rho == 1.0:  # every key selected: sparse == dense
        assert_close_to64(out, R.dense_attention(q, k, v, kv_start=kv_start), dense64(q, k, v, kv_start), v)


def test_errors():
    q, k, v = make(1, 2, 2, 64, 16, FP32)
    sel = R.select(q, k, 0.1, 4, 32)
    with pytest.raises(ValueError, match="head_map"):
        K.sparse_attention(q, k, v, sel, head_map=[0, 2])
    with pytest.raises(ValueError, match="rho"):
        K.select(q, k, 0.0, 4)
    with pytest.raises(ValueError, match="q:"):
        K.select(torch.cat([q, q], 2), k, 0.1, 4)
    with pytest.raises(ValueError, match="kv_start"):
        K.select(q, k, 0.1, 4, kv_start=[64])



@contextlib.contextmanager
def kernel_config(**changes):
    """K.CONFIG changed for the block: a dict value updates that section, any other value replaces the entry."""
    old = {name: copy.deepcopy(K.CONFIG[name]) for name in changes}
    for name, value in changes.items():
        if isinstance(value, dict):
            K.CONFIG[name].update(value)
        else:
            K.CONFIG[name] = value
    try:
        yield
    finally:
        for name, value in old.items():
            if isinstance(value, dict):  # in place: the section stays the same object
                K.CONFIG[name].clear()
                K.CONFIG[name].update(value)
            else:
                K.CONFIG[name] = value


def check_select_paths(q, k, v, kv_start, rho, k_min):
    """The candidate path and the four-level path select the same set for every row; outputs agree."""
    with kernel_config(select=dict(candidates=False)), poisoned():
        out_l, sel_l = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start)
    with kernel_config(select=dict(candidates=True)), poisoned():
        out_c, sel_c = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start)
    assert torch.equal(sel_l.counts, sel_c.counts)
    il, ic = sel_l.indices.cpu(), sel_c.indices.cpu()
    for b in range(il.shape[0]):
        kk = int(sel_l.counts[b, 0])
        assert (ic[b, :, 0, kk:] == -1).all()
        assert torch.equal(il[b, :, 0, :kk].sort(-1).values, ic[b, :, 0, :kk].sort(-1).values)
    assert_close_to64(out_c, R.sparse_attention(q, k, v, sel_c, kv_start=kv_start), sparse64(q, k, v, sel_c), v)


def test_select_paths_agree():
    """On a batch of different lengths, with random keys and with constant keys (every score tied)."""
    q, k, v = make(3, 2, 4, 300, 64, BF16, seed=11)
    check_select_paths(q, k, v, [0, 37, 260], 0.1, 16)
    k[1] = 1.0
    check_select_paths(q, k, v, [0, 37, 260], 0.1, 16)


def test_select_paths_agree_on_crowded_rows():
    """Rows whose candidates exceed finish_max take the chunked finish: the same sets (every row at 0; constant keys
    make every score a tie)."""
    q, k, v = make(3, 2, 4, 300, 64, BF16, seed=12)
    k[2] = 1.0
    with kernel_config(select=dict(finish_max=0)):
        check_select_paths(q, k, v, [0, 37, 260], 0.1, 16)


def test_chunked_finish_from_the_environment(monkeypatch):
    """KASCADE_DECODE_FINISH_MAX sets finish_max's default (how vLLM's worker processes get it); unset: none."""
    monkeypatch.delenv("KASCADE_DECODE_FINISH_MAX", raising=False)
    assert K.finish_max_from_env() == K.NO_CHUNKED_FINISH
    monkeypatch.setenv("KASCADE_DECODE_FINISH_MAX", "4096")
    assert K.finish_max_from_env() == 4096
    for bad in ("0", "-5", "4k", ""):
        monkeypatch.setenv("KASCADE_DECODE_FINISH_MAX", bad)
        with pytest.raises(ValueError, match="KASCADE_DECODE_FINISH_MAX: expected an integer >= 1"):
            K.finish_max_from_env()


def prefetching(on):
    """Both prefetch switches of the anchor (pool, selection) set to `on`."""
    return kernel_config(pool=dict(prefetch=on), select=dict(prefetch=on))


def check_prefetch_changes_nothing(q, k, v, kv_start, rho, k_min):
    """Prefetching only reorders memory requests: selections and outputs are bit for bit the same."""
    with prefetching(False), poisoned():
        out_0, sel_0 = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start)
    with prefetching(True), poisoned():
        out_1, sel_1 = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start)
    assert torch.equal(sel_0.counts, sel_1.counts)
    assert torch.equal(sel_0.indices, sel_1.indices)
    assert torch.equal(out_0, out_1)


def test_prefetch_changes_nothing():
    """Rows of several blocks per program (pool, level 2, split), different lengths."""
    q, k, v = make(2, 2, 4, 9000, 32, BF16, seed=5)
    check_prefetch_changes_nothing(q, k, v, [0, 2100], 0.1, 16)


def check_pdl_changes_nothing(q, k, v, kv_start, rho, k_min, kv_len=None, modes=("start", "exit")):
    """Every programmatic-dependent-launch mode gives the anchor's selection and output, and the reuse
    layer's output, of launches without it, bit for bit (on the candidate and the four-level selection)."""
    hm = torch.arange(k.shape[1], device=q.device).flip(0)
    for candidates in (True, False):
        got = {}
        for mode in ("off",) + tuple(modes):
            with kernel_config(pdl=mode, select=dict(candidates=candidates)), poisoned():
                out, sel = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start, kv_len=kv_len)
                got[mode] = out, sel, K.sparse_attention(q, k, v, sel, head_map=hm, kv_start=kv_start, kv_len=kv_len)
        out_0, sel_0, reuse_0 = got["off"]
        for mode in modes:
            out_1, sel_1, reuse_1 = got[mode]
            assert torch.equal(sel_0.counts, sel_1.counts)
            assert torch.equal(sel_0.indices, sel_1.indices)
            assert torch.equal(out_0, out_1)
            assert torch.equal(reuse_0, reuse_1)
    return sel_0


def test_pdl_mode_is_checked_and_off_where_unavailable():
    with kernel_config(pdl="sometimes"):
        with pytest.raises(ValueError, match=r"CONFIG\['pdl'\].*'exit'.*'sometimes'"):
            K.pdl_mode(torch.device(DEV))
    for mode in ("off", "start", "exit"):
        with kernel_config(pdl=mode):
            want = K.ts.PDL_MODES[mode] if K.ts.pdl_available(torch.device(DEV)) else 0
            assert K.pdl_mode(torch.device(DEV)) == want
    assert K.ts.pdl_available(torch.device("cpu")) is False


def large_reuse_setting(on):
    """The reuse kernel's large-work launch setting forced on (threshold 0) or off (never reached)."""
    return kernel_config(sparse_large_from=0 if on else float("inf"))


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_reuse_launch_settings_agree(dtype):
    """Both launch settings of the reuse kernel (split counts and block sizes differ) match float64."""
    q, k, v = make(3, 2, 4, 2000, 64, dtype, seed=8)
    kv_start = [0, 500, 1900]
    sel = R.select(q, k, 0.1, 16, 32, kv_start=kv_start)
    hm = [1, 0]
    ref = R.sparse_attention(q, k, v, sel, head_map=hm, kv_start=kv_start)
    exact = sparse64(q, k, v, sel, head_map=hm)
    for on in (False, True):
        with large_reuse_setting(on), poisoned():
            out = K.sparse_attention(q, k, v, sel, head_map=hm, kv_start=kv_start)
        assert_close_to64(out, ref, exact, v)


KV_LEN_CASES = [  # B, Hkv, G, N, D, dtype, kv_start, kv_len: a preallocated cache, the tail unwritten
    (2, 2, 4, 400, 64, BF16, [0, 30], [400, 171]),
    (2, 1, 8, 300, 128, FP16, None, [129, 250]),
    (1, 2, 2, 520, 16, FP32, [5], [40]),  # k_min > n: every key
]


def _part(sel, b):
    return R.Selection(sel.indices[b:b + 1], sel.counts[b:b + 1], sel.first_tile[b:b + 1], sel.tile, sel.decode)


@pytest.mark.parametrize("B,Hkv,G,N,D,dtype,kv_start,kv_len", KV_LEN_CASES)
def test_kv_len_static_cache(B, Hkv, G, N, D, dtype, kv_start, kv_len):
    """kv_len: each sequence equals its written keys alone (selection, budgets, sparse, dense); the
    unwritten tail holds NaN and is never read."""
    q, k, v = make(B, Hkv, G, N, D, dtype, seed=N + B)
    rho, k_min = 0.1, 64
    for b, e in enumerate(kv_len):
        k[b, :, e:] = float("nan")
        v[b, :, e:] = float("nan")
    ks = None if kv_start is None else torch.tensor(kv_start, device=DEV)
    kl = torch.tensor(kv_len, device=DEV)
    with poisoned():
        out_s, sel = K.anchor(q, k, v, rho, k_min, 32, kv_start=ks, kv_len=kl)
        out_d, sel_d = K.anchor(q, k, v, rho, k_min, 32, kv_start=ks, kv_len=kl, dense_output=True)
        dense = K.dense_attention(q, k, v, kv_start=ks, kv_len=kl)
        head_map = torch.tensor([(h + 1) % Hkv for h in range(Hkv)], device=DEV)
        out_r = K.sparse_attention(q, k, v, sel, head_map=head_map, kv_start=ks, kv_len=kl)
    assert torch.equal(sel.indices, sel_d.indices)
    ref = R.select(q, k, rho, k_min, 32, kv_start=ks, kv_len=kl)
    assert torch.equal(sel.counts.cpu(), ref.counts.cpu())
    for b, e in enumerate(kv_len):
        st = None if kv_start is None else [kv_start[b]]
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e]
        assert int(sel.counts[b, 0]) == budget(e - (0 if st is None else st[0]), rho, k_min)
        check_selection(_part(sel, b), qb, kb, rho, k_min, st)
        sb = _part(sel, b)
        assert_close_to64(out_s[b:b + 1], R.sparse_attention(qb, kb, vb, sb, kv_start=st), sparse64(qb, kb, vb, sb), vb)
        assert_close_to64(out_r[b:b + 1], R.sparse_attention(qb, kb, vb, sb, head_map=head_map, kv_start=st),
                          sparse64(qb, kb, vb, sb, head_map.tolist()), vb)
        want_d = R.dense_attention(qb, kb, vb, kv_start=st)
        assert_close_to64(out_d[b:b + 1], want_d, dense64(qb, kb, vb, st), vb)
        assert_close_to64(dense[b:b + 1], want_d, dense64(qb, kb, vb, st), vb)


def test_kv_len_errors():
    q, k, v = make(2, 2, 2, 64, 16, FP32)
    with pytest.raises(ValueError, match="kv_len"):
        K.select(q, k, 0.1, 4, kv_len=torch.tensor([65, 64]))
    with pytest.raises(ValueError, match="kv_len"):
        K.dense_attention(q, k, v, kv_start=torch.tensor([0, 10]), kv_len=torch.tensor([64, 10]))


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,Hkv,G,N,D,dtype,kv_start", [
    (1, 8, 4, 131072, 128, BF16, None),
    (3, 8, 8, 32768, 64, FP16, [0, 1000, 20001]),
    (2, 4, 1, 20000, 128, BF16, [7, 0]),
    (2, 2, 2, 9000, 128, FP32, [0, 3]),
])
def test_gpu_full_size(B, Hkv, G, N, D, dtype, kv_start):
    q, k, v = make(B, Hkv, G, N, D, dtype, seed=1, layout="bnhd" if B == 2 else "bhnd")
    rho, k_min = 0.1, 128
    with poisoned():
        out, sel = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start)
        out_d, sel_d = K.anchor(q, k, v, rho, k_min, 32, kv_start=kv_start, dense_output=True)
    check_selection(sel, q, k, rho, k_min, kv_start)
    assert torch.equal(sel.indices, sel_d.indices)  # deterministic
    assert_close_to64(out, R.sparse_attention(q, k, v, sel, kv_start=kv_start), sparse64(q, k, v, sel), v)
    assert_close_to64(out_d, R.dense_attention(q, k, v, kv_start=kv_start), dense64(q, k, v, kv_start), v)
    head_map = torch.randint(0, Hkv, (Hkv,), device=DEV)
    ref_sel = R.select(q, k, rho, k_min, 32, kv_start=kv_start)
    with poisoned():
        out_r = K.sparse_attention(q, k, v, ref_sel, head_map=head_map, kv_start=kv_start)
    assert_close_to64(out_r, R.sparse_attention(q, k, v, ref_sel, head_map=head_map, kv_start=kv_start),
                      sparse64(q, k, v, ref_sel, head_map.tolist()), v)


@pytest.mark.gpu
@gpu
def test_gpu_no_recompilation_across_lengths():
    kernels = [K._decode_logits_kernel, K._decode_pool_kernel, K._decode_sparse_kernel, K._decode_combine_kernel]
    # (kv_len is a runtime tensor too: tests/test_graph.py replays one graph over growing lengths)
    from kascade.kernels import topk_select as ts
    kernels += [ts._radix_hist_kernel, ts._radix_last_kernel, ts._radix_compact_kernel, ts._radix_split_kernel,
                ts._radix_finish_kernel]

    def variants():
        try:
            return sum(len(kern.device_caches[dev][0]) for kern in kernels for dev in kern.device_caches)
        except (AttributeError, TypeError, IndexError, KeyError):
            return None

    seen = None
    for n in (40000, 40007, 52001, 65536):
        q, k, v = make(1, 8, 4, n, 128, BF16, seed=n)
        out, sel = K.anchor(q, k, v, 0.1, 128, 32)
        K.sparse_attention(q, k, v, sel, head_map=torch.arange(8, device=DEV).flip(0))
        torch.cuda.synchronize()
        now = variants()
        if seen is not None and now is not None:
            assert now == seen, "a new length compiled new kernel variants"
        seen = now


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("q_scale", [1e-9, 1e-4, 1.0])  # tied (vLLM's dummy weights), flat, peaked scores
def test_gpu_chunked_finish_at_full_size(q_scale):
    """The chunked finish (finish_max 4096, launched with PDL where the device has it) selects a valid top-k set
    on tied, flat and peaked rows of 128K keys, the same set as the single finish, eagerly and in a CUDA graph."""
    B, Hkv, G, N, D = 3, 8, 4, 131072, 128
    q, k, v = make(B, Hkv, G, N, D, BF16, seed=4)
    q.mul_(q_scale)
    kv_start = torch.tensor([0, 5000, 70001], device=DEV)
    with kernel_config(select=dict(finish_max=1 << 30)):
        _, single = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
    with kernel_config(select=dict(finish_max=4096)):
        with poisoned():
            _, chunked = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, replayed = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
        graph.replay()
    check_selection(chunked, q, k, 0.1, 128, kv_start)
    assert torch.equal(replayed.indices, chunked.indices)
    assert torch.equal(single.indices.sort(-1).values, chunked.indices.sort(-1).values)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture():
    B, Hkv, G, N, D = 2, 8, 4, 50000, 128
    q, k, v = make(B, Hkv, G, N, D, BF16, seed=3)
    kv_start = torch.tensor([0, 4000], device=DEV)
    hm = torch.randint(0, Hkv, (Hkv,), device=DEV)
    K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_a, sel = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
        out_r = K.sparse_attention(q, k, v, sel, head_map=hm, kv_start=kv_start)
    for seed in (5, 6):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype))
        graph.replay()
        want_a, want_sel = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
        assert torch.equal(sel.indices, want_sel.indices)
        assert torch.equal(out_a, want_a)
        assert torch.equal(out_r, K.sparse_attention(q, k, v, want_sel, head_map=hm, kv_start=kv_start))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,Hkv,G,N,D", [(1, 8, 4, 131072, 128), (1, 4, 7, 131072, 128), (1, 3, 3, 131072, 64),
                                         (8, 8, 5, 32768, 128), (2, 8, 8, 131072, 128)])
def test_gpu_pdl_changes_nothing(B, Hkv, G, N, D):
    """Every attention shape of benchmarks/decode_shapes.py, eagerly and inside a CUDA graph."""
    assert K.ts.pdl_available(torch.device(DEV)) == (torch.cuda.get_device_capability()[0] >= 9)
    q, k, v = make(B, Hkv, G, N, D, BF16, seed=G)
    kv_start = torch.tensor([0] + [N // 3] * (B - 1), device=DEV)
    sel = check_pdl_changes_nothing(q, k, v, kv_start, 0.1, 128)
    check_selection(sel, q, k, 0.1, 128, kv_start)
    hm = torch.arange(Hkv, device=DEV).flip(0)
    for mode in ("start", "exit"):
        with kernel_config(pdl=mode):
            out_a, sel_a = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
            K.sparse_attention(q, k, v, sel_a, head_map=hm, kv_start=kv_start)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_g, sel_g = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
                reuse_g = K.sparse_attention(q, k, v, sel_g, head_map=hm, kv_start=kv_start)
        for seed in (7, 8):
            q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype))
            graph.replay()
            with kernel_config(pdl="off"):
                want_out, want_sel = K.anchor(q, k, v, 0.1, 128, 32, kv_start=kv_start)
                want_reuse = K.sparse_attention(q, k, v, want_sel, head_map=hm, kv_start=kv_start)
            assert torch.equal(sel_g.indices, want_sel.indices)
            assert torch.equal(out_g, want_out)
            assert torch.equal(reuse_g, want_reuse)


@pytest.mark.gpu
@gpu
def test_gpu_select_paths_agree():
    q, k, v = make(2, 8, 4, 131072, 128, BF16, seed=4)
    check_select_paths(q, k, v, torch.tensor([0, 70000], device=DEV), 0.1, 128)


@pytest.mark.gpu
@gpu
def test_gpu_prefetch_changes_nothing():
    q, k, v = make(2, 8, 4, 131072, 128, BF16, seed=6)
    check_prefetch_changes_nothing(q, k, v, torch.tensor([0, 70000], device=DEV), 0.1, 128)


PART_CASES = [  # B, Hkv, G, N, D, dtype, own heads, kv_start, kv_len
    (2, 4, 4, 1500, 64, BF16, slice(0, 4, 2), [0, 300], None),  # every other head (one strided view)
    (1, 4, 2, 900, 32, FP16, slice(1, 3), None, [700]),  # a run of heads, a preallocated cache's tail
    (2, 3, 3, 700, 64, BF16, slice(2, 3), [11, 0], None),  # one head (SmolLM2's group of 3)
]


@pytest.mark.parametrize("B,Hkv,G,N,D,dtype,heads,kv_start,kv_len", PART_CASES)
def test_part_anchor_is_select_then_reuse(B, Hkv, G, N, D, dtype, heads, kv_start, kv_len):
    """part_anchor: its own heads' selection bit for bit that of select on their strided view; its output
    that of attention over their selection stacked with the source rows in head order (float64)."""
    q, k, v = make(B, Hkv, G, N, D, dtype, seed=Hkv + G)
    st = None if kv_start is None else torch.tensor(kv_start, device=DEV)
    ln = None if kv_len is None else torch.tensor(kv_len, device=DEV)
    sources = K.select(q, k, 0.1, 16, 32, kv_start=st, kv_len=ln)  # an earlier layer's anchor (same cache here)
    own = list(range(Hkv))[heads]
    others = [h for h in range(Hkv) if h not in own]
    route = [-1 - own.index(h) if h in own else (h * 7 + 1) % Hkv for h in range(Hkv)]
    with poisoned():
        out, sel = K.part_anchor(q, k, v, heads, sources, route, 0.1, 16, 32, kv_start=st, kv_len=ln)
    qv = q.unflatten(1, (Hkv, G))[:, heads].flatten(1, 2)
    want = K.select(qv, k[:, heads], 0.1, 16, 32, kv_start=st, kv_len=ln)
    assert torch.equal(sel.indices, want.indices) and torch.equal(sel.counts, want.counts)
    stacked = torch.cat([sources.indices, want.indices], dim=1)
    rows = torch.tensor([Hkv + own.index(h) if h in own else route[h] for h in range(Hkv)], device=DEV)
    full = dataclasses.replace(want, indices=stacked.index_select(1, rows))
    exact = sparse64(q, k, v, full)
    ref = R.sparse_attention(q, k, v, full, kv_start=kv_start, kv_len=kv_len)
    assert_close_to64(out, ref, exact, v)
    assert others  # the cases mix own and reused heads


def test_part_anchor_errors_name_the_argument():
    q, k, v = make(1, 4, 2, 300, 32, BF16, seed=3)
    sources = K.select(q, k, 0.1, 16, 32)
    good = [-1, 0, -2, 1]
    with pytest.raises(ValueError, match="heads: expected a slice"):
        K.part_anchor(q, k, v, [0, 2], sources, good)
    with pytest.raises(ValueError, match="heads: .* selects no KV head"):
        K.part_anchor(q, k, v, slice(5, 9), sources, good)
    with pytest.raises(ValueError, match=r"route: .*wrong at heads \[0\]"):
        K.part_anchor(q, k, v, slice(0, 4, 2), sources, [0, 0, -2, 1])
    with pytest.raises(ValueError, match=r"route: expected \[4\] entries \(one per KV head\), got shape \(3,\)"):
        K.part_anchor(q, k, v, slice(0, 4, 2), sources, [-1, 0, -2])
    with pytest.raises(ValueError, match=r"route: .*wrong at heads \[3\]"):
        K.part_anchor(q, k, v, slice(0, 4, 2), sources, [-1, 0, -2, 4])
    with pytest.raises(ValueError, match="sources: expected a decode Selection for batch 1"):
        K.part_anchor(q, k, v, slice(0, 4, 2), R.select(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), 0.1, 16, 32),
                      good)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,Hkv,G,N,D,heads", [(1, 8, 4, 131072, 128, slice(0, 8, 2)), (2, 3, 3, 131072, 64, slice(1, 2)),
                                              (8, 8, 5, 32768, 128, slice(4, 8))])
def test_gpu_part_anchor_full_size_and_in_a_graph(B, Hkv, G, N, D, heads):
    """part_anchor at decode sizes against select + stacked selection + float64 attention, and its CUDA-graph
    replay against eager calls on new queries."""
    q, k, v = make(B, Hkv, G, N, D, BF16, seed=Hkv)
    kv_start = torch.tensor([0] + [N // 3] * (B - 1), device=DEV)
    sources = K.select(q, k, 0.1, 128, 32, kv_start=kv_start)
    own = list(range(Hkv))[heads]
    route = torch.tensor([-1 - own.index(h) if h in own else (h + 1) % Hkv for h in range(Hkv)], device=DEV,
                         dtype=torch.int32)
    out, sel = K.part_anchor(q, k, v, heads, sources, route, 0.1, 128, 32, kv_start=kv_start)
    qv = q.unflatten(1, (Hkv, G))[:, heads].flatten(1, 2)
    want = K.select(qv, k[:, heads], 0.1, 128, 32, kv_start=kv_start)
    assert torch.equal(sel.indices, want.indices)
    rows = torch.tensor([Hkv + own.index(h) if h in own else (h + 1) % Hkv for h in range(Hkv)], device=DEV)
    full = dataclasses.replace(want, indices=torch.cat([sources.indices, want.indices], 1).index_select(1, rows))
    assert_close_to64(out, K.sparse_attention(q, k, v, full, kv_start=kv_start), sparse64(q, k, v, full), v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, sel_g = K.part_anchor(q, k, v, heads, sources, route, 0.1, 128, 32, kv_start=kv_start)
    for seed in (5, 6):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype))
        graph.replay()
        want_out, want_sel = K.part_anchor(q, k, v, heads, sources, route, 0.1, 128, 32, kv_start=kv_start)
        assert torch.equal(sel_g.indices, want_sel.indices)
        assert torch.equal(out_g, want_out)
