"""Kascade attention in vLLM: a plugin that swaps in an attention backend running a plan.

Install `kascade[vllm]`; vLLM loads the plugin through the `vllm.general_plugins` entry point
(`register` below) in every process it starts. On the CPU platform it replaces vLLM's CPU attention
(this module); on CUDA it replaces vLLM's FlashAttention backend (kascade.integrations.vllm_gpu, which
shares the options, refused settings and strategy below). With a plan configured, every decoder
attention layer runs Kascade over vLLM's paged KV cache; without one the backend is vLLM's own,
unchanged. The plan is given by either

    vllm serve MODEL_DIR --additional-config '{"kascade_plan": "plan.json"}'
    KASCADE_PLAN=plan.json vllm serve MODEL_DIR

(`additional_config` wins over the environment; `"kascade_dense_anchor_output": true` makes anchor
layers other than 0 attend densely, as `kascade.enable(..., dense_anchor_output=True)` does;
`"kascade_select_keys": "fp8"` and `"kascade_rerank": 2.0` score selections from an FP8 copy of the keys as
`kascade.enable(..., select_keys="fp8", rerank=2.0)` does (kascade.fp8keys). The CPU backend makes that copy
per step from the pages the step reads (it gathers them anyway); the CUDA backend keeps a persistent copy per
selecting layer beside vLLM's cache, written with it (kascade.integrations.vllm_gpu).
Decode-only mode is the default, as in `kascade.enable(model, plan)`: prompts and prefill chunks attend densely,
decode steps run Kascade (below); `"kascade_sparse_prefill": true`, or KASCADE_SPARSE_PREFILL=1, also selects in
prefill chunks, the paper's method, for a shorter time to first token at the accuracy cost that
kascade.strategy.DEFAULT_SPARSE_PREFILL cites.)

How a forward step runs. vLLM writes the step's new keys and values into the paged cache, then calls
each attention layer in order with the batch's tokens flattened (prefill chunks and decode steps of
requests of any lengths) and the per-request query_start_loc / seq_lens / block_table. This backend
gathers the pages the batch reads into a compact cache in the layout of kascade.paged (vLLM's CPU
kernels keep blocks in an ISA-specific order, which is found once by writing probe values through
vLLM's own cache-writing op), then runs kascade.paged.PagedKascadeStrategy: layer 0 clears the
per-step state, is dense and selects; anchors select per KV head over each request's pages; reuse
layers attend to their anchor's selection through the plan's head map, or, with a head-granular plan
(`head_sources`), select on their selecting heads and attend per KV head to the selection of its source
(layer, head); requests with no more than k_min keys are dense. Selections live only within one step
(keyed by the step's requests), so requests joining and leaving between steps cannot see each other's
indices. A request with one new
token is a decode step; one with more is prefill, tiled from its first token whatever chunk it is
in, so chunked prefill selects what a whole-prompt prefill would.

Decode-only mode (kascade_sparse_prefill false; PagedKascadeStrategy(sparse_prefill=False)): a step
with no decode request runs vLLM's own CPU attention for the whole step (no pages gathered); in a step
mixing prefill chunks and decode requests, the prefill requests attend densely (paged_dense over their
sub-batch) and the decode requests run Kascade as they would in a decode-only step, so a request's
tokens do not depend on how the scheduler batched it. Decode steps never read state a dense prefill
left: layer 0 and the anchors select at every step (the state lives within one step). A prefill chunk of
one token cannot be told from a decode step and runs Kascade, as in every other path.

Supported: decoder-only models with full attention (Llama, Qwen2/3, Mistral without a window),
float32/bfloat16/float16 KV caches, layer- and head-granular plans, tensor parallelism with a plan whose
head map or head sources stay inside shards (`kascade calibrate --tp-degree`). Refused with an error:
sliding windows, ALiBi, logit soft-capping, attention sinks, fp8 KV caches, encoder and cross attention,
pipeline parallelism, context parallelism, speculative decoding.

vLLM is read only through kascade.integrations.vllm_adapter (imports and attribute names of the tested
version); the rest (options, the shared strategy, the refused settings, the compact cache) does not
depend on vLLM's version.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from kascade.integrations import vllm_adapter as adapter
from kascade.paged import PagedKascadeStrategy
from kascade.plan import Plan
from kascade.strategy import DEFAULT_SPARSE_PREFILL

PLAN_ENV = "KASCADE_PLAN"
PLAN_KEY = "kascade_plan"
DENSE_ANCHOR_KEY = "kascade_dense_anchor_output"
SELECT_KEYS_KEY = "kascade_select_keys"  # "exact" (default) or "fp8" (kascade.fp8keys; both backends)
RERANK_KEY = "kascade_rerank"  # None or c >= 1, with "fp8"
SPARSE_PREFILL_KEY = "kascade_sparse_prefill"  # true, or false (default): dense prefill, sparse decode
SPARSE_PREFILL_ENV = "KASCADE_SPARSE_PREFILL"  # the same by environment: 1 / true or 0 / false
ENV_BOOLS = {"1": True, "true": True, "0": False, "false": False}
BACKEND_PATH = "kascade.integrations.vllm.KascadeCPUBackend"
GPU_BACKEND_PATH = "kascade.integrations.vllm_gpu.KascadeFlashAttentionBackend"
QUANTIZED_FREE_KV = ("auto", "float16", "bfloat16", "float32", "half", "float")


def register() -> None:
    """vllm.general_plugins entry point: make vLLM's CPU attention backend (CPU platform) or its
    FlashAttention backend (CUDA) the Kascade one; on other platforms nothing is registered."""
    if not adapter.register_cpu_backend(BACKEND_PATH):
        adapter.register_flash_backend(GPU_BACKEND_PATH)


def refused_settings(sliding_window, alibi_slopes, logits_soft_cap, sinks, kv_cache_dtype, attn_type,
                     decoder) -> dict:
    """The refused settings of one attention layer (layer_strategy's `refused`), from the arguments every vLLM
    attention Impl is built with; decoder: the AttentionType.DECODER value of the vLLM in use."""
    return {
        "sliding_window": sliding_window,
        "alibi_slopes": alibi_slopes,
        "logits_soft_cap": logits_soft_cap or None,
        "sinks": sinks,
        "kv_cache_dtype": None if str(kv_cache_dtype) in QUANTIZED_FREE_KV else kv_cache_dtype,
        "attn_type": None if attn_type == decoder else attn_type,
    }


def _additional(vllm_config) -> dict:
    """The engine's additional_config as a dict ({} when unset)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    return extra if isinstance(extra, dict) else dict(extra)


def plan_options(vllm_config) -> tuple[str | None, bool]:
    """(plan path or None, dense_anchor_output) from additional_config, else the KASCADE_PLAN variable."""
    extra = _additional(vllm_config)
    path = extra.get(PLAN_KEY) or os.environ.get(PLAN_ENV) or None
    dense_anchor = extra.get(DENSE_ANCHOR_KEY, False)
    if not isinstance(dense_anchor, bool):
        raise ValueError(f"additional_config[{DENSE_ANCHOR_KEY!r}]: expected true or false, got {dense_anchor!r}")
    return path, dense_anchor


def select_options(vllm_config) -> tuple[str, float | None]:
    """(select_keys, rerank) from additional_config (kascade_select_keys, kascade_rerank); ("exact", None) by default."""
    from kascade import fp8keys

    extra = _additional(vllm_config)
    select_keys, rerank = extra.get(SELECT_KEYS_KEY, "exact"), extra.get(RERANK_KEY)
    if select_keys not in fp8keys.SELECT_KEYS:
        raise ValueError(f"additional_config[{SELECT_KEYS_KEY!r}]: expected one of {fp8keys.SELECT_KEYS}, "
                         f"got {select_keys!r}")
    try:
        fp8keys.check_options(select_keys, rerank)
    except ValueError as e:
        raise ValueError(f"additional_config[{RERANK_KEY!r}]: {e}") from None
    return select_keys, rerank


def prefill_option(vllm_config) -> bool:
    """sparse_prefill from additional_config["kascade_sparse_prefill"], else KASCADE_SPARSE_PREFILL, else
    kascade.strategy.DEFAULT_SPARSE_PREFILL (decode-only mode: dense prefill, sparse decode, as kascade.enable).
    True also selects in prefill chunks (the paper's method: a shorter time to first token)."""
    extra = _additional(vllm_config)
    if SPARSE_PREFILL_KEY in extra:
        value = extra[SPARSE_PREFILL_KEY]
        if not isinstance(value, bool):
            raise ValueError(f"additional_config[{SPARSE_PREFILL_KEY!r}]: expected true (sparse prefill and decode) "
                             f"or false (dense prefill, sparse decode), got {value!r}")
        return value
    env = os.environ.get(SPARSE_PREFILL_ENV, "")
    if env == "":
        return DEFAULT_SPARSE_PREFILL
    if env.lower() not in ENV_BOOLS:
        raise ValueError(f"{SPARSE_PREFILL_ENV}: expected 1 / true (sparse prefill and decode) or 0 / false (dense "
                         f"prefill, sparse decode), got {env!r}")
    return ENV_BOOLS[env.lower()]


_STRATEGIES: dict = {}
ACTIVE_LAYERS = [0]  # attention layers built with a plan in this process (the benchmarks check it)


def shared_strategy(path: str, dense_anchor_output: bool, model_config, tp_degree: int, select_keys: str = "exact",
                    rerank: float | None = None, sparse_prefill: bool = DEFAULT_SPARSE_PREFILL) -> PagedKascadeStrategy:
    """One strategy per (plan file, options) in a process, shared by every layer so that anchors hand their
    selections to the reuse layers of the same step. The plan is checked against the model once."""
    key = (os.path.abspath(path), dense_anchor_output, select_keys, rerank, sparse_prefill)
    if key not in _STRATEGIES:
        if not os.path.isfile(path):
            raise ValueError(f"{PLAN_KEY}: expected the path of a plan file (kascade calibrate -o plan.json), "
                             f"got {path!r}, which is not a file")
        plan = Plan.load(path)
        plan.validate(model_config, tp_degree=tp_degree)
        _STRATEGIES[key] = PagedKascadeStrategy(plan, dense_anchor_output=dense_anchor_output, select_keys=select_keys,
                                                rerank=rerank, sparse_prefill=sparse_prefill)
    return _STRATEGIES[key]


def layer_strategy(vllm_config, refused: dict) -> tuple[PagedKascadeStrategy | None, int]:
    """(strategy, tensor-parallel rank) for one attention layer of the engine; (None, 0) without a plan.

    refused: the layer's settings Kascade does not support, each None when unused (refused_settings);
    ValueError naming the first one in use, or an engine setting of adapter.engine_refusals (speculative
    decoding, context parallelism), or pipeline parallelism, or a plan that does not fit the model (or
    crosses its tensor-parallel shards)."""
    path, dense_anchor = plan_options(vllm_config)
    if path is None:
        return None, 0
    for name, value in refused.items():
        if value is not None:
            raise ValueError(f"{name}: kascade's vLLM backend supports decoder self-attention over a full "
                             f"float KV cache without {name}, got {value!r}; serve this model without "
                             f"{PLAN_KEY} / {PLAN_ENV}")
    for name, (value, reason) in adapter.engine_refusals(vllm_config).items():
        raise ValueError(f"{name}: kascade's vLLM backend does not support it ({reason}), got {value!r}; serve "
                         f"without it, or without {PLAN_KEY} / {PLAN_ENV}")
    tp, pp = adapter.parallel_sizes(vllm_config)
    if pp > 1:
        raise ValueError(f"pipeline_parallel_size: kascade's vLLM backend needs all layers in one process "
                         f"(anchors hand their selections to the layers after them), got {pp}; use tensor "
                         "parallelism with a plan whose head map or head sources stay inside its shards")
    strategy = shared_strategy(path, dense_anchor, adapter.hf_config(vllm_config), tp, *select_options(vllm_config),
                               sparse_prefill=prefill_option(vllm_config))
    ACTIVE_LAYERS[0] += 1
    return strategy, adapter.tp_rank() if tp > 1 else 0


def setup_layer(impl, vllm_config, logger, backend: str, sliding_window, alibi_slopes, logits_soft_cap, sinks,
                kv_cache_dtype, attn_type, decoder) -> None:
    """What every Kascade attention Impl (the CPU and the FlashAttention backend) sets at construction:
    impl.kascade (the layer's strategy or None), impl.tp_rank, impl.layer_index (found at the first forward);
    the plan and the prefill mode are logged once per process."""
    impl.kascade, impl.tp_rank = layer_strategy(vllm_config, refused_settings(
        sliding_window, alibi_slopes, logits_soft_cap, sinks, kv_cache_dtype, attn_type, decoder))
    impl.layer_index = None
    if impl.kascade is not None:
        plan = impl.kascade.plan
        kind = "head sources" if plan.head_granular else "head map"
        mode = "sparse prefill and decode" if impl.kascade.sparse_prefill else "dense prefill, sparse decode"
        logger.info_once(f"kascade: Kascade attention{backend} with plan {plan_options(vllm_config)[0]} "
                         f"(anchors {plan.anchors}, {kind}, rho {plan.rho}, {mode})")
        if not adapter.track_prompt_lengths():
            logger.warning_once("kascade: this vLLM's model runners have no method to read prompt lengths from: a "
                                "request preempted and resumed by recomputation re-attends its generated tokens as "
                                "prefill and may continue unlike an uninterrupted one")


# ----------------------------------------------------------------------------------------------
# reading vLLM's CPU cache blocks
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def block_order(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple:
    """Where vLLM's CPU cache-writing op puts (token, dim) inside one (block, KV head) slab.

    Returns (key_perm, value_perm): int64 tensors of block_size * head_size entries, entry t * D + d
    being the slab offset of token t, dim d; None where the slab is plain row-major. Found by writing
    small integers (exact in every float dtype) through vLLM's own op (adapter.cpu_write_cache); a layout
    that is not a permutation of the slab raises ValueError."""
    t = torch.arange(block_size)[:, None].expand(block_size, head_size)
    d = torch.arange(head_size)[None, :].expand(block_size, head_size)
    digits = [t % 16, t // 16 % 16, t // 256, d % 16, d // 16 % 16, d // 256]
    seen = []
    for val in digits:
        kv = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        kc, vc = kv.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        src = val[:, None, :].to(dtype)  # [tokens, 1 head, D]
        adapter.cpu_write_cache(src, src.clone(), kc, vc, torch.arange(block_size), isa)
        seen.append(kv.view(2, block_size * head_size).long())  # row 0: key slab, row 1: value slab
    perms = []
    for which in (0, 1):
        tok = seen[0][which] + 16 * seen[1][which] + 256 * seen[2][which]
        dim = seen[3][which] + 16 * seen[4][which] + 256 * seen[5][which]
        flat = tok * head_size + dim  # the (token, dim) found at each slab offset
        if not torch.equal(torch.sort(flat).values, torch.arange(block_size * head_size)):
            raise ValueError(f"KV cache: vLLM's CPU layout for isa={isa!r}, dtype={dtype}, block_size={block_size}, "
                             f"head_size={head_size} is not a permutation of each block; kascade cannot read it")
        perm = torch.empty_like(flat)
        perm[flat] = torch.arange(flat.numel())
        perms.append(None if torch.equal(perm, torch.arange(flat.numel())) else perm)
    return tuple(perms)


def compact_cache(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, isa: str):
    """The pages a batch reads, in kascade.paged's layout.

    kv_cache [num_blocks, Hkv, block_size, 2 * D] (vLLM CPU). Returns key_cache, value_cache
    [P, block_size, Hkv, D] holding each request's pages one after another, and the block table [R, max_pages]
    of those compact pages."""
    nb, hkv, bs, two_d = kv_cache.shape
    d = two_d // 2
    kc, vc = kv_cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)  # [nb, Hkv, bs, D] each, slabs as stored
    lens = [int(x) for x in seq_lens.tolist()]
    pages_per = [-(-n // bs) for n in lens]
    cols = max(pages_per + [1])
    pages = torch.cat([block_table[r, :p].long() for r, p in enumerate(pages_per)] + [torch.zeros(0, dtype=torch.long)])
    offsets = torch.tensor([0] + pages_per[:-1], dtype=torch.long).cumsum(0) if lens else torch.zeros(0, dtype=torch.long)
    table = (offsets[:, None] + torch.arange(cols)[None, :]).to(torch.int32)
    key_perm, value_perm = block_order(isa, kv_cache.dtype, bs, d)
    out = []
    for cache, perm in ((kc, key_perm), (vc, value_perm)):
        slabs = cache[pages].reshape(len(pages), hkv, bs * d)
        if perm is not None:
            slabs = slabs[:, :, perm]
        out.append(slabs.view(len(pages), hkv, bs, d).transpose(1, 2))
    return out[0], out[1], table


# ----------------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------------


def _backend_classes():
    v = adapter.api()
    c = adapter.cpu_api()
    logger = v.init_logger("vllm.kascade")  # under "vllm", whose handlers vLLM sets up in every process

    class KascadeCPUImpl(c.CPUAttentionBackendImpl):
        """vLLM's CPU attention, with the attention itself replaced by Kascade when a plan is configured."""

        def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                     logits_soft_cap=None, attn_type=v.AttentionType.DECODER, kv_sharing_target_layer_name=None,
                     sinks=None, **kwargs):
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                             logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, **kwargs)
            setup_layer(self, v.get_current_vllm_config(), logger, "", sliding_window, alibi_slopes, logits_soft_cap,
                        sinks, kv_cache_dtype, attn_type, v.AttentionType.DECODER)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            if self.kascade is None or attn_metadata is None:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            if output_scale is not None or output_block_scale is not None:
                raise ValueError("output_scale: kascade's vLLM backend does not fuse output quantization")
            if self.layer_index is None:
                self.layer_index = adapter.layer_index(layer)
            n_tok, seq_lens, query_start_loc, block_table = adapter.step_batch(attn_metadata)
            qsl = query_start_loc.tolist()
            decode_from = adapter.prompt_lens(qsl)  # resumed requests: generated tokens as decode steps
            if self.kascade.dense_step(qsl, seq_lens.tolist(), decode_from):  # decode-only mode, no decode step
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
            key_cache, value_cache, table = compact_cache(kv_cache, block_table, seq_lens, adapter.cpu_isa(layer))
            out = self.kascade.attend(self.layer_index, query[:n_tok], key_cache, value_cache, table, seq_lens,
                                      query_start_loc, scale=self.scale, tp_rank=self.tp_rank,
                                      decode_from=decode_from)
            output[:n_tok].copy_(out.reshape(output[:n_tok].shape))
            return output

    class KascadeCPUBackend(c.CPUAttentionBackend):
        """vLLM's CPU backend (metadata, cache layout and cache writing) with KascadeCPUImpl."""

        @staticmethod
        def get_impl_cls():
            return KascadeCPUImpl

    return KascadeCPUImpl, KascadeCPUBackend


def __getattr__(name):  # the backend classes need vllm, which is imported only when vLLM asks for them
    if name in ("KascadeCPUImpl", "KascadeCPUBackend"):
        impl, backend = _backend_classes()
        globals().update(KascadeCPUImpl=impl, KascadeCPUBackend=backend)
        return globals()[name]
    raise AttributeError(name)
