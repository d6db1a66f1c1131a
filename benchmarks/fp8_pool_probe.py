"""GPU probe of selection from the FP8 copy of the keys: prefill selection at 32K keys, exact against FP8 with several
launch settings of the pooled-score pass; the compiled pass's registers, spills and TTGIR (written to $OUT); the
decode selection at 128K keys (B = 1, eager launches, not CUDA graphs), exact, FP8 and FP8 with re-rank 2.
Random bf16 q and k of the Llama-3.1-8B attention shape (32 query / 8 KV heads, head dim 128), rho 0.1, k_min 128,
tile 32; medians of triton.testing.do_bench.

    OUT=DIR PYTHONPATH=. python benchmarks/fp8_pool_probe.py     (PN: the prefill length, default 32768)
"""
import os, sys, re, torch, triton
from triton.testing import do_bench
from kascade import fp8keys
from kascade.kernels import prefill as P, prefill_fp8 as PF, prefill_pool as PP, decode as KD
out = os.environ.get("OUT", "/tmp/out")
torch.manual_seed(0)
dev = "cuda"
N = int(os.environ.get("PN", 32768))
q = torch.randn(1, 32, N, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 8, N, 128, device=dev, dtype=torch.bfloat16)
copy = fp8keys.quantize(k)
t_ex = do_bench(lambda: P.select(q, k, 0.1, 128, 32), rep=150)
t_f8 = do_bench(lambda: PF.select_fp8(q, copy, 0.1, 128, 32), rep=150)
t_up = float("nan")
for cfg in [dict(BLOCK_N=128, num_warps=8, num_stages=2, maxnreg=128), dict(BLOCK_N=64, num_warps=8, num_stages=2), dict(BLOCK_N=64, num_warps=4, num_stages=3)]:
    t = do_bench(lambda: PF.select_fp8(q, copy, 0.1, 128, 32, pool_cfg=cfg), rep=150)
    print("fp8 select pool_cfg", cfg, f"{t:.2f} ms")
print(f"prefill select N={N}: exact {t_ex:.2f} ms, fp8 native {t_f8:.2f} ms, fp8 upcast {t_up:.2f} ms")
for name, fn in [("pool", PP._pool_kernel)]:
    for dv, caches in fn.device_caches.items():
        for key, kern in caches[0].items():
            ir = kern.asm.get("ttgir", "")
            tag = "fp8" if "f8E4M3" in ir else "bf16"
            with open(f"{out}/{name}_{tag}_{abs(hash(key)) % 10000}.ttgir", "w") as f:
                f.write(ir)
            sass = kern.asm.get("sass", "") or ""
            ptx = kern.asm.get("ptx", "")
            print(name, tag, "wgmma:", len(re.findall(r"wgmma\.mma_async", ptx)), "ex2:", len(re.findall(r"ex2\.approx", ptx)),
                  "cvt_layout:", ir.count("convert_layout"), "local_alloc:", ir.count("local_alloc"), "n_regs", kern.n_regs,
                  "spills", kern.n_spills, "shared", kern.metadata.shared)
# decode: exact anchor select vs fp8 select vs fp8 rerank 2 at 128K, B=1
M = 131072
qd = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16)
kd = torch.randn(1, 8, M, 128, device=dev, dtype=torch.bfloat16)
cd = fp8keys.quantize(kd)
r = {}
r["exact"] = do_bench(lambda: KD.select(qd, kd, 0.1, 128, 32), rep=100)
r["fp8"] = do_bench(lambda: KD.select_fp8(qd, cd, 0.1, 128, 32), rep=100)
r["fp8_rerank2"] = do_bench(lambda: KD.select_fp8(qd, cd, 0.1, 128, 32, rerank=2.0, k=kd), rep=100)
print("decode select 128K B=1 (ms, eager, not graphs):", {a: round(b, 4) for a, b in r.items()})
