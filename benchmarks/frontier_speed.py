"""Measured whole-model attention speedup of the frontier's plans (benchmarks/frontier.py `speed`), on the GPU.

For one attention shape, phase and context length N (batch 1, bf16, random data), in one process: dense
attention in every layer against Kascade with each plan, run through `KascadeStrategy` (the library's own
path: layer 0 dense and selecting, anchors, reuse layers, part-selecting layers of head-granular plans),
with the timing code of benchmarks/decode.py and benchmarks/prefill.py:

- decode: the whole model's step (every layer, one new query, distinct per-layer KV caches cycled within
  decode.KV_BUDGET_BYTES) captured as ONE CUDA graph and timed by triton.testing.do_bench on its replays
  (decode.bench: median, p20, p80; L2 flushed), against the same for `layers` dense layers. Dense: FA3
  (`fa3_fwd_interface.flash_attn_with_kvcache`, the fastest of the settings benchmarks/decode.py tries) when
  it imports, else flash SDPA; the best dense provider of one layer (cuDNN SDPA included) is timed as a
  whole model too when it is not the baseline, and the speedup against it is kept beside.
- prefill: the whole model's prompt pass (every layer on the same q, k, v: each layer's work is far larger
  than L2), timed by prefill.bench (do_bench under 20 ms, else CUDA-event-timed runs; median, p20, p80);
  layer 0's dense attention runs on the baseline's kernel, as benchmarks/prefill.py composes its whole
  model; selections are dropped once no later layer reads them. Dense: `layers` x one layer of FA3
  (`flash_attn_func`, causal) when it imports, else flash SDPA (cuDNN SDPA timed beside), as prefill.py.

The dense baseline is measured again in every process that measures a plan, and each plan's speedup is
against the dense of its own process. Results go to WORK/speed/SHAPE-PHASE-N.json (one entry per plan,
written as each is measured: a rerun measures only the missing ones).

Shapes: "smollm2" (SmolLM2-135M: 30 layers, 9 query / 3 KV heads, head dim 64), where the plans run as they
are, and "8b" (kascade/configs/llama-3.1-8b-shape.json: 32 layers, 32 / 8, head dim 128), where each plan
runs as `map_plan` maps it: the same selecting-layer equivalents (the cost), placed at the same relative
depths, with the same share of selecting heads per layer.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPE_8B = ROOT / "kascade" / "configs" / "llama-3.1-8b-shape.json"
SMOLLM2 = {"model_type": "llama", "num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64}


def shape(name: str) -> dict:
    """The model fingerprint (kascade.plan.model_fingerprint's keys) of "smollm2" or "8b"."""
    if name == "smollm2":
        return dict(SMOLLM2)
    if name == "8b":
        cfg = json.loads(SHAPE_8B.read_text())
        return {"model_type": cfg["model_type"], "num_layers": cfg["num_hidden_layers"],
                "num_q_heads": cfg["num_attention_heads"], "num_kv_heads": cfg["num_key_value_heads"],
                "head_dim": cfg["head_dim"]}
    raise ValueError(f"shape: expected 'smollm2' or '8b', got {name!r}")


# ----------------------------------------------------------------------------------------------
# plans on another shape (pure; tested on the CPU)
# ----------------------------------------------------------------------------------------------


def layer_positions(src_layers: int, dst_layers: int) -> list[int]:
    """Layer l of a src_layers-deep model at the same relative depth of a dst_layers-deep one:
    round(l * (dst - 1) / (src - 1)); first to first, last to last, strictly increasing (dst >= src)."""
    if src_layers < 2 or dst_layers < src_layers:
        raise ValueError(f"layers: expected 2 <= source layers <= target layers, got {src_layers} -> {dst_layers}")
    return [math.floor(layer * (dst_layers - 1) / (src_layers - 1) + 0.5) for layer in range(src_layers)]


def _apportion(exact: dict) -> dict:
    """Whole numbers per key summing to round(sum of exact), each the floor or ceiling of its exact share
    (largest remainders first, ties by key)."""
    base = {k: math.floor(v + 1e-9) for k, v in exact.items()}
    total = math.floor(sum(exact.values()) + 0.5 + 1e-9)
    order = sorted(exact, key=lambda k: (-(exact[k] - base[k]), k))
    for k in order[: total - sum(base.values())]:
        base[k] += 1
    return base


def _spread(count: int, heads: int) -> list[int]:
    """`count` of `heads` KV heads, evenly spaced from head 0 (one strided view of the cache)."""
    step = max(1, heads // count)
    return [i * step for i in range(count)]


def map_plan(plan, target: dict):
    """`plan` on the shape `target` (a model fingerprint at least as deep and with at least as many KV heads),
    at the same cost (selecting-layer equivalents):

    - layer l goes to layer_positions(l): the anchors stay anchors (their number is kept);
    - a part-selecting layer keeps its share of selecting heads: s of Hs heads become s * Ht / Hs of Ht, rounded
      so that the total over the plan stays exact (largest remainders), which keeps the cost whenever
      (cost - anchors) * Ht is whole (every whole cost: (cost - anchors) * Hs heads scale to a whole count);
      the heads are evenly spaced (one strided view, as the source layer's);
    - a reading head reads the mapped source of the source layer's reading heads, taken in order and spread
      over the target's reading heads; a source in a part-selecting layer maps to that layer's selecting head
      of the same rank;
    - a target layer no source layer maps to reads what the layer before it reads (or selects);
    - a layer-granular plan becomes its mapped anchors with an identity head map (what a head reads does not
      change the time).
    """
    from kascade.plan import Plan

    ls, hs = plan.model["num_layers"], plan.model["num_kv_heads"]
    lt, ht = target["num_layers"], target["num_kv_heads"]
    if ht < hs:
        raise ValueError(f"target: expected at least the plan's {hs} KV heads, got {ht}")
    pos = layer_positions(ls, lt)
    kw = dict(rho=plan.rho, k_min=plan.k_min, tile=plan.tile, model=dict(target), recipe=plan.recipe)
    anchors = [pos[a] for a in plan.anchors]
    if not plan.head_granular:
        return Plan(anchors=anchors, **kw)
    own = {layer: plan.selecting_heads(layer, hs) for layer in range(1, ls) if not plan.is_anchor(layer)}
    counts = _apportion({layer: len(h) * ht / hs for layer, h in own.items() if h})
    mine = {pos[layer]: _spread(n, ht) for layer, n in counts.items() if n}
    back = {p: layer for layer, p in enumerate(pos)}

    def head_at(a, m):  # the target head that source unit (a, m) maps to (a selecting unit of the source)
        if plan.is_anchor(a):
            return m * ht // hs
        k = own[a].index(m)
        heads = mine[pos[a]]
        return heads[k * len(heads) // len(own[a])]

    rows = []
    for j in range(lt):
        if j in anchors:
            rows.append(None)
            continue
        sel = mine.get(j, [])
        readers = [h for h in range(ht) if h not in sel]
        row = [None] * ht
        if j in back:
            layer = back[j]
            theirs = [(a, m) for a, m in plan.sources(layer, hs) if a != layer]
            for i, h in enumerate(readers):
                a, m = theirs[i * len(theirs) // len(readers)]
                row[h] = [pos[a], head_at(a, m)]
        else:  # between two mapped layers: read what the layer before reads, or its own selection
            prev = rows[j - 1]
            for h in readers:
                row[h] = [j - 1, h] if prev is None or prev[h] is None else list(prev[h])
        rows.append(row)
    return Plan(anchors=anchors, head_sources=rows, **kw)


def last_readers(plan, num_kv_heads: int) -> dict[int, int]:
    """Selecting layer -> the last layer that reads its selection (itself when none later does)."""
    last: dict[int, int] = {}
    for b in range(plan.num_layers):
        for a, _ in plan.sources(b, num_kv_heads):
            last[a] = max(last.get(a, a), b)
    return last


def forward(st, layers: int, q_of, kv_of, last: dict | None = None):
    """One pass of the strategy `st` over `layers` layers (layer l attends q_of(l) to the pair kv_of(l)); with
    `last` (last_readers), every selection is dropped once no later layer reads it, and a head-granular layer's
    assembled selection right after its layer. Returns the last layer's output."""
    st.begin_forward()
    out = None
    for layer in range(layers):
        out = st.attend(layer, q_of(layer), *kv_of(layer), None, None)
        if last is not None:
            for key in list(st.state):
                if not isinstance(key, int) or last.get(key, key) <= layer:
                    del st.state[key]
    return out


def plans_on(plans: dict, shape_name: str) -> dict:
    """name -> the plan as it runs on the shape (mapped by map_plan unless it was made for it)."""
    fp = shape(shape_name)
    keys = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
    return {name: p if all(p.model[k] == fp[k] for k in keys) else map_plan(p, fp) for name, p in plans.items()}


# ----------------------------------------------------------------------------------------------
# measurement (GPU)
# ----------------------------------------------------------------------------------------------


def _log(*a):
    print(*a, flush=True)


class _Decode:
    """Whole-model decode steps of one shape at N keys: per-layer caches, dense graphs, plan graphs."""

    def __init__(self, fp: dict, n: int):
        import torch

        import decode as DB

        self.DB, self.fp, self.n = DB, fp, n
        self.device = torch.cuda.get_device_name()
        hq, hkv, d, L = fp["num_q_heads"], fp["num_kv_heads"], fp["head_dim"], fp["num_layers"]
        per_layer = 2 * hkv * n * d * 2
        self.nbuf = int(max(2, min(L, DB.KV_BUDGET_BYTES // per_layer)))
        g = torch.Generator(device="cuda").manual_seed(n)
        self.caches = [(torch.randn(1, hkv, n, d, device="cuda", dtype=DB.DT, generator=g),
                        torch.randn(1, hkv, n, d, device="cuda", dtype=DB.DT, generator=g)) for _ in range(self.nbuf)]
        self.qs = [torch.randn(1, hq, 1, d, device="cuda", dtype=DB.DT, generator=g) for _ in range(L)]
        self.qs_fa = [q.transpose(1, 2).contiguous() for q in self.qs]
        self.seqlens = torch.full((1,), n, dtype=torch.int32, device="cuda")
        self.fa3 = DB.fa3_module()

    def _providers(self, layer: int) -> dict:
        """benchmarks/decode.py's dense providers on this layer's tensors (FA3 reads the cache as [B, N, H, D])."""
        hkv, d = self.fp["num_kv_heads"], self.fp["head_dim"]
        kc, vc = self.caches[layer % self.nbuf]
        return self.DB.dense_providers(self.qs[layer], kc, vc, self.qs_fa[layer], kc.view(1, self.n, hkv, d),
                                       vc.view(1, self.n, hkv, d), self.seqlens, self.fa3)

    def dense(self) -> dict:
        """Per-layer medians of every dense provider, the baseline's name, and whole-model graphs of the baseline
        and (when another provider is faster on one layer) of the best one."""
        layer = {}
        for name, fn in self._providers(0).items():
            try:
                layer[name] = self.DB.bench(fn, rep=30)["ms"]
            except Exception as e:  # noqa: BLE001
                _log(f"  dense {name}: failed {repr(e)[:200]}")
        fa3 = [k for k in layer if k.startswith("fa3")]
        baseline = min(fa3, key=layer.get) if fa3 else "sdpa_flash"
        best = min(layer, key=layer.get)
        out = {"baseline": baseline, "layer_ms": layer, "model": {baseline: self._model(baseline)}}
        if best != baseline:
            out["model"][best] = self._model(best)
        out["best"] = min(out["model"], key=lambda k: out["model"][k]["ms"])
        return out

    def _model(self, name: str) -> dict:
        fns = [self._providers(layer)[name] for layer in range(self.fp["num_layers"])]

        def step():
            for fn in fns:
                fn()

        return self.DB.bench(step, rep=100)

    def plan(self, plan) -> dict:
        from kascade.strategy import KascadeStrategy

        st = KascadeStrategy(plan, backend="auto")

        L, nbuf = self.fp["num_layers"], self.nbuf
        return self.DB.bench(lambda: forward(st, L, self.qs.__getitem__, lambda i: self.caches[i % nbuf]), rep=100)


class _Prefill:
    """Whole-model prompt passes of one shape at N tokens (the same q, k, v in every layer)."""

    def __init__(self, fp: dict, n: int):
        import torch

        import prefill as PB

        self.PB, self.fp, self.n = PB, fp, n
        self.device = torch.cuda.get_device_name()
        hq, hkv, d = fp["num_q_heads"], fp["num_kv_heads"], fp["head_dim"]
        g = torch.Generator(device="cuda").manual_seed(n)
        self.q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        self.k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        self.v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        fa3 = PB.load_fa3()
        self.providers = {}
        if fa3 is not None:
            qf, kf, vf = (x.transpose(1, 2).contiguous() for x in (self.q, self.k, self.v))  # [B, S, H, D]
            self.providers["fa3"] = lambda: fa3.flash_attn_func(qf, kf, vf, causal=True)
        for name in ("flash", "cudnn"):
            self.providers[f"sdpa_{name}"] = PB.sdpa_fn(name, self.q, self.k, self.v)

    def dense(self) -> dict:
        layer = {}
        for name, fn in self.providers.items():
            try:
                layer[name] = self.PB.stat(self.PB.bench(fn))
            except Exception as e:  # noqa: BLE001
                _log(f"  dense {name}: failed {repr(e)[:200]}")
        baseline = "fa3" if "fa3" in layer else "sdpa_flash"
        L = self.fp["num_layers"]
        model = {k: {"ms": L * v["median_ms"], "composition": f"{L} x one layer's median"} for k, v in layer.items()}
        self.baseline = baseline
        return {"baseline": baseline, "layer_ms": {k: v["median_ms"] for k, v in layer.items()},
                "model": model, "best": min(model, key=lambda k: model[k]["ms"])}

    def plan(self, plan) -> dict:
        from unittest import mock

        import kascade.ops
        from kascade.strategy import KascadeStrategy

        st = KascadeStrategy(plan, backend="auto")
        hkv, L = self.fp["num_kv_heads"], self.fp["num_layers"]
        last = last_readers(plan, hkv)
        dense = self.providers[self.baseline]

        kv = (self.k, self.v)
        with mock.patch.object(kascade.ops, "dense", lambda *a, **kw: dense()):
            med, p20, p80 = self.PB.bench(lambda: forward(st, L, lambda _: self.q, lambda _: kv, last))
        return {"ms": med, "p20": p20, "p80": p80}


def measure(plans: dict, shape_name: str, phase: str, n: int, out: Path, budget_s: float, runner=None) -> bool:
    """Measure every plan of `plans` (name -> Plan) missing from `out` on the shape at N = n, with dense
    measured in this process first; False when the budget stopped it before the last plan. runner: the class
    that measures (default _Decode or _Prefill by the phase)."""
    import datetime

    import torch
    import triton

    from kascade.costmodel import predicted_speedup

    start = time.time()
    fp = shape(shape_name)
    doc = json.loads(out.read_text()) if out.is_file() else {"shape": shape_name, "fingerprint": fp, "phase": phase,
                                                             "N": n, "B": 1, "runs": [], "plans": {}}
    todo = {k: p for k, p in plans_on(plans, shape_name).items() if "ms" not in doc["plans"].get(k, {})}
    if not todo:
        _log(f"{out.name}: every plan measured")
        return True
    if budget_s <= 0:
        return False
    _log(f"{shape_name} {phase} N={n}: {len(todo)} plans to measure")
    runner = (runner or (_Decode if phase == "decode" else _Prefill))(fp, n)
    dense = runner.dense()
    run = {"index": len(doc["runs"]), "device": runner.device, "torch": torch.__version__,
           "triton": triton.__version__, "date": datetime.date.today().isoformat(), "dense": dense}
    doc["runs"].append(run)
    base = dense["model"][dense["baseline"]]["ms"]
    best = dense["model"][dense["best"]]["ms"]
    _log(f"  dense: {dense['baseline']} {base:.3f} ms for {fp['num_layers']} layers (best {dense['best']} {best:.3f})")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = True
    for name, plan in todo.items():
        if time.time() - start > budget_s:
            done = False
            break
        entry = {"run": run["index"], "anchors": plan.anchors, "selecting_layers_equivalent":
                 plan.selecting_layers_equivalent, "head_granular": plan.head_granular, "rho": plan.rho}
        if shape_name == "8b":
            entry["predicted_speedup"] = predicted_speedup(plan)[phase]  # the cost model (H200 kernel table)
        try:
            t = runner.plan(plan)
            entry.update(t, dense_ms=base, dense=dense["baseline"], speedup=base / t["ms"],
                         best_dense_ms=best, best_dense=dense["best"], speedup_vs_best_dense=best / t["ms"])
            _log(f"  {name}: {t['ms']:.3f} ms, {entry['speedup']:.2f}x {dense['baseline']} "
                 f"(cost {plan.selecting_layers_equivalent:g})")
        except Exception as e:  # noqa: BLE001
            entry["error"] = repr(e)[:300]
            _log(f"  {name}: failed {entry['error']}")
        doc["plans"][name] = entry
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)
        torch.cuda.empty_cache()
    del runner
    torch.cuda.empty_cache()
    return done
