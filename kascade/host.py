"""Small host lists (request and token indices, offsets) as device tensors, without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable host memory and then waits for the stream, so every
such call in a step empties the GPU's queue and the kernels after it start only once Python has caught up. In a
mixed serving step (prefill chunks beside decode requests), where the paged path builds a few index tensors per
layer, that is a stall per tensor per layer. `to_device` stages the values in pinned memory and copies them
asynchronously (PyTorch's pinned-memory cache keeps the staging buffer until the copy has run); elsewhere (CPU,
the interpreter) it is the plain `torch.tensor`.

    to_device(values, dtype, device) -> values (a sequence of numbers, or a CPU tensor) as dtype on device
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """values (a sequence of Python numbers, or a tensor on the host) as a tensor of dtype on device, same shape;
    asynchronous on CUDA."""
    device = torch.device(device)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
