"""The strategies the accuracy harness compares, all at the same budget (rho, k_min), selectable by name.

    strategy = make_strategy("quest", plan, model.config, rho=0.1, k_min=128)
    with kascade.enable(model, strategy=strategy):
        ...

Every sparse strategy attends through `kascade.ops` (the reference, or the GPU kernels when the tensors
are on CUDA), to sets of keys held in `kascade.reference.Selection` objects; none has attention code
of its own. Budget, for every strategy and both phases, as in Kascade (SPEC.md):

- decode: a query that sees n keys attends to k(n) = min(n, max(k_min, floor(rho n))) keys;
- prefill: queries are cut into tiles of T = plan.tile (32) positions; tile t attends to k(tT) keys
  chosen among the keys before the tile, plus its own diagonal block, causally;
- layer 0 is dense for every strategy (Kascade's rule; Quest and OmniKV also keep their first layers
  dense), and sequences of at most k_min keys are dense (the budget is then every key anyway).

Strategies (`STRATEGIES`), all but dense and the decode-time baselines sparse in prefill and decode (the mode Kascade is
made for):

    dense             full attention everywhere (the reference score)
    oracle            every layer is an anchor: its own pooled top-k per KV head (upper bound of
                      head-aware top-k selection)
    oracle-shared-budget  the oracle, the k(n) keys of each KV head pooled into one budget of Hkv k(n) for the
                      tile or decode step, kept where any head's pooled score is largest (mass-adaptive
                      per-head budgets at equal total keys; `selectors.shared_budget_selections`, in PyTorch)
    kascade           the calibrated plan: anchors select per KV head, the other layers reuse the
                      selection of their anchor through the plan's head map
    kascade-agnostic  the plan's anchors (of a head-granular plan: as many layers as its cost, those
                      with the most selecting heads; `selecting_layers`), but one set per tile shared by all KV heads: post-softmax
                      probabilities summed over ALL query heads, the set broadcast to every KV head
    kascade-paper     Kascade with the paper's recipe: a plan calibrated by attention-mass coverage alone
                      (`kascade calibrate --recipe paper`), passed separately (paper_plan=, --paper-plan)
    kascade-no-remap  the plan with the identity head map (see `without_remap` for head-granular plans)
    kascade-dense-anchors  the plan, its anchors (layers whose heads all select) attending densely instead of
                      to their own selection (the layers after them still reuse it)
    kascade-sinks     the plan, every selected set keeping the first 4 keys (attention sinks) and the 64
                      keys just before the query or tile (a local window) within the same budget
                      (`selectors.head_selection`, in PyTorch: a measurement, not a kernel path)
    kascade-fp8       the plan, every selection scored from an FP8 copy of the keys (kascade.fp8keys;
                      `kascade.enable(..., select_keys="fp8")`)
    kascade-fp8-rerank2  the same with the 2 k FP8 candidates re-ranked with the exact keys (rerank=2.0)
    kascade-shared-budget  the plan, the budget of each selecting layer shared by its selecting KV heads as in
                      oracle-shared-budget; reusing heads attend to their source head's set (in PyTorch)
    uniform           as many anchors as the plan's selecting-layer equivalents, evenly spaced
                      (plan.uniform_anchors), identity map
    streamingllm      the first 4 keys (attention sinks) and the most recent ones, k(n) in all
    quest             Quest, sparse prefill variant (not Quest as published: see quest-decode): pages of 16
                      keys; per query, pages are ranked by the upper bound of q.k from the per-page,
                      per-dimension key min/max; at KV-head granularity the bounds are turned into softmax
                      weights over pages and summed over the group's query heads (and the tile's queries);
                      best pages are taken until k(n) keys; every layer but 0 selects for itself, prefill too
    omnikv            OmniKV, sparse prefill variant at the plan's cost (see omnikv-decode): filter layers (the
                      layers of kascade-agnostic) attend densely and choose one token set for all heads (per
                      query head the post-softmax probabilities, summed over the tile's queries; then the
                      maximum over heads); the layers up to the next filter layer reuse it, prefill tiles too.
                      As in OmniKV, the filter layers themselves are dense.

Decode-time baselines as their authors run them (`DECODE_BASELINES`): the prompt (and any prefill chunk)
attends densely in every layer; decode steps are sparse. What follows the paper and its code, and what is
adapted, for each:

    quest-decode      Quest (Tang et al., ICML 2024; mit-han-lab/Quest, evaluation/quest_attention.py). Follows:
                      the first two layers dense; keys in pages of 16 (counted from the first key); a page's
                      score is the query-aware upper bound sum_d max(q_d min_d, q_d max_d) of its keys'
                      element-wise min/max; every QUERY head ranks pages by its own raw score (the code repeats
                      the KV heads for GQA models) and attends to its own pages; re-selected in every layer and
                      decode step; the newest key is not forced in. Adapted: the budget is Kascade's k(n) keys
                      (whole pages best first, the last page reached taken in part), not the code's
                      max(3, budget // 16) whole pages; sequences of at most k_min keys are dense.
    tidaldecode       TidalDecode (Yang et al., 2024, arXiv 2410.05076; DerrickYLJ/TidalDecode, the
                      transformers path its accuracy runs use). Follows: full attention in the layers before
                      the first token selection layer; two token selection layers attend fully and keep, per
                      QUERY head, the top keys by q.k; every later layer reuses the most recent selection. The
                      authors' layers for 32-layer Llama-3 (selection at layer 2, re-selection at 13) are
                      scaled to L layers (`tidal_layers`: round(l L / 32), at least 2, at most L - 1; one
                      selection layer when both fall on the same layer). Adapted: the budget is k(n) (the
                      code's fixed top_k); sequences of at most k_min keys are dense.
    omnikv-decode     OmniKV (Hao et al., ICLR 2025; antgroup/OmniKV, modeling/omnikv.py and
                      configs/example.json). Follows: the layers before the first filter layer dense; filter
                      layers attend densely and choose one token set for all heads, the top keys by the
                      maximum over query heads of q.k of the decode query (selector "last" of the published
                      configuration), among the prompt's keys; the tokens generated after the prompt are
                      always attended; the `wait` layer after each filter layer attends densely too
                      (num_wait_load_layers 1, dense_more); the other layers up to the next filter layer
                      reuse the set. The filter layers of Llama-3-8B (2, 8, 18 of 32) are scaled to L layers
                      (`omnikv_layers`). Adapted: the budget is k(n) keys in all, generated tokens included
                      (the code selects a fraction of the prompt and adds every generated token on top);
                      sequences of at most k_min keys are dense; the prompt's end is the cache length of the
                      last prefill this strategy ran (generated tokens are not forced in before one ran).

Budgets of the decode-time baselines are Kascade's k(n), so that every row of a table attends to the same
number of keys per query; each paper's own budget rule is noted above.

Decode-only mode for every other strategy: `make_strategy(name, ..., sparse_prefill=False)` (or the name
with the suffix `DENSE_PREFILL`, "kascade+dense-prefill"; `kascade eval --sparse-prefill no`) runs the
strategy with a dense prefill and its own selection in decode steps (kascade.strategy). Results record the
mode in the strategy's name; `dense` and the decode-time baselines have one mode and keep their names.

Each strategy records which keys each layer attended in the current forward: `attended(layer)` gives
(Selection, head_map) or None for a dense layer; `kascade.eval.coverage` reads it.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kascade import ops
from kascade.budget import check_budget
from kascade.eval import selectors
from kascade.plan import Plan, model_fingerprint, uniform_anchors
from kascade.reference import Selection
from kascade.strategy import KascadeStrategy, Strategy, check_sparse_prefill

DECODE_BASELINES = ("quest-decode", "tidaldecode", "omnikv-decode")  # dense prefill by definition
STRATEGIES = ("dense", "oracle", "oracle-shared-budget", "kascade", "kascade-paper", "kascade-agnostic", "kascade-no-remap",
              "kascade-dense-anchors", "kascade-sinks", "kascade-fp8", "kascade-fp8-rerank2", "kascade-shared-budget",
              "uniform", "streamingllm", "quest", "omnikv") + DECODE_BASELINES
NEEDS_PLAN = ("kascade", "kascade-agnostic", "kascade-no-remap", "kascade-dense-anchors", "kascade-sinks", "kascade-fp8",
              "kascade-fp8-rerank2", "kascade-shared-budget", "uniform", "omnikv")
# measured variants (of the plan, or of per-layer top-k): run when named
MECHANISMS = ("kascade-dense-anchors", "kascade-sinks", "kascade-fp8", "kascade-fp8-rerank2", "oracle-shared-budget",
              "kascade-shared-budget")
ONE_MODE = ("dense",) + DECODE_BASELINES  # the same in both modes: no suffix
DENSE_PREFILL = "+dense-prefill"  # name suffix of a strategy run in decode-only mode
SINKS = 4
LOCAL_WINDOW = 64
QUEST_PAGE = 16
QUEST_DENSE_LAYERS = 2  # Quest keeps its first two layers dense
TIDAL_LAYERS_OF_32 = (2, 13)  # TidalDecode on 32-layer Llama-3: token selection at layer 2, re-selection at 13
OMNIKV_LAYERS_OF_32 = (2, 8, 18)  # OmniKV's filter layers of Llama-3-8B (configs/example.json)
OMNIKV_WAIT_LAYERS = 1  # dense layers after each filter layer (num_wait_load_layers with dense_more)
_USED = "attended"


class _Recording:
    """Mixin: `attended(layer)` after the layer ran in this forward."""

    def attended(self, layer: int):
        return self.state.get((_USED, layer))

    def _record(self, layer: int, used) -> None:
        self.state[(_USED, layer)] = used


class DenseStrategy(_Recording, Strategy):
    name = "dense"

    def attend(self, layer, q, k, v, kv_start, scale):
        self._record(layer, None)
        return super().attend(layer, q, k, v, kv_start, scale)


class PlanStrategy(_Recording, KascadeStrategy):
    """Kascade with a given plan (kascade, kascade-no-remap, uniform, oracle)."""

    def __init__(self, name: str, plan: Plan, backend: str = "auto", dense_anchor_output: bool = False, **options):
        """options: sparse_prefill, select_keys, rerank (KascadeStrategy)."""
        super().__init__(plan, backend=backend, dense_anchor_output=dense_anchor_output, **options)
        self.name = name

    def attend(self, layer, q, k, v, kv_start, scale):
        out = super().attend(layer, q, k, v, kv_start, scale)
        p = self.plan
        if layer == 0 or k.shape[2] <= p.k_min or self.dense_step(q):
            self._record(layer, None)
        elif p.is_anchor(layer):
            self._record(layer, None if self.dense_anchor_output else (self.state[layer], None))
        else:
            self._record(layer, self.attended_selection(layer, k.shape[1]))
        return out


class ForcedKeysStrategy(PlanStrategy):
    """The plan, with `sinks` first keys and a local `window` kept in every set its units select."""

    def __init__(self, name: str, plan: Plan, sinks: int = SINKS, window: int = LOCAL_WINDOW, backend: str = "auto",
                 sparse_prefill: bool = True):
        super().__init__(name, plan, backend=backend, sparse_prefill=sparse_prefill)
        self.sinks, self.window = sinks, window

    def _select(self, q, k, kw):
        if kw.get("kv_len") is not None:
            raise ValueError("kv_len: strategy 'kascade-sinks' selects in PyTorch over the whole cache; "
                             "expected no preallocated (static) cache")
        p = self.plan
        return selectors.head_selection(q, k, p.rho, p.k_min, p.tile, kv_start=kw["kv_start"], scale=kw["scale"],
                                        sinks=self.sinks, window=self.window)

    def _anchor(self, q, k, v, dense_output, kw):
        sel = self._select(q, k, kw)
        return (ops.dense(q, k, v, **kw) if dense_output else ops.reuse(q, k, v, sel, None, **kw)), sel


class _SparseStrategy(_Recording, Strategy):
    """Common parts of the baselines below: budget, tile, and the dense cases."""

    def __init__(self, name: str, rho: float, k_min: int, tile: int, num_layers: int | None, backend: str,
                 sparse_prefill: bool = True):
        super().__init__(backend, sparse_prefill=sparse_prefill)
        check_budget(rho, k_min)
        self.name, self.rho, self.k_min, self.tile, self.num_layers = name, rho, k_min, tile, num_layers

    def validate(self, model_config) -> None:
        n = model_fingerprint(model_config)["num_layers"]
        if self.num_layers is not None and self.num_layers != n:
            raise ValueError(f"strategy {self.name}: made for {self.num_layers} layers, the model has {n}; "
                             "build it with this model's config")

    def _dense(self, layer, q, k, v, kv_start, scale):
        self._record(layer, None)
        return ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend)

    def _reuse(self, layer, q, k, v, sel, head_map, kv_start, scale):
        self._record(layer, (sel, head_map))
        return ops.reuse(q, k, v, sel, head_map, kv_start=kv_start, scale=scale, backend=self.backend)


class SharedSetStrategy(_SparseStrategy):
    """Anchors choose one key set per tile for all KV heads; the layers after an anchor reuse it.

    pool="sum" with sparse anchors is the head-agnostic Kascade ablation; pool="max" with dense
    anchors is OmniKV (see the module docstring)."""

    def __init__(self, name, anchors, rho, k_min, tile, pool="sum", dense_anchor_output=False, num_layers=None,
                 backend="auto", sparse_prefill=True):
        super().__init__(name, rho, k_min, tile, num_layers, backend, sparse_prefill)
        self.anchors, self.pool, self.dense_anchor_output = sorted(anchors), pool, dense_anchor_output
        if not self.anchors or self.anchors[0] != 0:
            raise ValueError(f"anchors: expected a list starting with layer 0, got {anchors}")

    def attend(self, layer, q, k, v, kv_start, scale):
        if k.shape[2] <= self.k_min or self.dense_step(q):
            return self._dense(layer, q, k, v, kv_start, scale)
        if layer in self.anchors:
            needed = layer != 0 or len(self.anchors) == 1 or self.anchors[1] > 1
            if needed:
                self.state[layer] = selectors.pooled_selection(q, k, self.rho, self.k_min, self.tile, kv_start=kv_start,
                                                               scale=scale, pool=self.pool)
            if layer == 0 or self.dense_anchor_output:
                return self._dense(layer, q, k, v, kv_start, scale)
            return self._reuse(layer, q, k, v, self.state[layer], None, kv_start, scale)
        anchor = max(a for a in self.anchors if a < layer)
        if anchor not in self.state:
            raise RuntimeError(f"layer {layer} reuses filter layer {anchor}, which did not run in this forward")
        return self._reuse(layer, q, k, v, self.state[anchor], None, kv_start, scale)


class SharedBudgetPlanStrategy(_SparseStrategy):
    """The plan's routing (kascade.routing), with the budget of a tile or decode step shared by the KV heads
    that select in a layer (selectors.shared_budget_selections over those heads): every reusing head attends to
    its source head's set, whatever its size (one ops.reuse per KV head). Layer 0 attends densely, as in Kascade.
    With every layer an anchor (oracle-shared-budget) it is per-layer top-k with shared budgets."""

    def __init__(self, name, plan: Plan, num_layers=None, backend="auto", sparse_prefill=True):
        super().__init__(name, plan.rho, plan.k_min, plan.tile, num_layers, backend, sparse_prefill)
        self.plan = plan
        self.routing = None

    def attend(self, layer, q, k, v, kv_start, scale):
        if k.shape[2] <= self.k_min or self.dense_step(q):
            return self._dense(layer, q, k, v, kv_start, scale)
        hkv = k.shape[1]
        g = q.shape[1] // hkv
        if self.routing is None:
            from kascade.routing import Routing

            self.routing = Routing(self.plan, hkv)
        route = self.routing.layer(layer)
        if route.own and (layer != 0 or self.routing.used_by_later_layers(0)):
            rows = torch.tensor([h * g + j for h in route.own for j in range(g)], device=q.device)
            own = torch.tensor(route.own, device=q.device)
            sels = selectors.shared_budget_selections(q[:, rows], k[:, own], self.rho, self.k_min, self.tile,
                                                      kv_start=kv_start, scale=scale)
            for h, sel in zip(route.own, sels):
                self.state[(layer, h)] = sel
        if layer == 0:
            return self._dense(layer, q, k, v, kv_start, scale)
        for src in route.sources:
            if src not in self.state:
                raise RuntimeError(f"layer {layer} reuses the selection of {src}, which did not run in this forward")
        used = [self.state[src] for src in route.sources]
        self._record(layer, (used, None))
        kw = dict(kv_start=kv_start, scale=scale, backend=self.backend)
        outs = [ops.reuse(q[:, h * g:(h + 1) * g], k[:, h:h + 1], v[:, h:h + 1], sel, None, **kw)
                for h, sel in enumerate(used)]
        return torch.cat(outs, dim=1)


class StreamingStrategy(_SparseStrategy):
    """StreamingLLM: `sinks` first keys and a recent window, k(n) keys in all, in every layer but 0."""

    def __init__(self, rho, k_min, tile, sinks=SINKS, num_layers=None, backend="auto", sparse_prefill=True):
        super().__init__("streamingllm", rho, k_min, tile, num_layers, backend, sparse_prefill)
        self.sinks = sinks

    def attend(self, layer, q, k, v, kv_start, scale):
        if layer == 0 or k.shape[2] <= self.k_min or self.dense_step(q):
            return self._dense(layer, q, k, v, kv_start, scale)
        if "window" not in self.state:  # the same for every layer of this forward
            self.state["window"] = selectors.window_selection(q, k, self.rho, self.k_min, self.tile,
                                                              kv_start=kv_start, sinks=self.sinks)
        return self._reuse(layer, q, k, v, self.state["window"], None, kv_start, scale)


class QuestStrategy(_SparseStrategy):
    """Quest's page selection in every layer but 0, prefill included: the sparse prefill variant (see the
    module docstring; `QuestDecodeStrategy` is Quest as published)."""

    def __init__(self, rho, k_min, tile, page=QUEST_PAGE, num_layers=None, backend="auto", sparse_prefill=True):
        super().__init__("quest", rho, k_min, tile, num_layers, backend, sparse_prefill)
        self.page = page

    def attend(self, layer, q, k, v, kv_start, scale):
        if layer == 0 or k.shape[2] <= self.k_min or self.dense_step(q):
            return self._dense(layer, q, k, v, kv_start, scale)
        sel = selectors.page_selection(q, k, self.rho, self.k_min, self.tile, kv_start=kv_start, scale=scale,
                                       page=self.page)
        return self._reuse(layer, q, k, v, sel, None, kv_start, scale)


class _DecodeBaseline(_SparseStrategy):
    """Common parts of the decode-time baselines: dense prefill (every step of more than one query), and
    attention of each query head to its own key set."""

    def __init__(self, name, rho, k_min, tile, num_layers, backend):
        super().__init__(name, rho, k_min, tile, num_layers, backend, sparse_prefill=False)

    def _reuse_per_query_head(self, layer, q, k, v, sel, kv_start, scale):
        """Decode step: query head j attends to row j of sel [B, Hq, 1, Kmax] (keys of its KV head j // G),
        through ops.reuse, one call per position in the GQA group (q [B, Hq, 1, D] -> [B, Hq, 1, Dv])."""
        self._record(layer, (sel, None))
        hq, hkv = q.shape[1], k.shape[1]
        g = hq // hkv
        kw = dict(kv_start=kv_start, scale=scale, backend=self.backend)
        if g == 1:
            return ops.reuse(q, k, v, sel, None, **kw)
        qg = q.unflatten(1, (hkv, g))  # [B, Hkv, G, 1, D]
        idx = sel.indices.unflatten(1, (hkv, g))  # [B, Hkv, G, 1, Kmax]
        outs = [ops.reuse(qg[:, :, j].contiguous(), k, v,
                          Selection(idx[:, :, j].contiguous(), sel.counts, sel.first_tile, sel.tile, sel.decode),
                          None, **kw) for j in range(g)]
        return torch.stack(outs, dim=2).flatten(1, 2)


class QuestDecodeStrategy(_DecodeBaseline):
    """Quest as published (see the module docstring): dense prefill; in decode the first `dense_layers`
    layers dense, every other layer ranks pages per query head and attends to k(n) keys of the best."""

    def __init__(self, rho, k_min, tile, page=QUEST_PAGE, dense_layers=QUEST_DENSE_LAYERS, num_layers=None,
                 backend="auto"):
        super().__init__("quest-decode", rho, k_min, tile, num_layers, backend)
        self.page, self.dense_layers = page, dense_layers

    def attend(self, layer, q, k, v, kv_start, scale):
        if self.dense_step(q) or layer < self.dense_layers or k.shape[2] <= self.k_min:
            return self._dense(layer, q, k, v, kv_start, scale)
        sel = selectors.query_head_pages(q, k, self.rho, self.k_min, self.tile, kv_start=kv_start, page=self.page)
        return self._reuse_per_query_head(layer, q, k, v, sel, kv_start, scale)


class TidalDecodeStrategy(_DecodeBaseline):
    """TidalDecode (see the module docstring): dense prefill; in decode the layers before the first of
    `selection_layers` dense, the selection layers dense and choosing per query head, every other layer
    attending through the most recent choice."""

    def __init__(self, rho, k_min, tile, selection_layers, num_layers=None, backend="auto"):
        super().__init__("tidaldecode", rho, k_min, tile, num_layers, backend)
        self.selection_layers = sorted(selection_layers)

    def attend(self, layer, q, k, v, kv_start, scale):
        first = self.selection_layers[0] if self.selection_layers else None
        if self.dense_step(q) or first is None or layer < first or k.shape[2] <= self.k_min:
            return self._dense(layer, q, k, v, kv_start, scale)
        if layer in self.selection_layers:
            self.state["tidal"] = selectors.query_head_topk(q, k, self.rho, self.k_min, self.tile, kv_start=kv_start,
                                                            scale=scale)
            return self._dense(layer, q, k, v, kv_start, scale)
        if "tidal" not in self.state:
            raise RuntimeError(f"layer {layer} reuses token selection layer {first}, which did not run in this forward")
        return self._reuse_per_query_head(layer, q, k, v, self.state["tidal"], kv_start, scale)


class OmniKVDecodeStrategy(_DecodeBaseline):
    """OmniKV (see the module docstring): dense prefill; in decode the layers before the first filter layer,
    the filter layers and the `wait_layers` after each dense, the filter layers choosing one set for all
    heads (the prompt's top keys by the maximum logit over query heads, plus every generated token), the
    other layers attending to it."""

    def __init__(self, rho, k_min, tile, filter_layers, wait_layers=OMNIKV_WAIT_LAYERS, num_layers=None,
                 backend="auto"):
        super().__init__("omnikv-decode", rho, k_min, tile, num_layers, backend)
        if isinstance(wait_layers, bool) or not isinstance(wait_layers, int) or wait_layers < 0:
            raise ValueError(f"wait_layers: expected an integer >= 0, got {wait_layers!r}")
        self.filter_layers, self.wait_layers = sorted(filter_layers), wait_layers
        self.prompt_end: int | None = None  # cache length after the last prefill: later keys are generated tokens

    def attend(self, layer, q, k, v, kv_start, scale):
        if q.shape[2] > 1:
            self.prompt_end = k.shape[2]
        first = self.filter_layers[0] if self.filter_layers else None
        if self.dense_step(q) or first is None or layer < first or k.shape[2] <= self.k_min:
            return self._dense(layer, q, k, v, kv_start, scale)
        if layer in self.filter_layers:
            self.state["filter"] = selectors.max_logit_selection(q, k, self.rho, self.k_min, self.tile,
                                                                 kv_start=kv_start, scale=scale,
                                                                 keep_from=self.prompt_end)
            return self._dense(layer, q, k, v, kv_start, scale)
        last = max(f for f in self.filter_layers if f < layer)
        if layer - last <= self.wait_layers:
            return self._dense(layer, q, k, v, kv_start, scale)
        if "filter" not in self.state:
            raise RuntimeError(f"layer {layer} reuses filter layer {last}, which did not run in this forward")
        return self._reuse(layer, q, k, v, self.state["filter"], None, kv_start, scale)


def base_strategy(name: str) -> str:
    """The strategy a (possibly mode-suffixed) name runs: "kascade+dense-prefill" -> "kascade"."""
    return name[: -len(DENSE_PREFILL)] if isinstance(name, str) and name.endswith(DENSE_PREFILL) else name


def canonical_strategy(name: str, sparse_prefill: bool = True) -> str:
    """The name under which `name` runs and its results are kept: the suffix DENSE_PREFILL added in
    decode-only mode (sparse_prefill=False or a name that has it), except for dense and the decode-time
    baselines, which have one mode."""
    base = base_strategy(name)
    if base not in STRATEGIES:
        raise ValueError(f"strategy: unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)} (each but "
                         f"{', '.join(ONE_MODE)} also as NAME{DENSE_PREFILL}: dense prefill, sparse decode)")
    check_sparse_prefill(sparse_prefill)
    decode_only = not sparse_prefill or base != name
    return base + DENSE_PREFILL if decode_only and base not in ONE_MODE else base


def is_decode_only(name: str) -> bool:
    """True for the names of strategies whose prefill is dense and decode sparse."""
    return base_strategy(name) in DECODE_BASELINES or (name != base_strategy(name))


def make_strategy(name: str, plan: Plan | None, model_config, rho: float, k_min: int, backend: str = "auto",
                  tile: int | None = None, paper_plan: Plan | None = None, sparse_prefill: bool = True) -> Strategy:
    """The strategy `name` at budget (rho, k_min) for the model of `model_config`.

    plan: the calibrated plan (needed by kascade, kascade-agnostic, kascade-no-remap, uniform, omnikv);
    its rho and k_min are replaced by the arguments. tile: the prefill tile (default: the plan's, else 32).
    paper_plan: the plan of the paper's recipe (needed by kascade-paper). sparse_prefill=False (or a name
    ending in DENSE_PREFILL): decode-only mode, dense prefill and the strategy's selection in decode; the
    strategy's `name` is then `canonical_strategy(name, False)`. The decode-time baselines are decode-only
    whatever this says.
    """
    full = canonical_strategy(name, sparse_prefill)
    strategy = _make(base_strategy(full), plan, model_config, rho, k_min, backend, tile, paper_plan,
                     sparse_prefill=not full.endswith(DENSE_PREFILL))
    strategy.name = full
    return strategy


def _make(name, plan, model_config, rho, k_min, backend, tile, paper_plan, sparse_prefill) -> Strategy:
    ops.check_backend(backend)
    sp = dict(sparse_prefill=sparse_prefill)
    if name == "kascade-paper":
        if paper_plan is None:
            raise ValueError("paper_plan: strategy 'kascade-paper' needs a plan made with the paper's recipe "
                             "(--paper-plan plan.json, from `kascade calibrate --recipe paper`)")
        paper_plan.validate(model_config)
        budgeted = dataclasses.replace(paper_plan, rho=rho, k_min=k_min, tile=tile or paper_plan.tile)
        return PlanStrategy(name, budgeted, backend, **sp)
    if name in NEEDS_PLAN and plan is None:
        raise ValueError(f"plan: strategy {name!r} needs a calibrated plan (--plan plan.json, from `kascade calibrate`)")
    if plan is not None:
        plan.validate(model_config)
    tile = tile if tile is not None else (plan.tile if plan is not None else 32)
    num_layers = model_fingerprint(model_config)["num_layers"]
    if name == "dense":
        return DenseStrategy(backend)
    check_budget(rho, k_min)
    if name == "oracle":
        return PlanStrategy(name, Plan.for_model(model_config, range(num_layers), rho=rho, k_min=k_min, tile=tile),
                            backend, **sp)
    if name == "oracle-shared-budget":
        every = Plan.for_model(model_config, range(num_layers), rho=rho, k_min=k_min, tile=tile)
        return SharedBudgetPlanStrategy(name, every, num_layers=num_layers, backend=backend, **sp)
    if name == "streamingllm":
        return StreamingStrategy(rho, k_min, tile, num_layers=num_layers, backend=backend, **sp)
    if name == "quest":
        return QuestStrategy(rho, k_min, tile, num_layers=num_layers, backend=backend, **sp)
    if name == "quest-decode":
        return QuestDecodeStrategy(rho, k_min, tile, num_layers=num_layers, backend=backend)
    if name == "tidaldecode":
        return TidalDecodeStrategy(rho, k_min, tile, tidal_layers(num_layers), num_layers=num_layers, backend=backend)
    if name == "omnikv-decode":
        return OmniKVDecodeStrategy(rho, k_min, tile, omnikv_layers(num_layers), num_layers=num_layers,
                                    backend=backend)
    budgeted = dataclasses.replace(plan, rho=rho, k_min=k_min, tile=tile)
    if name == "kascade":
        return PlanStrategy(name, budgeted, backend, **sp)
    if name == "kascade-no-remap":
        return PlanStrategy(name, without_remap(budgeted), backend, **sp)
    if name == "kascade-dense-anchors":
        return PlanStrategy(name, budgeted, backend, dense_anchor_output=True, **sp)
    if name == "kascade-shared-budget":
        return SharedBudgetPlanStrategy(name, budgeted, num_layers=num_layers, backend=backend, **sp)
    if name == "kascade-sinks":
        return ForcedKeysStrategy(name, budgeted, backend=backend, **sp)
    if name in ("kascade-fp8", "kascade-fp8-rerank2"):
        return PlanStrategy(name, budgeted, backend, select_keys="fp8", rerank=2.0 if name.endswith("rerank2") else None,
                            **sp)
    if name == "uniform":  # as many evenly spaced anchors as the plan's selecting-layer equivalents
        count = max(1, min(num_layers, round(plan.selecting_layers_equivalent)))
        anchors = uniform_anchors(num_layers, count)
        return PlanStrategy(name, dataclasses.replace(budgeted, anchors=anchors, head_map=None, head_sources=None,
                                                      selecting_layers_equivalent=None), backend, **sp)
    layers = selecting_layers(plan)
    if name == "kascade-agnostic":
        return SharedSetStrategy(name, layers, rho, k_min, tile, pool="sum", num_layers=num_layers, backend=backend,
                                 **sp)
    return SharedSetStrategy(name, layers, rho, k_min, tile, pool="max", dense_anchor_output=True,
                             num_layers=num_layers, backend=backend, **sp)


def _scaled(layers_of_32, num_layers: int) -> list[int]:
    """A published layer choice for 32 layers at the same depth of `num_layers` layers: round(l L / 32),
    at least 2 (both methods keep two layers dense before selecting) and at most L - 1; duplicates merged.
    [] below 3 layers (every layer dense)."""
    if num_layers < 3:
        return []
    return sorted({min(num_layers - 1, max(2, math.floor(lay * num_layers / 32 + 0.5))) for lay in layers_of_32})


def tidal_layers(num_layers: int) -> list[int]:
    """TidalDecode's token selection layers for `num_layers` layers: the authors' 2 and 13 of 32 scaled
    (30 layers: [2, 12]; 12 layers: [2, 5]); [] (every layer dense) below 3 layers."""
    return _scaled(TIDAL_LAYERS_OF_32, num_layers)


def omnikv_layers(num_layers: int) -> list[int]:
    """OmniKV's filter layers for `num_layers` layers: Llama-3-8B's 2, 8 and 18 of 32 scaled (30 layers:
    [2, 8, 17]; 12 layers: [2, 3, 7]); [] (every layer dense) below 3 layers."""
    return _scaled(OMNIKV_LAYERS_OF_32, num_layers)


def selecting_layers(plan: Plan) -> list[int]:
    """The layers where the layer-level ablations (head-agnostic, OmniKV) select, at the plan's cost.

    A layer-granular plan: its anchors. A head-granular plan: as many layers as its selecting-layer
    equivalents (rounded half up), those with the most selecting KV heads (ties: the earlier layer), so
    that an ablation costs what the plan costs instead of selecting in every layer the plan touches."""
    if not plan.head_granular:
        return list(plan.anchors)
    hkv = len(next(r for r in plan.head_sources if r is not None))
    heads = {layer: len(plan.selecting_heads(layer, hkv)) for layer in range(plan.num_layers)}
    count = max(1, math.floor(plan.selecting_layers_equivalent + 0.5))
    ranked = sorted((layer for layer in heads if heads[layer]), key=lambda layer: (-heads[layer], layer))
    return sorted(ranked[:count])


def without_remap(plan: Plan) -> Plan:
    """The plan with the identity head map: each reuse head reads its own head number of the layer its
    source names (of a head-granular plan: where that head selects there; else its source stays)."""
    if not plan.head_granular:
        return dataclasses.replace(plan, head_map=None)
    hkv = len(next(r for r in plan.head_sources if r is not None))
    rows = []
    for layer in range(plan.num_layers):
        if plan.is_anchor(layer):
            rows.append(None)
            continue
        row = []
        for h, (a, m) in enumerate(plan.sources(layer, hkv)):
            if a == layer:
                row.append(None)
            else:
                row.append([a, h] if h in plan.selecting_heads(a, hkv) else [a, m])
        rows.append(row)
    return dataclasses.replace(plan, head_sources=rows)


def attended(strategy: Strategy, layer: int):
    """(Selection, head_map) that `layer` attended in the strategy's current forward, or None (dense)."""
    if isinstance(strategy, _Recording):
        return strategy.attended(layer)
    raise ValueError(f"strategy: {type(strategy).__name__} does not record its selections; use make_strategy")


def head_map_tensor(head_map, num_kv_heads: int, device) -> torch.Tensor:
    """head_map (list, tensor or None = identity) as an int64 tensor [Hkv]."""
    if head_map is None:
        return torch.arange(num_kv_heads, device=device)
    return torch.as_tensor(head_map, device=device, dtype=torch.int64)
