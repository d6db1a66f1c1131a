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
    doc_qa_chat      a warehouse's daily log (8 entries of generated notes, one delivery's lot number in
                     each); the user turn after it asks for one delivery's lot number; the prompt is the
                     model's chat template around that user turn (`tokenizer.apply_chat_template`, generation
                     prompt added), so the model answers as its assistant. Needs a tokenizer with a chat
                     template (an instruction-tuned model's).

Families beyond prose needles (`kascade.eval.families`; `FAMILY` names each task's family): many
near-identical items, one queried by a key that occurs once; the answer is one short string that occurs once.

    records          key=value server-log lines; one field of the line with a given request id
    log_lookup       near-identical key=value server-log lines; the short token one line carries right after
                     its request id, asked for by that id (a records task)
    json_records     JSON objects of one schema (array, JSON lines or indented); one field of the object with an id
    table            a CSV or markdown table; the cell of a row key and a column name
    code             a Python file of generated classes; the value one named class gives a class attribute
    multi_doc        numbered short documents with titles; a fact stated in one named document
    chat_history     a long multi-turn chat in the model's chat template (`apply_chat_template` over all the
                     turns, generation prompt added); a code the user gave in one turn, asked for in the last
                     (needs a chat template, like doc_qa_chat)

Scoring: RULER's string match ("all": the share of the reference strings found in the prediction,
case-insensitive) for the retrieval tasks, doc_qa_chat and the families; per generated token for `copy` and
`sequence` (the share of the first n expected tokens that the greedy continuation reproduces at the same position),
so selection over every decode step is exercised.

Haystacks: `haystack="filler"` repeats "The grass is green. The sky is blue. ..." (RULER's noise);
`haystack="essay"` cuts a window out of a long text (`text=`, e.g. data/heldout.txt; `copy` always
needs it). Facts go to sentence starts (filler) or line starts (essay) at seeded random depths.

Exact length. A task (`kascade.eval.generators`) builds its prompt from a size knob (haystack
characters; number of pairs or words) and a second knob: a fine one where one size step is worth many
tokens (the length of one extra distractor value, a tail of once-only words, trailing noise dots), a
phase otherwise (the haystack, passage or sequence starts a sentence, line or item later).
`fit_length` finds the largest size whose prompt fits in the target by interpolation and bisection,
then searches the neighbouring sizes and the second knob for a prompt of exactly the target length.
Tokenisation is not additive, so each candidate is tokenised whole.

Demo: `python -m kascade.eval.tasks niah_multikey 4096 --tokenizer models/kascade-tiny` (or `records`, ...)
prints a sample.

Seeds: evaluation seeds are in [0, 1_000_000); training data uses seeds >= 1_000_000 and keys of the
other pool (`templates.is_eval_key`), so no evaluation key is ever seen in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from kascade.eval import families as F
from kascade.eval import generators as G
from kascade.eval import templates as T
from kascade.eval.metrics import string_match_all

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "kv",
         "copy", "sequence", "doc_qa_chat") + F.FAMILY_TASKS
DECODE_TASKS = ("copy", "sequence")
CHAT_TASKS = ("doc_qa_chat",) + F.CHAT_FAMILY_TASKS
HAYSTACKS = ("filler", "essay")
ALIASES = {"seq": "sequence"}


@dataclass
class TaskSample:
    """One task instance.

    prompt    the model input (ends without a trailing space, except chat tasks, which end with the chat
              template's generation prompt); len(tokenizer(prompt).input_ids) == length
    target    the expected continuation: the answer (" 4721093") or the passage / sequence to produce
              (prompts end without white space: a trailing blank line, as copy's, starts the target); for
              chat tasks an answer sentence in the assistant turn
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


def fit_length(shape: G.Shape, target: int, count: Callable[[str], int], task: str = "task",
               window: int = 64) -> G.Draft:
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


def chat_renderer(tokenizer, task: str = "doc_qa_chat") -> Callable[[str | list[dict]], str]:
    """render(user_text) -> the tokenizer's chat template around one user turn, generation prompt added;
    render(messages) (a list of {"role", "content"}) -> the template around all of them.

    When the template writes the BOS token and the tokenizer adds it too, the written one is dropped, so
    that the model sees it once."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer: task {task!r} renders its prompt with the tokenizer's chat template, and this "
                         "tokenizer has none; use an instruction-tuned model (its tokenizer_config.json has a "
                         f"chat_template), set tokenizer.chat_template, or leave {task} out of --tasks")
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]

    def render(user_text: str | list[dict]) -> str:
        messages = [{"role": "user", "content": user_text}] if isinstance(user_text, str) else user_text
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if adds_bos and text.startswith(bos):
            text = text[len(bos):]
        return text

    return render


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
    hay = G.Essay(text, rng) if (haystack == "essay" and needs_text) else G.Filler()
    if task == "niah_single":
        shape = G.niah_shape(rng, hay, 1, 1, 1)
    elif task == "niah_multikey":
        shape = G.niah_shape(rng, hay, 4, 1, 1)
    elif task == "niah_multivalue":
        shape = G.niah_shape(rng, hay, 1, 4, 1)
    elif task == "niah_multiquery":
        shape = G.niah_shape(rng, hay, 4, 1, 4)
    elif task == "vt":
        shape = G.vt_shape(rng, hay)
    elif task == "kv":
        shape = G.kv_shape(rng)
    elif task == "cwe":
        shape = G.cwe_shape(rng, length, count)
    elif task == "fwe":
        shape = G.fwe_shape(rng, length)
    elif task == "copy":
        shape = G.copy_shape(rng, hay if isinstance(hay, G.Essay) else G.Essay(text, rng))
    elif task == "sequence":
        shape = G.sequence_shape(rng, length, count, continuation_chars)
    elif task == "doc_qa_chat":
        shape = G.doc_qa_shape(rng, chat_renderer(tokenizer, task))
    else:
        shape = F.family_shape(task, rng, chat_renderer(tokenizer, task) if task in CHAT_TASKS else None)
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


def main(argv=None) -> int:
    """Print one sample: `python -m kascade.eval.tasks TASK LENGTH --tokenizer DIR [--seed N]`."""
    import argparse

    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("length", type=int)
    ap.add_argument("--tokenizer", required=True, help="local tokenizer (or model) directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="filler", choices=HAYSTACKS)
    ap.add_argument("--data", default=None, help="long text file (essay haystacks, copy)")
    args = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    text = open(args.data, encoding="utf-8").read() if args.data else None
    s = make_task(args.task, args.length, tok, args.seed, haystack=args.haystack, text=text)
    print(s.prompt[:600] + ("\n[...]\n" + s.prompt[-600:] if len(s.prompt) > 1200 else s.prompt[600:]))
    print(f"\n--- {len(tok(s.prompt).input_ids)} tokens; target {s.target[:200]!r}; answers {s.answers}")
    for a, b in s.spans[:8]:
        print(f"fact at characters {a}..{b} ({a / len(s.prompt):.0%}): {s.prompt[a:b][:100]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
