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
    paged_reuse(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, selection,
                head_map=None, scale=None) -> out
    paged_anchor(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, rho=0.1, k_min=128,
                 tile=32, scale=None, dense_output=False) -> (out, PagedSelection)
    paged_gather_heads(selections, rows) -> PagedSelection       (one selection from rows of several)
    PagedKascadeStrategy(plan).attend(layer, q, key_cache, value_cache, block_table, seq_lens,
                                      query_start_loc, scale=None, tp_rank=None) -> out   (a whole layer)

scale None means 1 / sqrt(D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kascade import reference
from kascade.budget import check_budget
from kascade.checks import FLOAT_DTYPES, check_head_map
from kascade import ops, paged_kernels
from kascade.paged_kernels import use_kernels
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
    """

    indices: torch.Tensor
    counts: torch.Tensor
    first_tile: torch.Tensor
    decode: torch.Tensor
    tile: int

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


def check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc):
    """ValueError naming the argument unless the shapes fit the layout of the module docstring.

    Returns (seq_lens, query_start_loc) as Python lists of ints."""
    for name, t in (("q", q), ("key_cache", key_cache)) + ((("value_cache", value_cache),) if value_cache is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a float32/float16/bfloat16 tensor, got {_desc(t)}")
    if q.dim() != 3:
        raise ValueError(f"q: expected [num_tokens, num_q_heads, head_dim], got {_desc(q)}")
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache: expected [num_blocks, block_size, num_kv_heads, head_dim], got {_desc(key_cache)}")
    hq, d = q.shape[1], q.shape[2]
    hkv = key_cache.shape[2]
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
    lens, qsl = [int(x) for x in seq_lens.tolist()], [int(x) for x in query_start_loc.tolist()]
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


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """A request's first n positions of a paged cache [num_blocks, block_size, H, D] -> [1, H, n, D]."""
    block_size = cache.shape[1]
    pages = block_table_row[: -(-n // block_size)].long()
    flat = cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:n]  # [n, H, D]
    return flat.transpose(0, 1).unsqueeze(0)


def _requests(q, key_cache, value_cache, block_table, seq_lens, query_start_loc):
    """Yield (r, q_r [1, Hq, Q_r, D], k_r [1, Hkv, n_r, D], v_r or None, token slice) per request with new tokens."""
    lens, qsl = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
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
                backend: str = "auto") -> torch.Tensor:
    """Causal dense attention of every request over its pages. Returns out [T, Hq, Dv].

    backend: "reference", "triton" (kascade.paged_kernels) or "auto" (the kernels for CUDA fp16/bf16)."""
    out = _out(q, value_cache)
    sc = _scale(q, scale)
    if use_kernels(q, backend):
        lens, qsl = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
        return paged_kernels.dense(out, q, key_cache, value_cache, block_table, seq_lens, lens, qsl, sc, gather_kv)
    for _, qr, k, v, sl in _requests(q, key_cache, value_cache, block_table, seq_lens, query_start_loc):
        out[sl] = reference.dense_attention(qr, k, v, scale=sc)[0].transpose(0, 1)
    return out


def paged_select(q, key_cache, block_table, seq_lens, query_start_loc, rho: float = 0.1, k_min: int = 128,
                 tile: int = 32, scale=None, backend: str = "auto") -> PagedSelection:
    """Anchor-layer top-k of every request (decode for Q_r == 1, per-tile prefill otherwise)."""
    check_budget(rho, k_min)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    sc = _scale(q, scale)
    if use_kernels(q, backend):
        lens, qsl = check_paged_inputs(q, key_cache, None, block_table, seq_lens, query_start_loc)
        per_req = paged_kernels.select(q, key_cache, block_table, seq_lens, lens, qsl, rho, k_min, tile, sc)
        return _stack(per_req, seq_lens.shape[0], key_cache.shape[2], tile, q.device)
    per_req = {}
    for r, qr, k, _, _ in _requests(q, key_cache, None, block_table, seq_lens, query_start_loc):
        per_req[r] = reference.select(qr, k, rho=rho, k_min=k_min, tile=tile, scale=sc)
    return _stack(per_req, seq_lens.shape[0], key_cache.shape[2], tile, q.device)


def _stack(per_req: dict, r_total: int, hkv: int, tile: int, device) -> PagedSelection:
    """One PagedSelection from per-request batch-1 reference Selections (requests without tokens: empty)."""
    u_max = max([s.indices.shape[2] for s in per_req.values()] + [1])
    k_max = max([s.indices.shape[3] for s in per_req.values()] + [1])
    indices = torch.full((r_total, hkv, u_max, k_max), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(r_total, u_max, dtype=torch.int32, device=device)
    first_tile = torch.zeros(r_total, dtype=torch.int64, device=device)
    decode = torch.zeros(r_total, dtype=torch.bool, device=device)
    for r, s in per_req.items():
        u, kk = s.indices.shape[2], s.indices.shape[3]
        indices[r, :, :u, :kk] = s.indices[0]
        counts[r, :u] = s.counts[0]
        first_tile[r] = s.first_tile[0]
        decode[r] = s.decode
    return PagedSelection(indices, counts, first_tile, decode, tile)


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
    return reference.gather_heads(selections, rows)


def paged_reuse(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, selection: PagedSelection,
                head_map=None, scale=None, backend: str = "auto") -> torch.Tensor:
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
        lens, qsl = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
        for r in range(len(lens)):
            if qsl[r + 1] > qsl[r] and bool(selection.decode[r]) != (qsl[r + 1] - qsl[r] == 1):
                raise ValueError(f"selection: request {r} was selected with decode={bool(selection.decode[r])}, "
                                 f"but it has {qsl[r + 1] - qsl[r]} new tokens; select again for this step")
        return paged_kernels.reuse(out, q, key_cache, value_cache, block_table, seq_lens, lens, qsl, selection,
                                   hm, sc)
    for r, qr, k, v, sl in _requests(q, key_cache, value_cache, block_table, seq_lens, query_start_loc):
        if bool(selection.decode[r]) != (qr.shape[2] == 1):
            raise ValueError(f"selection: request {r} was selected with decode={bool(selection.decode[r])}, "
                             f"but it has {qr.shape[2]} new tokens; select again for this step")
        out[sl] = reference.sparse_attention(qr, k, v, selection.request(r), head_map=hm, scale=sc)[0].transpose(0, 1)
    return out


def paged_anchor(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, rho: float = 0.1,
                 k_min: int = 128, tile: int = 32, scale=None, dense_output: bool = False, backend: str = "auto"):
    """Select, then attend to the selection (or densely with dense_output). Returns (out [T, Hq, Dv], selection)."""
    sel = paged_select(q, key_cache, block_table, seq_lens, query_start_loc, rho=rho, k_min=k_min, tile=tile,
                       scale=scale, backend=backend)
    if dense_output:
        out = paged_dense(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale=scale,
                          backend=backend)
    else:
        out = paged_reuse(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, sel, scale=scale,
                          backend=backend)
    return out, sel


# ----------------------------------------------------------------------------------------------
# one forward pass of a paged batch, layer after layer
# ----------------------------------------------------------------------------------------------


def _sub_batch(keep: list[int], q, block_table, seq_lens, query_start_loc):
    """(token rows, q, block_table, seq_lens, query_start_loc) of the requests in `keep`."""
    qsl = [int(x) for x in query_start_loc.tolist()]
    rows = [torch.arange(qsl[r], qsl[r + 1], device=q.device) for r in keep]
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=q.device)
    lens_q = [qsl[r + 1] - qsl[r] for r in keep]
    sub_qsl = torch.tensor([0] + lens_q, device=query_start_loc.device).cumsum(0).to(query_start_loc.dtype)
    idx = torch.tensor(keep, dtype=torch.int64, device=seq_lens.device)
    return rows, q[rows], block_table[idx.to(block_table.device)], seq_lens[idx], sub_qsl


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
    seq_lens only, so every layer of a pass makes the same split. backend: "auto" runs the Triton
    kernels for CUDA fp16/bf16 tensors (kascade.paged_kernels), "reference" the PyTorch path, "triton"
    forces the kernels.
    """

    def __init__(self, plan, dense_anchor_output: bool = False, backend: str = "auto"):
        ops.check_backend(backend)
        self.backend = backend
        self.plan = plan
        self.dense_anchor_output = dense_anchor_output
        self.state: dict = {}  # layer -> (requests of the batch it selected over, PagedSelection)
        self._routings: dict = {}  # (Hkv, tp_rank) -> Routing

    def begin_forward(self) -> None:
        self.state.clear()

    def routing(self, num_kv_heads: int, tp_rank: int | None = None) -> Routing:
        """The plan's routes for `num_kv_heads` KV heads (fewer than the plan's: rank `tp_rank`'s shard)."""
        key = (num_kv_heads, tp_rank)
        if key not in self._routings:
            self._routings[key] = Routing(self.plan, num_kv_heads, tp_rank)
        return self._routings[key]

    def attend(self, layer: int, q, key_cache, value_cache, block_table, seq_lens, query_start_loc,
               scale=None, tp_rank: int | None = None) -> torch.Tensor:
        """out [T, Hq, Dv] for the batch's tokens q [T, Hq, D] (layout of the module docstring).

        With tensor parallelism the caches hold this rank's KV heads only; `tp_rank` picks the rank's
        rows of the head map or head sources (see Plan.shard; None: the torch.distributed rank)."""
        p = self.plan
        if layer == 0:
            self.begin_forward()
        lens, _ = check_paged_inputs(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
        long_reqs = [r for r, n in enumerate(lens) if n > p.k_min]
        short_reqs = [r for r, n in enumerate(lens) if n <= p.k_min]
        out = _out(q, value_cache)
        kw = dict(scale=scale, backend=self.backend)
        if short_reqs:
            rows, *sub = _sub_batch(short_reqs, q, block_table, seq_lens, query_start_loc)
            out[rows] = paged_dense(sub[0], key_cache, value_cache, *sub[1:], **kw)
        if not long_reqs:
            return out
        rows, sq, sbt, slens, sqsl = _sub_batch(long_reqs, q, block_table, seq_lens, query_start_loc)
        routing = self.routing(key_cache.shape[2], tp_rank)
        budget = dict(rho=p.rho, k_min=p.k_min, tile=p.tile)
        if layer == 0:
            if routing.used_by_later_layers(0):
                self.state[0] = (long_reqs, paged_select(sq, key_cache, sbt, slens, sqsl, **budget, **kw))
            out[rows] = paged_dense(sq, key_cache, value_cache, sbt, slens, sqsl, **kw)
        elif p.is_anchor(layer):
            o, sel = paged_anchor(sq, key_cache, value_cache, sbt, slens, sqsl, **budget,
                                  dense_output=self.dense_anchor_output, **kw)
            self.state[layer] = (long_reqs, sel)
            out[rows] = o
        elif p.head_granular:
            route, t = routing.layer(layer), routing.tensors(layer, q.device)
            if route.own:
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
