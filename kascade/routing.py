"""Routing: which selection each KV head of each layer attends to, worked out once from a plan.

Plan once, run per layer (as FlashInfer's plan/run wrappers): `Routing(plan, num_kv_heads, tp_rank=None)`
turns the plan's anchors, head map or head sources into plain Python lists per layer (a `LayerRoute`,
computed at the layer's first use and kept), and `tensors(layer, device)` caches the same as device
tensors for the kernels (built at their first use, so a CUDA-graph capture after one eager step finds
them). The contiguous strategy (kascade.strategy), the paged one (kascade.paged) and through it the vLLM
backend take their routes from here.

`num_kv_heads` below the plan's count is one tensor-parallel shard (Plan.shard): the rank's heads, with
sources re-based to its local head numbers (layer indices unchanged); `tp_rank` None takes the rank
from torch.distributed. A plan with a source outside its head's shard is refused at construction
(ValueError naming head_sources or head_map and the first crossing entry).

Selections a layer keeps: an anchor one of Hkv heads; a part-selecting layer (some heads select) one of
its selecting heads only, in ascending head order. A layer attends to the selections of its source
layers stacked along the head axis (ascending layer order), KV head h taking row `rows[h]`.

    routing = Routing(plan, num_kv_heads=4)
    r = routing.layer(3)           # LayerRoute: sources, own, layers, rows, slices, perm, head_map, part
    t = routing.tensors(3, "cuda")  # RouteTensors: the same as int64 / int32 tensors on the device
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kascade.plan import Plan, check_tp_degree


@dataclass(frozen=True)
class LayerRoute:
    """The routing of one layer l over Hkv (local) KV heads.

    sources   [Hkv] (layer, head) whose selection KV head h attends to; (l, h) when h selects.
    own       the KV heads of l that select, ascending (every head of an anchor; none of a plain reuse layer).
    layers    the layers whose selections l attends to, ascending (l among them when `own` is not empty).
    rows      [Hkv] row of KV head h in the selections of `layers` stacked along the head axis; None when
              one layer's selection serves every head in its own order.
    slices    strided views of the head axis that together pick `own` (head_slices), by first head.
    perm      with several slices: row of each own head (ascending) in the slices' selections stacked in
              slice order; else None.
    head_map  [Hkv] for a layer whose heads all read one anchor (a layer-granular reuse layer): the
              anchor's head each KV head reads; else None.
    part      (source layer, own slice, route [Hkv]) when the own heads form one view and every other head
              reads one earlier layer (kascade.ops.part_anchor): route[h] is h's row in the source
              layer's selection, or -1 - j for own head j. Else None.
    """

    sources: list
    own: list
    layers: list
    rows: list | None
    slices: list
    perm: list | None
    head_map: list | None
    part: tuple | None


class RouteTensors(NamedTuple):
    """A LayerRoute's lists as tensors on one device (None where the list is None)."""

    rows: torch.Tensor | None  # [Hkv] int64
    own: torch.Tensor  # [S] int64
    perm: torch.Tensor | None  # [S] int64
    head_map: torch.Tensor | None  # [Hkv] int64
    part_route: torch.Tensor | None  # [Hkv] int32


class Routing:
    """The routes of every layer of `plan` for a caller holding `num_kv_heads` KV heads (see the module
    docstring). ValueError at construction for a head count that is not the plan's nor a shard of it, and
    for a shard that the plan's head map or head sources cross."""

    def __init__(self, plan: Plan, num_kv_heads: int, tp_rank: int | None = None):
        self.plan = plan
        self.num_kv_heads = num_kv_heads
        self.tp_degree, self.tp_rank = plan.shard(num_kv_heads, tp_rank)
        if self.tp_degree > 1:  # the whole plan, not only the layers run so far, must stay inside the shards
            check_tp_degree(plan.head_map, self.tp_degree, num_kv_heads=num_kv_heads * self.tp_degree,
                            head_sources=plan.head_sources)
        self._layers: dict = {}
        self._tensors: dict = {}
        self._used: dict = {}

    def sources(self, layer: int) -> list[tuple[int, int]]:
        return self.plan.sources(layer, self.num_kv_heads, self.tp_rank)

    def used_by_later_layers(self, layer: int) -> bool:
        """Whether a later layer attends to this layer's selection (see Plan.used_by_later_layers)."""
        if layer not in self._used:
            self._used[layer] = self.plan.used_by_later_layers(layer, self.num_kv_heads, self.tp_rank)
        return self._used[layer]

    def layer(self, layer: int) -> LayerRoute:
        if layer not in self._layers:
            self._layers[layer] = self._build(layer)
        return self._layers[layer]

    def _row_in(self, layer: int, head: int) -> int:
        """Row of KV head `head` in the selection that `layer` keeps (its own heads, ascending)."""
        return self.layer(layer).own.index(head)

    def _build(self, layer: int) -> LayerRoute:
        hkv = self.num_kv_heads
        srcs = self.sources(layer)
        own = [h for h, (a, _) in enumerate(srcs) if a == layer]
        layers = sorted({a for a, _ in srcs})
        offset, base = {}, 0
        for a in layers:
            offset[a] = base
            base += len(own if a == layer else self.layer(a).own)
        rows = [offset[a] + (own.index(m) if a == layer else self._row_in(a, m)) for a, m in srcs]
        as_is = len(layers) == 1 and rows == list(range(hkv))  # one source, in its own head order
        slices = head_slices(own)
        order = [h for sl in slices for h in range(sl.start, sl.stop, sl.step)]
        perm = [order.index(h) for h in own] if len(slices) > 1 else None
        plain = not own and len(layers) == 1 and self.plan.is_anchor(layers[0])
        part = None
        if len(slices) == 1 and len(layers) == 2 and layers[1] == layer:
            route = [-1 - own.index(h) if a == layer else self._row_in(a, m) for h, (a, m) in enumerate(srcs)]
            part = (layers[0], slices[0], route)
        return LayerRoute(sources=srcs, own=own, layers=layers, rows=None if as_is else rows, slices=slices,
                          perm=perm, head_map=[m for _, m in srcs] if plain else None, part=part)

    def tensors(self, layer: int, device) -> RouteTensors:
        key = (layer, str(device))
        if key not in self._tensors:
            r = self.layer(layer)

            def t(x, dtype=torch.int64):
                return None if x is None else torch.tensor(x, device=device, dtype=dtype)

            self._tensors[key] = RouteTensors(t(r.rows), t(r.own), t(r.perm), t(r.head_map),
                                              t(r.part and r.part[2], torch.int32))
        return self._tensors[key]


def head_slices(heads: list[int]) -> list[slice]:
    """Few slices of the head axis that together pick exactly `heads` (ascending, distinct), greedily the
    longest evenly spaced run first (ties: the earliest). A slice is a view: the kernels read its rows
    in place through strides, so no selecting head is copied; each slice costs one selection launch."""
    left, out = list(heads), []
    while left:
        best = left[:1]
        for i, a in enumerate(left):
            for b in left[i + 1:]:
                run, step = [a], b - a
                while run[-1] + step in left:
                    run.append(run[-1] + step)
                if len(run) > len(best):
                    best = run
        step = best[1] - best[0] if len(best) > 1 else 1
        out.append(slice(best[0], best[-1] + 1, step))
        left = [h for h in left if h not in best]
    return sorted(out, key=lambda sl: sl.start)
