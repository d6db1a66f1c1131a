"""Greedy decoding with a KV cache, one step at a time (what the accuracy harness runs).

A plain loop instead of `model.generate`, so that nothing in a model's generation config (sampling,
repetition penalties, minimum lengths) changes what is measured: one prefill of the prompt, then one
decode step per new token, the argmax each time, until `max_new_tokens` or an end-of-sequence token.

    greedy(model, ids [1, N], max_new_tokens, eos)            -> list of new ids
    greedy_batch(model, ids [B, N], [n_0, ..., n_B-1], eos)   -> B lists, each what `greedy` gives its row

`greedy_batch` runs prompts of one length together (no padding): one prefill of the batch, then one
decode step per token for the whole batch. A row that has produced an end-of-sequence token or its own
number of tokens keeps being fed (its later tokens are cut off), so every step has the same shapes; the
loop ends when every row is done. The new tokens stay on the device until the end; the only host sync
per step is the "all done?" check.
"""

from __future__ import annotations

import inspect

import torch


def _cache_kwarg(model) -> str:
    """The name of the cache argument of model.forward ("cache" in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def step(model, ids: torch.Tensor, cache=None, cache_kwarg: str | None = None):
    """One forward of ids [B, n] on top of `cache`; returns (logits of the last position [B, V], cache)."""
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


@torch.no_grad()
def greedy_batch(model, input_ids: torch.Tensor, max_new_tokens, eos_token_ids=()) -> list[list[int]]:
    """Greedy continuations of the rows of input_ids [B, N] (prompts of one length, no padding).

    max_new_tokens: an int for every row, or one int per row. Row b gets exactly what
    `greedy(model, input_ids[b:b + 1], max_new_tokens[b], eos_token_ids)` gives (up to the numerics of a
    batched forward): at most its number of ids, stopping before the first id in `eos_token_ids`.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids: expected shape [B, N] with B, N >= 1, got {tuple(input_ids.shape)}")
    bsz = input_ids.shape[0]
    limits = [int(max_new_tokens)] * bsz if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if len(limits) != bsz:
        raise ValueError(f"max_new_tokens: expected one number per row ({bsz}), got {len(limits)}")
    steps = max(limits, default=0)
    if steps <= 0:
        return [[] for _ in range(bsz)]
    device = next(model.parameters()).device
    eos = sorted({int(e) for e in eos_token_ids if e is not None})
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    limit_t = torch.tensor(limits, dtype=torch.long, device=device)
    kwarg = _cache_kwarg(model)
    ids = input_ids.to(device)
    tokens = torch.empty(bsz, steps, dtype=torch.long, device=device)  # [B, steps]
    ended = torch.zeros(bsz, dtype=torch.bool, device=device)  # produced an end-of-sequence id
    cache = None
    for i in range(steps):
        logits, cache = step(model, ids, cache, kwarg)
        nxt = logits.argmax(dim=-1)  # [B]
        tokens[:, i] = nxt
        if eos:
            ended |= torch.isin(nxt, eos_t)
        if i + 1 < steps and not bool((~ended & (limit_t > i + 1)).any()):  # every row done (one sync)
            tokens = tokens[:, : i + 1]
            break
        ids = nxt[:, None]
    rows = tokens.tolist()
    out = []
    for row, n in zip(rows, limits):
        row = row[:n]
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out
