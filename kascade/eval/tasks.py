"""Seeded long-context tasks of an exact token length (after RULER), and their scores.

    from kascade.eval.tasks import make_task, score
    s = make_task("niah_single", 4096, tokenizer, seed=7)
    assert len(tokenizer(s.prompt).input_ids) == 4096        # exactly, with the model's own tokenizer
    text = ...greedy continuation of s.prompt...
    score(s, text)                                            # 1.0 when the magic number is in `text`

Tasks (`TASKS`), in the formats of `kascade.eval.templates` (RULER's wording) and `kascade.eval.prompts`:

    niah_single      one needle "One of the special magic numbers for {key} is: {value}." in a haystack
    niah_multikey    four needles of four keys, one asked for
    niah_multivalue  four values for the same key, all asked for
    niah_multiquery  four keys, all asked for
    vt               variable tracking: VAR A = 12345. ... VAR B = VAR A. ... which variables hold 12345?
    cwe              common words extraction: the 10 most frequent words of a numbered list
    fwe              frequent words extraction: the 3 most frequent coded words of Zipf-distributed text
    kv               key-value retrieval in a JSON-like object of random uuid keys and values
    copy             repeat a long passage verbatim                       (decode-heavy)
    sequence         continue a long repeated or numbered sequence        (decode-heavy)

Scoring: RULER's string match ("all": the share of the reference strings found in the prediction,
case-insensitive) for the retrieval tasks; per generated token for `copy` and `sequence` (the share of
the first n expected tokens that the greedy continuation reproduces at the same position), so
selection over every decode step is exercised.

Haystacks: `haystack="filler"` repeats "The grass is green. The sky is blue. ..." (RULER's noise);
`haystack="essay"` cuts a window out of a long text (`text=`, e.g. data/heldout.txt; `copy` always
needs it). Facts go to sentence starts (filler) or line starts (essay) at seeded random depths.

Exact length. A task builds its prompt from a size knob (haystack characters; number of pairs or
words) and, where one size step is worth many tokens, a fine knob (the length of one extra
distractor value, a tail of once-only words, trailing noise dots). `fit_length` finds the largest size
whose prompt fits in the target by interpolation and bisection, then searches the fine knob (or the
neighbouring sizes) for a prompt of exactly the target length. Tokenisation is not additive, so each
candidate is tokenised whole.

Seeds: evaluation seeds are in [0, 1_000_000); training data uses seeds >= 1_000_000 and keys of the
other pool (`templates.is_eval_key`), so no evaluation key is ever seen in training.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from kascade.eval import prompts as P
from kascade.eval import templates as T
from kascade.eval.metrics import string_match_all

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "kv",
         "copy", "sequence")
DECODE_TASKS = ("copy", "sequence")
HAYSTACKS = ("filler", "essay")
ALIASES = {"seq": "sequence"}


@dataclass
class TaskSample:
    """One task instance.

    prompt    the model input (ends without a trailing space); len(tokenizer(prompt).input_ids) == length
    target    the expected continuation: the answer (" 4721093") or the passage / sequence to produce
    answers   reference strings for string matching (retrieval tasks); empty for decode tasks
    spans     character spans in `prompt` of the facts the answer depends on (needles, assignments, the
              queried pair, the passage)
    meta      task details (keys, depths, frequencies, ...)
    """

    task: str
    seed: int
    length: int
    prompt: str
    target: str
    answers: list[str]
    spans: list[tuple[int, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def decode_heavy(self) -> bool:
        return self.task in DECODE_TASKS


class _Draft(NamedTuple):
    prompt: str
    target: str
    answers: list[str]
    spans: list[tuple[int, int]]
    meta: dict


@dataclass
class _Shape:
    """How a task grows: build(size, fine) for size in [size_min, size_max], fine in [0, fine_max]."""

    build: Callable[[int, int], _Draft]
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


class _Filler:
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


class _Essay:
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


def _niah_shape(rng, hay, n_keys, n_values, n_queries):
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
        return _Draft(prompt, target, answers, ans_spans, meta)

    return _Shape(build, size_min=0, fine_max=8, fine_grows=False, chars_per_step=1.0)


def _vt_shape(rng, hay, n_chains=1, n_hops=4):
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
        return _Draft(prompt, T.vt_answer(chains[0]), list(chains[0]), spans, meta)

    return _Shape(build, size_min=0, fine_max=8, fine_grows=False, chars_per_step=1.0)


_KV_FINE_MAX = 160  # hex characters of the extra distractor value


def _kv_shape(rng):
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
        return _Draft(prompt, " " + qvalue, [qvalue], [(a, a + len(entry))], meta)

    return _Shape(build, size_min=0, fine_max=_KV_FINE_MAX, chars_per_step=84.0)


def _cwe_shape(rng, length, count):
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
        return _Draft(prompt, " " + ", ".join(common), list(common), spans, meta)

    return _Shape(build, size_min=0, fine_max=int(8 * (freq_ucw + 1) * (per_item + 1) * 3),
                  chars_per_step=freq_ucw * 12.0)


_ZETA2 = math.pi**2 / 6


def _fwe_shape(rng, length):
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
        return _Draft(prompt, " " + ", ".join(vocab[1:4]), vocab[1:4],
                      [(len(P.FWE_PREFIX), len(P.FWE_PREFIX) + len(text))], meta)

    # at >= 80 words the counts of ranks 2..5 are strictly decreasing, so the answer is unambiguous
    return _Shape(build, size_min=80, fine_max=len(noise), chars_per_step=0.5)


def _copy_shape(rng, source: _Essay):
    def build(size, fine):
        passage = source.text(size, fine)
        prompt = T.COPY_PREFIX + passage + T.COPY_INSTRUCTION
        a = len(T.COPY_PREFIX)
        return _Draft(prompt, passage, [], [(a, a + len(passage))], {"passage_chars": size, "phase": fine})

    return _Shape(build, size_min=16, fine_max=8, fine_grows=False, chars_per_step=1.0)


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


def _sequence_shape(rng, length, count, continuation_chars):
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
        return _Draft(prompt, s[end : end + continuation_chars], [],
                      [(len(T.SEQ_PREFIX), len(prompt))], dict(meta, body_chars=size, phase=fine))

    return _Shape(build, size_min=16, fine_max=16, fine_grows=False, chars_per_step=1.0)


# ----------------------------------------------------------------------------------------------
# exact length
# ----------------------------------------------------------------------------------------------


def _largest_at_most(fn, lo: int, hi_limit: int, target: int, chars_per_token: float) -> int:
    """Largest x in [lo, hi_limit] with fn(x) <= target, for fn roughly nondecreasing and fn(lo) <= target.

    Interpolation steps (fn is close to linear) alternated with bisection once bracketed."""
    x0, f0 = lo, fn(lo)
    flo = f0
    hi = fhi = None
    rate = chars_per_token
    x = lo + max(1, int((target - flo) * rate))
    for it in range(200):
        if hi is not None and hi - lo <= 1:
            return lo
        upper = hi - 1 if hi is not None else hi_limit
        if lo >= upper:
            return lo
        x = min(max(x, lo + 1), upper, 2 * lo + 10**6)  # never leap far past what has been measured
        fx = fn(x)
        if fx <= target:
            lo, flo = x, fx
        else:
            hi, fhi = x, fx
        if hi is None:
            if fx > f0:
                rate = (x - x0) / (fx - f0)
            else:
                rate *= 2
            x = lo + max(1, int((target - flo) * rate * 1.02) + 1)
        elif it % 2 == 0 and fhi > flo:
            x = lo + int((target - flo) * (hi - lo) / (fhi - flo))
        else:
            x = (lo + hi) // 2
    return lo


def fit_length(shape: _Shape, target: int, count: Callable[[str], int], task: str = "task",
               window: int = 64) -> _Draft:
    """The draft of `shape` whose prompt has exactly `target` tokens (see the module docstring)."""
    memo: dict = {}

    def length(size, fine=0):
        if (size, fine) not in memo:
            d = shape.build(size, fine)
            memo[size, fine] = (count(d.prompt), d)
        return memo[size, fine][0]

    smallest = length(shape.size_min)
    if smallest > target:
        raise ValueError(f"length: {target} tokens is too short for task {task!r}; its smallest prompt has "
                         f"{smallest} tokens; ask for a longer length")
    size_max = shape.size_max if shape.size_max is not None else 10**12
    cpt = max(0.05, 3.0 / shape.chars_per_step)
    size = _largest_at_most(length, shape.size_min, size_max, target, cpt)
    if not shape.fine_grows or shape.fine_max == 0:
        phases = range(shape.fine_max + 1) if not shape.fine_grows else [0]
        for phase in phases:
            if phase:
                phase_len = lambda x, p=phase: length(x, p)  # noqa: E731
                if phase_len(shape.size_min) > target:
                    continue
                size = _largest_at_most(phase_len, shape.size_min, size_max, target, cpt)
            for d in range(window + 1 if phase == 0 else 17):
                for s in ((size - d, size + d) if d else (size,)):
                    if shape.size_min <= s <= size_max and length(s, phase) == target:
                        return memo[s, phase][1]
    else:
        for s in range(size, max(shape.size_min, size - 4) - 1, -1):
            fine_len = lambda f, s=s: length(s, f)  # noqa: E731
            if fine_len(0) > target:
                continue
            f = _largest_at_most(fine_len, 0, shape.fine_max, target, 2.0)
            for d in range(17):
                for ff in ((f - d, f + d) if d else (f,)):
                    if 0 <= ff <= shape.fine_max and length(s, ff) == target:
                        return memo[s, ff][1]
    if shape.size_max is not None and length(shape.size_max, shape.fine_max) < target:
        raise ValueError(f"length: {target} tokens is too long for task {task!r} (at most "
                         f"{length(shape.size_max, shape.fine_max)} tokens)")
    closest = sorted(memo.values(), key=lambda v: abs(v[0] - target))[0][0]
    raise RuntimeError(f"{task}: found no prompt of exactly {target} tokens (closest {closest}); "
                       "this tokenizer merges across the size steps; please report it")


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def token_counter(tokenizer) -> Callable[[str], int]:
    """len(tokenizer(text).input_ids): the length the model sees, special tokens included."""
    return lambda text: len(tokenizer(text).input_ids)


def canonical_task(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return name


def make_task(task: str, length: int, tokenizer, seed: int, *, haystack: str = "filler", text: str | None = None,
              continuation_chars: int = 4096) -> TaskSample:
    """One sample of `task` whose prompt is exactly `length` tokens long with `tokenizer`.

    seed: in [0, 1_000_000) (evaluation range). haystack: "filler" or "essay" (needs `text`).
    text: a long natural text (essay haystacks, `copy` passages). continuation_chars: characters of the
    expected continuation kept for `sequence`.
    """
    task = canonical_task(task)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive number of tokens, got {length!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    T.check_seed(seed, "eval")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack: expected one of {HAYSTACKS}, got {haystack!r}")
    needs_text = task == "copy" or (haystack == "essay" and task.startswith(("niah", "vt")))
    if needs_text and not text:
        raise ValueError(f"text: task {task!r} with haystack {haystack!r} needs a long text (e.g. data/heldout.txt); "
                         "pass text=... (the CLI reads --data)")
    rng = random.Random(f"kascade-eval/{task}/{seed}")
    count = token_counter(tokenizer)
    hay = _Essay(text, rng) if (haystack == "essay" and needs_text) else _Filler()
    if task == "niah_single":
        shape = _niah_shape(rng, hay, 1, 1, 1)
    elif task == "niah_multikey":
        shape = _niah_shape(rng, hay, 4, 1, 1)
    elif task == "niah_multivalue":
        shape = _niah_shape(rng, hay, 1, 4, 1)
    elif task == "niah_multiquery":
        shape = _niah_shape(rng, hay, 4, 1, 4)
    elif task == "vt":
        shape = _vt_shape(rng, hay)
    elif task == "kv":
        shape = _kv_shape(rng)
    elif task == "cwe":
        shape = _cwe_shape(rng, length, count)
    elif task == "fwe":
        shape = _fwe_shape(rng, length)
    elif task == "copy":
        shape = _copy_shape(rng, hay if isinstance(hay, _Essay) else _Essay(text, rng))
    else:
        shape = _sequence_shape(rng, length, count, continuation_chars)
    d = fit_length(shape, length, count, task)
    return TaskSample(task, seed, length, d.prompt, d.target, d.answers, d.spans, d.meta)


def expected_ids(sample: TaskSample, tokenizer, n: int) -> list[int]:
    """The first `n` token ids of `sample.target` as the tokenizer writes it after the prompt."""
    prompt_ids = tokenizer(sample.prompt).input_ids
    chars = 16 * n + 64
    while True:
        cont = sample.target[:chars]
        ids = tokenizer(sample.prompt + cont).input_ids
        if ids[: len(prompt_ids)] == prompt_ids:
            ids = ids[len(prompt_ids) :]
        else:  # the boundary merged: fall back to the continuation on its own
            ids = tokenizer(cont, add_special_tokens=False).input_ids
        if len(ids) > n + 8 or chars >= len(sample.target):
            return ids[:n]
        chars *= 2


def token_match(generated: list[int], expected: list[int]) -> float:
    """Share of the expected tokens reproduced at the same position (missing tokens count as misses)."""
    if not expected:
        return 0.0
    return sum(int(a == b) for a, b in zip(generated, expected)) / len(expected)


def max_new_tokens(sample: TaskSample, tokenizer, cap: int) -> int:
    """Tokens to generate: the answer plus 16 (retrieval tasks), `cap` for decode-heavy tasks."""
    if sample.decode_heavy:
        return cap
    return min(cap, len(tokenizer(sample.target, add_special_tokens=False).input_ids) + 16)


def score(sample: TaskSample, prediction: str, generated_ids: list[int] | None = None, tokenizer=None,
          n_expected: int | None = None) -> float:
    """Score in [0, 1]: RULER's string match (all) for retrieval tasks; per-token match for copy/sequence
    over the first `n_expected` expected tokens (default: as many as were generated; pass the number asked
    for so that an early end of sequence counts as misses)."""
    if sample.decode_heavy:
        if generated_ids is None or tokenizer is None:
            raise ValueError(f"score: task {sample.task!r} is scored per token; pass generated_ids and tokenizer")
        n = n_expected if n_expected is not None else len(generated_ids)
        return token_match(list(generated_ids), expected_ids(sample, tokenizer, max(1, n)))
    return string_match_all(prediction, sample.answers)
