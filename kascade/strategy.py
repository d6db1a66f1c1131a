"""Strategies: how each layer of one forward pass attends.

An integration calls `strategy.attend(layer, q, k, v, kv_start, scale)` for every attention layer in
order (plus `kv_len=` for a decode step on a preallocated cache when `attend` accepts it); the strategy keeps whatever it needs between layers of the same forward (an anchor's
Selection) in `self.state`, which `begin_forward()` clears. Integrations call `begin_forward()` at
layer 0, so nothing leaks from one forward (one request, one decode step) into the next.

Shapes as in kascade.reference: q [B, Hq, Q, D], k/v [B, Hkv, N, D], kv_start [B] or None, kv_len [B]
or None. Nothing here synchronises with the host on the kernel path: a decode step can be captured in
a CUDA graph (head maps are cached as device tensors at their first use, outside the capture).
"""

from __future__ import annotations


import torch

from kascade import ops
from kascade.plan import Plan
from kascade.reference import gather_heads

_ASSEMBLED = "assembled"  # state key prefix of a head-granular layer's assembled Selection


class Strategy:
    """Base: dense attention in every layer. Subclasses override `attend`."""

    name = "dense"

    def __init__(self, backend: str = "auto"):
        ops.check_backend(backend)
        self.backend = backend
        self.state: dict = {}

    def begin_forward(self) -> None:
        self.state.clear()

    def validate(self, model_config) -> None:
        """Raise ValueError if the strategy does not fit the model."""

    def attend(self, layer: int, q, k, v, kv_start, scale, kv_len=None) -> torch.Tensor:
        return ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend, kv_len=kv_len)


class KascadeStrategy(Strategy):
    """Anchors select top-k keys per KV head; the layers after an anchor reuse them, head-mapped.

    Layer 0 is dense and selects (for the layers before the next anchor). Other anchors attend to
    their own selection (sparse output, the default) or densely (`dense_anchor_output=True`).
    Sequences no longer than `plan.k_min` keys run dense: every budget k(n) is then n, so the
    sparse result would be the dense one.

    Head-granular plans (`plan.head_sources`): a reuse layer's selecting heads run the selection on
    their own KV heads (a slice of q and k); the layer then attends, per KV head, to its own set or
    to the set of the (layer, head) its source names, assembled into one Selection of Hkv heads.
    """

    name = "kascade"

    def __init__(self, plan: Plan, backend: str = "auto", dense_anchor_output: bool = False):
        super().__init__(backend)
        self.plan = plan
        self.dense_anchor_output = dense_anchor_output
        self._head_maps: dict = {}  # (layer, Hkv, device) -> head map [Hkv] int64 on the device
        self._routes: dict = {}  # (layer, Hkv, device) -> (source layers, rows [Hkv], selecting heads)

    def validate(self, model_config) -> None:
        self.plan.validate(model_config)

    def _head_map(self, layer, hkv, device) -> torch.Tensor:
        key = (layer, hkv, str(device))
        if key not in self._head_maps:
            self._head_maps[key] = torch.tensor(self.plan.kv_head_map(layer, hkv), device=device)
        return self._head_maps[key]

    def attend(self, layer, q, k, v, kv_start, scale, kv_len=None):
        p = self.plan
        kw = dict(kv_start=kv_start, scale=scale, backend=self.backend, kv_len=kv_len)
        if k.shape[2] <= p.k_min:
            return ops.dense(q, k, v, **kw)
        if layer == 0:
            if not p.used_by_later_layers(0, k.shape[1]):
                return ops.dense(q, k, v, **kw)
            if q.shape[2] == 1 and q.is_cuda:  # decode: selection and dense output in one pass over K
                out, self.state[0] = self._anchor(q, k, v, True, kw)
                return out
            self.state[0] = self._select(q, k, kw)
            return ops.dense(q, k, v, **kw)
        if p.is_anchor(layer):
            out, sel = self._anchor(q, k, v, self.dense_anchor_output, kw)
            self.state[layer] = sel
            return out
        if p.head_granular:
            part = self._part_route(layer, q, k)
            if part is not None:  # own heads in one view, the others from one earlier layer: one sparse pass
                source, heads, route = part
                out, self.state[layer] = ops.part_anchor(q, k, v, heads, self.state[source], route, p.rho, p.k_min,
                                                         p.tile, **kw)
                return out
            sel = self.state[(_ASSEMBLED, layer)] = self.layer_selection(layer, q, k, kw)
            return ops.reuse(q, k, v, sel, None, **kw)
        anchor = p.anchor_of(layer)
        if anchor not in self.state:
            raise RuntimeError(f"layer {layer} reuses anchor {anchor}, which did not run in this forward; "
                               "layers must run in order starting at layer 0")
        return ops.reuse(q, k, v, self.state[anchor], self._head_map(layer, k.shape[1], q.device), **kw)

    def _select(self, q, k, kw):
        """The Selection of q's query heads over k's KV heads at the plan's budget (subclasses may
        choose keys differently; kw: the keywords of ops.select)."""
        p = self.plan
        return ops.select(q, k, p.rho, p.k_min, p.tile, **kw)

    def _anchor(self, q, k, v, dense_output: bool, kw):
        """(output, Selection) of an anchor layer: its selection, and attention to it (or dense)."""
        p = self.plan
        return ops.anchor(q, k, v, p.rho, p.k_min, p.tile, dense_output=dense_output, **kw)

    def attended_selection(self, layer: int, num_kv_heads: int):
        """(Selection, head map or None) that reuse layer `layer` attended to in this forward."""
        if self.plan.head_granular:
            if (_ASSEMBLED, layer) not in self.state:  # attended in one pass (part_anchor): assembled here
                layers, rows, *_ = self._route(layer, num_kv_heads, self.state[layer].indices.device)
                self.state[(_ASSEMBLED, layer)] = gather_heads([self.state[a] for a in layers], rows)
            return self.state[(_ASSEMBLED, layer)], None
        return self.state[self.plan.anchor_of(layer)], self.plan.kv_head_map(layer, num_kv_heads)

    # -- head granularity -----------------------------------------------------------------------
    def _route(self, layer, hkv, device):
        """(source layers, row of each KV head in the stacked sources [Hkv] on the device or None when
        the one source is used as it is, own selecting KV heads [S] on the device, the slices of the
        head axis that cover them or None to gather them, the permutation from the slices' head order
        to ascending order [S] on the device or None)."""
        key = (layer, hkv, str(device))
        if key not in self._routes:
            srcs = self.plan.sources(layer, hkv)
            own = [h for h, (a, _) in enumerate(srcs) if a == layer]
            layers = sorted({a for a, _ in srcs})
            offset, base = {}, 0
            for a in layers:
                offset[a] = base
                base += len(own) if a == layer else self._selection_heads(a, hkv)
            rows = [offset[a] + (own.index(m) if a == layer else self._row_in(a, m, hkv)) for a, m in srcs]
            as_is = len(layers) == 1 and rows == list(range(hkv))  # one source, in its own head order
            heads = torch.tensor(own, device=device, dtype=torch.int64)
            slices = head_slices(own) if (own and IN_PLACE_HEADS) else None
            order = [h for sl in slices for h in range(sl.start, sl.stop, sl.step)] if slices else own
            stacked = slices is not None and len(slices) > 1  # several selections, stacked by gather_heads
            perm = torch.tensor([order.index(h) for h in own], device=device) if stacked else None
            self._routes[key] = (layers, None if as_is else torch.tensor(rows, device=device), heads, slices, perm)
        return self._routes[key]

    def _part_route(self, layer, q, k):
        """(source layer, own heads as a slice, route [Hkv] int32 on the device) when a decode step of this
        head-granular layer can run as ops.part_anchor: its own selecting heads form one strided view, every
        other head reuses the one earlier layer `source` (that has run), and the keys are chosen by this
        class's own selection (a subclass choosing keys otherwise keeps the general path). Else None."""
        if q.shape[2] != 1 or getattr(self._select, "__func__", None) is not KascadeStrategy._select:
            return None
        hkv = k.shape[1]
        layers, rows, heads, slices, _ = self._route(layer, hkv, q.device)
        if not slices or len(slices) != 1 or len(layers) != 2 or layers[1] != layer or layers[0] not in self.state:
            return None
        key = ("part", layer, hkv, str(q.device))
        if key not in self._routes:
            own = list(range(hkv))[slices[0]]
            srcs = self.plan.sources(layer, hkv)
            route = [-1 - own.index(h) if a == layer else self._row_in(a, m, hkv) for h, (a, m) in enumerate(srcs)]
            self._routes[key] = torch.tensor(route, device=q.device, dtype=torch.int32)
        return layers[0], slices[0], self._routes[key]

    def _selection_heads(self, a, hkv) -> int:
        return hkv if self.plan.is_anchor(a) else len(self.plan.selecting_heads(a, hkv))

    def _row_in(self, a, m, hkv) -> int:
        """Row of KV head m in the Selection that layer a keeps."""
        return m if self.plan.is_anchor(a) else self.plan.selecting_heads(a, hkv).index(m)

    def layer_selection(self, layer, q, k, kw):
        """The Selection [B, Hkv, U, Kmax] that a head-granular reuse layer attends to (own heads
        selected here, the others gathered from their source layers)."""
        hkv = k.shape[1]
        layers, rows, heads, slices, perm = self._route(layer, hkv, q.device)
        if heads.numel():
            g = q.shape[1] // hkv
            if slices is not None:  # strided views of q and k: the kernels read the cache in place
                qg = q.unflatten(1, (hkv, g))
                parts = [self._select(qg[:, sl].flatten(1, 2), k[:, sl], kw) for sl in slices]
                own = parts[0] if len(parts) == 1 else gather_heads(parts, perm)  # ascending head order
            else:  # gathered into a copy first (IN_PLACE_HEADS = False)
                qh = (heads[:, None] * g + torch.arange(g, device=q.device)[None]).reshape(-1)  # their query heads
                own = self._select(q.index_select(1, qh), k.index_select(1, heads), kw)
            self.state[layer] = own
        missing = [a for a in layers if a not in self.state]
        if missing:
            raise RuntimeError(f"layer {layer} takes keys from layers {missing}, which did not run in this forward; "
                               "layers must run in order starting at layer 0")
        return gather_heads([self.state[a] for a in layers], rows)


IN_PLACE_HEADS = True  # False: a part-selecting layer copies its selecting heads first (kept for measurement)


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
