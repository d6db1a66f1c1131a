"""Task shapes of `kascade.eval.tasks`: seeded random atoms, haystacks, and for each task a builder of
prompts of any size.

A shape is `build(size, fine) -> Draft` with a size knob (haystack characters, number of JSON pairs or
of distinct words) and a second knob: either a fine one (`fine_grows`: the prompt grows by about one
token per step) or a phase (the haystack, passage or sequence starts one sentence / line / item
later), which `kascade.eval.tasks.fit_length` searches to hit a token length exactly. Every random
choice is drawn once from the sample's generator, so all sizes of one sample share keys, values and
depths.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from typing import Callable, NamedTuple

from kascade.eval import prompts as P
from kascade.eval import templates as T

class Draft(NamedTuple):
    prompt: str
    target: str
    answers: list[str]
    spans: list[tuple[int, int]]
    meta: dict


@dataclass
class Shape:
    """How a task grows: build(size, fine) for size in [size_min, size_max], fine in [0, fine_max]."""

    build: Callable[[int, int], Draft]
    size_min: int = 0
    size_max: int | None = None  # None: unbounded
    fine_max: int = 0
    fine_grows: bool = True  # the prompt grows with `fine`; False: `fine` only shifts a phase
    chars_per_step: float = 1.0  # rough characters per size step (first guess of the search)


# ----------------------------------------------------------------------------------------------
# random atoms (evaluation pools)
# ----------------------------------------------------------------------------------------------


def _eval_pool_words():
    # the key vocabulary of the project's synthetic training data; keys are split between training and
    # evaluation by `templates.is_eval_key`, so the words are familiar and the keys are not
    from kascade.tiny.synthetic import ADJECTIVES, NOUNS

    return ADJECTIVES, NOUNS


def _eval_key(rng: random.Random, taken: set) -> str:
    adjectives, nouns = _eval_pool_words()
    while True:
        key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if T.is_eval_key(key) and key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, digits: int, taken: set) -> str:
    while True:
        v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if v not in taken:
            taken.add(v)
            return v


def _uuid(rng: random.Random, taken: set) -> str:
    while True:
        h = "%032x" % rng.getrandbits(128)
        u = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if T.is_eval_key(u) and u not in taken:
            taken.add(u)
            return u


def _var_name(rng: random.Random, taken: set) -> str:
    while True:
        n = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if T.is_eval_key(n) and n not in taken:
            taken.add(n)
            return n


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class _WordPool:
    """Distinct pronounceable words of `syllables` consonant-vowel syllables, drawn on demand (the i-th
    word depends only on the seed, not on how many were asked for before)."""

    def __init__(self, rng: random.Random, syllables: tuple[int, ...], exclude: set | None = None):
        self.rng, self.syllables, self.words, self.seen = rng, syllables, [], set(exclude or ())

    def __getitem__(self, i: int) -> str:
        while len(self.words) <= i:
            n = self.rng.choice(self.syllables)
            w = "".join(self.rng.choice(_CONSONANTS) + self.rng.choice(_VOWELS) for _ in range(n))
            if w not in self.seen:
                self.seen.add(w)
                self.words.append(w)
        return self.words[i]

    def take(self, a: int, b: int) -> list[str]:
        return [self[i] for i in range(a, b)]


# ----------------------------------------------------------------------------------------------
# haystacks
# ----------------------------------------------------------------------------------------------


class Filler:
    """RULER's noise: the filler sentences repeated; facts go to sentence starts."""

    name, sep = "filler", " "

    def __init__(self):
        self.unit = T.FILLER.strip() + " "
        self.sentence_starts = [0] + [i + 2 for i in range(len(self.unit) - 2) if self.unit[i : i + 2] == ". "]

    def text(self, n: int, phase: int = 0) -> str:
        """n characters of the stream, starting at sentence `phase` (a second knob for exact lengths)."""
        a = self.sentence_starts[phase % len(self.sentence_starts)]
        return (self.unit * (n // len(self.unit) + 2))[a : a + n]

    def boundary(self, text: str, pos: int) -> int:
        j = text.rfind(". ", 0, pos)
        return 0 if j < 0 else j + 2


class Essay:
    """A window of a long text from a seeded line start (wrapping around); facts go to line starts."""

    name, sep = "essay", "\n"

    def __init__(self, source: str, rng: random.Random):
        if len(source) < 1000:
            raise ValueError(f"text: the essay haystack needs a source of at least 1000 characters, got {len(source)}")
        self.source = source
        start = rng.randrange(len(source))
        nl = source.find("\n", start)
        start = nl + 1 if 0 <= nl < len(source) - 1 else 0
        while start < len(source) - 1 and source[start] == "\n":  # start on a line with text
            start += 1
        self.start = start if start < len(source) - 1 else 0

    def text(self, n: int, phase: int = 0) -> str:
        """n characters from the start line, or `phase` lines later (a second knob for exact lengths)."""
        src, start = self.source, self.start
        for _ in range(phase):
            nl = src.find("\n", start)
            start = nl + 1 if 0 <= nl < len(src) - 1 else 0
        out = src[start : start + n]
        while len(out) < n:
            out += "\n" + src[: n - len(out) - 1]
        return out[:n]

    def boundary(self, text: str, pos: int) -> int:
        j = text.rfind("\n", 0, pos)
        return 0 if j < 0 else j + 1


def _insert(hay, text: str, facts: list[tuple[float, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Insert each fact (depth in [0, 1], string) at the haystack boundary at or before depth * len(text).

    Facts appear in the order of their depths. Returns the text and the span of each fact (input order).
    """
    order = sorted(range(len(facts)), key=lambda i: facts[i][0])
    pieces, spans, prev, out_len = [], [None] * len(facts), 0, 0
    for i in order:
        depth, fact = facts[i]
        b = max(prev, hay.boundary(text, int(depth * len(text))))
        pieces.append(text[prev:b])
        out_len += b - prev
        spans[i] = (out_len, out_len + len(fact))
        pieces.append(fact + hay.sep)
        out_len += len(fact) + len(hay.sep)
        prev = b
    pieces.append(text[prev:])
    return "".join(pieces), spans


def _shift(spans, offset):
    return [(a + offset, b + offset) for a, b in spans]


# ----------------------------------------------------------------------------------------------
# task shapes
# ----------------------------------------------------------------------------------------------


def niah_shape(rng, hay, n_keys, n_values, n_queries):
    taken: set = set()
    keys = [_eval_key(rng, taken) for _ in range(n_keys)]
    queried = keys[:n_queries]
    needles = []  # (depth, key, value)
    for i, k in enumerate(keys):
        for _ in range(n_values if i < n_queries else 1):
            needles.append((rng.random(), k, _number(rng, 7, taken)))
    multi = n_values > 1 or n_queries > 1
    question = T.niah_question(queried, multi=multi)
    by_depth = sorted(needles)
    values = {k: [v for _, kk, v in by_depth if kk == k] for k in keys}  # in order of appearance
    answers = [v for k in queried for v in values[k]]
    target = T.answer_list(answers) if multi else " " + answers[0]

    def build(size, fine):
        body, spans = _insert(hay, hay.text(size, fine), [(d, T.niah_needle(k, v)) for d, k, v in needles])
        prompt = T.NIAH_PREFIX + body + "\n" + question
        spans = _shift(spans, len(T.NIAH_PREFIX))
        ans_spans = [s for s, (_, k, _) in zip(spans, needles) if k in queried]
        meta = {"keys": keys, "queried": queried, "values": values, "haystack": hay.name,
                "depths": [round(s[0] / len(prompt), 4) for s in ans_spans]}
        return Draft(prompt, target, answers, ans_spans, meta)

    return Shape(build, size_min=0, fine_max=8, fine_grows=False, chars_per_step=1.0)


def vt_shape(rng, hay, n_chains=1, n_hops=4):
    taken: set = set()
    chains = [[_var_name(rng, taken) for _ in range(n_hops + 1)] for _ in range(n_chains)]
    values = [_number(rng, 5, taken) for _ in range(n_chains)]
    facts, owner = [], []
    for c, chain in enumerate(chains):
        depths = sorted(rng.random() for _ in chain)
        facts.append((depths[0], T.vt_assign(chain[0], value=values[c])))
        for d, a, b in zip(depths[1:], chain[:-1], chain[1:]):
            facts.append((d, T.vt_assign(b, source=a)))
        owner += [c] * len(chain)
    question = T.vt_question(values[0])

    def build(size, fine):
        body, spans = _insert(hay, hay.text(size, fine), facts)
        prompt = T.VT_PREFIX + body + "\n" + question
        spans = [s for s, c in zip(_shift(spans, len(T.VT_PREFIX)), owner) if c == 0]
        meta = {"chains": chains, "values": values, "haystack": hay.name,
                "depths": [round(s[0] / len(prompt), 4) for s in spans]}
        return Draft(prompt, T.vt_answer(chains[0]), list(chains[0]), spans, meta)

    return Shape(build, size_min=0, fine_max=8, fine_grows=False, chars_per_step=1.0)


_KV_FINE_MAX = 160  # hex characters of the extra distractor value


def kv_shape(rng):
    taken: set = set()
    pool: list[tuple[str, str]] = []
    qkey, qvalue = _uuid(rng, taken), _uuid(rng, taken)
    depth = rng.random()
    pad_key = _uuid(rng, taken)
    pad_hex = "".join(rng.choice("0123456789abcdef") for _ in range(_KV_FINE_MAX))
    pool_rng = random.Random(rng.getrandbits(64))

    def build(size, fine):
        while len(pool) < size:
            pool.append((_uuid(pool_rng, taken), _uuid(pool_rng, taken)))
        qi = min(size, int(depth * (size + 1)))
        pairs = pool[:qi] + [(qkey, qvalue)] + pool[qi:size]
        if fine > 0:  # one more distractor whose value has `fine` hex digits: the fine length knob
            pairs.append((pad_key, pad_hex[:fine]))
        prompt = T.KV_PREFIX + T.kv_object(pairs) + "\n\n" + T.kv_question(qkey)
        entry = T.kv_pair(qkey, qvalue)
        a = prompt.index(entry)
        meta = {"n_pairs": len(pairs), "index": qi, "key": qkey, "depths": [round(a / len(prompt), 4)]}
        return Draft(prompt, " " + qvalue, [qvalue], [(a, a + len(entry))], meta)

    return Shape(build, size_min=0, fine_max=_KV_FINE_MAX, chars_per_step=84.0)


def cwe_shape(rng, length, count):
    common_pool = _WordPool(rng, (2, 3))
    common = common_pool.take(0, P.CWE_NUM_COMMON)
    tail_pool = _WordPool(random.Random(rng.getrandbits(64)), (4,))  # 8 letters: never a list word
    sample = " ".join(P.cwe_item(100 + i, w) for i, w in enumerate(common * 2))
    per_item = max(1.0, (count(sample) - count("")) / (2 * P.CWE_NUM_COMMON))
    freq_cw = int(min(30, max(2, 0.5 * length / (P.CWE_NUM_COMMON * per_item))))
    freq_ucw = max(1, min(3, freq_cw // 4))
    shuffle_key = rng.getrandbits(64)

    def build(size, fine):
        items = common * freq_cw + [w for w in common_pool.take(P.CWE_NUM_COMMON, P.CWE_NUM_COMMON + size)
                                    for _ in range(freq_ucw)]
        random.Random(f"{shuffle_key}/{size}").shuffle(items)
        listing = " ".join(P.cwe_item(i + 1, w) for i, w in enumerate(items))
        tail, j = "", 0
        while len(tail) < fine:  # words that occur once, cut at `fine` characters: the fine length knob
            tail += " " + P.cwe_item(len(items) + j + 1, tail_pool[j])
            j += 1
        prompt = P.CWE_PREFIX + listing + tail[:fine] + P.CWE_QUESTION
        spans = [(len(P.CWE_PREFIX), len(P.CWE_PREFIX) + len(listing))]
        meta = {"freq_common": freq_cw, "freq_uncommon": freq_ucw, "n_uncommon": size, "n_items": len(items)}
        return Draft(prompt, " " + ", ".join(common), list(common), spans, meta)

    return Shape(build, size_min=0, fine_max=int(8 * (freq_ucw + 1) * (per_item + 1) * 3),
                  chars_per_step=freq_ucw * 12.0)


_ZETA2 = math.pi**2 / 6


def fwe_shape(rng, length):
    vocab_size = max(10, length // 50)
    vocab = [P.FWE_NOISE]
    seen = set(vocab)
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    shuffle_key = rng.getrandbits(64)
    noise = (" " + P.FWE_NOISE) * 64

    def build(size, fine):
        counts = [int(size * (r + 1) ** -2.0 / _ZETA2) for r in range(vocab_size)]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(f"{shuffle_key}/{size}").shuffle(words)
        text = " ".join(words) + noise[:fine]  # trailing noise dots: the fine length knob
        prompt = P.FWE_PREFIX + text + P.FWE_QUESTION
        meta = {"vocab_size": vocab_size, "n_words": size, "counts": counts[:5]}
        return Draft(prompt, " " + ", ".join(vocab[1:4]), vocab[1:4],
                      [(len(P.FWE_PREFIX), len(P.FWE_PREFIX) + len(text))], meta)

    # at >= 80 words the counts of ranks 2..5 are strictly decreasing, so the answer is unambiguous
    return Shape(build, size_min=80, fine_max=len(noise), chars_per_step=0.5)


def copy_shape(rng, source: Essay):
    # The prompt stops at the instruction's last word: its trailing blank line starts the target, so the
    # tokens at the boundary are those of the whole document (a prompt ending in "\n\n" would get one
    # merged newline token that the model never saw before a passage).
    instruction = T.COPY_INSTRUCTION.rstrip()
    gap = T.COPY_INSTRUCTION[len(instruction):]

    def build(size, fine):
        passage = source.text(size, fine)
        prompt = T.COPY_PREFIX + passage + instruction
        a = len(T.COPY_PREFIX)
        return Draft(prompt, gap + passage, [], [(a, a + len(passage))], {"passage_chars": size, "phase": fine})

    return Shape(build, size_min=16, fine_max=8, fine_grows=False, chars_per_step=1.0)


_DOC_QA_FINE_MAX = 480  # characters of the closing remarks line


def _name_pool(rng, n, syllables=(2, 3)):
    """n distinct capitalised pronounceable names."""
    return [w.capitalize() for w in _WordPool(rng, syllables).take(0, n)]


def doc_qa_shape(rng, render: Callable[[str], str]):
    """A warehouse's daily log of `DOC_QA_ENTRIES` entries; each holds one delivery's lot number among
    generated notes; the user asks for one delivery's lot number.

    The deliveries have distinct materials, items and depots, which the notes never name. render(user_text)
    -> the prompt (the chat template around one user turn). Size: note sentences, spread over the entries;
    fine: characters of a closing remarks line."""
    k = P.DOC_QA_ENTRIES
    taken: set = set()
    people = [f"{a} {b}" for a, b in zip(_name_pool(rng, 48), _name_pool(rng, 48, (2,)))]
    depots = [f"{n} {rng.choice(P.DOC_QA_DEPOT_KINDS)}" for n in _name_pool(rng, 2 * k)]
    materials, items = list(P.DOC_QA_MATERIALS), list(P.DOC_QA_ITEMS)
    rng.shuffle(materials)
    rng.shuffle(items)
    facts = [{"material": materials[j], "item": items[j], "depot": depots[j], "lot": _number(rng, 5, taken)}
             for j in range(k)]
    queried = rng.randrange(k)
    where = [rng.random() for _ in range(k)]  # place of the fact among its entry's notes
    warehouse = _name_pool(rng, 1, (3,))[0]
    first_weekday = rng.randrange(7)
    remarks = P.DOC_QA_REMARKS + ",".join(" " + rng.choice(P.DOC_QA_REMARK_WORDS) for _ in range(_DOC_QA_FINE_MAX // 4))
    notes_rng = random.Random(rng.getrandbits(64))
    notes: list[str] = []

    def note(i):
        while len(notes) <= i:
            r = notes_rng
            notes.append(r.choice(P.DOC_QA_NOTES).format(
                person=r.choice(people), other=r.choice(people), container=r.choice(P.DOC_QA_CONTAINERS),
                side=r.choice(P.DOC_QA_SIDES), shift=r.choice(P.DOC_QA_SHIFTS), depot=r.choice(depots[k:]),
                material=r.choice(materials[k:])))
        return notes[i]

    q = facts[queried]
    question = P.DOC_QA_QUESTION.format(**q)
    target = P.DOC_QA_ANSWER.format(**q)

    def build(size, fine):
        entries, i = [], 0
        for j, fact in enumerate(facts):
            n = size // k + (j < size % k)
            body = [note(i + t) for t in range(n)]
            i += n
            body.insert(int(where[j] * (n + 1)), P.DOC_QA_FACT.format(**fact))
            head = P.DOC_QA_ENTRY.format(day=j + 1, weekday=P.DOC_QA_DAYS[(first_weekday + j) % 7])
            entries.append(" ".join([head] + body))
        tail = remarks[:fine].rstrip(" ,") if fine > len(P.DOC_QA_REMARKS) else ""
        user = P.DOC_QA_INTRO.format(warehouse=warehouse) + "\n\n".join(entries) + tail + question
        prompt = render(user)
        fact = P.DOC_QA_FACT.format(**q)
        a = prompt.index(fact)
        meta = {"entries": k, "queried": queried, "notes": size, "key": f"{q['material']} {q['item']} from {q['depot']}",
                "depths": [round(a / len(prompt), 4)]}
        return Draft(prompt, target, [q["lot"]], [(a, a + len(fact))], meta)

    return Shape(build, size_min=0, fine_max=len(remarks), chars_per_step=60.0)


def _sequence_stream(rng, chars_per_token: float, length: int, kind: str):
    """(stream(n) -> at least n characters of the sequence, separator, meta)."""
    if kind == "repeat":
        atoms = rng.choice(["words", "numbers", "hex"])
        sep = rng.choice([" ", ", ", "\n", " | "])
        taken: set = set()
        items = []
        for _ in range(rng.randint(8, 64)):
            if atoms == "words":
                items.append(_eval_key(rng, taken))
            elif atoms == "numbers":
                items.append(_number(rng, rng.randint(2, 7), taken))
            else:
                items.append("%06x" % rng.getrandbits(24))
        # at least four repetitions fit in the prompt
        max_period = max(8, int(length * chars_per_token / 4))
        while len(items) > 2 and len(sep.join(items)) + len(sep) > max_period:
            items.pop()
        unit = sep.join(items) + sep
        return (lambda n: unit * (n // len(unit) + 2)), sep, {"kind": kind, "atoms": atoms, "period": len(unit)}
    taken = set()
    label, start, step = _eval_key(rng, taken), rng.randint(0, 9000), rng.randint(1, 97)
    lines: list[str] = []
    size = [0]

    def stream(n):
        while size[0] < n + 64:
            line = f"{label} {len(lines) + 1:05d}: {start + len(lines) * step}\n"
            lines.append(line)
            size[0] += len(line)
        return "".join(lines)

    return stream, "\n", {"kind": kind, "label": label, "start": start, "step": step}


def sequence_shape(rng, length, count, continuation_chars):
    kind = rng.choice(["repeat", "repeat", "table"])
    probe_stream, _, _ = _sequence_stream(random.Random(rng.getrandbits(64)), 4.0, length, kind)
    probe = probe_stream(4000)[:4000]
    cpt = len(probe) / max(1, count(probe) - count(""))
    stream, sep, meta = _sequence_stream(rng, cpt, length, kind)

    def build(size, fine):
        # the body ends where the fine-th separator after `size` characters starts, and its start is cut
        # so that it is `size` characters long; `fine` shifts the phase of the cut (exact lengths)
        n = size + continuation_chars + 64
        while True:
            s = stream(n)
            end = s.find(sep, size)
            for _ in range(fine):
                if end < 0:
                    break
                end = s.find(sep, end + 1)
            if end >= 0 and end + continuation_chars <= len(s):
                break
            n *= 2
        body = s[end - size : end]
        prompt = T.SEQ_PREFIX + body
        return Draft(prompt, s[end : end + continuation_chars], [],
                      [(len(T.SEQ_PREFIX), len(prompt))], dict(meta, body_chars=size, phase=fine))

    return Shape(build, size_min=16, fine_max=16, fine_grows=False, chars_per_step=1.0)


# ----------------------------------------------------------------------------------------------
# exact length
