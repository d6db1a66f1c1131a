"""Decode cost of head-granular plans (some KV heads of a layer select, the others reuse), on the GPU.

Llama-3.1-8B attention (32 query / 8 KV heads, head dim 128), bf16, rho 0.1, k_min 128, B = 1, random
data; every number a CUDA-graph replay median (triton.testing.do_bench via benchmarks/decode.py).

1. One part-selecting layer through `KascadeStrategy` (S of 8 KV heads select over the layer's cache,
   the others reuse an anchor's sets), three ways: in one pass (the default where the selecting heads
   form one strided view: `ops.part_anchor`, one sparse launch for every head, the own heads from their
   logits), assembled (the selecting heads read in place through strided views,
   `kascade.strategy.head_slices`, their selection stacked with the anchor's, then a reuse pass), and
   copied (the selecting heads gathered into a copy first, `IN_PLACE_HEADS = False`). S = 3 (heads 0,
   1, 3) is not evenly spaced: two views, [0, 1] and [3], so it is always assembled.
2. The whole model's attention (32 layers, one graph, distinct caches) for three plans against 32 x FA3:
   5 anchors [0, 2, 8, 13, 14] (the paper's cost), 10 anchors, and a head-granular plan of 10
   selecting-layer equivalents (the 5 anchors plus half the heads of 10 more layers), the three ways.

    python benchmarks/head_granular_decode.py --out DIR    # DIR/head_granular_decode.json, .md and .png
    python benchmarks/head_granular_decode.py --report IN.json OUT_STEM   # .md and .png again
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode as DB  # noqa: E402

HQ, HKV, D, LAYERS = 32, 8, 128, 32
FP = {"model_type": "llama", "num_layers": LAYERS, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D}
ANCHORS5 = [0, 2, 8, 13, 14]
ANCHORS10 = [0, 2, 5, 8, 11, 13, 14, 17, 21, 26]
HALF_LAYERS = [4, 6, 10, 16, 18, 20, 22, 24, 26, 28]  # heads 0, 2, 4, 6 select there
PART_HEADS = {1: (0,), 2: (0, 4), 3: (0, 1, 3), 4: (0, 2, 4, 6)}  # S = 3: not evenly spaced (two views)


def _plan(anchors, part=None, heads=(0, 2, 4, 6)):
    from kascade.plan import Plan

    if part is None:
        return Plan(anchors=anchors, model=dict(FP), rho=DB.RHO, k_min=DB.K_MIN, tile=32)
    rows = []
    for layer in range(LAYERS):
        if layer in anchors:
            rows.append(None)
            continue
        src = max(a for a in anchors if a < layer)
        rows.append([None if (layer in part and h in heads) else [src, h] for h in range(HKV)])
    return Plan(anchors=anchors, head_sources=rows, model=dict(FP), rho=DB.RHO, k_min=DB.K_MIN, tile=32,
                recipe="output-aware")


WAYS = ("one_pass", "in_place", "copied")  # of a part-selecting layer (module docstring)


def _way(name):
    """Context of one way to run part-selecting layers: the default one pass, assembled, or copied."""
    if name == "copied":
        return mock.patch("kascade.strategy.IN_PLACE_HEADS", False)
    if name == "in_place":
        return mock.patch("kascade.strategy.KascadeStrategy._part_route", lambda self, *a: None)
    return contextlib.nullcontext()


def one_layer(N, S):
    """{way: ms} (WAYS): layer 1 with S selecting heads (PART_HEADS), anchor 0 before it."""
    from kascade.strategy import KascadeStrategy

    heads = PART_HEADS[S]
    plan = _plan([0, 2], part=[1], heads=heads)
    kv = [(torch.randn(1, HKV, N, D, device="cuda", dtype=DB.DT), torch.randn(1, HKV, N, D, device="cuda", dtype=DB.DT))
          for _ in range(2)]
    qs = [torch.randn(1, HQ, 1, D, device="cuda", dtype=DB.DT) for _ in range(2)]
    out = {}
    for name in WAYS:
        with _way(name):
            st = KascadeStrategy(plan, backend="auto")
            st.begin_forward()
            st.attend(0, qs[0], *kv[0], None, None)  # layer 0's selection, outside the timed graph

            def layer1():
                st.attend(1, qs[1], *kv[1], None, None)

            out[name] = DB.bench(layer1, rep=100)["ms"]
    return out


def whole_model(N, fa3):
    from kascade.strategy import KascadeStrategy

    caches = [(torch.randn(1, HKV, N, D, device="cuda", dtype=DB.DT), torch.randn(1, HKV, N, D, device="cuda", dtype=DB.DT))
              for _ in range(LAYERS)]
    qs = [torch.randn(1, HQ, 1, D, device="cuda", dtype=DB.DT) for _ in range(LAYERS)]
    plans = {"5 anchors": (_plan(ANCHORS5), "one_pass"), "10 anchors": (_plan(ANCHORS10), "one_pass"),
             "head-granular 10, one pass": (_plan(ANCHORS5, HALF_LAYERS), "one_pass"),
             "head-granular 10, in place": (_plan(ANCHORS5, HALF_LAYERS), "in_place"),
             "head-granular 10, copied": (_plan(ANCHORS5, HALF_LAYERS), "copied")}
    res = {}
    for name, (plan, way) in plans.items():
        with _way(way):
            st = KascadeStrategy(plan, backend="auto")

            def step():
                st.begin_forward()
                for layer in range(LAYERS):
                    st.attend(layer, qs[layer], *caches[layer], None, None)

            res[name] = {"ms": DB.bench(step, rep=50)["ms"], "selecting_layers_equivalent": plan.selecting_layers_equivalent}
        DB.log(f"  {name}: {res[name]['ms']:.3f} ms")
    qf = [q.transpose(1, 2).contiguous() for q in qs]
    seqlens = torch.full((1,), N, dtype=torch.int32, device="cuda")

    def fa3_model():
        for layer in range(LAYERS):
            kc, vc = caches[layer]
            fa3.flash_attn_with_kvcache(qf[layer], kc.view(1, N, HKV, D), vc.view(1, N, HKV, D), cache_seqlens=seqlens)

    res["32 x FA3"] = {"ms": DB.bench(fa3_model, rep=50)["ms"]}
    for name in plans:
        res[name]["speedup_vs_fa3"] = res["32 x FA3"]["ms"] / res[name]["ms"]
    del caches
    return res


def write_report(data: dict, stem: Path) -> None:
    """stem.json, .md and .png from the measurements ({"meta", "rows": {N: ...}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = data["meta"], {int(n): r for n, r in data["rows"].items()}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Head-granular plans in decode, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; 32/8/128 (Llama-3.1-8B attention), B = 1, bf16, rho 0.1, "
             "k_min 128; CUDA-graph replay medians.", "",
             "## One part-selecting layer (us): S of 8 KV heads select; in one pass, assembled from strided views, "
             "or copied first", "",
             "| N | S | heads | one pass | assembled (in place) | copied |", "|---|---|---|---|---|---|"]
    us = lambda t, way: f"{1e3 * t[way]:.1f}" if way in t else "—"  # noqa: E731 (older files: no one pass)
    for N, r in rows.items():
        for S, t in r["part_selecting_layer_ms"].items():
            heads = ", ".join(map(str, PART_HEADS.get(int(S), ())))
            lines.append(f"| {N // 1024}K | {S} | {heads} | {us(t, 'one_pass')} | {us(t, 'in_place')} | "
                         f"{us(t, 'copied')} |")
    lines += ["", "## Whole model, 32 layers, one graph (ms)", "",
              "| N | plan | selecting-layer equivalents | ms | vs 32 x FA3 |", "|---|---|---|---|---|"]
    for N, r in rows.items():
        w = r["whole_model"]
        lines.append(f"| {N // 1024}K | 32 x FA3 | 32 | {w['32 x FA3']['ms']:.3f} | 1.00x |")
        for name, v in w.items():
            if name != "32 x FA3":
                lines.append(f"| {N // 1024}K | {name} | {v['selecting_layers_equivalent']:g} | {v['ms']:.3f} | "
                             f"{v['speedup_vs_fa3']:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [n for n in next(iter(rows.values()))["whole_model"] if n != "32 x FA3"]
    width = 0.8 / len(rows)
    for i, (N, r) in enumerate(rows.items()):
        vals = [r["whole_model"][n]["speedup_vs_fa3"] for n in names]
        bars = ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"{N // 1024}K")
        ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))], names, fontsize=8, rotation=10)
    ax.set_ylabel("whole-model decode attention vs 32 x FA3")
    ax.set_title(f"32/8/128, B = 1, {meta['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print("\n".join(lines))


def main(argv=None) -> int:
    import triton

    from report_json import rewrite_only

    if rewrite_only(argv, write_report):
        return 0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--lengths", default="32768,131072")
    args = ap.parse_args(argv)
    fa3 = DB.fa3_module()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "shape": "32/8/128", "B": 1, "rho": DB.RHO, "k_min": DB.K_MIN}
    rows = {}
    for N in [int(x) for x in args.lengths.split(",")]:
        layer = {S: one_layer(N, S) for S in PART_HEADS}
        for S, r in layer.items():
            DB.log(f"N={N} S={S}: " + ", ".join(f"{w} {1e3 * r[w]:.1f} us" for w in WAYS))
        rows[N] = {"part_selecting_layer_ms": layer, "whole_model": whole_model(N, fa3)}
    write_report({"meta": meta, "rows": rows}, args.out / "head_granular_decode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
