"""The decode anchor on flat attention (every score nearly equal) and tied attention (every score exactly equal,
as vLLM's dummy weights give) against peaked attention, with the chunked finish for crowded rows (finish_max 4096)
and without it (finish_max above every row, the default: the single-program finish walks the whole row), beside
torch's SDPA decode on the same shapes (a reference point, not FlashAttention-3). GPU only. Writes a JSON with the
medians (triton.testing.do_bench, ms).

    python benchmarks/flat_topk.py [--batch 3] [--keys 131072] -o OUT.json
    python benchmarks/flat_topk.py --merge RUN.json [RUN.json ...] --date YYYY-MM-DD -o STEM
        one table and plot (STEM.json, .md, .png) of runs at several batch sizes, same device (no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode import graphed  # noqa: E402  (benchmarks/decode.py, beside this file: fn captured in a CUDA graph)
from kascade.kernels import decode as K  # noqa: E402


FINISHES = ("single", "chunked")
KINDS = ("peaked", "flat", "tied")
# q's scale per kind: flat, logits ~1e-4 (the pooled scores share their 16-bit prefix, levels 3-4 tell them apart);
# tied, logits ~1e-9, so exp rounds every one to 1 and every pooled score is exactly 1/N, as in a model with
# vLLM's dummy weights (uniform in +-1e-3: logits about 5e-10 in a 2-layer model of the 8B shape, one distinct
# pooled score per KV head)
Q_SCALE = {"peaked": 1.0, "flat": 1e-4, "tied": 1e-9}
SHARED = ("device", "torch", "triton", "keys", "kv_heads", "group", "head_dim")  # what merged runs must share


def merge(runs: list[dict], date: str) -> dict:
    """One result from runs at several batch sizes (the JSON main writes): rows sorted by batch. Runs must share
    SHARED (one device, one shape), else ValueError names the field."""
    if not runs:
        raise ValueError("merge: expected at least one run")
    for r in runs[1:]:
        for k in SHARED:
            if r[k] != runs[0][k]:
                raise ValueError(f"merge: {k} differs between runs ({runs[0][k]!r} and {r[k]!r})")
    out = {k: runs[0][k] for k in SHARED}
    out["date"] = date
    out["rows"] = sorted(({"batch": r["batch"], "ms": r["ms"], "same_sets": same_sets(r)} for r in runs),
                         key=lambda row: row["batch"])
    return out


def same_sets(run: dict) -> dict:
    """kind -> whether both finishes selected the same sets (runs before the tied kind: flat only)."""
    return run["same_sets"] if "same_sets" in run else {"flat": run["flat_same_sets"]}


def kinds_of(res: dict) -> list[str]:
    """The kinds every row of a merged result measured, in KINDS order."""
    return [k for k in KINDS if all(f"anchor_{k}_single_finish_graph" in row["ms"] for row in res["rows"])]


def markdown(res: dict) -> str:
    """The table of a merged result: CUDA-graph replay medians of each finish on each kind of scores."""
    kinds = kinds_of(res)
    lines = [f"# Decode anchor on {', '.join(kinds)} scores, chunked finish on and off: {res['device']}, {res['date']}",
             "",
             f"torch {res['torch']}, triton {res['triton']}; {res['keys']} keys a request, {res['kv_heads']} KV heads, "
             f"group {res['group']}, head dim {res['head_dim']}, rho 0.1; medians of triton.testing.do_bench over "
             "CUDA-graph replays (ms; how vLLM and the whole-model benchmarks run an anchor). `python "
             "benchmarks/flat_topk.py --batch B -o RUN.json` per batch, then `--merge`. Flat: nearly equal scores "
             "(logits ~1e-4); tied: exactly equal scores (logits ~1e-9), as vLLM's dummy weights give; single: one "
             "program per row finishes its candidates (the default); chunked: finish_max 4096. SDPA: torch's decode "
             "on the same shapes, launched from Python (a reference point, not FlashAttention-3). Same sets: both "
             "finishes selected the same keys.", "",
             "| B | SDPA | " + " | ".join(f"{k}, single | {k}, chunked | chunked / single" for k in kinds)
             + " | same sets |", "|---|---|" + "---|---|---|" * len(kinds) + "---|"]
    for row in res["rows"]:
        ms = row["ms"]
        cells = [str(row["batch"]), f"{ms['sdpa_decode']:.3f}"]
        for kind in kinds:
            single, chunked = (ms[f"anchor_{kind}_{f}_finish_graph"] for f in FINISHES)
            cells += [f"{single:.3f}", f"{chunked:.3f}", f"{chunked / single:.2f}x"]
        cells.append(", ".join(f"{k} {v}" for k, v in row["same_sets"].items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Chunked over single finish time per batch size, per kind of scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [row["batch"] for row in res["rows"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind in kinds_of(res):
        ratio = [row["ms"][f"anchor_{kind}_chunked_finish_graph"] / row["ms"][f"anchor_{kind}_single_finish_graph"]
                 for row in res["rows"]]
        ax.plot(batches, ratio, marker="o", label=f"{kind} scores")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("requests in the step (B)")
    ax.set_ylabel("chunked / single finish time")
    ax.set_title(f"Decode anchor top-k finish, {res['keys'] // 1024}K keys ({res['device']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_merged(paths: list[str], date: str, stem: Path) -> dict:
    """Merge the runs at `paths` and write stem.json, .md and .png."""
    res = merge([json.loads(Path(p).read_text()) for p in paths], date)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=3, help="requests (default %(default)s)")
    ap.add_argument("--keys", type=int, default=131072, help="keys per request (default %(default)s)")
    ap.add_argument("-o", required=True, help="the JSON to write (with --merge: the output stem)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RUN.json", help="only merge runs (no GPU)")
    ap.add_argument("--date", default=None, help="with --merge: the day the runs were made (YYYY-MM-DD)")
    a = ap.parse_args()
    if a.merge:
        if a.date is None:
            ap.error("--merge: expected --date, the day the runs were made")
        write_merged(a.merge, a.date, Path(a.o))
        return
    torch.manual_seed(0)
    B, Hkv, G, N, D = a.batch, 8, 4, a.keys, 128
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_peaked = torch.randn(B, Hkv * G, 1, D, device="cuda", dtype=torch.bfloat16)
    queries = {kind: q_peaked * scale for kind, scale in Q_SCALE.items()}
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "batch": B, "keys": N, "kv_heads": Hkv, "group": G, "head_dim": D, "ms": {}, "same_sets": {}}
    sdpa = lambda q: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    res["ms"]["sdpa_decode"] = triton.testing.do_bench(lambda: sdpa(q_peaked), warmup=50, rep=300)
    default = K.CONFIG["select"]["finish_max"]
    for name, q in queries.items():
        sets = []
        for finish_max in (4096, 1 << 30):
            K.CONFIG["select"]["finish_max"] = finish_max
            fn = lambda: K.anchor(q, k, v, 0.1, 128, 32)  # noqa: E731
            sets.append(fn()[1].indices.clone())
            key = f"anchor_{name}_{'chunked' if finish_max == 4096 else 'single'}_finish"
            res["ms"][key] = triton.testing.do_bench(fn, warmup=50, rep=300)
            res["ms"][key + "_graph"] = triton.testing.do_bench(graphed(fn).replay, warmup=50, rep=300)
        res["same_sets"][name] = all(torch.equal(sets[0][b, h, 0].sort().values, sets[1][b, h, 0].sort().values)
                                     for b in range(B) for h in range(Hkv))
    K.CONFIG["select"]["finish_max"] = default
    Path(a.o).write_text(json.dumps(res, indent=1))
    for kk, vv in res["ms"].items():
        print(f"{kk:40s} {vv:.3f} ms")
    print("same selected sets with both finishes:", res["same_sets"])


if __name__ == "__main__":
    main()
