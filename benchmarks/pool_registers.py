"""Registers, spills and shared memory of the prefill pooled-score pass (_pool_kernel), bf16 and FP8, compiled
for sm_90 (Hopper) with Triton's NVIDIA backend on a machine without a GPU: the compiler runs on the host and
`cuobjdump -res-usage` (shipped with Triton) reads the cubin. Shows why the FP8 pass runs fewer programs per SM.

    python benchmarks/pool_registers.py                     # the default launch settings (pool_config)
    python benchmarks/pool_registers.py --config 64,4,3     # BLOCK_N, num_warps, num_stages [, maxnreg]

Shapes: the Llama-3.1-8B attention shape (G = 4 query heads per KV head, head dim 128), tile 32, contiguous
cache. Pointers and strides are specialised as divisible by 16, as the launches on a GPU see them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kascade.kernels import prefill_pool as PP  # noqa: E402

G, TILE, HEAD_DIM = 4, 32, 128
POINTERS = {"Q": None, "K": None, "KV_START": "*i32", "KV_END": "*i32", "COUNTS": "*i32", "BT": "*i32",
            "POOLED": "*fp32", "LSE_BUF": "*fp32"}
DIVISIBLE = ["Q", "K", "KV_START", "KV_END", "COUNTS", "BT", "POOLED", "LSE_BUF", "QS", "K_S", "FINAL", "sqb", "sqh",
             "skb", "skh", "spb", "sph", "spu", "slb", "slh", "slu", "sqsb", "sqsh", "sks_seq", "sks_head", "Q_LEN",
             "N_CACHE"]


def compile_pool(fp8: bool, cfg: dict):
    """The _pool_kernel compiled for sm_90 with launch settings cfg (BLOCK_N, num_warps, num_stages, maxnreg)."""
    fn = PP._pool_kernel
    t_pad, block_g, num_hg = PP.row_layout(G, TILE, HEAD_DIM)
    sig = {name: "i32" for name in fn.arg_names}
    elem = "*fp8e4nv" if fp8 else "*bf16"
    sig.update({n: (t or elem) for n, t in POINTERS.items()})
    sig["qk_scale"] = "fp32"
    const = dict(PAGE=1, G=G, TILE=TILE, T_PAD=t_pad, BLOCK_G=block_g, NUM_HG=num_hg, HEAD_DIM=HEAD_DIM,
                 BLOCK_D=HEAD_DIM, BLOCK_N=cfg["BLOCK_N"], UPCAST=False, PAGED=False, HAS_END=False, FP8=fp8,
                 NATIVE=fp8, STORE_LSE=False, skn=HEAD_DIM, sqm=HEAD_DIM)
    if fp8:
        sig.update(QS="*fp32", K_S="*fp32", FINAL="*i32")
        const.update(sks_tok=1, sqsm=1)
    else:
        const.update(QS=None, K_S=None, FINAL=None)
    sig.update({n: "constexpr" for n in const})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE if n not in const}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def resources(kernel) -> dict:
    """Registers, stack (spills) per thread and static shared memory, from cuobjdump -res-usage."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "pool_registers.cubin"
    path.write_bytes(kernel.asm["cubin"])
    out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
    return dict(registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]), shared_bytes=kernel.metadata.shared)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", default=[],
                    help="BLOCK_N,num_warps,num_stages[,maxnreg] (repeatable; default: pool_config's)")
    args = ap.parse_args(argv)
    configs = [dict(zip(("BLOCK_N", "num_warps", "num_stages", "maxnreg"), map(int, c.split(",")))) for c in args.config]
    configs = configs or [PP.pool_config(G, TILE, HEAD_DIM)]
    print(f"triton {triton.__version__}, sm_90, G {G}, tile {TILE}, head dim {HEAD_DIM}")
    print("| keys | BLOCK_N | warps | stages | maxnreg | registers | spill stack (B) | shared (B) | programs per SM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        for fp8 in (False, True):
            r = resources(compile_pool(fp8, cfg))
            threads = 32 * cfg["num_warps"]
            per_sm = min(65536 // (r["registers"] * threads), 228 * 1024 // max(1, r["shared_bytes"] + 1024))
            print(f"| {'fp8' if fp8 else 'bf16'} | {cfg['BLOCK_N']} | {cfg['num_warps']} | {cfg['num_stages']} | "
                  f"{cfg.get('maxnreg', '-')} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} | {per_sm} |")


if __name__ == "__main__":
    main()
