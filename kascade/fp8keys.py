"""Selection from a low-precision copy of the keys: FP8 (e4m3) keys with per-token scales.

An anchor reads all N keys of a KV head to score them, and only k ~ rho * N of them to attend. Scoring
from an FP8 copy of K (1 byte a value plus a 4-byte scale a token, against 2 bytes a value in bf16)
halves the bytes of the scoring pass, as DeepSeek-V3.2's sparse-attention indexer scores keys in FP8.
Only the (layer, KV head)s that select need the copy (kascade.routing: anchors, layer 0 when a later
layer reads it, the selecting heads of a head-granular plan).

Format (`quantize`): for every token and KV head, scale = max |k| / 448 (e4m3's largest finite value)
in float32, k8 = round-to-nearest-even(k / scale) as torch.float8_e4m3fn, so dequantize(k8, scale) =
k8 * scale is within 2^-4 |k| of k (3 mantissa bits) and within scale * 2^-10 for values in e4m3's
subnormal range. A token whose keys are all zero has scale 1.

Scores (`select`, the reference every kernel matches):
- decode (Q == 1): logits q . dequantize(k8) * scale, q in its own dtype (decode is memory bound: the
  bytes of K are what costs, so only K is quantized);
- prefill (Q > 1): q is quantized the same way (per query row and head), so that on GPUs with FP8 tensor
  cores (compute capability 8.9 and newer) the two Q.K passes multiply FP8 by FP8; logits
  dequantize(q8) . dequantize(k8) * scale.
The pooled post-softmax scores and the top-k then follow kascade.reference exactly.

Exact re-ranking (`rerank=c`, c >= 1): the FP8 scores choose c * k candidates (budget k(n) with
rho * c and k_min * c, `candidate_budget`), whose exact logits are then computed from the bf16 keys (and
the unquantized queries); the top k(n) of their exact pooled scores are kept. Each query row's softmax
denominator is the best one at hand: exact terms for the candidates (and, in prefill, for the tile's own
keys), FP8 terms for every other key, log(sum_{j in E} exp(l_j) + sum_{j not in E} exp(l8_j)); with
every key a candidate it is the exact one, so the selection is exact selection.

Storage:
- `KeyCopies` (transformers' caches): per layer, the copy of its selecting heads [B, S, capacity, D] and
  the scales [B, S, capacity], allocated at the layer's first update and grown with the cache; new rows
  are written whenever the layer's keys are (kascade.integrations.transformers attaches one to the cache
  object, so it is freed with the cache). `nbytes` reports its memory.
- `PagedKeyCopies` (kascade.paged, serving engines): per layer [num_blocks, block_size, S, D] and
  [num_blocks, block_size, S], written by slot like the engine's own cache write (`write`: tensor operations
  only, padding slots sent to a scratch row, so it runs inside a CUDA graph; kascade.integrations.vllm_gpu
  writes one per layer beside vLLM's cache).
- without either, `transient` quantizes the selecting heads' keys at each call (same scores, no bytes
  saved): what the strategies fall back to when called directly.
"""

from __future__ import annotations

import math

import torch

from kascade import reference
from kascade.budget import budget, check_budget
from kascade.checks import check_attention_inputs, resolve_kv_len, resolve_kv_start
from kascade.host import to_device

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
SELECT_KEYS = ("exact", "fp8")


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


def check_options(select_keys, rerank, where: str = "") -> None:
    """ValueError naming the argument unless select_keys is 'exact' or 'fp8' and rerank is None or a
    number >= 1 (only with 'fp8')."""
    pre = f"{where}" if where else ""
    if select_keys not in SELECT_KEYS:
        raise ValueError(f"{pre}select_keys: expected one of {SELECT_KEYS}, got {select_keys!r}")
    if rerank is None:
        return
    if isinstance(rerank, bool) or not isinstance(rerank, (int, float)) or not math.isfinite(rerank) or rerank < 1:
        raise ValueError(f"{pre}rerank: expected None or a number >= 1 (candidates per selected key, e.g. 2.0), "
                         f"got {rerank!r}")
    if select_keys != "fp8":
        raise ValueError(f"{pre}rerank: re-ranks the candidates of select_keys='fp8', got rerank={rerank!r} with "
                         f"select_keys={select_keys!r}; pass select_keys='fp8' or rerank=None")


def candidate_budget(rho: float, k_min: int, rerank: float) -> tuple[float, int]:
    """(rho', k_min') of the candidate set: k(n; rho', k_min') = min(n, max(ceil(c k_min), floor(min(1, c rho) n)))."""
    c = float(rerank)
    return min(1.0, float(rho) * c), int(math.ceil(k_min * c))


# ----------------------------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 float8_e4m3fn like x, scale float32 [x.shape[:-1]]): per row of the last dim, scale = amax / 448."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x8 = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return x8, scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 x8 * scale (scale broadcast over the last dim)."""
    return x8.float() * scale[..., None]


def check_select_args(q, key_copy, rerank, k, kv_heads, paged: bool = False):
    """(k8, k_scale, kv_heads as an int32 tensor on q's device or None) after the argument checks shared by the
    FP8 selection kernels (decode and prefill, contiguous or paged): key_copy = (keys, scales) of the copy with
    S heads (axis 1, or 2 when `paged`), q [B, S * G, Q, D] float, and with rerank the exact keys k and, when
    given, the KV head of k each copy head reads. A device tensor kv_heads (a route's cached one) is taken as
    it is, not read back."""
    if not isinstance(key_copy, (tuple, list)) or len(key_copy) != 2:
        raise ValueError(f"key_copy: expected (keys, scales) of the FP8 copy, got {type(key_copy).__name__}")
    k8, ks = key_copy
    check_copy(k8, ks)
    check_options("fp8", rerank)
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: expected a float [batch, heads, queries, head_dim] tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    s = k8.shape[2] if paged else k8.shape[1]
    if q.shape[1] % s or q.shape[-1] != k8.shape[-1] or q.device != k8.device:
        raise ValueError(f"key_copy: expected {q.shape[1]} query heads to be a multiple of the copy's KV heads and "
                         f"head dim {q.shape[-1]} on {q.device}, got keys of shape {tuple(k8.shape)} on {k8.device}")
    if rerank is None:
        return k8, ks, None
    if k is None:
        raise ValueError("k: rerank re-scores the candidates with the exact keys; pass the key cache")
    if kv_heads is None:
        return k8, ks, None
    if isinstance(kv_heads, torch.Tensor) and kv_heads.device == q.device:
        return k8, ks, kv_heads
    hkv = k.shape[2] if paged else k.shape[1]
    heads = [int(h) for h in (kv_heads.tolist() if isinstance(kv_heads, torch.Tensor) else kv_heads)]
    if len(heads) != s or any(not 0 <= h < hkv for h in heads):
        raise ValueError(f"kv_heads: expected {s} KV heads of k (< {hkv}), one per copy head, got {heads}")
    return k8, ks, to_device(heads, torch.int32, q.device)


def check_rerank_keys(k, k8, q) -> None:
    """ValueError unless the exact keys k [B, Hkv, N, D] match a contiguous copy k8 [B, S, N, D] and q's dtype."""
    if k.shape[0] != k8.shape[0] or k.shape[2] != k8.shape[2] or k.dtype != q.dtype:
        raise ValueError(f"k: expected [{k8.shape[0]}, Hkv, {k8.shape[2]}, {k8.shape[3]}] keys of q's dtype "
                         f"{q.dtype}, got {tuple(k.shape)} {k.dtype}")


def check_copy(k8, k_scale, shape=None, name: str = "key_copy") -> None:
    """ValueError unless k8 is float8_e4m3fn [..., D] and k_scale float32 [...] of the same leading shape."""
    if not isinstance(k8, torch.Tensor) or k8.dtype != E4M3:
        raise ValueError(f"{name}: expected float8_e4m3fn keys (kascade.fp8keys.quantize), got "
                         f"{k8.dtype if isinstance(k8, torch.Tensor) else type(k8).__name__}")
    if not isinstance(k_scale, torch.Tensor) or k_scale.dtype != torch.float32 or k_scale.shape != k8.shape[:-1]:
        got = f"{tuple(k_scale.shape)} {k_scale.dtype}" if isinstance(k_scale, torch.Tensor) else type(k_scale).__name__
        raise ValueError(f"{name}: expected float32 scales of shape {tuple(k8.shape[:-1])}, got {got}")
    if shape is not None and tuple(k8.shape) != tuple(shape):
        raise ValueError(f"{name}: expected keys of shape {tuple(shape)}, got {tuple(k8.shape)}")


def transient(k: torch.Tensor, heads=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The copy of k [B, Hkv, N, D]'s heads `heads` (None: all) made now: ([B, S, N, D], [B, S, N])."""
    if heads is not None and list(heads) != list(range(k.shape[1])):
        k = k.index_select(1, torch.as_tensor(list(heads), device=k.device))
    return quantize(k)


# ----------------------------------------------------------------------------------------------
# reference selection
# ----------------------------------------------------------------------------------------------


def _kv_head_list(kv_heads, s: int, k) -> list[int]:
    if kv_heads is None:
        if k is not None and k.shape[1] != s:
            raise ValueError(f"kv_heads: the copy holds {s} heads and k {k.shape[1]}; pass kv_heads, the head of k "
                             "each copy head is")
        return list(range(s))
    hs = [int(h) for h in (kv_heads.tolist() if isinstance(kv_heads, torch.Tensor) else kv_heads)]
    if len(hs) != s or (k is not None and any(not 0 <= h < k.shape[1] for h in hs)):
        raise ValueError(f"kv_heads: expected {s} heads of k (one per copy head), got {hs}")
    return hs


def select(q, k8, k_scale, rho: float = 0.1, k_min: int = 128, tile: int = 32, kv_start=None, scale=None,
           kv_len=None, *, rerank: float | None = None, k=None, kv_heads=None,
           quantize_queries: bool | None = None) -> reference.Selection:
    """kascade.reference.select scored from the FP8 copy (module docstring).

    q [B, S * G, Q, D] (the query heads of the copy's S KV heads); k8 [B, S, N, D] float8_e4m3fn and
    k_scale [B, S, N] float32; kv_start / kv_len as in kascade.reference. rerank: None or c >= 1 (needs
    k, the exact keys [B, Hkv, N, D], and kv_heads [S], the head of k of each copy head, default the
    identity). quantize_queries: None quantizes q for prefill (Q > 1) only. Returns the Selection of the
    S heads (positions ascending, -1 padding, as the reference)."""
    check_copy(k8, k_scale)
    check_options("fp8", rerank)
    check_budget(rho, k_min)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    qlen = q.shape[2]
    quant_q = qlen > 1 if quantize_queries is None else bool(quantize_queries)
    qd = dequantize(*quantize(q)) if quant_q else q.float()
    kd = dequantize(k8, k_scale)
    if rerank is None:
        return reference.select(qd, kd, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start, scale=scale,
                                kv_len=kv_len)
    if k is None:
        raise ValueError("k: rerank re-scores the candidates with the exact keys; pass k [B, Hkv, N, D]")
    check_attention_inputs(qd, kd, None)
    if k.shape[0] != k8.shape[0] or k.shape[2] != k8.shape[2] or k.shape[3] != k8.shape[3]:
        raise ValueError(f"k: expected batch, length and head dim {tuple(k8.shape[::2])} like the copy, got "
                         f"{tuple(k.shape)}")
    heads = _kv_head_list(kv_heads, k8.shape[1], k)
    ke = k[:, heads].float()
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rho_c, kmin_c = candidate_budget(rho, k_min, rerank)
    kv_start = resolve_kv_start(kv_start, qd, kd)
    kv_len = resolve_kv_len(kv_len, qd, kd, kv_start)
    per_seq, first = [], []
    for b, s, e, p0, i0 in reference._sequences(qd, kd, kv_start, kv_len):
        args = (qd[b, :, i0:], q[b, :, i0:].float(), kd[b, :, s:e], ke[b, :, s:e], rho, k_min, rho_c, kmin_c, sc)
        if qd.shape[2] - i0 == 0:
            tiles = []
        elif qlen == 1:
            tiles = [_rerank_decode_seq(*args)]
        else:
            tiles = _rerank_prefill_seq(*args, p0, tile)
        per_seq.append([t + s for t in tiles])
        first.append(0 if qlen == 1 else p0 // tile)
    return _assemble(per_seq, first, q.shape[0], k8.shape[1], tile, qlen == 1, q.device)


def _assemble(per_seq, first, bsz, hkv, tile, decode, device) -> reference.Selection:
    u_max = max(1, max(len(t) for t in per_seq))
    k_max = max([t.shape[1] for ts in per_seq for t in ts] + [1])
    indices = torch.full((bsz, hkv, u_max, k_max), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(bsz, u_max, dtype=torch.int32, device=device)
    for b, ts in enumerate(per_seq):
        for u, t in enumerate(ts):
            indices[b, :, u, : t.shape[1]] = t.to(torch.int32)
            counts[b, u] = t.shape[1]
    return reference.Selection(indices, counts, torch.tensor(first, dtype=torch.int64, device=device), tile, decode)


def _rerank(l8, le, cand, kk, diag=None):
    """Top kk of the candidates `cand` [S, C] by exact pooled score, ascending positions [S, kk].

    l8 [S, R, n] FP8 logits of R query rows (-inf where a row does not see a key), le [S, R, C] exact
    logits of the candidates (all seen by every row); diag (lo, exact logits [S, R, n - lo]) of a prefill
    tile's own keys. Denominators: exact over the candidates (and the tile's keys), FP8 elsewhere."""
    rest = l8.scatter(2, cand[:, None, :].expand(-1, l8.shape[1], -1), float("-inf"))
    parts = [rest, le]
    if diag is not None:
        rest[..., diag[0]:] = float("-inf")
        parts.append(diag[1])
    lse = torch.logsumexp(torch.cat(parts, dim=2), dim=2)  # [S, R]
    score = torch.exp(le - lse[..., None]).sum(1)  # [S, C]
    top = torch.topk(score, kk, dim=-1, sorted=False).indices
    return cand.gather(1, top).sort(dim=-1).values


def _rerank_decode_seq(qd, qe, kd, ke, rho, k_min, rho_c, kmin_c, sc):
    """qd / qe [S*G, 1, D] (scoring / exact queries), kd / ke [S, n, D] -> [S, k(n)] relative positions."""
    hs, n, d = kd.shape
    g = qd.shape[0] // hs
    kk, kc = budget(n, rho, k_min), budget(n, rho_c, kmin_c)
    l8 = torch.einsum("hgd,hnd->hgn", qd.view(hs, g, d), kd) * sc
    if kk >= n or kc <= kk:
        return reference._topk_sorted(torch.softmax(l8, -1).sum(1), kk)
    cand = torch.topk(torch.softmax(l8, -1).sum(1), kc, dim=-1, sorted=False).indices  # [S, kc]
    kc_rows = ke.gather(1, cand[..., None].expand(-1, -1, d))  # [S, kc, D]
    le = torch.einsum("hgd,hcd->hgc", qe.view(hs, g, d), kc_rows) * sc
    return _rerank(l8, le, cand, kk)


def _rerank_prefill_seq(qd, qe, kd, ke, rho, k_min, rho_c, kmin_c, sc, p0, tile):
    """Per tile of one sequence (queries at positions p0..), [S, k_t] relative positions."""
    hs, n, d = kd.shape
    g = qd.shape[0] // hs
    out = []
    for t in range(p0 // tile, (n - 1) // tile + 1):
        nb = t * tile
        kk, kc = budget(nb, rho, k_min), budget(nb, rho_c, kmin_c)
        lo, hi = max(nb, p0), min(nb + tile, n)
        rows = torch.arange(lo, hi, device=qd.device)
        q8 = qd[:, lo - p0: hi - p0].reshape(hs, g * (hi - lo), d)
        l8 = torch.einsum("hrd,hnd->hrn", q8, kd[:, :hi]) * sc
        seen = torch.arange(hi, device=qd.device)[None, :] <= rows.repeat(g)[:, None]  # [G*R, hi]
        l8 = l8.masked_fill(~seen[None], float("-inf"))
        pooled = torch.softmax(l8, -1).sum(1)[:, :nb]
        if kk >= nb or kc <= kk:
            out.append(reference._topk_sorted(pooled, kk))
            continue
        cand = torch.topk(pooled, kc, dim=-1, sorted=False).indices
        kc_rows = ke.gather(1, cand[..., None].expand(-1, -1, d))
        qx = qe[:, lo - p0: hi - p0].reshape(hs, g * (hi - lo), d)
        le = torch.einsum("hrd,hcd->hrc", qx, kc_rows) * sc
        ld = torch.einsum("hrd,hnd->hrn", qx, ke[:, nb:hi]) * sc
        ld = ld.masked_fill(~seen[None, :, nb:], float("-inf"))
        out.append(_rerank(l8, le, cand, kk, (nb, ld)))
    return out


# ----------------------------------------------------------------------------------------------
# storage: transformers' caches
# ----------------------------------------------------------------------------------------------


class LayerCopy:
    """The copy of one layer's selecting heads `heads` in a contiguous cache: keys [B, S, capacity, D]
    float8_e4m3fn and scales [B, S, capacity] float32; rows [0, `rows`) are written (None: unknown, after
    writes at device positions; the whole capacity is then treated as written)."""

    def __init__(self, heads: tuple[int, ...]):
        self.heads = tuple(heads)
        self.keys: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.rows = 0
        self._index: torch.Tensor | None = None  # heads as a device tensor, made outside any CUDA-graph capture

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.scales.numel() * self.scales.element_size()

    def _heads_of(self, k):
        if self.heads == tuple(range(k.shape[1])):
            return k
        return k.index_select(1, self._index)

    def _reserve(self, k, rows: int, exact: bool, capturing: bool):
        """Room for `rows` rows (exactly `rows` when exact: a preallocated cache's length), and the heads' index
        on k's device (a host-to-device copy, which a CUDA-graph capture forbids: made at the first, eager step)."""
        b, _, _, d = k.shape
        if self._index is None or self._index.device != k.device:
            if capturing:
                raise ValueError("key copy: the FP8 copy was never written outside a CUDA graph capture; run one "
                                 "step eagerly first (kascade.integrations.transformers.StaticGenerator does)")
            self._index = torch.as_tensor(self.heads, device=k.device)
        s = len(self.heads)
        if self.keys is not None and self.keys.shape[0] == b and self.keys.shape[2] >= rows:
            return
        if capturing:
            raise ValueError(f"key copy: the FP8 copy holds {0 if self.keys is None else self.keys.shape[2]} rows and "
                             f"this step needs {rows}, which cannot be allocated inside a CUDA graph capture; run "
                             "one decode step eagerly first (kascade.integrations.transformers.StaticGenerator does)")
        cap = rows if exact else max(rows, -(-int(rows * 1.25) // 256) * 256)
        keys = torch.zeros(b, s, cap, d, dtype=E4M3, device=k.device)
        scales = torch.ones(b, s, cap, dtype=torch.float32, device=k.device)
        if self.keys is not None and self.keys.shape[0] == b:
            n = min(self.keys.shape[2], cap)
            keys[:, :, :n] = self.keys[:, :, :n]
            scales[:, :, :n] = self.scales[:, :, :n]
        else:
            self.rows = 0
        self.keys, self.scales = keys, scales

    def update(self, k: torch.Tensor, q_len: int, kv_len=None, capturing: bool = False, capacity: int | None = None):
        """Write the rows of k [B, Hkv, N, D] the step just wrote, then return the views ([B, S, N, D], [B, S, N]).

        kv_len None: the new rows are [N - q_len, N) (rows missing before them are written too); kv_len [B]
        (a decode step on a preallocated cache, q_len == 1): row kv_len[b] - 1 of each sequence, at device
        positions (no host synchronisation). capacity: the cache's fixed length (a preallocated cache), which
        the copy then takes at once; None grows it with the cache."""
        n = k.shape[2]
        if kv_len is None:
            start = max(0, n - q_len)
            self._reserve(k, max(n, capacity or 0), capacity is not None, capturing)
            lo = start if self.rows is None else min(start, self.rows)
            x8, sc = quantize(self._heads_of(k[:, :, lo:n]))
            self.keys[:, :, lo:n] = x8
            self.scales[:, :, lo:n] = sc
            self.rows = n
        else:
            if q_len != 1:
                raise ValueError(f"kv_len: the copy writes rows at kv_len - 1 for decode steps only, got {q_len} "
                                 "queries")
            self._reserve(k, max(n, capacity or 0), True, capturing)
            b, hkv, _, d = k.shape
            pos = (torch.as_tensor(kv_len, device=k.device).long() - 1).clamp(min=0)  # [B]
            new = k.gather(2, pos.view(b, 1, 1, 1).expand(b, hkv, 1, d))  # [B, Hkv, 1, D]
            x8, sc = quantize(self._heads_of(new))
            s = len(self.heads)
            idx = pos.view(b, 1, 1, 1).expand(b, s, 1, d)
            self.keys.view(torch.uint8).scatter_(2, idx, x8.view(torch.uint8))
            self.scales.scatter_(2, pos.view(b, 1, 1).expand(b, s, 1), sc)
            self.rows = None
        return self.keys[:, :, :n], self.scales[:, :, :n]


class KeyCopies:
    """FP8 copies of the selecting heads of every layer of one contiguous cache (LayerCopy per layer)."""

    def __init__(self):
        self.layers: dict[int, LayerCopy] = {}

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the copies (keys and scales of every layer)."""
        return sum(c.nbytes for c in self.layers.values())

    def update(self, layer: int, heads, k: torch.Tensor, q_len: int, kv_len=None, capturing: bool = False,
               capacity: int | None = None):
        """LayerCopy.update of layer `layer`, whose selecting heads are `heads` (fixed for the layer)."""
        heads = tuple(int(h) for h in heads)
        copy = self.layers.get(layer)
        if copy is None or copy.heads != heads:
            copy = self.layers[layer] = LayerCopy(heads)
        return copy.update(k, q_len, kv_len, capturing, capacity)


ATTR = "_kascade_key_copies"


def key_copies(cache) -> KeyCopies | None:
    """The KeyCopies attached to a transformers cache object by kascade.enable(..., select_keys='fp8'), or None."""
    return getattr(cache, ATTR, None) if cache is not None else None


def max_length(cache, layer: int) -> int | None:
    """The fixed length of a transformers cache's layer (a StaticCache's max_cache_len), None when it grows."""
    for name in ("get_max_length", "get_max_cache_shape"):
        fn = getattr(cache, name, None)
        if fn is None:
            continue
        try:
            n = fn(layer)
        except TypeError:
            n = fn()
        return int(n) if n is not None and int(n) > 0 else None
    return None


def attach(cache) -> KeyCopies:
    """The cache's KeyCopies, created at first use (freed with the cache object)."""
    copies = key_copies(cache)
    if copies is None:
        copies = KeyCopies()
        setattr(cache, ATTR, copies)
    return copies


# ----------------------------------------------------------------------------------------------
# storage: paged caches
# ----------------------------------------------------------------------------------------------


class PagedKeyCopies:
    """FP8 copies of the selecting heads of every layer of a paged KV cache (kascade.paged's layout).

        copies = PagedKeyCopies.allocate(plan, num_blocks, block_size, num_kv_heads, head_dim, device)
        copies.write(layer, key, slot_mapping)        # where the engine writes key [T, Hkv, D] into its cache
        strategy.attend(..., key_copies=copies)       # PagedKascadeStrategy(plan, select_keys="fp8")

    PagedKeyCopies(heads, num_blocks, block_size, head_dim, device) allocates the layers of `heads` ({layer:
    its selecting KV heads, ascending}; layers without heads are left out); `allocate` takes them from a plan.
    layers[l] = (keys [num_blocks, block_size, S_l, D] float8_e4m3fn, scales [num_blocks, block_size, S_l]
    float32) for those layers, zero keys and unit scales until written; slot = block * block_size + offset, as
    in vLLM's slot_mapping. Each layer's buffers hold one row more than its num_blocks * block_size slots, a
    scratch row that the padding tokens of an engine's batch (negative slots) are written to, so that `write`
    reads no device value (it can run inside a CUDA graph)."""

    def __init__(self, heads: dict, num_blocks: int, block_size: int, head_dim: int, device=None):
        self.heads = {int(l): tuple(int(h) for h in hs) for l, hs in heads.items() if len(hs)}
        self.num_blocks, self.block_size, self.head_dim = int(num_blocks), int(block_size), int(head_dim)
        n = self.num_blocks * self.block_size
        self._rows: dict = {}  # layer -> (keys [n + 1, S, D], scales [n + 1, S]): the slots, then the scratch row
        self._head_index: dict = {}  # layer -> its heads as an int64 device tensor, None for every head
        self.layers: dict = {}
        for layer, hs in self.heads.items():
            keys = torch.zeros(n + 1, len(hs), self.head_dim, dtype=E4M3, device=device)
            scales = torch.ones(n + 1, len(hs), dtype=torch.float32, device=device)
            self._rows[layer] = (keys, scales)
            self._head_index[layer] = torch.tensor(hs, dtype=torch.long, device=device)
            self.layers[layer] = (keys[:n].view(self.num_blocks, self.block_size, len(hs), self.head_dim),
                                  scales[:n].view(self.num_blocks, self.block_size, len(hs)))

    @staticmethod
    def selecting_heads(plan, num_kv_heads: int, tp_rank: int | None = None) -> dict:
        """{layer: its selecting KV heads (local to rank `tp_rank`'s shard), ascending} for the layers of `plan`
        that select from the copy: anchors, layer 0 when a later layer reads it, part-selecting layers."""
        from kascade.routing import Routing

        routing = Routing(plan, num_kv_heads, tp_rank)
        heads = {}
        for layer in range(plan.num_layers):
            own = routing.layer(layer).own
            if layer == 0 and not routing.used_by_later_layers(0):
                own = []
            if own:
                heads[layer] = tuple(own)
        return heads

    @classmethod
    def allocate(cls, plan, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device=None,
                 tp_rank: int | None = None) -> PagedKeyCopies:
        """The copies of every selecting (layer, KV head) of `plan` (selecting_heads) for a cache of num_blocks
        pages of block_size tokens."""
        return cls(cls.selecting_heads(plan, num_kv_heads, tp_rank), num_blocks, block_size, head_dim, device)

    @staticmethod
    def bytes_per_slot(num_heads: int, head_dim: int) -> int:
        """Bytes of the copy of one token of `num_heads` KV heads: head_dim FP8 values and a float32 scale each."""
        return num_heads * (head_dim + 4)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the copies (keys, scales and scratch rows of every layer)."""
        return sum(k.numel() * k.element_size() + s.numel() * s.element_size() for k, s in self._rows.values())

    def layer(self, layer: int):
        """(keys, scales) of `layer`; ValueError for a layer without selecting heads."""
        if layer not in self.layers:
            raise ValueError(f"key_copies: layer {layer} has no selecting heads in this copy (layers "
                             f"{sorted(self.layers)}); allocate it from the plan the strategy runs")
        return self.layers[layer]

    def write(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Quantize the selecting heads of key [T', Hkv, D] into their slots: token i < T goes to slot_mapping[i]
        ([T] int, T <= T'; the rows of key after T are padding, as vLLM passes them). Negative slots (padding
        tokens) go to the scratch row. Pure tensor operations: nothing is read back to the host."""
        if layer not in self._rows:
            return
        keys, scales = self._rows[layer]
        t = slot_mapping.shape[0]
        if key.dim() != 3 or key.shape[0] < t or key.shape[2] != self.head_dim:
            raise ValueError(f"key: expected [at least {t} tokens (slot_mapping), num_kv_heads, {self.head_dim}], "
                             f"got shape {tuple(key.shape)}")
        heads, idx = self.heads[layer], self._head_index[layer]
        src = key[:t] if heads == tuple(range(key.shape[1])) else key[:t].index_select(1, idx.to(key.device))
        slots = slot_mapping.to(keys.device).long()
        slots = torch.where(slots >= 0, slots, keys.shape[0] - 1)  # padding tokens -> the scratch row
        x8, sc = quantize(src)  # [T, S, D], [T, S]
        keys.view(torch.uint8).index_copy_(0, slots, x8.view(torch.uint8))
        scales.index_copy_(0, slots, sc)
