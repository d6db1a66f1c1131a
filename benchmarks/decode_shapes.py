"""Decode attention on every attention shape: FA3, cuDNN SDPA and Kascade's anchor and reuse layers.

Per shape (q heads / KV heads / head dim, and the layer count of a model of that shape), at cache
lengths 32K and 128K, batch 1 and 8, bf16, rho 0.1, k_min 128, random data:
    FlashAttention-3 (`fa3_fwd_interface.flash_attn_with_kvcache`, best of the settings that
    benchmarks/decode.py tries; skipped, and said so, when the module does not import), cuDNN SDPA,
    ours: select only, anchor (select + sparse output), anchor with dense output (layer 0), reuse
    (sparse attention over a selection with a random head map); at the headline size also the anchor,
    the reuse layer and the whole model in every programmatic-dependent-launch mode (CONFIG["pdl"]:
    off, start, exit), with a check that each mode selects the same indices and gives the same outputs
    bit for bit. The other columns use the configured mode (KASCADE_DECODE_PDL, default exit).
Each provider is captured in a CUDA graph and timed by triton.testing.do_bench on its replays (median,
p20, p80), with the timing helpers of benchmarks/decode.py.
Whole model: the shape's real layer count, anchors = 1/6 of the layers spread like the Llama-3.1-8B
plan [0, 2, 8, 13, 14] (`anchor_layers`); layer 0 dense output + select, other anchors select + sparse
output, the rest reuse; ONE CUDA graph, against the same number of FA3 layers, on distinct per-layer
caches cycled within decode.KV_BUDGET_BYTES (decode.whole_model).

    python benchmarks/decode_shapes.py --out DIR        # DIR/decode_shapes_<gpu>.json, .md, .png
    python benchmarks/decode_shapes.py --smoke          # tiny sizes, a few seconds (checks the plumbing)
    python benchmarks/decode_shapes.py --report FILE    # .md and .png again from a results JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from report_json import short_device_name  # noqa: E402  (benchmarks/report_json.py: the GPU's name in file names)
import decode as DB  # noqa: E402  (benchmarks/decode.py: graphed, bench, fa3_module, dense_providers, whole_model)

# name, q heads, KV heads, head dim, layers
SHAPES = [
    ("Llama-3.1-8B", 32, 8, 128, 32),
    ("Qwen2.5-7B", 28, 4, 128, 28),
    ("SmolLM2-135M", 9, 3, 64, 30),
    ("G=5", 40, 8, 128, 40),
    ("Llama-70B-like", 64, 8, 128, 80),
]
LENGTHS = (32768, 131072)
BATCHES = (1, 8)
HEADLINE = (1, 131072)  # (B, N) of the ratios in `rows`
RHO, K_MIN, TILE = DB.RHO, DB.K_MIN, 32
LLAMA_PLAN, LLAMA_LAYERS = (0, 2, 8, 13, 14), 32
SMOKE = dict(lengths=(2048,), batches=(1, 2), headline=(1, 2048), max_layers=12)
PDL_NAMES = ("off", "start", "exit")  # kascade.kernels.decode.CONFIG["pdl"] values compared at the headline size


# ----------------------------------------------------------------------------------------------
# pure helpers (tested on the CPU: tests/test_decode_shapes.py)
# ----------------------------------------------------------------------------------------------


def anchor_layers(layers: int, fraction: float = 1 / 6, pattern=LLAMA_PLAN, pattern_layers: int = LLAMA_LAYERS):
    """Anchor layers of a `layers`-layer model: round(fraction * layers) of them (at least 1), layer 0 first,
    placed like `pattern` (anchors of a `pattern_layers`-layer plan) relative to the depth.

    The pattern's anchors, as fractions of its depth, make a piecewise-linear curve over [0, 1]; anchor
    i of K sits at the curve's value at i / (K - 1), times `layers`, rounded, then pushed up to keep the
    layers distinct. anchor_layers(32) == (0, 2, 8, 13, 14).
    """
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers: expected an integer >= 1, got {layers!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    if not pattern or pattern[0] != 0 or list(pattern) != sorted(set(pattern)) or pattern[-1] >= pattern_layers:
        raise ValueError(f"pattern: expected increasing layers from 0 below pattern_layers={pattern_layers}, "
                         f"got {pattern!r}")
    k = min(layers, max(1, round(fraction * layers)))
    fr = [p / pattern_layers for p in pattern]
    out = []
    for i in range(k):
        t = i / (k - 1) * (len(fr) - 1) if k > 1 else 0.0  # position on the pattern's curve
        j = min(int(t), max(0, len(fr) - 2))
        x = fr[j] + (t - j) * (fr[j + 1] - fr[j]) if len(fr) > 1 else fr[0]
        out.append(round(x * layers))
    for i in range(k - 1, -1, -1):  # distinct and inside the model: room for the anchors after i
        out[i] = min(out[i], layers - k + i)
    for i in range(1, k):
        out[i] = max(out[i], out[i - 1] + 1)
    out[0] = 0
    return tuple(out)


def shape_name(hq: int, hkv: int, d: int) -> str:
    return f"{hq}/{hkv}/{d}"


def size_key(B: int, N: int) -> str:
    return f"{B}x{N}"


def _ms(r, name):
    x = (r or {}).get(name) or {}
    return x.get("ms")


def summary_row(name, hq, hkv, d, layers, anchors, timings, models, headline):
    """One row of `rows`: the shape, its ratios at `headline` (B, N), and every raw timing."""
    key = size_key(*headline)
    r = timings.get(key, {})
    w = models.get(key, {})
    fa3, anchor = _ms(r, "fa3"), _ms(r, "ours_anchor_sparse")
    bd = r.get("best_dense")
    reuse, best = _ms(r, "ours_reuse"), _ms(r, bd) if bd else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    row = dict(shape=shape_name(hq, hkv, d), model=name, hq=hq, hkv=hkv, d=d, G=hq // hkv, layers=layers,
               anchors=list(anchors), headline=key,
               anchor_over_fa3=ratio(anchor, fa3), reuse_over_best_dense=ratio(reuse, best),
               model_speedup_over_fa3=w.get("speedup_vs_fa3"), best_dense=bd, timings=timings, whole_model=models)
    for mode in PDL_NAMES:  # the programmatic-dependent-launch modes, where they were timed
        if _ms(r, f"ours_anchor_pdl_{mode}") is not None:
            row[f"anchor_pdl_{mode}_over_fa3"] = ratio(_ms(r, f"ours_anchor_pdl_{mode}"), fa3)
            row[f"reuse_pdl_{mode}_over_best_dense"] = ratio(_ms(r, f"ours_reuse_pdl_{mode}"), best)
        wm = (w.get("pdl") or {}).get(mode) or {}
        if wm.get("speedup_vs_fa3") is not None:
            row[f"model_pdl_{mode}_speedup_over_fa3"] = wm["speedup_vs_fa3"]
    return row


def _fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def markdown(results) -> str:
    """The results as markdown: one line per shape (headline ratios), then every (shape, B, N)."""
    meta = results["meta"]
    hb, hn = results["headline"]
    L = [f"# Decode attention per shape, {meta['device']}", "",
         f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; FA3: {meta.get('fa3', '—')}. bf16, "
         f"rho {RHO}, k_min {K_MIN}, random data. CUDA-graph replay medians of triton.testing.do_bench (us); "
         f"ratios at B={hb}, N={hn // 1024}K. Whole model: the shape's layers, anchors = 1/6 of them (layer 0 "
         "dense output + select), one CUDA graph against as many FA3 layers.", "",
         "| shape | model | layers | anchors | FA3 | cuDNN | anchor | anchor / FA3 | reuse | reuse / best dense | "
         "whole model vs FA3 |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        r = row["timings"].get(row["headline"], {})
        us = lambda n: _fmt(None if _ms(r, n) is None else _ms(r, n) * 1e3, ".1f")  # noqa: E731
        L.append(f"| {row['shape']} | {row['model']} | {row['layers']} | {row['anchors']} | {us('fa3')} | "
                 f"{us('sdpa_cudnn')} | {us('ours_anchor_sparse')} | {_fmt(row['anchor_over_fa3'])}x | "
                 f"{us('ours_reuse')} | {_fmt(row['reuse_over_best_dense'])}x | "
                 f"{_fmt(row['model_speedup_over_fa3'])}x |")
    L += ["", "## Every size (us; whole model in ms)", "",
          "| shape | B | N | FA3 | cuDNN | select | anchor | anchor dense out | reuse | whole model | layers x FA3 | "
          "speedup |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for key, r in row["timings"].items():
            w = row["whole_model"].get(key, {})
            us = lambda n: _fmt(None if _ms(r, n) is None else _ms(r, n) * 1e3, ".1f")  # noqa: E731
            L.append(f"| {row['shape']} | {r['B']} | {r['N'] // 1024}K | {us('fa3')} | {us('sdpa_cudnn')} | "
                     f"{us('ours_select')} | {us('ours_anchor_sparse')} | "
                     f"{us('ours_anchor_dense')} | {us('ours_reuse')} | "
                     f"{_fmt(_ms(w, 'ours'), '.3f')} | {_fmt(_ms(w, 'fa3'), '.3f')} | "
                     f"{_fmt(w.get('speedup_vs_fa3'))}x |")
    pdl_rows = [row for row in results["rows"] if row.get("anchor_pdl_off_over_fa3") is not None]
    if pdl_rows:
        L += ["", f"## Programmatic dependent launch (CONFIG[\"pdl\"]), B={hb}, N={hn // 1024}K", "",
              "Each mode in the same run; anchor and reuse in us, whole model as its speedup over FA3. "
              "Same selection / output: every mode against `off`, bit for bit.", "",
              "| shape | " + " | ".join(f"anchor {m} | reuse {m} | whole model {m}" for m in PDL_NAMES)
              + " | same selection | same output |",
              "|---|" + "---|---|---|" * len(PDL_NAMES) + "---|---|"]
        for row in pdl_rows:
            r = row["timings"].get(row["headline"], {})
            us = lambda n: _fmt(None if _ms(r, n) is None else _ms(r, n) * 1e3, ".1f")  # noqa: E731
            cells = [f"{us(f'ours_anchor_pdl_{m}')} | {us(f'ours_reuse_pdl_{m}')} | "
                     f"{_fmt(row.get(f'model_pdl_{m}_speedup_over_fa3'))}x" for m in PDL_NAMES]
            L.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {r.get('pdl_same_selection', '—')} | "
                     f"{r.get('pdl_same_output', '—')} |")
    return "\n".join(L) + "\n"


def plot(results, path_png):
    """Bars per shape: anchor / FA3, reuse / best dense (target lines 0.65 and 1), whole-model speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    xs = list(range(len(rows)))
    labels = [f"{r['shape']}\n{r['model']}" for r in rows]
    val = lambda r, k: r.get(k) if r.get(k) is not None else 0.0  # noqa: E731
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.27
    a1.bar([x - w for x in xs], [val(r, "anchor_over_fa3") for r in rows], w, label="anchor / FA3")
    other = [m for m in PDL_NAMES if m != "off" and any(r.get(f"anchor_pdl_{m}_over_fa3") is not None for r in rows)]
    if other:  # the fastest PDL mode, for comparison
        best = min(other, key=lambda m: sum(val(r, f"anchor_pdl_{m}_over_fa3") for r in rows))
        a1.bar(xs, [val(r, f"anchor_pdl_{best}_over_fa3") for r in rows], w, label=f"anchor, PDL {best} / FA3")
    a1.bar([x + w for x in xs], [val(r, "reuse_over_best_dense") for r in rows], w, label="reuse / best dense")
    a1.axhline(1.0, color="grey", lw=0.8)
    a1.axhline(0.65, color="red", lw=0.8, ls="--", label="anchor target 0.65")
    a1.set_xticks(xs, labels, fontsize=7)
    a1.set_ylabel("time ratio (lower is faster)")
    a1.set_title("one layer")
    a1.legend(fontsize=7)
    a2.bar(xs, [val(r, "model_speedup_over_fa3") for r in rows], 0.5, color="tab:green")
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_xticks(xs, labels, fontsize=7)
    a2.set_ylabel("speedup over FA3 (x)")
    a2.set_title("whole model, one CUDA graph")
    hb, hn = results["headline"]
    fig.suptitle(f"Kascade decode per shape, {results['meta']['device']}, bf16, rho {RHO}, B={hb}, {hn // 1024}K")
    fig.tight_layout()
    fig.savefig(path_png, dpi=130)
    plt.close(fig)


def write_reports(results, path_json):
    """path_json's .md and .png beside it."""
    base = path_json[: -len(".json")] if path_json.endswith(".json") else path_json
    with open(base + ".md", "w") as f:
        f.write(markdown(results))
    try:
        plot(results, base + ".png")
    except ImportError as e:  # a GPU image without matplotlib: `--report FILE` makes the plot elsewhere
        print(f"no plot ({e!r}); run `python benchmarks/decode_shapes.py --report {path_json}` where matplotlib is")
        return base + ".md", None
    return base + ".md", base + ".png"


# ----------------------------------------------------------------------------------------------
# measurements (CUDA)
# ----------------------------------------------------------------------------------------------


def _with_pdl(K, mode: str, fn):
    """fn() with kascade.kernels.decode's CONFIG["pdl"] set to mode; kernels read the setting when
    launched, so a graph captured here keeps that mode."""
    old = K.CONFIG["pdl"]
    K.CONFIG["pdl"] = mode
    try:
        return fn()
    finally:
        K.CONFIG["pdl"] = old


def layer_timings(K, hq, hkv, d, B, N, fa3, rep, other_paths=True):
    """Per-layer timings at (B, N) for one shape: a dict in the layout decode.whole_model reads."""
    import torch

    dt = DB.DT
    g = torch.Generator(device="cuda").manual_seed(N + B + hq)
    q = torch.randn(B, hq, 1, d, device="cuda", dtype=dt, generator=g)
    k = torch.randn(B, hkv, N, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(B, hkv, N, d, device="cuda", dtype=dt, generator=g)
    q_fa, k_fa, v_fa = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # FA3's [B, N, H, D]
    seqlens = torch.full((B,), N, dtype=torch.int32, device="cuda")
    provs = {n: f for n, f in DB.dense_providers(q, k, v, q_fa, k_fa, v_fa, seqlens, fa3).items()
             if n.startswith("fa3") or n == "sdpa_cudnn"}
    sel = K.select(q, k, RHO, K_MIN, TILE)
    hm = torch.randint(0, hkv, (hkv,), device="cuda")
    provs.update({
        "ours_select": lambda: K.select(q, k, RHO, K_MIN, TILE),
        "ours_anchor_sparse": lambda: K.anchor(q, k, v, RHO, K_MIN, TILE),
        "ours_anchor_dense": lambda: K.anchor(q, k, v, RHO, K_MIN, TILE, dense_output=True),
        "ours_reuse": lambda: K.sparse_attention(q, k, v, sel, head_map=hm),
    })
    res = dict(B=B, N=N)
    modes = "pdl" in K.CONFIG and other_paths
    if modes:  # every PDL mode by name; ours_anchor_sparse and ours_reuse use the configured one
        for m in PDL_NAMES:
            provs[f"ours_anchor_pdl_{m}"] = lambda m=m: _with_pdl(K, m, lambda: K.anchor(q, k, v, RHO, K_MIN, TILE))
            provs[f"ours_reuse_pdl_{m}"] = (
                lambda m=m: _with_pdl(K, m, lambda: K.sparse_attention(q, k, v, sel, head_map=hm)))
    for name, fn in provs.items():
        try:
            res[name] = DB.bench(fn, rep=rep)
        except Exception as e:  # noqa: BLE001
            res[name] = dict(error=repr(e)[:300])
            DB.log(f"  {name}: failed {repr(e)[:300]}")
    if modes:  # every mode selects the same indices and gives the same outputs as "off", bit for bit
        def outputs(m):
            o, s_ = _with_pdl(K, m, lambda: K.anchor(q, k, v, RHO, K_MIN, TILE))
            return o, s_, _with_pdl(K, m, lambda: K.sparse_attention(q, k, v, s_, head_map=hm))
        o0, s0, r0 = outputs("off")
        same_sel, same_out = True, True
        for m in PDL_NAMES[1:]:
            o1, s1, r1 = outputs(m)
            same_sel &= bool(torch.equal(s0.indices, s1.indices) and torch.equal(s0.counts, s1.counts))
            same_out &= bool(torch.equal(o0, o1) and torch.equal(r0, r1))
        res["pdl_same_selection"], res["pdl_same_output"] = same_sel, same_out
        res["pdl_configured"] = K.CONFIG["pdl"]
        res["pdl_available"] = bool(K.ts.pdl_available(q.device))
    fa3_names = [n for n in res if n.startswith("fa3[") and "ms" in res[n]]
    if fa3_names:
        best = min(fa3_names, key=lambda n: res[n]["ms"])
        res["fa3"] = dict(res[best], variant=best)
    dense = [n for n in ("fa3", "sdpa_cudnn") if "ms" in res.get(n, {})]
    res["best_dense"] = min(dense, key=lambda n: res[n]["ms"]) if dense else None
    names = ("fa3", "sdpa_cudnn", "ours_anchor_sparse", "ours_reuse") + tuple(
        f"ours_{kind}_pdl_{m}" for m in PDL_NAMES for kind in ("anchor", "reuse"))
    line = "  ".join(f"{n} {res[n]['ms'] * 1e3:.1f}" for n in names if "ms" in res.get(n, {}))
    DB.log(f"  B={B} N={N}: {line} us" + (f"  same selection / output {res['pdl_same_selection']} / "
                                          f"{res['pdl_same_output']}" if modes else ""))
    del q, k, v, q_fa, k_fa, v_fa
    return res


def model_layers(spec, max_layers=None) -> int:
    """Layers of the whole model of a shape (capped by max_layers, as --smoke does)."""
    return min(spec[4], max_layers) if max_layers else spec[4]


def measure_size(K, spec, B, N, fa3, rep, max_layers=None, other_paths=True):
    """(per-layer timings, whole model) of one shape at (B, N)."""
    import torch

    name, hq, hkv, d, _ = spec
    layers = model_layers(spec, max_layers)
    anchors = anchor_layers(layers)
    r = layer_timings(K, hq, hkv, d, B, N, fa3, rep, other_paths)
    torch.cuda.empty_cache()
    needed = ("ours_select", "ours_anchor_dense", "ours_anchor_sparse", "ours_reuse")
    if r["best_dense"] is None or any("ms" not in r.get(n, {}) for n in needed):
        return r, dict(error="a per-layer provider failed; whole model skipped")
    try:
        w = DB.whole_model(K, B, N, fa3, r, hq=hq, hkv=hkv, d=d, layers=layers, anchors=anchors)
        w = dict(w, B=B, N=N, layers=layers, anchors=list(anchors))
        if other_paths and "pdl" in K.CONFIG:  # the whole model in every PDL mode, against the FA3 graph above
            w["pdl"] = {}
            for m in PDL_NAMES:
                wm = _with_pdl(K, m, lambda: DB.whole_model(K, B, N, None, r, hq=hq, hkv=hkv, d=d, layers=layers,
                                                            anchors=anchors))
                if "ms" in w.get("fa3", {}):
                    wm["speedup_vs_fa3"] = w["fa3"]["ms"] / wm["ours"]["ms"]
                w["pdl"][m] = wm
    except Exception as e:  # noqa: BLE001
        w = dict(error=repr(e)[:300])
        DB.log("  whole model failed:", repr(e)[:300])
    torch.cuda.empty_cache()
    return r, w


def save(results, path, K, t0):
    """The results so far (with the kernels' launch settings and the seconds spent) as JSON."""
    results["meta"]["config"] = K.CONFIG
    results["meta"]["seconds"] = round(time.time() - t0, 1)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and layer counts (plumbing only)")
    ap.add_argument("--shapes", default=None, help="comma-separated q/kv/d, e.g. 32/8/128,9/3/64 (default all)")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms) per layer provider")
    ap.add_argument("--budget-s", type=float, default=300,
                    help="start no size beyond the headline one after this many seconds (default 300)")
    ap.add_argument("--all-paths", action="store_true",
                    help="time every PDL mode at every size (default: at the headline size only)")
    ap.add_argument("--tag", default=None, help="result file suffix (default: the GPU's short name, e.g. h200)")
    ap.add_argument("--report", help="results JSON: write its .md and .png again (no measurement)")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print("\n".join(write_reports(json.load(f), args.report)))
        return
    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("decode_shapes.py measures CUDA graphs: it needs a CUDA device "
                         "(tests/test_decode_shapes.py checks its pure-Python parts on the CPU)")
    from kascade.kernels import decode as K

    torch.manual_seed(0)
    lengths, batches, headline = LENGTHS, BATCHES, HEADLINE
    max_layers = None
    if args.smoke:
        lengths, batches, headline, max_layers = (SMOKE[k] for k in ("lengths", "batches", "headline", "max_layers"))
    shapes = SHAPES
    if args.shapes:
        want = args.shapes.split(",")
        shapes = [s for s in SHAPES if shape_name(*s[1:4]) in want]
        if len(shapes) != len(want):
            raise SystemExit(f"--shapes: expected some of {[shape_name(*s[1:4]) for s in SHAPES]}, got {want}")
    fa3 = DB.fa3_module()
    if fa3 is None:
        DB.log("FA3 (fa3_fwd_interface) does not import: FA3 columns and whole-model ratios are skipped")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=str(datetime.date.today()), fa3="fa3_fwd_interface" if fa3 is not None else "not importable",
                smoke=bool(args.smoke), rep_ms=args.rep, kv_budget_bytes=DB.KV_BUDGET_BYTES)
    results = dict(meta=meta, headline=list(headline), rows=[])
    tag = args.tag or short_device_name(torch.cuda.get_device_name())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode_shapes_{tag}{'_smoke' if args.smoke else ''}.json")
    t0 = time.time()
    # the headline size of every shape first, then the other sizes while the time budget lasts
    sizes = [tuple(headline)] + [(B, N) for N in lengths for B in batches if (B, N) != tuple(headline)]
    got = {spec: ({}, {}) for spec in shapes}
    meta["skipped"] = []
    for B, N in sizes:
        for spec in shapes:
            if time.time() - t0 > args.budget_s and (B, N) != tuple(headline):
                meta["skipped"].append(f"{shape_name(*spec[1:4])} {size_key(B, N)}")
                continue
            DB.log(f"{spec[0]} {shape_name(*spec[1:4])}, B={B} N={N} ({time.time() - t0:.0f} s)")
            r, w = measure_size(K, spec, B, N, fa3, args.rep, max_layers,
                                other_paths=(B, N) == tuple(headline) or args.all_paths)
            got[spec][0][size_key(B, N)], got[spec][1][size_key(B, N)] = r, w
            results["rows"] = [summary_row(sp[0], *sp[1:4], model_layers(sp, max_layers),
                                           anchor_layers(model_layers(sp, max_layers)), *got[sp], headline)
                               for sp in shapes if got[sp][0]]
            save(results, path, K, t0)
    if meta["skipped"]:
        DB.log(f"time budget ({args.budget_s} s) spent: skipped {meta['skipped']}")
    save(results, path, K, t0)
    md, png = write_reports(results, path)
    DB.log(f"wrote {path}, {md}, {png} in {time.time() - t0:.0f} s")
    DB.log(markdown(results).split("\n## ")[0])


if __name__ == "__main__":
    main()
