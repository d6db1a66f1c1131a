"""Calibration prompts in structured formats: records, JSON, tables, code, several documents, long chats.

Output-aware calibration (`kascade.calibrate.output_aware`) judges a plan by the dense model's own
continuation where the answer hangs on a few far-away keys. Prose needles alone do not exercise the
heads that retrieve one line among near-identical lines, so the calibration mixture also holds:

    telemetry   sensor readings, one per line, in `key=value` fields that repeat from line to line; the
                question asks for one field of the line with a given sequence number      (family records)
    manifest    a JSON array of shipment objects of one schema; one object's field     (family json_records)
    roster      a duty roster as a CSV or pipe table; the cell of one row and column          (family table)
    constants   held-out source code with module-level constants spliced in; one value        (family code)
    dossier     several numbered files cut from held-out text, one holding a fact         (family multi_doc)
    long_chat   a multi-turn chat in the model's chat template; an early user turn states a fact,
                the last one asks for it                                              (family chat_history)

Families name the evaluation task families (`kascade.eval.tasks`) that a format resembles, so that
leave-one-family-out validation can calibrate without every format of an evaluated family. Wording,
field names and values here are the calibration's own: no template, pool word or instance is shared
with the evaluation tasks (tests check the templates against the evaluation's).

Every prompt is exactly `length` tokens: items are tokenised one by one and joined in token space, the
last filler item is cut to fit, and the fact items go in at seeded item boundaries. The answer is not
needed: calibration follows the dense model's greedy continuation.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

STRUCTURED_FORMATS = ("telemetry", "manifest", "roster", "constants", "dossier", "long_chat")
FAMILY = {"telemetry": "records", "manifest": "json_records", "roster": "table", "constants": "code",
          "dossier": "multi_doc", "long_chat": "chat_history"}

_SITES = ("moraine", "fjord", "caldera", "mesa", "tundra", "canyon", "atoll", "steppe")
_PROBES = ("hygro", "baro", "anemo", "pyrano", "lysi", "turbi")
_UNITS = {"hygro": "pct", "baro": "hPa", "anemo": "m/s", "pyrano": "W/m2", "lysi": "mm", "turbi": "NTU"}
_CARRIERS = ("Brackwater Freight", "Osgood & Lume", "Tessaly Lines", "Quenby Haulage", "Marrow Cargo")
_PORTS = ("Vantor", "Kessling", "Aubade", "Thornmere", "Castille Bay", "Ormsby", "Pellucid", "Wrenfold")
_MANIFEST_FIELDS = ("tonnage", "pallets", "berth", "hauler", "seal")
_CREW_FIRST = ("Ambrose", "Bettina", "Cyprian", "Dagny", "Ezekiel", "Flavia", "Gunnar", "Honora", "Isidore",
               "Jocasta", "Lorcan", "Mirabel", "Norbert", "Ottoline", "Percival", "Rosalind", "Silas", "Theodora")
_CREW_LAST = ("Ashgrove", "Blackwood", "Cresswell", "Dunmore", "Everly", "Frostwick", "Greaves", "Hollis",
              "Kestrel", "Lockhart", "Merriweather", "Northcott", "Penhallow", "Quarrington", "Ravensworth")
_ROSTER_COLUMNS = ("watch", "post", "radio", "locker", "vessel")
_WATCHES = ("dawn", "forenoon", "afternoon", "dog", "first", "middle")
_POSTS = ("bridge", "galley", "engine room", "bosun store", "chart room", "sick bay", "foredeck")
_VESSELS = ("Halcyon", "Marguerite", "Stormpetrel", "Corvina", "Antares", "Linnet")
_CONST_WORDS = ("SPOOL", "GASKET", "LATTICE", "FERRULE", "BOBBIN", "TRELLIS", "CISTERN", "HOPPER", "WINCH",
                "BALLAST", "SPINDLE", "FLANGE")
_CONST_SUFFIX = ("RETRY_CEILING", "WARMUP_TICKS", "SHARD_QUOTA", "DRAIN_LIMIT", "PROBE_MASK", "RESEED_PERIOD")
_FILE_TOPICS = ("the salt marsh survey", "the lighthouse accounts", "the orchard grafting log",
                "the quarry blasting schedule", "the glacier cave expedition", "the observatory repairs",
                "the canal lock maintenance", "the beekeeping cooperative")
_FILE_FACTS = (("the surveyors pitched their base camp at an altitude of {v} metres", "the base camp altitude"),
               ("the keeper recorded {v} litres of lamp oil in the winter stock", "the winter stock of lamp oil"),
               ("the head gardener numbered the rootstock batch {v}", "the rootstock batch number"),
               ("the foreman logged charge plan {v} for the north face", "the charge plan for the north face"))
_CHAT_FACTS = (("Please keep this in mind: the berth of my sleeper car is number {v}.",
                "Which sleeper car berth number did I tell you at the start?", "My sleeper car berth is number"),
               ("Small detail for later, my bicycle lock combination is {v}.",
                "Remind me, which combination opens my bicycle lock?", "Your bicycle lock combination is"),
               ("Before we begin: the ticket for my coat at the cloakroom says {v}.",
                "What did the cloakroom ticket for my coat say?", "Your cloakroom ticket says"))
_CHAT_ASKS = ("Could you go through this excerpt with me?", "Here is another part I was reading:",
              "What do you make of the following?", "Next section, same source:")
_CHAT_ACK = "Understood, it is written down."
_CHAT_REPLIES = ("It reads as follows in short:", "Looking at it closely:", "Here is what stands out:")


def format_wording() -> list[str]:
    """The fixed strings these formats write (templates and pool words), for the check that the
    evaluation's families share none of them."""
    out = list(_SITES + _PROBES + _CARRIERS + _PORTS + _MANIFEST_FIELDS + _CREW_FIRST + _CREW_LAST + _ROSTER_COLUMNS
               + _WATCHES + _POSTS + _VESSELS + _CONST_WORDS + _CONST_SUFFIX + _FILE_TOPICS + _CHAT_ASKS
               + _CHAT_REPLIES + (_CHAT_ACK,))
    out += [s for pair in _FILE_FACTS for s in pair] + [s for triple in _CHAT_FACTS for s in triple]
    return out


# ----------------------------------------------------------------------------------------------
# one format each: (header text, filler lines or None, fact lines, question text)
# ----------------------------------------------------------------------------------------------


def _telemetry(rng: random.Random):
    sites = rng.sample(_SITES, 3)
    probes = rng.sample(_PROBES, 3)
    base = rng.randrange(100_000, 800_000)
    order = rng.sample(range(40_000), 40_000)  # distinct sequence numbers, shuffled
    asked_field = rng.choice(("reading", "batt", "node"))

    def line(i: int) -> str:
        p = probes[i % 3]
        return (f"t=+{i * 7 % 86400:05d}s node={sites[i % 2]}-{i % 5:02d} probe={p}-{i % 4} "
                f"reading={rng.randrange(100, 999) / 10:.1f}{_UNITS[p]} batt={rng.randrange(60, 100)} "
                f"seq={base + order[i]}")

    fact_seq = base + 40_000 + rng.randrange(1000)
    p = probes[2]
    fact = (f"t=+{rng.randrange(86400):05d}s node={sites[2]}-{rng.randrange(5):02d} probe={p}-{rng.randrange(4)} "
            f"reading={rng.randrange(100, 999) / 10:.1f}{_UNITS[p]} batt={rng.randrange(10, 60)} seq={fact_seq}")
    header = "Telemetry export, one reading per line (fields: t, node, probe, reading, batt, seq).\n"
    question = (f"\nLook up the line with seq={fact_seq} in the export above. Its {asked_field} field is "
                f"{asked_field}=")
    return header, (line(i) for i in range(10**9)), [fact], question


def _manifest(rng: random.Random):
    carriers, ports = rng.sample(_CARRIERS, 4), rng.sample(_PORTS, 5)
    field = rng.choice(_MANIFEST_FIELDS)
    ids = rng.sample(range(10_000, 99_999), 30_000)

    def obj(ref: int, r: random.Random) -> str:
        return ('{"ref": "MF-%d", "port": "%s", "hauler": "%s", "pallets": %d, "tonnage": %d, "berth": "%s%d", '
                '"seal": "%s"},' % (ref, r.choice(ports), r.choice(carriers), r.randrange(1, 40),
                                    r.randrange(200, 9000), r.choice("ABCDE"), r.randrange(1, 30),
                                    "".join(r.choice("0123456789ABCDEF") for _ in range(6))))

    asked = rng.randrange(100_000, 999_999)
    header = "Shipment manifest (JSON array):\n["
    question = f'\n]\nIn the manifest, the "{field}" of the shipment with ref "MF-{asked}" is'
    return header, (obj(ids[i], rng) for i in range(10**9)), [obj(asked, rng)], question


def _roster(rng: random.Random):
    csv = rng.random() < 0.5
    cols = ["crew_id", "name"] + rng.sample(_ROSTER_COLUMNS, 4)
    asked_col = rng.choice(cols[2:])
    ids = rng.sample(range(1000, 9999), 8000)

    def cell(col: str, r: random.Random) -> str:
        return {"watch": lambda: r.choice(_WATCHES), "post": lambda: r.choice(_POSTS),
                "radio": lambda: f"ch{r.randrange(1, 80)}", "locker": lambda: str(r.randrange(100, 999)),
                "vessel": lambda: r.choice(_VESSELS)}[col]()

    def row(crew: str, r: random.Random) -> str:
        vals = [crew, f"{r.choice(_CREW_FIRST)} {r.choice(_CREW_LAST)}"] + [cell(c, r) for c in cols[2:]]
        return ",".join(vals) if csv else "| " + " | ".join(vals) + " |"

    head = ",".join(cols) if csv else "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    asked = f"K-{rng.randrange(10_000, 99_999)}"
    header = f"Duty roster ({'CSV' if csv else 'table'}):\n{head}\n"
    question = f"\nFrom the roster, the {asked_col} of crew member {asked} is"
    return header, (row(f"K-{ids[i]}", rng) for i in range(10**9)), [row(asked, rng)], question


def _constants(rng: random.Random):
    names = [f"{a}_{b}" for a in rng.sample(_CONST_WORDS, 4) for b in rng.sample(_CONST_SUFFIX, 3)]
    asked = names[0]
    facts = [f"{n} = {rng.randrange(1000, 99999)}" for n in names[:5]]
    rng.shuffle(facts)
    question = f"\n# The module-level constant {asked} is set to"
    return "", None, facts, question


FORMAT_BUILDERS = {"telemetry": _telemetry, "manifest": _manifest, "roster": _roster, "constants": _constants}


# ----------------------------------------------------------------------------------------------
# assembling exact lengths
# ----------------------------------------------------------------------------------------------


def _encoder(tokenizer):
    return lambda s: tokenizer(s, add_special_tokens=False).input_ids


def _fill(items: Iterator[list[int]], room: int) -> list[list[int]]:
    """Items (token lists) until exactly `room` tokens, the last one cut."""
    out, total = [], 0
    while total < room:
        item = next(items)
        if not item:
            continue
        out.append(item[: room - total])
        total += len(out[-1])
    return out


def _splice(rng: random.Random, body: list[list[int]], facts: list[list[int]], lo: float = 0.05,
            hi: float = 0.95) -> list[int]:
    """The body's items with each fact inserted at a seeded item boundary between `lo` and `hi` of it."""
    n = len(body)
    where = sorted(rng.randrange(int(lo * n), max(int(lo * n) + 1, int(hi * n))) for _ in facts)
    out, last = [], 0
    for pos, f in zip(where, facts):
        for item in body[last:pos]:
            out += item
        out += f
        last = pos
    for item in body[last:]:
        out += item
    return out


def _haystack(text_ids: list[int], rng: random.Random, size: int) -> Callable[[int], list[int]]:
    """hay(i) -> the i-th window of `size` tokens of the held-out text, from a seeded start."""
    start = rng.randrange(0, max(1, len(text_ids) - 64 * size))

    def hay(i: int) -> list[int]:
        a = (start + i * size) % max(1, len(text_ids) - size)
        return list(text_ids[a : a + size])

    return hay


def make_structured(tokenizer, text_ids: list[int], length: int, kind: str, rng: random.Random) -> list[int]:
    """Token ids (exactly `length`) of one prompt of a structured `kind` (see the module docstring)."""
    enc = _encoder(tokenizer)
    prefix = tokenizer("", add_special_tokens=True).input_ids
    if kind == "long_chat":
        ids = _long_chat(tokenizer, text_ids, length, rng, prefix)
    elif kind == "dossier":
        ids = _dossier(enc, text_ids, length, rng, prefix)
    elif kind in FORMAT_BUILDERS:
        nl = enc("\n")
        if kind == "constants":  # windows of held-out source code, the constants on lines of their own
            window = _haystack(text_ids, rng, 48)
            header, _, facts, question = FORMAT_BUILDERS[kind](rng)
            items = (window(i) for i in range(10**9))
            fact_ids = [nl + enc(f) + nl for f in facts]
        else:
            header, lines, facts, question = FORMAT_BUILDERS[kind](rng)
            items = (enc(t) + nl for t in lines)
            fact_ids = [enc(f) + nl for f in facts]
        head, q = enc(header), enc(question)
        room = _room(length, kind, prefix, head, q, *fact_ids)
        ids = prefix + head + _splice(rng, _fill(items, room), fact_ids) + q
    else:
        raise ValueError(f"kind: expected one of {STRUCTURED_FORMATS}, got {kind!r}")
    assert len(ids) == length, (kind, len(ids), length)
    return ids


def _room(length: int, kind: str, *parts: list[int]) -> int:
    room = length - sum(len(p) for p in parts)
    if room < 64:
        raise ValueError(f"length: {length} tokens leaves no room for the items of a {kind!r} prompt; use a longer "
                         "length")
    return room


def _dossier(enc, text_ids, length, rng, prefix) -> list[int]:
    """Numbered files of held-out text, each under its own header; one sentence of one file is the fact."""
    files = min(len(_FILE_TOPICS), max(2, length // 256))  # 8 files at 2K tokens and more
    topics = rng.sample(_FILE_TOPICS, files)
    fact, what = rng.choice(_FILE_FACTS)
    own = rng.randrange(files)
    headers = [enc(f"\n=== File {i + 1} of {files}: notes on {t} ===\n") for i, t in enumerate(topics)]
    fact_ids = enc(f"\nIn these notes {fact.format(v=rng.randrange(1000, 9999))}.\n")
    head = enc("A folder of files follows.\n")
    q = enc(f"\n\nAccording to file {own + 1} (notes on {topics[own]}), {what} is")
    room = _room(length, "dossier", prefix, head, q, fact_ids, *headers)
    window = _haystack(text_ids, rng, 48)
    windows = (window(i) for i in range(10**9))
    body = []
    for i in range(files):
        share = room // files + (i < room % files)
        text = _fill(windows, share)
        body += headers[i] + (_splice(rng, text, [fact_ids], 0.0, 1.0) if i == own else [t for w in text for t in w])
    return prefix + head + body + q


def chat_frames(tokenizer) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(head, user-to-assistant, assistant-to-user, tail) token ids of the tokenizer's chat template:
    a conversation u0, a0, u1, ..., un is head + u0 + u2a + a0 + a2u + u1 + ... + un + tail (the
    generation prompt included). None without a template, or one whose turns are not framed alike."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marks = [f"\u2063M{i}\u2063" for i in range(5)]
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(marks)]
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render alternating turns has no frames
        return None
    pieces, rest = [], text
    for m in marks:
        if m not in rest:
            return None
        a, rest = rest.split(m, 1)
        pieces.append(a)
    pieces.append(rest)
    if pieces[1] != pieces[3] or pieces[2] != pieces[4]:
        return None
    enc = _encoder(tokenizer)
    return enc(pieces[0]), enc(pieces[1]), enc(pieces[2]), enc(pieces[5])


def _long_chat(tokenizer, text_ids, length, rng, prefix) -> list[int]:
    """A chat of many exchanges over held-out text; the fact is stated in the first quarter of them, and
    the last user turn asks for it (the generation prompt and an answer start follow)."""
    frames = chat_frames(tokenizer)
    if frames is None:
        raise ValueError("kind: 'long_chat' needs a tokenizer whose chat template frames alternating user and "
                         "assistant turns alike; leave 'long_chat' out of the formats")
    head, u2a, a2u, tail = frames
    if prefix and head[: len(prefix)] == prefix:  # the template writes the BOS token itself
        prefix = []
    enc = _encoder(tokenizer)
    stated, ask, answer_start = rng.choice(_CHAT_FACTS)
    value = rng.randrange(10_000, 99_999) if rng.random() < 0.5 else rng.randrange(100, 999)
    first = enc(stated.format(v=value)) + u2a + enc(_CHAT_ACK) + a2u
    last = enc(ask) + tail + enc(answer_start)
    room = _room(length, "long_chat", prefix, head, first, last)
    hay = _haystack(text_ids, rng, 96)
    exchanges: list[tuple[list[int], list[int]]] = []
    total, i = 0, 0
    while True:  # whole exchanges while the next one fits; the last reply then takes the rest of the room
        user = enc(rng.choice(_CHAT_ASKS) + "\n") + hay(2 * i)[: rng.randrange(40, 96)]
        reply = enc(rng.choice(_CHAT_REPLIES) + " ") + hay(2 * i + 1)[: rng.randrange(24, 96)]
        size = len(user) + len(u2a) + len(reply) + len(a2u)
        if exchanges and total + size > room:
            break
        if not exchanges and size > room:
            raise ValueError(f"length: {length} tokens leaves no room for a long chat; use a longer length")
        exchanges.append((user, reply))
        total += size
        i += 1
    pad = room - total
    user, reply = exchanges[-1]
    more = [t for j in range(pad // 96 + 1) for t in hay(10**6 + j)][:pad]
    exchanges[-1] = (user, reply + more)
    early = rng.randrange(0, max(1, len(exchanges) // 4))
    body = [t for u, r in exchanges for t in u + u2a + r + a2u]
    cut = sum(len(u) + len(u2a) + len(r) + len(a2u) for u, r in exchanges[:early])
    return prefix + head + body[:cut] + first + body[cut:] + last
