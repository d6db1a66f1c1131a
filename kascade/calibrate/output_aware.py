"""Output-aware calibration: choose which (layer, KV head) units select by the model's own outputs.

The paper's recipe scores a plan by how much of each layer's top-k attention mass its anchor's keys
recover. On a real model that misses what matters: a reuse layer can keep 85-94% of the mass and still
lose the one far-away key that answers the question. This recipe measures the answer instead:

1. Dense pass. On retrieval-rich calibration prompts in many formats (`kascade.calibrate.retrieval`:
   facts hidden in held-out prose, chat, plain prose; `kascade.calibrate.structured`: records, JSON,
   tables, code, several documents, long chats) the dense model continues each prompt greedily for
   `answer_tokens` tokens; its log-probabilities along that continuation are kept. The paper's
   statistics (`CalibrationStrategy`) are collected on the same prompts, per prompt: `sim[a, b, ha, hb]`,
   the coverage of layer b head hb by the keys of layer a head ha.
2. Divergence of a plan, per prompt: the mean over continuation positions of KL(dense || plan) of the
   next-token distributions, the plan's strategy following the dense continuation (teacher forcing:
   prefill of the prompt, then one decode step per continuation token, as generation runs).
   The objective protects the worst format: the largest mean divergence of a format family
   ("worst-family", the default), or the mean over prompts ("mean", the first version of this recipe).
3. Search. Units are the (layer, KV head) pairs of layers 1..L-1 (layer 0 always selects). Starting
   from every unit selecting (per-head top-k in every layer), units are removed greedily: each step
   measures the objective with each remaining unit removed (or, with `candidates`, with the units whose
   removal cost least when last measured) and removes the best few (about a tenth of them, one at a
   time near the end), as IndexCache chooses shared layers greedily by the loss. A unit that does not
   select reads the keys of the earlier selecting unit (a, m) with the highest `sim[a, l, m, h]`. The
   search stops at the target cost (`selecting_layers_equivalent`) or, with a tolerance, at the
   cheapest plan whose objective stays under it.

Layer granularity (`granularity="layer"`): the units are whole layers (layer 0 always an anchor), a plan is
the paper's (anchors and `head_map_for`), and the same search, objective and memo choose the anchors
greedily by the model's outputs instead of by attention mass. Such a plan runs the plain anchor and
reuse kernels, with no part-selecting layer (at the same cost it decodes faster than a head-granular one:
benchmarks/results/head_granular_decode_h200.md), and it is what a path without head granularity can run.

Leave-one-family-out validation (`leave_out=FAMILY`) runs the same search on the prompts whose formats
are not of that evaluation family's kind (`retrieval.LEAVE_OUT`), statistics included. A
`CalibrationSet` holds the prompts, dense continuations and per-prompt divergences of every plan
measured, so the full search and its folds share their measurements.

A layer all of whose heads select is an anchor; the others carry `head_sources` (kascade.plan).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from kascade.plan import Plan, model_fingerprint


@dataclasses.dataclass
class Trajectories:
    """Dense continuations of one batch of prompts: ids [B, n], continuation [B, m], log-probs [B, m, V]."""

    ids: torch.Tensor
    continuation: torch.Tensor
    logprobs: torch.Tensor


def _forward(model, ids, cache):
    from kascade.integrations.transformers import _cache_kwarg

    kw = {_cache_kwarg(model): cache} if cache is not None else {}
    out = model(ids, use_cache=True, logits_to_keep=1, **kw)
    new_cache = getattr(out, "cache", None)
    return out.logits[:, -1].float(), new_cache if new_cache is not None else out.past_key_values


@torch.no_grad()
def follow(model, ids: torch.Tensor, steps: int, continuation: torch.Tensor | None = None):
    """Log-probs [B, steps, V] of the model at the last prompt position and after each continuation
    token; greedy when `continuation` is None. Returns (continuation [B, steps], log-probs)."""
    logits, cache = _forward(model, ids, None)
    out, tokens = [], []
    for j in range(steps):
        lp = torch.log_softmax(logits, dim=-1)
        out.append(lp)
        tok = lp.argmax(-1) if continuation is None else continuation[:, j]
        tokens.append(tok)
        if j + 1 < steps:
            logits, cache = _forward(model, tok[:, None], cache)
    return torch.stack(tokens, 1), torch.stack(out, 1)


def dense_trajectories(model, prompts, steps: int, batch_size: int, backend: str = "auto") -> list[Trajectories]:
    """The dense model's greedy continuations of the prompts (lists of token ids of one length)."""
    import kascade
    from kascade.strategy import Strategy

    device = next(model.parameters()).device
    batches = []
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor([p.ids for p in prompts[i : i + batch_size]], device=device)
        with kascade.enable(model, strategy=Strategy(backend)):
            cont, lp = follow(model, ids, steps)
        batches.append(Trajectories(ids, cont, lp))
    return batches


def followed(model, strategy, batches: list[Trajectories], caches: list | None = None):
    """Yields (batch, the strategy's log-probs [B, m, V] along the batch's dense continuation) for every batch:
    whole runs (follow), or, with `caches` (decode-only strategies: decode_only_groups), the decode steps from
    each batch's dense prompt cache (follow_cached)."""
    import kascade

    with kascade.enable(model, strategy=strategy):
        for i, b in enumerate(batches):
            if caches is None:
                _, lp = follow(model, b.ids, b.continuation.shape[1], b.continuation)
            else:
                lp, caches[i] = follow_cached(model, caches[i], b.logprobs[:, 0], b.continuation)
            yield b, lp


def divergence(model, strategy, batches: list[Trajectories]) -> float:
    """Mean KL(dense || strategy) over prompts and continuation positions (nats)."""
    total, count = 0.0, 0
    for b, lp in followed(model, strategy, batches):
        kl = (b.logprobs.exp() * (b.logprobs - lp)).sum(-1)  # [B, m]
        total += float(kl.sum())
        count += kl.numel()
    return total / count


def agreement(model, strategy, batches: list[Trajectories], indices=None, caches: list | None = None) -> float:
    """Share of continuation positions where the strategy's argmax is the dense token (over the prompts
    of the indices `indices`, default all); `caches` as in followed."""
    same = [(lp.argmax(-1) == b.continuation).double().mean(-1).cpu().numpy()
            for b, lp in followed(model, strategy, batches, caches)]
    per_prompt = np.concatenate(same)
    return float(np.mean(per_prompt if indices is None else per_prompt[list(indices)]))


# ----------------------------------------------------------------------------------------------
# plans over units
# ----------------------------------------------------------------------------------------------


def plan_of_units(selecting: set, sim: np.ndarray, cfg: dict, tp_degree: int = 1, **plan_kw) -> Plan:
    """The plan in which exactly the units `selecting` (plus layer 0) select; every other unit (l, h)
    reads the earlier selecting unit (a, m) with the highest sim[a, l, m, h] (ties: the later layer),
    among the heads m of h's tensor-parallel shard when `tp_degree` > 1 (layer 0 selects on every head,
    so every shard has a source)."""
    from kascade.plan import shard_of

    L, H = cfg["num_layers"], cfg["num_kv_heads"]
    sel = set(selecting) | {(0, h) for h in range(H)}
    anchors = [layer for layer in range(L) if all((layer, h) in sel for h in range(H))]
    rows: list = []
    for layer in range(L):
        if layer in anchors:
            rows.append(None)
            continue
        row = []
        for h in range(H):
            if (layer, h) in sel:
                row.append(None)
                continue
            cands = [(a, m) for a in range(layer) for m in range(H)
                     if (a, m) in sel and shard_of(m, H, tp_degree) == shard_of(h, H, tp_degree)]
            a, m = max(cands, key=lambda am: (sim[am[0], layer, am[1], h], am[0]))
            row.append([a, m])
        rows.append(row)
    if len(anchors) == L:  # every layer selects: a plan of layer granularity
        return Plan(anchors=anchors, model=dict(cfg), recipe="output-aware", tp_degree=tp_degree, **plan_kw)
    return Plan(anchors=anchors, head_sources=rows, model=dict(cfg), recipe="output-aware", tp_degree=tp_degree,
                **plan_kw)


def plan_of_layers(layers, sim: np.ndarray, cfg: dict, tp_degree: int = 1, **plan_kw) -> Plan:
    """The layer-granular plan whose anchors are `layers` plus layer 0, with the paper's head map
    (`kascade.calibrate.head_map_for`: each reuse head reads the anchor head of highest sim); the plan a
    path without head granularity can run."""
    from kascade.calibrate import head_map_for

    anchors = sorted({int(x) for x in layers} | {0})
    return Plan(anchors=anchors, head_map=head_map_for(sim, anchors, tp_degree), model=dict(cfg),
                recipe="output-aware", tp_degree=tp_degree, **plan_kw)


def units_cost(selecting: set, num_kv_heads: int) -> float:
    """selecting_layers_equivalent of a unit set (layer 0 counts as one selecting layer)."""
    return 1.0 + len({u for u in selecting if u[0] != 0}) / num_kv_heads


def greedy_search(score, cfg: dict, target: float | None = None, tolerance: float | None = None,
                  shrink: int = 10, progress: bool = True, candidates: int | None = None,
                  stops=()) -> tuple[set, list[dict]]:
    """Greedy removal of units (see the module docstring).

    score(selecting) -> divergence of the plan of that unit set. target: stop once the cost is at most
    this many selecting-layer equivalents. tolerance: never accept a plan whose divergence exceeds it
    (stop when every removal would). candidates: after the first step, measure only this many units per
    step, those whose removal raised the score least when last measured (a unit's harm rarely falls as
    others go; every unit is measured again before the search gives up under a tolerance). None measures every unit
    at every step. stops: costs (selecting-layer equivalents) the path must pass through on its way down (a step
    removes no more units than takes it to the next stop), so that the history holds a plan at each.
    Returns (selecting units, history of {cost, divergence, removed})."""
    if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1):
        raise ValueError(f"candidates: expected an integer >= 1 or None, got {candidates!r}")
    if target is None and tolerance is None:
        raise ValueError("target/tolerance: give a target cost (selecting-layer equivalents), a tolerance, or both")
    L, H = cfg["num_layers"], cfg["num_kv_heads"]
    if target is not None and not 1.0 <= target <= L:
        raise ValueError(f"target: expected selecting-layer equivalents in [1, {L}], got {target}")
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance: expected a divergence >= 0 (nats), got {tolerance}")
    bad = [c for c in stops if not 1.0 <= c <= L]
    if bad:
        raise ValueError(f"stops: expected selecting-layer equivalents in [1, {L}], got {bad}")

    def kept(cost):  # units a plan of at most this cost keeps
        return math.floor(round((cost - 1.0) * H, 9))

    floors = sorted({kept(c) for c in stops})
    selecting = {(layer, h) for layer in range(1, L) for h in range(H)}
    current = score(selecting)
    history = [{"cost": units_cost(selecting, H), "divergence": current, "removed": []}]
    bar = tqdm(desc="output-aware search", unit="plan", disable=not progress)
    harm: dict = {}  # unit -> how much removing it raised the score when last measured

    def measure(units):
        out = []
        for u in units:
            value = score(selecting - {u})
            harm[u] = value - current
            out.append((value, u))
            bar.update(1)
        return sorted(out)

    while selecting:
        over = len(selecting) - (kept(target) if target is not None else 0)
        if over <= 0:
            break
        pool = sorted(selecting)
        if candidates is not None and all(u in harm for u in pool):
            pool = sorted(pool, key=lambda u: (harm[u], u))[:candidates]
        trials = measure(pool)
        ok = [t for t in trials if tolerance is None or t[0] <= tolerance]
        if not ok and len(pool) < len(selecting):
            trials = measure(sorted(selecting - set(pool))) + trials
            trials.sort()
            ok = [t for t in trials if tolerance is None or t[0] <= tolerance]
        if not ok:
            break
        room = min([len(selecting) - f for f in floors if f < len(selecting)], default=over)
        r = min(max(1, len(selecting) // shrink), len(ok), over, room)
        removed = [u for _, u in ok[:r]]
        new = score(selecting - set(removed)) if r > 1 else ok[0][0]
        if r > 1 and tolerance is not None and new > tolerance:
            removed, new = [ok[0][1]], ok[0][0]
        bar.update(1)
        selecting = selecting - set(removed)
        for u in removed:
            harm.pop(u, None)
        current = new
        history.append({"cost": units_cost(selecting, H), "divergence": current,
                        "removed": [list(u) for u in removed]})
        bar.set_postfix_str(f"cost {history[-1]['cost']:.2f} KL {current:.4f}")
    bar.close()
    return selecting, history


OBJECTIVES = ("worst-family", "mean")
SOURCE_RULES = ("mean", "worst-family")  # how a reusing unit's source is ranked over the calibration families
GRANULARITIES = ("head", "layer")

# The default recipe of `kascade calibrate`, the one leave-one-format-out validation measured on SmolLM2-135M
# (benchmarks/results/generalization_smollm2.md): the whole format mixture, two prompts per format, the
# worst-family objective, search step 5 measuring 10 candidate units per step after the first, and a search that
# stops at a third of the layers in selecting-layer equivalents (10 of SmolLM2's 30, 4 of kascade-tiny's 12).
DEFAULT_PROMPTS_PER_FORMAT = 2
DEFAULT_SEARCH_STEP = 5
DEFAULT_CANDIDATES = 10
DEFAULT_COST_FRACTION = 1 / 3
# The largest worst-family divergence (nats) among the validated plans at the default cost: a plan above it has
# not been shown to keep accuracy on formats its calibration did not see.
VALIDATED_WORST_FAMILY_KL = 0.18


def default_num_prompts(formats=None) -> int:
    """The default calibration set's size: DEFAULT_PROMPTS_PER_FORMAT per format (default: the whole mixture)."""
    from kascade.calibrate.retrieval import MIXTURE

    return DEFAULT_PROMPTS_PER_FORMAT * len(formats or MIXTURE)


def default_target(num_layers: int, num_kv_heads: int) -> float:
    """The default stopping cost: DEFAULT_COST_FRACTION of the layers in selecting-layer equivalents, rounded down
    to a whole KV head (a plan's cost moves in steps of 1 / num_kv_heads), and at least layer 0's one."""
    if num_layers < 1 or num_kv_heads < 1:
        raise ValueError(f"default_target: expected num_layers, num_kv_heads >= 1, got {num_layers}, {num_kv_heads}")
    heads = math.floor(num_layers * num_kv_heads * DEFAULT_COST_FRACTION + 1e-9)
    return max(1.0, heads / num_kv_heads)


@dataclasses.dataclass
class CalibrationSet:
    """What every search on one set of prompts shares: the prompts, the dense continuations, the paper's
    statistics per prompt, and the divergence of every plan measured so far, per prompt.

    A leave-one-family-out search runs on a subset of the prompts (`indices`); since every plan is
    measured on all prompts, the searches of the full set and of its folds reuse each other's plans."""

    model: object
    prompts: list  # retrieval.CalibrationPrompt
    batches: list  # Trajectories of all prompts, in order
    sims: list  # per prompt, sim [L, L, H, H] (kascade.calibrate.collect.CalibrationStrategy)
    importance_calls: list  # per layer, the importance w_b of each prompt
    topk: int = 64
    backend: str = "auto"
    memo: dict = dataclasses.field(default_factory=dict)  # plan key -> per-prompt divergence [P]
    statistics: str = "prompt"  # where `sims` came from (calibration_set's STATISTICS)
    decode_batch: int | None = None  # prompts per batch of the decode-only measurements (None: those of `batches`)
    prompt_caches: list | None = dataclasses.field(default=None, repr=False)  # decode_only_groups, built on first use

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.prompts]

    def similarity(self, indices, rule: str = "mean") -> np.ndarray:
        """sim [L, L, H, H] over the prompts `indices`: their mean ("mean"), or, element by element, the lowest
        of the format families' means ("worst-family": a source is as good as on the family it serves worst)."""
        if rule == "mean":
            return np.mean([self.sims[i] for i in indices], axis=0)
        if rule == "worst-family":
            groups = family_groups(self.kinds, indices)
            return np.min([np.mean([self.sims[i] for i in g], axis=0) for g in groups.values()], axis=0)
        raise ValueError(f"sources: expected one of {SOURCE_RULES}, got {rule!r}")

    def importance(self, indices) -> np.ndarray:
        return np.array([float(np.mean([calls[i] for i in indices])) for calls in self.importance_calls])

    def state(self) -> dict:
        """Everything but the model, for torch.save (a later run resumes with `from_state`)."""
        return {"prompts": [dataclasses.asdict(p) for p in self.prompts],
                "batches": [dataclasses.asdict(b) for b in self.batches], "sims": self.sims,
                "importance_calls": self.importance_calls, "topk": self.topk, "memo": self.memo,
                "statistics": self.statistics}

    @classmethod
    def from_state(cls, model, state: dict, backend: str = "auto") -> CalibrationSet:
        from kascade.calibrate.retrieval import CalibrationPrompt

        device = next(model.parameters()).device
        batches = [Trajectories(**{k: v.to(device) for k, v in b.items()}) for b in state["batches"]]
        return cls(model, [CalibrationPrompt(**p) for p in state["prompts"]], batches, state["sims"],
                   state["importance_calls"], state["topk"], backend, state["memo"], state.get("statistics", "prompt"))

    def save(self, path) -> None:
        """`state()` to `path` through a temporary file, so that a run cut short leaves the last whole one."""
        import os
        from pathlib import Path

        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    @classmethod
    def cached(cls, path, model, build, backend: str = "auto") -> tuple[CalibrationSet, bool]:
        """(the set saved at `path`, with its memo of measured plans, True), else (`build()`, saved there, False)."""
        from pathlib import Path

        if Path(path).is_file():
            return cls.from_state(model, torch.load(path, weights_only=False), backend), True
        calib = build()
        calib.save(path)
        return calib, False

    def indices(self, formats) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p.kind in set(formats)]

    def decode_only_inputs(self) -> tuple[list, list]:
        """(batches, their dense prompt caches) of the decode-only measurements (decode_only_groups), made on
        first use and kept (not saved)."""
        if self.prompt_caches is None:
            self.prompt_caches = decode_only_groups(self.model, self.batches, self.backend, self.decode_batch)
        return self.prompt_caches

    def per_prompt(self, plan: Plan, sparse_prefill: bool = True) -> np.ndarray:
        """Divergence [P] of `plan` on every prompt (memoised by the plan's anchors and sources, and the mode:
        sparse_prefill=False measures it in decode-only mode, the prompt attended densely)."""
        from kascade.strategy import KascadeStrategy

        key = (tuple(plan.anchors), repr(plan.head_sources), repr(plan.head_map))
        if not sparse_prefill:
            key += (DECODE_ONLY_KEY,)
        if key not in self.memo:
            strategy = KascadeStrategy(plan, backend=self.backend, sparse_prefill=sparse_prefill)
            if sparse_prefill:
                self.memo[key] = divergence_per_prompt(self.model, strategy, self.batches)
            else:  # the prompt pass is dense's whatever the plan: run it once for every plan
                self.memo[key] = divergence_per_prompt(self.model, strategy, *self.decode_only_inputs())
        return self.memo[key]


DECODE_ONLY_KEY = "decode-only"  # memo keys of plans measured in decode-only mode end with it


def divergence_per_prompt(model, strategy, batches: list[Trajectories], caches: list | None = None) -> np.ndarray:
    """[P] mean KL(dense || strategy) over each prompt's continuation positions (nats), prompts in order;
    `caches` as in followed (in decode-only mode the first answer token is then dense's, KL 0)."""
    out = []
    for b, lp in followed(model, strategy, batches, caches):
        kl = (b.logprobs.exp() * (b.logprobs - lp)).sum(-1)  # [B, m]
        out.append(kl.mean(-1).double().cpu().numpy())
    return np.concatenate(out)


def dense_prompt_caches(model, batches: list[Trajectories], backend: str = "auto") -> list:
    """The KV cache of each batch's prompts after a dense pass (one per batch, in order): what every plan's
    prompt pass gives in decode-only mode, kept so that measuring a plan in that mode runs its decode steps only."""
    import kascade
    from kascade.strategy import Strategy

    caches = []
    with torch.no_grad(), kascade.enable(model, strategy=Strategy(backend)):
        for b in batches:
            caches.append(_forward(model, b.ids, None)[1])
    return caches


def decode_only_groups(model, batches: list[Trajectories], backend: str = "auto", size: int | None = None):
    """(batches, their dense prompt caches) for decode-only measurements: the prompt passes run in the batches
    given (their size bounds the prompt pass's memory); with `size`, consecutive batches are then joined, caches
    included, into batches of at least `size` prompts, so that each decode step serves more prompts at once."""
    from transformers import DynamicCache

    caches = dense_prompt_caches(model, batches, backend)
    if size is None:
        return list(batches), caches
    groups, joined, start = [], [], 0
    while start < len(batches):
        stop, count = start, 0
        while stop < len(batches) and count < size:
            count += batches[stop].ids.shape[0]
            stop += 1
        part = batches[start:stop]
        groups.append(Trajectories(*(torch.cat([getattr(b, f) for b in part]) for f in ("ids", "continuation",
                                                                                       "logprobs"))))
        cache = DynamicCache()
        for layer in range(len(caches[start].layers)):
            cache.update(torch.cat([c.layers[layer].keys for c in caches[start:stop]]),
                         torch.cat([c.layers[layer].values for c in caches[start:stop]]), layer)
        joined.append(cache)
        start = stop
    return groups, joined


@torch.no_grad()
def follow_cached(model, cache, first_logprobs: torch.Tensor, continuation: torch.Tensor):
    """follow() along `continuation` [B, m] after a prompt pass already made: from the prompt's KV cache and the
    log-probs at its last position (first_logprobs [B, V]), only the decode steps run. The cache is cropped back
    to the prompt afterwards, so the next caller finds it as it was. Returns (log-probs [B, m, V], the cache)."""
    n = cache.get_seq_length()
    lps = [first_logprobs]
    try:
        for j in range(continuation.shape[1] - 1):
            logits, cache = _forward(model, continuation[:, j : j + 1], cache)
            lps.append(torch.log_softmax(logits, dim=-1))
    finally:
        extra = cache.get_seq_length() - n
        if extra:
            cache.crop(-extra)  # a negative count removes that many tokens in every transformers 5
    return torch.stack(lps, 1), cache


def family_groups(kinds: list[str], indices) -> dict[str, list[int]]:
    """The prompts `indices` by format family (kascade.calibrate.retrieval.FAMILY of each prompt's kind)."""
    from kascade.calibrate.retrieval import FAMILY

    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(FAMILY[kinds[i]], []).append(i)
    return groups


def family_divergences(values: np.ndarray, kinds: list[str], indices: list[int]) -> dict[str, float]:
    """Mean divergence per format family (kascade.calibrate.retrieval.FAMILY) over the prompts `indices`."""
    return {f: float(np.mean([float(values[i]) for i in g])) for f, g in sorted(family_groups(kinds, indices).items())}


def objective_value(values: np.ndarray, kinds: list[str], indices: list[int], objective: str) -> float:
    """The search's objective over the prompts `indices`: the mean divergence ("mean"), or the largest
    mean divergence of a format family ("worst-family": no family may be sacrificed for the average)."""
    if objective == "mean":
        return float(np.mean(values[indices]))
    if objective == "worst-family":
        return max(family_divergences(values, kinds, indices).values())
    raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")


STATISTICS = ("prompt", "answer")  # which queries the similarity statistics come from


def calibration_set(model, tokenizer, text: str, formats=None, length: int = 4096, num_prompts: int = 16,
                    answer_tokens: int = 8, batch_size: int = 8, topk: int = 64, tile: int = 32,
                    backend: str = "auto", progress: bool = True, first_seed: int = 0,
                    statistics: str = "prompt") -> CalibrationSet:
    """Build the prompts (cycling `formats`, default the whole mixture), run the dense model for the
    paper's statistics and the dense continuations.

    statistics: the similarity between heads (kascade.calibrate.collect) over every tile of the prompt
    ("prompt", the paper's), or over the tiles of the question's end and the dense answer only ("answer":
    the prompt with its dense continuation appended, the last ceil(answer_tokens / tile) + 1 tiles), the
    queries that retrieve the fact as decode steps do."""
    import kascade
    from kascade.calibrate import ImportanceHooks, _decoder_layers
    from kascade.calibrate.collect import CalibrationStrategy
    from kascade.calibrate.retrieval import MIXTURE, calibration_prompts

    cfg = model_fingerprint(model.config)
    if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
        raise ValueError(f"answer_tokens: expected an integer >= 1, got {answer_tokens!r}")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts: expected an integer >= 1, got {num_prompts!r}")
    if statistics not in STATISTICS:
        raise ValueError(f"statistics: expected one of {STATISTICS}, got {statistics!r}")
    prompts = calibration_prompts(tokenizer, text, length, num_prompts, formats or MIXTURE, first_seed=first_seed)
    device = next(model.parameters()).device
    batches = dense_trajectories(model, prompts, answer_tokens, batch_size, backend)
    if statistics == "answer":  # each prompt followed by its dense answer; only the last tiles count
        answers = [row.tolist() for b in batches for row in b.continuation]
        inputs = [p.ids + a for p, a in zip(prompts, answers)]
        last = -(-answer_tokens // tile) + 1
    else:
        inputs, last = [p.ids for p in prompts], None
    stats = CalibrationStrategy(cfg["num_layers"], cfg["num_kv_heads"], topk=topk, tile=tile, backend=backend,
                                last_tiles=last)
    hooks = ImportanceHooks(_decoder_layers(model))
    try:
        with torch.no_grad(), kascade.enable(model, strategy=stats):
            for ids in tqdm(inputs, desc="dense statistics", unit="prompt", disable=not progress):
                model(torch.tensor([ids], device=device), use_cache=False)
    finally:
        hooks.remove()
    return CalibrationSet(model, prompts, batches, stats.per_prompt, hooks.calls, topk, backend, statistics=statistics)


def calibrate_output_aware(model, tokenizer, text: str, num_anchors: float | None = None,
                           tolerance: float | None = None, length: int = 4096, num_prompts: int | None = None,
                           answer_tokens: int = 8, batch_size: int = 8, rho: float = 0.1, k_min: int = 128,
                           tile: int = 32, topk: int = 64, backend: str = "auto", progress: bool = True,
                           data_name: str = "", formats=None, shrink: int = DEFAULT_SEARCH_STEP,
                           objective: str = "worst-family", leave_out: str | None = None,
                           candidates: int | None = DEFAULT_CANDIDATES,
                           calib: CalibrationSet | None = None, tp_degree: int = 1, granularity: str = "head",
                           stops=(), sources: str = "mean", statistics: str = "prompt",
                           sparse_prefill: bool = True) -> tuple[Plan, dict]:
    """An output-aware plan (see the module docstring) and a report: the search history, the objective, the
    divergence per format family and the answer agreement of the chosen plan and of the paper's plan of
    the same cost on the same prompts.

    The defaults are the recipe leave-one-format-out validation measured (DEFAULT_*): num_prompts None gives two
    prompts per format, and with neither num_anchors nor tolerance the search stops at `default_target`, a third
    of the layers in selecting-layer equivalents.
    formats: calibration formats (default: the whole mixture, kascade.calibrate.retrieval.MIXTURE).
    objective: "worst-family" (default: the largest mean divergence of a format family) or "mean".
    leave_out: an evaluation family (retrieval.LEAVE_OUT) whose formats the search must not see.
    shrink: each search step removes about 1/shrink of the remaining units; candidates: measure only this
    many units per step, those whose removal cost least when last measured (None: every unit; default 10).
    calib: a CalibrationSet to share (its prompts replace length/num_prompts/formats).
    tp_degree: every source stays inside its head's tensor-parallel shard (the plan runs sharded); the
    paper's plan of the same cost is constrained alike.
    granularity: "head" (default: units are (layer, KV head) pairs) or "layer" (units are whole layers; a plan
    is anchors and the paper's head map, `plan_of_layers`, which every path runs; the same objective and memo).
    stops: costs the search path must pass through (greedy_search); report["plans_along"] holds the path's plan
    at every whole cost it reached, report["paper_plans_along"] the paper's recipe at the same costs.
    sources: how each reusing unit picks its source among the selecting units: the highest similarity averaged
    over the prompts ("mean", default) or the highest of its lowest family mean ("worst-family"). The paper's
    plans of the report keep the mean.
    statistics: where the similarity comes from (calibration_set): every prompt tile ("prompt", default) or the
    question's end and the dense answer ("answer"); ignored with `calib`, which has its own.
    sparse_prefill: the mode plans are judged in: True (default) with the prompt selected too (the paper's method,
    and the stricter test); False in decode-only mode, kascade.enable's default (the prompt attended densely, so
    the first answer token is dense's and the divergence comes from the decode steps): possibly cheaper plans, for
    that mode only (recorded in the plan's provenance; kascade.strategy warns when such a plan runs a sparse
    prefill)."""
    import datetime as _dt

    import kascade
    from kascade.calibrate import best_anchors, head_map_for, layer_scores
    from kascade.calibrate.retrieval import formats_without
    from kascade.strategy import KascadeStrategy, check_sparse_prefill

    check_sparse_prefill(sparse_prefill)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    if sources not in SOURCE_RULES:
        raise ValueError(f"sources: expected one of {SOURCE_RULES}, got {sources!r}")
    cfg = model_fingerprint(model.config)
    L, H = cfg["num_layers"], cfg["num_kv_heads"]
    if calib is None:
        if num_prompts is None:
            num_prompts = default_num_prompts(formats)
        calib = calibration_set(model, tokenizer, text, formats, length, num_prompts, answer_tokens, batch_size, topk,
                                tile, backend, progress, statistics=statistics)
    seen = formats_without(leave_out, tuple(dict.fromkeys(calib.kinds))) if leave_out else tuple(calib.kinds)
    idx = calib.indices(seen)
    if not idx:
        raise ValueError(f"leave_out: leaving out {leave_out!r} leaves no calibration prompt")
    kinds = calib.kinds
    sim, importance = calib.similarity(idx), calib.importance(idx)
    source_sim = calib.similarity(idx, sources)  # what a plan's reusing units are routed by
    from kascade.calibrate import _check_tp_degree

    _check_tp_degree(tp_degree, H)
    plan_kw = dict(rho=rho, k_min=k_min, tile=tile, tp_degree=tp_degree)
    if granularity == "layer":  # a unit is a whole layer: (layer, 0) of a model with one "head"
        hu, unit_cfg = 1, {"num_layers": L, "num_kv_heads": 1}

        def build(units):
            return plan_of_layers({u[0] for u in units}, source_sim, cfg, **plan_kw)
    else:
        hu, unit_cfg = H, cfg

        def build(units):
            return plan_of_units(units, source_sim, cfg, **plan_kw)

    def score(selecting):
        return objective_value(calib.per_prompt(build(selecting), sparse_prefill), kinds, idx, objective)

    if num_anchors is None and tolerance is None:  # the default stopping rule
        num_anchors = default_target(L, hu)
    before = len(calib.memo)
    selecting, history = greedy_search(score, unit_cfg, target=num_anchors, tolerance=tolerance, shrink=shrink,
                                       progress=progress, candidates=candidates, stops=stops)
    plan = build(selecting)
    along = {}  # the search path's plans at whole costs, and the paper's recipe at the same costs
    units = {(layer, h) for layer in range(1, L) for h in range(hu)}
    for step in history:
        units -= {tuple(u) for u in step["removed"]}
        cost = units_cost(units, hu)
        if cost == int(cost) and int(cost) not in along:
            along[int(cost)] = build(units)
    if granularity == "layer":  # the history names layers
        history = [dict(step, removed=[u[0] for u in step["removed"]]) for step in history]
    paper_along = {}
    for k in along:
        a, _ = best_anchors(layer_scores(sim, importance, tp_degree), k)
        paper_along[k] = Plan(anchors=a, head_map=head_map_for(sim, a, tp_degree), model=dict(cfg), **plan_kw)
    k_paper = max(1, min(L, int(round(plan.selecting_layers_equivalent))))
    anchors, _ = best_anchors(layer_scores(sim, importance, tp_degree), k_paper)
    paper = Plan(anchors=anchors, head_map=head_map_for(sim, anchors, tp_degree), model=dict(cfg), **plan_kw)
    ours_pp, paper_pp = calib.per_prompt(plan, sparse_prefill), calib.per_prompt(paper, sparse_prefill)
    ours_div, paper_div = float(np.mean(ours_pp[idx])), float(np.mean(paper_pp[idx]))
    ours_fam, paper_fam = family_divergences(ours_pp, kinds, idx), family_divergences(paper_pp, kinds, idx)
    plan.provenance = {
        "data": data_name, "num_prompts": len(idx), "prompt_tokens": len(calib.prompts[0].ids),
        "formats": sorted({kinds[i] for i in idx}), "answer_tokens": int(calib.batches[0].continuation.shape[1]),
        "calibration_topk": calib.topk, "target": num_anchors, "tolerance": tolerance, "search_step": shrink,
        "search_candidates": candidates, "objective": objective, "leave_out": leave_out, "granularity": granularity,
        "sources": sources, "statistics": calib.statistics, "sparse_prefill": sparse_prefill,
        "divergence": ours_div, "divergence_by_family": ours_fam,
        "paper_plan_same_cost": {"anchors": anchors, "divergence": paper_div},
        "plans_measured": len(calib.memo) - before, "date": _dt.date.today().isoformat(),
        "kascade_version": kascade.__version__,
    }
    report = {"history": history, "similarity": sim, "importance": importance, "divergence": ours_div,
              "objective": objective, "leave_out": leave_out, "granularity": granularity, "sources": sources,
              "divergence_by_family": ours_fam,
              "paper_anchors": anchors, "paper_divergence": paper_div, "paper_divergence_by_family": paper_fam,
              "sparse_prefill": sparse_prefill,
              "agreement": _agreement(calib, plan, idx, sparse_prefill),
              "paper_agreement": _agreement(calib, paper, idx, sparse_prefill),
              "plans_along": along, "paper_plans_along": paper_along}
    return plan, report


def _agreement(calib: CalibrationSet, plan: Plan, idx, sparse_prefill: bool) -> float:
    """agreement() of the plan on the set's prompts `idx` in the mode given (decode-only: from the set's dense
    prompt caches)."""
    from kascade.strategy import KascadeStrategy

    strategy = KascadeStrategy(plan, backend=calib.backend, sparse_prefill=sparse_prefill)
    if sparse_prefill:
        return agreement(calib.model, strategy, calib.batches, idx)
    groups, caches = calib.decode_only_inputs()
    return agreement(calib.model, strategy, groups, idx, caches)


def save_search_plot(report: dict, path) -> str:
    """divergence_vs_cost.png: the search path (divergence against selecting-layer equivalents), with the
    paper's plan of the chosen cost as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([h["cost"] for h in hist], [h["divergence"] for h in hist], marker=".", label="output-aware search")
    ax.scatter([len(report["paper_anchors"])], [report["paper_divergence"]], color="C3", zorder=3,
               label=f"paper recipe, {len(report['paper_anchors'])} anchors")
    ax.set(xlabel="selecting-layer equivalents", ylabel="KL(dense || plan), nats", yscale="symlog",
           title="Divergence on the calibration prompts")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
