"""Calibration statistics (SPEC §Calibration), streamed layer by layer during dense forwards.

For each prompt (batch 1), each layer b, KV head hb and query tile t, the pooled post-softmax scores
s^b_{hb,t} over the keys before the tile are computed in chunks of tiles (never a full attention
matrix) and reduced at once to:
    I^b_{hb,t}   the exact top-`topk` keys (kept: [Hkv, tiles, topk] per layer, for later layers)
    cov[a, b, ha, hb, t] = (s^b_{hb,t}[I^a_{ha,t}] + diag) / (s^b_{hb,t}[I^b_{hb,t}] + diag)
for every earlier layer a, where diag is the mass on the tile's own keys. The minimum over the
tiles of a prompt is kept and averaged over prompts: sim[a, b, ha, hb]. Tiles with no more than
`topk` prior keys are skipped (their coverage is 1 by construction). With `last_tiles` only a prompt's last
tiles count (those of a question and its answer: the queries that retrieve, as decode steps do).

Layer importance w_b = 1 - cos(x_b, x_b + attn_out_b) is measured by hooks on each decoder layer:
x_b is the residual stream entering layer b, attn_out_b the attention block's output.
"""

from __future__ import annotations

import numpy as np
import torch

from kascade import ops, reference
from kascade.strategy import Strategy


class CalibrationStrategy(Strategy):
    """Dense attention in every layer, recording the statistics above."""

    name = "calibration"

    def __init__(self, num_layers: int, num_kv_heads: int, topk: int = 64, tile: int = 32, backend: str = "auto",
                 on_layer=None, last_tiles: int | None = None):
        super().__init__(backend)
        if last_tiles is not None and (isinstance(last_tiles, bool) or not isinstance(last_tiles, int)
                                       or last_tiles < 1):
            raise ValueError(f"last_tiles: expected None or an integer >= 1, got {last_tiles!r}")
        self.last_tiles = last_tiles
        self.L, self.H, self.topk, self.tile = num_layers, num_kv_heads, topk, tile
        self.per_prompt: list[np.ndarray] = []  # one [L, L, H, H] array of worst-tile coverages per prompt
        self.on_layer = on_layer  # called with the layer index after each layer (progress)

    def begin_forward(self) -> None:
        super().begin_forward()
        self._idx: dict[int, torch.Tensor] = {}  # layer -> [H, tiles, topk] int64 (tiles with n > topk)
        self._min_cov = torch.ones(self.L, self.L, self.H, self.H, dtype=torch.float64)

    def attend(self, layer, q, k, v, kv_start, scale):
        if q.shape[0] != 1 or kv_start is not None or q.shape[2] != k.shape[2]:
            raise ValueError("calibration: expected one unpadded prompt per forward without a cache "
                             f"(got q {tuple(q.shape)}, k {tuple(k.shape)})")
        out = ops.dense(q, k, v, scale=scale, backend=self.backend)
        sc = q.shape[-1] ** -0.5 if scale is None else scale
        self._record(layer, q[0], k[0], sc)
        if self.on_layer is not None:
            self.on_layer(layer)
        if layer == self.L - 1:
            self.per_prompt.append(self._min_cov.cpu().numpy())
        return out

    def _record(self, layer, q, k, scale):
        first = self.topk // self.tile + 1  # the first tile with more than topk prior keys
        if self.last_tiles is not None:  # only the prompt's last tiles count
            first = max(first, -(-q.shape[1] // self.tile) - self.last_tiles)
        own_idx = []
        for ta, pooled in reference.pooled_tile_scores(q, k, 0, self.tile, scale):
            for u in range(pooled.shape[1]):
                t = ta + u
                if t < first:
                    continue
                n = t * self.tile
                s = pooled[:, u, :n].double()  # [H, n]
                diag = pooled[:, u, n:].double().sum(-1)  # [H]
                idx = torch.topk(s, self.topk, dim=-1).indices  # [H, topk]
                own = s.gather(1, idx).sum(-1) + diag  # [H]
                own_idx.append(idx)
                if layer == 0:
                    continue
                prev = torch.stack([self._idx[a][:, t - first] for a in range(layer)])  # [A, Ha, topk]
                got = s[:, prev.reshape(-1)].view(self.H, layer, self.H, self.topk).sum(-1)  # [Hb, A, Ha]
                cov = (got + diag[:, None, None]) / own[:, None, None]
                cov = cov.permute(1, 2, 0)  # [A, Ha, Hb]
                if self._min_cov.device != cov.device:  # kept where the attention runs (no sync per tile)
                    self._min_cov = self._min_cov.to(cov.device)
                self._min_cov[:layer, layer] = torch.minimum(self._min_cov[:layer, layer], cov)
        if own_idx:
            self._idx[layer] = torch.stack(own_idx, dim=1)
        else:
            self._idx[layer] = torch.zeros(self.H, 0, self.topk, dtype=torch.int64)

    @property
    def num_prompts(self) -> int:
        return len(self.per_prompt)

    def similarity(self, prompts=None) -> np.ndarray:
        """sim[a, b, ha, hb], averaged over the prompts seen, or over those of the indices `prompts`
        (1 on and below the diagonal a >= b)."""
        chosen = self.per_prompt if prompts is None else [self.per_prompt[i] for i in prompts]
        if not chosen:
            raise ValueError("calibration: no prompt was processed")
        return np.mean(chosen, axis=0)


class ImportanceHooks:
    """w_b = 1 - cos(x_b, x_b + attn_out_b), averaged over tokens, then over prompts (forward calls)."""

    def __init__(self, decoder_layers):
        self.calls: list[list[float]] = [[] for _ in decoder_layers]  # per layer, one value per forward call
        self._x = {}
        self._handles = []
        for i, layer in enumerate(decoder_layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(layer.self_attn.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            self._x[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _post(self, i):
        def hook(module, args, output):
            attn = output[0] if isinstance(output, tuple) else output
            x = self._x.pop(i).float()
            cos = torch.nn.functional.cosine_similarity(x, x + attn.float(), dim=-1)  # [B, T]
            self.calls[i].append(float((1 - cos).mean()))
        return hook

    def importance(self, calls=None) -> np.ndarray:
        """[L] importance averaged over every forward call, or over the calls of the indices `calls`."""
        pick = (lambda v: v) if calls is None else (lambda v: [v[j] for j in calls])
        return np.array([float(np.mean(pick(v))) if pick(v) else 0.0 for v in self.calls])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
