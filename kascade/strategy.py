"""Strategies: how each layer of one forward pass attends.

An integration calls `strategy.attend(layer, q, k, v, kv_start, scale)` for every attention layer in
order (plus `kv_len=` for a decode step on a preallocated cache when `attend` accepts it); the strategy keeps whatever it needs between layers of the same forward (an anchor's
Selection) in `self.state`, which `begin_forward()` clears. Integrations call `begin_forward()` at
layer 0, so nothing leaks from one forward (one request, one decode step) into the next.

Decode-only mode (`sparse_prefill=False`, on every strategy): a step with more than one query (a
prompt, or a prefill chunk on top of a cache) attends densely to every key, as the dense strategy does;
decode steps (one query) take the strategy's sparse path. This is how decode-time methods (Quest,
TidalDecode, OmniKV) are run by their authors, and it isolates what sparse decoding costs in accuracy.
The strategy classes default to the paper's method (sparse prefill and decode); what a user gets from
`kascade.enable(model, plan)`, the vLLM plugin and the CLI when they do not say is DEFAULT_SPARSE_PREFILL.

Shapes as in kascade.reference: q [B, Hq, Q, D], k/v [B, Hkv, N, D], kv_start [B] or None, kv_len [B]
or None. Nothing here synchronises with the host on the kernel path: a decode step can be captured in
a CUDA graph (routes are cached as device tensors at their first use, outside the capture; kascade.routing).
"""

from __future__ import annotations


import torch

from kascade import ops
from kascade.plan import Plan
from kascade.reference import gather_heads
from kascade.routing import Routing, head_slices  # noqa: F401 - head_slices is imported from here too

_ASSEMBLED = "assembled"  # state key prefix of a head-granular layer's assembled Selection


DEFAULT_SPARSE_PREFILL = False
"""The mode of the user-facing entry points (kascade.enable, kascade.distributed.enable, the vLLM plugin, `kascade
generate` and `kascade demo`) when none is named: decode-only. On formats unlike the plan's calibration, a sparse
prefill at rho 0.1 lost up to 4.5 points against dense on SmolLM2 (structured records, JSON) and per-layer top-k
itself up to 3.5, while decode-only mode kept every family within 2 points of dense
(benchmarks/results/generalization_smollm2.md, "Decode-only mode"). sparse_prefill=True opts into the prefill
speedup with that risk."""


def resolve_sparse_prefill(sparse_prefill) -> bool:
    """An entry point's sparse_prefill: None (not named) is DEFAULT_SPARSE_PREFILL, else checked as a bool."""
    return DEFAULT_SPARSE_PREFILL if sparse_prefill is None else check_sparse_prefill(sparse_prefill)


def warn_if_mode_unvalidated(plan, sparse_prefill: bool) -> None:
    """Warn when a plan calibrated in decode-only mode (its provenance's sparse_prefill is False: judged with the
    prompt attended densely) runs with a sparse prefill, which its calibration never measured."""
    import warnings

    provenance = getattr(plan, "provenance", None) or {}
    if sparse_prefill and provenance.get("sparse_prefill") is False:
        warnings.warn("plan: calibrated in decode-only mode (provenance sparse_prefill false), run here with a sparse "
                      "prefill, which its calibration did not measure; run it with sparse_prefill=False, or "
                      "calibrate with the sparse prefill (kascade calibrate --sparse-prefill yes)", stacklevel=3)


def check_sparse_prefill(sparse_prefill) -> bool:
    """sparse_prefill as a bool; ValueError unless it is True or False."""
    if not isinstance(sparse_prefill, bool):
        raise ValueError(f"sparse_prefill: expected True (sparse prefill and decode) or False (dense prefill, sparse "
                         f"decode), got {sparse_prefill!r}")
    return sparse_prefill


class Strategy:
    """Base: dense attention in every layer. Subclasses override `attend`.

    sparse_prefill: False runs every step of more than one query densely (decode-only mode; subclasses
    test `self.dense_step(q)` first in `attend`)."""

    name = "dense"

    def __init__(self, backend: str = "auto", sparse_prefill: bool = True):
        ops.check_backend(backend)
        self.backend = backend
        self.sparse_prefill = check_sparse_prefill(sparse_prefill)
        self.state: dict = {}

    def dense_step(self, q: torch.Tensor) -> bool:
        """True when this step attends densely because of the mode: decode-only and q [B, Hq, Q, D] with Q > 1."""
        return not self.sparse_prefill and q.shape[2] > 1

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
    sparse result would be the dense one. `sparse_prefill=False`: prompts and prefill chunks attend
    densely in every layer, decode steps as above (decode-only mode).

    Head-granular plans (`plan.head_sources`): a reuse layer's selecting heads run the selection on
    their own KV heads (a slice of q and k); the layer then attends, per KV head, to its own set or
    to the set of the (layer, head) its source names, assembled into one Selection of Hkv heads.

    select_keys="fp8" (kascade.fp8keys): every selection is scored from an FP8 copy of the selecting heads'
    keys, with `rerank` (None or c >= 1) re-ranking c * k candidates exactly; attention itself reads the
    exact keys and values. The copy comes from `key_copies` (an object with `copy(layer, heads, k, q_len,
    kv_len)` returning (keys [B, S, N, D], scales [B, S, N]) of the layer's selecting heads `heads`, set
    by an integration that keeps one with its cache) or, when None, is made from k at each call. Anchors
    then attend to their selection by gathering K and V rows (no stored logits), and a part-selecting
    decode layer takes the assembled path (no one-pass part_anchor). Layer 0 of a decode step reads every
    key for its dense output anyway, so it selects exactly from that pass (its copy is still written).
    """

    name = "kascade"

    def __init__(self, plan: Plan, backend: str = "auto", dense_anchor_output: bool = False,
                 sparse_prefill: bool = True, select_keys: str = "exact", rerank: float | None = None):
        super().__init__(backend, sparse_prefill=sparse_prefill)
        from kascade import fp8keys

        fp8keys.check_options(select_keys, rerank)
        warn_if_mode_unvalidated(plan, self.sparse_prefill)
        self.plan = plan
        self.dense_anchor_output = dense_anchor_output
        self.select_keys = select_keys
        self.rerank = None if rerank is None else float(rerank)
        self.key_copies = None  # set per forward by an integration holding FP8 copies (select_keys="fp8")
        self._routings: dict = {}  # Hkv -> Routing

    def validate(self, model_config) -> None:
        self.plan.validate(model_config)

    def routing(self, num_kv_heads: int) -> Routing:
        """The plan's routes for `num_kv_heads` KV heads (fewer than the plan's: this rank's TP shard)."""
        if num_kv_heads not in self._routings:
            self._routings[num_kv_heads] = Routing(self.plan, num_kv_heads)
        return self._routings[num_kv_heads]

    def attend(self, layer, q, k, v, kv_start, scale, kv_len=None):
        p = self.plan
        kw = dict(kv_start=kv_start, scale=scale, backend=self.backend, kv_len=kv_len)
        if k.shape[2] <= p.k_min or self.dense_step(q):
            if self.select_keys == "fp8" and self.key_copies is not None:  # later steps select from these rows
                routing = self.routing(k.shape[1])
                own = routing.layer(layer).own
                if own and (layer != 0 or routing.used_by_later_layers(0)):
                    self.key_copies.copy(layer, own, k, q.shape[2], kw.get("kv_len"))
            return ops.dense(q, k, v, **kw)
        routing = self.routing(k.shape[1])
        fp8 = self.select_keys == "fp8"
        if layer == 0:
            if not routing.used_by_later_layers(0):
                return ops.dense(q, k, v, **kw)
            if fp8 and q.shape[2] > 1:
                self.state[0] = self._select_fp8(0, q, k, routing, kw)
                return ops.dense(q, k, v, **kw)
            if fp8 and self.key_copies is not None:  # the copy stays current; decode selects from the dense pass
                self.key_copies.copy(0, routing.layer(0).own, k, q.shape[2], kw.get("kv_len"))
            if q.shape[2] == 1 and q.is_cuda:  # decode: selection and dense output in one pass over K
                out, self.state[0] = self._anchor(q, k, v, True, kw)
                return out
            self.state[0] = self._select(q, k, kw)
            return ops.dense(q, k, v, **kw)
        if p.is_anchor(layer):
            if fp8:
                sel = self._select_fp8(layer, q, k, routing, kw)
                out = ops.dense(q, k, v, **kw) if self.dense_anchor_output else ops.reuse(q, k, v, sel, None, **kw)
            else:
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
        return ops.reuse(q, k, v, self.state[anchor], routing.tensors(layer, q.device).head_map, **kw)

    def _select(self, q, k, kw):
        """The Selection of q's query heads over k's KV heads at the plan's budget (subclasses may
        choose keys differently; kw: the keywords of ops.select)."""
        p = self.plan
        return ops.select(q, k, p.rho, p.k_min, p.tile, **kw)

    def _select_fp8(self, layer, q, k, routing, kw):
        """The Selection of layer `layer`'s selecting heads ([B, S, U, Kmax], ascending heads) scored from the
        FP8 copy of their keys (select_keys="fp8")."""
        p = self.plan
        own = routing.layer(layer).own
        hkv = k.shape[1]
        every = len(own) == hkv
        if every:
            qh, kv_heads = q, None
        else:
            t = routing.tensors(layer, q.device)
            qh = q.unflatten(1, (hkv, q.shape[1] // hkv)).index_select(1, t.own).flatten(1, 2)  # their query heads
            kv_heads = t.own
        if self.key_copies is not None:
            copy = self.key_copies.copy(layer, own, k, q.shape[2], kw.get("kv_len"))
        else:
            from kascade import fp8keys

            copy = fp8keys.transient(k, None if every else own)
        return ops.select_fp8(qh, k, copy, p.rho, p.k_min, p.tile, rerank=self.rerank, kv_heads=kv_heads, **kw)

    def _anchor(self, q, k, v, dense_output: bool, kw):
        """(output, Selection) of an anchor layer: its selection, and attention to it (or dense)."""
        p = self.plan
        return ops.anchor(q, k, v, p.rho, p.k_min, p.tile, dense_output=dense_output, **kw)

    def attended_selection(self, layer: int, num_kv_heads: int):
        """(Selection, head map or None) that reuse layer `layer` attended to in this forward."""
        routing = self.routing(num_kv_heads)
        route = routing.layer(layer)
        if self.plan.head_granular:
            if (_ASSEMBLED, layer) not in self.state:  # attended in one pass (part_anchor): assembled here
                rows = routing.tensors(layer, self.state[layer].indices.device).rows
                self.state[(_ASSEMBLED, layer)] = gather_heads([self.state[a] for a in route.layers], rows)
            return self.state[(_ASSEMBLED, layer)], None
        return self.state[self.plan.anchor_of(layer)], route.head_map

    # -- head granularity -----------------------------------------------------------------------
    def _part_route(self, layer, q, k):
        """(source layer, own heads as a slice, route [Hkv] int32 on the device) when a decode step of this
        head-granular layer can run as ops.part_anchor: its own selecting heads form one strided view, every
        other head reuses the one earlier layer `source` (that has run), the heads are read in place
        (IN_PLACE_HEADS) and the keys are chosen by this class's own selection (a subclass choosing keys
        otherwise keeps the general path). Else None."""
        if q.shape[2] != 1 or getattr(self._select, "__func__", None) is not KascadeStrategy._select \
                or self.select_keys != "exact":
            return None
        routing = self.routing(k.shape[1])
        part = routing.layer(layer).part
        if not IN_PLACE_HEADS or part is None or part[0] not in self.state:
            return None
        return part[0], part[1], routing.tensors(layer, q.device).part_route

    def layer_selection(self, layer, q, k, kw):
        """The Selection [B, Hkv, U, Kmax] that a head-granular reuse layer attends to (own heads
        selected here, the others gathered from their source layers)."""
        hkv = k.shape[1]
        routing = self.routing(hkv)
        route, t = routing.layer(layer), routing.tensors(layer, q.device)
        if route.own and self.select_keys == "fp8":
            self.state[layer] = self._select_fp8(layer, q, k, routing, kw)
        elif route.own:
            g = q.shape[1] // hkv
            if IN_PLACE_HEADS:  # strided views of q and k: the kernels read the cache in place
                qg = q.unflatten(1, (hkv, g))
                parts = [self._select(qg[:, sl].flatten(1, 2), k[:, sl], kw) for sl in route.slices]
                own = parts[0] if len(parts) == 1 else gather_heads(parts, t.perm)  # ascending head order
            else:  # gathered into a copy first
                qh = (t.own[:, None] * g + torch.arange(g, device=q.device)[None]).reshape(-1)  # their query heads
                own = self._select(q.index_select(1, qh), k.index_select(1, t.own), kw)
            self.state[layer] = own
        missing = [a for a in route.layers if a not in self.state]
        if missing:
            raise RuntimeError(f"layer {layer} takes keys from layers {missing}, which did not run in this forward; "
                               "layers must run in order starting at layer 0")
        return gather_heads([self.state[a] for a in route.layers], t.rows)


IN_PLACE_HEADS = True  # False: a part-selecting layer copies its selecting heads first (kept for measurement)
