"""This process's tensor-parallel rank, for code that holds one shard of the KV heads (kascade.plan,
kascade.distributed). A module of its own so that both import it and neither imports the other."""

from __future__ import annotations

import torch.distributed as dist


def default_tp_rank(tp_degree: int) -> int:
    """This process's TP rank from torch.distributed: rank modulo `tp_degree` (TP innermost)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"tp_rank: the attention holds 1/{tp_degree} of the plan's KV heads (a tensor-parallel "
                         "shard) but torch.distributed is not initialised, so the rank is unknown; use "
                         "kascade.distributed.ShardedKascadeStrategy(plan, tp_degree, rank)")
    world = dist.get_world_size()
    if world % tp_degree:
        raise ValueError(f"tp_rank: world size {world} is not a multiple of the TP degree {tp_degree}; use "
                         "kascade.distributed.ShardedKascadeStrategy(plan, tp_degree, rank)")
    return dist.get_rank() % tp_degree
