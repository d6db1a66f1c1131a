"""Kascade attention in vLLM on CUDA: vLLM's FlashAttention backend with the attention of decoder layers
replaced when a plan is configured (written for vLLM 0.26.0, the last release built for torch 2.11).

`kascade.integrations.vllm.register` (the plugin's entry point) makes `KascadeFlashAttentionBackend` the
class behind vLLM's FLASH_ATTN backend on CUDA. It subclasses vLLM's FlashAttentionBackend and keeps
everything but two methods: the name, dtypes, head sizes, KV-cache shape and stride order, the cache
writes (do_kv_cache_update, vLLM's reshape_and_cache_flash) and the metadata. The plan comes from
`additional_config["kascade_plan"]` or KASCADE_PLAN, with the options, refused settings and the shared
PagedKascadeStrategy of kascade.integrations.vllm. Without a plan every method is vLLM's own.

With a plan, each decoder layer's attention (KascadeFlashAttentionImpl.forward) reads vLLM's paged cache
in place: the layer's tensor, logically [num_blocks, Hkv, block_size, 2 * D], is viewed as key_cache and
value_cache [num_blocks, block_size, Hkv, D] (strided views: no copy; vllm_adapter.flash_kv_views), and

- a step whose requests all have one new token (max_query_len == 1: a decode step, the batch a CUDA graph
  captures) runs PagedKascadeStrategy.attend_decode: one launch of each paged decode kernel per layer for
  the whole batch, lengths on the device (seq_lens), nothing read back to the host. Layer 0 attends
  through vLLM's own FlashAttention call (the layer's unchanged forward) and selects; requests with at
  most k_min keys select every key (budget k(n) = n), so they attend densely;
- any other step (prefill chunks beside decode steps, prefix-cache hits, resumed requests) runs
  PagedKascadeStrategy.attend with the step's lengths from the host copies vLLM keeps
  (CommonAttentionMetadata.query_start_loc_cpu / seq_lens_cpu_upper_bound, attached to the metadata by
  KascadeFlashAttentionMetadataBuilder.build: no device-to-host copy). Layer 0, and the requests of at
  most k_min keys in every layer, attend through vLLM's FlashAttention call (the whole batch, or the
  sub-batch of those requests with metadata re-based to it); the rest run the paged Triton kernels
  (decode requests in one launch, each prefill request tiled from its own first token).

Decode-only mode (`additional_config["kascade_sparse_prefill"]` false or KASCADE_SPARSE_PREFILL=0, read by
kascade.integrations.vllm): decode steps run as above; a step with no decode request goes whole through
vLLM's FlashAttention call (`_flash`); in a step mixing prefill chunks and decode requests the prefill
requests attend through that call (the sub-batch of them and the short requests, sub_batch_metadata) and
the decode requests run Kascade as in a decode step. No selection outlives its step (layer 0 and the
anchors select at every step), so a decode step never reads anything a dense prefill left.

CUDA graphs: the builder declares AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE with a plan (FlashAttention
3 alone declares ALWAYS): vLLM then captures full graphs for pure decode batches only and runs mixed
batches piecewise (attention eager between the captured pieces; vLLM's default FULL_AND_PIECEWISE mode
stays as it is). Inside a captured decode step every tensor the kernels allocate comes from vLLM's graph
memory pool; vLLM captures the largest batch first, so that pool is sized by the largest captured batch
and reused by the smaller ones, and a replay reuses the captured addresses. The shapes of a step depend
only on the batch size and the block table's width (max_model_len rounded to blocks), never on the
lengths. Padding requests of a graph batch (seq_len 0, block table row of vLLM's null block) are read as
one key of that block; their rows are discarded by vLLM. Cascade attention (vLLM's shared-prefix split)
is switched off with a plan; it is never used in graphs anyway.

Refused with a plan (ValueError at engine start, naming the setting): sliding windows, ALiBi, logit
soft-capping, attention sinks, quantized (fp8) KV caches, encoder and cross attention, pipeline and
context parallelism, speculative decoding, and selection from an FP8 copy of the keys
(`kascade_select_keys: "fp8"`): that copy would need a KV-cache spec of its own (vLLM sizes and allocates
the cache from the layers' specs before the first step) and a write beside reshape_and_cache_flash; made
per step from the pages instead, it would read every key it is meant to spare. KASCADE_VLLM_CHECK_LENS=1 compares the host lengths with the
device's at every mixed step (one device-to-host copy each; for checks, not for timing).
"""

from __future__ import annotations

import os

import torch

from kascade.integrations import vllm_adapter as adapter
from kascade.integrations.vllm import SELECT_KEYS_KEY, plan_options, setup_layer

CHECK_LENS_ENV = "KASCADE_VLLM_CHECK_LENS"
HOST_ATTR = "kascade_host_lens"  # the (seq_lens, query_start_loc) host tuples attached to a step's metadata


def host_lens(attn_metadata) -> tuple:
    """The step's (seq_lens, query_start_loc) on the host: attached by the builder, or read from the device
    once (then kept on the metadata object, which every layer of the step shares)."""
    lens = getattr(attn_metadata, HOST_ATTR, None)
    if lens is None:
        r = attn_metadata.seq_lens.shape[0]
        lens = (tuple(int(x) for x in attn_metadata.seq_lens.tolist()),
                tuple(int(x) for x in attn_metadata.query_start_loc[: r + 1].tolist()))
        setattr(attn_metadata, HOST_ATTR, lens)
    elif os.environ.get(CHECK_LENS_ENV) == "1":
        r = attn_metadata.seq_lens.shape[0]
        dev = (tuple(attn_metadata.seq_lens.tolist()), tuple(attn_metadata.query_start_loc[: r + 1].tolist()))
        if dev != tuple(lens):
            raise RuntimeError(f"{CHECK_LENS_ENV}: the host lengths {lens} differ from the device's {dev}")
    return lens


def sub_batch_metadata(attn_metadata, reqs: list[int], lens, qsl):
    """FlashAttentionMetadata of the requests `reqs` (indices into the step, in order) alone, and the token
    rows [T_sub] of the step they own. lens / qsl: the step's host seq_lens and query_start_loc.

    query_start_loc is re-based to the sub-batch, seq_lens and block_table take the requests' rows, the
    maxima are the sub-batch's; FlashAttention then attends exactly those requests as the whole step would."""
    dev = attn_metadata.query_start_loc.device
    rows = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in reqs]).to(dev)
    qlens = [qsl[r + 1] - qsl[r] for r in reqs]
    sub_qsl = torch.tensor([0] + qlens, dtype=attn_metadata.query_start_loc.dtype).cumsum(0).to(
        attn_metadata.query_start_loc.dtype).to(dev)
    idx = torch.tensor(reqs, dtype=torch.long, device=dev)
    md = adapter.flash_sub_metadata(
        attn_metadata, num_actual_tokens=int(rows.shape[0]), max_query_len=max(qlens), query_start_loc=sub_qsl,
        max_seq_len=max(lens[r] for r in reqs), seq_lens=attn_metadata.seq_lens[idx],
        block_table=attn_metadata.block_table[idx])
    return md, rows


def _backend_classes():
    v = adapter.api()
    f = adapter.flash_api()
    logger = v.init_logger("vllm.kascade")  # under "vllm", whose handlers vLLM sets up in every process

    class KascadeFlashAttentionMetadataBuilder(f.FlashAttentionMetadataBuilder):
        """vLLM's FlashAttention metadata builder; with a plan it also attaches the step's host lengths,
        declares single-token-decode graphs and leaves cascade attention off."""

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            own = super().get_cudagraph_support(vllm_config, kv_cache_spec)
            if plan_options(vllm_config)[0] is None:
                return own
            decode = f.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
            return own if own.value < decode.value else decode

        def build(self, *args, **kwargs):
            md = super().build(*args, **kwargs)
            if plan_options(self.vllm_config)[0] is not None:
                lens = adapter.host_batch(adapter.common_metadata(args, kwargs))
                if lens is not None:
                    setattr(md, HOST_ATTR, lens)
            return md

        if hasattr(f.FlashAttentionMetadataBuilder, "use_cascade_attention"):  # vLLM 0.26.0, not 0.32.0

            def use_cascade_attention(self, *args, **kwargs) -> bool:
                if plan_options(self.vllm_config)[0] is not None:
                    return False
                return super().use_cascade_attention(*args, **kwargs)

    class KascadeFlashAttentionImpl(f.FlashAttentionImpl):
        """vLLM's FlashAttention Impl, with the attention of decoder layers replaced by Kascade when a plan is
        configured (module docstring). forward's tensors: query [T, Hq, D], kv_cache [num_blocks, Hkv,
        block_size, 2 * D] (logical), output [T, Hq, D]; the first num_actual_tokens rows are real."""

        def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                     logits_soft_cap=None, attn_type=v.AttentionType.DECODER, kv_sharing_target_layer_name=None,
                     sinks=None, **kwargs):
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                             logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, **kwargs)
            setup_layer(self, v.get_current_vllm_config(), logger, " (FlashAttention backend)", sliding_window,
                        alibi_slopes, logits_soft_cap, sinks, kv_cache_dtype, attn_type, v.AttentionType.DECODER)
            if self.kascade is not None and self.kascade.select_keys != "exact":
                raise ValueError(f"{SELECT_KEYS_KEY}: kascade's vLLM FlashAttention backend selects from the exact keys "
                                 f"only for now, got {self.kascade.select_keys!r}: the FP8 copy of the keys needs a "
                                 "cache of its own in vLLM's KV-cache memory and a write beside vLLM's own cache "
                                 "write, and made per step from the pages it would read every key. Serve without "
                                 f"{SELECT_KEYS_KEY}, or use kascade.enable / kascade.paged (PagedKeyCopies)")

        def _flash(self, layer, query, key, value, kv_cache, attn_metadata, output):
            """vLLM's own FlashAttention forward (the test seam: tests replace it by a reference)."""
            return f.FlashAttentionImpl.forward(self, layer, query, key, value, kv_cache, attn_metadata, output)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            if self.kascade is None or attn_metadata is None:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            if output_scale is not None or output_block_scale is not None:
                raise ValueError("output_scale: kascade's vLLM backend does not fuse output quantization; "
                                 "serve without it or without kascade_plan")
            if self.layer_index is None:
                self.layer_index = adapter.layer_index(layer)
            key_cache, value_cache = adapter.flash_kv_views(kv_cache, self.head_size)
            md = attn_metadata
            r = md.seq_lens.shape[0]
            out3 = output.view(output.shape[0], self.num_heads, -1)  # [T, Hq, Dv]
            if adapter.decode_only(md) and query.shape[0] >= r:
                bt = md.block_table if md.block_table.shape[0] == r else md.block_table[:r]

                def dense():  # the whole step through vLLM's FlashAttention call, into `output`
                    self._flash(layer, query, key, value, kv_cache, md, output)
                    return out3[:r]

                o = self.kascade.attend_decode(self.layer_index, query[:r], key_cache, value_cache, bt, md.seq_lens,
                                               scale=self.scale, tp_rank=self.tp_rank, dense=dense)
                if o.data_ptr() != out3.data_ptr():
                    out3[:r].copy_(o)
                return output
            lens, qsl = host_lens(md)
            if self.kascade.dense_step(qsl):  # decode-only mode and no decode request: vLLM's call, whole step
                return self._flash(layer, query, key, value, kv_cache, md, output)
            n_tok = qsl[-1]
            every = [i for i in range(r) if qsl[i + 1] > qsl[i]]

            def dense(reqs):  # requests `reqs` through vLLM's FlashAttention call
                if reqs == every:
                    self._flash(layer, query, key, value, kv_cache, md, output)
                    return out3[:n_tok]
                sub, rows = sub_batch_metadata(md, reqs, lens, qsl)
                o = torch.empty(rows.shape[0], *out3.shape[1:], dtype=output.dtype, device=output.device)
                k_sub = key[rows] if key is not None else None
                v_sub = value[rows] if value is not None else None
                self._flash(layer, query[rows], k_sub, v_sub, kv_cache, sub, o)
                return o

            o = self.kascade.attend(self.layer_index, query[:n_tok], key_cache, value_cache, md.block_table[:r],
                                    md.seq_lens[:r], md.query_start_loc[: r + 1], scale=self.scale,
                                    tp_rank=self.tp_rank, host_lens=(lens, qsl), dense=dense)
            out3[:n_tok].copy_(o)
            return output

    class KascadeFlashAttentionBackend(f.FlashAttentionBackend):
        """vLLM's FlashAttention backend (name FLASH_ATTN, KV-cache layout, cache writes) with the Kascade Impl
        and metadata builder."""

        @staticmethod
        def get_impl_cls():
            return KascadeFlashAttentionImpl

        @staticmethod
        def get_builder_cls():
            return KascadeFlashAttentionMetadataBuilder

    classes = (KascadeFlashAttentionMetadataBuilder, KascadeFlashAttentionImpl, KascadeFlashAttentionBackend)
    for cls in classes:  # module.qualname resolves (through __getattr__ below), as vLLM's names do
        cls.__qualname__ = cls.__name__
    return classes


_NAMES = ("KascadeFlashAttentionMetadataBuilder", "KascadeFlashAttentionImpl", "KascadeFlashAttentionBackend")


def __getattr__(name):  # the classes need vllm, which is imported only when vLLM asks for them
    if name in _NAMES:
        globals().update(zip(_NAMES, _backend_classes()))
        return globals()[name]
    raise AttributeError(name)
