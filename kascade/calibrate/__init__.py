"""Calibration: choose a plan's anchors and head map from a model's own attention (SPEC §Calibration).

    plan, report = calibrate_report(model, texts, num_anchors=5, tokenizer=tok, max_length=8192)
    plan.save("plan.json"); save_plots(report, "plots/")

`calibrate(...)` returns the plan alone.

Tensor parallelism (`tp_degree=TP`): KV heads are split over TP ranks in contiguous blocks of
Hkv/TP, and each head may only borrow the indices of an anchor head of its own block (so no rank
needs another rank's selection; see kascade.distributed). The layer scores, hence the anchors, use
the same constrained best head; `report["tp"]` gives what the constraint costs.
"""

from __future__ import annotations

import datetime as _dt
import sys as _sys
import types as _types

import numpy as np
import torch
from tqdm.auto import tqdm

from kascade.calibrate.collect import CalibrationStrategy, ImportanceHooks
from kascade.calibrate.dp import best_anchors, values_by_count
from kascade.plan import Plan, model_fingerprint


def _check_tp_degree(tp_degree, num_kv_heads: int) -> None:
    if isinstance(tp_degree, bool) or not isinstance(tp_degree, int) or tp_degree < 1 or num_kv_heads % tp_degree:
        raise ValueError(f"tp_degree: expected an integer >= 1 dividing the model's {num_kv_heads} KV heads, "
                         f"got {tp_degree!r}")


def shard_masked(sim: np.ndarray, tp_degree: int = 1) -> np.ndarray:
    """sim [L, L, H, H] with sim[a, b, ha, hb] = -inf where ha and hb sit on different TP ranks."""
    H = sim.shape[2]
    _check_tp_degree(tp_degree, H)
    if tp_degree == 1:
        return sim
    shard = np.arange(H) // (H // tp_degree)
    return np.where(shard[:, None] == shard[None, :], sim, -np.inf)


def layer_scores(sim: np.ndarray, importance: np.ndarray, tp_degree: int = 1) -> np.ndarray:
    """S[a, b] = w_b * mean over hb of max over ha of sim[a, b, ha, hb], for a <= b (0 below).
    With tp_degree > 1 the max runs over the ha of hb's shard only."""
    L = sim.shape[0]
    best = shard_masked(sim, tp_degree).max(axis=2).mean(axis=2)  # [L, L]
    return np.triu(best * importance[None, :]) if L else best


def head_map_for(sim: np.ndarray, anchors: list[int], tp_degree: int = 1) -> list[list[int]]:
    """m_b(hb) = argmax over ha of sim[a(b), b, ha, hb]; identity for anchors. With tp_degree > 1
    the argmax runs over hb's shard: the contiguous block of H / tp_degree heads holding hb."""
    L, H = sim.shape[0], sim.shape[2]
    masked = shard_masked(sim, tp_degree)
    rows = []
    for b in range(L):
        if b in anchors:
            rows.append(list(range(H)))
        else:
            a = max(x for x in anchors if x < b)
            rows.append([int(x) for x in masked[a, b].argmax(axis=0)])
    return rows


def map_coverage(sim: np.ndarray, anchors: list[int], head_map: list[list[int]]) -> float:
    """Mean over reuse layers b and heads hb of sim[a(b), b, m_b(hb), hb] (1.0 with no reuse layer)."""
    vals = [sim[max(x for x in anchors if x < b), b, m, hb]
            for b, row in enumerate(head_map) if b not in anchors for hb, m in enumerate(row)]
    return float(np.mean(vals)) if vals else 1.0


def tp_loss(sim: np.ndarray, importance: np.ndarray, num_anchors: int, tp_degree: int) -> dict:
    """What restricting the head map to TP shards costs: the anchor objective and the mean coverage
    of the chosen head (over reuse layers and heads), each with and without the restriction."""
    anchors, value = best_anchors(layer_scores(sim, importance, tp_degree), num_anchors)
    anchors1, value1 = best_anchors(layer_scores(sim, importance), num_anchors)
    cov = map_coverage(sim, anchors, head_map_for(sim, anchors, tp_degree))
    cov_free = map_coverage(sim, anchors, head_map_for(sim, anchors))  # same anchors, free map
    return {"tp_degree": tp_degree, "anchors": anchors, "anchors_unconstrained": anchors1,
            "objective": value, "objective_unconstrained": value1,
            "objective_loss": 1.0 - value / value1 if value1 > 0 else 0.0,
            "coverage": cov, "coverage_unconstrained": cov_free, "coverage_loss": cov_free - cov}


def _decoder_layers(model):
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m.self_attn, "layer_idx")]
    return sorted(layers, key=lambda m: m.self_attn.layer_idx)


def _tokenize(texts, tokenizer, max_length):
    out = []
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("texts: got strings but no tokenizer; pass tokenizer= or token-id tensors")
            ids = torch.tensor(tokenizer(t, add_special_tokens=True).input_ids)
        else:
            ids = torch.as_tensor(t).reshape(-1)
        out.append(ids[:max_length] if max_length else ids)
    return out


def calibrate_report(model, texts, num_anchors: int, tokenizer=None, max_length: int | None = None,
                     rho: float = 0.1, k_min: int = 128, tile: int = 32, topk: int = 64, data_name: str = "",
                     backend: str = "auto", progress: bool = True, tp_degree: int = 1) -> tuple[Plan, dict]:
    """Run the dense model on `texts`, collect statistics, choose anchors (exact DP) and head map.

    `tp_degree`: keep the head map inside the shards of that many tensor-parallel ranks (see the
    module docstring); `report["tp"]` then holds the loss against an unconstrained map."""
    import kascade

    cfg = model_fingerprint(model.config)
    L, H = cfg["num_layers"], cfg["num_kv_heads"]
    _check_tp_degree(tp_degree, H)
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or not 1 <= num_anchors <= L:
        raise ValueError(f"num_anchors: expected an integer in 1..{L} (the model's layers), got {num_anchors!r}")
    prompts = _tokenize(texts, tokenizer, max_length)
    if not prompts:
        raise ValueError("texts: expected at least one calibration prompt, got none")
    short = [len(p) for p in prompts if len(p) <= topk + tile]
    if short:
        raise ValueError(f"texts: every prompt needs more than topk + tile = {topk + tile} tokens; got lengths {short}")
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts) * L, desc="calibrating", unit="layer", disable=not progress)
    strategy = CalibrationStrategy(L, H, topk=topk, tile=tile, backend=backend, on_layer=lambda _: bar.update(1))
    hooks = ImportanceHooks(_decoder_layers(model))
    try:
        with torch.no_grad(), kascade.enable(model, strategy=strategy):
            for ids in prompts:
                model(ids[None].to(device), use_cache=False)
    finally:
        hooks.remove()
        bar.close()
    sim = strategy.similarity()
    importance = hooks.importance()
    score = layer_scores(sim, importance, tp_degree)
    anchors, value = best_anchors(score, num_anchors)
    provenance = {
        "data": data_name, "num_prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
        "calibration_topk": topk, "date": _dt.date.today().isoformat(), "kascade_version": kascade.__version__,
        "objective": value,
    }
    loss = tp_loss(sim, importance, num_anchors, tp_degree)
    if tp_degree > 1:
        provenance.update(objective_unconstrained=loss["objective_unconstrained"], coverage=loss["coverage"],
                          coverage_unconstrained=loss["coverage_unconstrained"])
    plan = Plan(anchors=anchors, head_map=head_map_for(sim, anchors, tp_degree), rho=rho, k_min=k_min, tile=tile,
                model=cfg, provenance=provenance, tp_degree=tp_degree)
    report = {"similarity": sim, "importance": importance, "score": score,
              "values_by_count": values_by_count(score), "anchors": anchors, "tp": loss}
    return plan, report


def calibrate(model, texts, num_anchors: int, **kwargs) -> Plan:
    """Choose anchors and head map for `model` from `texts`; see calibrate_report."""
    return calibrate_report(model, texts, num_anchors, **kwargs)[0]


def save_plots(report: dict, out_dir) -> list[str]:
    """Write anchor_score_vs_k.png and layer_similarity.png into out_dir; returns the paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vals = report["values_by_count"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(vals) + 1), vals, marker="o")
    ax.axvline(len(report["anchors"]), color="gray", ls="--", label=f"chosen K = {len(report['anchors'])}")
    ax.set(xlabel="number of anchors K", ylabel="objective (sum of S over segments)",
           title="Anchor-selection score vs K")
    ax.legend()
    fig.tight_layout()
    p1 = out / "anchor_score_vs_k.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    sim = report["similarity"]
    mm = sim.max(axis=2).mean(axis=2)
    mm = np.ma.masked_where(np.tril(np.ones_like(mm, dtype=bool), -1), mm)  # only a <= b is defined
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(mm, vmin=0, vmax=1, cmap="viridis")
    ax.set(xlabel="layer b (reusing)", ylabel="layer a (anchor)",
           title="Similarity: mean over heads of best-head coverage")
    for a in report["anchors"]:
        ax.axhline(a, color="white", lw=0.5)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    p2 = out / "layer_similarity.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [str(p1), str(p2)]


class _CallablePackage(_types.ModuleType):
    """Calling the package calls `calibrate`: importing any `kascade.calibrate.*` module binds the name
    `kascade.calibrate` to this package (Python's import system), and `kascade.calibrate(model, texts, ...)`
    must keep working after it."""

    def __call__(self, model, texts, num_anchors: int, **kwargs) -> Plan:
        return calibrate(model, texts, num_anchors, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
