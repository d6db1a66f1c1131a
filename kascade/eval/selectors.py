"""Key selections of the baseline strategies, as `kascade.reference.Selection` objects.

Every function returns a Selection laid out exactly like `reference.select` (absolute cache positions,
ascending, -1 padding; one row per KV head and query tile; tiles counted from the sequence start), so
the attention itself is always `ops.reuse` (the reference or the GPU kernel). Budgets are those of
Kascade: a decode query that sees n keys gets k(n) keys; prefill tile t gets k(tT) keys before the
tile, and its diagonal block is attended on top by `ops.reuse`.

    pooled_selection(q, k, ..., pool="sum")  one set per tile shared by ALL KV heads: post-softmax
                                             probabilities pooled over every query head (sum), or
                                             the per-head maximum (pool="max", OmniKV-style)
    head_selection(q, k, ..., sinks, window) per KV head, as reference.select, with the first `sinks` keys and
                                             the `window` keys just before the query (or tile) always kept
    window_selection(q, k, ..., sinks=4)     StreamingLLM: the first `sinks` keys and the most recent ones
    page_selection(q, k, ..., page=16)       Quest: pages ranked by an upper bound of q.k from per-page
                                             per-dimension key min/max, pooled over the KV group
    shared_budget_selections(q, k, ...)      per KV head, Kascade's pooled scores, but the Hkv k(n) keys of a
                                             tile (or decode step) go to the largest scores of all its KV heads
                                             together: a list of Hkv one-head Selections of their own counts

Decode steps only (one query per sequence), for the decode-time baselines as their authors run them:

    query_head_pages(q, k, ..., page=16)     Quest: per QUERY head, pages ranked by the upper bound itself
    query_head_topk(q, k, ...)               TidalDecode: per QUERY head, the top keys by q.k
    max_logit_selection(q, k, ..., keep_from) OmniKV: one set for all heads, the top keys by the maximum
                                             over query heads of q.k; keys from `keep_from` on always kept

The per-query-head functions return a Selection of Hq "heads" [B, Hq, 1, Kmax] (row j: query head j, of
KV head j // G); `kascade.eval.strategies` attends to it with one ops.reuse per position in the group.

Shapes as in kascade.reference: q [B, Hq, Q, D], k [B, Hkv, N, D], kv_start [B] or None.

Vectorised: sequences that share a layout (every sequence when kv_start is None) are scored together,
their heads folded into one batch dimension (at most `MAX_FOLD` sequences at once; prefill temporaries
are then about that many times `max_chunk_bytes`), and each chunk of query tiles takes one top-k at the
chunk's largest budget; the slots past a tile's own budget are masked, then each row is sorted. Without
kv_start nothing here waits for the device (no host sync); with kv_start the start offsets are read once
per call. The result is the one of the per-sequence, per-tile loops this replaces
(tests/test_eval_batch.py keeps that version as its oracle).
"""

from __future__ import annotations

import torch

from kascade.budget import budget, budget_tensor
from kascade.checks import check_attention_inputs, resolve_kv_start
from kascade.reference import DEFAULT_CHUNK_BYTES, Selection, pooled_tile_scores

MAX_FOLD = 16  # sequences scored together (their heads folded into one batch dimension)


def _groups(q, k, kv_start):
    """[(rows, s, p0, i0)]: a slice of sequences sharing their first key s, the position p0 of their first
    valid query and its row i0. Without kv_start, every sequence (in slices of MAX_FOLD), no host sync."""
    bsz, qlen, n_cache = q.shape[0], q.shape[2], k.shape[2]
    if kv_start is None:
        starts = [0] * bsz
    else:
        starts = resolve_kv_start(kv_start, q, k).tolist()  # one host sync
    groups, b = [], 0
    while b < bsz:
        e = b + 1
        while e < bsz and e - b < MAX_FOLD and starts[e] == starts[b]:
            e += 1
        s = starts[b]
        qv = min(qlen, n_cache - s)
        groups.append((slice(b, e), s, n_cache - s - qv, qlen - qv))
        b = e
    return groups


def _extent(q, k, group, decode, rho, k_min, tile) -> tuple[int, int]:
    """(local tiles, largest set) of a group."""
    _, s, p0, i0 = group
    qv = q.shape[2] - i0
    if decode:
        return 1, budget(k.shape[2] - s, rho, k_min)
    t_begin, t_end = p0 // tile, (p0 + qv - 1) // tile + 1
    return t_end - t_begin, budget((t_end - 1) * tile, rho, k_min)


def _alloc(q, k, groups, decode, rho, k_min, tile, heads=None):
    """indices [B, heads (default Hkv), U, Kmax] (-1), counts [B, U] (0), first_tile [B]."""
    ext = [_extent(q, k, g, decode, rho, k_min, tile) for g in groups]
    u_max = max([1] + [u for u, _ in ext])
    k_max = max([1] + [kk for _, kk in ext])
    bsz, dev = q.shape[0], q.device
    heads = k.shape[1] if heads is None else heads
    indices = torch.full((bsz, heads, u_max, k_max), -1, dtype=torch.int32, device=dev)
    counts = torch.zeros(bsz, u_max, dtype=torch.int32, device=dev)
    firsts = [0 if decode else p0 // tile for _, _, p0, _ in groups]
    if len(set(firsts)) <= 1:
        first_tile = torch.full((bsz,), firsts[0] if firsts else 0, dtype=torch.int64, device=dev)
    else:  # several layouts: kv_start was read on the host already
        first_tile = torch.tensor([f for (r, _, _, _), f in zip(groups, firsts) for _ in range(r.stop - r.start)],
                                  dtype=torch.int64, device=dev)
    return indices, counts, first_tile


def _topk_sorted(scores: torch.Tensor, kk: int) -> torch.Tensor:
    """Top-k positions of each row of scores [..., n], ascending -> [..., kk] int64."""
    if kk == 0:
        return scores.new_zeros(*scores.shape[:-1], 0, dtype=torch.int64)
    if kk >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device).expand(*scores.shape[:-1], -1)
    return torch.topk(scores, kk, dim=-1, sorted=False).indices.sort(dim=-1).values


def _tile_sets(sc: torch.Tensor, ta: int, tile: int, rho: float, k_min: int):
    """Per-tile top-k of a chunk of tile scores sc [..., U, kend] (tile ta + u sees keys < (ta + u) T).

    One top-k at the chunk's largest budget: the best k_t of a sorted top-k are the top k_t, so tile u keeps
    the first k_t slots of its row; the others are masked and the row sorted. Returns (sets [..., U, kc]
    ascending with -1 after the first k_t, k_t [U] int64 on the device), or (None, k_t) when every k_t is 0.
    """
    u_n, kend = sc.shape[-2], sc.shape[-1]
    kc = max(budget((ta + u) * tile, rho, k_min) for u in range(u_n))  # host ints: no sync
    n_before = torch.arange(ta, ta + u_n, device=sc.device) * tile
    ks = budget_tensor(n_before, rho, k_min)
    if kc == 0:
        return None, ks
    keys = torch.arange(kend, device=sc.device)
    masked = sc.masked_fill(keys >= n_before[:, None], float("-inf"))
    top = torch.topk(masked, kc, dim=-1, sorted=True).indices
    valid = torch.arange(kc, device=sc.device) < ks[:, None]  # [U, kc]
    sets = top.masked_fill(~valid, kend).sort(dim=-1).values  # the first k_t slots are the valid ones
    return sets.masked_fill(~valid, -1), ks


def _build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores, heads=None) -> Selection:
    """Top-k of per-key scores. decode_scores(qb [b, Hq, 1, D], kb [b, Hkv, n, D]) -> [b, H', n];
    prefill_scores(qb, kb, p0) yields (first tile, [b, H', tiles, kend]) chunks like
    reference.pooled_tile_scores. H' = 1 broadcasts one set to every head of the Selection, which has
    `heads` rows (default Hkv)."""
    check_attention_inputs(q, k, None)
    decode = q.shape[2] == 1
    groups = _groups(q, k, kv_start)
    indices, counts, first_tile = _alloc(q, k, groups, decode, rho, k_min, tile, heads)
    for rows, s, p0, i0 in groups:
        qb, kb = q[rows, :, i0:], k[rows, :, s:]
        if decode:
            kk = budget(kb.shape[2], rho, k_min)
            indices[rows, :, 0, :kk] = (_topk_sorted(decode_scores(qb, kb), kk) + s).to(torch.int32)
            counts[rows, 0] = kk
            continue
        t_begin = p0 // tile
        for ta, sc in prefill_scores(qb, kb, p0):
            sets, ks = _tile_sets(sc, ta, tile, rho, k_min)
            u0, u1 = ta - t_begin, ta - t_begin + sc.shape[-2]
            counts[rows, u0:u1] = ks.to(torch.int32)
            if sets is not None:
                abs_sets = sets + s if s else sets
                indices[rows, :, u0:u1, : sets.shape[-1]] = abs_sets.masked_fill(sets < 0, -1).to(torch.int32)
    return Selection(indices, counts, first_tile, tile, decode)


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _decode_probs(qb, kb, sc: float) -> torch.Tensor:
    """Post-softmax probabilities of one decode query per head over every key: qb [b, Hq, 1, D],
    kb [b, Hkv, n, D] -> [b, Hkv, G, n] fp32."""
    nb, hq, _, d = qb.shape
    hkv = kb.shape[1]
    s = torch.einsum("bhgd,bhnd->bhgn", qb.float().view(nb, hkv, hq // hkv, d), kb.float()) * sc
    return torch.softmax(s, dim=-1)


def _fold(x: torch.Tensor) -> torch.Tensor:
    """[b, H, n, D] -> [b * H, n, D]: sequences folded into the head dimension (head h of sequence i is
    b * H + h, so query head j of a GQA group still maps to KV head j // G)."""
    return x.reshape(-1, *x.shape[2:])


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
        p = _decode_probs(qb, kb, sc).flatten(1, 2)  # [b, Hq, n]
        return p.sum(1, keepdim=True) if pool == "sum" else p.amax(1, keepdim=True)

    def prefill_scores(qb, kb, p0):
        nb, hq = qb.shape[:2]
        hkv = kb.shape[1]
        if pool == "sum":
            for ta, pooled in pooled_tile_scores(_fold(qb), _fold(kb), p0, tile, sc, nb * max_chunk_bytes):
                yield ta, pooled.view(nb, hkv, *pooled.shape[1:]).sum(1, keepdim=True)
        else:  # one "group" per query head: every query head scores with its own KV head's keys
            kx = _fold(kb.repeat_interleave(hq // hkv, dim=1))
            for ta, pooled in pooled_tile_scores(_fold(qb), kx, p0, tile, sc, nb * max_chunk_bytes):
                yield ta, pooled.view(nb, hq, *pooled.shape[1:]).amax(1, keepdim=True)

    return _build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores)


# ----------------------------------------------------------------------------------------------
# per KV head, with attention sinks and a local window kept
# ----------------------------------------------------------------------------------------------


def _keep_forced(scores: torch.Tensor, forced_sink: torch.Tensor, forced_local: torch.Tensor) -> torch.Tensor:
    """scores with the forced keys lifted above every pooled probability (at most G x T, far below
    FORCED): sinks first, then the local window, the most recent first, so that a budget smaller than
    sinks + window keeps the sinks and the newest keys."""
    keys = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    lifted = torch.where(forced_local, FORCED + keys, scores)
    return torch.where(forced_sink, 2 * FORCED + keys, lifted)


FORCED = 2.0**23  # above any pooled score; FORCED + key index stays exact in float32 for 8M keys


def head_selection(q, k, rho, k_min, tile, kv_start=None, scale=None, sinks: int = 0, window: int = 0,
                   max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Selection:
    """Kascade's selection (one set per KV head: post-softmax probabilities pooled over the KV group and
    the tile's queries, top k(n)), except that the first `sinks` keys and the `window` keys just before
    the query (decode) or the tile (prefill) are always in the set, within the same budget k(n).
    sinks = window = 0 is reference.select."""
    for name, value in (("sinks", sinks), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    sc = _scale(q, scale)

    def decode_scores(qb, kb):
        p = _decode_probs(qb, kb, sc).sum(2)  # [b, Hkv, n]
        n = p.shape[-1]
        keys = torch.arange(n, device=p.device)
        return _keep_forced(p, keys < sinks, keys >= n - window)

    def prefill_scores(qb, kb, p0):
        nb, hkv = qb.shape[0], kb.shape[1]
        for ta, pooled in pooled_tile_scores(_fold(qb), _fold(kb), p0, tile, sc, nb * max_chunk_bytes):
            pooled = pooled.view(nb, hkv, *pooled.shape[1:])  # [b, Hkv, tiles, kend]
            starts = torch.arange(ta, ta + pooled.shape[2], device=pooled.device)[:, None] * tile
            keys = torch.arange(pooled.shape[-1], device=pooled.device)[None]
            # keys at or after the tile start are masked by _tile_sets (the diagonal block is attended anyway)
            yield ta, _keep_forced(pooled, keys < sinks, (keys >= starts - window) & (keys < starts))

    return _build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores)


# ----------------------------------------------------------------------------------------------
# per KV head, the budget shared by the KV heads (mass-adaptive at equal total keys)
# ----------------------------------------------------------------------------------------------


def _shared_top(scores: torch.Tensor, kk: int) -> list[torch.Tensor]:
    """scores [Hkv, n] (each head's pooled probabilities, comparable: every head's row sums to its queries'
    count) -> per head the ascending positions among the Hkv * kk largest of all rows (ties: lowest flat slot)."""
    hkv, n = scores.shape
    take = min(hkv * kk, hkv * n)
    flat = torch.topk(scores.reshape(-1), take, sorted=False).indices
    heads, keys = flat // n, flat % n
    return [keys[heads == h].sort().values for h in range(hkv)]


def shared_budget_selections(q, k, rho, k_min, tile, kv_start=None, scale=None,
                             max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Selection]:
    """Kascade's per-KV-head pooled scores (as reference.select), with the budget of a tile (or decode step)
    shared by the KV heads: the Hkv k(n) largest scores over all heads are kept, so a head whose attention is
    spread gets more keys and a peaked one fewer, at the same total. Returns one Selection per KV head
    (indices [B, 1, U, Kmax], Kmax up to Hkv k(n)), each with its own counts [B, U]."""
    check_attention_inputs(q, k, None)
    sc = _scale(q, scale)
    decode = q.shape[2] == 1
    hkv = k.shape[1]
    groups = _groups(q, k, kv_start)
    indices, counts, first_tile = _alloc(q, k, groups, decode, rho, k_min, tile, heads=1)
    u_max, k_cap = indices.shape[2], min(hkv * indices.shape[3], k.shape[2])
    idx = [torch.full((q.shape[0], 1, u_max, max(1, k_cap)), -1, dtype=torch.int32, device=q.device)
           for _ in range(hkv)]
    cnt = [counts.clone() for _ in range(hkv)]

    def place(b, u, sets, s):
        for h, keys in enumerate(sets):
            idx[h][b, 0, u, : keys.numel()] = (keys + s).to(torch.int32)
            cnt[h][b, u] = keys.numel()

    for rows, s, p0, i0 in groups:
        qb, kb = q[rows, :, i0:], k[rows, :, s:]
        if decode:
            p = _decode_probs(qb, kb, sc).sum(2)  # [b, Hkv, n]
            kk = budget(kb.shape[2], rho, k_min)
            for j in range(p.shape[0]):
                place(rows.start + j, 0, _shared_top(p[j], kk), s)
            continue
        t_begin = p0 // tile
        nb = qb.shape[0]
        for ta, pooled in pooled_tile_scores(_fold(qb), _fold(kb), p0, tile, sc, nb * max_chunk_bytes):
            pooled = pooled.view(nb, hkv, *pooled.shape[1:])  # [b, Hkv, tiles, kend]
            for u in range(pooled.shape[2]):
                n_before = (ta + u) * tile
                kk = budget(n_before, rho, k_min)
                if kk == 0:
                    continue
                for j in range(nb):
                    place(rows.start + j, ta - t_begin + u, _shared_top(pooled[j, :, u, :n_before], kk), s)
    return [Selection(i, c, first_tile, tile, decode) for i, c in zip(idx, cnt)]


# ----------------------------------------------------------------------------------------------
# StreamingLLM
# ----------------------------------------------------------------------------------------------


def _window(n_before: torch.Tensor, ks: torch.Tensor, kc: int, sinks: int) -> torch.Tensor:
    """[U, kc]: per row, keys 0..min(sinks, k)-1 and the k - min(sinks, k) most recent of n_before keys,
    ascending, -1 after the first k = ks[u] slots."""
    j = torch.arange(kc, device=ks.device)
    sk = ks.clamp(max=sinks)[:, None]
    idx = torch.where(j < sk, j, n_before[:, None] - ks[:, None] + j)
    return idx.masked_fill(j >= ks[:, None], -1)


def window_selection(q, k, rho, k_min, tile, kv_start=None, sinks: int = 4) -> Selection:
    """Attention sinks plus a recent window, k(n) keys in all (Xiao et al., 2024, StreamingLLM)."""
    check_attention_inputs(q, k, None)
    decode = q.shape[2] == 1
    groups = _groups(q, k, kv_start)
    indices, counts, first_tile = _alloc(q, k, groups, decode, rho, k_min, tile)
    dev = q.device
    for rows, s, p0, i0 in groups:
        u_n, kc = _extent(q, k, (rows, s, p0, i0), decode, rho, k_min, tile)
        if decode:
            n_before = torch.full((1,), k.shape[2] - s, dtype=torch.int64, device=dev)
        else:
            n_before = torch.arange(p0 // tile, p0 // tile + u_n, device=dev) * tile
        ks = budget_tensor(n_before, rho, k_min)
        counts[rows, :u_n] = ks.to(torch.int32)
        if kc:
            w = _window(n_before, ks, kc, sinks)
            indices[rows, :, :u_n, :kc] = (w + s).masked_fill(w < 0, -1).to(torch.int32)
    return Selection(indices, counts, first_tile, tile, decode)


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
        nb, hq, _, d = qb.shape
        hkv, n = kb.shape[1], kb.shape[2]
        lo, hi = page_bounds(_fold(kb), page)
        ub = _upper_bound(qb.float().reshape(nb * hkv, hq // hkv, 1, d), lo, hi) * sc  # [b Hkv, G, 1, P]
        w = torch.softmax(ub, dim=-1).sum(dim=(1, 2))  # [b Hkv, P]
        return _page_rank_scores(w, n, page).view(nb, hkv, n)

    def prefill_scores(qb, kb, p0):
        nb, hq, qv, d = qb.shape
        hkv, n = kb.shape[1], kb.shape[2]
        g = hq // hkv
        lo, hi = page_bounds(_fold(kb), page)
        pages = lo.shape[1]
        rows = max(tile, max_chunk_bytes // max(1, 4 * hq * max(pages, n // 8)))  # per sequence, as before
        tiles_per_chunk = max(1, rows // tile)
        t_begin, t_end = p0 // tile, (p0 + qv - 1) // tile + 1
        page_start = torch.arange(pages, device=qb.device) * page
        for ta in range(t_begin, t_end, tiles_per_chunk):
            tb = min(t_end, ta + tiles_per_chunk)
            qs, qe = max(ta * tile, p0), min(tb * tile, n)
            pos = torch.arange(qs, qe, device=qb.device)
            qg = qb[:, :, qs - p0 : qe - p0].float().reshape(nb * hkv, g, qe - qs, d)
            ub = _upper_bound(qg, lo, hi) * sc  # [b Hkv, G, R, P]
            tile_start = (pos // tile) * tile
            visible = page_start[None, :] < tile_start[:, None]  # [R, P]
            ub.masked_fill_(~visible, float("-inf"))
            w = torch.softmax(ub, dim=-1).nan_to_num_(0.0).sum(1)  # [b Hkv, R, P]; rows of tile 0 see nothing
            pooled = torch.zeros(nb * hkv, tb - ta, pages, dtype=torch.float32, device=qb.device)
            pooled.index_add_(1, pos // tile - ta, w)
            yield ta, _page_rank_scores(pooled, qe, page).view(nb, hkv, tb - ta, qe)

    return _build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores)


# ----------------------------------------------------------------------------------------------
# decode-time baselines: Quest and TidalDecode per query head, OmniKV's shared set
# ----------------------------------------------------------------------------------------------


def _decode_only(q, what: str) -> None:
    if q.dim() == 4 and q.shape[2] != 1:
        raise ValueError(f"q: {what} selects for decode steps only (one query per sequence), got {q.shape[2]} "
                         "queries; the decode-time baselines attend densely in prefill")


def _prefill_unused(qb, kb, p0):  # pragma: no cover - _decode_only refuses prefill first
    raise AssertionError("decode-only selection")
    yield


def _query_head_logits(qb, kb, sc: float) -> torch.Tensor:
    """q.k * scale of every query head over every key: qb [b, Hq, 1, D], kb [b, Hkv, n, D] -> [b, Hq, n] fp32."""
    nb, hq, _, d = qb.shape
    hkv = kb.shape[1]
    s = torch.einsum("bhgd,bhnd->bhgn", qb.float().view(nb, hkv, hq // hkv, d), kb.float()) * sc
    return s.flatten(1, 2)


def quest_page_scores(q: torch.Tensor, k: torch.Tensor, page: int = 16) -> torch.Tensor:
    """Quest's query-aware page score: per query head and page of `page` keys (pages counted from key 0,
    the last one possibly partial), the upper bound sum_d max(q_d min_d, q_d max_d) of q.k over the page's
    keys, min_d / max_d the element-wise bounds of those keys. q [B, Hq, 1, D], k [B, Hkv, n, D] ->
    [B, Hq, P] fp32, P = ceil(n / page); each entry is >= q.k of every key of its page (unscaled)."""
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page: expected an integer >= 1, got {page!r}")
    check_attention_inputs(q, k, None)
    _decode_only(q, "quest_page_scores")
    nb, hq, _, d = q.shape
    hkv = k.shape[1]
    lo, hi = page_bounds(_fold(k), page)  # [B Hkv, P, D]
    ub = _upper_bound(q.float().reshape(nb * hkv, hq // hkv, 1, d), lo, hi)  # [B Hkv, G, 1, P]
    return ub.reshape(nb, hq, -1)


def query_head_pages(q, k, rho, k_min, tile=32, kv_start=None, page: int = 16) -> Selection:
    """Quest (Tang et al., 2024) as its evaluation code runs it, in a decode step: every query head ranks
    the pages of its KV head by `quest_page_scores` (pages counted from the sequence's first key) and takes
    whole pages best first until k(n) keys, the last page reached in part (its first keys). Selection
    [B, Hq, 1, Kmax]."""
    _decode_only(q, "query_head_pages")

    def decode_scores(qb, kb):
        return _page_rank_scores(quest_page_scores(qb, kb, page), kb.shape[2], page)  # [b, Hq, n]

    return _build(q, k, kv_start, rho, k_min, tile, decode_scores, _prefill_unused, heads=q.shape[1])


def query_head_topk(q, k, rho, k_min, tile=32, kv_start=None, scale=None) -> Selection:
    """TidalDecode's token selection (Yang et al., 2024) in a decode step: every query head keeps its own
    top k(n) keys by q.k (the order of its attention probabilities). Selection [B, Hq, 1, Kmax]."""
    _decode_only(q, "query_head_topk")
    sc = _scale(q, scale)
    return _build(q, k, kv_start, rho, k_min, tile, lambda qb, kb: _query_head_logits(qb, kb, sc), _prefill_unused,
                  heads=q.shape[1])


def max_logit_selection(q, k, rho, k_min, tile=32, kv_start=None, scale=None,
                        keep_from: int | None = None) -> Selection:
    """OmniKV's filter-layer selection (Hao et al., 2025; selector "last") in a decode step: one set for
    all KV heads, the top k(n) keys by the maximum over query heads of q.k. Keys at cache positions
    >= keep_from (the tokens generated after the prompt) are always in the set, within k(n) (the newest
    first when they are more). Selection [B, Hkv, 1, Kmax], the same set in every head."""
    _decode_only(q, "max_logit_selection")
    if keep_from is not None and (isinstance(keep_from, bool) or not isinstance(keep_from, int) or keep_from < 0):
        raise ValueError(f"keep_from: expected a cache position >= 0 or None, got {keep_from!r}")
    sc = _scale(q, scale)
    n_cache = k.shape[2]

    def decode_scores(qb, kb):
        best = _query_head_logits(qb, kb, sc).amax(1, keepdim=True)  # [b, 1, n]
        if keep_from is None or keep_from >= n_cache:
            return best
        n = kb.shape[2]
        keys = torch.arange(n, device=best.device)
        generated = keys >= n - (n_cache - keep_from)  # kb starts at the group's first key
        return torch.where(generated, FORCED + keys.to(best.dtype), best)

    return _build(q, k, kv_start, rho, k_min, tile, decode_scores, _prefill_unused)
