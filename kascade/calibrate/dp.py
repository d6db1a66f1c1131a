"""Anchor selection on a layer-score matrix: an exact dynamic programme and its brute-force check.

score [L, L] with score[a, b] (a <= b) the value of layer b reusing anchor a's indices. Anchors
0 = a_0 < a_1 < ... < a_{K-1} split the layers into segments [a_i, a_{i+1}); the value of a choice is
sum_i sum_{b in segment i} score[a_i, b]. Layer 0 is always an anchor.
"""

from __future__ import annotations

import itertools

import numpy as np


def _segment_sums(score: np.ndarray) -> np.ndarray:
    """seg[a, e] = sum_{b=a}^{e-1} score[a, b] for 0 <= a < e <= L (prefix sums along each row)."""
    L = score.shape[0]
    seg = np.zeros((L, L + 1))
    for a in range(L):
        seg[a, a + 1:] = np.cumsum(score[a, a:])
    return seg


def _check(score, num_anchors):
    score = np.asarray(score, dtype=np.float64)
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"score: expected a square [L, L] matrix, got shape {score.shape}")
    L = score.shape[0]
    if not 1 <= num_anchors <= L:
        raise ValueError(f"num_anchors: expected 1..{L} (the number of layers), got {num_anchors}")
    return score, L


def best_anchors(score, num_anchors: int) -> tuple[list[int], float]:
    """Exact optimum in O(K L^2): returns (anchors, value)."""
    score, L = _check(score, num_anchors)
    seg = _segment_sums(score)
    # best[c][i]: the best value of layers i..L-1 given an anchor at i and c more anchors after it
    best = np.full((num_anchors, L), -np.inf)
    choice = np.full((num_anchors, L), -1, dtype=np.int64)
    best[0] = [seg[i, L] for i in range(L)]
    for c in range(1, num_anchors):
        for i in range(L - c):
            js = np.arange(i + 1, L - c + 1)  # next anchor, leaving room for c - 1 more after it
            vals = seg[i, js] + best[c - 1, js]
            j = int(np.argmax(vals))
            best[c, i], choice[c, i] = vals[j], js[j]
    anchors, i = [0], 0
    for c in range(num_anchors - 1, 0, -1):
        i = int(choice[c, i])
        anchors.append(i)
    return anchors, float(best[num_anchors - 1, 0])


def plan_value(score, anchors) -> float:
    score = np.asarray(score, dtype=np.float64)
    bounds = list(anchors) + [score.shape[0]]
    return float(sum(score[a, a:e].sum() for a, e in zip(bounds, bounds[1:])))


def brute_force_anchors(score, num_anchors: int) -> tuple[list[int], float]:
    """Every subset containing layer 0 (for checking the DP on small L)."""
    score, L = _check(score, num_anchors)
    best = (None, -np.inf)
    for rest in itertools.combinations(range(1, L), num_anchors - 1):
        v = plan_value(score, (0,) + rest)
        if v > best[1]:
            best = ([0, *rest], v)
    return best[0], float(best[1])


def values_by_count(score, max_anchors: int | None = None) -> list[float]:
    """The optimal value for K = 1..max_anchors (the anchor-selection score vs K curve)."""
    L = np.asarray(score).shape[0]
    return [best_anchors(score, k)[1] for k in range(1, (max_anchors or L) + 1)]
