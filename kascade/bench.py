"""End-to-end generation speed: time to first token and decode tokens/s, dense vs Kascade.

    kascade bench MODEL_DIR_OR_CONFIG --lengths 32768,131072 --batch 1,4 --new-tokens 64

For every (context length N, batch B) and provider the model generates greedily on a transformers
StaticCache of N + 2 * new_tokens + 1 positions (kascade.integrations.transformers.StaticGenerator):
  - time to first token (TTFT): the prefill of B random prompts of N tokens (in chunks of
    `prefill_chunk` tokens per sequence when B * N is large) and the argmax of the first token, after
    one untimed prefill of the same shape (the first call at a new length compiles Triton kernel
    variants: 14 s of a 21 s Kascade prefill at 128K on an H200);
  - decode: `new_tokens` steps, each one replay of the CUDA graph of the whole step (after one warm
    round that compiles and captures); tokens/s = B * new_tokens / time.
Providers: "dense", the fastest dense attention on the machine (FlashAttention-3 through the
fa3_fwd_interface package when it imports, on the static cache with per-sequence lengths; transformers'
"sdpa" otherwise) and "kascade" (kascade.enable with the plan). A third, "none", replaces attention by
a copy of q: the rest of the model (weights, norms, cache writes, sampling). The attention share of a
provider is (t - t_none) / t.

The prediction from the kernel benchmarks: t_none plus, per layer, the attention kernel of that layer
alone at the same shapes (CUDA-graph replays for decode, single calls for prefill, on the layer-0 cache
after the prefill): dense = L x dense layer; Kascade = layer 0 (dense output + selection) + (A - 1)
anchors + (L - A) reuse layers. The ratio measured / predicted is the overhead of running the kernels
inside the model.

MODEL_DIR_OR_CONFIG: a local HF model directory (its weights), or a config .json (random weights of
that shape in the chosen dtype, initialised on the device: an 8B shape needs no download).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

DENSE_FA3 = "kascade_bench_fa3"
NONE = "kascade_bench_none"
PAPER_ANCHORS_32 = [0, 2, 8, 13, 14]  # the paper's Llama-3.1-8B anchors (5 of 32 layers)


# ----------------------------------------------------------------------------------------------
# attention functions of the benchmark (registered on transformers' AttentionInterface)
# ----------------------------------------------------------------------------------------------


def fa3_module():
    """fa3_fwd_interface (FlashAttention-3 forward), or None when it does not import."""
    try:
        import fa3_fwd_interface

        return fa3_fwd_interface
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return None


class _Fa3State:
    """Holds the key bounds of the current forward (computed once, at the first layer)."""


_FA3_STATE = _Fa3State()


def _fa3_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense FlashAttention-3 on the (static) cache: q [B, Hq, Q, D], k/v [B, Hkv, L, D] -> [B, Q, Hq, D].

    The benchmark's prompts are unpadded: left padding is refused in eager steps (so also in the eager
    warm-up step before a graph capture) and kv_start is not passed to the kernel."""
    from kascade.integrations.transformers import _cached_bounds, _graph_mode

    fa3 = fa3_module()
    kv_start, kv_len = _cached_bounds(_FA3_STATE, attention_mask, key)
    if kv_start is not None and not _graph_mode(query):
        raise ValueError("attention_mask: the benchmark's dense FlashAttention-3 function takes unpadded prompts")
    b, n = query.shape[0], key.shape[2]
    seqlens = (kv_len if kv_len is not None else torch.full((b,), n, device=query.device)).to(torch.int32)
    out = fa3.flash_attn_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                      cache_seqlens=seqlens, softmax_scale=scaling, causal=True)
    out = out[0] if isinstance(out, tuple) else out
    return out, None


def _no_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The model without attention: the output is q itself (what is left is weights, norms, cache writes)."""
    return query.transpose(1, 2), None


def register_providers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from kascade.integrations.transformers import _key_padding_mask, _register

    _register()
    for name, fn in ((DENSE_FA3, _fa3_attention), (NONE, _no_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _key_padding_mask)


class Provider:
    """Switches the model to one attention implementation for a `with` block."""

    def __init__(self, name, model, plan=None, dense_impl="sdpa", backend="auto"):
        self.name, self.model, self.plan, self.dense_impl, self.backend = name, model, plan, dense_impl, backend
        self.handle = None
        self.previous = None

    def __enter__(self):
        import kascade

        self.previous = self.model.config._attn_implementation
        if self.name == "kascade":
            # the method's prefill is what this benchmark times (kascade.enable's default attends the prompt densely)
            self.handle = kascade.enable(self.model, self.plan, backend=self.backend, sparse_prefill=True)
        else:
            self.model.set_attn_implementation(self.dense_impl if self.name == "dense" else NONE)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.disable()
            self.handle = None
        else:
            self.model.set_attn_implementation(self.previous)
        return False


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _summary(times):
    ts = sorted(times)
    q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]  # noqa: E731
    return dict(median=statistics.median(ts), p20=q(0.2), p80=q(0.8), n=len(ts))


def time_graphed(fn, device, reps=20):
    """Median [p20, p80] seconds of one call of fn, as CUDA-graph replays (eager calls on the CPU)."""
    fn()  # warm-up: compiles
    if device.type != "cuda":
        return _summary([_timed(fn, device)[0] for _ in range(max(1, reps // 4))])
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return _summary(times)


# ----------------------------------------------------------------------------------------------
# the per-layer kernel prediction
# ----------------------------------------------------------------------------------------------


def layer_kernels(model, cache_layer, plan, B, N, dense_impl, device, prefill: bool, reps: int):
    """Seconds of one layer's attention at this shape for each layer kind (see the module docstring)."""
    from kascade import ops

    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    k_all, v_all = cache_layer.keys, cache_layer.values  # [B, Hkv, L, D], written up to N
    dtype = k_all.dtype
    g = torch.Generator(device=device).manual_seed(0)
    qlen = N if prefill else 1
    q = torch.randn(B, hq, qlen, d, generator=g, device=device, dtype=dtype)
    scale = d**-0.5
    kl = torch.full((B,), N, dtype=torch.int64, device=device)
    if prefill:
        k, v, kw = k_all[:, :, :N], v_all[:, :, :N], {}
    else:
        k, v, kw = k_all, v_all, {"kv_len": kl}
    fa3 = fa3_module() if dense_impl == DENSE_FA3 else None

    def dense():
        if fa3 is not None:
            return fa3.flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               cache_seqlens=kl.to(torch.int32), softmax_scale=scale, causal=True)
        if prefill:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return ops.dense(q, k, v, scale=scale, **kw)

    p = plan
    kw_all = dict(scale=scale, **kw)
    sel = ops.select(q, k, p.rho, p.k_min, p.tile, **kw_all)
    hm = torch.tensor(p.kv_head_map(p.anchors[-1] + 1 if p.anchors[-1] + 1 < cfg.num_hidden_layers else 1, hkv),
                      device=device)

    def layer0():
        if prefill:
            s = ops.select(q, k, p.rho, p.k_min, p.tile, **kw_all)
            return ops.dense(q, k, v, **kw_all), s
        return ops.anchor(q, k, v, p.rho, p.k_min, p.tile, dense_output=True, **kw_all)

    def anchor():
        return ops.anchor(q, k, v, p.rho, p.k_min, p.tile, **kw_all)

    def reuse():
        return ops.reuse(q, k, v, sel, hm, **kw_all)

    res = {}
    for name, fn in (("dense", dense), ("kascade_layer0", layer0), ("kascade_anchor", anchor),
                     ("kascade_reuse", reuse)):
        if prefill:  # long single calls: timed eagerly after one warm-up call
            fn()
            res[name] = _summary([_timed(fn, device)[0] for _ in range(reps)])
        else:
            res[name] = time_graphed(fn, device, reps=reps)
    L, A = cfg.num_hidden_layers, len(p.anchors)
    res["sum_dense"] = L * res["dense"]["median"]
    res["sum_kascade"] = (res["kascade_layer0"]["median"] + (A - 1) * res["kascade_anchor"]["median"]
                          + (L - A) * res["kascade_reuse"]["median"])
    return res


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def load(model_or_config, device, dtype, seed=0):
    """(model, description) from a model directory or a config .json (random weights on the device)."""
    from kascade.models import load_model, random_model

    path = Path(model_or_config)
    if path.is_file() and path.suffix == ".json":
        model = random_model(path, seed=seed, dtype=dtype, device=device)
        return model, f"random weights, config {path.name}"
    model, _ = load_model(path, device=str(device), dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                                                             torch.float32: "float32"}[dtype])
    return model, f"weights of {path.name}"


def default_plan(model, anchors=None, rho=0.1, k_min=128, tile=32):
    from kascade.plan import Plan, uniform_anchors

    layers = model.config.num_hidden_layers
    if anchors is None:
        anchors = PAPER_ANCHORS_32 if layers == 32 else uniform_anchors(layers, min(5, layers))
    return Plan.for_model(model.config, anchors, rho=rho, k_min=k_min, tile=tile)


def auto_chunk(B, N, tokens_per_chunk=131072):
    """Prefill chunk (tokens per sequence): the whole prompt while B * N <= tokens_per_chunk, else
    chunks of tokens_per_chunk // B rounded down to a multiple of 1024 (bounds the MLP activations)."""
    if B * N <= tokens_per_chunk:
        return None
    return max(1024, (tokens_per_chunk // B) // 1024 * 1024)


def profile_prefill(gen, ids, device, top=12):
    """Top GPU kernels of one prefill (torch.profiler): total ms, their calls, and the wall time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        wall, _ = _timed(lambda: gen.prefill(ids), device)
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        t = getattr(ev, "cuda_time_total", 0) if t is None else t
        if device.type != "cuda":
            t = ev.self_cpu_time_total
        if t > 0:
            rows.append(dict(name=ev.key[:120], ms=t / 1e3, calls=ev.count))
    rows.sort(key=lambda r: -r["ms"])
    return dict(wall_s=wall, kernel_ms_total=sum(r["ms"] for r in rows), top=rows[:top])


def run_case(model, plan, B, N, new_tokens, providers, dense_impl, device, repeats, kernels, log, backend="auto",
             profile=(), decode_only=False):
    """Measurements of one (B, N): {provider: {...}, "kernels": {...}}."""
    from tqdm.auto import tqdm

    from kascade.integrations.transformers import StaticGenerator

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (B, N), generator=torch.Generator().manual_seed(N + B)).to(device)
    chunk = auto_chunk(B, N)
    gen = StaticGenerator(model, B, N + 2 * new_tokens + 1, prefill_chunk=chunk)
    out_mode = "decode only (random cache)" if decode_only else "prefill + decode"
    warm_ids = ids[:, : min(N, 2048)]
    out = {"B": B, "N": N, "new_tokens": new_tokens, "prefill_chunk": chunk, "mode": out_mode, "providers": {}}
    for name in tqdm(providers, desc=f"B={B} N={N}", leave=False):
        try:
            out["providers"][name] = _measure(gen, name, model, plan, dense_impl, backend, ids, warm_ids, repeats,
                                              new_tokens, device, decode_only=decode_only)
        except Exception as e:  # noqa: BLE001 - keep the other providers' numbers
            import traceback

            out["providers"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                                      "traceback": traceback.format_exc()[-2000:]}
            log(f"  B={B} N={N} {name}: {type(e).__name__}: {str(e)[:300]}")
            gen.graph = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        r = out["providers"][name]
        ttft = f"TTFT {r['ttft_s']['median']:.3f} s, " if "ttft_s" in r else ""
        log(f"  B={B} N={N} {name:8s} {ttft}decode {r['step_ms']:.2f} ms/step ({r['tokens_per_s']:.1f} tok/s)")
        if name in profile:
            with Provider(name, model, plan, dense_impl, backend):
                r["prefill_profile"] = profile_prefill(gen, ids, device)
            for row in r["prefill_profile"]["top"][:8]:
                log(f"    {row['ms']:10.1f} ms {row['calls']:6d}x  {row['name']}")
    if kernels and "step_ms" in out["providers"].get("none", {}):
        layer0 = gen.cache.layers[0]
        try:
            out["kernels"] = {"decode": layer_kernels(model, layer0, plan, B, N, dense_impl, device, False, 20)}
            if chunk is None and not decode_only:
                out["kernels"]["prefill"] = layer_kernels(model, layer0, plan, B, N, dense_impl, device, True,
                                                          1 if N >= 65536 else 3)
        except Exception as e:  # noqa: BLE001
            out["kernels_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  B={B} N={N} kernels: {out['kernels_error']}")
    del gen
    if device.type == "cuda":
        torch.cuda.empty_cache()
    derive(out)
    return out


def fill_cache(gen, ids, seed=0):
    """Decode-only mode: the cache holds N random keys/values (std 1.3, the scale of a random-weight
    model's keys) instead of a prefill's; positions and write offsets are set as after a prefill of N."""
    B, N = ids.shape
    gen.prefill(ids[:, :16])  # allocates the cache layers
    g = torch.Generator(device=gen.device).manual_seed(seed)
    for layer in gen.cache.layers:
        layer.keys[:, :, :N].normal_(0.0, 1.3, generator=g)
        layer.values[:, :, :N].normal_(0.0, 1.3, generator=g)
        layer.cumulative_length.fill_(N)
    gen.pos.fill_(N)
    gen.tok.copy_(ids[:, -1:])
    gen.written = N


def _measure(gen, name, model, plan, dense_impl, backend, ids, warm_ids, repeats, new_tokens, device,
             decode_only=False):
    """TTFT and decode timing of one provider on the generator's cache."""
    B = ids.shape[0]
    if decode_only:
        with Provider(name, model, plan, dense_impl, backend):
            gen.graph = None
            fill_cache(gen, ids)
            gen.decode(new_tokens)  # warm-up step + capture + replays (not timed)
            t, toks = _timed(lambda: gen.decode(new_tokens), device)
            return dict(decode_s=t, step_ms=1e3 * t / new_tokens, tokens_per_s=B * new_tokens / t,
                        decode_tokens_head=toks[0, :8].tolist())
    with Provider(name, model, plan, dense_impl, backend):
        gen.graph = None  # a new graph per provider
        gen.generate(warm_ids, max_new_tokens=2)  # compile the decode kernels (and prefill at a short length)
        gen.prefill(ids)  # untimed: the first prefill at a new length compiles kernel variants (seconds)
        ttft = []
        for _ in range(repeats):
            t, first = _timed(lambda: gen.prefill(ids), device)
            ttft.append(t)
        gen.graph = None
        gen.decode(new_tokens)  # warm-up step + capture + replays (not timed)
        t, toks = _timed(lambda: gen.decode(new_tokens), device)
        return dict(ttft_s=_summary(ttft), decode_s=t, step_ms=1e3 * t / new_tokens,
                    tokens_per_s=B * new_tokens / t, first_tokens=first[:, 0].tolist(),
                    decode_tokens_head=toks[0, :8].tolist())


def derive(case):
    """Attention shares, ratios and the kernel prediction of one case (in place)."""
    pr = {k: v for k, v in case["providers"].items() if "error" not in v}
    none = pr.get("none")
    for name, r in pr.items():
        if none is not None and name != "none":
            if "ttft_s" in r and "ttft_s" in none:
                r["ttft_attention_share"] = 1 - none["ttft_s"]["median"] / r["ttft_s"]["median"]
            r["decode_attention_share"] = 1 - none["step_ms"] / r["step_ms"]
    if "dense" in pr and "kascade" in pr:
        case["decode_speedup"] = pr["kascade"]["tokens_per_s"] / pr["dense"]["tokens_per_s"]
        if "ttft_s" in pr["dense"] and "ttft_s" in pr["kascade"]:
            case["ttft_speedup"] = pr["dense"]["ttft_s"]["median"] / pr["kascade"]["ttft_s"]["median"]
    kern = case.get("kernels", {})
    if none is not None and "decode" in kern:
        base = none["step_ms"] / 1e3
        pred = {"dense": base + kern["decode"]["sum_dense"], "kascade": base + kern["decode"]["sum_kascade"]}
        case["decode_predicted_step_ms"] = {k: 1e3 * v for k, v in pred.items()}
        case["decode_predicted_speedup"] = pred["dense"] / pred["kascade"]
        for name in ("dense", "kascade"):
            if name in pr:
                pr[name]["decode_measured_over_predicted"] = pr[name]["step_ms"] / (1e3 * pred[name])
    if none is not None and "prefill" in kern:
        base = none["ttft_s"]["median"]
        pred = {"dense": base + kern["prefill"]["sum_dense"], "kascade": base + kern["prefill"]["sum_kascade"]}
        case["ttft_predicted_s"] = pred
        case["ttft_predicted_speedup"] = pred["dense"] / pred["kascade"]
        for name in ("dense", "kascade"):
            if name in pr:
                pr[name]["ttft_measured_over_predicted"] = pr[name]["ttft_s"]["median"] / pred[name]


def environment(device, dense_impl):
    import transformers
    import triton

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               torch=torch.__version__, transformers=transformers.__version__, triton=triton.__version__,
               python=platform.python_version(), device=str(device), dense=dense_impl)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    fa3 = fa3_module()
    if fa3 is not None:
        try:
            from importlib.metadata import version

            env["fa3"] = version("fa3_fwd")
        except Exception:  # noqa: BLE001
            env["fa3"] = "installed"
    return env


def _len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(res) -> str:
    env, cfg = res["env"], res["model"]
    L = [f"# End-to-end generation: {cfg['description']}", "",
         f"{env['date']}; {env.get('gpu', env['device'])}; torch {env['torch']}, transformers {env['transformers']}, "
         f"triton {env['triton']}" + (f", fa3-fwd {env['fa3']}" if "fa3" in env else "") + f"; {cfg['dtype']}.",
         f"Model: {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']}/{cfg['kv_heads']} heads, head dim "
         f"{cfg['head_dim']}. Dense = `{env['dense']}`. Kascade plan: anchors {res['plan']['anchors']}, rho "
         f"{res['plan']['rho']}, k_min {res['plan']['k_min']}, tile {res['plan']['tile']}.",
         "Greedy generation on a StaticCache; decode = one CUDA-graph replay per step (whole model); TTFT = "
         "prefill + first token (median of the repeats). 'none' = the model with attention replaced by a copy: "
         "attention share = (t - t_none) / t. Predicted = t_none + the sum of per-layer attention kernels "
         "measured alone in the same run.", "",
         "| B | N | provider | TTFT (s) | attn share | decode ms/step | tokens/s | attn share | TTFT meas/pred "
         "| decode meas/pred |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, spec=".3f": "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)  # noqa: E731
    for c in res["cases"]:
        for name, r in c["providers"].items():
            if "error" in r:
                L.append(f"| {c['B']} | {_len(c['N'])} | {name} | error: {r['error'][:120]} |||||||")
                continue
            L.append(f"| {c['B']} | {_len(c['N'])} | {name} | {f(r.get('ttft_s', {}).get('median'))} | "
                     f"{f(r.get('ttft_attention_share'), '.0%')} | {f(r['step_ms'], '.2f')} | "
                     f"{f(r['tokens_per_s'], '.1f')} | {f(r.get('decode_attention_share'), '.0%')} | "
                     f"{f(r.get('ttft_measured_over_predicted'), '.2f')} | "
                     f"{f(r.get('decode_measured_over_predicted'), '.2f')} |")
    L += ["", "| B | N | mode | decode speedup (tokens/s) | predicted | TTFT speedup | predicted |",
          "|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        L.append(f"| {c['B']} | {_len(c['N'])} | {c.get('mode', 'prefill + decode')} | "
                 f"{f(c.get('decode_speedup'), '.2f')}x | "
                 f"{f(c.get('decode_predicted_speedup'), '.2f')}x | {f(c.get('ttft_speedup'), '.2f')}x | "
                 f"{f(c.get('ttft_predicted_speedup'), '.2f')}x |")
    kern = [c for c in res["cases"] if "kernels" in c]
    if kern:
        L += ["", "Per-layer attention kernels (ms, median) used for the prediction:", "",
              "| B | N | step | dense | Kascade layer 0 | anchor | reuse | L x dense | Kascade sum |",
              "|---|---|---|---|---|---|---|---|---|"]
        for c in kern:
            for step, k in c["kernels"].items():
                L.append(f"| {c['B']} | {_len(c['N'])} | {step} | {1e3 * k['dense']['median']:.3f} | "
                         f"{1e3 * k['kascade_layer0']['median']:.3f} | {1e3 * k['kascade_anchor']['median']:.3f} | "
                         f"{1e3 * k['kascade_reuse']['median']:.3f} | {1e3 * k['sum_dense']:.2f} | "
                         f"{1e3 * k['sum_kascade']:.2f} |")
    profs = [(c, n, r["prefill_profile"]) for c in res["cases"] for n, r in c["providers"].items()
             if "prefill_profile" in r]
    for c, name, pf in profs:
        L += ["", f"Prefill profile, {name}, B={c['B']}, N={_len(c['N'])}: wall {pf['wall_s']:.2f} s (under the "
              f"profiler), GPU kernels {pf['kernel_ms_total'] / 1e3:.2f} s; top kernels:", "",
              "| kernel | ms | calls |", "|---|---|---|"]
        L += [f"| `{row['name']}` | {row['ms']:.1f} | {row['calls']} |" for row in pf["top"]]
    return "\n".join(L) + "\n"


def plot(res, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = res["cases"]
    labels = [f"B={c['B']}\n{_len(c['N'])}" for c in cases]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft", "time to first token (s)"), (axes[1], "step", "decode ms / step")):
        width = 0.27
        for i, name in enumerate(["none", "dense", "kascade"]):
            vals = [c["providers"].get(name, {}) for c in cases]
            vals = [v if "error" not in v else {} for v in vals]
            ys = [(v.get("ttft_s", {}).get("median", float("nan")) if key == "ttft" else v["step_ms"]) if v
                  else float("nan") for v in vals]
            ax.bar([j + (i - 1) * width for j in range(len(cases))], ys, width,
                   label={"none": "no attention (rest of the model)"}.get(name, name))
        ax.set_xticks(range(len(cases)), labels)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res['model']['description']} on {res['env'].get('gpu', res['env']['device'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(model_or_config, lengths, batches, new_tokens=64, output="benchmarks/results/bench", device="auto",
        dtype="auto", anchors=None, plan_path=None, providers=("none", "dense", "kascade"), repeats=None,
        kernels=True, rho=0.1, k_min=128, backend="auto", profile=(), decode_only=False, log=print):
    """Run every (batch, length) case; writes output.json / .md / .png after each case. Returns the results."""
    from kascade.models import resolve_device, resolve_dtype
    from kascade.plan import Plan

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    register_providers()
    dense_impl = DENSE_FA3 if (dev.type == "cuda" and dt != torch.float32 and fa3_module() is not None) else "sdpa"
    model, desc = load(model_or_config, dev, dt)
    model.eval()
    plan = Plan.load(plan_path) if plan_path else default_plan(model, anchors, rho=rho, k_min=k_min)
    plan.validate(model.config)
    cfg = model.config
    res = dict(env=environment(dev, dense_impl),
               model=dict(description=desc, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                          heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                          head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                          dtype=str(dt).replace("torch.", "")),
               plan=dict(anchors=plan.anchors, rho=plan.rho, k_min=plan.k_min, tile=plan.tile),
               new_tokens=new_tokens, cases=[], errors=[])
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(markdown(res))
        if res["cases"]:
            plot(res, out.with_suffix(".png"))

    with torch.no_grad():
        for N in lengths:
            for B in batches:
                reps = repeats or (1 if B * N >= 65536 else 3)
                try:
                    res["cases"].append(run_case(model, plan, B, N, new_tokens, list(providers), dense_impl, dev,
                                                 reps, kernels and "none" in providers, log, backend=backend,
                                                 profile=tuple(profile), decode_only=decode_only))
                except Exception as e:  # noqa: BLE001 - record it (out of memory, ...) and go on with the others
                    import traceback

                    res["errors"].append(dict(B=B, N=N, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                                              traceback=traceback.format_exc()[-2000:]))
                    log(f"  B={B} N={N}: {type(e).__name__}: {str(e)[:300]}")
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                save()
    return res
