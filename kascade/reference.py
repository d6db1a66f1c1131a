"""Pure-PyTorch Kascade attention: the ground truth every kernel and integration is checked against.

Layout (the one of transformers' KV cache):
    q     [B, Hq, Q, D]   the Q newest positions of each sequence
    k, v  [B, Hkv, N, D]  the whole cache, the Q new keys last
    kv_start [B]          left padding: keys < kv_start[b] are padding (None: no padding)
    kv_len [B]            valid keys of a preallocated (static) cache: keys >= kv_len[b] are not
                          written yet (None: the whole cache, kv_len[b] = N)

Query i of sequence b sits at cache position E - Q + i with E = kv_len[b] (N by default); inside its
sequence its position is p = E - Q + i - kv_start[b] and it sees the keys of relative positions 0..p. Queries with p < 0
are padding; their output rows are zeros. G = Hq / Hkv query heads share one KV head.

Decode (Q == 1): the query's KV group pools its post-softmax probabilities over all n keys and
keeps the top k(n). Prefill (Q > 1): queries are cut into tiles of T positions, counted from the
start of the sequence (so a chunk on top of a cache tiles like the whole prompt would); tile t
pools its G x T rows over the keys before the tile (< tT) and keeps the top k(tT); the tile's own
keys (the diagonal block) are always attended, causally.

Everything is computed in float32 and in chunks of query rows, so no N x N score matrix exists at
once; `max_chunk_bytes` bounds the largest temporary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kascade.budget import budget, check_budget
from kascade.checks import check_attention_inputs, check_head_map, resolve_kv_len, resolve_kv_start

DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class Selection:
    """Top-k key indices chosen by an anchor layer, one set per KV head and query tile.

    indices    [B, Hkv, U, Kmax] int32 absolute cache positions; the first counts[b, u] slots are
               valid (ascending here; kernels may leave them unordered), the rest are padding
               (-1 here; kernels may pad Kmax to a bucket and fill with any value).
    counts     [B, U] int32, valid slots of (sequence, local tile); the same for every KV head.
    first_tile [B] int64, tile number (counted from the sequence start) of local tile 0.
    tile       the prefill tile T.
    decode     True for a single-query step (U == 1, no diagonal tile).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    first_tile: torch.Tensor
    tile: int
    decode: bool

    @property
    def num_kv_heads(self) -> int:
        return self.indices.shape[1]

    def sets(self, b: int, h: int, u: int = 0) -> torch.Tensor:
        """The valid indices of sequence b, KV head h, local tile u (1-D int64)."""
        return self.indices[b, h, u, : int(self.counts[b, u])].long()


# ----------------------------------------------------------------------------------------------
# per-sequence helpers (no padding: keys are positions 0..n-1, queries p0..p0+Qv-1)
# ----------------------------------------------------------------------------------------------


def _rows_per_chunk(heads: int, width: int, max_bytes: int) -> int:
    return max(1, max_bytes // max(1, heads * width * 4))


def _dense_seq(q, k, v, p0, scale, max_bytes):
    """Causal dense attention. q [Hq, Qv, D] at positions p0.., k/v [Hkv, n, D] -> [Hq, Qv, D] fp32."""
    hq, qv, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    kf, vf = k.float(), v.float()
    out = torch.empty(hq, qv, v.shape[-1], dtype=torch.float32, device=q.device)
    rows = _rows_per_chunk(hq, n, max_bytes)
    for r0 in range(0, qv, rows):
        r1 = min(qv, r0 + rows)
        kend = p0 + r1  # keys visible to the last row of the chunk
        qc = q[:, r0:r1].float().view(hkv, g, r1 - r0, d)
        s = torch.einsum("hgrd,hnd->hgrn", qc, kf[:, :kend]) * scale
        pos = torch.arange(p0 + r0, p0 + r1, device=q.device)
        s.masked_fill_(torch.arange(kend, device=q.device)[None, :] > pos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, r0:r1] = torch.einsum("hgrn,hnd->hgrd", p, vf[:, :kend]).reshape(hq, r1 - r0, -1)
    return out


def pooled_tile_scores(q, k, p0: int, tile: int, scale: float, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Yield (t_first, scores) over chunks of query tiles of one sequence.

    q [Hq, Qv, D] at positions p0..p0+Qv-1, k [Hkv, n, D] with n = p0 + Qv.
    scores [Hkv, tiles_in_chunk, kend] fp32: for tile t = t_first + u, the post-softmax probabilities
    of the tile's queries (each over its own causal row), summed over the G heads and the tile's
    rows present in q. Keys at or after the tile start form its diagonal block.
    """
    hq, qv, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    kf = k.float()
    n = p0 + qv
    tiles_per_chunk = max(1, _rows_per_chunk(hq, n, max_chunk_bytes) // tile)
    t_begin, t_end = p0 // tile, (p0 + qv - 1) // tile + 1
    for ta in range(t_begin, t_end, tiles_per_chunk):
        tb = min(t_end, ta + tiles_per_chunk)
        qs, qe = max(ta * tile, p0), min(tb * tile, n)
        kend = qe
        qc = q[:, qs - p0 : qe - p0].float().view(hkv, g, qe - qs, d)
        s = torch.einsum("hgrd,hnd->hgrn", qc, kf[:, :kend]) * scale
        pos = torch.arange(qs, qe, device=q.device)
        s.masked_fill_(torch.arange(kend, device=q.device)[None, :] > pos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1).sum(dim=1)  # [Hkv, rows, kend]
        pooled = torch.zeros(hkv, tb - ta, kend, dtype=torch.float32, device=q.device)
        pooled.index_add_(1, pos // tile - ta, p)
        yield ta, pooled


def _topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k positions of each row of scores [H, n], ascending; [H, k] int64."""
    if k == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.int64)
    if k >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def _select_prefill_seq(q, k, p0, rho, k_min, tile, scale, max_bytes):
    """Per tile of one sequence: list of [Hkv, k_t] index tensors (relative positions)."""
    out = []
    for ta, pooled in pooled_tile_scores(q, k, p0, tile, scale, max_bytes):
        for u in range(pooled.shape[1]):
            n_before = (ta + u) * tile
            out.append(_topk_sorted(pooled[:, u, :n_before], budget(n_before, rho, k_min)))
    return out


def _select_decode_seq(q, k, rho, k_min, scale):
    """q [Hq, 1, D], k [Hkv, n, D] -> [Hkv, k(n)] indices (relative positions)."""
    hq, _, d = q.shape
    hkv, n, _ = k.shape
    s = torch.einsum("hgd,hnd->hgn", q.float().view(hkv, hq // hkv, d), k.float()) * scale
    pooled = torch.softmax(s, dim=-1).sum(dim=1)  # [Hkv, n]
    return _topk_sorted(pooled, budget(n, rho, k_min))


def _sparse_decode_seq(q, k, v, idx, scale):
    """q [Hq, 1, D]; idx [Hkv, K] relative positions (already head-mapped) -> [Hq, 1, Dv]."""
    hq, _, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    ks = torch.gather(k.float(), 1, idx[..., None].expand(-1, -1, d))
    vs = torch.gather(v.float(), 1, idx[..., None].expand(-1, -1, v.shape[-1]))
    s = torch.einsum("hgd,hkd->hgk", q.float().view(hkv, g, d), ks) * scale
    out = torch.einsum("hgk,hkd->hgd", torch.softmax(s, dim=-1), vs)
    return out.reshape(hq, 1, -1)


def _sparse_prefill_seq(q, k, v, tiles_idx, p0, tile, scale, max_bytes):
    """Selected keys of each tile plus its causal diagonal block.

    q [Hq, Qv, D] at positions p0..; tiles_idx: list over the sequence's tiles of [Hkv, k_t]
    relative indices (head-mapped), all < the tile start. -> [Hq, Qv, Dv] fp32.
    """
    hq, qv, d = q.shape
    hkv, n, _ = k.shape
    g, dv = hq // hkv, v.shape[-1]
    kf, vf = k.float(), v.float()
    dev = q.device
    out = torch.empty(hq, qv, dv, dtype=torch.float32, device=dev)
    t_begin = p0 // tile
    kmax = max((int(t.shape[1]) for t in tiles_idx), default=0)
    tiles_per_chunk = max(1, _rows_per_chunk(hq, kmax + tile, max_bytes) // tile)
    for ua in range(0, len(tiles_idx), tiles_per_chunk):
        ub = min(len(tiles_idx), ua + tiles_per_chunk)
        nt = ub - ua
        kc = max(int(tiles_idx[u].shape[1]) for u in range(ua, ub))
        idx = torch.zeros(hkv, nt, kc, dtype=torch.int64, device=dev)
        slot_ok = torch.zeros(nt, kc, dtype=torch.bool, device=dev)
        for j, u in enumerate(range(ua, ub)):
            c = tiles_idx[u].shape[1]
            idx[:, j, :c] = tiles_idx[u]
            slot_ok[j, :c] = True
        # query rows laid on a [nt, tile] grid of positions
        tile_pos0 = (t_begin + ua + torch.arange(nt, device=dev)) * tile  # [nt]
        qpos = tile_pos0[:, None] + torch.arange(tile, device=dev)[None, :]  # [nt, tile]
        row_ok = (qpos >= p0) & (qpos < n)
        qrow = (qpos - p0).clamp(0, qv - 1)
        qg = q.float()[:, qrow.reshape(-1)].view(hkv, g, nt, tile, d)
        ks = kf[torch.arange(hkv, device=dev)[:, None, None], idx]  # [Hkv, nt, kc, D]
        vs = vf[torch.arange(hkv, device=dev)[:, None, None], idx]
        s_sel = torch.einsum("hgutd,hukd->hgutk", qg, ks) * scale
        s_sel.masked_fill_(~slot_ok[None, None, :, None, :], float("-inf"))
        kd = qpos.clamp(max=n - 1)  # diagonal key positions share the grid of the tile
        kdiag, vdiag = kf[:, kd], vf[:, kd]  # [Hkv, nt, tile, D]
        s_diag = torch.einsum("hgutd,hujd->hgutj", qg, kdiag) * scale
        diag_ok = (qpos[:, None, :] <= qpos[:, :, None]) & (qpos[:, None, :] < n)  # [nt, t_q, t_k]
        s_diag.masked_fill_(~diag_ok[None, None], float("-inf"))
        p = torch.softmax(torch.cat([s_sel, s_diag], dim=-1), dim=-1)
        o = torch.einsum("hgutk,hukd->hgutd", p[..., :kc], vs) + torch.einsum(
            "hgutj,hujd->hgutd", p[..., kc:], vdiag
        )
        o = o.reshape(hq, nt * tile, dv)
        keep = row_ok.reshape(-1)
        out[:, qrow.reshape(-1)[keep]] = o[:, keep]
    return out


# ----------------------------------------------------------------------------------------------
# batched API
# ----------------------------------------------------------------------------------------------


def _sequences(q, k, kv_start, kv_len=None):
    """Yield (b, s, e, p0, i0) per sequence: valid keys [s, e), first valid query's position, first valid query row."""
    qlen, n_cache = q.shape[2], k.shape[2]
    for b in range(q.shape[0]):
        s = int(kv_start[b])
        e = n_cache if kv_len is None else int(kv_len[b])
        n = e - s
        qv = min(qlen, n)
        yield b, s, e, n - qv, qlen - qv


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def dense_attention(q, k, v, kv_start=None, scale=None, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, kv_len=None):
    """Causal softmax attention over every valid key. Returns [B, Hq, Q, Dv] in q's dtype."""
    check_attention_inputs(q, k, v)
    kv_start = resolve_kv_start(kv_start, q, k)
    kv_len = resolve_kv_len(kv_len, q, k, kv_start)
    sc = _scale(q, scale)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for b, s, e, p0, i0 in _sequences(q, k, kv_start, kv_len):
        if i0 < q.shape[2]:
            out[b, :, i0:] = _dense_seq(q[b, :, i0:], k[b, :, s:e], v[b, :, s:e], p0, sc, max_chunk_bytes).to(q.dtype)
    return out


def select(q, k, rho: float = 0.1, k_min: int = 128, tile: int = 32, kv_start=None, scale=None,
           max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, kv_len=None) -> Selection:
    """Anchor-layer top-k: decode selection when Q == 1, per-tile prefill selection otherwise.

    The budget of a decode query is k(n) with n = kv_len[b] - kv_start[b] its valid keys."""
    check_attention_inputs(q, k, None)
    check_budget(rho, k_min)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    kv_start = resolve_kv_start(kv_start, q, k)
    kv_len = resolve_kv_len(kv_len, q, k, kv_start)
    sc = _scale(q, scale)
    decode = q.shape[2] == 1
    hkv = k.shape[1]
    per_seq, first_tiles = [], []
    for b, s, e, p0, i0 in _sequences(q, k, kv_start, kv_len):
        qb, kb = q[b, :, i0:], k[b, :, s:e]
        if qb.shape[1] == 0:
            per_seq.append([])
        elif decode:
            per_seq.append([_select_decode_seq(qb, kb, rho, k_min, sc)])
        else:
            per_seq.append(_select_prefill_seq(qb, kb, p0, rho, k_min, tile, sc, max_chunk_bytes))
        first_tiles.append(0 if decode else p0 // tile)
        per_seq[-1] = [t + s for t in per_seq[-1]]  # relative -> absolute cache positions
    u_max = max(1, max(len(t) for t in per_seq))
    k_max = max([t.shape[1] for ts in per_seq for t in ts] + [1])
    indices = torch.full((q.shape[0], hkv, u_max, k_max), -1, dtype=torch.int32, device=q.device)
    counts = torch.zeros(q.shape[0], u_max, dtype=torch.int32, device=q.device)
    for b, ts in enumerate(per_seq):
        for u, t in enumerate(ts):
            indices[b, :, u, : t.shape[1]] = t.to(torch.int32)
            counts[b, u] = t.shape[1]
    first_tile = torch.tensor(first_tiles, dtype=torch.int64, device=q.device)
    return Selection(indices, counts, first_tile, tile, decode)


def sparse_attention(q, k, v, selection: Selection, head_map=None, kv_start=None, scale=None,
                     max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, kv_len=None):
    """Attention over an anchor's selected keys (plus the causal diagonal tile in prefill).

    head_map [Hkv] (int): KV head h of this layer uses the anchor's set of KV head head_map[h];
    None is the identity. The softmax is renormalised over the attended keys only.
    Returns [B, Hq, Q, Dv] in q's dtype.
    """
    check_attention_inputs(q, k, v)
    kv_start = resolve_kv_start(kv_start, q, k)
    kv_len = resolve_kv_len(kv_len, q, k, kv_start)
    hkv = k.shape[1]
    hm = check_head_map(head_map, hkv, selection.num_kv_heads, q.device)
    if selection.decode != (q.shape[2] == 1) or selection.indices.shape[0] != q.shape[0]:
        raise ValueError(
            f"selection: made for batch {selection.indices.shape[0]} with decode={selection.decode}, "
            f"got q of shape {tuple(q.shape)}; select again for this step"
        )
    sc = _scale(q, scale)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for b, s, e, p0, i0 in _sequences(q, k, kv_start, kv_len):
        qb, kb, vb = q[b, :, i0:], k[b, :, s:e], v[b, :, s:e]
        if qb.shape[1] == 0:
            continue
        if selection.decode:
            idx = selection.indices[b, :, 0, : int(selection.counts[b, 0])].long()[hm] - s
            o = _sparse_decode_seq(qb, kb, vb, idx, sc)
        else:
            ntiles = (p0 + qb.shape[1] - 1) // selection.tile - p0 // selection.tile + 1
            if int(selection.first_tile[b]) != p0 // selection.tile:
                raise ValueError("selection: tiles do not match this step's query positions; select again")
            tiles_idx = [
                selection.indices[b, :, u, : int(selection.counts[b, u])].long()[hm] - s for u in range(ntiles)
            ]
            o = _sparse_prefill_seq(qb, kb, vb, tiles_idx, p0, selection.tile, sc, max_chunk_bytes)
        out[b, :, i0:] = o.to(q.dtype)
    return out


def gather_heads(selections, rows: torch.Tensor | None):
    """One Selection whose KV head h is row rows[h] of the selections stacked along the head axis
    (rows None: the one selection as it is).

    The selections come from one forward (same batch, tiles and counts); their slot widths may differ
    (padded with -1 to the widest). Keeps the first selection's type and extra fields."""
    first = selections[0]
    if rows is None:
        return first
    return dataclasses.replace(first, indices=stack_heads([s.indices for s in selections], rows))


def stack_heads(parts: list, rows: torch.Tensor) -> torch.Tensor:
    """parts [B, S_i, U, K_i] stacked along the head axis (narrower ones padded with -1 to the widest K), then
    row rows[h] for head h: [B, len(rows), U, max K_i]. gather_heads' indices; also the pool rows beside them."""
    width = max(x.shape[-1] for x in parts)
    stacked = torch.cat([x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=-1)
                         for x in parts], dim=1)  # pads only the narrower ones (no copy of the others)
    return stacked.index_select(1, rows)
