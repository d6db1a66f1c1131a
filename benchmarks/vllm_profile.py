"""Where a vLLM step's time goes: the CUDA time of one call, by kind of kernel, and the GPU's idle share.

Used by `benchmarks/vllm_serving.py cell --profile` (GPU only). torch.profiler records the CUDA kernels of the
call (those replayed from CUDA graphs too, where CUPTI reports them); each kernel is put in one kind by its name:

    flash_attention   vLLM's FlashAttention kernels (the baseline's attention, and Kascade's dense layer 0)
    kascade           the Triton kernels of kascade.kernels (selection, sparse and dense paged attention)
    gemm              matrix multiplications (cuBLAS, CUTLASS, nvjet)
    kv_cache_write    vLLM's cache write (reshape_and_cache)
    other             everything else (norms, rotary embedding, activations, copies, sampling)

`idle_s` is the call's wall time minus the summed kernel time: host work the GPU waits for (launches, Python,
scheduling) when kernels do not overlap, as in one stream. Times in seconds.
"""

from __future__ import annotations

import re
import time

KINDS = ("flash_attention", "kascade", "gemm", "kv_cache_write", "other")
GEMM = re.compile(r"gemm|cutlass|xmma|nvjet|cublas", re.IGNORECASE)
TOP = 15  # kernels listed by name


def kascade_kernel_names() -> set[str]:
    """Names of the Triton kernels in kascade.kernels (the names the profiler reports for them)."""
    import importlib
    import inspect
    import pkgutil

    import kascade.kernels as pkg

    names = set()
    for mod in pkgutil.iter_modules(pkg.__path__):
        try:
            m = importlib.import_module(f"kascade.kernels.{mod.name}")
        except ImportError:  # a module for a Triton feature this install lacks (Gluon)
            continue
        for obj in vars(m).values():
            if not type(obj).__module__.startswith("triton"):
                continue
            fn = obj
            while not inspect.isfunction(fn) and hasattr(fn, "fn"):  # JITFunction, Autotuner, Heuristics keep .fn
                fn = fn.fn
            if inspect.isfunction(fn):
                names.add(fn.__name__)
    return names


def kind_of(name: str, ours: set[str]) -> str:
    """The kind (KINDS) of a kernel called `name`; `ours` are kascade's Triton kernel names."""
    if "reshape_and_cache" in name:
        return "kv_cache_write"
    if "flash" in name.lower():
        return "flash_attention"
    if name in ours or name.split("(")[0].strip() in ours:
        return "kascade"
    if GEMM.search(name):
        return "gemm"
    return "other"


def breakdown(kernels: list[tuple[str, float, int]], wall_s: float, ours: set[str]) -> dict:
    """{wall_s, kernel_s, idle_s, by_kind {kind: s}, top [{name, kind, s, calls}]} from (name, seconds, calls)."""
    by_kind = dict.fromkeys(KINDS, 0.0)
    for name, s, _ in kernels:
        by_kind[kind_of(name, ours)] += s
    total = sum(by_kind.values())
    top = sorted(kernels, key=lambda x: -x[1])[:TOP]
    return {"wall_s": wall_s, "kernel_s": total, "idle_s": max(0.0, wall_s - total), "by_kind": by_kind,
            "top": [{"name": n[:160], "kind": kind_of(n, ours), "s": s, "calls": c} for n, s, c in top],
            "kernels": [[n, s, c] for n, s, c in kernels]}


def minus(a: dict, b: dict, ours: set[str] | None = None) -> dict:
    """The breakdown of what call `a` ran beyond call `b` (per kernel name: time and calls of a less those of b),
    e.g. N + 1 generated tokens less 1: the N decode steps without the prefill step that starts both."""
    ours = kascade_kernel_names() if ours is None else ours
    left = {n: [s, c] for n, s, c in a["kernels"]}
    for n, s, c in b["kernels"]:
        if n in left:
            left[n][0] -= s
            left[n][1] -= c
    kernels = [(n, s, c) for n, (s, c) in left.items() if s > 0 and c > 0]
    return breakdown(kernels, max(0.0, a["wall_s"] - b["wall_s"]), ours)


def profile(fn) -> dict:
    """breakdown() of the CUDA kernels that `fn()` runs (GPU only)."""
    import torch
    from torch.profiler import ProfilerActivity

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            kernels.append((e.key, us / 1e6, e.count))
    return breakdown(kernels, wall, kascade_kernel_names())


def markdown(name: str, p: dict) -> list[str]:
    """Table lines of one breakdown: the share of each kind and of the idle time in the wall time."""
    w = p["wall_s"]
    cells = " | ".join(f"{1000 * p['by_kind'][k]:.1f} ({100 * p['by_kind'][k] / w:.0f}%)" for k in KINDS)
    return [f"| {name} | {1000 * w:.1f} | {cells} | {1000 * p['idle_s']:.1f} ({100 * p['idle_s'] / w:.0f}%) |"]


def markdown_header() -> list[str]:
    return ["| cell, phase | wall (ms) | " + " | ".join(f"{k} (ms)" for k in KINDS) + " | idle (ms) |",
            "|---" * (len(KINDS) + 3) + "|"]
