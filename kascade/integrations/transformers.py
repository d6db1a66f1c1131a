"""Kascade attention in transformers through its public AttentionInterface.

`enable(model, plan)` registers an attention function and a mask function under the name
"kascade" (once, at first use; nothing is registered at import), switches the model to it, and
attaches the strategy to each attention module as `module.kascade_strategy`. `disable(model)`
restores the previous implementation. `enable` returns a handle that is also a context manager:

    with kascade.enable(model, plan):
        out = model.generate(**inputs, max_new_tokens=32)

The mask function hands the attention function only the 2-D padding mask: Kascade applies
causality itself, and left padding becomes a per-sequence start offset (kv_start).
"""

from __future__ import annotations

import torch

from kascade.plan import Plan
from kascade.strategy import KascadeStrategy, Strategy

ATTN_NAME = "kascade"
_registered = False


def _key_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """Mask function for "kascade": the 2-D key-validity mask [B, kv_length] (True = real token), or None."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    am = attention_mask.to(torch.bool)[:, kv_offset : kv_offset + kv_length]
    if am.shape[1] < kv_length:  # a preallocated cache longer than the tokens seen: the tail is unwritten
        pad = torch.zeros(am.shape[0], kv_length - am.shape[1], dtype=torch.bool, device=am.device)
        am = torch.cat([am, pad], dim=1)
    return am


def _kv_start(mask, k) -> torch.Tensor | None:
    """Left-padding offsets [B] from a key-validity mask; ValueError for any other padding."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"attention_mask: expected a 2-D padding mask [batch, seq_len], got shape "
                         f"{tuple(mask.shape)}; custom 4-D masks are not supported by kascade attention")
    n = k.shape[2]
    mask = mask[:, -n:] if mask.shape[1] >= n else mask
    if mask.shape[1] != n:
        raise ValueError(f"attention_mask: expected {n} key positions, got {mask.shape[1]}")
    if bool(mask.all()):
        return None
    start = (~mask).to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading padding per sequence
    expect = torch.arange(n, device=mask.device)[None, :] >= start[:, None]
    if not torch.equal(expect, mask):
        bad = int((expect != mask).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask: sequence {bad} has padding after its first real token; kascade "
                         "supports left padding only (tokenizer.padding_side = 'left')")
    if int(start.max()) >= n:
        raise ValueError("attention_mask: a sequence has no real token")
    return start


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
    kv_start = _kv_start(attention_mask, key)
    out = strategy.attend(layer, query, key, value, kv_start, scaling)
    return out.transpose(1, 2).contiguous(), None


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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False


def enable(model, plan: Plan | None = None, *, strategy: Strategy | None = None, backend: str = "auto",
           dense_anchor_output: bool = False) -> KascadeHandle:
    """Switch `model` to Kascade attention with `plan` (or any `strategy`). See the module docstring."""
    if (plan is None) == (strategy is None):
        raise ValueError("enable: pass exactly one of plan= or strategy=")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan: expected a kascade.Plan (Plan.load(path)), got {type(plan).__name__}")
        strategy = KascadeStrategy(plan, backend=backend, dense_anchor_output=dense_anchor_output)
    _check_model(model)
    strategy.validate(model.config)
    _register()
    previous = getattr(model, "_kascade_previous_attn", None) or model.config._attn_implementation
    for m in attention_modules(model):
        m.kascade_strategy = strategy
    model._kascade_previous_attn = previous
    model.set_attn_implementation(ATTN_NAME)
    return KascadeHandle(model, strategy, previous)


def disable(model) -> None:
    """Restore the attention implementation the model had before `enable` (no-op if not enabled)."""
    previous = getattr(model, "_kascade_previous_attn", None)
    if previous is None:
        return
    for m in attention_modules(model):
        if hasattr(m, "kascade_strategy"):
            del m.kascade_strategy
    model.set_attn_implementation(previous)
    del model._kascade_previous_attn
