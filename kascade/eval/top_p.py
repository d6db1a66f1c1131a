"""Mass-adaptive (top-p) budgets at equal total keys: a measured mechanism (the accuracy-speed frontier).

Per-layer top-k gives every (layer, KV head, tile or decode step) k(n) keys. Top-p gives each the fewest keys
whose pooled attention holds a share p of the mass over the keys it may select (at least min(k_min, n)), so a
peaked head takes few keys and a spread one many. Here:

1. `keys_at_p` runs dense forwards over calibration prompts and records, for each p of a grid, the keys top-p
   keeps for the prompt's last tile (the question's queries, where retrieval happens, as in decode steps) in
   every layer but 0 and every KV head, summed, against the k(n) keys of uniform top-k at rho.
2. `calibrate_p`: the p at which the two sums are equal (equal total keys), interpolated on the grid.
3. `TopPStrategy`: per-layer top-p per KV head (layer 0, and steps of at most k_min keys, dense). It counts the
   keys it keeps and the k(n) uniform top-k would keep on the same steps (`key_share`), so an evaluation
   reports what it spent on its own prompts.

    python -m kascade.eval.top_p MODEL_DIR -o top_p.json [--prompts 8 --length 4096 --rho 0.1]

The calibration prompts are the prose retrieval formats over data/heldout.txt (kascade.calibrate.retrieval),
from seeds the evaluations do not use, as kascade.eval.layer_budgets does. Reference path (PyTorch), batch 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kascade import ops
from kascade.budget import budget, check_budget
from kascade.reference import Selection, pooled_tile_scores
from kascade.eval.budget_cli import budget_parser, model_and_prompts
from kascade.strategy import Strategy

GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)


def check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"p: expected a share of the attention mass in (0, 1], got {p!r}")
    return float(p)


def top_p_counts(mass: torch.Tensor, p: float, k_min: int) -> torch.Tensor:
    """mass [..., n] (non-negative) -> [...] int64: the fewest keys whose mass holds a share p of the row's,
    at least min(k_min, n)."""
    n = mass.shape[-1]
    cum = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    total = cum[..., -1:]
    k = (cum < p * total).sum(-1) + 1  # the first prefix reaching p * total
    return k.clamp(min=min(k_min, n), max=n)


def _rows_top(scores: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """scores [U, n], ks [U] -> [U, max ks] int32: each row's ks[u] largest positions ascending, then -1."""
    width = max(1, int(ks.max()))
    top = torch.topk(scores, min(width, scores.shape[-1]), dim=-1, sorted=True).indices
    valid = torch.arange(top.shape[-1], device=scores.device)[None] < ks[:, None]
    top = top.masked_fill(~valid, scores.shape[-1]).sort(-1).values
    return top.masked_fill(~valid, -1).to(torch.int32)


def top_p_selections(q, k, p: float, k_min: int, tile: int, scale: float | None = None) -> tuple[list, int]:
    """One Selection per KV head (indices [1, 1, U, Kmax], its own counts [1, U]) keeping, per tile or decode
    step, the fewest keys holding a share p of the head's pooled attention (reference.select's scores) over
    the keys the tile may select. q [1, Hq, Q, D] at the last Q positions of k [1, Hkv, n, D] (no padding).
    Also returns the keys kept over all heads, tiles or steps."""
    if q.shape[0] != 1:
        raise ValueError(f"q: top-p selection runs one unpadded sequence at a time, got batch {q.shape[0]}")
    hq, qlen, d = q.shape[1:]
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    sc = d ** -0.5 if scale is None else float(scale)
    p0 = n - qlen
    if qlen == 1:
        logits = torch.einsum("hgd,hnd->hgn", q[0, :, 0].float().view(hkv, g, d), k[0].float()) * sc
        mass = logits.softmax(-1).sum(1)  # [Hkv, n]
        ks = top_p_counts(mass, p, k_min)
        sels = [Selection(_rows_top(mass[h:h + 1], ks[h:h + 1]).view(1, 1, 1, -1), ks[h:h + 1].view(1, 1).int(),
                          torch.zeros(1, dtype=torch.int64, device=q.device), tile, True) for h in range(hkv)]
        return sels, int(ks.sum())
    t_begin, t_end = p0 // tile, (n - 1) // tile + 1
    per_head = [[] for _ in range(hkv)]
    counts = [[] for _ in range(hkv)]
    kept = 0
    for ta, pooled in pooled_tile_scores(q[0], k[0], p0, tile, sc):  # pooled [Hkv, tiles, kend]
        for u in range(pooled.shape[1]):
            n_before = (ta + u) * tile
            for h in range(hkv):
                if n_before == 0:
                    per_head[h].append(torch.zeros(0, dtype=torch.int32, device=q.device))
                    counts[h].append(0)
                    continue
                row = pooled[h, u, :n_before]
                kk = top_p_counts(row, p, k_min)
                per_head[h].append(_rows_top(row[None], kk.view(1))[0])
                counts[h].append(int(kk))
                kept += int(kk)
    u_n = t_end - t_begin
    width = max([1] + [int(x.numel()) for rows in per_head for x in rows])
    sels = []
    for h in range(hkv):
        idx = torch.full((1, 1, u_n, width), -1, dtype=torch.int32, device=q.device)
        for u, x in enumerate(per_head[h]):
            idx[0, 0, u, : x.numel()] = x
        cnt = torch.tensor([counts[h]], dtype=torch.int32, device=q.device)
        sels.append(Selection(idx, cnt, torch.full((1,), t_begin, dtype=torch.int64, device=q.device), tile, False))
    return sels, kept


def uniform_keys(n: int, qlen: int, hkv: int, rho: float, k_min: int, tile: int) -> int:
    """The keys uniform top-k at rho keeps on the same step: k(n) per head for a decode step, k(t T) per head
    and tile for a prefill chunk of qlen queries ending at n."""
    if qlen == 1:
        return hkv * budget(n, rho, k_min)
    p0 = n - qlen
    return hkv * sum(budget(t * tile, rho, k_min) for t in range(p0 // tile, (n - 1) // tile + 1))


class TopPStrategy(Strategy):
    """Per-layer top-p per KV head (module docstring, step 3); layer 0 and steps of at most k_min keys dense."""

    def __init__(self, name: str, p: float, rho: float, k_min: int = 128, tile: int = 32, backend: str = "auto",
                 sparse_prefill: bool = True):
        super().__init__(backend, sparse_prefill=sparse_prefill)
        check_budget(rho, k_min)
        self.name, self.p, self.rho, self.k_min, self.tile = name, check_p(p), rho, k_min, tile
        self.kept = self.uniform = 0

    def key_share(self) -> float:
        """Keys kept so far over the keys uniform top-k at rho would have kept on the same steps."""
        return self.kept / self.uniform if self.uniform else float("nan")

    def attend(self, layer, q, k, v, kv_start, scale):
        kw = dict(kv_start=kv_start, scale=scale, backend=self.backend)
        if layer == 0 or k.shape[2] <= self.k_min or self.dense_step(q):
            return ops.dense(q, k, v, **kw)
        if kv_start is not None and int(kv_start.max()) != 0:
            raise ValueError("kv_start: top-p selection runs unpadded sequences only")
        sels, kept = top_p_selections(q, k, self.p, self.k_min, self.tile, scale)
        self.kept += kept
        self.uniform += uniform_keys(k.shape[2], q.shape[2], k.shape[1], self.rho, self.k_min, self.tile)
        g = q.shape[1] // k.shape[1]
        outs = [ops.reuse(q[:, h * g:(h + 1) * g], k[:, h:h + 1], v[:, h:h + 1], sel, None, **kw)
                for h, sel in enumerate(sels)]
        return torch.cat(outs, dim=1)


class _KeyRecorder(Strategy):
    """Dense attention in every layer; for the last tile of each layer but 0, the keys top-p keeps at each p of
    the grid and the k(n) of uniform top-k, summed over KV heads (module docstring, step 1)."""

    name = "top-p-keys"

    def __init__(self, ps, rho: float, k_min: int, tile: int, backend: str = "auto"):
        super().__init__(backend)
        self.ps, self.rho, self.k_min, self.tile = tuple(ps), rho, k_min, tile
        self.kept = np.zeros(len(self.ps))
        self.uniform = 0

    def attend(self, layer, q, k, v, kv_start, scale):
        if q.shape[0] != 1 or (kv_start is not None and int(kv_start.max()) != 0):
            raise ValueError("keys_at_p: expected unpadded prompts of batch 1")
        n, qlen = k.shape[2], q.shape[2]
        first = ((n - 1) // self.tile) * self.tile  # the last tile's first position
        if layer > 0 and first > n - qlen and first > self.k_min:
            hq, hkv = q.shape[1], k.shape[1]
            qt = q[0, :, first - (n - qlen):].float()
            sc = q.shape[-1] ** -0.5 if scale is None else scale
            logits = torch.einsum("hqd,hnd->hqn", qt, k[0, :, :first].float().repeat_interleave(hq // hkv, 0)) * sc
            mass = logits.softmax(-1).reshape(hkv, -1, first).sum(1)  # [Hkv, first]
            for j, p in enumerate(self.ps):
                self.kept[j] += float(top_p_counts(mass, p, self.k_min).sum())
            self.uniform += hkv * budget(first, self.rho, self.k_min)
        return ops.dense(q, k, v, kv_start=kv_start, scale=scale, backend=self.backend)


def keys_at_p(model, prompts: list[list[int]], ps=GRID, rho: float = 0.1, k_min: int = 128, tile: int = 32,
              progress: bool = True) -> np.ndarray:
    """[len(ps)]: keys top-p keeps over the keys uniform top-k keeps, on the prompts' last tiles (step 1)."""
    import kascade
    from tqdm.auto import tqdm

    rec = _KeyRecorder(ps, rho, k_min, tile)
    device = next(model.parameters()).device
    with kascade.enable(model, strategy=rec), torch.no_grad():
        for ids in tqdm(prompts, desc="keys at p", unit="prompt", disable=not progress):
            model(torch.tensor([ids], device=device))
    if rec.uniform == 0:
        raise ValueError("prompts: too short for a last tile beyond k_min keys")
    return rec.kept / rec.uniform


def calibrate_p(ps, shares) -> float:
    """The p at which top-p keeps as many keys as uniform top-k (share 1), linear between grid points; the
    grid's end when the share never crosses 1."""
    ps, shares = list(ps), list(shares)
    if any(b < a for a, b in zip(shares, shares[1:])):
        raise ValueError(f"shares: expected non-decreasing in p, got {shares}")
    if shares[0] >= 1:
        return ps[0]
    for (p0, s0), (p1, s1) in zip(zip(ps, shares), zip(ps[1:], shares[1:])):
        if s1 >= 1:
            return p0 + (p1 - p0) * (1 - s0) / (s1 - s0)
    return ps[-1]


def load(path) -> float:
    """The calibrated p of a file written by this module's command."""
    return float(json.loads(Path(path).read_text())["p"])


def main(argv=None) -> int:
    args = budget_parser(__doc__.split("\n")[0], "the JSON to write (p and the shares on the grid)",
                         "the uniform budget whose total keys are matched").parse_args(argv)
    model, prompts, formats = model_and_prompts(args)
    shares = keys_at_p(model, prompts, GRID, args.rho, args.k_min)
    out = {"p": calibrate_p(GRID, shares), "grid": list(GRID), "key_shares": [float(s) for s in shares],
           "rho": args.rho, "k_min": args.k_min, "prompts": args.prompts, "length": args.length,
           "formats": formats, "first_seed": args.first_seed}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("p", "key_shares")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
