"""Per-layer budgets at equal total keys: a measured mechanism (issue: the accuracy-speed frontier).

Uniform top-k gives every sparse layer the same budget rho. Attention is more spread in some layers than in
others, so the same total number of keys may cover more attention mass when the flat layers get more and the
peaked ones less. Here:

1. `coverage_curves` runs dense forwards over calibration prompts and records, for every layer and KV head,
   the attention mass of the prompt's last tile (its last `tile` queries: the question, where retrieval
   happens, as in decode steps) pooled over the head's query heads and those queries, over the keys before
   the tile; the share of that mass the top-k(rho n) keys hold, for each rho of a grid, averaged over KV
   heads and prompts: curves [L, R].
2. `allocate` gives each sparse layer (1..L-1; layer 0 stays dense) a rho of the grid so that the mean rho
   is at most the uniform one (equal total keys) and the summed uncovered mass is smallest over the grid
   (exact, by dynamic programming; k_min makes a curve flat at small rho, so a greedy step rule would not do).
3. `LayerBudgetStrategy` is per-layer top-k per KV head (the `oracle` strategy) with those budgets.

    python -m kascade.eval.layer_budgets MODEL_DIR -o budgets.json [--prompts 8 --length 4096 --rho 0.1]

The calibration prompts are the prose retrieval formats over data/heldout.txt (kascade.calibrate.retrieval),
from seeds the evaluations do not use, so the structured families that measure the result stay held out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kascade import ops
from kascade.budget import budget, check_budget
from kascade.eval.budget_cli import budget_parser, model_and_prompts
from kascade.strategy import Strategy

GRID = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4)


class _CurveRecorder(Strategy):
    """Dense attention in every layer; records the last tile's top-k mass curve per layer (see the module)."""

    name = "layer-budget-curves"

    def __init__(self, num_layers: int, rhos, k_min: int, tile: int, backend: str = "auto"):
        super().__init__(backend)
        self.rhos, self.k_min, self.tile = tuple(rhos), k_min, tile
        self.sums = np.zeros((num_layers, len(self.rhos)))
        self.counts = np.zeros(num_layers)

    def attend(self, layer, q, k, v, kv_start, scale):
        if q.shape[0] != 1 or (kv_start is not None and int(kv_start.max()) != 0):
            raise ValueError("coverage_curves: expected unpadded prompts of batch 1")
        n, qlen = k.shape[2], q.shape[2]
        p0 = n - qlen  # position of q's first row
        first = ((n - 1) // self.tile) * self.tile  # the last tile's first position
        if first > p0 and first >= self.k_min:
            self._record(layer, q[0, :, first - p0:], k[0, :, :first], scale)
        return ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend)

    def _record(self, layer, q, k, scale):
        hq, hkv = q.shape[0], k.shape[0]
        g = hq // hkv
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        logits = torch.einsum("hqd,hnd->hqn", q.float(), k.float().repeat_interleave(g, 0)) * scale
        probs = logits.softmax(-1)  # over the keys before the tile only: the mass the selection distributes
        pooled = probs.reshape(hkv, g * q.shape[1], -1).sum(1)
        pooled = pooled / pooled.sum(-1, keepdim=True)
        cum = pooled.sort(-1, descending=True).values.cumsum(-1)
        n = k.shape[1]
        for j, rho in enumerate(self.rhos):
            kk = min(n, budget(n, rho, self.k_min))
            self.sums[layer, j] += float(cum[:, kk - 1].mean())
        self.counts[layer] += 1


def coverage_curves(model, prompts: list[list[int]], rhos=GRID, k_min: int = 128, tile: int = 32,
                    progress: bool = True) -> np.ndarray:
    """[L, len(rhos)] mean covered mass of the last tile at each budget (module docstring, step 1)."""
    import kascade
    from tqdm.auto import tqdm

    num_layers = model.config.num_hidden_layers
    rec = _CurveRecorder(num_layers, rhos, k_min, tile)
    device = next(model.parameters()).device
    with kascade.enable(model, strategy=rec), torch.no_grad():
        for ids in tqdm(prompts, desc="coverage curves", unit="prompt", disable=not progress):
            model(torch.tensor([ids], device=device))
    if (rec.counts == 0).any():
        raise ValueError("prompts: too short for a last tile beyond k_min keys in some layer")
    return rec.sums / rec.counts[:, None]


def allocate(curves: np.ndarray, rhos, rho: float) -> list[float]:
    """A rho of the grid per layer (layer 0: None, dense) with mean over layers 1..L-1 at most `rho` and the
    least summed uncovered mass (module docstring, step 2): exact, by dynamic programming over the layers in
    units of the grid's smallest rho (every grid value must be a multiple of it). curves [L, R]."""
    rhos = list(rhos)
    unit = rhos[0]
    units = [round(r / unit) for r in rhos]
    if rhos != sorted(rhos) or any(abs(u * unit - r) > 1e-9 for u, r in zip(units, rhos)) or rho < unit:
        raise ValueError(f"rhos: expected an increasing grid of multiples of its first value, at most rho={rho}, "
                         f"got {rhos}")
    layers = list(range(1, curves.shape[0]))
    cap = int(np.floor(rho / unit * len(layers) + 1e-9))
    best = np.full(cap + 1, -np.inf)  # best[c]: most covered mass of the layers so far with c units spent
    best[0] = 0.0
    choice = []
    for layer in layers:
        nxt = np.full(cap + 1, -np.inf)
        pick = np.zeros(cap + 1, dtype=int)
        for j, u in enumerate(units):
            cand = np.full(cap + 1, -np.inf)
            cand[u:] = best[: cap + 1 - u] + curves[layer, j]
            better = cand > nxt
            nxt[better], pick[better] = cand[better], j
        best = nxt
        choice.append(pick)
    c = int(np.argmax(best))
    if not np.isfinite(best[c]):
        raise ValueError(f"rho={rho}: below the grid's smallest budget in every layer")
    out = []
    for layer, pick in zip(reversed(layers), reversed(choice)):
        j = int(pick[c])
        out.append(rhos[j])
        c -= units[j]
    return [None] + out[::-1]


class LayerBudgetStrategy(Strategy):
    """Per-layer top-k per KV head with budget rhos[layer] (layer 0 and steps of no more than k_min keys dense)."""

    def __init__(self, name: str, rhos: list, k_min: int = 128, tile: int = 32, backend: str = "auto",
                 sparse_prefill: bool = True):
        super().__init__(backend, sparse_prefill=sparse_prefill)
        for layer, r in enumerate(rhos[1:], start=1):
            try:
                check_budget(r, k_min)
            except ValueError as e:
                raise ValueError(f"rhos[{layer}]: {e}") from None
        self.name, self.rhos, self.k_min, self.tile = name, list(rhos), k_min, tile

    def validate(self, model_config) -> None:
        if len(self.rhos) != model_config.num_hidden_layers:
            raise ValueError(f"rhos: expected one budget per layer ({model_config.num_hidden_layers}), "
                             f"got {len(self.rhos)}")

    def attend(self, layer, q, k, v, kv_start, scale):  # no kv_len: a preallocated (static) cache is refused
        kw = dict(kv_start=kv_start, scale=scale, backend=self.backend)
        if layer == 0 or k.shape[2] <= self.k_min or self.dense_step(q):
            return ops.dense(q, k, v, **kw)
        sel = ops.select(q, k, self.rhos[layer], self.k_min, self.tile, kv_start=kv_start, scale=scale,
                         backend=self.backend)
        return ops.reuse(q, k, v, sel, None, **kw)


def load(path) -> list:
    """The per-layer budgets of a file written by this module's command."""
    data = json.loads(Path(path).read_text())
    return data["rhos"]


def plot(data: dict, path) -> None:
    """Two panels: each layer's budget against the uniform one, and the top-k mass curves of a few layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rhos, curves, grid = data["rhos"], np.array(data["curves"]), data["grid"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    layers = list(range(1, len(rhos)))
    a.bar(layers, [rhos[i] for i in layers], color="tab:blue", label="allocated")
    a.axhline(data["uniform_rho"], color="k", ls="--", label=f"uniform {data['uniform_rho']}")
    a.set(xlabel="layer", ylabel="rho", title=f"per-layer budgets (mean {data['mean_rho']:.3f}; layer 0 dense)")
    a.legend()
    for i in sorted(layers, key=lambda i: rhos[i])[:: max(1, len(layers) // 6)]:
        b.plot(grid, curves[i], marker="o", ms=3, label=f"layer {i} (rho {rhos[i]})")
    b.set(xlabel="rho", ylabel="covered mass of the last tile", title="top-k mass curves (calibration prompts)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = budget_parser(__doc__.split("\n")[0], "budgets JSON (and a .png of the curves beside it)",
                         "the uniform budget whose total keys are kept").parse_args(argv)
    model, prompts, formats = model_and_prompts(args)
    curves = coverage_curves(model, prompts, GRID, args.k_min)
    rhos = allocate(curves, GRID, args.rho)
    sparse = rhos[1:]
    out = {"rhos": rhos, "uniform_rho": args.rho, "mean_rho": sum(sparse) / len(sparse), "grid": list(GRID),
           "curves": curves.tolist(), "prompts": args.prompts, "length": args.length, "formats": formats,
           "first_seed": args.first_seed, "k_min": args.k_min,
           "uniform_uncovered": float(sum(1 - np.interp(args.rho, GRID, curves[i]) for i in range(1, len(rhos)))),
           "allocated_uncovered": float(sum(1 - curves[i, GRID.index(r)] for i, r in enumerate(rhos) if r))}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("rhos", "mean_rho", "uniform_uncovered", "allocated_uncovered")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
