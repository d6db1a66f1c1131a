"""Where a kernel finds KV-cache rows: a contiguous cache or a paged one (vLLM-style).

Contiguous (transformers' cache): k [B, Hkv, N, D] with any strides; sequence b holds keys
kv_start[b] .. N-1 (left padding before), row (b, h, pos) at b * s_seq + h * s_head + pos * s_tok.

Paged: key_cache [num_pages, page_size, Hkv, D] (any strides, so [num_pages, Hkv, page_size, D]
views work too), block_table [B, max_pages] int32 mapping page j of sequence b to a page of the
cache, seq_lens [B] keys per sequence. Positions start at 0 in every sequence (no padding); row
(b, h, pos) lives at block_table[b, pos // page_size] * s_page + (pos % page_size) * s_tok + h * s_head.

Kernels take both through the same arguments (the base pointer, s_seq / s_head / s_tok, BT, s_bt,
and the compile-time PAGE and PAGED: a constant page size turns `pos // PAGE` into a multiply and
shift instead of an integer division per cache row) and call `row_offsets`; `seq_span` gives each sequence's key range from
kv_start and an optional end (seq_lens of a paged cache, kv_len of a preallocated one). The
contiguous build is unchanged (PAGED and HAS_END are compile-time constants).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kascade.host import to_device


@triton.jit
def seq_span(b, KV_START, KV_END, N_CACHE, HAS_END: tl.constexpr):
    """(s, n): first cache position and number of keys of sequence b.

    Keys [KV_START[b], KV_END[b]) when HAS_END (a paged cache: start 0, end seq_lens[b]; a static
    cache: end kv_len[b]), else [KV_START[b], N_CACHE).
    """
    s = tl.load(KV_START + b).to(tl.int32)
    if HAS_END:
        n = tl.load(KV_END + b).to(tl.int32) - s
    else:
        n = N_CACHE - s
    return s, n


@triton.jit
def row_offsets(b, h, pos, mask, s_seq, s_head, s_tok, BT, s_bt, PAGE: tl.constexpr, PAGED: tl.constexpr):
    """int64 element offsets of the rows at cache positions `pos` (any shape) of sequence b, KV head h.

    Paged: masked-off positions read page 0 (their loads must be masked as well).
    """
    if PAGED:
        page = tl.load(BT + b.to(tl.int64) * s_bt + pos // PAGE, mask=mask, other=0).to(tl.int64)
        return page * s_seq + h.to(tl.int64) * s_head + (pos % PAGE).to(tl.int64) * s_tok
    else:
        return b.to(tl.int64) * s_seq + h.to(tl.int64) * s_head + pos.to(tl.int64) * s_tok


@dataclass(frozen=True)
class KVRows:
    """Host-side description of one cache tensor for the kernels (see the module docstring)."""

    tensor: torch.Tensor
    s_seq: int
    s_head: int
    s_tok: int
    block_table: torch.Tensor | None = None
    page: int = 1

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    def args(self, dummy: torch.Tensor):
        """(pointer, s_seq, s_head, s_tok, BT, s_bt, PAGE) in kernel argument order."""
        bt = self.block_table if self.paged else dummy
        return (self.tensor, self.s_seq, self.s_head, self.s_tok, bt, bt.stride(0) if self.paged else 0, self.page)


def contiguous_rows(x: torch.Tensor) -> KVRows:
    """KVRows of a [B, Hkv, N, D] cache tensor (last dim made contiguous if it is not)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return KVRows(x, x.stride(0), x.stride(1), x.stride(2))


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged KV cache and the batch's view of it.

    key_cache / value_cache [num_pages, page_size, Hkv, D] (value head dim may differ), any strides
    with a contiguous last dim; block_table [B, max_pages] int32; seq_lens [B] int (>= 1 each,
    at most max_pages * page_size). host_seq_lens: optionally the same lengths as host ints (a serving
    engine's host copy of the step), which `host_lengths` then returns without reading the device: a
    prefill request otherwise costs one device-to-host copy per kernel call.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor | None
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    host_seq_lens: tuple | None = None

    def __post_init__(self):
        kc, bt, sl = self.key_cache, self.block_table, self.seq_lens
        if not isinstance(kc, torch.Tensor) or kc.dim() != 4:
            raise ValueError(f"key_cache: expected [num_pages, page_size, Hkv, D], got {_desc(kc)}")
        if self.value_cache is not None:
            vc = self.value_cache
            if not isinstance(vc, torch.Tensor) or vc.dim() != 4 or vc.shape[:3] != kc.shape[:3]:
                raise ValueError(f"value_cache: expected [num_pages, page_size, Hkv, Dv] with the first three dims "
                                 f"of key_cache {tuple(kc.shape[:3])}, got {_desc(vc)}")
            if vc.dtype != kc.dtype or vc.device != kc.device:
                raise ValueError(f"value_cache: expected {kc.dtype} on {kc.device} like key_cache, got {_desc(vc)}")
        for name, t in (("key_cache", kc), ("value_cache", self.value_cache)):
            if t is not None and t.stride(-1) != 1:
                raise ValueError(f"{name}: expected a contiguous last dim, got strides {t.stride()}")
        if not isinstance(bt, torch.Tensor) or bt.dim() != 2 or bt.dtype != torch.int32:
            raise ValueError(f"block_table: expected an int32 tensor [batch, max_pages], got {_desc(bt)}")
        if not isinstance(sl, torch.Tensor) or sl.shape != (bt.shape[0],) or sl.dtype.is_floating_point:
            raise ValueError(f"seq_lens: expected an integer tensor of shape ({bt.shape[0]},), got {_desc(sl)}")
        if bt.device != kc.device or sl.device != kc.device:
            raise ValueError(f"block_table, seq_lens: expected the device of key_cache ({kc.device}), "
                             f"got {bt.device} and {sl.device}")
        host = self.host_seq_lens
        if host is not None and (not isinstance(host, tuple) or len(host) != bt.shape[0]
                                 or not all(isinstance(n, int) for n in host)):
            raise ValueError(f"host_seq_lens: expected None or a tuple of {bt.shape[0]} ints, got {host!r}")

    @property
    def page_size(self) -> int:
        return self.key_cache.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key_cache.shape[2]

    def host_lengths(self) -> tuple:
        """seq_lens as host ints, checked against the block table (host_seq_lens when given, else one
        device-to-host copy)."""
        lens = self.host_seq_lens if self.host_seq_lens is not None else tuple(int(x) for x in self.seq_lens.tolist())
        cap = self.block_table.shape[1] * self.page_size
        for b, n in enumerate(lens):
            if not 1 <= n <= cap:
                raise ValueError(f"seq_lens: expected values in [1, {cap}] (max_pages x page_size), "
                                 f"got {n} for sequence {b}")
        return lens

    def rows(self, which: str = "key") -> KVRows:
        t = self.key_cache if which == "key" else self.value_cache
        return KVRows(t, t.stride(0), t.stride(2), t.stride(1), self.block_table, self.page_size)


def check_paged_q(q, cache: PagedKV) -> None:
    """q [B, Hq, Q, D] fits the paged cache: its dtype, device, batch, a multiple of its KV heads, its head dim."""
    kc = cache.key_cache
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.dtype != kc.dtype:
        raise ValueError(f"q: expected a [batch, heads, queries, head_dim] tensor of the cache's dtype "
                         f"{kc.dtype}, got {_desc(q)}")
    if q.device != kc.device:
        raise ValueError(f"q: expected the cache's device {kc.device}, got {q.device}")
    if q.shape[0] != cache.block_table.shape[0]:
        raise ValueError(f"q: expected batch {cache.block_table.shape[0]} like block_table, got {_desc(q)}")
    if q.shape[1] % cache.num_kv_heads or q.shape[3] != kc.shape[3]:
        raise ValueError(f"q: expected a multiple of the cache's {cache.num_kv_heads} KV heads and head dim "
                         f"{kc.shape[3]}, got {_desc(q)}")


def _desc(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def gather_contiguous(cache: PagedKV, lengths=None):
    """The paged cache as left-padded contiguous tensors (for checks and the reference path).

    Returns k, v [B, Hkv, N, D] with N = max length, and kv_start [B] int64 (N - length).
    """
    lengths = cache.host_lengths() if lengths is None else tuple(lengths)
    n_max = max(lengths)
    k, v = (None if t is None else _gather(cache, t, lengths, n_max, left_pad=True)
            for t in (cache.key_cache, cache.value_cache))
    kv_start = to_device([n_max - n for n in lengths], torch.int64, cache.key_cache.device)
    return k, v, kv_start


def gather_keys(cache: PagedKV, lengths) -> torch.Tensor:
    """Keys [B, Hkv, N, D] with position j of sequence b at row j (N = max length; rows past a length: zeros)."""
    return _gather(cache, cache.key_cache, tuple(lengths), max(lengths), left_pad=False)


def gathered_ends(cache: PagedKV, lengths, gathered: bool) -> torch.Tensor | None:
    """Each sequence's end of keys ([B] int32, seq_lens) for the kernels reading keys gathered by gather_keys
    (gathered) or the pages themselves; None where the gathered scratch is filled by every sequence (one
    request, as a prefill chunk is selected), so that the kernels take their variant without per-sequence ends:
    1.5x faster in the pooled-score passes at 128K (H100: benchmarks/results/paged_h100_end_variant.txt)."""
    return None if gathered and len(set(lengths)) == 1 else cache.seq_lens.to(torch.int32)


def _gather(cache: PagedKV, t: torch.Tensor, lengths: tuple, n_max: int, left_pad: bool) -> torch.Tensor:
    bsz, hkv, d = len(lengths), t.shape[2], t.shape[3]
    dense = torch.zeros(bsz, hkv, n_max, d, dtype=t.dtype, device=t.device)
    for b, n in enumerate(lengths):
        pages = cache.block_table[b, : -(-n // cache.page_size)].long()
        rows = t[pages].reshape(-1, hkv, d)[:n]  # [n, Hkv, D]
        lo = n_max - n if left_pad else 0
        dense[b, :, lo:lo + n] = rows.transpose(0, 1)
    return dense


# ----------------------------------------------------------------------------------------------
# selections resolved to pool rows once per anchor
# ----------------------------------------------------------------------------------------------


@dataclass
class PoolRows:
    """An anchor's selected positions resolved to rows of a linear page pool.

    rows [like Selection.indices] int32: page * page_size + offset of each valid slot (0 elsewhere),
    for the block_table they were resolved with. Reuse layers that see the same block table (every
    layer of one serving step does) then gather K/V rows by a single index, as on a contiguous
    cache, instead of looking each position's page up again in every layer.
    """

    rows: torch.Tensor
    block_table: torch.Tensor


def linear_pool(cache: PagedKV) -> bool:
    """True when rows of the page pool are evenly spaced (s_page == page_size * s_tok): [pages, page, H, D]."""
    ts = [cache.key_cache] + ([cache.value_cache] if cache.value_cache is not None else [])
    return all(t.stride(0) == cache.page_size * t.stride(1) for t in ts)


def pool_rows(cache: PagedKV, which: str = "key") -> KVRows:
    """KVRows of the pool as one long sequence of rows (row r = page r // P, offset r % P), shared by all sequences."""
    t = cache.key_cache if which == "key" else cache.value_cache
    return KVRows(t, 0, t.stride(2), t.stride(1))


RESOLVE_BLOCK = 256


# K and U (the budget and the tile count) change with every length; HKV is 1 in head-granular views
@triton.jit(do_not_specialize=["K", "U", "HKV"])
def _resolve_rows_kernel(IDX, CNT, BT, ROWS, K, U, HKV, s_bt, PAGE: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS[r, j] = BT[b, IDX[r, j] // PAGE] * PAGE + IDX[r, j] % PAGE for the counts[b, u] valid slots of row r."""
    r = tl.program_id(0)  # (b * HKV + h) * U + u
    u = r % U
    b = r // (U * HKV)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cnt = tl.load(CNT + b * U + u)
    ok = j < tl.minimum(cnt, K)
    pos = tl.load(IDX + r.to(tl.int64) * K + j, mask=ok, other=0)
    page = tl.load(BT + b.to(tl.int64) * s_bt + pos // PAGE, mask=ok, other=0)
    tl.store(ROWS + r.to(tl.int64) * K + j, tl.where(ok, page * PAGE + pos % PAGE, 0), mask=j < K)


def resolve_rows(cache: PagedKV, indices: torch.Tensor, counts: torch.Tensor) -> PoolRows | None:
    """PoolRows of a selection (indices [B, Hkv, U, K] positions, counts [B, U]); None unless linear_pool.

    One small kernel, no host synchronisation (capturable in a CUDA graph).
    """
    if not linear_pool(cache):
        return None
    idx = indices.contiguous()
    bsz, hkv, u, k = idx.shape
    cnt = counts[:, :u].to(torch.int32).contiguous()
    rows = torch.empty_like(idx)
    block = RESOLVE_BLOCK  # one block size for every budget: one compiled variant
    _resolve_rows_kernel[(bsz * hkv * u, triton.cdiv(k, block))](
        idx, cnt, cache.block_table, rows, k, u, hkv, cache.block_table.stride(0), PAGE=cache.page_size, BLOCK=block)
    return PoolRows(rows, cache.block_table)
