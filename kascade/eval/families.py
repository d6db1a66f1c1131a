"""Evaluation families beyond prose needles: server-log records, JSON records, tables, code, several
documents, and a long chat history (tasks of `kascade.eval.tasks`).

Why: a plan can keep its accuracy on the prose needles and still lose structured retrieval, where many
near-identical items differ only in a key and a few values. Each task here is one retrieval of a short
answer string (a number, a code, a date, a name), scored by the string match of the other
retrieval tasks:

    records       key=value server-log lines; the value of one field of the line with a given request id
    log_lookup    key=value server-log lines, near-identical; the short token (a pronounceable word) that one
                  line, the one with a given request id, carries right after its id (family "records")
    json_records  JSON objects of one schema (array, JSON lines or indented); one field of the object with an id
    table         a CSV or markdown table; the cell found by a row key and a column name
    code          a Python file of generated classes; the value one named class gives a class attribute
    multi_doc     short numbered documents with titles; a fact stated in one named document
    chat_history  a multi-turn chat in the model's own template; a code the user gave in one turn, asked for
                  in the last turn (codes of other kinds given in other turns)

Layout. Every item has a key (request id, object id, row key, class name, document title) and shares
most of its other values with the rest. The asked field (column, constant, fact kind) is carried by a few
items only, `CARRIERS` (3 to 6, seeded) whatever the length, at seeded depths over the whole context; the
queried item is one of them. log_lookup has one carrier, the queried line (its head says that one line
carries the field), so that the model it is meant for retrieves it densely (below). The answer follows the
key in the queried item (the asked field comes right after the key field, the row key's cell, the class
line, the fact names its subject). The queried key and the answer occur exactly once in the data (filler
items that would hold either are drawn again; the question names the key once more).

Why so: SmolLM2-135M-Instruct, dense, retrieves a value among near-identical lines only by copying what
follows the key; on dev seeds (>= 900_000), 40 log lines: 5/6 with 8 lines carrying the asked field right
after the key and the answer prefix restating "req=<id> session=", 0-1/6 when all lines carry it, when the
field is two fields away, or with an answer prefix "The session of ... is".
log_lookup (dev seeds, 4096 tokens, about 60 lines; some first variants at 2048): with every line carrying
a token after its id, 0-2/8 whatever the id (hex, pronounceable), the token (codes, words) or the answer
prefix (the key, the line's fields, the whole line); with the queried line alone carrying it, 5/8 for codes
("AA-Dd", hex), 8/8 then 7/12 for two-syllable words, 4/8 with 3-6 other lines carrying other fields; with
the head naming the field, 20/24; with three-syllable words (fewer English look-alikes: "dupu" came back as
"dupe"), 22/24.

Prompts end with the question and an answer prefix that restates the data's own text up to the answer
("... Answer: the line reads rid=0c9e51f2 session="); the target is what the data writes after it (" 48213"
or, after "=" or ",", "48213"). chat_history ends with the chat template's generation prompt; its last user
turn asks the assistant to start with "Your <kind> is", and its target is that sentence with the code.

What varies with the seed: the wording around the data and of the question (several templates each), field,
column and constant names (pools), the schema, the format, the values, the number of items (the length),
the carriers and the depth of the queried item (uniform, first to last).

Exact length: each family is a `generators.Shape` whose size is the number of filler items and whose fine
knob is the length in characters of a trailing note (a log line's message, a last JSON object's note, a
table's footnote, a closing comment, an archive note, the end of the last assistant turn), cut from a
seeded run of phrases; `tasks.fit_length` searches both.

Wording: every fixed string (templates, name pools, phrase pools) is a module-level constant here, and
`family_wording()` lists them, so that calibration prompts of the same kinds can be checked to share none
of them. `FAMILY` names the family of each task (the task's own name; calibration formats map onto these).
`CONVENTIONS` are the format conventions (HTTP methods, status codes, log levels, months) any such data
uses; they are not wording.
"""

from __future__ import annotations

import datetime
import json
import random
import string
import textwrap
from typing import Callable

from kascade.eval.generators import Draft, Shape, _WordPool

#: task -> family (the calibration side maps its own formats onto these names; log_lookup is a records task)
FAMILY = {"records": "records", "log_lookup": "records", "json_records": "json_records", "table": "table",
          "code": "code", "multi_doc": "multi_doc", "chat_history": "chat_history"}
FAMILY_TASKS = tuple(FAMILY)
CHAT_FAMILY_TASKS = ("chat_history",)
#: how many items carry the asked field, the queried one included (seeded, whatever the length)
CARRIERS = (3, 6)

# ----------------------------------------------------------------------------------------------
# value patterns, conventions, shared machinery
# ----------------------------------------------------------------------------------------------

_PATTERN_CHARS = {"A": "ABCDEFGHJKLMNPQRSTUVWXYZ", "d": string.digits, "D": "123456789", "x": "0123456789abcdef"}


class Pat(str):
    """A value pattern (see `_pattern`), marked so that `family_wording` leaves it out."""


CONVENTIONS = ("GET", "POST", "PUT", "DELETE", "INFO", "WARN", "DEBUG", "ERROR", "200", "201", "204", "304",
               "400", "404", "500", "503", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
               "Nov", "Dec")
_METHODS = (("GET", 12), ("POST", 4), ("PUT", 1), ("DELETE", 1))
_STATUSES = (("200", 20), ("201", 2), ("204", 2), ("304", 2), ("400", 1), ("404", 2), ("500", 1), ("503", 1))
_LEVELS = (("INFO", 14), ("WARN", 2), ("DEBUG", 3), ("ERROR", 1))
_MONTHS = CONVENTIONS[-12:]


def _pick(rng, *pools) -> list[int]:
    """A seeded index into each pool (which head, question and answer template a sample uses)."""
    return [rng.randrange(len(p)) for p in pools]


def _weighted(rng, pairs):
    return rng.choices([v for v, _ in pairs], weights=[w for _, w in pairs])[0]


def _pattern(rng, pat: str) -> str:
    """A random value of a pattern: A upper-case letter, d digit, D non-zero digit, x hex digit, else literal."""
    return "".join(rng.choice(_PATTERN_CHARS[c]) if c in _PATTERN_CHARS else c for c in pat)


def _names(rng, n, syllables=(2, 3)):
    """n distinct capitalised pronounceable names."""
    return [w.capitalize() for w in _WordPool(rng, syllables).take(0, n)]


class _Stream:
    """Items of one sample drawn on demand from their own generator (item i depends only on the seed). An
    item whose text contains a banned string (the queried key or the answer) is drawn again, so those occur
    once in the prompt."""

    def __init__(self, rng, make: Callable, text: Callable, banned):
        self.rng = random.Random(rng.getrandbits(64))
        self.make, self.text, self.banned, self.items = make, text, [b for b in banned if b], []

    def __getitem__(self, i):
        while len(self.items) <= i:
            for _ in range(10_000):
                item = self.make(self.rng)
                t = self.text(item)
                if not any(b in t for b in self.banned):
                    self.items.append(item)
                    break
            else:  # pragma: no cover - the pools make this practically impossible
                raise RuntimeError("families: no item avoids the queried key and answer")
        return self.items[i]


class _Layout:
    """Where the carriers go: the queried item and CARRIERS-1 other carriers at seeded depths among `size`
    filler items. place(size) -> (items, index of the queried item)."""

    def __init__(self, rng, query, carriers: _Stream, fillers: _Stream, n: int | None = None):
        n = n or rng.randint(*CARRIERS)
        self.depths = [rng.random() for _ in range(n)]  # [0]: the queried item
        self.carried = [query] + [carriers[i] for i in range(n - 1)]
        self.fillers = fillers

    def place(self, size: int):
        order = sorted(range(len(self.depths)), key=lambda i: (self.depths[i], i))
        items, prev, qi = [], 0, 0
        for i in order:
            at = max(prev, min(size, int(self.depths[i] * (size + 1))))
            items += [self.fillers[j] for j in range(prev, at)]
            if i == 0:
                qi = len(items)
            items.append(self.carried[i])
            prev = at
        items += [self.fillers[j] for j in range(prev, size)]
        return items, qi


def _fresh(draw: Callable[[], str], taken: set) -> str:
    """A key from draw() not drawn before (keys are distinct within a sample)."""
    for _ in range(100_000):
        k = draw()
        if k not in taken:
            taken.add(k)
            return k
    raise RuntimeError(f"families: no fresh key left after {len(taken)}; the pool of keys is too small")


def _tail_text(rng, pool, sep: str, chars: int = 2400) -> str:
    """A seeded run of phrases from `pool`, at least `chars` long: the fine length knob is a prefix of it."""
    out: list[str] = []
    while len(sep.join(out)) < chars:
        out.append(rng.choice(pool))
    return sep.join(out)


def _cut(text: str, fine: int) -> str:
    return text[:fine].rstrip(" ,;")


class _Clock:
    """Log timestamps: clock(p) is the time of line p, a seeded start in `year` plus seeded gaps of 0.01-4 s,
    in one of three styles (0: ISO 8601 with milliseconds, 1: "YYYY-MM-DD hh:mm:ss,mmm", 2: an access log's
    "[dd/Mon/YYYY:hh:mm:ss +0000]")."""

    def __init__(self, rng, style: int, year: int):
        self.style = style
        self.base = datetime.datetime(year, rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23),
                                      rng.randint(0, 59))
        self.gaps_rng, self.offsets = random.Random(rng.getrandbits(64)), [0.0]

    def __call__(self, p: int) -> str:
        while len(self.offsets) <= p:
            self.offsets.append(self.offsets[-1] + self.gaps_rng.uniform(0.01, 4.0))
        t = self.base + datetime.timedelta(seconds=self.offsets[p])
        ms = t.microsecond // 1000
        if self.style == 0:
            return f"{t:%Y-%m-%dT%H:%M:%S}.{ms:03d}Z"
        if self.style == 1:
            return f"{t:%Y-%m-%d %H:%M:%S},{ms:03d}"
        return f"[{t.day:02d}/{_MONTHS[t.month - 1]}/{t.year}:{t:%H:%M:%S} +0000]"


def _check_once(prompt: str, data: str, key: str, answer: str, task: str):
    if data.count(key) != 1 or prompt.count(answer) != 1:  # pragma: no cover - guarded by _Stream
        raise RuntimeError(f"{task}: the key or the answer does not occur exactly once; please report it")


def _filler_line(stamp: str, level_kv: bool, level_name: str, service_name: str, service: str, msg_name: str,
                 text: str, fine: int) -> str | None:
    """The last log line, an INFO message cut to `fine` characters that sets the prompt's exact length (None
    when `fine` is 0: no such line)."""
    if not fine:
        return None
    lvl = f"{level_name}=INFO" if level_kv else "INFO"
    return f'{stamp} {lvl} {service_name}={service} {msg_name}="{_cut(text, fine)}"'


def _log_prompt(task, head, lines, qi, question, key, answer, filler):
    """(prompt, character span of line `qi`) of a log: head, the lines (and the filler line, if any), the
    question; the answer checked to occur once, in its line."""
    body = "\n".join(lines + ([filler] if filler else []))
    prompt = head + body + "\n\n" + question
    _check_once(prompt, body, key, answer, task)
    a = len(head) + sum(len(x) + 1 for x in lines[:qi])
    return prompt, (a, a + len(lines[qi]))


def _draft(task, prompt, target, answer, key, span, size, qi, n_carriers, **meta):
    meta = dict({"family": FAMILY[task], "n_items": size + n_carriers, "index": qi, "carriers": n_carriers,
                 "key": key, "answer": answer, "depths": [round(span[0] / len(prompt), 4)]}, **meta)
    return Draft(prompt, target, [answer], [span], meta)


# ----------------------------------------------------------------------------------------------
# records: key=value server-log lines
# ----------------------------------------------------------------------------------------------

REC_HEADS = (
    "The following is an extract from the server log of the {system} platform. Each line records one request.",
    "Below are raw access-log lines written by the {system} cluster, one request per line.",
    "Here is a dump of the {system} request journal; every line describes a single request with key=value fields.",
    "Output of the {system} backend follows. One line per handled request.",
)
REC_QUESTIONS = (
    "Question: What is the {field} value in the line with {key_name}={key}?",
    "Find the line whose {key_name} is {key}. What does its {field} field say?",
    "Which {field} was noted for the request with {key_name}={key}?",
    "Look up request {key} ({key_name}) in the lines above and report its {field}.",
)
REC_ANSWERS = ("Answer: {key_name}={key} {field}=", "Answer: the line ends {key_name}={key} {field}=",
               "Answer: That request has {key_name}={key} {field}=")
REC_KEY_NAMES = ("req", "request_id", "rid", "req_id", "trace_id")
REC_LEVEL_NAMES = ("level", "lvl", "severity")
REC_SERVICE_NAMES = ("svc", "service", "app", "component")
REC_SERVICES = ("checkout", "billing", "search", "auth", "inventory", "gateway", "ledger", "notify", "catalog",
                "payments", "profile", "shipping")
REC_HOST_NAMES = ("host", "pod", "instance", "server")
REC_HOST_STEMS = ("web", "api", "edge", "worker", "app")
REC_METHOD_NAMES = ("method", "verb", "http_method")
REC_PATH_NAMES = ("path", "route", "endpoint", "uri")
REC_PATHS = ("/api/v2/orders", "/api/v2/cart", "/login", "/api/v1/items", "/healthz", "/api/v2/search",
             "/static/app.js", "/api/v1/users/me", "/api/v1/invoices", "/api/v2/reviews")
REC_STATUS_NAMES = ("status", "http_status", "code")
REC_LATENCY_NAMES = ("latency_ms", "duration_ms", "elapsed_ms", "took_ms")
# asked fields, carried by a few lines only: (name pool, value pattern)
REC_ASKED = (
    (("session", "sess", "sid", "session_id"), Pat("AAdAAd")),
    (("user", "uid", "account", "customer"), Pat("uDdddd")),
    (("retry_after", "backoff_ms", "wait_ms"), Pat("Dddd")),
    (("coupon", "promo", "voucher"), Pat("AAAA-Ddd")),
    (("error_id", "err", "fault"), Pat("E-xxxxx")),
    (("cart_total", "amount", "charged"), Pat("Ddd.dd")),
)
REC_MSG_NAMES = ("msg", "message", "note")
REC_TAIL_SERVICES = ("logrotate", "janitor", "compactor", "scheduler")
REC_TAIL_PHRASES = ("compaction finished", "segments merged", "retention window applied", "cache warmed",
                    "checkpoint written", "replica caught up", "old shards pruned", "index refreshed",
                    "queue drained", "lease renewed", "buffers flushed", "config reloaded", "snapshot taken",
                    "stale locks cleared", "metrics exported")


def records_shape(rng) -> Shape:
    """Server-log lines of key=value fields; asks for one field (carried by a few lines, right after the
    request id) of the line with a given request id."""
    system = _names(rng, 1, (3,))[0]
    head_i, q_i, a_i = _pick(rng, REC_HEADS, REC_QUESTIONS, REC_ANSWERS)
    head = REC_HEADS[head_i].format(system=system) + "\n\n"
    key_name = rng.choice(REC_KEY_NAMES)
    services = rng.sample(REC_SERVICES, rng.randint(2, 4))
    hosts = [f"{s}-{rng.randint(1, 12):02d}" for s in rng.sample(REC_HOST_STEMS, 2) for _ in range(2)]
    paths = rng.sample(REC_PATHS, rng.randint(3, 6))
    names, pat = rng.choice(REC_ASKED)
    field = rng.choice(names)
    service_name = rng.choice(REC_SERVICE_NAMES)
    shared = [(service_name, "service"), (rng.choice(REC_HOST_NAMES), "host"),
              (rng.choice(REC_METHOD_NAMES), "method"), (rng.choice(REC_PATH_NAMES), "path"),
              (rng.choice(REC_STATUS_NAMES), "status"), (rng.choice(REC_LATENCY_NAMES), "latency")]
    shared = rng.sample(shared, 3)  # three shared fields, then the request id (and the asked field)
    level_kv, level_name, ts_style = rng.random() < 0.5, rng.choice(REC_LEVEL_NAMES), rng.randrange(3)
    year = rng.randint(2022, 2025)
    taken: set = set()

    def make(r, carrier=False):
        k = _fresh(lambda: _pattern(r, "xxxxxxxx"), taken)
        return {"level": _weighted(r, _LEVELS), "service": r.choice(services), "host": r.choice(hosts),
                "key": k, "method": _weighted(r, _METHODS), "path": r.choice(paths),
                "status": _weighted(r, _STATUSES), "latency": str(r.randint(3, 2400)),
                "asked": _pattern(r, pat) if carrier else None}

    def fields_text(rec):
        parts = [f"{n}={rec[k]}" for n, k in shared]
        key_part = f"{key_name}={rec['key']}" + (f" {field}={rec['asked']}" if rec["asked"] else "")
        return " ".join(parts + [key_part])

    while True:  # the answer occurs once in its line and nowhere in the head or the question
        query = make(rng, carrier=True)
        key, answer = query["key"], query["asked"]
        question = REC_QUESTIONS[q_i].format(field=field, key_name=key_name, key=key) + "\n" + \
            REC_ANSWERS[a_i].format(field=field, key_name=key_name, key=key)
        if fields_text(query).count(answer) == 1 and answer not in question + head and str(year) not in answer:
            break
    banned = [key, answer]
    layout = _Layout(rng, query, _Stream(rng, lambda r: make(r, True), fields_text, banned),
                     _Stream(rng, make, fields_text, banned))
    ts = _Clock(rng, ts_style, year)
    tail_svc, tail_msg = rng.choice(REC_TAIL_SERVICES), rng.choice(REC_MSG_NAMES)
    tail = _tail_text(rng, REC_TAIL_PHRASES, "; ")

    def line(p, rec):
        lvl = f"{level_name}={rec['level']}" if level_kv else rec["level"]
        return f"{ts(p)} {lvl} {fields_text(rec)}"

    def build(size, fine):
        items, qi = layout.place(size)
        lines = [line(p, rec) for p, rec in enumerate(items)]
        filler = _filler_line(ts(len(items)), level_kv, level_name, service_name, tail_svc, tail_msg, tail, fine)
        prompt, span = _log_prompt("records", head, lines, qi, question, key, answer, filler)
        return _draft("records", prompt, answer, answer, key, span, size, qi, len(layout.depths), field=field,
                      key_name=key_name, template=q_i, answer_template=a_i, head=head_i)

    return Shape(build, size_min=0, fine_max=len(tail), chars_per_step=150.0)


# ----------------------------------------------------------------------------------------------
# log_lookup: one short token in one of many near-identical server-log lines
# ----------------------------------------------------------------------------------------------

LOG_HEADS = (
    "Below is an excerpt of the {system} service log, one request per line. One of the requests also carries a "
    "{field}.",
    "The {system} gateway wrote the following lines, each for a single request; one of them has a {field} as well.",
    "Log of the {system} deployment follows: one handled request per line, in key=value fields. A single line adds "
    "a {field}.",
    "Here are request lines of the {system} cluster, copied from its log files. Exactly one line also holds a {field}.",
)
LOG_QUESTIONS = (
    "Question: Which {field} does the line with {key_name}={key} carry?",
    "Search the log for {key_name}={key}. What {field} is written on that line?",
    "What {field} was logged for the request {key}?",
    "Give the {field} of request {key} as it appears in the log.",
)
LOG_ANSWERS = ("Answer: the line reads {line}", "Answer: {line}", "Answer: That line is {line}")
LOG_TOKEN_NAMES = ("tag", "label", "marker", "alias", "codename", "nickname", "handle", "keyword")


def log_lookup_shape(rng) -> Shape:
    """Near-identical server-log lines of key=value fields, each with its own request id; one line (the
    queried one, at a uniform depth) also carries a short token (a pronounceable word) right after its
    request id. Asks for that token by the line's request id; the answer prefix restates the line from its
    level up to the token."""
    system = _names(rng, 1, (3,))[0]
    field = rng.choice(LOG_TOKEN_NAMES)
    head_i, q_i, a_i = _pick(rng, LOG_HEADS, LOG_QUESTIONS, LOG_ANSWERS)
    head = LOG_HEADS[head_i].format(system=system, field=field) + "\n\n"
    key_name = rng.choice(REC_KEY_NAMES)
    services = rng.sample(REC_SERVICES, rng.randint(2, 4))
    hosts = [f"{s}-{rng.randint(1, 12):02d}" for s in rng.sample(REC_HOST_STEMS, 2) for _ in range(2)]
    paths = rng.sample(REC_PATHS, rng.randint(3, 6))
    service_name = rng.choice(REC_SERVICE_NAMES)
    shared = [(service_name, "service"), (rng.choice(REC_HOST_NAMES), "host"),
              (rng.choice(REC_METHOD_NAMES), "method"), (rng.choice(REC_PATH_NAMES), "path"),
              (rng.choice(REC_STATUS_NAMES), "status"), (rng.choice(REC_LATENCY_NAMES), "latency")]
    shared = rng.sample(shared, 4)
    n_after = rng.randint(0, 1)  # shared fields after the request id (and the token)
    before, after = shared[: 4 - n_after], shared[4 - n_after:]
    level_kv, level_name = rng.random() < 0.5, rng.choice(REC_LEVEL_NAMES)
    clock = _Clock(rng, rng.randrange(3), rng.randint(2022, 2025))
    tail_svc, tail_msg = rng.choice(REC_TAIL_SERVICES), rng.choice(REC_MSG_NAMES)
    tail = _tail_text(rng, REC_TAIL_PHRASES, "; ")
    taken: set = set()

    def make(r, token=None):
        return {"level": _weighted(r, _LEVELS), "service": r.choice(services), "host": r.choice(hosts),
                "key": _fresh(lambda: _pattern(r, "xxxxxxxx"), taken), "method": _weighted(r, _METHODS),
                "path": r.choice(paths), "status": _weighted(r, _STATUSES), "latency": str(r.randint(3, 2400)),
                "token": token}

    def fields_text(rec, upto=False):  # the line after its timestamp; upto: up to the token
        lvl = f"{level_name}={rec['level']}" if level_kv else rec["level"]
        parts = [lvl] + [f"{n}={rec[k]}" for n, k in before] + [f"{key_name}={rec['key']}"]
        if upto:
            return " ".join(parts) + f" {field}="
        if rec["token"] is not None:
            parts.append(f"{field}={rec['token']}")
        return " ".join(parts + [f"{n}={rec[k]}" for n, k in after])

    # every fixed string of the sample: the answer must not be part of any of them
    fixed = " ".join([head, tail, service_name, tail_svc, tail_msg, level_name, key_name, field, *services, *hosts,
                      *paths, *(n for n, _ in shared), *CONVENTIONS])
    while True:  # the answer occurs once in its line and nowhere in the fixed text or the question
        query = make(rng, _WordPool(rng, (3,))[0])
        key, answer = query["key"], query["token"]
        question = LOG_QUESTIONS[q_i].format(field=field, key_name=key_name, key=key) + "\n" + \
            LOG_ANSWERS[a_i].format(line=fields_text(query, upto=True))
        if fields_text(query).count(answer) == 1 and answer not in question + fixed:
            break
    banned = [key, answer]
    # n=1: the queried line is the only carrier (the first stream, of carriers, is never read)
    layout = _Layout(rng, query, _Stream(rng, make, fields_text, banned), _Stream(rng, make, fields_text, banned), n=1)

    def build(size, fine):
        items, qi = layout.place(size)
        lines = [f"{clock(p)} {fields_text(rec)}" for p, rec in enumerate(items)]
        filler = _filler_line(clock(len(items)), level_kv, level_name, service_name, tail_svc, tail_msg, tail, fine)
        prompt, span = _log_prompt("log_lookup", head, lines, qi, question, key, answer, filler)
        return _draft("log_lookup", prompt, answer, answer, key, span, size, qi, 1, field=field, key_name=key_name,
                      template=q_i, answer_template=a_i, head=head_i)

    return Shape(build, size_min=0, fine_max=len(tail), chars_per_step=110.0)


# ----------------------------------------------------------------------------------------------
# json_records and table: rows of one schema
# ----------------------------------------------------------------------------------------------

# A schema: (what the rows are, key-name pool, key pattern, shared fields, asked fields). A shared field:
# (name pool, value pool), its values repeat over the rows; an asked field: (name pool, value pattern or
# (low, high) integer range), carried by a few rows only, right after the key.
JSON_SCHEMAS = (
    ("spare parts held at a depot", ("sku", "part_no", "item_code"), Pat("AA-Ddddd"), (
        (("depot", "site", "warehouse"), ("airport", "east yard", "central", "riverside", "dockside")),
        (("category", "group", "family"), ("fasteners", "bearings", "gaskets", "hoses", "filters", "valves")),
        (("unit", "uom", "pack"), ("each", "box", "roll", "set")),
    ), (
        (("bin", "shelf", "slot"), Pat("ADd-Dd")),
        (("recall_code", "recall", "hold_code"), Pat("RC-Dddd")),
        (("on_order", "backorder_qty", "reorder_qty"), (1000, 99999)),
    )),
    ("entries of a staff directory", ("employee_id", "emp_no", "staff_id"), Pat("E-Ddddd"), (
        (("department", "dept", "division"), ("finance", "legal", "research", "facilities", "sales", "support")),
        (("office", "location", "campus"), ("Lisbon", "Oslo", "Toronto", "Nairobi", "Osaka", "Denver")),
        (("contract", "employment", "terms"), ("full-time", "part-time", "fixed-term")),
    ), (
        (("extension", "phone_ext", "ext"), (10000, 99999)),
        (("badge", "badge_no", "access_card"), Pat("AADddd")),
        (("leave_until", "away_until", "absent_until"), Pat("202d-0D-1d")),
    )),
    ("devices of a monitoring network", ("sensor_id", "device", "unit_id"), Pat("sn-xxxxxx"), (
        (("site", "station", "plot"), ("hillside", "basin", "plateau", "creek", "valley floor")),
        (("kind", "measure", "channel"), ("temperature", "humidity", "pressure", "soil moisture")),
        (("firmware", "fw", "version"), ("2.4.1", "2.4.2", "3.0.0")),
    ), (
        (("calibration", "cal_ref", "cal_id"), Pat("CAL-Dddd")),
        (("fault", "fault_code", "alarm"), Pat("F-Ddd-A")),
        (("offset_mv", "drift_mv", "bias_mv"), (1000, 9999)),
    )),
    ("cases of a support desk", ("case_id", "issue_id", "case_no"), Pat("T-Dddddd"), (
        (("priority", "urgency", "severity"), ("low", "normal", "high", "urgent")),
        (("queue", "team", "desk"), ("billing", "payroll", "hardware", "network", "onboarding")),
        (("state", "stage", "phase"), ("open", "waiting", "resolved", "closed")),
    ), (
        (("escalation", "escalation_id", "esc_ref"), Pat("ESC-Dddd")),
        (("refund", "refund_ref", "credit_note"), Pat("RF-Dddd-AA")),
        (("minutes_open", "sla_minutes", "age_min"), (1000, 99999)),
    )),
)
JSON_HEADS = (
    "Below is a JSON export of {about}.",
    "The data that follows lists {about} in JSON.",
    "Here are {about}, exported as JSON records.",
    "JSON records of {about}:",
)
JSON_QUESTIONS = (
    'Question: What is the value of "{field}" in the record whose "{key_name}" is "{key}"?',
    "Find the record with {key_name} {key}. What is its {field}?",
    'Look up {key} in the JSON data above and report its "{field}" field.',
    "In the records above, which {field} belongs to {key_name} {key}?",
)
JSON_ANSWERS = ("Answer: {record}", "Answer: the record is {record}", "Answer: It reads {record}")
JSON_NOTE_NAMES = ("note", "comment", "remarks")
JSON_NOTE_PHRASES = ("exported by the nightly job", "values checked by hand", "figures may lag behind the ledger",
                     "duplicates removed before export", "see the audit sheet for corrections",
                     "older entries archived separately", "fields follow the shared schema",
                     "last reviewed by the data team", "missing values left out", "counts refreshed every hour")
JSON_FORMATS = ("array", "lines", "indented")

TABLE_SCHEMAS = (
    ("weather stations", ("station", "station_id", "site_code"), Pat("ST-Ddddd"), (
        (("region", "district", "zone"), ("coastal", "highland", "valley", "plains", "lakeside")),
        (("gauge", "sensor", "model"), ("RX-2", "RX-3", "TK-9")),
        (("operator", "run_by", "agency"), ("met office", "university", "volunteers")),
    ), (
        (("outage_ref", "outage", "downtime_id"), Pat("OUT-Dddd")),
        (("record_gust", "peak_gust", "max_gust"), (1000, 9999)),
        (("logger", "logger_id", "unit_code"), Pat("LG-Ddd-A")),
    )),
    ("scheduled flights", ("flight", "flight_no", "service"), Pat("AADddd"), (
        (("origin", "from", "departs"), ("Lima", "Perth", "Tromso", "Dakar", "Quito", "Hanoi")),
        (("aircraft", "equipment", "type"), ("A320", "B737", "E190", "ATR72")),
        (("terminal", "term", "hall"), ("T1", "T2", "T3")),
    ), (
        (("delay_code", "delay", "irregularity"), Pat("DL-Ddd")),
        (("standby_list", "waitlist", "standby"), (1000, 9999)),
        (("charter_ref", "charter", "block"), Pat("AAADdd")),
    )),
    ("books on loan from a library", ("loan", "loan_id", "slip"), Pat("L-Ddddd"), (
        (("branch", "library", "site"), ("central", "university", "old town", "riverside")),
        (("format", "medium", "media"), ("hardback", "paperback", "audiobook")),
        (("loan_type", "period", "term"), ("standard", "short", "extended")),
    ), (
        (("hold_for", "reserved_by", "hold"), (100000, 999999)),
        (("fine_ref", "fine", "penalty"), Pat("FN-Dddd")),
        (("renewed_until", "extended_to", "renewal"), Pat("202d-0D-1d")),
    )),
    ("shipments of a shipping agent", ("tracking", "tracking_no", "waybill"), Pat("AA-Dddddd"), (
        (("haulier", "operator", "line"), ("Nordhaul", "Bluewave", "Quickfreight", "Seabridge")),
        (("destination", "to", "deliver_to"), ("Rotterdam", "Santos", "Busan", "Durban", "Valencia")),
        (("service_level", "speed", "class"), ("economy", "standard", "express")),
    ), (
        (("customs_ref", "customs", "declaration"), Pat("CU-Ddddd")),
        (("damage_report", "claim", "damage"), Pat("DR-Ddd-AA")),
        (("held_hours", "hold_hours", "delay_h"), (1000, 9999)),
    )),
)
TABLE_HEADS = (
    "The table below lists {about}.",
    "The following table gives {about}, one per row.",
    "Here is a table of {about}.",
    "Data table ({about}):",
)
TABLE_QUESTIONS = (
    "Question: In the table above, what is the {column} of {key}?",
    "Which value does the {column} column hold in the row of {key}?",
    "Look at the row with {key_name} {key}. What is its {column}?",
    "Read the table above and give the {column} listed for {key}.",
)
TABLE_ANSWERS = ("Answer:\n{row}", "Answer: the row is\n{row}", "Answer: That row reads:\n{row}")
TABLE_NOTE_HEADS = ("Note:", "Source:", "Footnote:")
TABLE_NOTE_PHRASES = ("figures are preliminary", "rows sorted as received", "blank cells were never reported",
                      "compiled from the quarterly returns", "values rounded where needed",
                      "corrections are published separately", "columns follow the usual layout",
                      "some rows were merged after review", "units as stated in each column header",
                      "the list is refreshed every week")
TABLE_FORMATS = ("csv", "markdown")


class _Rows:
    """The seeded layout of one schema for one sample: names, order, shared values, the asked field, the
    queried row (a row: its key, its asked value or None, its shared values)."""

    def __init__(self, rng, schemas):
        self.schema_i = rng.randrange(len(schemas))
        self.about, key_names, self.key_pat, shared, asked = schemas[self.schema_i]
        self.key_name = rng.choice(key_names)
        names, self.asked_values = rng.choice(asked)
        self.field = rng.choice(names)
        self.shared = [(rng.choice(n), tuple(rng.sample(v, min(len(v), 3)))) for n, v in shared]
        rng.shuffle(self.shared)
        self.taken: set = set()
        self.asked_is_number = not isinstance(self.asked_values, str)

    def row(self, rng, carrier=False):
        k = _fresh(lambda: _pattern(rng, self.key_pat), self.taken)
        v = self.asked_values
        asked = (_pattern(rng, v) if isinstance(v, str) else str(rng.randint(*v))) if carrier else None
        return [k, asked] + [rng.choice(vals) for _, vals in self.shared]

    @property
    def names(self):
        return [self.key_name, self.field] + [n for n, _ in self.shared]


def json_records_shape(rng) -> Shape:
    """Objects of one schema as a JSON array, JSON lines or indented objects; one field (carried by a few
    objects, right after the id) of the object with a given id."""
    rows = _Rows(rng, JSON_SCHEMAS)
    fmt = rng.choice(JSON_FORMATS)
    head_i, q_i, a_i = _pick(rng, JSON_HEADS, JSON_QUESTIONS, JSON_ANSWERS)
    head = JSON_HEADS[head_i].format(about=rows.about) + "\n\n"
    note_name = rng.choice(JSON_NOTE_NAMES)
    note = _tail_text(rng, JSON_NOTE_PHRASES, ", ")
    inner = "\n    " if fmt == "indented" else " "

    def pairs(row):
        asked = [] if row[1] is None else [row[1] if rows.asked_is_number else json.dumps(row[1])]
        return list(zip(rows.names[:1], [json.dumps(row[0])])) + list(zip(rows.names[1:2], asked)) + \
            list(zip(rows.names[2:], [json.dumps(v) for v in row[2:]]))

    def obj(ps):
        body = ("," + inner).join(f"{json.dumps(n)}: {v}" for n, v in ps)
        if fmt == "indented":
            return "  {\n    " + body + "\n  }"
        return ("  {" if fmt == "array" else "{") + body + "}"

    def render(row):
        return obj(pairs(row))

    def opening(row):  # the object's text up to its asked value: the answer prefix
        text = render(row)
        return text[: text.index(f"{json.dumps(rows.field)}:") + len(json.dumps(rows.field)) + 1].lstrip()

    while True:
        query = rows.row(rng, carrier=True)
        key, answer = query[0], query[1]
        question = JSON_QUESTIONS[q_i].format(field=rows.field, key_name=rows.key_name, key=key) + "\n" + \
            JSON_ANSWERS[a_i].format(record=opening(query))
        if render(query).count(answer) == 1 and answer not in head + question:
            break
    banned = [key, answer]
    layout = _Layout(rng, query, _Stream(rng, lambda r: rows.row(r, True), render, banned),
                     _Stream(rng, rows.row, render, banned))
    sep = "\n" if fmt == "lines" else ",\n"
    target = " " + (answer if rows.asked_is_number else json.dumps(answer))

    def build(size, fine):
        items, qi = layout.place(size)
        texts = [render(r) for r in items]
        if fine:
            texts.append(obj([(note_name, json.dumps(_cut(note, fine)))]))
        body = sep.join(texts)
        if fmt != "lines":
            body = "[\n" + body + "\n]"
        prompt = head + body + "\n\n" + question
        _check_once(prompt, body, key, answer, "json_records")
        a = len(head) + (2 if fmt != "lines" else 0) + sum(len(t) + len(sep) for t in texts[:qi])
        return _draft("json_records", prompt, target, answer, key, (a, a + len(texts[qi])), size, qi,
                      len(layout.depths), field=rows.field, key_name=rows.key_name, format=fmt, schema=rows.schema_i,
                      template=q_i, answer_template=a_i, head=head_i)

    return Shape(build, size_min=0, fine_max=len(note), chars_per_step=120.0 if fmt != "indented" else 150.0)


def table_shape(rng) -> Shape:
    """A CSV or markdown table of one schema; the cell of a row key and a column (filled in a few rows,
    next to the key column)."""
    rows = _Rows(rng, TABLE_SCHEMAS)
    fmt = rng.choice(TABLE_FORMATS)
    head_i, q_i, a_i = _pick(rng, TABLE_HEADS, TABLE_QUESTIONS, TABLE_ANSWERS)
    head = TABLE_HEADS[head_i].format(about=rows.about) + "\n\n"
    note = rng.choice(TABLE_NOTE_HEADS) + " " + _tail_text(rng, TABLE_NOTE_PHRASES, "; ")

    def cells(row):
        return [c if c is not None else "" for c in row]

    def render(row):
        return ",".join(cells(row)) if fmt == "csv" else "| " + " | ".join(cells(row)) + " |"

    def opening(row):  # the row's text up to its asked cell: the answer prefix
        return f"{row[0]}," if fmt == "csv" else f"| {row[0]} |"

    header = render(rows.names)
    if fmt == "markdown":
        header += "\n|" + "|".join("---" for _ in rows.names) + "|"
    while True:
        query = rows.row(rng, carrier=True)
        key, answer = query[0], query[1]
        question = TABLE_QUESTIONS[q_i].format(column=rows.field, key_name=rows.key_name, key=key) + "\n" + \
            TABLE_ANSWERS[a_i].format(row=opening(query))
        if render(query).count(answer) == 1 and answer not in head + header + question:
            break
    banned = [key, answer]
    layout = _Layout(rng, query, _Stream(rng, lambda r: rows.row(r, True), render, banned),
                     _Stream(rng, rows.row, render, banned))
    target = (" " if fmt == "markdown" else "") + answer

    def build(size, fine):
        items, qi = layout.place(size)
        texts = [render(r) for r in items]
        body = header + "\n" + "\n".join(texts)
        tail = "\n\n" + _cut(note, fine) if fine > len(note.split(" ", 1)[0]) + 2 else ""
        prompt = head + body + tail + "\n\n" + question
        _check_once(prompt, body, key, answer, "table")
        a = len(head) + len(header) + 1 + sum(len(t) + 1 for t in texts[:qi])
        return _draft("table", prompt, target, answer, key, (a, a + len(texts[qi])), size, qi, len(layout.depths),
                      field=rows.field, key_name=rows.key_name, format=fmt, schema=rows.schema_i, template=q_i,
                      answer_template=a_i, head=head_i)

    return Shape(build, size_min=0, fine_max=len(note), chars_per_step=45.0)


# ----------------------------------------------------------------------------------------------
# code: a Python file of generated classes
# ----------------------------------------------------------------------------------------------

CODE_HEADS = (
    '"""Components of the {system} {area} service, generated from the shared templates."""',
    '"""{system}: building blocks of the {area} pipeline."""',
    "# {system} {area} toolkit\n# Small components used across the code base.",
)
CODE_AREAS = ("billing", "ingest", "reporting", "scheduling", "routing", "archive", "telemetry")
CODE_IMPORTS = ("import math", "import os", "import json", "import logging", "from pathlib import Path",
                "from collections import defaultdict")
CODE_BASES = ("Component", "Stage", "Handler", "Step", "Plugin")
CODE_NOUNS = ("Ledger", "Record", "Frame", "Bucket", "Token", "Header", "Window", "Report", "Queue", "Metric",
              "Profile", "Payload", "Segment", "Invoice", "Channel", "Cursor", "Column", "Entry", "Digest", "Span")
CODE_METHODS = ("run", "apply", "collect", "process", "handle")
CODE_ARGS = ("items", "path", "data", "count", "key", "values", "name", "size", "offset", "mode", "config",
             "rows", "limit_to", "prefix", "target", "weights", "label", "origin")
CODE_DEFAULTS = ("None", "True", "False", "0", "1", "2", "10", "''", "()")
# class attribute names: one is asked (set first in a few classes), the others are set first in the rest
CODE_CONSTS = ("limit", "threshold", "batch_size", "max_items", "scale", "retries", "chunk", "base", "factor",
               "stride", "budget", "margin")
CODE_COMMENTS = (
    "# Return the {noun} of {a}, bounded by {const}.",
    "# Compute a {noun} from {a} and {b}.",
    "# Collect the {noun} entries of {a}.",
    "# Apply the {noun} rule to {a}, using {b}.",
    "# Build a {noun} summary for {a}.",
)
CODE_BODIES = (
    "        result = [x for x in {a} if x is not None][:self.{const}]\n        return result",
    "        total = 0\n        for x in {a}:\n            total += x\n        return min(total, self.{const})",
    "        if {b} is None:\n            {b} = self.{const}\n        return {a}, {b}",
    "        out = {{}}\n        for i, x in enumerate({a}):\n"
    "            out[i % self.{const}] = x\n        return out",
    "        parts = list({a})\n        while len(parts) > self.{const}:\n"
    "            parts.pop()\n        return parts",
    "        value = len({a}) * self.{const}\n        return value // ({b} or 1)",
)
CODE_QUESTIONS = (
    "Question: In the code above, what value does the class {name} give {const}?",
    "What number is {const} set to in the class {name}?",
    "Find class {name} in the file above. Which value does it assign to {const}?",
)
CODE_ANSWERS = ("Answer:\n{code}", "Answer: the class starts\n{code}", "Answer: it reads\n{code}")
CODE_TAIL_HEADS = ("# TODO:", "# NOTE:", "# Upkeep notes:")
CODE_TAIL_PHRASES = ("keep the components small", "cache results where it helps", "add tests for the edge cases",
                     "avoid hidden global state", "prefer plain data structures", "document the units",
                     "log failures once", "split the module when it grows", "review the defaults yearly",
                     "keep names consistent with the schema")


def code_shape(rng) -> Shape:
    """A Python file of generated classes, each setting one class attribute first (then a label, then a
    method); asks for the value that one named class gives the asked attribute, which a few classes set
    first (the others set another one first)."""
    system, area = _names(rng, 1, (3,))[0], rng.choice(CODE_AREAS)
    head_i, q_i, a_i = _pick(rng, CODE_HEADS, CODE_QUESTIONS, CODE_ANSWERS)
    imports = sorted(rng.sample(CODE_IMPORTS, rng.randint(1, 3)))
    head = CODE_HEADS[head_i].format(system=system, area=area) + "\n\n" + "\n".join(imports) + "\n\n\n"
    base, method = rng.choice(CODE_BASES), rng.choice(CODE_METHODS)
    consts = rng.sample(CODE_CONSTS, 4)
    const, others = consts[0], consts[1:]
    taken: set = set()

    def make(r, carrier=False):
        nouns: list = []

        def draw():
            nouns[:] = r.sample(CODE_NOUNS, r.choice((2, 2, 3)))
            return "".join(nouns)

        name = _fresh(draw, taken)
        args = r.sample(CODE_ARGS, r.randint(2, 3))
        params = ", ".join(["self"] + args[:-1] + [f"{args[-1]}={r.choice(CODE_DEFAULTS)}"])
        c = const if carrier else r.choice(others)
        comment = r.choice(CODE_COMMENTS).format(noun=nouns[-1].lower(), a=args[0], b=args[1], const=c)
        body = r.choice(CODE_BODIES).format(a=args[0], b=args[1], const=c)
        return {"name": name, "params": params, "const": c, "value": str(r.randint(1000, 99999)), "comment": comment,
                "label": r.choice(CODE_NOUNS).lower(), "body": body}

    def opening(f):
        return f'class {f["name"]}({base}):\n    {f["const"]} ='

    def render(f):
        return (f'{f["comment"]}\n{opening(f)} {f["value"]}\n    label = "{f["label"]}"\n\n'
                f'    def {method}({f["params"]}):\n{f["body"]}')

    while True:
        query = make(rng, carrier=True)
        key, answer = query["name"], query["value"]
        question = (CODE_QUESTIONS[q_i].format(name=key, const=const) + "\n"
                    + CODE_ANSWERS[a_i].format(code=opening(query)))
        if render(query).count(answer) == 1 and answer not in head + question:
            break
    banned = [key, answer]
    layout = _Layout(rng, query, _Stream(rng, lambda r: make(r, True), render, banned),
                     _Stream(rng, make, render, banned))
    words = _tail_text(rng, CODE_TAIL_PHRASES, "; ")
    tail = "\n".join(textwrap.wrap(rng.choice(CODE_TAIL_HEADS) + " " + words, 78, subsequent_indent="# "))

    def build(size, fine):
        items, qi = layout.place(size)
        texts = [render(f) for f in items]
        body = "\n\n\n".join(texts)
        note = _cut(tail, fine).rstrip("# \n") if fine > 8 else ""
        prompt = head + body + ("\n\n\n" + note if note else "") + "\n\n" + question
        _check_once(prompt, head + body, key, answer, "code")
        a = len(head) + sum(len(t) + 3 for t in texts[:qi])
        return _draft("code", prompt, " " + answer, answer, key, (a, a + len(texts[qi])), size, qi,
                      len(layout.depths), const=const, template=q_i, answer_template=a_i, head=head_i)

    return Shape(build, size_min=0, fine_max=len(tail), chars_per_step=200.0)


# ----------------------------------------------------------------------------------------------
# multi_doc: short documents with numbers and titles
# ----------------------------------------------------------------------------------------------

DOC_KINDS = ("windmill", "mill", "library", "bathhouse", "vineyard", "ferry", "foundry", "museum", "brewery",
             "theatre", "chapel", "tannery")
DOC_TITLES = ("The {place} {kind}", "A Short History of the {place} {kind}", "Notes on the {place} {kind}",
              "Visiting the {place} {kind}", "The {kind} at {place}")
DOC_HEADERS = ("Document {n}: {title}", "Document {n} - {title}", "### Document {n}: {title}")
DOC_INTROS = (
    "The following documents come from a regional heritage archive.",
    "Below are several short documents from a collection of local histories.",
    "Read the documents below; each describes one place.",
)
DOC_SENTENCES = (
    "The {kind} is close to the old {place} road.",
    "Most visitors arrive in the {season}.",
    "{person} looked after the {kind} for many years.",
    "Its walls were repaired after a long storm.",
    "The nearest village is {place}.",
    "Local guides describe it as quiet and well kept.",
    "A small garden lies behind the main building.",
    "{person} wrote a pamphlet about its early days.",
    "The path to the {kind} is steep in places.",
    "In the {season} the grounds are open until dusk.",
    "A painting of the {kind} hangs in the town hall of {place}.",
    "The papers of the {kind} were moved to {place} long ago.",
)
DOC_SEASONS = ("spring", "summer", "autumn")
# (attribute as the question names it, value pattern or "person"); the fact reads DOC_FACT
DOC_FACTS = (
    ("registry code", Pat("AA-Dddd")),
    ("archive mark", Pat("Ddddd")),
    ("current custodian", "person"),
    ("visitor permit", Pat("DdddAA")),
    ("county catalogue mark", Pat("AAA-Ddd")),
)
DOC_FACT = "The {attr} of the {subject} is {value}."
DOC_QUESTIONS = (
    'Question: According to Document {n} ("{title}"), what is the {attr} of the {subject}?',
    'What {attr} does Document {n}, "{title}", give for the {subject}?',
    "Read Document {n} ({title}) again. What is the {attr} of the {subject}?",
)
DOC_ANSWERS = ("Answer: The {attr} of the {subject} is", "Answer: Document {n} says: The {attr} of the {subject} is")
DOC_TAIL_HEADS = ("Archive note:", "Editor's note:", "Collection note:")
DOC_TAIL_PHRASES = ("the documents were transcribed by volunteers", "spelling follows the originals",
                    "some pages were damaged by damp", "dates are given as written",
                    "photographs are kept in a separate box", "later additions are marked in the margin",
                    "the order follows the old shelf list", "copies may be requested at the desk")


def multi_doc_shape(rng) -> Shape:
    """Numbered short documents with titles, each describing one place; a few state a fact of the asked
    kind, the others facts of other kinds; asks for the fact of one document (named by number and title)."""
    intro_i, q_i, a_i = _pick(rng, DOC_INTROS, DOC_QUESTIONS, DOC_ANSWERS)
    intro = DOC_INTROS[intro_i] + "\n\n"
    header = rng.choice(DOC_HEADERS)
    facts = rng.sample(DOC_FACTS, len(DOC_FACTS))
    (attr, pat), other_facts = facts[0], facts[1:]
    names = _WordPool(random.Random(rng.getrandbits(64)), (2, 3))
    counter = [0]

    def name():
        counter[0] += 1
        return names[counter[0] - 1].capitalize()

    def value(r, p):
        return f"{name()} {name()}" if p == "person" else _pattern(r, p)

    def make(r, carrier=False):
        kind, place = r.choice(DOC_KINDS), name()
        title = r.choice(DOC_TITLES).format(place=place, kind=kind.capitalize())
        subject = f"{place} {kind}"
        sents = [r.choice(DOC_SENTENCES).format(kind=kind, place=name(), person=f"{name()} {name()}",
                                                season=r.choice(DOC_SEASONS)) for _ in range(r.randint(1, 3))]
        kinds = ([(attr, pat)] if carrier else []) + r.sample(other_facts, r.randint(0 if carrier else 1, 1))
        values = [value(r, p) for _, p in kinds]
        for (a, _), v in zip(kinds, values):
            sents.insert(r.randint(0, len(sents)), DOC_FACT.format(attr=a, subject=subject, value=v))
        return {"title": title, "subject": subject, "text": " ".join(sents), "value": values[0]}

    def text(d):
        return d["title"] + "\n" + d["text"]

    while True:  # the answer occurs once in its document
        query = make(rng, carrier=True)
        key, answer = query["title"], query["value"]
        if text(query).count(answer) == 1:
            break
    banned = [key, answer, query["subject"]]
    layout = _Layout(rng, query, _Stream(rng, lambda r: make(r, True), text, banned), _Stream(rng, make, text, banned))
    tail = rng.choice(DOC_TAIL_HEADS) + " " + _tail_text(rng, DOC_TAIL_PHRASES, "; ")
    target = " " + answer

    def build(size, fine):
        items, qi = layout.place(size)
        texts = [header.format(n=i + 1, title=d["title"]) + "\n" + d["text"] for i, d in enumerate(items)]
        body = "\n\n".join(texts)
        slots = dict(n=qi + 1, title=key, attr=attr, subject=query["subject"])
        question = DOC_QUESTIONS[q_i].format(**slots) + "\n" + DOC_ANSWERS[a_i].format(**slots)
        extra = "\n\n" + _cut(tail, fine) if fine > len(tail.split(":")[0]) + 1 else ""
        prompt = intro + body + extra + "\n\n" + question
        _check_once(prompt, body, key, answer, "multi_doc")
        a = len(intro) + sum(len(t) + 2 for t in texts[:qi])
        return _draft("multi_doc", prompt, target, answer, key, (a, a + len(texts[qi])), size, qi,
                      len(layout.depths), attr=attr, subject=query["subject"], document=qi + 1, template=q_i,
                      answer_template=a_i, head=intro_i)

    return Shape(build, size_min=0, fine_max=len(tail), chars_per_step=300.0)


# ----------------------------------------------------------------------------------------------
# chat_history: a long conversation in the model's chat template
# ----------------------------------------------------------------------------------------------

# (kind of code as the user names it, value pattern)
CHAT_FACT_KINDS = (
    ("door code", Pat("Dddd")), ("parking spot", Pat("A-Dd")), ("booking reference", Pat("AADAAD")),
    ("gate code", Pat("Dddd#")), ("membership number", Pat("Dddddd")), ("flight number", Pat("AA Dddd")),
    ("padlock code", Pat("Ddd-Dd")), ("library card number", Pat("LC-Ddddd")), ("seat number", Pat("Dd-A")),
    ("order number", Pat("#Ddddd")),
)
CHAT_FACT_TURNS = (
    "Quick note before we go on: my {kind} is {value}.",
    "By the way, my {kind} is {value}.",
    "For the record, my {kind} is {value}.",
    "Just so you know, my {kind} is {value}.",
)
CHAT_FACT_ACKS = ("Thanks for letting me know.", "Sure, noted.", "Got it, thanks.", "Okay, thank you.")
CHAT_QUESTIONS = (
    "What is my {kind}? Start your reply with: Your {kind} is",
    "Please give me my {kind}. Begin your answer with \"Your {kind} is\".",
    "Tell me my {kind}, starting with: Your {kind} is",
    "Which {kind} do I have? Reply starting with: Your {kind} is",
)
CHAT_ANSWER = "Your {kind} is {value}."
# filler exchanges: (user, assistant) with slots
CHAT_TOPICS = (
    ("What is a good way to cook {food}?",
     "A simple way is to start with a hot pan and a little butter. Cook the {food} gently, season it at the end, "
     "and taste as you go. Serving it with fresh herbs usually helps."),
    ("Can you suggest a weekend activity in {place}?",
     "In {place} you could take a long walk along the river in the morning and visit the market later. If the "
     "weather turns, a small museum or a bookshop cafe is a nice way to spend the rest of the day."),
    ("How do I get better at {hobby}?",
     "Practise a little every day rather than a lot once a week. Pick one small thing to improve each session, "
     "and keep notes so you can see your progress with {hobby} over time."),
    ("What should I pack for a trip to {place} in {season}?",
     "For {place} in {season}, pack layers you can combine, comfortable shoes, a light rain jacket and a "
     "reusable bottle. A small first aid kit and a charger are always worth bringing."),
    ("Any tips for keeping {plant} healthy?",
     "Most {plant} like bright light without harsh midday sun. Water when the top of the soil feels dry, and "
     "check the leaves now and then for pests."),
    ("Can you explain what {concept} means in simple words?",
     "Put simply, {concept} is a way of describing how things change and relate to each other. It helps to look "
     "at a small everyday example first and build up from there."),
    ("I have a free evening. Should I read or see a film?",
     "If you feel tired, a film might be more relaxing. If you want something calm that lasts, start a short "
     "novel. Either way, put your phone away for a while."),
    ("How can I make my mornings less rushed?",
     "Prepare what you can the evening before: clothes, bag and breakfast. Wake up at the same time each day and "
     "leave a little buffer before you need to go out."),
    ("What is a friendly way to decline an invitation from {person}?",
     "You could thank {person} warmly, say that you cannot make it this time, and suggest another day. Keeping it "
     "short and kind is usually best."),
    ("Could you help me plan a simple {meal} for four people?",
     "For a simple {meal}, choose one main dish, one side and something fresh. Prepare as much as possible ahead, "
     "and keep the dessert easy, like fruit with yoghurt."),
)
CHAT_FOODS = ("lentils", "salmon", "mushrooms", "rice", "chickpeas", "spinach", "potatoes", "tofu")
CHAT_PLACES = ("the old port town", "the mountain village", "the capital", "the lake district", "the coast")
CHAT_HOBBIES = ("chess", "painting", "running", "knitting", "photography", "swimming", "the guitar")
CHAT_PLANTS = ("ferns", "tomato plants", "orchids", "succulents", "herbs on the windowsill")
CHAT_CONCEPTS = ("inflation", "compound interest", "a food chain", "supply and demand", "a budget")
CHAT_MEALS = ("lunch", "dinner", "brunch", "picnic")
CHAT_TAIL_PHRASES = ("Let me know if you would like more ideas.", "I am happy to go into more detail.",
                     "We can adjust this to your week.", "Small steps tend to work best.",
                     "Feel free to ask a follow-up question.", "It is fine to start simple.",
                     "Take it one step at a time.", "You can always change the plan later.")


def chat_history_shape(rng, render: Callable[[list], str]) -> Shape:
    """A long chat: exchanges of other conversation, a few turns in which the user gives codes of other
    kinds, and one turn giving the queried code; the last user turn asks for it. render(messages) -> the
    prompt (the chat template with the generation prompt)."""
    kinds = rng.sample(CHAT_FACT_KINDS, rng.randint(*CARRIERS))
    (kind, pat), distractors = kinds[0], kinds[1:]
    value = _pattern(rng, pat)
    fact_i, ack_i, q_i = (rng.randrange(len(CHAT_FACT_TURNS)), rng.randrange(len(CHAT_FACT_ACKS)),
                          rng.randrange(len(CHAT_QUESTIONS)))
    query = (CHAT_FACT_TURNS[fact_i].format(kind=kind, value=value), CHAT_FACT_ACKS[ack_i])
    people = _names(rng, 8)

    def code_turn(r, k, p):
        v = _pattern(r, p)
        while value in v or v in value:
            v = _pattern(r, p)
        return (r.choice(CHAT_FACT_TURNS).format(kind=k, value=v), r.choice(CHAT_FACT_ACKS))

    def make(r):
        user, assistant = r.choice(CHAT_TOPICS)
        slots = dict(food=r.choice(CHAT_FOODS), place=r.choice(CHAT_PLACES), hobby=r.choice(CHAT_HOBBIES),
                     season=r.choice(DOC_SEASONS), plant=r.choice(CHAT_PLANTS), concept=r.choice(CHAT_CONCEPTS),
                     person=r.choice(people), meal=r.choice(CHAT_MEALS))
        return user.format(**slots), assistant.format(**slots)

    given = [0]

    def make_code(r):  # one turn for each other kind
        k, p = distractors[given[0] % len(distractors)]
        given[0] += 1
        return code_turn(r, k, p)

    def text(t):
        return t[0] + "\n" + t[1]

    layout = _Layout(rng, query, _Stream(rng, make_code, text, [kind, value]), _Stream(rng, make, text, [kind, value]),
                     n=len(kinds))
    tail = _tail_text(rng, CHAT_TAIL_PHRASES, " ")
    question = CHAT_QUESTIONS[q_i].format(kind=kind)
    target = CHAT_ANSWER.format(kind=kind, value=value)

    def build(size, fine):
        items, qi = layout.place(size)
        messages = []
        for user, assistant in items:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if fine:
            messages[-1] = dict(messages[-1], content=messages[-1]["content"] + " " + _cut(tail, fine))
        messages.append({"role": "user", "content": question})
        prompt = render(messages)
        history = prompt[: prompt.rindex(question)]
        _check_once(prompt, history, kind, value, "chat_history")
        a = prompt.index(query[0])
        return _draft("chat_history", prompt, target, value, kind, (a, a + len(query[0])), size, qi,
                      len(layout.depths), turns=len(messages), template=q_i, head=fact_i)

    return Shape(build, size_min=0, fine_max=len(tail), chars_per_step=300.0)


# ----------------------------------------------------------------------------------------------
# registry and wording
# ----------------------------------------------------------------------------------------------

SHAPES = {"records": records_shape, "log_lookup": log_lookup_shape, "json_records": json_records_shape,
          "table": table_shape, "code": code_shape, "multi_doc": multi_doc_shape}


def family_shape(task: str, rng, render: Callable[[list], str] | None = None) -> Shape:
    """The shape of one sample of a family task (`render` renders chat messages; chat_history only)."""
    if task == "chat_history":
        if render is None:
            raise ValueError("chat_history: needs render(messages), the tokenizer's chat template")
        return chat_history_shape(rng, render)
    if task not in SHAPES:
        raise ValueError(f"task: {task!r} is not a family task; expected one of {', '.join(FAMILY_TASKS)}")
    return SHAPES[task](rng)


_WORDING = (REC_HEADS, REC_QUESTIONS, REC_ANSWERS, REC_KEY_NAMES, REC_LEVEL_NAMES, REC_SERVICE_NAMES, REC_SERVICES,
            REC_HOST_NAMES, REC_HOST_STEMS, REC_METHOD_NAMES, REC_PATH_NAMES, REC_PATHS, REC_STATUS_NAMES,
            REC_LATENCY_NAMES, REC_ASKED, REC_MSG_NAMES, REC_TAIL_SERVICES, REC_TAIL_PHRASES,
            LOG_HEADS, LOG_QUESTIONS, LOG_ANSWERS, LOG_TOKEN_NAMES,
            JSON_SCHEMAS, JSON_HEADS, JSON_QUESTIONS, JSON_ANSWERS, JSON_NOTE_NAMES, JSON_NOTE_PHRASES,
            TABLE_SCHEMAS, TABLE_HEADS, TABLE_QUESTIONS, TABLE_ANSWERS, TABLE_NOTE_HEADS, TABLE_NOTE_PHRASES,
            CODE_HEADS, CODE_AREAS, CODE_IMPORTS, CODE_BASES, CODE_NOUNS, CODE_METHODS, CODE_ARGS, CODE_CONSTS,
            CODE_COMMENTS, CODE_BODIES, CODE_QUESTIONS, CODE_ANSWERS, CODE_TAIL_HEADS, CODE_TAIL_PHRASES,
            DOC_KINDS, DOC_TITLES, DOC_HEADERS, DOC_INTROS, DOC_SENTENCES, DOC_SEASONS, DOC_FACTS, DOC_FACT,
            DOC_QUESTIONS, DOC_ANSWERS, DOC_TAIL_HEADS, DOC_TAIL_PHRASES,
            CHAT_FACT_KINDS, CHAT_FACT_TURNS, CHAT_FACT_ACKS, CHAT_QUESTIONS, CHAT_ANSWER, CHAT_TOPICS, CHAT_FOODS,
            CHAT_PLACES, CHAT_HOBBIES, CHAT_PLANTS, CHAT_CONCEPTS, CHAT_MEALS, CHAT_TAIL_PHRASES)
_NOT_WORDING = {"person"}  # the value kind of DOC_FACTS


def family_wording() -> list[str]:
    """Every fixed string of the six families, sorted: pool words and names, and the literal pieces of each
    template (split at its {placeholders}, stripped; empty pieces left out). Value patterns (`Pat`), integer
    ranges and `CONVENTIONS` are not included. Calibration prompts of the same kinds should share none of
    these (compare whole words or whole phrases: some entries are short, e.g. "sku")."""
    out: set = set()

    def walk(x):
        if isinstance(x, str):
            if x in _NOT_WORDING or isinstance(x, Pat):
                return
            for literal, _, _, _ in string.Formatter().parse(x):
                if literal.strip():
                    out.add(literal.strip())
        elif isinstance(x, (tuple, list)):
            for y in x:
                walk(y)

    for const in _WORDING:
        walk(const)
    return sorted(out)
