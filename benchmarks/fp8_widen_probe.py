"""GPU probe of the FP8 decode K pass's widening (kascade.kernels.decode CONFIG["logits"]["fp8_widen"]): each e4m3
key widened to float16 against q's rows scaled into float16 ("f16", the default) or to q's bf16 ("q", one more
conversion per key), at 128K keys, B = 1 and 8, Llama-3.1-8B attention shape (32 query / 8 KV heads, head dim
128), random bf16 data, rho 0.1, k_min 128, tile 32.

Per size: CUDA-graph replay medians [p20, p80] (benchmarks/decode.bench) of exact selection, FP8 selection with
each widening, and the anchor (selection + attention over the selected keys) for each; the K pass alone
(_decode_logits_kernel, eager, torch.profiler) with its bytes per second; and whether the two widenings select
the same keys (the FP8 logits agree bit for bit where the products are exact). FA3 (when it imports) gives the
anchor / FA3 ratio of the same run (the best of the FA3 settings benchmarks/decode.py tries).

    PYTHONPATH=. python benchmarks/fp8_widen_probe.py --out DIR      # DIR/fp8_widen_<gpu>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode as DB  # noqa: E402  (benchmarks/decode.py: bench, kernel_profile, fa3_module)
from report_json import short_device_name  # noqa: E402

from kascade import fp8keys  # noqa: E402
from kascade.kernels import decode as KD  # noqa: E402

HQ, HKV, D, RHO, K_MIN = 32, 8, 128, 0.1, 128


def measure(B: int, N: int, fa3) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(B * 7 + 1)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    copy = fp8keys.quantize(k)
    row = dict(B=B, N=N, exact_select=DB.bench(lambda: KD.select(q, k, RHO, K_MIN, 32)),
               exact_anchor=DB.bench(lambda: KD.anchor(q, k, v, RHO, K_MIN, 32)))
    if fa3 is not None:
        qf, kf, vf = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        lens = torch.full((B,), N, dtype=torch.int32, device="cuda")
        provs = DB.dense_providers(q, k, v, qf, kf, vf, lens, fa3)  # FA3 at every setting decode.py tries: the best
        row["fa3"] = min((dict(DB.bench(fn), variant=name) for name, fn in provs.items() if name.startswith("fa3")),
                         key=lambda r: r["ms"])
    sels = {}
    for widen in ("f16", "q"):
        KD.CONFIG["logits"]["fp8_widen"] = widen
        select = lambda: KD.select_fp8(q, copy, RHO, K_MIN, 32)  # noqa: E731
        anchor = lambda: KD.sparse_attention(q, k, v, KD.select_fp8(q, copy, RHO, K_MIN, 32))  # noqa: E731
        row[f"fp8_select_{widen}"] = DB.bench(select)
        row[f"fp8_anchor_{widen}"] = DB.bench(anchor)
        prof = DB.kernel_profile(select)
        us = next((t for name, t in prof.items() if name.startswith("_decode_logits_kernel")), float("nan"))
        bytes_read = B * HKV * N * (D + 4) + B * HKV * N * 4 * (HQ // HKV)  # e4m3 rows + scales, fp32 logits out
        row[f"k_pass_{widen}"] = dict(us=us, tb_per_s=bytes_read / (us * 1e-6) / 1e12)
        sels[widen] = select()
    KD.CONFIG["logits"]["fp8_widen"] = "f16"
    a, b = sels["f16"], sels["q"]
    row["same_selection"] = bool(torch.equal(a.counts, b.counts) and torch.equal(
        a.indices.sort(-1).values, b.indices.sort(-1).values))
    return row


def report(res: dict) -> str:
    meta = res["meta"]
    lines = [f"# FP8 decode K pass: keys widened to float16 against bf16\n",
             f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. "
             "CUDA-graph replay medians (us); the K pass eager, from torch.profiler, with the bytes it moves "
             "(e4m3 rows, scales, fp32 logits) per second. Command: `PYTHONPATH=. python benchmarks/fp8_widen_probe.py`.\n",
             "| B | N | FA3 | exact select | exact anchor | FP8 select f16 / q | FP8 anchor f16 / q | anchor / FA3 f16 / q "
             "| K pass f16 / q (us) | K pass TB/s f16 / q | same selection |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        us = lambda key: r[key]["ms"] * 1e3  # noqa: E731
        fa3 = r.get("fa3")
        ratio = (lambda key: f"{r[key]['ms'] / fa3['ms']:.3f}x") if fa3 else (lambda key: "-")
        lines.append(f"| {r['B']} | {r['N'] // 1024}K | {us('fa3') if fa3 else float('nan'):.1f} | {us('exact_select'):.1f} | "
                     f"{us('exact_anchor'):.1f} | {us('fp8_select_f16'):.1f} / {us('fp8_select_q'):.1f} | "
                     f"{us('fp8_anchor_f16'):.1f} / {us('fp8_anchor_q'):.1f} | {ratio('fp8_anchor_f16')} / "
                     f"{ratio('fp8_anchor_q')} | {r['k_pass_f16']['us']:.1f} / {r['k_pass_q']['us']:.1f} | "
                     f"{r['k_pass_f16']['tb_per_s']:.2f} / {r['k_pass_q']['tb_per_s']:.2f} | {r['same_selection']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--sizes", default="1x131072,8x131072")
    args = ap.parse_args(argv)
    import triton

    fa3 = DB.fa3_module()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=str(datetime.date.today()), fa3="fa3_fwd_interface" if fa3 else "not importable")
    rows = []
    for size in args.sizes.split(","):
        B, N = map(int, size.split("x"))
        rows.append(measure(B, N, fa3))
        print(json.dumps(rows[-1]), flush=True)
    res = dict(meta=meta, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"fp8_widen_{short_device_name(meta['device'])}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    text = report(res)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
