"""How much of the exact top-k an FP8 copy of the keys finds: recall and attention mass, with and without re-rank.

    python benchmarks/fp8_select.py                                   # CPU: random data and SmolLM2, both
    python benchmarks/fp8_select.py --device cuda --length 131072 --prefill-length 131072 --sources random

For every selecting query and KV head (decode: one query over its whole prefix; prefill: every query tile
whose budget is below its keys, k(tT) < tT), with p the exact pooled post-softmax scores of kascade.reference
(summed over the GQA group, and over the tile's rows in prefill), E the exact top-k set and S the set chosen
from the FP8 copy (kascade.fp8keys: e4m3 keys with per-token scales; prefill also quantizes q):

    recall = |S & E| / k        mass = sum_S p / sum_E p        (the share of the exact top-k's mass S keeps)

and `topk_mass` = sum_E p / sum p, how concentrated attention is. `rerank` c: the FP8 scores choose c k
candidates, re-scored with the exact keys (kascade.fp8keys docstring).

Sources:
- random: q, k ~ N(0, 1) rounded to bf16, Llama-3.1-8B attention (32 q / 8 KV heads, head dim 128); decode
  at --length keys (--decode-queries queries), prefill at --prefill-length. Softmax over such logits is
  flat (a hard case: the top 10% hold little more than 10% of the mass).
- smollm2: SmolLM2-135M-Instruct's own q and k (after RoPE; 9 q / 3 KV heads, head dim 64, 30 layers),
  recorded by a dense forward over --prompt-length tokens of data/heldout.txt (from --offset); decode for
  the last --decode-queries positions of the prompt, each over its prefix; prefill for every tile.
On the CPU the FP8 selections are the reference's (kascade.fp8keys.select, which the kernels match:
tests/test_fp8_select.py); with --device cuda they are the Triton kernels' (kascade.ops.select_fp8, bf16).
Prefill statistics are taken on --prefill-tiles selecting tiles spread evenly over the prompt, each selected as
the chunk of its own queries on top of the keys before it (which selects what the whole prompt's selection
selects for that tile).
Writes OUT.json (per source, mode and selection: mean, 10th percentile, minimum and count of each
statistic; per layer for SmolLM2) and OUT.md (default benchmarks/results/fp8_select_<device>);
`--report IN.json OUT_STEM` rewrites them from a JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from report_json import short_device_name  # noqa: E402  (benchmarks/report_json.py: the GPU's name in file names)

from kascade import fp8keys, ops  # noqa: E402
from kascade.budget import budget  # noqa: E402
from kascade.strategy import Strategy  # noqa: E402

# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def _select(q, k, copy, rho, k_min, tile, rerank, device_kind):
    """The FP8 selection of q over k ([1, Hq, Q, D], [1, Hkv, N, D]; Q > 1: the last Q positions, tiled from
    position 0) from the copy (keys, scales) of k."""
    if device_kind == "cuda":
        return ops.select_fp8(q, k, copy, rho, k_min, tile, backend="triton", rerank=rerank)
    return fp8keys.select(q.float(), *copy, rho, k_min, tile, rerank=rerank, k=k.float())


def _score(pooled, exact_idx, got_idx):
    """(recall, mass, topk_mass) per head: pooled [H, n] exact scores, index sets [H, k]."""
    kk = exact_idx.shape[1]
    hit = torch.zeros_like(pooled, dtype=torch.bool).scatter_(1, exact_idx, True)
    recall = hit.gather(1, got_idx).sum(1).float() / kk
    m_exact = pooled.gather(1, exact_idx).sum(1)
    mass = pooled.gather(1, got_idx).sum(1) / m_exact
    return recall, mass, m_exact / pooled.sum(1)


def decode_exact(q, k, rho, k_min):
    """(pooled [Hkv, N] exact scores, exact top-k indices [Hkv, k], k) of one query q [1, Hq, 1, D] over k."""
    hkv, n = k.shape[1], k.shape[2]
    g = q.shape[1] // hkv
    s = torch.einsum("hgd,hnd->hgn", q[0, :, 0].float().view(hkv, g, -1), k[0].float()) * q.shape[-1] ** -0.5
    pooled = torch.softmax(s, -1).sum(1)
    kk = budget(n, rho, k_min)
    return pooled, torch.topk(pooled, kk, dim=-1).indices, kk


def decode_stats(q, k, copy, rho, k_min, reranks, device_kind) -> dict:
    """{rerank name: {recall, mass, topk_mass lists over heads}} for one query q [1, Hq, 1, D] over k."""
    pooled, exact, kk = decode_exact(q, k, rho, k_min)
    out = {}
    for rr in reranks:
        sel = _select(q, k, copy, rho, k_min, 32, rr, device_kind)
        got = sel.indices[0, :, 0, :kk].long()
        r, m, t = _score(pooled, exact, got)
        out[_name(rr)] = dict(recall=r.tolist(), mass=m.tolist(), topk_mass=t.tolist())
    return out


def _tile_pooled(q, k, t, tile, scale):
    """Exact pooled scores [Hkv, tT] of tile t of a whole prompt (q [Hq, N, D], k [Hkv, N, D])."""
    hkv, n = k.shape[0], k.shape[1]
    g = q.shape[0] // hkv
    lo, hi = t * tile, min(t * tile + tile, n)
    s = torch.einsum("hgrd,hnd->hgrn", q[:, lo:hi].float().view(hkv, g, hi - lo, -1), k[:, :hi].float()) * scale
    causal = torch.arange(hi, device=q.device)[None, :] > torch.arange(lo, hi, device=q.device)[:, None]
    p = torch.softmax(s.masked_fill(causal, float("-inf")), -1)
    return p.sum((1, 2))[:, :lo]


def prefill_tiles(n, rho, k_min, tile, max_tiles):
    """The tiles of an n-token prompt that select (k(tT) < tT), at most max_tiles of them evenly spread."""
    tiles = [t for t in range(1, -(-n // tile)) if budget(t * tile, rho, k_min) < t * tile]
    if max_tiles is not None and len(tiles) > max_tiles:
        step = len(tiles) / max_tiles
        tiles = [tiles[int(i * step)] for i in range(max_tiles)]
    return tiles


def prefill_stats(q, k, copy, rho, k_min, tile, reranks, device_kind, max_tiles=None) -> dict:
    """{rerank name: {recall, mass, topk_mass lists over (tile, head)}} for a prompt q [1, Hq, N, D] over k.

    Each sampled tile t is selected as the chunk of its own queries on top of the keys before it (tiles count
    from the first position, so this selects what the whole prompt's selection does for that tile)."""
    out = {_name(rr): dict(recall=[], mass=[], topk_mass=[]) for rr in reranks}
    for t in prefill_tiles(k.shape[2], rho, k_min, tile, max_tiles):
        lo, hi = t * tile, min(t * tile + tile, k.shape[2])
        pooled = _tile_pooled(q[0], k[0], t, tile, q.shape[-1] ** -0.5)
        kk = budget(lo, rho, k_min)
        exact = torch.topk(pooled, kk, dim=-1).indices
        part = (copy[0][:, :, :hi], copy[1][:, :, :hi])
        for rr in reranks:
            sel = _select(q[:, :, lo:hi], k[:, :, :hi], part, rho, k_min, tile, rr, device_kind)
            assert int(sel.first_tile[0]) == t
            r, m, tm = _score(pooled, exact, sel.indices[0, :, 0, :kk].long())
            o = out[_name(rr)]
            o["recall"] += r.tolist()
            o["mass"] += m.tolist()
            o["topk_mass"] += tm.tolist()
    return out


def _name(rr) -> str:
    return "fp8" if rr is None else f"fp8+rerank{rr:g}"


def summary(values) -> dict:
    """mean, 10th percentile, minimum and count of a list of values (a summary is returned as it is)."""
    if isinstance(values, dict):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    return dict(mean=round(float(t.mean()), 6), p10=round(float(torch.quantile(t, 0.1)), 6),
                min=round(float(t.min()), 6), n=len(values))


def summarized(data: dict) -> dict:
    """The results with every list of per-sample values replaced by its summary (what the JSON keeps)."""
    for d in data["sources"].values():
        for mode in ("decode", "prefill"):
            d[mode]["stats"] = {name: {key: summary(v) for key, v in st.items()} for name, st in d[mode]["stats"].items()}
    return data


def _merge(into: dict, part: dict) -> None:
    for name, d in part.items():
        acc = into.setdefault(name, dict(recall=[], mass=[], topk_mass=[]))
        for key in acc:
            acc[key] += d[key]


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


def random_source(args, reranks, dev) -> dict:
    hq, hkv, d = 32, 8, 128
    g = torch.Generator().manual_seed(args.seed)
    rows = {}
    t0 = time.time()
    k = torch.randn(1, hkv, args.length, d, generator=g).to(torch.bfloat16).to(dev)
    copy = fp8keys.quantize(k)
    dec = {}
    for _ in range(args.decode_queries):
        q = torch.randn(1, hq, 1, d, generator=g).to(torch.bfloat16).to(dev)
        _merge(dec, decode_stats(q, k, copy, args.rho, args.k_min, reranks, dev.type))
    rows["decode"] = dict(length=args.length, queries=args.decode_queries, stats=dec)
    del k, copy
    n = args.prefill_length
    q = torch.randn(1, hq, n, d, generator=g).to(torch.bfloat16).to(dev)
    k = torch.randn(1, hkv, n, d, generator=g).to(torch.bfloat16).to(dev)
    pre = prefill_stats(q, k, fp8keys.quantize(k), args.rho, args.k_min, args.tile, reranks, dev.type,
                        args.prefill_tiles)
    rows["prefill"] = dict(length=n, tiles=len(prefill_tiles(n, args.rho, args.k_min, args.tile, args.prefill_tiles)),
                           stats=pre)
    return dict(shape="32 q / 8 KV heads, head dim 128 (Llama-3.1-8B attention)", seconds=time.time() - t0,
                **rows)


class _Recorder(Strategy):
    """Dense attention in every layer; keeps each layer's q and k (after RoPE)."""

    name = "record"

    def __init__(self):
        super().__init__("reference")
        self.qk = {}

    def attend(self, layer, q, k, v, kv_start, scale, kv_len=None):
        self.qk[layer] = (q.detach().clone(), k.detach().clone())
        return super().attend(layer, q, k, v, kv_start, scale, kv_len)


def smollm2_source(args, reranks, dev) -> dict:
    import kascade
    from kascade.models import load_model

    t0 = time.time()
    model, tok = load_model(args.model, device=dev.type, dtype="bfloat16" if dev.type == "cuda" else "float32")
    text = (ROOT / "data" / "heldout.txt").read_text()[args.offset: args.offset + 40 * args.prompt_length]
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, : args.prompt_length].to(dev)
    if ids.shape[1] < args.prompt_length:
        raise SystemExit(f"--prompt-length: only {ids.shape[1]} tokens from --offset {args.offset}")
    rec = _Recorder()
    with torch.no_grad(), kascade.enable(model, strategy=rec):
        model(ids)
    layers = sorted(rec.qk)
    dec_all, pre_all, per_layer = {}, {}, {}
    n = ids.shape[1]
    for layer in layers:
        q, k = rec.qk[layer]
        copy = fp8keys.quantize(k)
        dec = {}
        for pos in range(n - args.decode_queries, n):
            _merge(dec, decode_stats(q[:, :, pos:pos + 1], k[:, :, :pos + 1], (copy[0][:, :, :pos + 1],
                                     copy[1][:, :, :pos + 1]), args.rho, args.k_min, reranks, dev.type))
        pre = prefill_stats(q, k, copy, args.rho, args.k_min, args.tile, reranks, dev.type, args.prefill_tiles)
        _merge(dec_all, dec)
        _merge(pre_all, pre)
        per_layer[layer] = {mode: {name: {key: summary(v)["mean"] for key, v in d.items()} for name, d in st.items()}
                            for mode, st in (("decode", dec), ("prefill", pre))}
        print(f"  layer {layer}: " + ", ".join(f"{m} {nm} recall {v['recall']:.3f} mass {v['mass']:.3f}"
                                               for m, st in per_layer[layer].items() for nm, v in st.items()),
              flush=True)
    return dict(model=str(args.model), prompt=f"data/heldout.txt from character {args.offset}, {n} tokens",
                shape="9 q / 3 KV heads, head dim 64, 30 layers", seconds=time.time() - t0,
                decode=dict(length=n, queries=args.decode_queries, stats=dec_all),
                prefill=dict(length=n, tiles=len(prefill_tiles(n, args.rho, args.k_min, args.tile, args.prefill_tiles)),
                             stats=pre_all), per_layer=per_layer)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def write_report(data: dict, stem: Path) -> None:
    data = summarized(data)
    meta = data["meta"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Selection from an FP8 copy of the keys: recall and attention mass ({meta['device_label']})", "",
             f"Measured {meta['date']} on {meta['device']} ({meta['versions']}). `python {meta['command']}`.", "",
             "Per selecting query (decode) or query tile (prefill) and KV head: **recall** = |S & E| / k of the exact "
             "top-k set E, **mass** = the share of E's pooled attention mass that the chosen set S keeps, "
             "**top-k mass** = E's share of all the mass (how concentrated attention is). FP8: scores from the e4m3 "
             "copy of the keys with per-token scales (prefill also quantizes q); +rerank c: c k FP8 candidates "
             f"re-scored with the exact keys. rho {meta['rho']}, k_min {meta['k_min']}, tile {meta['tile']}. "
             "Mean / 10th percentile / minimum over (query or tile, head).", ""]
    for src, d in data["sources"].items():
        lines += [f"## {src}: {d.get('shape', '')}", ""]
        if "prompt" in d:
            lines += [f"{d['model']}, {d['prompt']}.", ""]
        lines += ["| mode | keys | selection | recall mean / p10 / min | mass mean / p10 / min | top-k mass | samples |",
                  "|---|---|---|---|---|---|---|"]
        for mode in ("decode", "prefill"):
            m = d[mode]
            keys = f"{m['length']}" + (f" ({m['queries']} queries)" if "queries" in m else f" ({m['tiles']} tiles)")
            for name, st in m["stats"].items():
                r, ms, tm = summary(st["recall"]), summary(st["mass"]), summary(st["topk_mass"])
                lines.append(f"| {mode} | {keys} | {name} | {r['mean']:.4f} / {r['p10']:.4f} / {r['min']:.4f} | "
                             f"{ms['mean']:.4f} / {ms['p10']:.4f} / {ms['min']:.4f} | {tm['mean']:.3f} | {r['n']} |")
        lines.append("")
        if "per_layer" in d:
            names = list(d["decode"]["stats"])
            lines += ["Per layer, means (decode recall / mass; prefill recall / mass):", "",
                      "| layer | " + " | ".join(f"decode {nm}" for nm in names) + " | "
                      + " | ".join(f"prefill {nm}" for nm in names) + " |",
                      "|---|" + "---|" * (2 * len(names))]
            for layer, pl in sorted(d["per_layer"].items(), key=lambda x: int(x[0])):
                cells = [f"{pl[mode][nm]['recall']:.3f} / {pl[mode][nm]['mass']:.3f}" for mode in ("decode", "prefill")
                         for nm in names]
                lines.append(f"| {layer} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["Bytes the scoring pass reads per key and KV head: bf16 2D; FP8 D + 4 (the scale), 0.52x at D = 128 "
              "and 0.53x at D = 64; a re-rank adds c k rows of bf16 keys (at c = 2, rho = 0.1: 0.2 x 2D). No speed "
              "is measured here.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None):
    from report_json import rewrite_only

    if rewrite_only(argv, write_report):
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sources", default="random,smollm2")
    ap.add_argument("--length", type=int, default=131072, help="random data: keys of a decode query")
    ap.add_argument("--prefill-length", type=int, default=4096, help="random data: prompt length for prefill")
    ap.add_argument("--decode-queries", type=int, default=8)
    ap.add_argument("--prefill-tiles", type=int, default=32, help="selecting tiles sampled (evenly spread) for the "
                    "prefill statistics")
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--prompt-length", type=int, default=4096)
    ap.add_argument("--offset", type=int, default=200_000, help="first character of the prompt in data/heldout.txt")
    ap.add_argument("--rerank", default="2", help="comma-separated re-rank factors measured beside plain FP8")
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--k-min", type=int, default=128)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    reranks = [None] + [float(x) for x in args.rerank.split(",") if x]
    import triton
    import transformers

    name = "cpu" if dev.type == "cpu" else short_device_name(torch.cuda.get_device_name())
    meta = dict(date=datetime.date.today().isoformat(),
                device=(f"CPU, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
                        if dev.type == "cpu" else torch.cuda.get_device_name()),
                device_label="CPU" if dev.type == "cpu" else name.upper(),
                versions=(f"torch {torch.__version__}, triton {triton.__version__}, "
                          f"transformers {transformers.__version__}"),
                command="benchmarks/fp8_select.py " + " ".join(sys.argv[1:] if argv is None else argv),
                rho=args.rho, k_min=args.k_min, tile=args.tile, reranks=[_name(r) for r in reranks])
    sources = {}
    for src in args.sources.split(","):
        print(f"{src} ...", flush=True)
        with torch.no_grad():
            sources[src] = random_source(args, reranks, dev) if src == "random" else smollm2_source(args, reranks, dev)
        print(f"{src}: {sources[src]['seconds']:.0f} s", flush=True)
    stem = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"fp8_select_{name}"
    write_report(dict(meta=meta, sources=sources), stem)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
