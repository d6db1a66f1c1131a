"""The decode K pass (_decode_logits_kernel) compiled for sm_90 (Hopper) with Triton's NVIDIA backend on a machine
without a GPU, for bf16 keys and for the FP8 copy with each widening (CONFIG["logits"]["fp8_widen"]): registers
and the SASS instructions that widen keys and multiply them. Shows, without a GPU, what each key costs the FP8
pass beyond its bytes: widening e4m3 to bf16 takes F2FP.F16.E4M3 (two keys) then F2F.BF16.F16 (one key, a
conversion unit of a quarter of the FP32 rate), widening to float16 the first alone.

    python benchmarks/decode_sass.py [-o benchmarks/results/decode_fp8_sass_sm90_cpu.md] [--json]

Needs Triton's compiler, not its interpreter: run without TRITON_INTERPRET=1.

Shapes: the Llama-3.1-8B attention shape (G = 4 query heads per KV head, head dim 128), the default launch
settings (CONFIG["logits"]: BLOCK_N 128, 4 warps, 3 stages), contiguous cache, programmatic dependent launch on.
Counts are static (each instruction once in the compiled code); the main loop's body holds nearly all of the
widening ones, per warp per block of BLOCK_N / warps keys.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kascade.kernels import decode as KD  # noqa: E402

G, HEAD_DIM = 4, 128
POINTERS = {"Q": "*bf16", "LG": "*fp32", "MP": "*fp32", "LP": "*fp32", "OP": "*fp32", "KV_START": "*i32",
            "KV_LEN": "*i32", "START32": "*i32", "END32": "*i32", "KB": "*i32", "FT": "*i64", "HIST": "*i32",
            "BT": "*i32"}
FLOATS = ("scale_log2", "RHO_A", "RHO_B", "RHO_C", "GUARD_A", "GUARD_B", "GUARD_C")
DIVISIBLE = ("Q", "K", "V", "LG", "MP", "LP", "OP", "KV_START", "KV_LEN", "START32", "END32", "KB", "FT", "HIST",
             "BT", "KS", "stride_lg", "sqb", "sqh", "skb", "skh", "svb", "svh", "sks_seq", "sks_head")
VARIANTS = {"bf16 keys": dict(FP8=False), 'FP8, widened to bf16 ("q")': dict(FP8=True, WIDEN_F16=False),
            'FP8, widened to float16 ("f16", default)': dict(FP8=True, WIDEN_F16=True)}
SHOWN = ("F2F", "F2FP", "PRMT", "HMMA", "LDSM", "LDS", "IMAD.MOV")


def compile_k_pass(variant: dict):
    fn = KD._decode_logits_kernel
    cl = KD.CONFIG["logits"]
    fp8 = variant["FP8"]
    keys = "*fp8e4nv" if fp8 else "*bf16"
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(POINTERS, K=keys, V=keys, **{n: "fp32" for n in FLOATS})
    const = dict(PAGE=1, G=G, GPAD=16, D=HEAD_DIM, DP=HEAD_DIM, DV=HEAD_DIM, DVP=HEAD_DIM, BLOCK_N=cl["BLOCK_N"],
                 HAS_START=False, HAS_LEN=False, DENSE_OUT=False, SELECT=True, DOT_PREC=None, UPCAST=False,
                 PAGED=False, PDL=2, skn=HEAD_DIM, svn=HEAD_DIM, **variant)
    if fp8:
        sig["KS"] = "*fp32"
        const["sks_tok"] = 1
    else:
        const.update(KS=None, sks_seq=0, sks_head=0, sks_tok=0)
    sig.update({n: "constexpr" for n in const})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE if n not in const}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cl["num_warps"], num_stages=cl["num_stages"]))


def sass_counts(kernel) -> tuple[int, collections.Counter]:
    """Registers per thread and the opcode counts (with modifiers) of the kernel's SASS (cuobjdump, from Triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9][A-Z0-9_.]*)", sass))
    return regs, ops


def shown(ops: collections.Counter, prefix: str) -> str:
    found = sorted((n, c) for n, c in ops.items() if n == prefix or n.startswith(prefix + "."))
    return ", ".join(f"{c} {n}" for n, c in found) or "0"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", help="write the markdown table here (else print it)")
    ap.add_argument("--json", action="store_true", help="print {variant: {registers, ops}} as JSON instead")
    args = ap.parse_args(argv)
    if args.json:
        found = {name: sass_counts(compile_k_pass(v)) for name, v in VARIANTS.items()}
        print(json.dumps({name: dict(registers=r, ops=dict(ops)) for name, (r, ops) in found.items()}))
        return
    cl = KD.CONFIG["logits"]
    lines = ["# The decode K pass's instructions, bf16 and FP8 keys, compiled for sm_90 on the CPU\n",
             f"CPU (no GPU), {datetime.date.today()}, triton {triton.__version__}. Command: "
             "`python benchmarks/decode_sass.py -o benchmarks/results/decode_fp8_sass_sm90_cpu.md`. "
             f"G {G}, head dim {HEAD_DIM}, BLOCK_N {cl['BLOCK_N']}, {cl['num_warps']} warps, {cl['num_stages']} stages: "
             f"one warp's block is {cl['BLOCK_N'] // cl['num_warps']} keys x {HEAD_DIM} = "
             f"{cl['BLOCK_N'] // cl['num_warps'] * HEAD_DIM // 32} key elements per thread. Static counts of the "
             "compiled kernel.\n",
             "| keys | registers | SASS instructions | " + " | ".join(SHOWN) + " |",
             "|---|---|---|" + "---|" * len(SHOWN)]
    for name, variant in VARIANTS.items():
        regs, ops = sass_counts(compile_k_pass(variant))
        lines.append(f"| {name} | {regs} | {sum(ops.values())} | " + " | ".join(shown(ops, p) for p in SHOWN) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
