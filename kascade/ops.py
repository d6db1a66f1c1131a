"""Backend dispatch for the three attention steps a Kascade layer takes.

    dense(q, k, v)                        layer 0, short sequences, the `dense` strategy
    anchor(q, k, v, ...) -> (out, sel)    top-k selection, then sparse (default) or dense output
    select_fp8(q, k, key_copy, ...) -> sel  top-k selection scored from an FP8 copy of the keys
    reuse(q, k, v, sel, head_map) -> out  attention over the mapped anchor head's keys

backend: "reference" (pure PyTorch, any device), "triton" (kernels in kascade.kernels; CUDA, or the
CPU under TRITON_INTERPRET=1), or "auto" (triton on CUDA tensors when the kernel for the step is
available, the reference otherwise). Shapes are those of kascade.reference; every step takes
kv_start [B] (left padding) and kv_len [B] (valid keys of a preallocated cache), None by default.
"""

from __future__ import annotations

import importlib
import os

import torch

from kascade import reference
from kascade.checks import check_attention_inputs, resolve_kv_start

BACKENDS = ("auto", "reference", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _kernel_module(mode: str):
    """kascade.kernels.decode / .prefill, or None when not importable (no Triton, or not built yet)."""
    try:
        return importlib.import_module(f"kascade.kernels.{mode}")
    except ImportError:
        return None


def _use_triton(q: torch.Tensor, backend: str, mode: str):
    check_backend(backend)
    if backend == "reference":
        return None
    mod = _kernel_module(mode)
    on_triton_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton":
        if mod is None:
            raise ValueError(f"backend: 'triton' was asked for but kascade.kernels.{mode} cannot be imported "
                             "(is Triton installed?); use backend='reference'")
        if not on_triton_device:
            raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                             f"got tensors on {q.device}; use backend='reference'")
        return mod
    return mod if (mod is not None and q.is_cuda) else None


def _mode(q: torch.Tensor) -> str:
    return "decode" if q.shape[2] == 1 else "prefill"


def sdpa_causal(q, k, v, scale=None) -> torch.Tensor:
    """Causal attention of the last Q positions over N >= Q keys by torch SDPA: [B, Hq, Q, Dv].

    Q == N: a whole prompt; Q == 1: a decode step (every key); 1 < Q < N: a chunk on top of a cache,
    causal from the bottom right (SDPA's lower-right causal bias: flash attention, no mask tensor).
    """
    n, qlen = k.shape[2], q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if qlen == n or qlen == 1:
        return sdpa(q, k, v, is_causal=qlen > 1, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return sdpa(q, k, v, attn_mask=causal_lower_right(qlen, n), scale=scale, enable_gqa=gqa)


def sdpa_padded(q, k, v, kv_start, scale=None) -> torch.Tensor:
    """Causal attention of left-padded sequences by torch SDPA: [B, Hq, Q, Dv], padding query rows zero.

    One SDPA call per sequence over its keys [kv_start[b], N) and its real query rows (the last Q positions of
    the cache; those before kv_start[b] are padding): a whole prompt, or a chunk on top of a cache causal from
    the bottom right. Reads kv_start on the host (a prefill step, never a captured one). A sequence SDPA cannot
    take without a [Q, N] mask (a chunk on top of a cache without the flash kernel) runs the reference."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for b, s, _, _, i0 in reference._sequences(q, k, resolve_kv_start(kv_start, q, k)):
        if i0 >= q.shape[2]:
            continue  # every query row of this sequence is padding
        qb, kb, vb = q[b : b + 1, :, i0:], k[b : b + 1, :, s:], v[b : b + 1, :, s:]
        if _sdpa_takes(qb, kb, vb):
            out[b : b + 1, :, i0:] = sdpa_causal(qb, kb, vb, scale)
        else:
            out[b : b + 1, :, i0:] = reference.dense_attention(qb, kb, vb, scale=scale)
    return out


def dense(q, k, v, kv_start=None, scale=None, backend: str = "auto", kv_len=None):
    """Causal dense attention [B, Hq, Q, Dv]. On CUDA without padding, torch SDPA (flash/cuDNN; a prefill
    chunk on top of a cache too); with left padding, a prompt or chunk by SDPA one sequence at a time
    (sdpa_padded); a decode step with padding (on CUDA) or a preallocated cache takes the decode kernel (no
    mask, no host sync)."""
    check_backend(backend)
    if q.shape[2] == 1 and (kv_len is not None or (kv_start is not None and q.is_cuda)):
        mod = _use_triton(q, backend, "decode")
        if mod is not None:
            return mod.dense_attention(q, k, v, kv_start=kv_start, scale=scale, kv_len=kv_len)
    if backend != "reference" and q.is_cuda and kv_start is None and kv_len is None:
        check_attention_inputs(q, k, v)
        if _sdpa_takes(q, k, v):
            return sdpa_causal(q, k, v, scale)
    if backend != "reference" and q.is_cuda and kv_start is not None and kv_len is None and q.shape[2] > 1:
        check_attention_inputs(q, k, v)
        return sdpa_padded(q, k, v, kv_start, scale)
    return reference.dense_attention(q, k, v, kv_start=kv_start, scale=scale, kv_len=kv_len)


def _sdpa_takes(q, k, v) -> bool:
    """True when sdpa_causal runs without a [Q, N] mask: a whole prompt, a decode step, or a chunk on top of a
    cache that SDPA's flash kernel takes."""
    return q.shape[2] in (k.shape[2], 1) or _flash_takes(q, k, v)


def _flash_takes(q, k, v) -> bool:
    """True when SDPA's flash kernel takes these inputs. A chunk on top of a cache needs it: without flash,
    SDPA's lower-right causal bias builds a [Q, N] mask (the reference is memory-bounded instead)."""
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, q.shape[1] != k.shape[1]), False))
    except (ImportError, TypeError, RuntimeError):
        return False


def _len_kw(kv_len):
    """kv_len as a keyword only when given (prefill kernels take none: callers slice the cache)."""
    return {} if kv_len is None else {"kv_len": kv_len}


def select(q, k, rho, k_min, tile, kv_start=None, scale=None, backend: str = "auto",
           kv_len=None) -> reference.Selection:
    """Top-k selection of an anchor layer (see kascade.reference.select)."""
    mod = _use_triton(q, backend, _mode(q))
    if mod is not None:
        return mod.select(q, k, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start, scale=scale, **_len_kw(kv_len))
    return reference.select(q, k, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start, scale=scale, kv_len=kv_len)


def select_fp8(q, k, key_copy, rho, k_min, tile, kv_start=None, scale=None, backend: str = "auto", kv_len=None,
               rerank=None, kv_heads=None) -> reference.Selection:
    """Top-k selection scored from an FP8 copy of the keys (see kascade.fp8keys.select): q [B, S * G, Q, D]
    the query heads of the copy's S KV heads, k [B, Hkv, N, D] the exact keys (read at the candidates by a
    re-rank; KV head kv_heads[h] for copy head h, default h), key_copy (keys [B, S, N, D] float8_e4m3fn,
    scales [B, S, N] float32). The kernels need e4m3 support (CUDA compute capability 8.9 and newer, or the
    interpreter): elsewhere "auto" takes the reference."""
    mod = _use_triton(q, backend, _mode(q))
    if mod is not None and backend == "auto" and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        mod = None
    if mod is not None:
        if q.shape[2] == 1:
            return mod.select_fp8(q, key_copy, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start, scale=scale,
                                  kv_len=kv_len, rerank=rerank, k=k, kv_heads=kv_heads)
        from kascade.kernels import prefill_fp8

        return prefill_fp8.select_fp8(q, key_copy, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start, scale=scale,
                                      kv_len=kv_len, rerank=rerank, k=k, kv_heads=kv_heads)
    from kascade import fp8keys

    return fp8keys.select(q, key_copy[0], key_copy[1], rho, k_min, tile, kv_start=kv_start, scale=scale,
                          kv_len=kv_len, rerank=rerank, k=k, kv_heads=kv_heads)


def reuse(q, k, v, selection, head_map=None, kv_start=None, scale=None, backend: str = "auto", kv_len=None):
    """Sparse attention over selected keys (see kascade.reference.sparse_attention)."""
    mod = _use_triton(q, backend, _mode(q))
    if mod is not None:
        return mod.sparse_attention(q, k, v, selection, head_map=head_map, kv_start=kv_start, scale=scale,
                                    **_len_kw(kv_len))
    return reference.sparse_attention(q, k, v, selection, head_map=head_map, kv_start=kv_start, scale=scale,
                                      kv_len=kv_len)


def part_anchor(q, k, v, heads: slice, sources, route, rho, k_min, tile, kv_start=None, scale=None,
                backend: str = "auto", kv_len=None):
    """A part-selecting layer: the KV heads `heads` (a slice) select, the others reuse rows of an earlier
    layer's Selection `sources` (route [Hkv]: the source row of head h, or -1 - j for own head j).
    Returns (out, Selection of the own heads [B, S, U, Kmax]).

    A decode step on the kernels takes one sparse pass (kascade.kernels.decode.part_anchor); otherwise the
    own heads select on their strided view, their selection is stacked with `sources` in head order and
    the layer attends to it (kascade.reference.sparse_attention semantics either way)."""
    mod = _use_triton(q, backend, _mode(q))
    if mod is not None and hasattr(mod, "part_anchor"):
        return mod.part_anchor(q, k, v, heads, sources, route, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start,
                               scale=scale, **_len_kw(kv_len))
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    own = select(q.unflatten(1, (hkv, g))[:, heads].flatten(1, 2), k[:, heads], rho, k_min, tile, kv_start=kv_start,
                 scale=scale, backend=backend, kv_len=kv_len)
    rt = torch.as_tensor(route, device=q.device, dtype=torch.int64)
    rows = torch.where(rt < 0, sources.num_kv_heads - 1 - rt, rt)  # rows of [sources..., own...]
    sel = reference.gather_heads([sources, own], rows)
    return reuse(q, k, v, sel, None, kv_start=kv_start, scale=scale, backend=backend, kv_len=kv_len), own


def anchor(q, k, v, rho, k_min, tile, kv_start=None, scale=None, dense_output=False, backend: str = "auto",
           kv_len=None):
    """Select the top-k keys, then attend to them (or densely). Returns (out, selection).

    A kernel module with its own fused `anchor` (one pass over K for logits, selection and output) is
    used as such."""
    mod = _use_triton(q, backend, _mode(q))
    if mod is not None and hasattr(mod, "anchor"):
        return mod.anchor(q, k, v, rho=rho, k_min=k_min, tile=tile, kv_start=kv_start, scale=scale,
                          dense_output=dense_output, **_len_kw(kv_len))
    sel = select(q, k, rho, k_min, tile, kv_start=kv_start, scale=scale, backend=backend, kv_len=kv_len)
    if dense_output:
        return dense(q, k, v, kv_start=kv_start, scale=scale, backend=backend, kv_len=kv_len), sel
    return reuse(q, k, v, sel, None, kv_start=kv_start, scale=scale, backend=backend, kv_len=kv_len), sel
