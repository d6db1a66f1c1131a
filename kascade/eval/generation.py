"""Greedy decoding with a KV cache, one step at a time (what the accuracy harness runs).

A plain loop instead of `model.generate`, so that nothing in a model's generation config (sampling,
repetition penalties, minimum lengths) changes what is measured: one prefill of the prompt, then one
decode step per new token, the argmax each time, until `max_new_tokens` or an end-of-sequence token.
"""

from __future__ import annotations

import inspect

import torch


def _cache_kwarg(model) -> str:
    """The name of the cache argument of model.forward ("cache" in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def step(model, ids: torch.Tensor, cache=None, cache_kwarg: str | None = None):
    """One forward of ids [1, n] on top of `cache`; returns (logits of the last position [1, V], cache)."""
    kw = {cache_kwarg or _cache_kwarg(model): cache} if cache is not None else {}
    out = model(ids, use_cache=True, logits_to_keep=1, **kw)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[:, -1], new_cache


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids=()) -> list[int]:
    """Greedy continuation of input_ids [1, N]: at most `max_new_tokens` ids, stopping after an id in
    `eos_token_ids` (which is not returned)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected shape [1, N], got {tuple(input_ids.shape)}")
    eos = {int(e) for e in eos_token_ids if e is not None}
    kwarg = _cache_kwarg(model)
    ids = input_ids.to(next(model.parameters()).device)
    out: list[int] = []
    cache = None
    for _ in range(max_new_tokens):
        logits, cache = step(model, ids, cache, kwarg)
        nxt = int(logits[0].argmax())
        if nxt in eos:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]], device=ids.device)
    return out
