"""Retrieval-rich calibration prompts, built in token space at an exact length.

Output-aware calibration judges a plan by the model's next-token distributions where the answer
depends on a few far-away keys, so its prompts hide facts in long held-out prose and end with a
question about one of them. The formats are the calibration set's own (kascade's evaluation tasks use
other wordings, vocabularies and seeds):

    passkey     "The pass key is 48213. Remember it. 48213 is the pass key." ... "What is the pass key?"
    extension   a block of staff phone extensions; one name is asked for
    door        several "The code word for the amber door is lantern." facts at different depths
    chat        a passkey question asked in the model's chat template (when it has one)
    prose       plain held-out prose (the divergence on ordinary continuation)

and the structured formats of `kascade.calibrate.structured` (records, JSON, tables, code, several
documents, long chats). `MIXTURE` is all of them; each format belongs to a family (`FAMILY`), the
groups whose worst divergence the output-aware search protects, and the unit that leave-one-family-out
validation leaves out (`formats_without`).

Each prompt is exactly `length` tokens: the haystack is a window of the tokenised text, the fact
sentences and the question are tokenised separately and spliced in at line breaks of the window.
The answer is not given here: calibration follows the dense model's own greedy continuation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kascade.calibrate import structured

FORMATS = ("passkey", "extension", "door", "chat", "prose")  # the prose formats (the first recipe's set)
MIXTURE = FORMATS + structured.STRUCTURED_FORMATS
# format -> family: the evaluation family it resembles (kascade.eval.tasks), or the prose groups
FAMILY = {"passkey": "needle", "extension": "needle", "door": "needle", "chat": "chat", "prose": "prose",
          **structured.FAMILY}
# evaluation family -> the families of calibration formats its leave-one-out plan must not see
LEAVE_OUT = {"records": ("records",), "json_records": ("json_records",), "table": ("table",), "code": ("code",),
             "multi_doc": ("multi_doc",), "chat_history": ("chat_history", "chat")}
SEED_BASE = 2_000_000  # calibration seeds; evaluation uses [0, 1_000_000), training >= 1_000_000 elsewhere

_FIRST = ("Aldo", "Brisa", "Cosmin", "Delphine", "Emrys", "Farida", "Gideon", "Hesper", "Ilse", "Joaquin", "Kasia",
          "Leif", "Marisol", "Nikolai", "Oona", "Pavel", "Quilla", "Rasmus", "Solveig", "Tobiah")
_LAST = ("Abernathy", "Brandvold", "Castellan", "Drummond", "Eskildsen", "Fairweather", "Galloway", "Holmgren",
         "Ingersoll", "Jablonski", "Kettering", "Lindqvist", "Montague", "Nightingale", "Oyelaran", "Pemberton")
_COLORS = ("amber", "cobalt", "crimson", "ivory", "jade", "lilac", "ochre", "scarlet", "teal", "umber")
_WORDS = ("lantern", "harbor", "thistle", "compass", "meadow", "falcon", "granite", "willow", "ember", "quartz",
          "saddle", "pebble", "orchard", "beacon", "juniper", "anvil")


@dataclass
class CalibrationPrompt:
    """One prompt: token ids (exactly `length`), its format and the seed it was made from."""

    ids: list[int]
    kind: str
    seed: int


def _facts(kind: str, rng: random.Random) -> tuple[list[str], str]:
    """(fact sentences to hide, question) for one prompt of `kind`."""
    if kind in ("passkey", "chat"):
        n = rng.randrange(10_000, 100_000)
        return [f"The pass key is {n}. Remember it. {n} is the pass key."], "What is the pass key? The pass key is"
    if kind == "extension":
        names = rng.sample([f"{f} {last}" for f in _FIRST for last in _LAST], 6)
        lines = "\n".join(f"Extension of {nm}: {rng.randrange(1000, 10000)}" for nm in names)
        asked = rng.choice(names)
        return [f"Staff extensions:\n{lines}"], f"The extension of {asked} is"
    if kind == "door":
        colors = rng.sample(_COLORS, 4)
        words = rng.sample(_WORDS, 4)
        asked = rng.choice(colors)
        facts = [f"The code word for the {c} door is {w}." for c, w in zip(colors, words)]
        return facts, f"What is the code word for the {asked} door? The code word for the {asked} door is"
    if kind == "prose":
        return [], ""
    raise ValueError(f"kind: expected one of {FORMATS}, got {kind!r}")


def _chat_frame(tokenizer) -> tuple[list[int], list[int]] | None:
    """Token ids before and after the user message in the tokenizer's chat template (None without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\u2063CALIBRATION\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                         tokenize=False)
    if mark not in text:
        return None
    before, after = text.split(mark)
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    return enc(before), enc(after)


def _line_breaks(ids: list[int], newline_ids: set[int]) -> list[int]:
    """Positions just after a line break (where a fact can start a line)."""
    return [i + 1 for i, t in enumerate(ids[:-1]) if t in newline_ids]


def make_prompt(tokenizer, text_ids: list[int], length: int, kind: str, seed: int) -> CalibrationPrompt:
    """One prompt of `kind`, exactly `length` tokens, from the tokenised held-out text `text_ids`."""
    rng = random.Random(SEED_BASE + seed)
    facts, question = _facts(kind, rng)
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    prefix = tokenizer("", add_special_tokens=True).input_ids
    suffix: list[int] = []
    if kind == "chat":
        frame = _chat_frame(tokenizer)
        if frame is None:
            raise ValueError("kind: 'chat' needs a tokenizer with a chat template; leave 'chat' out of the formats")
        prefix, suffix = prefix + frame[0], frame[1]
    fact_ids = [enc("\n" + f + "\n") for f in facts]
    q_ids = enc("\n\n" + question) if question else []
    room = length - len(prefix) - len(suffix) - len(q_ids) - sum(len(f) for f in fact_ids)
    if room < 64:
        raise ValueError(f"length: {length} tokens leaves no room for the haystack of a {kind!r} prompt; "
                         "use a longer length")
    if len(text_ids) < room + 1:
        raise ValueError(f"text: the held-out text has {len(text_ids)} tokens, fewer than one haystack of {room}")
    start = rng.randrange(0, len(text_ids) - room)
    hay = list(text_ids[start : start + room])
    newline_ids = {t for t in enc("\n") + enc("\n\n") + enc(".\n")}
    breaks = _line_breaks(hay, newline_ids) or list(range(1, room))
    where = sorted(rng.choice(breaks) for _ in fact_ids)
    body, last = [], 0
    for pos, f in zip(where, fact_ids):
        body += hay[last:pos] + f
        last = pos
    body += hay[last:]
    ids = prefix + body + q_ids + suffix
    assert len(ids) == length, (len(ids), length)
    return CalibrationPrompt(ids, kind, seed)


def formats_without(family: str, formats=MIXTURE) -> tuple[str, ...]:
    """`formats` less every format of the calibration families that evaluating `family` rules out
    (LEAVE_OUT; a family without an entry leaves out its own formats)."""
    gone = LEAVE_OUT.get(family, (family,))
    known = set(FAMILY.values()) | set(LEAVE_OUT)
    if family not in known:
        raise ValueError(f"family: expected one of {sorted(known)}, got {family!r}")
    return tuple(f for f in formats if FAMILY[f] not in gone)


def calibration_prompts(tokenizer, text: str, length: int, count: int, formats=FORMATS,
                        first_seed: int = 0) -> list[CalibrationPrompt]:
    """`count` prompts of `length` tokens, cycling through `formats` (seeds first_seed.., so that a
    later measurement can use prompts the calibration did not see)."""
    unknown = [f for f in formats if f not in MIXTURE]
    if unknown:
        raise ValueError(f"formats: expected some of {MIXTURE}, got unknown {unknown}")
    formats = [f for f in formats if f not in ("chat", "long_chat") or _chat_frame(tokenizer) is not None]
    if "long_chat" in formats and structured.chat_frames(tokenizer) is None:
        formats.remove("long_chat")
    if not formats:
        raise ValueError(f"formats: expected some of {MIXTURE} usable with this tokenizer")
    text_ids = tokenizer(text, add_special_tokens=False).input_ids
    out = []
    for i in range(count):
        kind, seed = formats[i % len(formats)], first_seed + i
        if kind in structured.STRUCTURED_FORMATS:
            ids = structured.make_structured(tokenizer, text_ids, length, kind, random.Random(SEED_BASE + seed))
            out.append(CalibrationPrompt(ids, kind, seed))
        else:
            out.append(make_prompt(tokenizer, text_ids, length, kind, seed))
    return out
