"""Prompt templates of the long-context retrieval tasks (RULER-style).

These strings are the single source of truth for the task formats. The
training-data generators of the project's tiny model
(:mod:`kascade.tiny.synthetic`) and the evaluation harness both build their
prompts from them, so the model is trained on exactly the formats it is
evaluated on.

A task sample is a ``prompt`` (everything up to and including the question,
without a trailing space) followed by an ``answer`` continuation that starts
with a single space, e.g. prompt ``"... mentioned in the provided text is"``
and answer ``" 4721093"``. Greedy generation after the prompt must reproduce
the answer.

Seed ranges
-----------
Random seeds below :data:`EVAL_SEED_LIMIT` (1_000_000) are reserved for
evaluation; training data uses seeds ``>= TRAIN_SEED_BASE``. Keys (word pairs)
are split the same way: a key pair is an evaluation key iff
:func:`is_eval_key` is true, and training generators never emit one.
"""

from __future__ import annotations

import zlib
from typing import Sequence

#: Seeds ``< EVAL_SEED_LIMIT`` belong to evaluation.
EVAL_SEED_LIMIT = 1_000_000
#: Training generators use seeds ``>= TRAIN_SEED_BASE``.
TRAIN_SEED_BASE = 1_000_000
#: One key pair in ``EVAL_KEY_MODULUS`` is reserved for evaluation.
EVAL_KEY_MODULUS = 8

# --------------------------------------------------------------------------
# Haystack filler
# --------------------------------------------------------------------------

#: Repetitive filler ("noise") used as a haystack by the needle and
#: variable-tracking tasks.
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again."
)

# --------------------------------------------------------------------------
# Needle in a haystack (single, multi-key, multi-value, multi-query)
# --------------------------------------------------------------------------

NIAH_PREFIX = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
NIAH_QUESTION_MULTI = (
    "What are all the special magic numbers for {key} mentioned in the provided text? "
    "The special magic numbers for {key} mentioned in the provided text are"
)

# --------------------------------------------------------------------------
# Key-value retrieval over a JSON-like object
# --------------------------------------------------------------------------

KV_PREFIX = (
    "Extract the value corresponding to the specified key in the JSON object below.\n\n"
    "JSON data:\n"
)
KV_QUESTION = 'Key: "{key}"\nThe value associated with the specified key is:'

# --------------------------------------------------------------------------
# Variable tracking
# --------------------------------------------------------------------------

VT_PREFIX = (
    "Memorize and track the chain(s) of variable assignment hidden in the "
    "following text.\n\n"
)
VT_ASSIGN_VALUE = "VAR {name} = {value}."
VT_ASSIGN_VAR = "VAR {name} = VAR {source}."
VT_QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the "
    "text above. Answer:"
)

# --------------------------------------------------------------------------
# Copying and sequence continuation
# --------------------------------------------------------------------------

COPY_PREFIX = "Read the following passage carefully.\n\n"
COPY_INSTRUCTION = "\n\nRepeat the passage above verbatim.\n\n"
SEQ_PREFIX = "Continue the sequence exactly as it goes on.\n\n"

# --------------------------------------------------------------------------
# Format helpers
# --------------------------------------------------------------------------


def join_keys(keys: Sequence[str]) -> str:
    """``["a"] -> "a"``, ``["a", "b"] -> "a and b"``, ``["a", "b", "c"] -> "a, b and c"``."""
    keys = list(keys)
    if not keys:
        raise ValueError("no keys")
    if len(keys) == 1:
        return keys[0]
    return ", ".join(keys[:-1]) + " and " + keys[-1]


def niah_needle(key: str, value: str | int) -> str:
    """The needle sentence hiding ``value`` under ``key``."""
    return NIAH_NEEDLE.format(key=key, value=value)


def niah_question(keys: str | Sequence[str], multi: bool = False) -> str:
    """The closing question of a needle task.

    One key and ``multi=False`` gives the single-answer question; several keys
    (multi-query) or ``multi=True`` (multi-value) give the plural form.
    """
    if isinstance(keys, str):
        keys = [keys]
    if len(keys) == 1 and not multi:
        return NIAH_QUESTION.format(key=keys[0])
    return NIAH_QUESTION_MULTI.format(key=join_keys(keys))


def answer_list(values: Sequence[str | int]) -> str:
    """Answer continuation listing ``values``: ``" 1, 2 and 3"`` (leading space)."""
    return " " + join_keys([str(v) for v in values])


def kv_pair(key: str, value: str) -> str:
    """One ``"key": "value"`` entry of the JSON-like object."""
    return f'"{key}": "{value}"'


def kv_object(pairs: Sequence[tuple[str, str]]) -> str:
    """The JSON-like object, one entry per line."""
    return "{\n" + ",\n".join(kv_pair(k, v) for k, v in pairs) + "\n}"


def kv_question(key: str) -> str:
    return KV_QUESTION.format(key=key)


def vt_assign(name: str, value: str | int | None = None, source: str | None = None) -> str:
    """``VAR NAME = 12345.`` (a value) or ``VAR NAME = VAR SOURCE.`` (a copy)."""
    if (value is None) == (source is None):
        raise ValueError("give exactly one of value / source")
    if source is not None:
        return VT_ASSIGN_VAR.format(name=name, source=source)
    return VT_ASSIGN_VALUE.format(name=name, value=value)


def vt_question(value: str | int) -> str:
    return VT_QUESTION.format(value=value)


def vt_answer(names: Sequence[str]) -> str:
    """Answer continuation of variable tracking: the chain, space separated."""
    return " " + " ".join(names)


def is_eval_key(key: str) -> bool:
    """True iff ``key`` is reserved for evaluation (stable across machines)."""
    return zlib.crc32(key.encode("utf-8")) % EVAL_KEY_MODULUS == 0


def check_seed(seed: int, split: str) -> None:
    """Raise if ``seed`` is outside the range of ``split`` (``"train"``/``"eval"``)."""
    if split == "eval" and not 0 <= seed < EVAL_SEED_LIMIT:
        raise ValueError(f"evaluation seeds must be in [0, {EVAL_SEED_LIMIT}), got {seed}")
    if split == "train" and seed < TRAIN_SEED_BASE:
        raise ValueError(f"training seeds must be >= {TRAIN_SEED_BASE}, got {seed}")
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}")


# --------------------------------------------------------------------------
# Scoring helpers
# --------------------------------------------------------------------------


def match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` (RULER's string match)."""
    if not answers:
        return 0.0
    return sum(a in prediction for a in answers) / len(answers)


def first_token_span(prediction: str) -> str:
    """The first whitespace-separated word of ``prediction``, stripped of punctuation."""
    parts = prediction.strip().split()
    return parts[0].strip(".,;:\"'") if parts else ""
