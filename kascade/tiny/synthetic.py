"""Seeded generators of long synthetic documents that need long-range retrieval.

Each generator returns a :class:`Sample`: a ``prompt`` in the RULER-style
formats of :mod:`kascade.eval.templates` and the ``answer`` continuation that
a model must produce after it (for copying and sequence continuation, the
answer is the repeated text). ``Sample.spans`` are the character spans of the
facts that the answer depends on (needles, assignments, the queried pair);
tests check that the answer is really there.

Tasks (``TASKS``):

* ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``
  - needles ``"One of the special magic numbers for {key} is: {value}."`` hidden
  in a haystack;
* ``kv`` - retrieval over a JSON-like object of random hex keys and values;
* ``vt`` - variable tracking: follow chains of ``VAR X = VAR Y`` assignments;
* ``copy`` - repeat a passage verbatim;
* ``seq`` - continue a repeated or structured sequence.

Randomness: a generator draws everything from the ``random.Random`` it is
given. Use :func:`make_sample` with a seed: evaluation seeds are
``< 1_000_000`` and training seeds ``>= 1_000_000`` (see
:mod:`kascade.eval.templates`); keys are drawn from disjoint training and
evaluation pools (``split``), so no training key is ever an evaluation key.

Length: generators take a budget in characters. :func:`fit_to_tokens` turns a
token budget into a sample whose tokenised length is just below it.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from kascade.eval import templates as T

ADJECTIVES = (
    "able", "acid", "agile", "amber", "ancient", "angry", "arctic", "ashen", "bold", "brave",
    "brief", "bright", "brisk", "broad", "calm", "clever", "cold", "cosmic", "crisp", "cruel",
    "curious", "damp", "dark", "deep", "dense", "distant", "dry", "dusty", "eager", "early",
    "elder", "empty", "faint", "fair", "fancy", "fast", "fearless", "fierce", "flat", "fluffy",
    "fresh", "frozen", "gentle", "giant", "glad", "golden", "grand", "green", "grim", "happy",
    "harsh", "heavy", "hidden", "hollow", "honest", "humble", "icy", "idle", "jolly", "keen",
    "kind", "large", "late", "lazy", "light", "little", "lively", "lonely", "loud", "lucky",
    "mellow", "merry", "mighty", "misty", "modern", "narrow", "noble", "odd", "old", "pale",
    "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rich", "rough",
    "royal", "rusty", "sacred", "shy", "silent", "silver", "simple", "sleepy", "slow", "smooth",
    "soft", "solid", "sour", "spicy", "steady", "stormy", "strange", "sunny", "sweet", "swift",
    "tall", "tame", "tender", "thin", "tiny", "tired", "vast", "violet", "warm", "wicked",
    "wild", "wise", "witty", "young", "zealous", "zesty",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banner", "barrel", "basket", "beacon", "bear", "bell",
    "blade", "bridge", "brook", "bucket", "butter", "cabin", "camel", "candle", "canyon", "castle",
    "cedar", "chain", "cherry", "cliff", "cloud", "comet", "copper", "coral", "cottage", "crane",
    "crystal", "dagger", "desert", "dragon", "drum", "eagle", "ember", "falcon", "feather", "fern",
    "fiddle", "flame", "forest", "fox", "garden", "glacier", "goose", "granite", "harbor", "hawk",
    "hill", "horizon", "island", "jacket", "jungle", "kettle", "ladder", "lake", "lantern", "lemon",
    "lion", "lord", "maple", "marble", "meadow", "mirror", "monkey", "moon", "mountain", "needle",
    "oak", "ocean", "orchard", "otter", "owl", "paddle", "panther", "parrot", "pebble", "pepper",
    "pillow", "pine", "planet", "pocket", "quarry", "rabbit", "raven", "reef", "ribbon", "river",
    "rocket", "saddle", "salmon", "shadow", "shell", "spider", "spring", "star", "stone", "storm",
    "summit", "thunder", "tiger", "timber", "tower", "trumpet", "tulip", "valley", "violin", "wagon",
    "walrus", "whale", "willow", "window", "wolf", "yarn",
)


@dataclass
class Sample:
    """One generated task instance."""

    task: str
    prompt: str
    answer: str
    #: strings that the generated continuation must contain
    answers: list[str]
    #: character spans in ``prompt`` of the facts the answer depends on
    spans: list[tuple[int, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The full training document: prompt followed by its answer."""
        return self.prompt + self.answer


# --------------------------------------------------------------------------
# random atoms
# --------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _in_split(key: str, split: str) -> bool:
    return T.is_eval_key(key) == (split == "eval")


def make_key(rng: random.Random, split: str) -> str:
    """An ``adjective-noun`` key from the pool of ``split``."""
    _check_split(split)
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if _in_split(key, split):
            return key


def make_keys(rng: random.Random, n: int, split: str) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = make_key(rng, split)
        if k not in keys:
            keys.append(k)
    return keys


def magic_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def hex_uuid(rng: random.Random, split: str) -> str:
    """A random uuid-like hex string from the pool of ``split``."""
    _check_split(split)
    while True:
        h = "%032x" % rng.getrandbits(128)
        u = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if _in_split(u, split):
            return u


def var_name(rng: random.Random, split: str) -> str:
    """Five upper-case letters from the pool of ``split``."""
    _check_split(split)
    while True:
        n = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if _in_split(n, split):
            return n


# --------------------------------------------------------------------------
# haystacks
# --------------------------------------------------------------------------


class TextSource(Protocol):
    def text(self, rng: random.Random, n_chars: int) -> str:
        """About ``n_chars`` characters of natural text, starting at a line start."""


class StringSource:
    """Draws windows of a long string (e.g. ``data/heldout.txt``)."""

    def __init__(self, text: str):
        if len(text) < 1000:
            raise ValueError("source text too short")
        self._text = text

    def text(self, rng: random.Random, n_chars: int) -> str:
        t = self._text
        n_chars = min(n_chars, len(t) - 1)
        start = rng.randrange(0, len(t) - n_chars)
        nl = t.find("\n", start, start + 2000)
        if nl >= 0:
            start = nl + 1
        out = t[start:start + n_chars]
        if len(out) < n_chars:  # wrap around
            out += "\n" + t[: n_chars - len(out)]
        return out


class Haystack:
    """A haystack cut into units (sentences or lines) that needles go between."""

    #: string placed between units
    sep = " "
    name = "haystack"

    def units(self, rng: random.Random, n_chars: int) -> list[str]:
        raise NotImplementedError


class FillerHaystack(Haystack):
    """RULER's repetitive noise: ``The grass is green. The sky is blue. ...``."""

    sep = " "
    name = "filler"
    _sentences = [s.strip() + "." for s in T.FILLER.split(".") if s.strip()]

    def units(self, rng: random.Random, n_chars: int) -> list[str]:
        out: list[str] = []
        total = 0
        i = 0
        while total < n_chars:
            s = self._sentences[i % len(self._sentences)]
            out.append(s)
            total += len(s) + 1
            i += 1
        return out


class TextHaystack(Haystack):
    """Lines of real text (corpus or held-out essay text)."""

    sep = "\n"
    name = "essay"

    def __init__(self, source: TextSource):
        self.source = source

    def units(self, rng: random.Random, n_chars: int) -> list[str]:
        text = self.source.text(rng, max(0, n_chars))
        lines = text.split("\n")
        # glue short lines so that needles land between reasonable chunks
        out: list[str] = []
        cur: list[str] = []
        size = 0
        for line in lines:
            cur.append(line)
            size += len(line) + 1
            if size >= 60:
                out.append("\n".join(cur))
                cur, size = [], 0
        if cur:
            out.append("\n".join(cur))
        return out


def _assemble(parts: list[tuple[str, bool]], sep: str) -> tuple[str, list[tuple[int, int]]]:
    """Join ``parts`` with ``sep``; return the text and the spans of flagged parts."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, (p, flagged) in enumerate(parts):
        if i:
            pieces.append(sep)
            pos += len(sep)
        if flagged:
            spans.append((pos, pos + len(p)))
        pieces.append(p)
        pos += len(p)
    return "".join(pieces), spans


def _insert(rng: random.Random, units: list[str], facts: list[str], ordered: bool,
            depths: Sequence[float] | None = None) -> list[tuple[str, bool]]:
    """Insert ``facts`` between ``units``; keep their order if ``ordered``."""
    n = len(units)
    if depths is not None:
        pos = [min(n, max(0, round(d * n))) for d in depths]
    else:
        pos = [rng.randint(0, n) for _ in facts]
    if ordered:
        pos.sort()
    slots: dict[int, list[str]] = {}
    for p, f in zip(pos, facts):
        slots.setdefault(p, []).append(f)
    parts: list[tuple[str, bool]] = []
    for i in range(n + 1):
        for f in slots.get(i, []):
            parts.append((f, True))
        if i < n:
            parts.append((units[i], False))
    return parts


# --------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------


def niah(rng: random.Random, haystack: Haystack, n_chars: int, split: str,
         n_keys: int = 1, n_values: int = 1, n_queries: int = 1,
         depths: Sequence[float] | None = None, task: str | None = None) -> Sample:
    """Needle in a haystack.

    ``n_keys`` keys each hide one number (the queried ones ``n_values``
    numbers); the first ``n_queries`` keys are asked for. ``depths`` (0..1),
    one per needle, fix the needle positions; by default they are random.
    """
    if n_queries > n_keys:
        raise ValueError("n_queries > n_keys")
    keys = make_keys(rng, n_keys, split)
    queried = keys[:n_queries]
    values: dict[str, list[str]] = {}
    used: set[str] = set()
    for i, k in enumerate(keys):
        vs: list[str] = []
        for _ in range(n_values if i < n_queries else 1):
            v = magic_number(rng)
            while v in used:
                v = magic_number(rng)
            used.add(v)
            vs.append(v)
        values[k] = vs
    needles = [(k, v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    needle_text = [T.niah_needle(k, v) for k, v in needles]
    budget = n_chars - len(T.NIAH_PREFIX) - 200 - sum(len(s) + 1 for s in needle_text)
    units = haystack.units(rng, max(0, budget))
    parts = _insert(rng, units, needle_text, ordered=False, depths=depths)
    context, spans = _assemble(parts, haystack.sep)
    in_text = _order_by_position(parts, needles, needle_text)
    # list the values of each key in their order of appearance
    for k in keys:
        values[k] = [v for kk, v in in_text if kk == k]
    multi = n_values > 1 or n_queries > 1
    question = T.niah_question(queried, multi=multi)
    prompt = T.NIAH_PREFIX + context + "\n" + question
    off = len(T.NIAH_PREFIX)
    spans = [(a + off, b + off) for a, b in spans]
    answers = [v for k in queried for v in values[k]]
    answer = T.answer_list(answers) if multi else " " + answers[0]
    if task is None:
        task = ("niah_multiquery" if n_queries > 1 else "niah_multivalue" if n_values > 1
                else "niah_multikey" if n_keys > 1 else "niah_single")
    # spans of the needles that hold an answer
    answer_spans = [s for s, (k, v) in zip(spans, in_text) if k in queried]
    return Sample(task, prompt, answer, answers, answer_spans,
                  {"keys": keys, "queried": queried, "values": values, "haystack": haystack.name,
                   "depths": [s[0] / max(1, len(prompt)) for s in answer_spans]})


def _order_by_position(parts, needles, needle_text):
    """Needles ``(key, value)`` in the order they appear in ``parts``."""
    lookup = {t: kv for t, kv in zip(needle_text, needles)}
    return [lookup[p] for p, flagged in parts if flagged]


def kv_retrieval(rng: random.Random, n_chars: int, split: str) -> Sample:
    """Find the value of one key in a JSON-like object of random uuid keys/values."""
    per_pair = 84  # len('"<36>": "<36>",\n')
    n_pairs = max(2, (n_chars - len(T.KV_PREFIX) - 120) // per_pair)
    pairs = [(hex_uuid(rng, split), hex_uuid(rng, split)) for _ in range(n_pairs)]
    qi = rng.randrange(n_pairs)
    key, value = pairs[qi]
    obj = T.kv_object(pairs)
    prompt = T.KV_PREFIX + obj + "\n\n" + T.kv_question(key)
    entry = T.kv_pair(key, value)
    start = prompt.index(entry)
    return Sample("kv", prompt, " " + value, [value], [(start, start + len(entry))],
                  {"n_pairs": n_pairs, "index": qi, "depths": [start / len(prompt)]})


def variable_tracking(rng: random.Random, haystack: Haystack, n_chars: int, split: str,
                      n_chains: int = 1, n_hops: int = 4, n_questions: int = 1) -> Sample:
    """Variable tracking: chains ``VAR A = 12345`` -> ``VAR B = VAR A`` -> ...

    The first chain is asked for; the other ``n_chains - 1`` chains (other
    values) are distractors. Statements of a chain appear in chain order.
    With ``n_questions > 1`` (training documents), the answer goes on with
    further questions about the other chains, one per line; ``answers`` and
    ``spans`` always refer to the first question.
    """
    n_questions = max(1, min(n_questions, n_chains))
    names: list[str] = []
    while len(names) < n_chains * (n_hops + 1):
        v = var_name(rng, split)
        if v not in names:
            names.append(v)
    values: list[str] = []
    while len(values) < n_chains:
        v = magic_number(rng, 5)
        if v not in values:
            values.append(v)
    chains = [names[c * (n_hops + 1):(c + 1) * (n_hops + 1)] for c in range(n_chains)]
    statements: list[tuple[int, str]] = []  # (chain, text)
    for c, chain in enumerate(chains):
        statements.append((c, T.vt_assign(chain[0], value=values[c])))
        for a, b in zip(chain[:-1], chain[1:]):
            statements.append((c, T.vt_assign(b, source=a)))
    budget = n_chars - len(T.VT_PREFIX) - 200 - sum(len(s) + 1 for _, s in statements)
    units = haystack.units(rng, max(0, budget))
    n = len(units)
    # positions: each chain ordered, chains interleaved
    per_chain_pos = [sorted(rng.randint(0, n) for _ in chain) for chain in chains]
    slots: dict[int, list[tuple[int, str]]] = {}
    k = 0
    for c, chain in enumerate(chains):
        for j in range(len(chain)):
            slots.setdefault(per_chain_pos[c][j], []).append((c, statements[k][1]))
            k += 1
    parts: list[tuple[str, bool]] = []
    for i in range(n + 1):
        for c, s in slots.get(i, []):
            parts.append((s, c == 0))
        if i < n:
            parts.append((units[i], False))
    context, spans = _assemble(parts, haystack.sep)
    prompt = T.VT_PREFIX + context + "\n" + T.vt_question(values[0])
    off = len(T.VT_PREFIX)
    spans = [(a + off, b + off) for a, b in spans]
    answer = T.vt_answer(chains[0])
    for c in range(1, n_questions):
        answer += "\n" + T.vt_question(values[c]) + T.vt_answer(chains[c])
    return Sample("vt", prompt, answer, list(chains[0]), spans,
                  {"value": values[0], "chains": chains, "values": values, "haystack": haystack.name})


def copy_passage(rng: random.Random, source: TextSource, n_chars: int) -> Sample:
    """A passage, an instruction to repeat it, and its verbatim copy (the answer)."""
    plen = max(20, (n_chars - len(T.COPY_PREFIX) - len(T.COPY_INSTRUCTION)) // 2)
    passage = source.text(rng, plen).strip("\n") or "empty"
    prompt = T.COPY_PREFIX + passage + T.COPY_INSTRUCTION
    start = len(T.COPY_PREFIX)
    return Sample("copy", prompt, passage, [passage], [(start, start + len(passage))], {})


def sequence_continuation(rng: random.Random, n_chars: int, split: str) -> Sample:
    """A repeated random segment, or a structured numbered list, to be continued.

    The answer is the last part of the sequence (about 15%), which is fully
    determined by the text before it.
    """
    kind = rng.choice(["repeat", "repeat", "table"])
    if kind == "repeat":
        atoms = rng.choice(["words", "numbers", "hex", "mixed"])
        m = rng.randint(8, 200)
        items = []
        for _ in range(m):
            a = atoms if atoms != "mixed" else rng.choice(["words", "numbers", "hex"])
            if a == "words":
                items.append(make_key(rng, split))
            elif a == "numbers":
                items.append(magic_number(rng, rng.randint(2, 7)))
            else:
                items.append("%06x" % rng.getrandbits(24))
        sep = rng.choice([" ", ", ", "\n", " | "])
        segment = sep.join(items)
        reps = max(2, n_chars // (len(segment) + len(sep)))
        body = sep.join([segment] * reps)
        body = body[: max(len(segment) * 2, n_chars - len(T.SEQ_PREFIX))]
    else:
        start, step = rng.randint(0, 9000), rng.randint(1, 97)
        label = make_key(rng, split)
        lines = []
        total = 0
        i = 0
        while total < n_chars - len(T.SEQ_PREFIX):
            line = f"{label} {i + 1:05d}: {start + i * step}"
            lines.append(line)
            total += len(line) + 1
            i += 1
        body = "\n".join(lines)
    cut = int(len(body) * 0.85)
    # cut at a separator so the answer starts at a clean boundary
    for ch in ("\n", " "):
        j = body.rfind(ch, 0, cut)
        if j > len(body) // 2:
            cut = j
            break
    prompt = T.SEQ_PREFIX + body[:cut]
    answer = body[cut:]
    return Sample("seq", prompt, answer, [answer], [(len(T.SEQ_PREFIX), len(prompt))], {"kind": kind})


TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "kv", "vt", "copy", "seq")

#: default sampling weights of the training mixture
TRAIN_WEIGHTS = {
    "niah_single": 0.22, "niah_multikey": 0.12, "niah_multivalue": 0.10, "niah_multiquery": 0.10,
    "kv": 0.10, "vt": 0.18, "copy": 0.10, "seq": 0.08,
}


def make_sample(task: str, seed: int, n_chars: int, split: str, *,
                filler: Haystack | None = None, essay: TextSource | None = None,
                haystack: str | None = None, **kw) -> Sample:
    """Build one sample of ``task`` deterministically from ``seed``.

    ``haystack`` picks ``"filler"`` or ``"essay"`` (the latter needs
    ``essay``, a :class:`TextSource`); by default it is drawn from the seed.
    Extra keyword arguments go to the generator (``depths``, ``n_hops``...).
    """
    T.check_seed(seed, split)
    rng = random.Random(seed)
    filler = filler or FillerHaystack()
    if haystack is None:
        haystack = "essay" if (essay is not None and rng.random() < 0.5) else "filler"
    if haystack == "essay":
        if essay is None:
            raise ValueError("essay haystack needs a text source")
        hay: Haystack = TextHaystack(essay)
    else:
        hay = filler
    if task == "niah_single":
        return niah(rng, hay, n_chars, split, **kw)
    if task == "niah_multikey":
        kw.setdefault("n_keys", rng.randint(2, 6))
        return niah(rng, hay, n_chars, split, task=task, **kw)
    if task == "niah_multivalue":
        kw.setdefault("n_values", rng.randint(2, 4))
        return niah(rng, hay, n_chars, split, task=task, **kw)
    if task == "niah_multiquery":
        nq = kw.pop("n_queries", rng.randint(2, 4))
        kw.setdefault("n_keys", nq + rng.randint(0, 2))
        return niah(rng, hay, n_chars, split, n_queries=nq, task=task, **kw)
    if task == "kv":
        return kv_retrieval(rng, n_chars, split)
    if task == "vt":
        kw.setdefault("n_chains", rng.randint(1, 3))
        kw.setdefault("n_hops", rng.randint(2, 5))
        if split == "train" and "n_questions" not in kw and rng.random() < 0.7:
            kw["n_questions"] = kw["n_chains"]
        return variable_tracking(rng, hay, n_chars, split, **kw)
    if task == "copy":
        if essay is None:
            raise ValueError("copy needs a text source")
        return copy_passage(rng, essay, n_chars)
    if task == "seq":
        return sequence_continuation(rng, n_chars, split)
    raise ValueError(f"unknown task {task!r}")


def fit_to_tokens(build: Callable[[int], Sample], n_tokens: int, count: Callable[[str], int],
                  chars_per_token: float = 3.0, low: float = 0.92, max_iter: int = 6) -> tuple[Sample, int]:
    """Rebuild with adjusted character budgets until the token length of
    ``sample.text`` lies in ``[low * n_tokens, n_tokens]``.

    ``build(n_chars)`` must be deterministic (build from a fixed seed).
    Returns ``(sample, n_tokens_of_text)``; the result never exceeds
    ``n_tokens`` (budgets shrink until it fits).
    """
    chars = int(n_tokens * chars_per_token * 0.97)
    best: tuple[Sample, int] | None = None
    for _ in range(max_iter):
        s = build(chars)
        t = count(s.text)
        if t <= n_tokens:
            if best is None or t > best[1]:
                best = (s, t)
            if t >= low * n_tokens:
                return s, t
        ratio = n_tokens / max(1, t)
        chars = max(50, int(chars * ratio * (0.985 if t > n_tokens else 0.995)))
    while best is None:
        chars = max(50, int(chars * 0.8))
        s = build(chars)
        t = count(s.text)
        if t <= n_tokens or chars <= 50:
            best = (s, t)
    return best
