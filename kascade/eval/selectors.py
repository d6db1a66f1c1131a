"""Key selections of the baseline strategies, as `kascade.reference.Selection` objects.

Every function returns a Selection laid out exactly like `reference.select` (absolute cache positions,
ascending, -1 padding; one row per KV head and query tile; tiles counted from the sequence start), so
the attention itself is always `ops.reuse` (the reference or the GPU kernel). Budgets are those of
Kascade: a decode query that sees n keys gets k(n) keys; prefill tile t gets k(tT) keys before the
tile, and its diagonal block is attended on top by `ops.reuse`.

    pooled_selection(q, k, ..., pool="sum")  one set per tile shared by ALL KV heads: post-softmax
                                             probabilities pooled over every query head (sum), or
                                             the per-head maximum (pool="max", OmniKV-style)
    window_selection(q, k, ..., sinks=4)     StreamingLLM: the first `sinks` keys and the most recent ones
    page_selection(q, k, ..., page=16)       Quest: pages ranked by an upper bound of q.k from per-page
                                             per-dimension key min/max, pooled over the KV group

Shapes as in kascade.reference: q [B, Hq, Q, D], k [B, Hkv, N, D], kv_start [B] or None.
"""

from __future__ import annotations

import torch

from kascade.budget import budget
from kascade.checks import check_attention_inputs, resolve_kv_start
from kascade.reference import DEFAULT_CHUNK_BYTES, Selection, pooled_tile_scores


def _sequences(q, k, kv_start):
    """(b, s, p0, i0): first key, position of the first valid query, first valid query row."""
    qlen, n_cache = q.shape[2], k.shape[2]
    for b in range(q.shape[0]):
        s = int(kv_start[b])
        qv = min(qlen, n_cache - s)
        yield b, s, n_cache - s - qv, qlen - qv


def _topk_sorted(scores: torch.Tensor, kk: int) -> torch.Tensor:
    """Top-k positions of each row of scores [H, n], ascending -> [H, kk] int64."""
    if kk == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.int64)
    if kk >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
    return torch.topk(scores, kk, dim=-1, sorted=False).indices.sort(dim=-1).values


def _pack(per_seq, first_tiles, q, hkv: int, tile: int, decode: bool) -> Selection:
    """Per sequence, a list over tiles of [H', k_t] absolute indices (H' = 1 broadcasts to all KV heads)."""
    bsz = q.shape[0]
    u_max = max(1, max(len(t) for t in per_seq))
    k_max = max([t.shape[1] for ts in per_seq for t in ts] + [1])
    indices = torch.full((bsz, hkv, u_max, k_max), -1, dtype=torch.int32, device=q.device)
    counts = torch.zeros(bsz, u_max, dtype=torch.int32, device=q.device)
    for b, ts in enumerate(per_seq):
        for u, t in enumerate(ts):
            indices[b, :, u, : t.shape[1]] = t.to(torch.int32)  # [H', k] broadcasts over the KV heads
            counts[b, u] = t.shape[1]
    first_tile = torch.tensor(first_tiles, dtype=torch.int64, device=q.device)
    return Selection(indices, counts, first_tile, tile, decode)


def _build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores) -> Selection:
    """Top-k of per-key scores. decode_scores(qb, kb) -> [H', n]; prefill_scores(qb, kb, p0) yields
    (first tile, [H', tiles, kend]) chunks like reference.pooled_tile_scores."""
    check_attention_inputs(q, k, None)
    kv_start = resolve_kv_start(kv_start, q, k)
    decode = q.shape[2] == 1
    per_seq, first_tiles = [], []
    for b, s, p0, i0 in _sequences(q, k, kv_start):
        qb, kb = q[b, :, i0:], k[b, :, s:]
        sets = []
        if qb.shape[1] and decode:
            sc = decode_scores(qb, kb)
            sets = [_topk_sorted(sc, budget(sc.shape[-1], rho, k_min))]
        elif qb.shape[1]:
            for ta, sc in prefill_scores(qb, kb, p0):
                # one top-k per chunk of tiles at the largest budget; the best k_t of a sorted top-k are
                # the top k_t, so each tile keeps a prefix of its row
                n_before = [(ta + u) * tile for u in range(sc.shape[1])]
                ks = [budget(n, rho, k_min) for n in n_before]
                keys = torch.arange(sc.shape[-1], device=sc.device)
                masked = sc.masked_fill(keys[None, None, :] >= torch.tensor(n_before, device=sc.device)[None, :, None],
                                        float("-inf"))
                top = torch.topk(masked, max(ks), dim=-1, sorted=True).indices if max(ks) else None
                for u, kk in enumerate(ks):
                    sets.append(top[:, u, :kk].sort(dim=-1).values if kk else sc.new_zeros(sc.shape[0], 0,
                                                                                         dtype=torch.int64))
        per_seq.append([t + s for t in sets])
        first_tiles.append(0 if decode else p0 // tile)
    return _pack(per_seq, first_tiles, q, k.shape[1], tile, decode)


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# one set for all heads (Kascade head-agnostic ablation, OmniKV)
# ----------------------------------------------------------------------------------------------


def pooled_selection(q, k, rho, k_min, tile, kv_start=None, scale=None, pool: str = "sum",
                     max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Selection:
    """One key set per tile (or decode step) shared by every KV head.

    pool="sum": post-softmax probabilities summed over all Hq query heads (and the tile's queries).
    pool="max": per query head, probabilities summed over the tile's queries; then the maximum over heads.
    """
    if pool not in ("sum", "max"):
        raise ValueError(f"pool: expected 'sum' or 'max', got {pool!r}")
    sc = _scale(q, scale)

    def decode_scores(qb, kb):
        hq, _, d = qb.shape
        hkv = kb.shape[0]
        s = torch.einsum("hgd,hnd->hgn", qb.float().view(hkv, hq // hkv, d), kb.float()) * sc
        p = torch.softmax(s, dim=-1).reshape(hq, -1)
        return p.sum(0, keepdim=True) if pool == "sum" else p.amax(0, keepdim=True)

    def prefill_scores(qb, kb, p0):
        if pool == "sum":
            for ta, pooled in pooled_tile_scores(qb, kb, p0, tile, sc, max_chunk_bytes):
                yield ta, pooled.sum(0, keepdim=True)
        else:  # one "group" per query head: every query head scores with its own KV head's keys
            kx = kb.repeat_interleave(qb.shape[0] // kb.shape[0], dim=0)
            for ta, pooled in pooled_tile_scores(qb, kx, p0, tile, sc, max_chunk_bytes):
                yield ta, pooled.amax(0, keepdim=True)

    return _build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores)


# ----------------------------------------------------------------------------------------------
# StreamingLLM
# ----------------------------------------------------------------------------------------------


def _window(n: int, kk: int, sinks: int, device) -> torch.Tensor:
    """[1, kk]: keys 0..sinks-1 and the kk - sinks most recent of n keys."""
    s = min(sinks, kk)
    return torch.cat([torch.arange(s, device=device), torch.arange(n - (kk - s), n, device=device)])[None]


def window_selection(q, k, rho, k_min, tile, kv_start=None, sinks: int = 4) -> Selection:
    """Attention sinks plus a recent window, k(n) keys in all (Xiao et al., 2024, StreamingLLM)."""
    check_attention_inputs(q, k, None)
    kv_start = resolve_kv_start(kv_start, q, k)
    decode = q.shape[2] == 1
    per_seq, first_tiles = [], []
    for b, s, p0, i0 in _sequences(q, k, kv_start):
        qv = q.shape[2] - i0
        sets = []
        if qv and decode:
            n = k.shape[2] - s
            sets = [_window(n, budget(n, rho, k_min), sinks, q.device)]
        elif qv:
            for t in range(p0 // tile, (p0 + qv - 1) // tile + 1):
                n_before = t * tile
                sets.append(_window(n_before, budget(n_before, rho, k_min), sinks, q.device))
        per_seq.append([x + s for x in sets])
        first_tiles.append(0 if decode else p0 // tile)
    return _pack(per_seq, first_tiles, q, k.shape[1], tile, decode)


# ----------------------------------------------------------------------------------------------
# Quest
# ----------------------------------------------------------------------------------------------


def page_bounds(kb: torch.Tensor, page: int):
    """Per-page, per-dimension min and max of the keys kb [Hkv, n, D] -> two [Hkv, P, D] fp32 tensors
    (the last page may be partial; its bounds use the keys it has)."""
    hkv, n, d = kb.shape
    pages = (n + page - 1) // page
    pad = pages * page - n
    kf = kb.float()
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(hkv, pages, page, d).amin(2)
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(hkv, pages, page, d).amax(2)
    return lo, hi


def _upper_bound(qg, lo, hi):
    """max over keys of the page of q.k, bounded per dimension: qg [Hkv, G, R, D] -> [Hkv, G, R, P]."""
    return (torch.einsum("hgrd,hpd->hgrp", qg.clamp(min=0), hi)
            + torch.einsum("hgrd,hpd->hgrp", qg.clamp(max=0), lo))


def _page_rank_scores(page_scores: torch.Tensor, n: int, page: int) -> torch.Tensor:
    """Per-key scores [..., n] that order keys by the rank of their page, then by position inside it,
    so that a top-k takes whole pages best first (and the first keys of the last page it reaches)."""
    ranks = page_scores.argsort(dim=-1).argsort(dim=-1).float()  # 0 = worst page
    pos = torch.arange(n, device=page_scores.device)
    return ranks[..., pos // page] * page + (page - 1 - pos % page).float()


def page_selection(q, k, rho, k_min, tile, kv_start=None, scale=None, page: int = 16,
                   max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Selection:
    """Quest (Tang et al., 2024) at KV-head granularity and Kascade's token budget.

    Keys are grouped in pages of `page`; a page's score for a query head is the upper bound
    sum_d max(q_d min_d, q_d max_d) of q.k over its keys. As in Kascade, the bounds are turned into
    post-softmax weights over the pages a query may see (pages that start before its tile; all pages in
    decode) and summed over the G query heads of the KV group and the tile's queries. Pages are taken
    best first until k(n) keys are chosen (the last page reached may be taken in part).
    """
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page: expected an integer >= 1, got {page!r}")
    sc = _scale(q, scale)

    def decode_scores(qb, kb):
        hq, _, d = qb.shape
        hkv, n, _ = kb.shape
        lo, hi = page_bounds(kb, page)
        ub = _upper_bound(qb.float().view(hkv, hq // hkv, 1, d), lo, hi) * sc  # [Hkv, G, 1, P]
        w = torch.softmax(ub, dim=-1).sum(dim=(1, 2))  # [Hkv, P]
        return _page_rank_scores(w, n, page)

    def prefill_scores(qb, kb, p0):
        hq, qv, d = qb.shape
        hkv, n, _ = kb.shape
        g = hq // hkv
        lo, hi = page_bounds(kb, page)
        pages = lo.shape[1]
        rows = max(tile, max_chunk_bytes // max(1, 4 * hq * max(pages, n // 8)))
        tiles_per_chunk = max(1, rows // tile)
        t_begin, t_end = p0 // tile, (p0 + qv - 1) // tile + 1
        page_start = torch.arange(pages, device=qb.device) * page
        for ta in range(t_begin, t_end, tiles_per_chunk):
            tb = min(t_end, ta + tiles_per_chunk)
            qs, qe = max(ta * tile, p0), min(tb * tile, n)
            pos = torch.arange(qs, qe, device=qb.device)
            qg = qb[:, qs - p0 : qe - p0].float().view(hkv, g, qe - qs, d)
            ub = _upper_bound(qg, lo, hi) * sc  # [Hkv, G, R, P]
            tile_start = (pos // tile) * tile
            visible = page_start[None, :] < tile_start[:, None]  # [R, P]
            ub.masked_fill_(~visible, float("-inf"))
            w = torch.softmax(ub, dim=-1).nan_to_num_(0.0).sum(1)  # [Hkv, R, P]; rows of tile 0 see nothing
            pooled = torch.zeros(hkv, tb - ta, pages, dtype=torch.float32, device=qb.device)
            pooled.index_add_(1, pos // tile - ta, w)
            yield ta, _page_rank_scores(pooled, qe, page)

    return _build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores)
