"""Which FP8 scale granularity keeps the exact top-k: keys per token (shipped), per block of 128 keys or per channel,
and prefill queries per row (shipped) or one scale per tile and KV group; recall and attention mass on the CPU.

Why: the prefill FP8 pooled pass spends registers on scales that vary along its MMA's N side (notes_prefill.md:
231 registers with per-key and per-row scales, 127 with one key scale per block in loop 1 and one q scale per
tile in loop 2). A coarser scale is only worth it if selection keeps what it finds.

    python benchmarks/fp8_scales.py [--model models/smollm2-135m-instruct] [-o benchmarks/results/fp8_scales_cpu]

Per scheme, the reference selection (kascade.reference.select, rho 0.1, k_min 128, tile 32) over the round-tripped
e4m3 keys (and queries, prefill) against the exact top-k of the unquantized scores, with recall and mass as in
benchmarks/fp8_select.py. Sources: SmolLM2-135M-Instruct's own q and k (every third layer from 1, 4,096 tokens of
data/heldout.txt; decode for the last 8 positions, prefill on 16 selecting tiles) and random bf16 q, k of the
Llama-3.1-8B attention shape at 4,096 keys. Key scales: per token (amax / 448, kascade.fp8keys); per block of 128
keys of a head (the block's amax); per channel (each head's channel amax over the first 512 keys, times 4 for later
keys, which are clamped beyond it: a cache must fix such scales when it is first written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import fp8_select as FS  # noqa: E402  (benchmarks/fp8_select.py: scoring, tiles, the SmolLM2 recorder)

from kascade import fp8keys, reference  # noqa: E402
from kascade.budget import budget  # noqa: E402

E4M3 = torch.float8_e4m3fn
RHO, K_MIN, TILE = 0.1, 128, 32


def round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x through e4m3 with the given (broadcast) scales, clamped to e4m3's range, back in float32."""
    return (x / scale).clamp(-fp8keys.FP8_MAX, fp8keys.FP8_MAX).to(E4M3).float() * scale


def keys_per_token(k):
    return fp8keys.dequantize(*fp8keys.quantize(k)).float()


def keys_per_block(k, block: int = 128):
    b, h, n, d = k.shape
    x = torch.nn.functional.pad(k.float(), (0, 0, 0, (-n) % block)).view(b, h, -1, block, d)
    amax = x.abs().amax(dim=(3, 4), keepdim=True).clamp(min=1e-12)
    return round_trip(x, amax / fp8keys.FP8_MAX).view(b, h, -1, d)[:, :, :n]


def keys_per_channel(k, first: int = 512, headroom: float = 4.0):
    amax = k[:, :, :first].float().abs().amax(2, keepdim=True).clamp(min=1e-12)
    return round_trip(k.float(), amax * headroom / fp8keys.FP8_MAX)


def queries_per_row(q):
    return fp8keys.dequantize(*fp8keys.quantize(q)).float()


def queries_per_tile(q, hkv: int, tile: int = TILE):
    b, hq, n, d = q.shape
    x = torch.nn.functional.pad(q.float().view(b, hkv, hq // hkv, n, d), (0, 0, 0, (-n) % tile))
    t = x.view(b, hkv, hq // hkv, -1, tile, d)
    amax = t.abs().amax(dim=(2, 4, 5), keepdim=True).clamp(min=1e-12)
    return round_trip(t, amax / fp8keys.FP8_MAX).view(b, hkv, hq // hkv, -1, d)[:, :, :, :n].reshape(b, hq, n, d)


KEYS = {"per token (shipped)": keys_per_token, "per 128-key block": keys_per_block,
        "per channel (first 512 keys, x4)": keys_per_channel}
QUERIES = {"per row (shipped)": queries_per_row, "per tile": queries_per_tile}


def _decode(q, k, kd):
    pooled, exact, kk = FS.decode_exact(q, k, RHO, K_MIN)
    sel = reference.select(q.float(), kd, rho=RHO, k_min=K_MIN, tile=TILE)
    return FS._score(pooled, exact, sel.indices[0, :, 0, :kk].long())[:2]


def _prefill(q, k, kd, qd, tiles):
    out = []
    for t in tiles:
        lo, hi = t * TILE, min(t * TILE + TILE, k.shape[2])
        pooled = FS._tile_pooled(q[0], k[0], t, TILE, q.shape[-1] ** -0.5)
        kk = budget(lo, RHO, K_MIN)
        sel = reference.select(qd[:, :, lo:hi], kd[:, :, :hi], rho=RHO, k_min=K_MIN, tile=TILE)
        out.append(FS._score(pooled, torch.topk(pooled, kk, dim=-1).indices, sel.indices[0, :, 0, :kk].long())[:2])
    return torch.cat([r for r, _ in out]), torch.cat([m for _, m in out])


def measure(pairs, hkv: int, decode_queries: int = 8, tiles: int = 16) -> list[dict]:
    """Rows (mode, keys, queries, recall mean / p10, mass mean / min) over the (q, k) pairs [1, H, N, D]."""
    got: dict[tuple, list] = {}
    for q, k in pairs:
        n = k.shape[2]
        picked = FS.prefill_tiles(n, RHO, K_MIN, TILE, tiles)
        for kname, keys in KEYS.items():
            kd = keys(k)
            for pos in range(n - decode_queries, n):
                got.setdefault(("decode", kname, "-"), []).append(
                    _decode(q[:, :, pos:pos + 1], k[:, :, :pos + 1], kd[:, :, :pos + 1]))
            for qname, queries in QUERIES.items():
                qd = queries(q) if queries is queries_per_row else queries(q, hkv)
                got.setdefault(("prefill", kname, qname), []).append(_prefill(q, k, kd, qd, picked))
    rows = []
    for (mode, kname, qname), vals in got.items():
        r = torch.cat([v[0] for v in vals])
        m = torch.cat([v[1] for v in vals])
        rows.append(dict(mode=mode, keys=kname, queries=qname, recall=r.mean().item(), recall_p10=r.quantile(0.1).item(),
                         mass=m.mean().item(), mass_min=m.min().item(), count=r.numel()))
    return rows


def smollm2_pairs(model_dir: str, length: int = 4096):
    import kascade
    from kascade.models import load_model

    model, tok = load_model(model_dir, device="cpu", dtype="float32")
    text = (ROOT / "data" / "heldout.txt").read_text()[: 40 * length]
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :length]
    rec = FS._Recorder()
    with torch.no_grad(), kascade.enable(model, strategy=rec):
        model(ids)
    return [rec.qk[layer] for layer in sorted(rec.qk)][1::3]


def markdown(res: dict) -> str:
    lines = ["# FP8 scale granularity: what selection keeps\n",
             f"CPU, {res['date']}, torch {res['torch']}. Command: `{res['command']}`. Reference selections (rho 0.1, "
             "k_min 128, tile 32) over round-tripped e4m3 keys (and queries, prefill) against the exact top-k; recall "
             "= share of the exact set found, mass = share of the exact set's pooled attention kept (module "
             "docstring of benchmarks/fp8_scales.py).\n",
             "| source | mode | keys | queries | recall (p10) | mass (min) | sets |", "|---|---|---|---|---|---|---|"]
    for src, rows in res["sources"].items():
        for r in rows:
            lines.append(f"| {src} | {r['mode']} | {r['keys']} | {r['queries']} | {r['recall']:.4f} ({r['recall_p10']:.4f}) "
                         f"| {r['mass']:.5f} ({r['mass_min']:.4f}) | {r['count']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "fp8_scales_cpu"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    sources = {"SmolLM2-135M, 4K, 10 layers": measure(smollm2_pairs(args.model), 3)}
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, 4096, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 8, 4096, 128, generator=g).to(torch.bfloat16)
    sources["random, 8B shape, 4K"] = measure([(q, k)], 8)
    res = dict(date=str(datetime.date.today()), torch=torch.__version__, seconds=round(time.time() - t0),
               command="python benchmarks/fp8_scales.py", sources=sources)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
