"""kascade.ops: the dense step through torch SDPA (whole prompts, decode steps, a prefill chunk on top
of a cache) against the reference."""

import pytest
import torch

from kascade import ops, reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _qkv(B, Hkv, G, Q, N, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Q, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return (t.to(device, dtype) for t in (q, k, v))


@pytest.mark.parametrize("Q,N", [(64, 64), (1, 50), (24, 100), (99, 100)])
@pytest.mark.parametrize("G", [1, 4])
def test_sdpa_causal_matches_reference(Q, N, G):
    """Q == N, Q == 1 and a chunk of the last Q positions (lower-right causal) give the reference's output."""
    q, k, v = _qkv(2, 2, G, Q, N, 32, seed=Q + N)
    got = ops.sdpa_causal(q, k, v, scale=0.3)
    want = reference.dense_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Q,N", [(100, 100), (40, 100)])
def test_sdpa_padded_matches_reference(Q, N):
    """Left-padded sequences, one SDPA call each: the reference's output, padding query rows zero. In the chunk
    (Q < N) sequence 2's padding covers some of its queries (kv_start 70 > N - Q = 60), sequence 3's all but the
    last (one real key)."""
    q, k, v = _qkv(4, 2, 4, Q, N, 32, seed=Q)
    kv_start = torch.tensor([0, 17, 70, N - 1])
    got = ops.sdpa_padded(q, k, v, kv_start, scale=0.3)
    want = reference.dense_attention(q, k, v, kv_start=kv_start, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[3, :, :-1].abs().sum() == 0 and got[3, :, -1].abs().sum() > 0


@pytest.mark.gpu
@gpu
def test_gpu_dense_prefill_with_left_padding():
    """ops.dense on CUDA for a left-padded prompt batch: SDPA per sequence (not the reference), equal to it."""
    q, k, v = _qkv(3, 8, 4, 4096, 4096, 128, torch.bfloat16, "cuda", seed=2)
    kv_start = torch.tensor([0, 1000, 4000], device="cuda")
    got = ops.dense(q, k, v, kv_start=kv_start)
    want = reference.dense_attention(q.float(), k.float(), v.float(), kv_start=kv_start)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_dense_prefill_chunk_on_a_cache():
    """ops.dense on CUDA for a 2K-query chunk over 16K keys: SDPA's flash path, equal to the reference."""
    q, k, v = _qkv(2, 8, 4, 2048, 16384, 128, torch.bfloat16, "cuda", seed=1)
    assert ops._flash_takes(q, k, v)  # else ops.dense would take the (slow) reference
    got = ops.dense(q, k, v)
    want = reference.dense_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.dense(q, k, v)
    # no [Q, N] mask or score matrix: far below 2 x 32 heads x 2048 x 16384 x 4 bytes (8 GiB)
    assert torch.cuda.max_memory_allocated() - base < 2**28


def test_flash_check_is_false_without_cuda():
    """On the CPU SDPA has no flash kernel: a chunk on top of a cache would take the reference in ops.dense."""
    q, k, v = _qkv(1, 2, 4, 8, 16, 64)
    assert ops._flash_takes(q, k, v) is False
