"""Calibration: choose a plan's anchors and head map from a model's own attention (SPEC §Calibration).

    plan, report = calibrate_report(model, texts, num_anchors=5, tokenizer=tok, max_length=8192)
    plan.save("plan.json"); save_plots(report, "plots/")

`calibrate(...)` returns the plan alone.
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import torch
from tqdm.auto import tqdm

from kascade.calibrate.collect import CalibrationStrategy, ImportanceHooks
from kascade.calibrate.dp import best_anchors, values_by_count
from kascade.plan import Plan, model_fingerprint


def layer_scores(sim: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """S[a, b] = w_b * mean over hb of max over ha of sim[a, b, ha, hb], for a <= b (0 below)."""
    L = sim.shape[0]
    best = sim.max(axis=2).mean(axis=2)  # [L, L]
    return np.triu(best * importance[None, :]) if L else best


def head_map_for(sim: np.ndarray, anchors: list[int]) -> list[list[int]]:
    """m_b(hb) = argmax over ha of sim[a(b), b, ha, hb]; identity for anchors."""
    L, H = sim.shape[0], sim.shape[2]
    rows = []
    for b in range(L):
        if b in anchors:
            rows.append(list(range(H)))
        else:
            a = max(x for x in anchors if x < b)
            rows.append([int(x) for x in sim[a, b].argmax(axis=0)])
    return rows


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
                     backend: str = "auto", progress: bool = True) -> tuple[Plan, dict]:
    """Run the dense model on `texts`, collect statistics, choose anchors (exact DP) and head map."""
    import kascade

    cfg = model_fingerprint(model.config)
    L, H = cfg["num_layers"], cfg["num_kv_heads"]
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
    score = layer_scores(sim, importance)
    anchors, value = best_anchors(score, num_anchors)
    plan = Plan(
        anchors=anchors, head_map=head_map_for(sim, anchors), rho=rho, k_min=k_min, tile=tile, model=cfg,
        provenance={
            "data": data_name, "num_prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
            "calibration_topk": topk, "date": _dt.date.today().isoformat(), "kascade_version": kascade.__version__,
            "objective": value,
        },
    )
    report = {"similarity": sim, "importance": importance, "score": score,
              "values_by_count": values_by_count(score), "anchors": anchors}
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
