"""Kascade over a paged KV cache: the reference that paged kernels and the vLLM backend are checked against.

Serving engines keep the KV cache in fixed-size pages (blocks) and flatten the batch's new tokens
into one dimension. Layout used here (vLLM's "NHD" flash layout):

    q            [T, Hq, D]                  the batch's new tokens, request after request
    key_cache    [num_blocks, block_size, Hkv, D]
    value_cache  [num_blocks, block_size, Hkv, Dv]
    block_table  [R, max_blocks] int         page numbers of each request, in order
    seq_lens     [R] int                     keys of each request, the new ones included (n_r)
    query_start_loc [R + 1] int              request r's tokens are q[query_start_loc[r]:query_start_loc[r+1]]
    out          [T, Hq, Dv]                 in q's dtype

Token position j (0-based, counted from the request's first token) of request r lives at
`key_cache[block_table[r, j // block_size], j % block_size]`. The new tokens of a request are its
last positions: its query i (0 <= i < Q_r) sits at position n_r - Q_r + i, so a chunk of a prompt on
top of earlier chunks (chunked prefill) and a decode step (Q_r == 1) are the same case. The new keys
must already be written into the cache. Any strides are accepted (a cache stored as
[num_blocks, Hkv, block_size, D] is passed as `cache.transpose(1, 2)`).

Per request, exactly what kascade.reference does on the contiguous cache [1, Hkv, n_r, D]:
- a request with Q_r == 1 is a decode step: its KV groups pool post-softmax scores over all n_r keys
  and keep the top k(n_r);
- a request with Q_r > 1 is prefill: tiles of `tile` positions counted from the request's first token;
  tile t selects among the keys before it with budget k(t * tile) and attends its own keys causally.

Selections are kept in a PagedSelection (below) whose indices are token positions inside the request
(not page slots), so the same selection serves every later layer whatever the page size. A request with
no new token (Q_r == 0) has no output rows and an empty selection.

    paged_dense(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale=None) -> out
    paged_select(q, key_cache, block_table, seq_lens, query_start_loc, rho=0.1, k_min=128, tile=32,
                 scale=None) -> PagedSelection
    paged_select_fp8(q, key_cache, block_table, seq_lens, query_start_loc, key_copy=None, heads=None, ...,
                     rerank=None) -> PagedSelection   (scored from an FP8 copy of the keys: kascade.fp8keys)
    paged_reuse(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, selection,
                head_map=None, scale=None) -> out
    paged_anchor(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, rho=0.1, k_min=128,
                 tile=32, scale=None, dense_output=False) -> (out, PagedSelection)
    paged_gather_heads(selections, rows) -> PagedSelection       (one selection from rows of several)
    PagedKascadeStrategy(plan).attend(layer, q, key_cache, value_cache, block_table, seq_lens,
                                      query_start_loc, scale=None, tp_rank=None, host_lens=None,
                                      dense=None, decode_from=None) -> out   (a whole layer)
    PagedKascadeStrategy(plan).attend_decode(layer, q, key_cache, value_cache, block_table, seq_lens,
                                             scale=None, tp_rank=None, dense=None) -> out
                                             (a decode-only batch: no host synchronisation on the kernels)

scale None means 1 / sqrt(D). host_lens, where a function takes it, is (seq_lens, query_start_loc) as
host sequences of ints holding the device tensors' values (what a serving engine keeps on the host
anyway): given, the function does not read the device tensors back (no `.tolist()`); not checked against
them (that would read them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kascade import reference
from kascade.budget import check_budget
from kascade.checks import FLOAT_DTYPES, check_head_map
from kascade.host import to_device
from kascade import ops, paged_kernels
from kascade.paged_kernels import use_kernels
from kascade.resume import split_generated
from kascade.routing import Routing


@dataclass
class PagedSelection:
    """Top-k key positions chosen by an anchor layer for every request of a paged batch.

    indices    [R, Hkv, U, Kmax] int32 token positions inside the request (0..n_r - 1); for request r
               and local tile u the first counts[r, u] slots are valid, ascending; the rest are -1.
    counts     [R, U] int32 valid slots of (request, local tile); the same for every KV head.
    first_tile [R] int64 tile number (counted from the request's first token) of local tile 0; 0 for
               a decode request.
    decode     [R] bool, True for a request with one new token (its selection is in local tile 0).
    tile       the prefill tile T.
    pool_rows  None, or [R, Hkv, U, Kmax] int32: the valid slots resolved to rows of the page pool (page *
               block_size + offset, kascade.kernels.paging.resolve_rows) by the kernels, so that reuse layers
               gather K/V rows by one index instead of looking each position's page up again; valid for
               the block table `pool_table` (that tensor object: every layer of one step passes the same).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    first_tile: torch.Tensor
    decode: torch.Tensor
    tile: int
    pool_rows: torch.Tensor | None = None
    pool_table: torch.Tensor | None = None

    @property
    def num_requests(self) -> int:
        return self.indices.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.indices.shape[1]

    def request(self, r: int) -> reference.Selection:
        """Request r's selection as a contiguous-cache Selection of batch 1 (positions = cache positions)."""
        return reference.Selection(
            indices=self.indices[r : r + 1],
            counts=self.counts[r : r + 1],
            first_tile=self.first_tile[r : r + 1],
            tile=self.tile,
            decode=bool(self.decode[r]),
        )


# ----------------------------------------------------------------------------------------------
# checks and gathering
# ----------------------------------------------------------------------------------------------


def _desc(t) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens=None,
                       num_kv_heads=None):
    """ValueError naming the argument unless the shapes fit the layout of the module docstring.

    Returns (seq_lens, query_start_loc) as Python lists of ints: read from the device tensors (one
    device-to-host copy each), or taken from host_lens (see the module docstring) without reading them.
    num_kv_heads: q holds the query heads of that many KV heads (a subset of the cache's), not of all."""
    for name, t in (("q", q), ("key_cache", key_cache)) + ((("value_cache", value_cache),) if value_cache is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a float32/float16/bfloat16 tensor, got {_desc(t)}")
    if q.dim() != 3:
        raise ValueError(f"q: expected [num_tokens, num_q_heads, head_dim], got {_desc(q)}")
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache: expected [num_blocks, block_size, num_kv_heads, head_dim], got {_desc(key_cache)}")
    hq, d = q.shape[1], q.shape[2]
    hkv = key_cache.shape[2] if num_kv_heads is None else num_kv_heads  # q may hold the queries of a subset
    if key_cache.shape[3] != d:
        raise ValueError(f"key_cache: expected head_dim {d} like q, got {_desc(key_cache)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"key_cache: expected a number of KV heads dividing q's {hq} heads, got {_desc(key_cache)}")
    if key_cache.dtype != q.dtype:
        raise ValueError(f"key_cache: expected q's dtype {q.dtype}, got {_desc(key_cache)}")
    if value_cache is not None and (value_cache.dim() != 4 or value_cache.shape[:3] != key_cache.shape[:3]
                                    or value_cache.dtype != q.dtype):
        raise ValueError(f"value_cache: expected the first three dims of key_cache {tuple(key_cache.shape[:3])} "
                         f"and dtype {q.dtype}, got {_desc(value_cache)}")
    for name, t, dims in (("block_table", block_table, 2), ("seq_lens", seq_lens, 1),
                          ("query_start_loc", query_start_loc, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dim() != dims:
            raise ValueError(f"{name}: expected an integer tensor of {dims} dims, got {_desc(t)}")
    r = seq_lens.shape[0]
    if query_start_loc.shape[0] != r + 1 or block_table.shape[0] < r:
        raise ValueError(f"query_start_loc / block_table: expected {r + 1} offsets and at least {r} rows for "
                         f"{r} requests (seq_lens), got {_desc(query_start_loc)} and {_desc(block_table)}")
    if host_lens is None:
        lens, qsl = [int(x) for x in seq_lens.tolist()], [int(x) for x in query_start_loc.tolist()]
    else:
        lens, qsl = _host_lens(host_lens, r)
    if qsl[0] != 0 or qsl[-1] != q.shape[0]:
        raise ValueError(f"query_start_loc: expected to run from 0 to the {q.shape[0]} tokens of q, got {qsl}")
    block_size = key_cache.shape[1]
    for i in range(r):
        ql = qsl[i + 1] - qsl[i]
        if ql < 0 or ql > lens[i]:
            raise ValueError(f"query_start_loc: request {i} has {ql} new tokens, expected 0..seq_lens[{i}]={lens[i]}")
        if lens[i] > block_table.shape[1] * block_size:
            raise ValueError(f"block_table: request {i} needs {-(-lens[i] // block_size)} pages for {lens[i]} keys, "
                             f"the table has {block_table.shape[1]} columns")
    return lens, qsl


def _host_lens(host_lens, r: int) -> tuple[list[int], list[int]]:
    """host_lens (seq_lens, query_start_loc) as lists of ints, checked against the batch's r requests."""
    if not (isinstance(host_lens, (tuple, list)) and len(host_lens) == 2):
        raise ValueError(f"host_lens: expected (seq_lens, query_start_loc) as host sequences of ints, "
                         f"got {type(host_lens).__name__}")
    lens, qsl = [int(x) for x in host_lens[0]], [int(x) for x in host_lens[1]]
    if len(lens) != r or len(qsl) != r + 1:
        raise ValueError(f"host_lens: expected {r} seq_lens and {r + 1} query_start_loc entries like the device "
                         f"tensors, got {len(lens)} and {len(qsl)}; pass the host copies of this step's metadata")
    return lens, qsl


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """A request's first n positions of a paged cache [num_blocks, block_size, H, D] -> [1, H, n, D]."""
    block_size = cache.shape[1]
    pages = block_table_row[: -(-n // block_size)].long()
    flat = cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:n]  # [n, H, D]
    return flat.transpose(0, 1).unsqueeze(0)


def _requests(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens=None):
    """Yield (r, q_r [1, Hq, Q_r, D], k_r [1, Hkv, n_r, D], v_r or None, token slice) per request with new tokens."""
    lens, qsl = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens)
    for r, n in enumerate(lens):
        a, b = qsl[r], qsl[r + 1]
        if b == a:
            continue
        k = gather_kv(key_cache, block_table[r], n)
        v = gather_kv(value_cache, block_table[r], n) if value_cache is not None else None
        yield r, q[a:b].transpose(0, 1).unsqueeze(0), k, v, slice(a, b)


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _out(q, value_cache):
    return torch.zeros(q.shape[0], q.shape[1], value_cache.shape[-1], dtype=q.dtype, device=q.device)


# ----------------------------------------------------------------------------------------------
# the three steps of a Kascade layer
# ----------------------------------------------------------------------------------------------


def paged_dense(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale=None,
                backend: str = "auto", host_lens=None) -> torch.Tensor:
    """Causal dense attention of every request over its pages. Returns out [T, Hq, Dv].

    backend: "reference", "triton" (kascade.paged_kernels) or "auto" (the kernels for CUDA fp16/bf16)."""
    out = _out(q, value_cache)
    sc = _scale(q, scale)
    if use_kernels(q, backend):
        lens, qsl = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens)
        return paged_kernels.dense(out, q, key_cache, value_cache, block_table, seq_lens, lens, qsl, sc, gather_kv)
    for _, qr, k, v, sl in _requests(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens):
        out[sl] = reference.dense_attention(qr, k, v, scale=sc)[0].transpose(0, 1)
    return out


def paged_select(q, key_cache, block_table, seq_lens, query_start_loc, rho: float = 0.1, k_min: int = 128,
                 tile: int = 32, scale=None, backend: str = "auto", host_lens=None) -> PagedSelection:
    """Anchor-layer top-k of every request (decode for Q_r == 1, per-tile prefill otherwise)."""
    check_budget(rho, k_min)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    sc = _scale(q, scale)
    if use_kernels(q, backend):
        lens, qsl = check_paged_inputs(q, key_cache, None, block_table, seq_lens, query_start_loc, host_lens)
        per_req = paged_kernels.select(q, key_cache, block_table, seq_lens, lens, qsl, rho, k_min, tile, sc)
        return _stack(per_req, seq_lens.shape[0], key_cache.shape[2], tile, q.device, block_table)
    per_req = {}
    for r, qr, k, _, _ in _requests(q, key_cache, None, block_table, seq_lens, query_start_loc, host_lens):
        per_req[r] = reference.select(qr, k, rho=rho, k_min=k_min, tile=tile, scale=sc)
    return _stack(per_req, seq_lens.shape[0], key_cache.shape[2], tile, q.device)


def paged_select_fp8(q, key_cache, block_table, seq_lens, query_start_loc, key_copy=None, heads=None,
                     rho: float = 0.1, k_min: int = 128, tile: int = 32, scale=None, backend: str = "auto",
                     host_lens=None, rerank: float | None = None) -> PagedSelection:
    """`paged_select` scored from an FP8 copy of the keys (kascade.fp8keys): q [T, S * G, D] holds the query
    heads of the KV heads `heads` (ascending; None: all of key_cache's), key_copy (keys [num_blocks,
    block_size, S, D] float8_e4m3fn, scales [num_blocks, block_size, S] float32, sharing the cache's pages;
    kascade.fp8keys.PagedKeyCopies keeps them) or None (made from key_cache now); rerank c >= 1 re-ranks c * k
    candidates with key_cache. Returns the selection of those S heads."""
    from kascade import fp8keys

    check_budget(rho, k_min)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    hkv = key_cache.shape[2]
    every = heads is None or list(heads) == list(range(hkv))
    if key_copy is None:
        key_copy = fp8keys.quantize(key_cache if every else key_cache[:, :, list(heads)])
    k8, ks = key_copy
    fp8keys.check_copy(k8, ks)
    s = k8.shape[2]
    if k8.shape[:2] != key_cache.shape[:2] or s != (hkv if every else len(heads)) or q.shape[1] % s:
        want = hkv if every else len(heads)
        raise ValueError(f"key_copy: expected keys of {tuple(key_cache.shape[:2])} pages and {want} heads whose query "
                         f"heads q {tuple(q.shape)} holds, got {tuple(k8.shape)}")
    kv_heads = None if every else list(heads)
    sc = _scale(q, scale)
    lens, qsl = check_paged_inputs(q, key_cache, None, block_table, seq_lens, query_start_loc, host_lens,
                                   num_kv_heads=s)
    if use_kernels(q, backend):
        per_req = paged_kernels.select_fp8(q, key_cache, (k8, ks), block_table, seq_lens, lens, qsl, rho, k_min, tile,
                                           sc, rerank, kv_heads)
        return _stack(per_req, seq_lens.shape[0], s, tile, q.device, block_table)
    per_req = {}
    for r, n in enumerate(lens):
        a, b = qsl[r], qsl[r + 1]
        if b == a:
            continue
        qr = q[a:b].transpose(0, 1).unsqueeze(0)
        k8r = gather_kv(k8, block_table[r], n)
        ksr = gather_kv(ks.unsqueeze(-1), block_table[r], n)[..., 0]
        per_req[r] = fp8keys.select(qr, k8r, ksr, rho, k_min, tile, scale=sc, rerank=rerank,
                                    k=gather_kv(key_cache, block_table[r], n) if rerank is not None else None,
                                    kv_heads=kv_heads)
    return _stack(per_req, seq_lens.shape[0], s, tile, q.device)


def _stack(per_req: dict, r_total: int, hkv: int, tile: int, device, block_table=None) -> PagedSelection:
    """One PagedSelection from per-request batch-1 reference Selections (requests without tokens: empty).

    When every one of them holds pool rows (the kernels' selections over a linear page pool, attribute
    `pool`), they are stacked too, valid for `block_table` (the step's, whose rows the requests' are)."""
    u_max = max([s.indices.shape[2] for s in per_req.values()] + [1])
    k_max = max([s.indices.shape[3] for s in per_req.values()] + [1])
    indices = torch.full((r_total, hkv, u_max, k_max), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(r_total, u_max, dtype=torch.int32, device=device)
    first_tile = torch.zeros(r_total, dtype=torch.int64, device=device)
    decode = torch.zeros(r_total, dtype=torch.bool, device=device)
    pooled = block_table is not None and bool(per_req) and all(
        getattr(s, "pool", None) is not None for s in per_req.values())
    rows = torch.full_like(indices, -1) if pooled else None
    for r, s in per_req.items():
        u, kk = s.indices.shape[2], s.indices.shape[3]
        indices[r, :, :u, :kk] = s.indices[0]
        counts[r, :u] = s.counts[0]
        first_tile[r] = s.first_tile[0]
        decode[r] = s.decode
        if pooled:
            rows[r, :, :u, :kk] = s.pool.rows[0]
    return PagedSelection(indices, counts, first_tile, decode, tile, rows, block_table if pooled else None)


def paged_gather_heads(selections: list, rows: torch.Tensor | None) -> PagedSelection:
    """kascade.reference.gather_heads for PagedSelections: one PagedSelection whose KV head h is row rows[h]
    of `selections` stacked along the head axis (rows [Hkv] int64; None: the one selection as it is).

    counts [R, U] is shared by every KV head, so the selections must come from one step: the same
    requests, tiles and budgets (the same counts, first_tile and decode), as every selection of one
    PagedKascadeStrategy pass is. Slot widths may differ (padded with -1). ValueError otherwise."""
    first = selections[0]
    for i, s in enumerate(selections):
        if not isinstance(s, PagedSelection):
            raise ValueError(f"selections: expected PagedSelections, got {type(s).__name__} at {i}")
        if not (s.tile == first.tile and torch.equal(s.counts, first.counts)
                and torch.equal(s.first_tile, first.first_tile) and torch.equal(s.decode, first.decode)):
            raise ValueError(f"selections: expected selections of one step (the same requests, tiles and budgets: "
                             f"equal counts, first_tile, decode and tile), but selection {i} differs from selection "
                             "0; select them over the same batch")
    out = reference.gather_heads(selections, rows)
    if rows is None:
        return out
    pooled = all(s.pool_rows is not None and s.pool_table is first.pool_table for s in selections)
    pool_rows = reference.stack_heads([s.pool_rows for s in selections], rows) if pooled else None
    return dataclasses.replace(out, pool_rows=pool_rows, pool_table=first.pool_table if pooled else None)


def paged_reuse(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, selection: PagedSelection,
                head_map=None, scale=None, backend: str = "auto", host_lens=None) -> torch.Tensor:
    """Attention of every request over its anchor's selected positions (KV head h uses the anchor's set of
    head_map[h]; None is the identity), plus the causal diagonal tile in prefill. Returns out [T, Hq, Dv]."""
    if not isinstance(selection, PagedSelection):
        raise ValueError(f"selection: expected a PagedSelection (from paged_select / paged_anchor), "
                         f"got {type(selection).__name__}")
    hkv = key_cache.shape[2]
    hm = check_head_map(head_map, hkv, selection.num_kv_heads, q.device)
    if selection.num_requests != seq_lens.shape[0]:
        raise ValueError(f"selection: made for {selection.num_requests} requests, got a batch of {seq_lens.shape[0]}; "
                         "select again for this step")
    out = _out(q, value_cache)
    sc = _scale(q, scale)
    if use_kernels(q, backend):
        lens, qsl = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens)
        for r in range(len(lens)):
            if qsl[r + 1] > qsl[r] and bool(selection.decode[r]) != (qsl[r + 1] - qsl[r] == 1):
                raise ValueError(f"selection: request {r} was selected with decode={bool(selection.decode[r])}, "
                                 f"but it has {qsl[r + 1] - qsl[r]} new tokens; select again for this step")
        return paged_kernels.reuse(out, q, key_cache, value_cache, block_table, seq_lens, lens, qsl, selection,
                                   hm, sc)
    for r, qr, k, v, sl in _requests(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens):
        if bool(selection.decode[r]) != (qr.shape[2] == 1):
            raise ValueError(f"selection: request {r} was selected with decode={bool(selection.decode[r])}, "
                             f"but it has {qr.shape[2]} new tokens; select again for this step")
        out[sl] = reference.sparse_attention(qr, k, v, selection.request(r), head_map=hm, scale=sc)[0].transpose(0, 1)
    return out


def paged_anchor(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, rho: float = 0.1,
                 k_min: int = 128, tile: int = 32, scale=None, dense_output: bool = False, backend: str = "auto",
                 host_lens=None):
    """Select, then attend to the selection (or densely with dense_output). Returns (out [T, Hq, Dv], selection)."""
    sel = paged_select(q, key_cache, block_table, seq_lens, query_start_loc, rho=rho, k_min=k_min, tile=tile,
                       scale=scale, backend=backend, host_lens=host_lens)
    if dense_output:
        out = paged_dense(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale=scale,
                          backend=backend, host_lens=host_lens)
    else:
        out = paged_reuse(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, sel, scale=scale,
                          backend=backend, host_lens=host_lens)
    return out, sel


# ----------------------------------------------------------------------------------------------
# one forward pass of a paged batch, layer after layer
# ----------------------------------------------------------------------------------------------


def _tensor_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's data within one step (views made anew of the same memory compare equal)."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _sub_batch(keep: list[int], q, block_table, seq_lens, query_start_loc, lens: list[int], qsl: list[int]):
    """(token rows, q, block_table, seq_lens, query_start_loc, host_lens) of the requests in `keep`.

    lens / qsl: the batch's seq_lens and query_start_loc on the host (nothing is read back from the device)."""
    rows, *rest = _sub_index(keep, q.device, block_table, seq_lens, query_start_loc, lens, qsl)
    return (rows, q[rows], *rest)


def _sub_index(keep: list[int], device, block_table, seq_lens, query_start_loc, lens: list[int], qsl: list[int]):
    """_sub_batch without q: (token rows, block_table, seq_lens, query_start_loc, host_lens) of `keep`."""
    rows = [torch.arange(qsl[r], qsl[r + 1], device=device) for r in keep]
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=device)
    sub_qsl = [0]
    for r in keep:
        sub_qsl.append(sub_qsl[-1] + qsl[r + 1] - qsl[r])
    idx = to_device(keep, torch.int64, seq_lens.device)
    sub_qsl_t = to_device(sub_qsl, query_start_loc.dtype, query_start_loc.device)
    return (rows, block_table[idx.to(block_table.device)], seq_lens[idx], sub_qsl_t,
            ([lens[r] for r in keep], sub_qsl))


def _plain(sel):
    """A decode selection as a plain kascade.reference.Selection (its pool rows dropped)."""
    return reference.Selection(sel.indices, sel.counts, sel.first_tile, sel.tile, sel.decode)


def _gather_decode(selections: list, rows: torch.Tensor | None):
    """reference.gather_heads for the decode path, without reading any device value.

    The selections of one decode step share counts (k(n_r) for every head), so nothing needs comparing.
    Pool rows (kascade.kernels.decode.PagedDecodeSelection.pool) are gathered like the indices when every
    part holds them for the same block table (pool rows depend on positions and pages, not on heads)."""
    if rows is None:
        return selections[0]
    out = reference.gather_heads([_plain(s) for s in selections], rows)
    pools = [getattr(s, "pool", None) for s in selections]
    if not all(p is not None and p.block_table is pools[0].block_table for p in pools):
        return out
    from kascade.kernels.decode import PagedDecodeSelection
    from kascade.kernels.paging import PoolRows

    pool = PoolRows(reference.stack_heads([p.rows for p in pools], rows), pools[0].block_table)
    return PagedDecodeSelection(out.indices, out.counts, out.first_tile, out.tile, out.decode, pool=pool)


def _dense_of_pieces(dense, split, qsl):
    """The `dense(requests)` callback of a batch rewritten by split_generated, in terms of its pieces: it runs
    the engine's callback on the pieces' requests (dense attention does not depend on how a request's tokens
    are grouped) and keeps the pieces' rows. qsl: the step's query_start_loc before the rewrite (host)."""
    if dense is None:
        return None

    def run(pieces):
        reqs = sorted({split.origin[e] for e in pieces})
        out = dense(reqs)
        start, at = {}, 0
        for r in reqs:  # where request r's tokens begin in `out`
            start[r], at = at, at + qsl[r + 1] - qsl[r]
        rows = [start[split.origin[e]] + t - qsl[split.origin[e]] for e in pieces
                for t in range(split.query_start_loc[e], split.query_start_loc[e + 1])]
        if rows == list(range(out.shape[0])):
            return out
        return out[to_device(rows, torch.int64, out.device)]

    return run


class PagedKascadeStrategy:
    """Kascade layer by layer over a paged batch: what KascadeStrategy does on a contiguous cache.

    Call `attend(layer, q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale)` for
    every layer of one forward pass, in order from layer 0 (which clears `state`); the selections are
    kept in `state` for the later layers of the same pass only. Per request: layer 0 is dense and
    selects; a request whose sequence has no more than `plan.k_min` keys runs dense in every layer
    (every budget is then the whole context); other anchors attend to their own selection (or densely
    with dense_anchor_output); reuse layers attend to their anchor's selection through the plan's head
    map. With a head-granular plan (`plan.head_sources`) a reuse layer's selecting KV heads select on a
    strided view of q's and the cache's heads, and the layer attends, per KV head, to the selection of
    its source (layer, head), assembled into one PagedSelection (paged_gather_heads); the routes come
    from kascade.routing, as in KascadeStrategy. The split into dense and Kascade requests depends on
    seq_lens (and, in decode-only mode, the query lengths) only, so every layer of a pass makes the same
    split. backend: "auto" runs the Triton kernels for CUDA fp16/bf16 tensors (kascade.paged_kernels),
    "reference" the PyTorch path, "triton" forces the kernels.

    A batch whose requests all have one new token may take `attend_decode` instead (a serving engine's
    decode step, captured in a CUDA graph): same plan, same state rules, no host synchronisation on the
    kernels. The layers of one pass take one of the two entries throughout.

    select_keys="fp8" (kascade.fp8keys): selections are scored from an FP8 copy of the selecting heads' keys,
    `rerank` c re-ranking c * k candidates exactly. Pass `key_copies=` (a kascade.fp8keys.PagedKeyCopies the
    caller writes beside its cache) to attend / attend_decode; without it the copy is made from the cache
    at each selecting layer (the same selections, none of the bytes saved).

    sparse_prefill=False (decode-only mode, as on kascade.strategy's strategies): in `attend`, every request
    with more than one new token (a prompt or a prefill chunk) attends densely in every layer, with the
    requests of at most k_min keys (through `dense` when given); requests with one new token run Kascade
    exactly as they would in a decode-only batch, so a request's decode tokens do not depend on what the
    step batched beside them. `attend_decode` is unchanged. No state crosses steps: layer 0 of every step
    clears `state` and selects, anchors select at every step, so a decode step selects the same after a
    dense prefill as after a sparse one. `dense_step(query_start_loc)` tells an engine when a whole step is
    dense (it can then call its own attention for the step and skip this class).
    """

    def __init__(self, plan, dense_anchor_output: bool = False, backend: str = "auto", select_keys: str = "exact",
                 rerank: float | None = None, sparse_prefill: bool = True):
        from kascade import fp8keys
        from kascade.strategy import check_sparse_prefill, warn_if_mode_unvalidated

        ops.check_backend(backend)
        fp8keys.check_options(select_keys, rerank)
        self.sparse_prefill = check_sparse_prefill(sparse_prefill)
        warn_if_mode_unvalidated(plan, self.sparse_prefill)
        self.backend = backend
        self.plan = plan
        self.dense_anchor_output = dense_anchor_output
        self.select_keys = select_keys
        self.rerank = None if rerank is None else float(rerank)
        self.state: dict = {}  # layer -> (requests of the batch it selected over, selection)
        self._routings: dict = {}  # (Hkv, tp_rank) -> Routing
        self._decode_step = None  # (block_table, seq_lens) as passed, and the int32 / clamped copies of this step
        self._long_step = None  # (key, the sub-batch of the requests above k_min) of this step: _long_batch
        self._resumed_step = None  # (key, Resumed or None, its device tensors) of this step: _resumed_batch

    def begin_forward(self) -> None:
        self.state.clear()
        self._decode_step = None
        self._long_step = None
        self._resumed_step = None

    def _long_batch(self, keep, q, block_table, seq_lens, query_start_loc, lens, qsl):
        """_sub_batch's (token rows, block_table, seq_lens, query_start_loc, host_lens) of the requests `keep`, made
        once per step: every layer of a step passes the same batch (as views that may be new objects), and the
        one sub-batch block table lets reuse layers take the pool rows their anchor resolved (PagedSelection)."""
        key = (tuple(keep), _tensor_key(block_table), _tensor_key(seq_lens), _tensor_key(query_start_loc))
        if self._long_step is None or self._long_step[0] != key:
            self._long_step = (key, _sub_index(keep, q.device, block_table, seq_lens, query_start_loc, lens, qsl))
        return self._long_step[1]

    def dense_step(self, query_start_loc, seq_lens=None, decode_from=None) -> bool:
        """True when a whole step attends densely because of the mode: decode-only (sparse_prefill=False) and
        no request with exactly one new token. query_start_loc: the step's [R + 1] offsets on the host; with
        seq_lens and decode_from (host, as `attend` takes them) a resumed request's generated tokens count as
        the decode steps they are (kascade.resume)."""
        qsl = list(query_start_loc)
        if self.sparse_prefill:
            return False
        if decode_from is not None:
            split = split_generated(seq_lens, qsl, decode_from)
            qsl = list(split.query_start_loc) if split is not None else qsl
        return all(b - a != 1 for a, b in zip(qsl, qsl[1:]))

    def _resumed_batch(self, block_table, seq_lens, query_start_loc, lens, qsl, decode_from):
        """(Resumed or None, (block_table, seq_lens, query_start_loc) of the pieces on the device) of this step,
        made once per step (every layer passes the same batch; begin_forward forgets it, as vLLM reuses the
        memory of its block table from step to step)."""
        key = (tuple(lens), tuple(qsl), tuple(decode_from), _tensor_key(block_table))
        if self._resumed_step is None or self._resumed_step[0] != key:
            split, tensors = split_generated(lens, qsl, decode_from), None
            if split is not None:
                origin = to_device(split.origin, torch.int64, block_table.device)
                tensors = (block_table.index_select(0, origin),
                           to_device(split.seq_lens, seq_lens.dtype, seq_lens.device),
                           to_device(split.query_start_loc, query_start_loc.dtype, query_start_loc.device))
            self._resumed_step = (key, split, tensors)
        return self._resumed_step[1:]

    def _sparse_requests(self, lens, qsl) -> list[int]:
        """The requests that run Kascade: more than k_min keys, and (decode-only mode) at most one new token.
        The split depends on the step's lengths only, so every layer of the step makes the same one."""
        k_min, every = self.plan.k_min, self.sparse_prefill
        return [r for r, n in enumerate(lens) if n > k_min and (every or qsl[r + 1] - qsl[r] <= 1)]

    def routing(self, num_kv_heads: int, tp_rank: int | None = None) -> Routing:
        """The plan's routes for `num_kv_heads` KV heads (fewer than the plan's: rank `tp_rank`'s shard)."""
        key = (num_kv_heads, tp_rank)
        if key not in self._routings:
            self._routings[key] = Routing(self.plan, num_kv_heads, tp_rank)
        return self._routings[key]

    def _select_fp8(self, layer, routing, q, key_cache, block_table, seq_lens, query_start_loc, key_copies, budget,
                    kw) -> PagedSelection:
        """The selection of layer `layer`'s selecting heads, scored from their FP8 copy (select_keys="fp8")."""
        own = routing.layer(layer).own
        hkv = key_cache.shape[2]
        every = len(own) == hkv
        qh = q if every else q.unflatten(1, (hkv, q.shape[1] // hkv))[:, own].flatten(1, 2)
        copy = key_copies.layer(layer) if key_copies is not None else None
        return paged_select_fp8(qh, key_cache, block_table, seq_lens, query_start_loc, key_copy=copy,
                                heads=None if every else own, rerank=self.rerank, **budget, **kw)

    def attend(self, layer: int, q, key_cache, value_cache, block_table, seq_lens, query_start_loc,
               scale=None, tp_rank: int | None = None, host_lens=None, dense=None, key_copies=None,
               decode_from=None) -> torch.Tensor:
        """out [T, Hq, Dv] for the batch's tokens q [T, Hq, D] (layout of the module docstring).

        With tensor parallelism the caches hold this rank's KV heads only; `tp_rank` picks the rank's
        rows of the head map or head sources (see Plan.shard; None: the torch.distributed rank).
        host_lens: the batch's (seq_lens, query_start_loc) on the host (module docstring); None reads them
        from the device tensors. dense: None, or a callable `dense(requests) -> [T_sub, Hq, Dv]` giving the
        causal dense attention of the tokens of `requests` (a list of request indices, each with new tokens,
        in order; their tokens concatenated) -- a serving engine's own attention kernel. It then serves layer
        0 (one call for every request with new tokens) and, in the other layers, the requests of at most k_min
        keys and (decode-only mode) those with more than one new token; without it they run paged_dense.
        key_copies: the FP8 copies of select_keys="fp8" (class docstring).
        decode_from: None, or each request's prompt length on the host ([R] ints): a request resumed after
        preemption re-attends the tokens it generated (positions from its decode_from on) as the decode steps
        they were, not as a prefill chunk (kascade.resume), so it continues as if never interrupted."""
        if layer == 0:
            self.begin_forward()
        lens, qsl = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, host_lens)
        if decode_from is not None:
            split, pieces = self._resumed_batch(block_table, seq_lens, query_start_loc, lens, qsl, decode_from)
            if split is not None:
                return self._attend(layer, q, key_cache, value_cache, *pieces, scale, tp_rank,
                                    list(split.seq_lens), list(split.query_start_loc),
                                    _dense_of_pieces(dense, split, qsl), key_copies)
        return self._attend(layer, q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale, tp_rank,
                            lens, qsl, dense, key_copies)

    def _attend(self, layer, q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale, tp_rank,
                lens, qsl, dense, key_copies) -> torch.Tensor:
        """attend on a checked batch whose host lengths are lens / qsl."""
        p = self.plan
        fp8 = self.select_keys == "fp8"
        long_reqs = self._sparse_requests(lens, qsl)  # Kascade; the others dense (short, or decode-only prefill)
        short_reqs = sorted(set(range(len(lens))) - set(long_reqs))
        out = _out(q, value_cache)
        kw = dict(scale=scale, backend=self.backend)

        def dense_part(reqs):
            with_tokens = [r for r in reqs if qsl[r + 1] > qsl[r]]
            if not with_tokens:
                return
            rows, *sub, sub_host = _sub_batch(with_tokens, q, block_table, seq_lens, query_start_loc, lens, qsl)
            if dense is not None:
                out[rows] = dense(with_tokens).to(out.dtype).reshape(len(rows), *out.shape[1:])
            else:
                out[rows] = paged_dense(sub[0], key_cache, value_cache, *sub[1:], host_lens=sub_host, **kw)

        if layer == 0 and dense is not None:
            dense_part(list(range(len(lens))))  # vLLM's own attention: one call for the whole batch
        elif short_reqs:
            dense_part(short_reqs)
        if not long_reqs:
            return out
        rows, sbt, slens, sqsl, host = self._long_batch(long_reqs, q, block_table, seq_lens, query_start_loc, lens, qsl)
        sq = q[rows]
        kw["host_lens"] = host
        routing = self.routing(key_cache.shape[2], tp_rank)
        budget = dict(rho=p.rho, k_min=p.k_min, tile=p.tile)
        if layer == 0:
            if routing.used_by_later_layers(0):
                sel = (self._select_fp8(0, routing, sq, key_cache, sbt, slens, sqsl, key_copies, budget, kw) if fp8
                       else paged_select(sq, key_cache, sbt, slens, sqsl, **budget, **kw))
                self.state[0] = (long_reqs, sel)
            if dense is None:
                out[rows] = paged_dense(sq, key_cache, value_cache, sbt, slens, sqsl, **kw)
        elif p.is_anchor(layer) and fp8:
            sel = self._select_fp8(layer, routing, sq, key_cache, sbt, slens, sqsl, key_copies, budget, kw)
            self.state[layer] = (long_reqs, sel)
            out[rows] = (paged_dense(sq, key_cache, value_cache, sbt, slens, sqsl, **kw) if self.dense_anchor_output
                         else paged_reuse(sq, key_cache, value_cache, sbt, slens, sqsl, sel, **kw))
        elif p.is_anchor(layer):
            o, sel = paged_anchor(sq, key_cache, value_cache, sbt, slens, sqsl, **budget,
                                  dense_output=self.dense_anchor_output, **kw)
            self.state[layer] = (long_reqs, sel)
            out[rows] = o
        elif p.head_granular:
            route, t = routing.layer(layer), routing.tensors(layer, q.device)
            if route.own and fp8:
                self.state[layer] = (long_reqs, self._select_fp8(layer, routing, sq, key_cache, sbt, slens, sqsl,
                                                                 key_copies, budget, kw))
            elif route.own:
                hkv = key_cache.shape[2]
                qg = sq.unflatten(1, (hkv, sq.shape[1] // hkv))  # [T, Hkv, G, D]
                # Views of the selecting heads: key_cache[:, :, sl] is read in place (the kernels take any
                # strides; the reference gathers each request's pages anyway); q's view is copied by flatten
                # when the slice has a step (q holds only the step's new tokens).
                parts = [paged_select(qg[:, sl].flatten(1, 2), key_cache[:, :, sl], sbt, slens, sqsl, **budget, **kw)
                         for sl in route.slices]
                own = parts[0] if len(parts) == 1 else paged_gather_heads(parts, t.perm)  # ascending head order
                self.state[layer] = (long_reqs, own)
            missing = [a for a in route.layers if a not in self.state or self.state[a][0] != long_reqs]
            if missing:
                raise RuntimeError(f"layer {layer} takes keys from layers {missing}, which did not run on this batch "
                                   "in this forward; layers must run in order starting at layer 0")
            sel = paged_gather_heads([self.state[a][1] for a in route.layers], t.rows)
            out[rows] = paged_reuse(sq, key_cache, value_cache, sbt, slens, sqsl, sel, **kw)
        else:
            anchor = p.anchor_of(layer)
            if anchor not in self.state or self.state[anchor][0] != long_reqs:
                raise RuntimeError(f"layer {layer} reuses anchor {anchor}, which did not run on this batch in this "
                                   "forward; layers must run in order starting at layer 0")
            out[rows] = paged_reuse(sq, key_cache, value_cache, sbt, slens, sqsl, self.state[anchor][1],
                                    head_map=routing.tensors(layer, q.device).head_map, **kw)
        return out

    # ------------------------------------------------------------------------------------------
    # a decode-only batch, without host synchronisation
    # ------------------------------------------------------------------------------------------

    def _decode_inputs(self, block_table, seq_lens):
        """(block_table int32, seq_lens int32 with every entry at least 1) of this step, made once per step
        (layer 0) and shared by its layers, so that an anchor's pool rows serve the layers after it."""
        s = self._decode_step
        key = (_tensor_key(block_table), _tensor_key(seq_lens))
        if s is not None and s[0] == key:
            return s[1], s[2]
        bt = block_table
        if bt.dtype != torch.int32 or bt.stride(-1) != 1:
            bt = bt.to(torch.int32).contiguous()
        lens = torch.clamp(seq_lens, min=1).to(torch.int32)  # a copy: padding requests (0 keys) read one key
        self._decode_step = (key, bt, lens)
        return bt, lens

    def attend_decode(self, layer: int, q, key_cache, value_cache, block_table, seq_lens, scale=None,
                      tp_rank: int | None = None, dense=None, key_copies=None, out=None) -> torch.Tensor:
        """out [R, Hq, Dv] for a batch of R requests with one new token each: q [R, Hq, D], row r the new
        token of request r (at position seq_lens[r] - 1); key_cache / value_cache [num_blocks, block_size,
        Hkv, D] (any strides, contiguous last dim), block_table [R, max_blocks] int, seq_lens [R] int on
        the device.

        On the kernels (backend "auto" with CUDA fp16/bf16, or "triton") nothing is read back to the host:
        each layer is one launch of each paged decode kernel for the whole batch, the lengths and budgets
        stay on the device, buffers are sized by block_table's width (max_blocks x block_size) and R only,
        and the data-dependent argument checks are skipped (kascade.kernels.decode, check=False). So the
        step can be captured in a CUDA graph and replayed for any lengths the block table allows. Entries
        of seq_lens below 1 (requests padding a graph's batch, with no keys) are read as 1: their rows are
        computed from whatever that key holds and mean nothing.

        Per request as in `attend`, but for one thing: a request of at most k_min keys is not split off
        (that would need the lengths on the host); its budget k(n) = n selects every key, so it attends
        to all of them -- dense attention, within the rounding of a different summation order. Layer 0
        runs `dense()` when given (a callable returning [R, Hq, Dv]: the engine's own dense attention of
        the batch), else the paged dense decode kernel; it selects when a later layer reads it.
        Part-selecting layers of a head-granular plan select on views of their selecting heads and
        attend through the stacked selection (kascade.kernels.decode.part_anchor's one-pass form exists
        for contiguous caches only).

        out [R, Hq, Dv] (optional; q's dtype and device, last dimension contiguous): on the kernels the anchors'
        and reusing layers' outputs are written into it and it is returned (an engine's output buffer: no copy);
        elsewhere the result may be another tensor, so a caller compares data pointers before copying.

        On the reference backend this runs `attend` with one query per request (reading seq_lens once).
        """
        r = q.shape[0]
        if q.dim() != 3 or seq_lens.dim() != 1 or seq_lens.shape[0] != r or block_table.dim() != 2 \
                or block_table.shape[0] != r:
            raise ValueError(f"q / seq_lens / block_table: expected [R, Hq, D], [R] and [R, max_blocks] for the R "
                             f"requests of a decode step, got shapes {tuple(q.shape)}, {tuple(seq_lens.shape)} and "
                             f"{tuple(block_table.shape)}; a batch with prefill tokens takes attend()")
        if not use_kernels(q, self.backend):
            lens = torch.clamp(seq_lens, min=1)
            qsl = torch.arange(r + 1, dtype=torch.int32, device=seq_lens.device)
            host = ([int(x) for x in lens.tolist()], list(range(r + 1)))
            # dense serves layer 0 only, as on the kernels (short requests then run paged_dense: the same)
            sub = None if dense is None or layer != 0 else (lambda reqs: dense()[torch.tensor(reqs, device=q.device)])
            return self.attend(layer, q, key_cache, value_cache, block_table, lens, qsl, scale=scale, tp_rank=tp_rank,
                               host_lens=host, dense=sub, key_copies=key_copies)
        from kascade.kernels import decode as KD
        from kascade.kernels.paging import PagedKV

        p = self.plan
        if layer == 0:
            self.begin_forward()
        out4 = None if out is None else out.unsqueeze(2)  # [R, Hq, 1, Dv], the kernels' output shape
        bt, lens = self._decode_inputs(block_table, seq_lens)
        cache = PagedKV(key_cache, value_cache, bt, lens)
        q4 = q.unsqueeze(2)  # [R, Hq, 1, D]
        routing = self.routing(key_cache.shape[2], tp_rank)
        budget = dict(rho=p.rho, k_min=p.k_min, tile=p.tile, scale=scale, check=False)
        step = ("decode", r)  # what the state of this pass was selected over
        fp8 = self.select_keys == "fp8"

        def select_fp8(lay):  # the layer's selecting heads, scored from their FP8 copy
            own = routing.layer(lay).own
            hkv = key_cache.shape[2]
            every = len(own) == hkv
            heads = routing.tensors(lay, q.device).own
            qh = q4 if every else q4.unflatten(1, (hkv, q.shape[1] // hkv)).index_select(1, heads).flatten(1, 2)
            copy = key_copies.layer(lay) if key_copies is not None else None
            if copy is None:
                from kascade import fp8keys

                copy = fp8keys.quantize(key_cache if every else key_cache.index_select(2, heads))
            return KD.select_fp8_paged(qh, PagedKV(key_cache, None, bt, lens), copy, rerank=self.rerank,
                                       kv_heads=None if every else heads, **budget)

        if layer == 0:
            if routing.used_by_later_layers(0):
                sel = select_fp8(0) if fp8 else KD.select_paged(q4, PagedKV(key_cache, None, bt, lens), **budget)
                self.state[0] = (step, sel)
            if dense is not None:
                return dense()
            return KD.dense_attention_paged(q4, cache, scale=scale, check=False)[:, :, 0]
        if p.is_anchor(layer):
            if fp8:
                sel = select_fp8(layer)
                o = (KD.dense_attention_paged(q4, cache, scale=scale, check=False) if self.dense_anchor_output
                     else KD.sparse_attention_paged(q4, cache, sel, scale=scale, check=False, out=out4))
            else:
                o, sel = KD.anchor_paged(q4, cache, dense_output=self.dense_anchor_output, out=out4, **budget)
            self.state[layer] = (step, sel)
            return o[:, :, 0]
        if p.head_granular:
            route, t = routing.layer(layer), routing.tensors(layer, q.device)
            if route.own and fp8:
                self.state[layer] = (step, select_fp8(layer))
            elif route.own:
                hkv = key_cache.shape[2]
                qg = q4.unflatten(1, (hkv, q.shape[1] // hkv))  # [R, Hkv, G, 1, D]
                parts = [KD.select_paged(qg[:, sl].flatten(1, 2), PagedKV(key_cache[:, :, sl], None, bt, lens),
                                         **budget) for sl in route.slices]
                self.state[layer] = (step, _gather_decode(parts, t.perm if len(parts) > 1 else None))
            missing = [a for a in route.layers if a not in self.state or self.state[a][0] != step]
            if missing:
                raise RuntimeError(f"layer {layer} takes keys from layers {missing}, which did not run on this decode "
                                   "batch in this forward; layers must run in order starting at layer 0")
            sel = _gather_decode([self.state[a][1] for a in route.layers], t.rows)
            return KD.sparse_attention_paged(q4, cache, sel, scale=scale, check=False, out=out4)[:, :, 0]
        anchor = p.anchor_of(layer)
        if anchor not in self.state or self.state[anchor][0] != step:
            raise RuntimeError(f"layer {layer} reuses anchor {anchor}, which did not run on this decode batch in this "
                               "forward; layers must run in order starting at layer 0")
        head_map = routing.tensors(layer, q.device).head_map
        return KD.sparse_attention_paged(q4, cache, self.state[anchor][1], head_map=head_map, scale=scale,
                                         check=False, out=out4)[:, :, 0]
