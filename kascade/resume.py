"""Requests resumed by recomputation: their generated tokens re-attended as the decode steps they were.

A serving engine that preempts a request by recomputation (vLLM's default) frees the request's KV cache
and later prefills it again: its prompt and the tokens it had generated, in one pass or in chunks. Kascade
selects per tile of queries in prefill and per token in decode (kascade.paged's module docstring), so a
generated token re-attended inside a prefill chunk could attend to other keys than it did as a decode step,
and the resumed request could continue unlike an uninterrupted one.

`split_generated` rewrites one step's batch so that every new token at a position at or after its request's
`decode_from` (the prompt length) is a request of its own: one new token over the keys up to and including
it, read through the same block-table row, which is the decode step that token was. The tokens before
`decode_from` stay one request (a prefill chunk, tiled from the request's first token as before). Token rows
keep their order, so the step's output needs no reordering.

    split_generated(seq_lens, query_start_loc, decode_from) -> Resumed | None   (host lists of ints)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resumed:
    """The rewritten batch: `origin[e]` is the step's request that piece e comes from; `seq_lens` [E] and
    `query_start_loc` [E + 1] describe the pieces over the same token rows (query_start_loc[-1] unchanged)."""

    origin: tuple[int, ...]
    seq_lens: tuple[int, ...]
    query_start_loc: tuple[int, ...]


def split_generated(seq_lens, query_start_loc, decode_from) -> Resumed | None:
    """The step's batch with generated tokens as one-token requests, or None when no request has more than one
    new token at or after its decode_from (the batch then runs as it is).

    seq_lens [R], query_start_loc [R + 1], decode_from [R]: host sequences of ints; request r's new tokens sit at
    positions seq_lens[r] - Q_r ... seq_lens[r] - 1 (Q_r its number of new tokens)."""
    lens, qsl, start = list(seq_lens), list(query_start_loc), list(decode_from)
    if len(qsl) != len(lens) + 1 or len(start) != len(lens):
        raise ValueError(f"decode_from: expected one entry per request ({len(lens)}, like seq_lens, with "
                         f"{len(lens) + 1} query_start_loc offsets), got {len(start)} and {len(qsl)}")
    if not any(qsl[r + 1] - qsl[r] > 1 and lens[r] - 1 >= start[r] for r in range(len(lens))):
        return None
    origin, new_lens, new_qsl = [], [], [0]
    for r, n in enumerate(lens):
        q = qsl[r + 1] - qsl[r]
        first = n - q  # position of the request's first new token
        cut = min(max(start[r], first), n) if q > 1 else n  # positions from `cut` on are generated tokens
        if cut > first or q == 0:  # the prompt part (or a request without new tokens, kept as it is)
            origin.append(r)
            new_lens.append(cut if q else n)
            new_qsl.append(new_qsl[-1] + cut - first if q else new_qsl[-1])
        for p in range(cut, n):  # each generated token: a decode step over positions 0..p
            origin.append(r)
            new_lens.append(p + 1)
            new_qsl.append(new_qsl[-1] + 1)
    assert new_qsl[-1] == qsl[-1]
    return Resumed(tuple(origin), tuple(new_lens), tuple(new_qsl))
