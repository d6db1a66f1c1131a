"""Strategies: how each layer of one forward pass attends.

An integration calls `strategy.attend(layer, q, k, v, kv_start, scale)` for every attention layer in
order; the strategy keeps whatever it needs between layers of the same forward (an anchor's
Selection) in `self.state`, which `begin_forward()` clears. Integrations call `begin_forward()` at
layer 0, so nothing leaks from one forward (one request, one decode step) into the next.

Shapes as in kascade.reference: q [B, Hq, Q, D], k/v [B, Hkv, N, D], kv_start [B] or None.
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

    def attend(self, layer: int, q, k, v, kv_start, scale) -> torch.Tensor:
        return ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend)


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

    def validate(self, model_config) -> None:
        self.plan.validate(model_config)

    def _select(self, q, k, kv_start, scale):
        p = self.plan
        return ops.select(q, k, p.rho, p.k_min, p.tile, kv_start=kv_start, scale=scale, backend=self.backend)

    def attend(self, layer, q, k, v, kv_start, scale):
        p = self.plan
        if k.shape[2] <= p.k_min:
            return ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend)
        if layer == 0:
            if len(p.anchors) == 1 or p.anchors[1] > 1:  # some layer reuses layer 0's keys
                self.state[0] = self._select(q, k, kv_start, scale)
            return ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend)
        if p.is_anchor(layer):
            out, sel = ops.anchor(q, k, v, p.rho, p.k_min, p.tile, kv_start=kv_start, scale=scale,
                                  dense_output=self.dense_anchor_output, backend=self.backend)
            self.state[layer] = sel
            return out
        anchor = p.anchor_of(layer)
        if anchor not in self.state:
            raise RuntimeError(f"layer {layer} reuses anchor {anchor}, which did not run in this forward; "
                               "layers must run in order starting at layer 0")
        head_map = torch.tensor(p.kv_head_map(layer, k.shape[1]), device=q.device)
        return ops.reuse(q, k, v, self.state[anchor], head_map, kv_start=kv_start, scale=scale, backend=self.backend)
