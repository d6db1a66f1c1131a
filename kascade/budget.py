"""The top-k budget k(n) = min(n, max(k_min, floor(rho * n))).

One definition shared by the reference, the kernels and the integrations, so that every path
selects the same number of keys. `floor(rho * n)` is taken in float64 with a small guard so that
products that are integers in exact arithmetic (0.29 * 100) do not round down to the integer below.
"""

from __future__ import annotations

import math

import torch

_GUARD = 1e-9


def check_budget(rho: float, k_min: int) -> None:
    """Raise ValueError unless 0 < rho <= 1 and k_min >= 1 (an int)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0.0 < float(rho) <= 1.0):
        raise ValueError(f"rho: expected a fraction in (0, 1], got {rho!r}; use e.g. rho=0.1 for 10% of the keys")
    if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
        raise ValueError(f"k_min: expected an integer >= 1, got {k_min!r}")


def budget(n: int, rho: float, k_min: int) -> int:
    """Number of keys selected for a query that sees `n` prior keys."""
    if n <= 0:
        return 0
    return min(n, max(k_min, math.floor(float(rho) * n + _GUARD)))


def budget_tensor(n: torch.Tensor, rho: float, k_min: int) -> torch.Tensor:
    """`budget` element-wise on an integer tensor (any shape, any device); returns int64."""
    n64 = n.to(torch.int64)
    frac = torch.floor(n64.to(torch.float64) * float(rho) + _GUARD).to(torch.int64)
    k = torch.minimum(n64, torch.clamp(frac, min=k_min))
    return torch.clamp(k, min=0)
