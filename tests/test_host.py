"""kascade.host.to_device: host index lists as device tensors (asynchronously on CUDA, through pinned memory)."""

from __future__ import annotations

import pytest
import torch

from kascade.host import to_device


def test_values_dtype_and_device_on_the_cpu():
    t = to_device([3, 1, 2], torch.int32, "cpu")
    assert t.tolist() == [3, 1, 2] and t.dtype == torch.int32 and t.device.type == "cpu"
    assert to_device([], torch.int64, torch.device("cpu")).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_is_asynchronous_and_exact():
    """Values and dtype come through; the copy is enqueued behind running work, not waited for."""
    big = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    for _ in range(20):
        big = big @ big / 64  # keeps the stream busy
    t = to_device(list(range(1000)), torch.int64, "cuda")
    busy = not torch.cuda.current_stream().query()
    assert t.device.type == "cuda" and t.dtype == torch.int64 and t.tolist() == list(range(1000))
    assert busy, "to_device waited for the stream"


def test_host_tensors_keep_their_shape():
    t = to_device(torch.tensor([[1, 2], [3, 4]], dtype=torch.int64), torch.int32, "cpu")
    assert t.tolist() == [[1, 2], [3, 4]] and t.dtype == torch.int32
