"""GPU probe of selection from the FP8 copy of the keys, second part: the decode selection with re-rank 2 at 128K
keys (B = 1) kernel by kernel (torch.profiler, 5 calls after 3 warm-up calls), and the prefill selection at 32K
and 128K keys, exact against FP8 with launch settings of the pooled-score pass that need fewer registers per SM
(benchmarks/pool_registers.py). Random bf16 data of the Llama-3.1-8B attention shape, rho 0.1, k_min 128, tile 32;
medians of triton.testing.do_bench.

    PYTHONPATH=. python benchmarks/fp8_launch_probe.py
"""
import os, torch
from triton.testing import do_bench
from kascade import fp8keys
from kascade.kernels import prefill as P, prefill_fp8 as PF, decode as KD
torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name())
# decode re-rank breakdown
M = 131072
qd = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16)
kd = torch.randn(1, 8, M, 128, device=dev, dtype=torch.bfloat16)
cd = fp8keys.quantize(kd)
for _ in range(3):
    KD.select_fp8(qd, cd, 0.1, 128, 32, rerank=2.0, k=kd)
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        KD.select_fp8(qd, cd, 0.1, 128, 32, rerank=2.0, k=kd)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=48))
for N in (32768, 131072):
    q = torch.randn(1, 32, N, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, N, 128, device=dev, dtype=torch.bfloat16)
    copy = fp8keys.quantize(k)
    rep = 100 if N == 32768 else 30
    res = {"exact": do_bench(lambda: P.select(q, k, 0.1, 128, 32), rep=rep)}
    cfgs = [dict(BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=2),
            dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=168),
            dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=4)]
    if N == 131072:
        cfgs = cfgs[:1] + cfgs[3:4]
    for c in cfgs:
        try:
            res["fp8 " + ",".join(f"{a}={b}" for a, b in c.items())] = do_bench(
                lambda: PF.select_fp8(q, copy, 0.1, 128, 32, pool_cfg=c), rep=rep)
        except Exception as e:
            print("fail", c, repr(e)[:200])
    print(f"N={N}", {a: round(b, 2) for a, b in res.items()})
    del q, k, copy
    torch.cuda.empty_cache()
