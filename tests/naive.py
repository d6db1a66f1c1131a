"""A deliberately naive Kascade: one query, one head, one key at a time, straight from SPEC.md.

Slow and obviously right; the reference is checked against it on random shapes.
"""

from __future__ import annotations

import math

import torch

from kascade.budget import budget


def _softmax_row(q_vec, keys, scale):
    s = torch.stack([torch.dot(q_vec, kk) for kk in keys]) * scale
    return torch.softmax(s.double(), dim=0)


def naive_selection(q, k, kv_start, rho, k_min, tile, scale=None):
    """{(b, h, i): set of absolute key positions} for every valid query row i (Q == 1: decode)."""
    B, Hq, Q, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = scale or 1 / math.sqrt(D)
    out = {}
    for b in range(B):
        s0 = int(kv_start[b])
        for i in range(Q):
            p = N - Q + i - s0
            if p < 0:
                continue
            for h in range(Hkv):
                if Q == 1:
                    n, rows = p + 1, [i]
                else:
                    t = p // tile
                    n = t * tile
                    rows = [r for r in range(Q) if (N - Q + r - s0) >= 0 and (N - Q + r - s0) // tile == t]
                pooled = torch.zeros(n, dtype=torch.float64)
                for r in rows:
                    pr = N - Q + r - s0
                    for g in range(G):
                        probs = _softmax_row(q[b, h * G + g, r].double(), k[b, h, s0 : s0 + pr + 1].double(), scale)
                        pooled += probs[:n]
                kk = budget(n, rho, k_min)
                chosen = torch.topk(pooled, kk).indices.tolist() if kk else []
                out[(b, h, i)] = {s0 + c for c in chosen}
    return out


def naive_sparse(q, k, v, sets, head_map, kv_start, tile, scale=None):
    """Output [B, Hq, Q, Dv] float64: each query attends to its mapped set (+ its diagonal tile in prefill)."""
    B, Hq, Q, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = scale or 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, Q, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        s0 = int(kv_start[b])
        for i in range(Q):
            p = N - Q + i - s0
            if p < 0:
                continue
            for j in range(Hq):
                h = j // G
                keys = set(sets[(b, int(head_map[h]), i)])
                if Q > 1:
                    t = p // tile
                    keys |= set(range(s0 + t * tile, s0 + p + 1))
                keys = sorted(keys)
                probs = _softmax_row(q[b, j, i].double(), k[b, h, keys].double(), scale)
                out[b, j, i] = probs @ v[b, h, keys].double()
    return out
