"""Peak CPU memory of the pure-PyTorch reference on a long prefill (Llama-3.1-8B attention shapes).

Allocates the whole KV cache of a 32-layer model (bf16 by default: 32 x 2 x [1, 8, N, 128]) and runs the
Kascade strategy of a 5-anchor plan over the first `--run-layers` layers (layer 0 dense + select, an
anchor, reuse layers). The working set of one layer does not depend on which layer runs, so the peak
of a full 32-layer pass is the cache plus the largest per-layer working set measured here.

    python benchmarks/reference_memory.py --tokens 32768 --run-layers 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import time
from pathlib import Path

import torch

from kascade.plan import Plan
from kascade.strategy import KascadeStrategy


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--run-layers", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results/reference_memory")
    args = ap.parse_args()
    L, Hq, Hkv, D, N = 32, 32, 8, 128, args.tokens
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    cache = [(torch.randn(1, Hkv, N, D, generator=g).to(dtype), torch.randn(1, Hkv, N, D, generator=g).to(dtype))
             for _ in range(L)]
    after_cache = peak_rss_gib()
    plan = Plan(anchors=[0, 2, 8, 13, 14], head_map=None, rho=0.1, k_min=128, tile=32,
                model={"num_layers": L, "num_q_heads": Hq, "num_kv_heads": Hkv, "head_dim": D})
    strategy = KascadeStrategy(plan, backend="reference")
    strategy.begin_forward()
    times = []
    for layer in range(args.run_layers):
        q = torch.randn(1, Hq, N, D, generator=g).to(dtype)
        t0 = time.perf_counter()
        out = strategy.attend(layer, q, *cache[layer], None, None)
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(out).all()
        print(f"layer {layer}: {times[-1]:.1f} s, peak RSS so far {peak_rss_gib():.2f} GiB", flush=True)
    res = {
        "date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(), "torch": torch.__version__, "tokens": N, "dtype": args.dtype,
        "layers_in_cache": L, "layers_run": args.run_layers, "layer_seconds": times,
        "peak_rss_after_cache_gib": after_cache, "peak_rss_gib": peak_rss_gib(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(
        f"# Reference memory, {N}-token prefill, Llama-3.1-8B attention shapes ({res['date']})\n\n"
        f"CPU ({res['cpus']} threads), torch {res['torch']}, {args.dtype} KV cache of {L} layers "
        f"({after_cache:.2f} GiB peak RSS after allocating it).\n\n"
        f"| layers run | seconds per layer | peak RSS (GiB) |\n|---|---|---|\n"
        f"| {args.run_layers} (dense+select, reuse, anchor) | {', '.join(f'{t:.0f}' for t in times)} | "
        f"{res['peak_rss_gib']:.2f} |\n"
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
