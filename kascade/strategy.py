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
    """

    name = "kascade"

    def __init__(self, plan: Plan, backend: str = "auto", dense_anchor_output: bool = False):
        super().__init__(backend)
        self.plan = plan
        self.dense_anchor_output = dense_anchor_output
        self._head_maps: dict = {}  # (layer, Hkv, device) -> head map [Hkv] int64 on the device

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
            if not (len(p.anchors) == 1 or p.anchors[1] > 1):  # no layer reuses layer 0's keys
                return ops.dense(q, k, v, **kw)
            if q.shape[2] == 1 and q.is_cuda:  # decode: selection and dense output in one pass over K
                out, self.state[0] = ops.anchor(q, k, v, p.rho, p.k_min, p.tile, dense_output=True, **kw)
                return out
            self.state[0] = ops.select(q, k, p.rho, p.k_min, p.tile, **kw)
            return ops.dense(q, k, v, **kw)
        if p.is_anchor(layer):
            out, sel = ops.anchor(q, k, v, p.rho, p.k_min, p.tile, dense_output=self.dense_anchor_output, **kw)
            self.state[layer] = sel
            return out
        anchor = p.anchor_of(layer)
        if anchor not in self.state:
            raise RuntimeError(f"layer {layer} reuses anchor {anchor}, which did not run in this forward; "
                               "layers must run in order starting at layer 0")
        return ops.reuse(q, k, v, self.state[anchor], self._head_map(layer, k.shape[1], q.device), **kw)
