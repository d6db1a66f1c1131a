"""Selection scored from an FP8 copy of the keys (kascade.fp8keys), with and without the exact re-rank.

- the quantizer: e4m3 with per-token scales amax / 448, round trip within 2^-4 |x| + scale * 2^-10;
- the kernels (Triton's CPU interpreter at small shapes without a GPU) against kascade.fp8keys.select, the
  reference that quantizes the same way: decode and prefill, contiguous and paged, padding, a preallocated
  cache's kv_len, a subset of heads (kv_heads), re-rank; with every key a candidate the re-rank is exact
  selection (kascade.reference.select);
- the copies: written on every cache path (transformers' DynamicCache in generate, the StaticCache of
  StaticGenerator, kascade.fp8keys.PagedKeyCopies), for the selecting (layer, head)s only, equal to the
  quantized cache; with the option off nothing is allocated and outputs do not change;
- bad option values raise ValueError naming the argument.
Selections are compared as sets: on the CPU the kernels and the reference agree exactly at these shapes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import kascade  # noqa: E402
from kascade import fp8keys as F  # noqa: E402
from kascade import reference as R  # noqa: E402
from kascade.integrations.transformers import StaticGenerator, attention_modules  # noqa: E402
from kascade.kernels import decode as KD  # noqa: E402
from kascade.kernels import prefill_fp8 as KP8  # noqa: E402
from kascade.kernels.paging import PagedKV  # noqa: E402
from kascade.paged import PagedKascadeStrategy  # noqa: E402
from kascade.plan import Plan  # noqa: E402
from kascade.strategy import KascadeStrategy  # noqa: E402
from models import one_thread_fixture, tiny_model  # noqa: E402
from test_paged_reference import make_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16 = torch.bfloat16, torch.float16
_one_thread = one_thread_fixture()


def same_sets(got, want):
    """Equal counts, first tiles and index sets of every (sequence, head, tile)."""
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    assert torch.equal(got.first_tile.cpu(), want.first_tile.cpu())
    for b in range(want.counts.shape[0]):
        for u in range(want.counts.shape[1]):
            for h in range(want.num_kv_heads):
                assert set(got.sets(b, h, u).tolist()) == set(want.sets(b, h, u).tolist()), (b, h, u)


def rand(*shape, dtype=BF16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


# ----------------------------------------------------------------------------------------------
# quantizer and options
# ----------------------------------------------------------------------------------------------


def test_quantize_round_trip_within_e4m3_rounding():
    mags = 10.0 ** torch.linspace(-4, 4, 9)
    x = torch.randn(9, 5, 64, generator=torch.Generator().manual_seed(1)) * mags[:, None, None]
    x[0, 0] = 0.0  # a token whose keys are all zero
    x[1, 1, 3] = 1e-9  # tiny next to its row's largest value: e4m3's subnormal range
    x8, scale = F.quantize(x)
    assert x8.dtype == F.E4M3 and x8.shape == x.shape and scale.dtype == torch.float32 and scale.shape == x.shape[:2]
    amax = x.abs().amax(-1)
    assert scale[0, 0] == 1 and (x8[0, 0].float() == 0).all()
    torch.testing.assert_close(scale[amax > 0], amax[amax > 0] / 448, rtol=1e-7, atol=0)
    back = F.dequantize(x8, scale)
    # round to nearest with 3 mantissa bits: half an ulp, 2^-4 relative; subnormals: half their spacing
    assert ((back - x).abs() <= 2.0**-4 * x.abs() + scale[..., None] * 2.0**-10).all()
    assert ((back - x).abs() / x.abs().clamp(min=1e-30))[x.abs() > amax[..., None] / 64].mean() < 2.0**-5
    assert (back.abs().amax(-1) - amax).abs().max() <= 1e-6 * amax.max()  # the largest value is kept
    xb = x.to(BF16)
    assert F.quantize(xb)[0].shape == xb.shape


@pytest.mark.parametrize("kw,match", [
    (dict(select_keys="int8"), "select_keys"),
    (dict(select_keys=None), "select_keys"),
    (dict(select_keys="fp8", rerank=0.5), "rerank"),
    (dict(select_keys="fp8", rerank=True), "rerank"),
    (dict(select_keys="fp8", rerank="2"), "rerank"),
    (dict(select_keys="fp8", rerank=math.nan), "rerank"),
    (dict(select_keys="exact", rerank=2.0), "rerank"),
])
def test_bad_options_are_refused_by_name(kw, match):
    plan = Plan(anchors=[0, 2], head_map=[[0, 1]] * 4, k_min=8)
    with pytest.raises(ValueError, match=match):
        F.check_options(kw.get("select_keys"), kw.get("rerank"))
    with pytest.raises(ValueError, match=match):
        KascadeStrategy(plan, **kw)
    with pytest.raises(ValueError, match=match):
        PagedKascadeStrategy(plan, **kw)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        kascade.enable(model, Plan.for_model(model.config, [0, 3], k_min=8), **kw)
    assert model.config._attn_implementation != "kascade" and not getattr(model, "_kascade_hooks", None)


def test_select_keys_applies_to_a_plan_only():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="select_keys"):
        kascade.enable(model, strategy=KascadeStrategy(Plan.for_model(model.config, [0, 3])), select_keys="fp8")


def test_rerank_with_every_key_a_candidate_is_exact_selection():
    k = rand(2, 2, 260, 32, dtype=torch.float32, seed=2)
    k8, ks = F.quantize(k)
    st = torch.tensor([0, 37])
    for qlen in (1, 90):
        q = rand(2, 6, qlen, 32, dtype=torch.float32, seed=3 + qlen)
        exact = R.select(q, k, 0.1, 16, 32, kv_start=st)
        same_sets(F.select(q, k8, ks, 0.1, 16, 32, kv_start=st, rerank=100.0, k=k), exact)
        plain = F.select(q, k8, ks, 0.1, 16, 32, kv_start=st)
        same_sets(F.select(q, k8, ks, 0.1, 16, 32, kv_start=st, rerank=1.0, k=k), plain)  # c = 1: no re-rank


# ----------------------------------------------------------------------------------------------
# kernels against the reference
# ----------------------------------------------------------------------------------------------

DECODE = [  # B, S (copy heads), G, N, D, dtype, kv_start, kv_len
    (2, 2, 3, 300, 32, BF16, [0, 45], None),
    (1, 1, 8, 200, 64, FP16, None, [170]),
]


@pytest.mark.parametrize("B,S,G,N,D,dtype,kv_start,kv_len", DECODE)
@pytest.mark.parametrize("rerank", [None, 2.0])
def test_decode_kernel_matches_reference(B, S, G, N, D, dtype, kv_start, kv_len, rerank):
    q, k = rand(B, S * G, 1, D, dtype=dtype, seed=4), rand(B, S, N, D, dtype=dtype, seed=5)
    k8, ks = F.quantize(k)
    st = None if kv_start is None else torch.tensor(kv_start, device=DEV)
    ln = None if kv_len is None else torch.tensor(kv_len, device=DEV)
    got = KD.select_fp8(q, (k8, ks), 0.1, 16, 32, kv_start=st, kv_len=ln, rerank=rerank, k=k)
    same_sets(got, F.select(q, k8, ks, 0.1, 16, 32, kv_start=st, kv_len=ln, rerank=rerank, k=k))
    kk = got.counts.cpu()[:, 0]
    assert all((got.indices[b, :, 0, int(kk[b]):] == -1).all() for b in range(B))  # padding slots
    if rerank is not None:
        exact = R.select(q, k, 0.1, 16, 32, kv_start=st, kv_len=ln)
        same_sets(KD.select_fp8(q, (k8, ks), 0.1, 16, 32, kv_start=st, kv_len=ln, rerank=50.0, k=k), exact)


def _decode_fp8_logits(monkeypatch, q, copy, widen):
    """The FP8 K pass's logits [B * S, N', G] and the selection, with CONFIG["logits"]["fp8_widen"] = widen."""
    seen = {}
    core = KD._anchor_core

    def keep(*a, **kw):  # the call without a re-rank asks for no buffers (output None): ask for them ("fp8")
        buf, sel = core(*a[:10], "fp8", *a[11:], **kw)
        seen["lg"] = buf["lg"].clone()
        return None, sel

    monkeypatch.setitem(KD.CONFIG["logits"], "fp8_widen", widen)
    monkeypatch.setattr(KD, "_anchor_core", keep)
    sel = KD.select_fp8(q, copy, 0.1, 16, 32)
    monkeypatch.setattr(KD, "_anchor_core", core)
    return seen["lg"], sel


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_decode_fp8_keys_widened_to_f16_give_the_logits_of_widening_to_q(monkeypatch, dtype):
    """The K pass multiplies float16 keys by q's rows scaled by powers of two into float16 (_f16_rows): the same
    logits as widening each key to q's dtype, for rows whose magnitudes span 2^-12 to 2^9 and a row of zeros."""
    B, S, G, N, D = 1, 2, 4, 160, 64
    q = rand(B, S * G, 1, D, dtype=torch.float32, seed=40)
    q = q * torch.logspace(-12, 9, S * G, base=2.0, device=DEV)[None, :, None, None]
    q[0, 3] = 0
    q = q.to(dtype)
    copy = F.quantize(rand(B, S, N, D, dtype=dtype, seed=41))
    lg16, sel16 = _decode_fp8_logits(monkeypatch, q, copy, "f16")
    lgq, selq = _decode_fp8_logits(monkeypatch, q, copy, "q")
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert torch.equal(lg16[:, :N], lgq[:, :N])  # powers of two and exact products: the same bits
    else:
        torch.testing.assert_close(lg16[:, :N], lgq[:, :N], rtol=1e-6, atol=0)
    same_sets(sel16, selq)
    same_sets(sel16, F.select(q, *copy, 0.1, 16, 32))


def test_decode_fp8_widening_setting_is_checked(monkeypatch):
    q, copy = rand(1, 4, 1, 32, seed=42), F.quantize(rand(1, 1, 64, 32, seed=43))
    monkeypatch.setitem(KD.CONFIG["logits"], "fp8_widen", "bf16")
    with pytest.raises(ValueError, match="fp8_widen"):
        KD.select_fp8(q, copy, 0.1, 16, 32)


def test_decode_kernel_on_a_subset_of_heads():
    """The copy of KV heads [0, 2] of three; the re-rank reads those heads of the exact cache (kv_heads)."""
    k = rand(1, 3, 250, 32, seed=6)
    q = rand(1, 2 * 2, 1, 32, seed=7)
    k8, ks = F.quantize(k[:, [0, 2]])
    for kv_heads in ([0, 2], torch.tensor([0, 2], device=DEV)):
        got = KD.select_fp8(q, (k8, ks), 0.1, 16, 32, rerank=2.0, k=k, kv_heads=kv_heads)
        same_sets(got, F.select(q, k8, ks, 0.1, 16, 32, rerank=2.0, k=k, kv_heads=[0, 2]))
    with pytest.raises(ValueError, match="kv_heads"):
        KD.select_fp8(q, (k8, ks), 0.1, 16, 32, rerank=2.0, k=k, kv_heads=[0, 3])
    with pytest.raises(ValueError, match="key_copy"):
        KD.select_fp8(q, (k[:, :2], ks), 0.1, 16, 32)  # bf16 keys are not a copy
    with pytest.raises(ValueError, match="^k:"):
        KD.select_fp8(q, (k8, ks), 0.1, 16, 32, rerank=2.0)


PREFILL = [  # B, S, G, N, Q, D, kv_start
    (2, 2, 2, 200, 70, 32, [0, 7]),
    (1, 1, 6, 160, 160, 64, None),  # G x T of 6 x 32 rows: two stacked head groups
]


@pytest.mark.parametrize("B,S,G,N,Q,D,kv_start", PREFILL)
def test_prefill_kernel_matches_reference(B, S, G, N, Q, D, kv_start):
    q, k = rand(B, S * G, Q, D, seed=8), rand(B, S, N, D, seed=9)
    k8, ks = F.quantize(k)
    st = None if kv_start is None else torch.tensor(kv_start, device=DEV)
    for rerank in (None, 2.0):
        got = KP8.select_fp8(q, (k8, ks), 0.1, 16, 32, kv_start=st, rerank=rerank, k=k)
        same_sets(got, F.select(q, k8, ks, 0.1, 16, 32, kv_start=st, rerank=rerank, k=k))
    exact = R.select(q, k, 0.1, 16, 32, kv_start=st)
    same_sets(KP8.select_fp8(q, (k8, ks), 0.1, 16, 32, kv_start=st, rerank=50.0, k=k), exact)


def _paged_copy(cache_keys, heads):
    """The copy of `heads` of a paged key cache [blocks, block_size, Hkv, D] written slot by slot."""
    nb, bs, _, d = cache_keys.shape
    copies = F.PagedKeyCopies({0: tuple(heads)}, nb, bs, d, device=DEV)
    slots = torch.arange(nb * bs, device=DEV)
    slots[5] = -1  # a padding token of the engine's batch: skipped (written to the scratch row)
    copies.write(0, cache_keys.reshape(nb * bs, *cache_keys.shape[2:]), slots)
    return copies


def test_paged_kernels_match_reference():
    """Decode requests in one launch and prefill requests one by one (pages resolved in the kernels or the
    copy gathered first), over the copy of heads [0, 2] of a paged cache."""
    batch, (qs, ks_, _) = make_batch([150, 90], [1, 40], hq=6, hkv=3, d=32, dtype=BF16, seed=10)
    kc = batch["key_cache"].to(DEV)
    copies = _paged_copy(kc, [0, 2])
    k8c, ksc = copies.layer(0)
    want8, want_s = F.quantize(kc[:, :, [0, 2]])
    flat8, flat_s = k8c.view(-1, 2, 32), ksc.view(-1, 2)
    assert torch.equal(flat8.view(torch.uint8)[6:], want8.view(-1, 2, 32).view(torch.uint8)[6:])
    assert torch.equal(flat_s[6:], want_s.view(-1, 2)[6:]) and (flat_s[5] == 1).all()  # slot 5 skipped
    copy = F.quantize(kc[:, :, [0, 2]])
    bt, lens = batch["block_table"].to(DEV), batch["seq_lens"].to(DEV)
    for rerank in (None, 2.0):
        q1 = qs[0][:, [0, 1, 4, 5]].to(DEV)  # the query heads of KV heads 0 and 2 (G = 2)
        cache = PagedKV(kc, None, bt[:1].contiguous(), lens[:1])
        got = KD.select_fp8_paged(q1, cache, copy, 0.1, 16, 32, rerank=rerank, kv_heads=[0, 2])
        k_ref = ks_[0].to(DEV)
        want = F.select(q1, *F.quantize(k_ref[:, [0, 2]]), 0.1, 16, 32, rerank=rerank, k=k_ref, kv_heads=[0, 2])
        same_sets(got, want)
        q2 = qs[1][:, [0, 1, 4, 5]].to(DEV)
        cache = PagedKV(kc, None, bt[1:].contiguous(), lens[1:])
        k_ref = ks_[1].to(DEV)
        want = F.select(q2, *F.quantize(k_ref[:, [0, 2]]), 0.1, 16, 32, rerank=rerank, k=k_ref, kv_heads=[0, 2])
        for gather in (True, False):
            same_sets(KP8.select_fp8_paged(q2, cache, copy, 0.1, 16, 32, rerank=rerank, kv_heads=[0, 2],
                                           gather_keys=gather), want)


# ----------------------------------------------------------------------------------------------
# the copies beside the caches
# ----------------------------------------------------------------------------------------------

# 6 layers, 2 KV heads: anchors 0 and 3; layer 1 selects head 1, layer 4 head 0; 2 and 5 select nothing
SOURCES = [None, [[0, 1], None], [[1, 1], [0, 0]], None, [None, [3, 0]], [[4, 0], [3, 1]]]
SELECTING = {0: (0, 1), 1: (1,), 3: (0, 1), 4: (0,)}


def _plan(model, **kw):
    return Plan.for_model(model.config, [0, 3], head_sources=SOURCES, rho=0.1, k_min=16, tile=32, **kw)


def _check_copies(cache, keys_of_layer, rows):
    """The cache's copies hold the selecting heads of the selecting layers only, equal to the quantized keys."""
    copies = F.key_copies(cache)
    assert copies is not None and set(copies.layers) == set(SELECTING)
    total = 0
    for layer, heads in SELECTING.items():
        c = copies.layers[layer]
        assert c.heads == heads and c.keys.shape[1] == len(heads)
        want8, want_s = F.quantize(keys_of_layer(layer)[:, list(heads), :rows])
        assert torch.equal(c.keys[:, :, :rows].view(torch.uint8), want8.view(torch.uint8)), layer
        assert torch.equal(c.scales[:, :, :rows], want_s), layer
        total += c.nbytes
    assert copies.nbytes == total > 0
    return copies


def test_dynamic_cache_copy_written_at_every_step_for_selecting_heads_only():
    model = tiny_model("llama", seed=11, num_key_value_heads=2)
    ids = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), kascade.enable(model, _plan(model), select_keys="fp8", sparse_prefill=True) as h:
        assert len(h.model._kascade_hooks) == model.config.num_hidden_layers
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        n = ids.shape[1] + 3  # the last token is never fed back
        _check_copies(cache, lambda layer: cache.layers[layer].keys, n)
        assert h.key_copy_bytes(cache) == F.key_copies(cache).nbytes
    assert model._kascade_hooks == [] and not any(hasattr(m, "_kascade_cache") for m in attention_modules(model))


def test_static_cache_copy_and_tokens_match_the_dynamic_cache():
    model = tiny_model("llama", seed=13, num_key_value_heads=2)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(14))
    with torch.no_grad(), kascade.enable(model, _plan(model), select_keys="fp8", rerank=2.0, sparse_prefill=True):
        want = model.generate(ids, max_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
        gen = StaticGenerator(model, batch_size=1, max_cache_len=200)
        got = gen.generate(ids, max_new_tokens=5)
        copies = _check_copies(gen.cache, lambda layer: gen.cache.layers[layer].keys, ids.shape[1] + 4)
    assert got.tolist() == want.tolist()
    assert all(c.keys.shape[2] == 200 for c in copies.layers.values())  # sized like the static cache


def test_option_off_allocates_nothing_and_changes_nothing():
    model = tiny_model("llama", seed=15, num_key_value_heads=2)
    ids = torch.randint(0, 256, (1, 140), generator=torch.Generator().manual_seed(16))
    plan = _plan(model)
    with torch.no_grad():
        with kascade.enable(model, plan, sparse_prefill=True) as h:
            assert h.strategy.select_keys == "exact" and model._kascade_hooks == []
            out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            before = model(ids).logits
            assert F.key_copies(out.past_key_values) is None and h.key_copy_bytes(out.past_key_values) == 0
        with kascade.enable(model, plan, select_keys="fp8", sparse_prefill=True):
            fp8 = model(ids).logits  # no cache: the copy is made per call
        with kascade.enable(model, plan, select_keys="fp8", rerank=1e6, sparse_prefill=True):
            reranked = model(ids).logits  # every key a candidate: exact selection
        with kascade.enable(model, plan, sparse_prefill=True):
            after = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.equal(fp8, before)  # the FP8 scores do choose other keys somewhere
    torch.testing.assert_close(reranked, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_paged_strategy_with_copies_equals_copies_made_per_layer(backend):
    """PagedKascadeStrategy(select_keys="fp8") with PagedKeyCopies written beside the cache equals the same
    strategy making its copies per layer; the copies hold the plan's selecting heads only."""
    dtype = torch.float32 if backend == "reference" else BF16
    plan = Plan(anchors=[0, 3], head_sources=SOURCES, rho=0.1, k_min=16, tile=32,
                model=dict(num_layers=6, num_q_heads=4, num_kv_heads=2, head_dim=32, model_type="llama"))
    mix = dict(seq_lens=[200, 150, 90], q_lens=[1, 40, 1]) if backend == "reference" else \
        dict(seq_lens=[200, 150], q_lens=[1, 1])
    batches = [make_batch(**mix, hq=4, hkv=2, d=32, dtype=dtype, seed=20 + layer)[0] for layer in range(6)]
    nb, bs = batches[0]["key_cache"].shape[:2]
    copies = F.PagedKeyCopies.allocate(plan, nb, bs, 2, 32, device=DEV)
    assert copies.heads == SELECTING
    for layer in SELECTING:
        kc = batches[layer]["key_cache"]
        copies.write(layer, kc.reshape(nb * bs, 2, 32).to(DEV), torch.arange(nb * bs, device=DEV))
    with_copies = PagedKascadeStrategy(plan, backend=backend, select_keys="fp8", rerank=2.0)
    per_layer = PagedKascadeStrategy(plan, backend=backend, select_keys="fp8", rerank=2.0)
    for layer in range(6):
        b = {k: v.to(DEV) for k, v in batches[layer].items()}
        if backend == "reference":
            a = with_copies.attend(layer, **b, scale=0.2, key_copies=copies)
            c = per_layer.attend(layer, **b, scale=0.2)
        else:
            args = (b["q"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"])
            a = with_copies.attend_decode(layer, *args, scale=0.2, key_copies=copies)
            c = per_layer.attend_decode(layer, *args, scale=0.2)
        assert torch.equal(a, c), layer
    # every slot of the selecting heads and one scratch row per layer: D FP8 bytes and a float32 scale a head
    assert copies.nbytes == sum((nb * bs + 1) * F.PagedKeyCopies.bytes_per_slot(len(h), 32) for h in SELECTING.values())


# ----------------------------------------------------------------------------------------------
# on a GPU (python -m pytest -m gpu tests/test_fp8_select.py): full size, CUDA graphs, FP8 tensor cores
# ----------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def overlap(got, want) -> float:
    """Mean share of want's keys that got holds, over (sequence, head, tile) (float32 near-ties may swap)."""
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    shares = []
    for b in range(want.counts.shape[0]):
        for u in range(want.counts.shape[1]):
            if int(want.counts[b, u]) == 0:
                continue
            for h in range(want.num_kv_heads):
                w = set(want.sets(b, h, u).tolist())
                shares.append(len(w & set(got.sets(b, h, u).tolist())) / len(w))
    return sum(shares) / len(shares)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,S,G,N,D", [(1, 8, 4, 131072, 128), (2, 3, 3, 65536, 64)])
def test_gpu_decode_full_size(B, S, G, N, D):
    q, k = rand(B, S * G, 1, D, seed=30), rand(B, S, N, D, seed=31)
    copy = F.quantize(k)
    ln = torch.tensor([N - 1000 * b for b in range(B)], device=DEV)
    for rerank in (None, 2.0):
        got = KD.select_fp8(q, copy, 0.1, 128, 32, kv_len=ln, rerank=rerank, k=k)
        want = F.select(q, *copy, 0.1, 128, 32, kv_len=ln, rerank=rerank, k=k)
        assert overlap(got, want) >= 0.999, rerank
    exact = R.select(q, k, 0.1, 128, 32, kv_len=ln)
    assert overlap(KD.select_fp8(q, copy, 0.1, 128, 32, kv_len=ln, rerank=50.0, k=k), exact) >= 0.999


@pytest.mark.gpu
@gpu
def test_gpu_decode_select_fp8_in_a_cuda_graph():
    """No host synchronisation: a captured select_fp8 (re-rank, a subset of heads, device lengths) replays
    the eager result."""
    q, k = rand(2, 2 * 4, 1, 128, seed=32), rand(2, 8, 32768, 128, seed=33)
    heads = torch.tensor([1, 5], device=DEV)
    copy = F.quantize(k.index_select(1, heads))
    ln = torch.tensor([30000, 32768], device=DEV)
    eager = KD.select_fp8(q, copy, 0.1, 128, 32, kv_len=ln, rerank=2.0, k=k, kv_heads=heads)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        KD.select_fp8(q, copy, 0.1, 128, 32, kv_len=ln, rerank=2.0, k=k, kv_heads=heads)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = KD.select_fp8(q, copy, 0.1, 128, 32, kv_len=ln, rerank=2.0, k=k, kv_heads=heads)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.indices, eager.indices) and torch.equal(out.counts, eager.counts)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_full_size_native_and_upcast_fp8(monkeypatch):
    """Prefill at 16K, 8B shape: FP8 tensor cores (sm_89+) and the widened path both match the reference."""
    from kascade.kernels import prefill_fp8

    q, k = rand(1, 32, 16384, 128, seed=34), rand(1, 8, 16384, 128, seed=35)
    copy = F.quantize(k)
    for rerank in (None, 2.0):
        want = F.select(q, *copy, 0.1, 128, 32, rerank=rerank, k=k)
        for mode in ("native", "upcast"):
            monkeypatch.setenv("KASCADE_FP8_DOT", mode)
            assert prefill_fp8.native_dot(q, 128) == (mode == "native" and torch.cuda.get_device_capability() >= (8, 9))
            assert overlap(KP8.select_fp8(q, copy, 0.1, 128, 32, rerank=rerank, k=k), want) >= 0.99, (rerank, mode)


@pytest.mark.gpu
@gpu
def test_gpu_static_generator_graph_with_fp8_copies():
    """kascade.enable(select_keys="fp8") on a bf16 model: the decode step (copy writes included) captures in a
    CUDA graph and replays the eager tokens."""
    model = tiny_model("llama", seed=17, num_key_value_heads=2).to(device=DEV, dtype=BF16)
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(18)).to(DEV)
    with torch.no_grad(), kascade.enable(model, _plan(model), select_keys="fp8", rerank=2.0, sparse_prefill=True):
        eager = StaticGenerator(model, batch_size=2, max_cache_len=340, cuda_graph=False)
        eager = eager.generate(ids, max_new_tokens=8)
        graph = StaticGenerator(model, batch_size=2, max_cache_len=340, cuda_graph=True)
        got = graph.generate(ids, max_new_tokens=8)
        assert F.key_copies(graph.cache).nbytes > 0
    assert got.tolist() == eager.tolist()


@pytest.mark.parametrize("select", [KD.select_fp8, KP8.select_fp8], ids=["decode", "prefill"])
def test_select_kernels_refuse_bad_copies_and_heads_by_name(select):
    q = torch.randn(1, 4, 1 if select is KD.select_fp8 else 64, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 300, 16, dtype=torch.bfloat16)
    k8, ks = F.quantize(k)
    with pytest.raises(ValueError, match="key_copy: expected"):
        select(q, k8, rerank=None)
    with pytest.raises(ValueError, match="k: rerank"):
        select(q, (k8, ks), rerank=2.0)
    with pytest.raises(ValueError, match="kv_heads: expected 2 KV heads"):
        select(q, (k8, ks), rerank=2.0, k=k, kv_heads=[0, 5])
    with pytest.raises(ValueError, match="k: expected"):
        select(q, (k8, ks), rerank=2.0, k=k.float())


def test_decode_only_mode_keeps_the_copies_of_the_dense_prefill():
    """sparse_prefill=False: the prompt attends densely, yet its keys must be in the copy that decode selects from."""
    model = tiny_model("llama", seed=13, num_key_value_heads=2)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(14))
    with torch.no_grad(), kascade.enable(model, _plan(model), select_keys="fp8", sparse_prefill=False):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        _check_copies(out.past_key_values, lambda layer: out.past_key_values.layers[layer].keys, ids.shape[1] + 4)
        gen = StaticGenerator(model, batch_size=1, max_cache_len=200)
        got = gen.generate(ids, max_new_tokens=5)
        _check_copies(gen.cache, lambda layer: gen.cache.layers[layer].keys, ids.shape[1] + 4)
    assert got.tolist() == out.sequences[:, ids.shape[1]:].tolist()


def test_key_copy_steps_copy_nothing_from_the_host_once_written(monkeypatch):
    """A decode step's write (what a CUDA graph captures) makes no host-to-device copy once the copy was written
    eagerly: the heads' index is made at the first write; a copy first seen inside a capture is refused."""
    k = torch.randn(2, 3, 32, 8)
    with pytest.raises(ValueError, match="eagerly"):
        F.LayerCopy((0, 2)).update(k, q_len=1, kv_len=torch.tensor([5, 9]), capturing=True, capacity=32)
    copy = F.LayerCopy((0, 2))
    copy.update(k[:, :, :20], q_len=20, capacity=32)
    real = torch.as_tensor

    def device_only(data, *args, **kwargs):
        if not isinstance(data, torch.Tensor):
            raise AssertionError(f"host data {data!r} copied to the device during a step")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", device_only)
    keys, scales = copy.update(k, q_len=1, kv_len=torch.tensor([21, 25]), capturing=True, capacity=32)
    want8, want_sc = F.quantize(k[:, [0, 2]])
    for b, row in ((0, 20), (1, 24)):
        assert torch.equal(keys[b, :, row].view(torch.uint8), want8[b, :, row].view(torch.uint8))
        assert torch.equal(scales[b, :, row], want_sc[b, :, row])
