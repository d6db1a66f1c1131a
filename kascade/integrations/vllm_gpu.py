"""Kascade attention in vLLM on CUDA: vLLM's FlashAttention backend with the attention of decoder layers
replaced when a plan is configured (written for vLLM 0.26.0, the last release built for torch 2.11).

`kascade.integrations.vllm.register` (the plugin's entry point) makes `KascadeFlashAttentionBackend` the
class behind vLLM's FLASH_ATTN backend on CUDA. It subclasses vLLM's FlashAttentionBackend and keeps
everything but two methods: the name, dtypes, head sizes, KV-cache shape and stride order, the cache
writes (do_kv_cache_update, vLLM's reshape_and_cache_flash; with select_keys "fp8" followed by the write
of the FP8 key copy, below) and the metadata. The plan comes from
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
anchors select at every step), so a decode step never reads anything a dense prefill left; the FP8 key
copies (below) are written by do_kv_cache_update at every step, dense or not, so they stay current.

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

Selection from an FP8 copy of the keys (`additional_config["kascade_select_keys"] = "fp8"`, optionally
`"kascade_rerank": c`; kascade.fp8keys): each layer with selecting (layer, KV head)s keeps a persistent
kascade.fp8keys.PagedKeyCopies of those heads, keys [num_blocks, block_size, S, D] float8_e4m3fn and scales
[num_blocks, block_size, S] float32 sharing the pages of the layer's cache (plus one scratch row). It is
allocated when the layer's cache is first seen (its first cache write or forward with metadata: vLLM's eager
warm-up, never inside a CUDA graph capture, which raises RuntimeError) and written by do_kv_cache_update right
after vLLM's reshape_and_cache_flash: the new keys of the selecting heads quantized by fp8keys.quantize into
the same slots, padding slots (negative) sent to the scratch row, tensor operations only (it is part of the
captured decode graphs). forward hands it to attend / attend_decode (key_copies=). The copies' bytes, over all
layers and as a share of the KV cache, are logged once per engine: (selecting heads / all heads) x (D + 4) /
(4 D) of a bf16 / fp16 cache. vLLM sizes its KV cache before the copies exist, so they come out of the memory
gpu_memory_utilization leaves free (lower it by about that share of the KV cache if memory runs short).

Refused with a plan (ValueError at engine start, naming the setting): sliding windows, ALiBi, logit
soft-capping, attention sinks, quantized (fp8) KV caches, encoder and cross attention, pipeline and
context parallelism, speculative decoding, and, with select_keys "fp8", a layer sharing another layer's
cache (kv_sharing_target_layer_name: vLLM never writes its cache, so its copy would never be written).
Batch invariance: with vLLM's VLLM_BATCH_INVARIANT=1 (vLLM then runs FlashAttention unsplit and its own
batch-invariant matmuls), the backend sets kascade.kernels.decode.CONFIG["batch_invariant"]: the decode kernels
split each request's keys as if it ran alone, so a request's tokens do not depend on the requests beside it.
KASCADE_VLLM_CHECK_LENS=1 compares the host lengths with the device's at every mixed step (one
device-to-host copy each; for checks, not for timing).
"""

from __future__ import annotations

import os

import torch

from kascade.fp8keys import PagedKeyCopies
from kascade.host import to_device
from kascade.integrations import vllm_adapter as adapter
from kascade.integrations.vllm import SELECT_KEYS_KEY, plan_options, setup_layer
from kascade.kernels import decode as decode_kernels

CHECK_LENS_ENV = "KASCADE_VLLM_CHECK_LENS"
HOST_ATTR = "kascade_host_lens"  # the (seq_lens, query_start_loc) host tuples attached to a step's metadata
SUB_ATTR = "kascade_sub_batches"  # {requests: (metadata, token rows)} of the step's FlashAttention sub-batches


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
    rows = to_device([t for r in reqs for t in range(qsl[r], qsl[r + 1])], torch.long, dev)
    qlens = [qsl[r + 1] - qsl[r] for r in reqs]
    sub_qsl = to_device([sum(qlens[:i]) for i in range(len(qlens) + 1)], attn_metadata.query_start_loc.dtype, dev)
    idx = to_device(reqs, torch.long, dev)
    md = adapter.flash_sub_metadata(
        attn_metadata, num_actual_tokens=int(rows.shape[0]), max_query_len=max(qlens), query_start_loc=sub_qsl,
        max_seq_len=max(lens[r] for r in reqs), seq_lens=attn_metadata.seq_lens[idx],
        block_table=attn_metadata.block_table[idx])
    return md, rows


def step_sub_batch(attn_metadata, reqs: list[int], lens, qsl):
    """sub_batch_metadata, made once per step and requests: kept on the step's metadata, which every layer of the
    step shares (the layers of a mixed step hand FlashAttention the same sub-batch)."""
    made = getattr(attn_metadata, SUB_ATTR, None)
    if made is None:
        made = {}
        setattr(attn_metadata, SUB_ATTR, made)
    key = tuple(reqs)
    if key not in made:
        made[key] = sub_batch_metadata(attn_metadata, reqs, lens, qsl)
    return made[key]


def capturing(t: torch.Tensor) -> bool:
    """True while the current CUDA stream captures a graph (False for a tensor off CUDA)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def cache_pages(kv_cache: torch.Tensor, head_size: int) -> tuple[int, int]:
    """(num_blocks, block_size) of one FlashAttention layer's cache, logically [num_blocks, Hkv, block_size,
    2 * head_size]."""
    key_cache, _ = adapter.flash_kv_views(kv_cache, head_size)
    return key_cache.shape[0], key_cache.shape[1]


def layer_key_copies(plan, layer: int, num_kv_heads: int, tp_rank: int, kv_cache: torch.Tensor,
                     head_size: int) -> PagedKeyCopies:
    """The FP8 copy of layer `layer`'s selecting KV heads (none: an empty PagedKeyCopies), with the pages of its
    cache kv_cache (num_blocks x block_size slots, on its device). RuntimeError during a CUDA graph capture:
    the copy must outlive the graph's memory pool, so it is allocated in an eager step."""
    nb, bs = cache_pages(kv_cache, head_size)
    if capturing(kv_cache):
        raise RuntimeError(f"{SELECT_KEYS_KEY}: layer {layer}'s FP8 key copy ({nb} blocks of {bs} tokens) is first "
                           "needed inside a CUDA graph capture, where it cannot be allocated; expected an eager step "
                           "(vLLM's warm-up) to write or read the layer's cache first. Serve with --enforce-eager, "
                           f"or without {SELECT_KEYS_KEY}")
    heads = PagedKeyCopies.selecting_heads(plan, num_kv_heads, tp_rank)
    return PagedKeyCopies({layer: heads[layer]} if layer in heads else {}, nb, bs, head_size, kv_cache.device)


def key_copy_summary(plan, num_kv_heads: int, tp_rank: int, kv_cache: torch.Tensor, head_size: int) -> str:
    """One line on the FP8 key copies of every layer of this rank: their bytes, and their share of the KV cache
    (plan.num_layers caches like kv_cache, [num_blocks, Hkv, block_size, 2 * head_size])."""
    nb, bs = cache_pages(kv_cache, head_size)
    heads = PagedKeyCopies.selecting_heads(plan, num_kv_heads, tp_rank)
    copy = sum((nb * bs + 1) * PagedKeyCopies.bytes_per_slot(len(h), head_size) for h in heads.values())
    kv = plan.num_layers * kv_cache.numel() * kv_cache.element_size()
    mib = 2 ** 20
    return (f"kascade: FP8 key copies of {sum(len(h) for h in heads.values())} selecting (layer, KV head)s of "
            f"{plan.num_layers * num_kv_heads}: {copy / mib:.1f} MiB on this rank, {copy / kv:.2%} of its KV cache "
            f"({kv / mib:.1f} MiB, {plan.num_layers} layers of {nb} blocks x {bs} tokens), allocated outside vLLM's "
            "KV-cache accounting (lower gpu_memory_utilization by that share of the KV cache if memory runs short)")


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
            self.key_copies = None  # this layer's PagedKeyCopies (select_keys "fp8"), made when its cache is first seen
            if self.kascade is not None and adapter.batch_invariant():
                decode_kernels.CONFIG["batch_invariant"] = True
                logger.info_once("Kascade: batch-invariant mode (VLLM_BATCH_INVARIANT): decode splits sized per "
                                 "request")
            fp8 = self.kascade is not None and self.kascade.select_keys == "fp8"
            if fp8 and kv_sharing_target_layer_name is not None:
                raise ValueError(f"kv_sharing_target_layer_name: with {SELECT_KEYS_KEY} 'fp8' every selecting layer "
                                 "needs its own cache writes (the FP8 key copy is written beside them), expected None, "
                                 f"got {kv_sharing_target_layer_name!r} (a layer reading another's cache, which vLLM "
                                 f"never writes for it); serve this model without {SELECT_KEYS_KEY}")

        def _key_copies(self, layer, kv_cache):
            """This layer's FP8 key copy (PagedKeyCopies), allocated the first time its cache is seen (a cache
            write or a forward with metadata; never inside a CUDA graph capture) and logged once per engine;
            None without select_keys "fp8" or before vLLM allocated the cache."""
            if self.kascade is None or self.kascade.select_keys != "fp8" or kv_cache.numel() == 0:
                return None
            if self.layer_index is None:
                self.layer_index = adapter.layer_index(layer)
            c = self.key_copies
            if c is None or (c.num_blocks, c.block_size) != cache_pages(kv_cache, self.head_size):
                args = (self.num_kv_heads, self.tp_rank, kv_cache, self.head_size)
                self.key_copies = layer_key_copies(self.kascade.plan, self.layer_index, *args)
                logger.info_once(key_copy_summary(self.kascade.plan, *args))
            return self.key_copies

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            """vLLM's cache write (reshape_and_cache_flash), then, with select_keys "fp8", the FP8 copy of the new
            keys' selecting heads at the same slots. key / value [T', Hkv, D] (rows after T are padding), kv_cache
            [num_blocks, Hkv, block_size, 2 * D] (logical), slot_mapping [T] (slot = block * block_size + offset;
            negative: a padding token, skipped). Tensor operations only: it runs inside vLLM's CUDA graphs."""
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            copies = self._key_copies(layer, kv_cache)
            if copies is not None:
                copies.write(self.layer_index, key, slot_mapping)

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
            copies = self._key_copies(layer, kv_cache)
            md = attn_metadata
            r = md.seq_lens.shape[0]
            out3 = output.view(output.shape[0], self.num_heads, -1)  # [T, Hq, Dv]
            if adapter.decode_only(md) and query.shape[0] >= r:
                bt = md.block_table if md.block_table.shape[0] == r else md.block_table[:r]

                def dense():  # the whole step through vLLM's FlashAttention call, into `output`
                    self._flash(layer, query, key, value, kv_cache, md, output)
                    return out3[:r]

                o = self.kascade.attend_decode(self.layer_index, query[:r], key_cache, value_cache, bt, md.seq_lens,
                                               scale=self.scale, tp_rank=self.tp_rank, dense=dense, key_copies=copies,
                                               out=out3[:r] if out3.dtype == query.dtype else None)
                if o.data_ptr() != out3.data_ptr():  # not written in place (the reference path): one copy
                    out3[:r].copy_(o)
                return output
            lens, qsl = host_lens(md)
            decode_from = adapter.prompt_lens(qsl)  # resumed requests: generated tokens as decode steps
            if self.kascade.dense_step(qsl, lens, decode_from):  # decode-only mode, no decode step: vLLM's call
                return self._flash(layer, query, key, value, kv_cache, md, output)
            n_tok = qsl[-1]
            every = [i for i in range(r) if qsl[i + 1] > qsl[i]]

            def dense(reqs):  # requests `reqs` through vLLM's FlashAttention call
                if reqs == every:
                    self._flash(layer, query, key, value, kv_cache, md, output)
                    return out3[:n_tok]
                sub, rows = step_sub_batch(md, reqs, lens, qsl)
                o = torch.empty(rows.shape[0], *out3.shape[1:], dtype=output.dtype, device=output.device)
                k_sub = key[rows] if key is not None else None
                v_sub = value[rows] if value is not None else None
                self._flash(layer, query[rows], k_sub, v_sub, kv_cache, sub, o)
                return o

            o = self.kascade.attend(self.layer_index, query[:n_tok], key_cache, value_cache, md.block_table[:r],
                                    md.seq_lens[:r], md.query_start_loc[: r + 1], scale=self.scale,
                                    tp_rank=self.tp_rank, host_lens=(lens, qsl), dense=dense, key_copies=copies,
                                    decode_from=decode_from)
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
