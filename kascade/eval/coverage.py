"""Attention-mass coverage: a label-free diagnostic of how much of the dense attention each strategy keeps.

The model runs densely on a text. At every layer, every strategy chooses its keys from the same q and
k (the dense model's), and we measure, per KV head, the share of the dense post-softmax attention mass,
pooled over the G query heads of the group, that falls on the keys the strategy attends:

    prefill tile t:  (mass on the tile's selected keys + mass on its diagonal block) / total mass
    decode step:     mass on the selected keys / total mass

summed over the queries of the text (every query weighs the same). A dense layer covers 1. Because the
oracle takes each tile's exact top-k of this pooled mass, its coverage bounds that of every strategy
that attends sparsely in the layer at the same budget with one set per KV head. Strategies with one set
per query head (quest-decode, tidaldecode) count each query head's mass on its own set; a group's heads
then attend to more distinct keys than k(n), and their coverage may exceed the oracle's.

    from kascade.eval.coverage import measure, plot
    res = measure(model, ids, {"kascade": make_strategy("kascade", plan, cfg, 0.1, 128), ...}, decode_steps=16)
    res["prefill"]["kascade"]      # numpy [num_layers, num_kv_heads]
    plot(res, "coverage.png")
"""

from __future__ import annotations

import numpy as np
import torch

from kascade import ops
from kascade.eval.generation import step
from kascade.eval.strategies import attended, head_map_tensor
from kascade.reference import pooled_tile_scores
from kascade.strategy import Strategy


class CoverageProbe(Strategy):
    """Dense attention that scores each strategy's selections at every layer (see the module docstring).

    mode: "prefill" or "decode", the accumulators that the next forward feeds (None: measure nothing).
    """

    name = "coverage-probe"

    def __init__(self, strategies: dict, tile: int = 32, backend: str = "auto"):
        super().__init__(backend)
        self.strategies, self.tile, self.mode = dict(strategies), tile, "prefill"
        self.sums: dict = {}  # (mode, name) -> {layer: (covered [Hkv], total [Hkv])}

    def begin_forward(self) -> None:
        super().begin_forward()
        for s in self.strategies.values():
            s.begin_forward()

    def validate(self, model_config) -> None:
        for s in self.strategies.values():
            s.validate(model_config)

    def attend(self, layer, q, k, v, kv_start, scale):
        out = ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend)
        if self.mode is None:
            return out
        if q.shape[0] != 1 or (kv_start is not None and int(kv_start.max()) > 0):
            raise ValueError("coverage: expected one sequence without padding (input_ids of shape [1, N])")
        sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
        for name, s in self.strategies.items():
            s.attend(layer, q, k, v, kv_start, scale)  # its output is not used: the model stays dense
            cov, tot = _covered_mass(q[0], k[0], attended(s, layer), self.tile, sc)
            acc = self.sums.setdefault((self.mode, name), {})
            if layer in acc:
                cov, tot = cov + acc[layer][0], tot + acc[layer][1]
            acc[layer] = (cov, tot)
        return out

    def result(self, num_layers: int) -> dict:
        out: dict = {}
        for (mode, name), acc in self.sums.items():
            rows = [(acc[layer][0] / acc[layer][1]).cpu().numpy() for layer in range(num_layers)]
            out.setdefault(mode, {})[name] = np.stack(rows)
        return out


def _covered_mass(q, k, used, tile: int, scale: float):
    """q [Hq, Q, D] (the newest positions), k [Hkv, N, D]; used = (Selection, head_map), ([Selection per KV
    head], None) or None.
    Returns (covered, total), each [Hkv] float64."""
    hq, qlen, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    dev = q.device
    if used is not None and isinstance(used[0], list):  # one Selection per KV head (shared budgets)
        parts = [_covered_mass(q[h * g:(h + 1) * g], k[h:h + 1], (sel, None), tile, scale)
                 for h, sel in enumerate(used[0])]
        return torch.cat([c for c, _ in parts]), torch.cat([t for _, t in parts])
    if qlen == 1:
        s = torch.einsum("hgd,hnd->hgn", q.float().view(hkv, g, d), k.float()) * scale
        probs = torch.softmax(s, dim=-1)  # [Hkv, G, N]
        pooled = probs.sum(1)  # [Hkv, N]
        total = pooled.sum(-1).double()
        if used is None:
            return total, total
        sel, hm = used
        count = int(sel.counts[0, 0])
        if sel.num_kv_heads == hq and hq != hkv:  # one set per query head (quest-decode, tidaldecode)
            idx = sel.indices[0, :, 0, :count].long().view(hkv, g, count)
            return probs.gather(-1, idx).sum((1, 2)).double(), total
        idx = sel.indices[0, head_map_tensor(hm, hkv, dev), 0, :count].long()
        return pooled.gather(-1, idx).sum(-1).double(), total
    p0 = n - qlen
    covered = torch.zeros(hkv, dtype=torch.float64, device=dev)
    total = torch.zeros(hkv, dtype=torch.float64, device=dev)
    sel = hmt = None
    if used is not None:
        sel, hm = used
        if sel.tile != tile:
            raise ValueError(f"coverage: the strategy tiles prefill by {sel.tile}, the probe by {tile}; use one tile")
        hmt = head_map_tensor(hm, hkv, dev)
    for ta, pooled in pooled_tile_scores(q, k, p0, tile, scale):  # [Hkv, U, kend]
        tot = pooled.sum(-1).double()  # [Hkv, U]
        total += tot.sum(-1)
        if sel is None:
            covered += tot.sum(-1)
            continue
        for u in range(pooled.shape[1]):
            t = ta + u
            ul = t - int(sel.first_tile[0])
            idx = sel.indices[0, hmt, ul, : int(sel.counts[0, ul])].long()  # [Hkv, k_t], all < t * tile
            covered += pooled[:, u].gather(-1, idx).sum(-1).double() + pooled[:, u, t * tile :].sum(-1).double()
    return covered, total


@torch.no_grad()
def measure(model, input_ids: torch.Tensor, strategies: dict, tile: int = 32, decode_steps: int = 0,
            backend: str = "auto") -> dict:
    """Coverage of each strategy on one text (input_ids [1, N]).

    The first N - decode_steps tokens are one prefill; the last decode_steps tokens are fed one by one
    (teacher forcing) as decode steps. Returns {"prefill": {name: [L, Hkv]}, "decode": {...}} (numpy;
    "decode" only when decode_steps > 0).
    """
    import kascade

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected shape [1, N], got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if not 0 <= decode_steps < n:
        raise ValueError(f"decode_steps: expected 0 <= decode_steps < {n} (the text length), got {decode_steps}")
    probe = CoverageProbe(strategies, tile=tile, backend=backend)
    ids = input_ids.to(next(model.parameters()).device)
    with kascade.enable(model, strategy=probe):
        probe.mode = "prefill"
        _, cache = step(model, ids[:, : n - decode_steps])
        probe.mode = "decode"
        for i in range(n - decode_steps, n):
            _, cache = step(model, ids[:, i : i + 1], cache)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return probe.result(cfg.num_hidden_layers)


def plot(result: dict, path, title: str = "attention-mass coverage") -> str:
    """Per-layer coverage (mean over KV heads; band: min..max over heads), one line per strategy and
    one panel per phase. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [m for m in ("prefill", "decode") if m in result]
    fig, axes = plt.subplots(1, len(phases), figsize=(6.5 * len(phases), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], phases):
        for name, arr in result[mode].items():
            layers = np.arange(arr.shape[0])
            (line,) = ax.plot(layers, arr.mean(1), marker="o", ms=3, label=name)
            ax.fill_between(layers, arr.min(1), arr.max(1), color=line.get_color(), alpha=0.12)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of dense attention mass covered")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{title} ({mode})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
