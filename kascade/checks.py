"""Input checks shared by the reference, the kernels and the integrations.

Every error is a ValueError that names the argument, what was expected, what came, and the fix.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
    """q [B, Hq, Q, D], k/v [B, Hkv, N, D]; same dtype and device; Hq a multiple of Hkv; Q <= N."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected 4 dims [batch, heads, seq_len, head_dim], got {_desc(t)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected float32, float16 or bfloat16, got {_desc(t)}")
    for name, t in named[1:]:
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected the dtype and device of q ({q.dtype}, {q.device}), got {_desc(t)}")
    b, hq, qlen, d = q.shape
    bk, hkv, n, dk = k.shape
    if bk != b:
        raise ValueError(f"k: expected batch {b} like q, got {_desc(k)}")
    if dk != d:
        raise ValueError(f"k: expected head_dim {d} like q, got {_desc(k)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"k: expected a number of KV heads dividing q's {hq} heads (GQA), got {_desc(k)}"
        )
    if qlen == 0 or qlen > n:
        raise ValueError(
            f"q: expected 1 <= seq_len <= the cache length {n} (queries are the newest cache positions), "
            f"got {_desc(q)}"
        )
    if v is not None and (v.shape[:3] != k.shape[:3]):
        raise ValueError(f"v: expected the first three dims of k {tuple(k.shape[:3])}, got {_desc(v)}")


def resolve_kv_start(kv_start, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """kv_start [B] int (left-padding length per sequence) on q's device; zeros when None."""
    b, n = q.shape[0], k.shape[2]
    if kv_start is None:
        return torch.zeros(b, dtype=torch.int64, device=q.device)
    kv_start = torch.as_tensor(kv_start, device=q.device)
    if kv_start.shape != (b,) or kv_start.dtype.is_floating_point:
        raise ValueError(f"kv_start: expected an integer tensor of shape ({b},), got {tuple(kv_start.shape)} {kv_start.dtype}")
    if b and (int(kv_start.min()) < 0 or int(kv_start.max()) >= n):
        raise ValueError(f"kv_start: expected values in [0, {n}) (at least one real key per sequence), got {kv_start.tolist()}")
    return kv_start.to(torch.int64)


def resolve_kv_len(kv_len, q: torch.Tensor, k: torch.Tensor, kv_start=None) -> torch.Tensor | None:
    """kv_len [B] int (valid keys per sequence: positions >= kv_len[b] are unwritten) on q's device, or None.

    The queries of sequence b sit at positions kv_len[b] - Q .. kv_len[b] - 1. None means every
    sequence fills the whole cache (kv_len = N). Checked here (host sync): Q <= kv_len[b] <= N and
    kv_start[b] < kv_len[b].
    """
    if kv_len is None:
        return None
    b, qlen, n = q.shape[0], q.shape[2], k.shape[2]
    kv_len = torch.as_tensor(kv_len, device=q.device)
    if kv_len.shape != (b,) or kv_len.dtype.is_floating_point:
        raise ValueError(f"kv_len: expected an integer tensor of shape ({b},), got {tuple(kv_len.shape)} {kv_len.dtype}")
    if b and (int(kv_len.min()) < qlen or int(kv_len.max()) > n):
        raise ValueError(f"kv_len: expected values in [{qlen}, {n}] (the queries are the newest written keys, "
                         f"the cache holds {n}), got {kv_len.tolist()}")
    if b and kv_start is not None and bool((torch.as_tensor(kv_start, device=q.device) >= kv_len).any()):
        raise ValueError(f"kv_len: expected every kv_len[b] > kv_start[b] (at least one real key), got kv_len "
                         f"{kv_len.tolist()} and kv_start {torch.as_tensor(kv_start).tolist()}")
    return kv_len.to(torch.int64)


def check_head_map(head_map, hkv: int, anchor_hkv: int, device) -> torch.Tensor:
    """head_map [Hkv] of values in [0, anchor_hkv); None is the identity. Returns int64 on device."""
    if anchor_hkv != hkv:
        raise ValueError(f"selection: expected {hkv} KV heads like k, got a selection of {anchor_hkv}")
    if head_map is None:
        return torch.arange(hkv, device=device)
    hm = torch.as_tensor(head_map, device=device)
    if hm.shape != (hkv,) or hm.dtype.is_floating_point:
        raise ValueError(f"head_map: expected {hkv} integer KV-head indices, got shape {tuple(hm.shape)} {hm.dtype}")
    if hkv and (int(hm.min()) < 0 or int(hm.max()) >= anchor_hkv):
        raise ValueError(f"head_map: expected values in [0, {anchor_hkv}), got {hm.tolist()}")
    return hm.to(torch.int64)
