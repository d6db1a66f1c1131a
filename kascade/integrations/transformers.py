"""Kascade attention in transformers through its public AttentionInterface.

`enable(model, plan)` registers an attention function and a mask function under the name
"kascade" (once, at first use; nothing is registered at import), switches the model to it, and
attaches the strategy to each attention module as `module.kascade_strategy`. `disable(model)`
restores the previous implementation. `enable` returns a handle that is also a context manager:

    with kascade.enable(model, plan):
        out = model.generate(**inputs, max_new_tokens=32)

By default the prompt is attended densely and each decode step with the plan (decode-only mode,
kascade.strategy.DEFAULT_SPARSE_PREFILL); `enable(model, plan, sparse_prefill=True)` selects in the prompt too.

The mask function hands the attention function only a 2-D "key state" tensor: Kascade applies
causality itself, left padding becomes a per-sequence start offset (kv_start), and the unwritten tail
of a preallocated cache (transformers' StaticCache) a per-sequence number of valid keys (kv_len).

Static cache and CUDA graphs: on a StaticCache every decode step has the same shapes, kv_start and
kv_len are computed on the device, and the kernels never wait for the host, so the whole decode
step (model and attention) can be captured in one CUDA graph and replayed: `StaticGenerator` below.
Inside a capture (or torch.compile tracing) the padding checks, which need host syncs, are skipped.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from kascade.plan import Plan
from kascade.strategy import KascadeStrategy, Strategy, resolve_sparse_prefill

ATTN_NAME = "kascade"
_registered = False


REAL, PADDING, UNWRITTEN = 1, 0, -1  # key states handed from the mask function to the attention function


def _key_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """Mask function for "kascade" (and the benchmark's dense functions).

    Returns the key states [B, kv_length] int8: REAL (1), PADDING (0, from the 2-D attention mask) or
    UNWRITTEN (-1: positions at or after q_offset + q_length, the tail of a preallocated cache), or
    None when every key is real. q_offset is a device tensor on a StaticCache: nothing here syncs.
    """
    end = q_offset + q_length  # keys written so far (int, or a 0-d tensor on a StaticCache)
    has_tail = isinstance(end, torch.Tensor) or end < kv_offset + kv_length
    has_mask = attention_mask is not None and attention_mask.dim() == 2
    if not has_mask and not has_tail:
        return None
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else None)
    if has_mask:
        am = attention_mask.to(device=device, dtype=torch.bool)[:, kv_offset : kv_offset + kv_length]
        if am.shape[1] < kv_length:  # keys past the 2-D mask: real if written (the tail is marked below)
            am = torch.cat([am, am.new_ones(am.shape[0], kv_length - am.shape[1])], dim=1)
        states = am.to(torch.int8)
    else:
        states = torch.ones(batch_size, kv_length, dtype=torch.int8, device=device)
    if has_tail:
        pos = torch.arange(kv_offset, kv_offset + kv_length, device=device)
        states = torch.where(pos[None, :] < end, states, torch.full_like(states, UNWRITTEN))
    return states


def _graph_mode(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured or torch.compile traces: no host syncs allowed."""
    compiling = getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling()
    return compiling or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _kv_bounds(states, k) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kv_start [B], kv_len [B]) from the key states, each None when trivial (no padding / no tail).

    Eager: checked (host syncs); ValueError for padding that is not left padding. While capturing a
    graph: both computed on the device, unchecked, never None.
    """
    if states is None:
        return None, None
    if states.dim() != 2:
        raise ValueError(f"attention_mask: expected a 2-D padding mask [batch, seq_len], got shape "
                         f"{tuple(states.shape)}; custom 4-D masks are not supported by kascade attention")
    n = k.shape[2]
    states = states[:, -n:] if states.shape[1] >= n else states
    if states.shape[1] != n:
        raise ValueError(f"attention_mask: expected {n} key positions, got {states.shape[1]}")
    if states.dtype == torch.bool:
        states = states.to(torch.int8)
    # leading padding per sequence: the first key that is not padding (two reductions, no scan)
    start = (states != PADDING).to(torch.int8).argmax(dim=1)
    length = (states != UNWRITTEN).sum(dim=1)  # written keys per sequence
    if _graph_mode(k):
        return start, length
    if bool((states == REAL).all()):
        return None, None
    if bool((start >= length).any()) or not bool((states == REAL).any(dim=1).all()):
        raise ValueError("attention_mask: a sequence has no real token")
    pos = torch.arange(n, device=states.device)[None, :]
    expect = (pos >= start[:, None]) & (pos < length[:, None])
    if not torch.equal(expect, states == REAL):
        bad = int((expect != (states == REAL)).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask: sequence {bad} has padding after its first real token; kascade "
                         "supports left padding only (tokenizer.padding_side = 'left')")
    return (start if bool(start.any()) else None), (length if bool((length < n).any()) else None)


def _cached_bounds(holder, states, k):
    """_kv_bounds once per forward (kept on `holder`): the key states object is the same for every layer."""
    cached = getattr(holder, "_kascade_bounds", None)
    if cached is not None and cached[0] is states and cached[1] == k.shape[2]:
        return cached[2]
    bounds = _kv_bounds(states, k)
    holder._kascade_bounds = (states, k.shape[2], bounds)
    return bounds


def _takes_kv_len(strategy) -> bool:
    try:
        return "kv_len" in inspect.signature(strategy.attend).parameters
    except (TypeError, ValueError):
        return False


def _trim(key, value, kv_len, q):
    """Cut the unwritten tail off the cache (one host sync): for steps that take no kv_len."""
    if _graph_mode(q):
        raise ValueError("kv_len: this step cannot run on a preallocated cache inside a CUDA graph or "
                         f"torch.compile (q {tuple(q.shape)}); capture decode steps only, run the prefill eagerly")
    n = int(kv_len.max())
    if int(kv_len.min()) != n:
        raise ValueError(f"kv_len: expected the same number of written keys in every sequence, got {kv_len.tolist()}")
    return key[:, :, :n], value[:, :, :n]


def _kascade_bounds_for(strategy, attention_mask, query, key, value):
    """(key, value, kv_start, kv_len) for strategy.attend; kv_len stays only for decode steps that take it."""
    kv_start, kv_len = _cached_bounds(strategy, attention_mask, key)
    if kv_len is not None and (query.shape[2] > 1 or not _takes_kv_len(strategy)):
        key, value = _trim(key, value, kv_len, query)
        kv_len = None
    return key, value, kv_start, kv_len


def kascade_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: q [B, Hq, Q, D], k/v [B, Hkv, N, D] -> ([B, Q, Hq, Dv], None)."""
    strategy = getattr(module, "kascade_strategy", None)
    if strategy is None:
        raise RuntimeError("kascade attention is selected but this module has no strategy; use kascade.enable(model, plan)")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: kascade attention does not support {name} attention (got {kwargs[name]})")
    layer = module.layer_idx
    if layer == 0:
        strategy.begin_forward()
    key, value, kv_start, kv_len = _kascade_bounds_for(strategy, attention_mask, query, key, value)
    if getattr(strategy, "select_keys", "exact") == "fp8":
        strategy.key_copies = _CacheCopies(module, query)
    if kv_len is None:
        out = strategy.attend(layer, query, key, value, kv_start, scaling)
    else:
        out = strategy.attend(layer, query, key, value, kv_start, scaling, kv_len=kv_len)
    return out.transpose(1, 2).contiguous(), None


class _CacheCopies:
    """The FP8 key copies of the cache this forward writes (kascade.fp8keys.KeyCopies, attached to the cache
    object at its first use and freed with it); without a cache (use_cache=False) the copy is made per call."""

    def __init__(self, module, query):
        ref = getattr(module, "_kascade_cache", None)
        self.cache = ref() if ref is not None else None
        self.capturing = _graph_mode(query)

    def copy(self, layer, heads, k, q_len, kv_len):
        from kascade import fp8keys

        if self.cache is None:
            return fp8keys.transient(k, heads)
        return fp8keys.attach(self.cache).update(layer, heads, k, q_len, kv_len, self.capturing,
                                                 fp8keys.max_length(self.cache, layer))


def _remember_cache(module, args, kwargs):
    """Forward pre-hook of an attention module (select_keys="fp8"): a weak reference to the step's cache."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    module._kascade_cache = weakref.ref(cache) if cache is not None else None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kascade_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _key_padding_mask)
    _registered = True


def attention_modules(model):
    """The model's attention modules (those with a `layer_idx`), in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not mods:
        raise ValueError(f"model: found no attention modules with a layer_idx in {type(model).__name__}; "
                         "kascade supports Llama, Qwen2/Qwen3 and Mistral-style decoders")
    return sorted(mods, key=lambda m: m.layer_idx)


def _check_model(model) -> None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", True)
    layer_types = getattr(cfg, "layer_types", None) or []
    if (window is not None and uses_window and window < getattr(cfg, "max_position_embeddings", 0)) or any(
        t != "full_attention" for t in layer_types
    ):
        raise ValueError(f"model: sliding-window attention layers are not supported (sliding_window={window}, "
                         f"layer_types={sorted(set(layer_types))}); set config.sliding_window=None if the model "
                         "was trained with full attention")


class KascadeHandle:
    """Returned by `enable`; `disable()` or leaving the `with` block restores the model."""

    def __init__(self, model, strategy: Strategy, previous: str):
        self.model, self.strategy, self.previous = model, strategy, previous

    def disable(self) -> None:
        disable(self.model)

    def key_copy_bytes(self, cache) -> int:
        """Bytes of the FP8 key copies (select_keys="fp8") attached to a transformers cache; 0 without any."""
        from kascade import fp8keys

        copies = fp8keys.key_copies(cache)
        return 0 if copies is None else copies.nbytes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False


def enable(model, plan: Plan | None = None, *, strategy: Strategy | None = None, backend: str = "auto",
           dense_anchor_output: bool = False, sparse_prefill: bool | None = None, select_keys: str = "exact",
           rerank: float | None = None) -> KascadeHandle:
    """Switch `model` to Kascade attention with `plan` (or any `strategy`). See the module docstring.

    sparse_prefill (with plan=): None (the default) is kascade.strategy.DEFAULT_SPARSE_PREFILL, decode-only mode:
    the prompt attends densely and decode steps sparsely, which kept answers on formats unlike the plan's
    calibration; True also selects in the prompt (the paper's method: the prefill speedup, with the accuracy cost
    measured in benchmarks/results/generalization_smollm2.md). A `strategy` carries its own mode (its
    constructor's sparse_prefill).
    select_keys="fp8" scores every selection from an FP8 copy of the selecting heads' keys (kascade.fp8keys),
    kept beside the cache: written when the cache is (the attention function writes the rows the step added),
    attached to the cache object and freed with it (`handle.key_copy_bytes(cache)` reports its size); rerank
    c >= 1 re-ranks c * k FP8 candidates with the exact keys. "exact" (the default) allocates nothing."""
    from kascade import fp8keys

    fp8keys.check_options(select_keys, rerank)
    if (plan is None) == (strategy is None):
        raise ValueError("enable: pass exactly one of plan= or strategy=")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan: expected a kascade.Plan (Plan.load(path)), got {type(plan).__name__}")
        strategy = KascadeStrategy(plan, backend=backend, dense_anchor_output=dense_anchor_output,
                                   sparse_prefill=resolve_sparse_prefill(sparse_prefill), select_keys=select_keys,
                                   rerank=rerank)
    elif sparse_prefill is not None:
        raise ValueError(f"sparse_prefill: applies with plan=, got {sparse_prefill!r} with strategy=; build the "
                         "strategy with sparse_prefill=False instead")
    elif select_keys != "exact":
        raise ValueError(f"select_keys: applies to plan=; got select_keys={select_keys!r} with a strategy, which "
                         "chooses its keys itself (KascadeStrategy(plan, select_keys=...))")
    _check_model(model)
    strategy.validate(model.config)
    _register()
    previous = getattr(model, "_kascade_previous_attn", None) or model.config._attn_implementation
    disable_hooks(model)
    hooks = []
    for m in attention_modules(model):
        m.kascade_strategy = strategy
        if getattr(strategy, "select_keys", "exact") == "fp8":
            hooks.append(m.register_forward_pre_hook(_remember_cache, with_kwargs=True))
    model._kascade_hooks = hooks
    model._kascade_previous_attn = previous
    model.set_attn_implementation(ATTN_NAME)
    return KascadeHandle(model, strategy, previous)


def disable(model) -> None:
    """Restore the attention implementation the model had before `enable` (no-op if not enabled)."""
    previous = getattr(model, "_kascade_previous_attn", None)
    if previous is None:
        return
    disable_hooks(model)
    for m in attention_modules(model):
        if hasattr(m, "kascade_strategy"):
            del m.kascade_strategy
        if hasattr(m, "_kascade_cache"):
            del m._kascade_cache
    model.set_attn_implementation(previous)
    del model._kascade_previous_attn


def disable_hooks(model) -> None:
    """Remove the forward pre-hooks `enable` registered (select_keys="fp8")."""
    for h in getattr(model, "_kascade_hooks", None) or []:
        h.remove()
    model._kascade_hooks = []


def _cache_kwarg(model) -> str:
    """Name of the cache argument of model.forward: `cache` (transformers >= 5.24) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class StaticGenerator:
    """Greedy generation on a transformers StaticCache, with the decode step captured in one CUDA graph.

        gen = StaticGenerator(model, batch_size=1, max_cache_len=4096)   # cuda_graph: default on CUDA
        first = gen.prefill(input_ids, attention_mask)                     # eager; [B, 1] first new token
        tokens = gen.decode(63)                                            # [B, 63], one graph replay each

    Works with any attention implementation of the model (Kascade through `kascade.enable`, sdpa, ...).
    The captured step embeds the token, runs every layer, picks the argmax, writes it back as the next
    input and advances the positions on the device: replaying it n times needs no host work in between
    (one sync at the end). The first decode step runs eagerly (warm-up: kernels are compiled, head
    maps cached) and is a real step; the graph is captured after it, once per generator.
    `prefill_chunk` (tokens per sequence) runs the prompt in chunks on top of the cache.
    On the CPU (or cuda_graph=False) every step runs eagerly through the same code.
    """

    def __init__(self, model, batch_size: int, max_cache_len: int, cuda_graph: bool | None = None,
                 prefill_chunk: int | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: True needs a model on CUDA, got one on {self.device}")
        self.batch_size, self.max_cache_len = int(batch_size), int(max_cache_len)
        self.prefill_chunk = prefill_chunk
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        self._cache_kw = _cache_kwarg(model)
        b, dev = self.batch_size, self.device
        self.mask = torch.ones(b, self.max_cache_len, dtype=torch.long, device=dev)  # 2-D mask, whole cache
        self.tok = torch.zeros(b, 1, dtype=torch.long, device=dev)  # next input token
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=dev)  # its position in its sequence
        self.out = torch.zeros(b, 0, dtype=torch.long, device=dev)
        self.step_i = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None
        self.written = 0

    def _forward(self, ids, pos):
        kw = {self._cache_kw: self.cache}
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **kw)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Run the prompt [B, P] (left padding in attention_mask) into a reset cache; returns the first token [B, 1]."""
        b, p = input_ids.shape
        if b != self.batch_size or p >= self.max_cache_len:
            raise ValueError(f"input_ids: expected [{self.batch_size}, < {self.max_cache_len}] (batch_size, "
                             f"max_cache_len of this generator), got {tuple(input_ids.shape)}")
        self.cache.reset()
        ids = input_ids.to(self.device)
        am = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device).long()
        self.mask.fill_(1)
        self.mask[:, :p] = am
        pos = (am.cumsum(1) - 1).clamp(min=0)
        chunk = self.prefill_chunk or p
        for c0 in range(0, p, chunk):
            nxt = self._forward(ids[:, c0 : c0 + chunk], pos[:, c0 : c0 + chunk])
        self.tok.copy_(nxt)
        self.pos.copy_(pos[:, -1:] + 1)
        self.written = p
        return nxt

    def _step(self, out_buf):
        nxt = self._forward(self.tok, self.pos)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        out_buf.index_copy_(1, self.step_i, nxt)
        self.step_i.add_(1)

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """`steps` greedy tokens after the last one returned, [B, steps] (one graph replay each on CUDA)."""
        if self.written + steps > self.max_cache_len:
            raise ValueError(f"steps: {steps} more tokens do not fit the cache ({self.written} written of "
                             f"{self.max_cache_len}); use a larger max_cache_len")
        if self.out.shape[1] < steps:
            self.out = torch.zeros(self.batch_size, steps, dtype=torch.long, device=self.device)
            self.graph = None  # the captured step writes into the old buffer
        self.step_i.zero_()
        done = 0
        if self.cuda_graph and self.graph is None and steps > 0:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up, a real step: compiles kernels, caches head maps
                self._step(self.out)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            done = 1
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step(self.out)
        for _ in range(done, steps):
            if self.cuda_graph:
                self.graph.replay()
            else:
                self._step(self.out)
        self.written += steps
        return self.out[:, :steps].clone()

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32) -> torch.Tensor:
        """Prefill and decode: the max_new_tokens greedy tokens [B, max_new_tokens]."""
        first = self.prefill(input_ids, attention_mask)
        if max_new_tokens <= 1:
            return first[:, :max_new_tokens]
        return torch.cat([first, self.decode(max_new_tokens - 1)], dim=1)
