"""Output-aware calibration: choose which (layer, KV head) units select by the model's own outputs.

The paper's recipe scores a plan by how much of each layer's top-k attention mass its anchor's keys
recover. On a real model that misses what matters: a reuse layer can keep 85-94% of the mass and still
lose the one far-away key that answers the question. This recipe measures the answer instead:

1. Dense pass. On retrieval-rich calibration prompts (`kascade.calibrate.retrieval`: facts hidden
   in held-out prose, a question at the end, plus plain prose) the dense model continues each prompt
   greedily for `answer_tokens` tokens; its log-probabilities along that continuation are kept.
   The paper's statistics (`CalibrationStrategy`) are collected on the same prompts: `sim[a, b, ha, hb]`,
   the coverage of layer b head hb by the keys of layer a head ha.
2. Divergence of a plan: the mean over prompts and continuation positions of KL(dense || plan) of the
   next-token distributions, the plan's strategy following the dense continuation (teacher forcing:
   prefill of the prompt, then one decode step per continuation token, as generation runs).
3. Search. Units are the (layer, KV head) pairs of layers 1..L-1 (layer 0 always selects). Starting
   from every unit selecting (per-head top-k in every layer), units are removed greedily: each step
   measures the divergence with each remaining unit removed and removes the best few (about a tenth
   of them, one at a time near the end), as IndexCache chooses shared layers greedily by the loss. A
   unit that does not select reads the keys of the earlier selecting unit (a, m) with the highest
   `sim[a, l, m, h]`. The search stops at the target cost (`selecting_layers_equivalent`) or, with a
   tolerance, at the cheapest plan whose divergence stays under it.

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


def divergence(model, strategy, batches: list[Trajectories]) -> float:
    """Mean KL(dense || strategy) over prompts and continuation positions (nats)."""
    import kascade

    total, count = 0.0, 0
    with kascade.enable(model, strategy=strategy):
        for b in batches:
            _, lp = follow(model, b.ids, b.continuation.shape[1], b.continuation)
            kl = (b.logprobs.exp() * (b.logprobs - lp)).sum(-1)  # [B, m]
            total += float(kl.sum())
            count += kl.numel()
    return total / count


def agreement(model, strategy, batches: list[Trajectories]) -> float:
    """Share of continuation positions where the strategy's argmax is the dense token."""
    import kascade

    same, count = 0, 0
    with kascade.enable(model, strategy=strategy):
        for b in batches:
            _, lp = follow(model, b.ids, b.continuation.shape[1], b.continuation)
            same += int((lp.argmax(-1) == b.continuation).sum())
            count += b.continuation.numel()
    return same / count


# ----------------------------------------------------------------------------------------------
# plans over units
# ----------------------------------------------------------------------------------------------


def plan_of_units(selecting: set, sim: np.ndarray, cfg: dict, **plan_kw) -> Plan:
    """The plan in which exactly the units `selecting` (plus layer 0) select; every other unit (l, h)
    reads the earlier selecting unit (a, m) with the highest sim[a, l, m, h] (ties: the later layer)."""
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
            cands = [(a, m) for a in range(layer) for m in range(H) if (a, m) in sel]
            a, m = max(cands, key=lambda am: (sim[am[0], layer, am[1], h], am[0]))
            row.append([a, m])
        rows.append(row)
    if len(anchors) == L:  # every layer selects: a plan of layer granularity
        return Plan(anchors=anchors, model=dict(cfg), recipe="output-aware", **plan_kw)
    return Plan(anchors=anchors, head_sources=rows, model=dict(cfg), recipe="output-aware", **plan_kw)


def units_cost(selecting: set, num_kv_heads: int) -> float:
    """selecting_layers_equivalent of a unit set (layer 0 counts as one selecting layer)."""
    return 1.0 + len({u for u in selecting if u[0] != 0}) / num_kv_heads


def greedy_search(score, cfg: dict, target: float | None = None, tolerance: float | None = None,
                  shrink: int = 10, progress: bool = True, plan_of=None) -> tuple[set, list[dict]]:
    """Greedy removal of units (see the module docstring).

    score(selecting) -> divergence of the plan of that unit set. target: stop once the cost is at most
    this many selecting-layer equivalents. tolerance: never accept a plan whose divergence exceeds it
    (stop when every removal would). Returns (selecting units, history of {cost, divergence, removed})."""
    if target is None and tolerance is None:
        raise ValueError("target/tolerance: give a target cost (selecting-layer equivalents), a tolerance, or both")
    L, H = cfg["num_layers"], cfg["num_kv_heads"]
    if target is not None and not 1.0 <= target <= L:
        raise ValueError(f"target: expected selecting-layer equivalents in [1, {L}], got {target}")
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance: expected a divergence >= 0 (nats), got {tolerance}")
    selecting = {(layer, h) for layer in range(1, L) for h in range(H)}
    current = score(selecting)
    history = [{"cost": units_cost(selecting, H), "divergence": current, "removed": []}]
    bar = tqdm(desc="output-aware search", unit="plan", disable=not progress)
    while selecting:
        over = len(selecting) - (math.floor(round((target - 1.0) * H, 9)) if target is not None else 0)
        if over <= 0:
            break
        trials = []
        for u in sorted(selecting):
            trials.append((score(selecting - {u}), u))
            bar.update(1)
        trials.sort()
        ok = [t for t in trials if tolerance is None or t[0] <= tolerance]
        if not ok:
            break
        r = min(max(1, len(trials) // shrink), len(ok), over)
        removed = [u for _, u in ok[:r]]
        new = score(selecting - set(removed)) if r > 1 else ok[0][0]
        if r > 1 and tolerance is not None and new > tolerance:
            removed, new = [ok[0][1]], ok[0][0]
        bar.update(1)
        selecting = selecting - set(removed)
        current = new
        history.append({"cost": units_cost(selecting, H), "divergence": current,
                        "removed": [list(u) for u in removed]})
        bar.set_postfix_str(f"cost {history[-1]['cost']:.2f} KL {current:.4f}")
    bar.close()
    return selecting, history


def calibrate_output_aware(model, tokenizer, text: str, num_anchors: float | None = None,
                           tolerance: float | None = None, length: int = 4096, num_prompts: int = 16,
                           answer_tokens: int = 8, batch_size: int = 8, rho: float = 0.1, k_min: int = 128,
                           tile: int = 32, topk: int = 64, backend: str = "auto", progress: bool = True,
                           data_name: str = "", formats=None, shrink: int = 10) -> tuple[Plan, dict]:
    """An output-aware plan (see the module docstring) and a report: the search history, the divergence
    and answer agreement of the chosen plan and of the paper's plan of the same cost on the same prompts.
    shrink: each search step removes about 1/shrink of the remaining units (`greedy_search`)."""
    import datetime as _dt

    import kascade
    from kascade.calibrate import ImportanceHooks, _decoder_layers, best_anchors, head_map_for, layer_scores
    from kascade.calibrate.collect import CalibrationStrategy
    from kascade.calibrate.retrieval import FORMATS, calibration_prompts
    from kascade.strategy import KascadeStrategy

    cfg = model_fingerprint(model.config)
    L, H = cfg["num_layers"], cfg["num_kv_heads"]
    if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
        raise ValueError(f"answer_tokens: expected an integer >= 1, got {answer_tokens!r}")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts: expected an integer >= 1, got {num_prompts!r}")
    prompts = calibration_prompts(tokenizer, text, length, num_prompts, formats or FORMATS)
    device = next(model.parameters()).device
    # the paper's statistics on the same prompts (they choose each non-selecting unit's source)
    stats = CalibrationStrategy(L, H, topk=topk, tile=tile, backend=backend)
    hooks = ImportanceHooks(_decoder_layers(model))
    try:
        with torch.no_grad(), kascade.enable(model, strategy=stats):
            for p in tqdm(prompts, desc="dense statistics", unit="prompt", disable=not progress):
                model(torch.tensor([p.ids], device=device), use_cache=False)
    finally:
        hooks.remove()
    sim, importance = stats.similarity(), hooks.importance()
    batches = dense_trajectories(model, prompts, answer_tokens, batch_size, backend)
    plan_kw = dict(rho=rho, k_min=k_min, tile=tile)
    memo: dict = {}

    def score(selecting):
        key = frozenset(selecting)
        if key not in memo:
            plan = plan_of_units(selecting, sim, cfg, **plan_kw)
            memo[key] = divergence(model, KascadeStrategy(plan, backend=backend), batches)
        return memo[key]

    selecting, history = greedy_search(score, cfg, target=num_anchors, tolerance=tolerance, shrink=shrink,
                                       progress=progress)
    plan = plan_of_units(selecting, sim, cfg, **plan_kw)
    along = {}  # the search path's plans at whole costs, and the paper's recipe at the same costs
    units = {(layer, h) for layer in range(1, L) for h in range(H)}
    for step in history:
        units -= {tuple(u) for u in step["removed"]}
        cost = units_cost(units, H)
        if cost == int(cost) and int(cost) not in along:
            along[int(cost)] = plan_of_units(units, sim, cfg, **plan_kw)
    paper_along = {}
    for k in along:
        a, _ = best_anchors(layer_scores(sim, importance), k)
        paper_along[k] = Plan(anchors=a, head_map=head_map_for(sim, a), model=dict(cfg), **plan_kw)
    k_paper = max(1, min(L, int(round(plan.selecting_layers_equivalent))))
    anchors, _ = best_anchors(layer_scores(sim, importance), k_paper)
    paper = Plan(anchors=anchors, head_map=head_map_for(sim, anchors), model=dict(cfg), **plan_kw)
    ours_div = score(selecting)
    paper_div = divergence(model, KascadeStrategy(paper, backend=backend), batches)
    plan.provenance = {
        "data": data_name, "num_prompts": len(prompts), "prompt_tokens": length,
        "formats": sorted({p.kind for p in prompts}), "answer_tokens": answer_tokens,
        "calibration_topk": topk, "target": num_anchors, "tolerance": tolerance, "search_step": shrink,
        "divergence": ours_div, "paper_plan_same_cost": {"anchors": anchors, "divergence": paper_div},
        "plans_measured": len(memo), "date": _dt.date.today().isoformat(), "kascade_version": kascade.__version__,
    }
    report = {"history": history, "similarity": sim, "importance": importance, "divergence": ours_div,
              "paper_anchors": anchors, "paper_divergence": paper_div,
              "agreement": agreement(model, KascadeStrategy(plan, backend=backend), batches),
              "paper_agreement": agreement(model, KascadeStrategy(paper, backend=backend), batches),
              "plans_along": along, "paper_plans_along": paper_along}
    return plan, report


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
