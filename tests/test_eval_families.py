"""The structured evaluation families (kascade.eval.families): exact lengths, the key and the answer once,
prompts that end in the data's own text up to the answer, wording that varies with the seed, errors."""

import copy
import functools
import random
import re

import pytest

from kascade.eval import families as F
from kascade.eval import tasks as TK
from kascade.models import TINY_MODEL_DIR
from kascade.testbed import SMOLLM2_DIR

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LENGTHS = (1024, 2048, 4096, 8064)


@functools.lru_cache(maxsize=None)
def tiny(chat: bool = False):
    """The shipped tiny model's tokenizer (digits one by one); with `chat`, a copy with a ChatML template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    if chat:
        tok = copy.deepcopy(tok)
        tok.chat_template = CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def smollm2():
    from transformers import AutoTokenizer

    if not (SMOLLM2_DIR / "tokenizer.json").is_file():
        pytest.skip("SmolLM2-135M-Instruct not installed (bash scripts/get-smollm2.sh)")
    return AutoTokenizer.from_pretrained(SMOLLM2_DIR, local_files_only=True)


def _tok(task):
    return tiny(chat=task in TK.CHAT_TASKS)


def _check(s, tok, task, length):
    """What every sample of a family task must satisfy."""
    assert len(tok(s.prompt).input_ids) == length
    assert s.task == task and s.meta["family"] == F.FAMILY[task] and not s.decode_heavy
    answer, key = s.answers[0], s.meta["key"]
    (a, b), = s.spans
    item = s.prompt[a:b]
    assert s.prompt.count(answer) == 1 and answer in item  # the answer: once, in the queried item
    if task == "log_lookup":
        assert s.meta["carriers"] == 1  # the queried line alone carries the field
    else:
        assert CARRIERS[0] <= s.meta["carriers"] <= CARRIERS[1]
    if task in TK.CHAT_TASKS:
        assert s.prompt.endswith("<|im_start|>assistant\n")
        history = s.prompt[: s.prompt.rindex("<|im_start|>user")]
        assert history.count(key) == 1 and key in item  # the code's kind: named in its turn only
        assert s.target == F.CHAT_ANSWER.format(kind=key, value=answer)
        assert f"my {key} is {answer}" in item  # the reply's "Your <kind> is" continues as the fact reads
    else:
        assert s.prompt == s.prompt.rstrip()
        data = s.prompt[: s.prompt.rindex("\n\n")]  # everything before the question
        assert data.count(key) == 1 and key in item  # the key: once in the data, in the queried item
        # the answer prefix restates the queried item's text up to the answer, which the target continues
        n = max(n for n in range(1, 200) if s.prompt[-n:] + s.target.rstrip(":)") in item)
        restated = s.prompt[-n:]
        assert n > len(key) or task == "multi_doc", (restated, s.target, item)
        assert (s.meta["subject"] if task == "multi_doc" else key) in restated  # what names the item
    assert TK.score(s, s.target) == 1.0 and TK.score(s, " nothing here") == 0.0
    assert TK.max_new_tokens(s, tok, 128) == len(tok(s.target, add_special_tokens=False).input_ids) + 16


CARRIERS = F.CARRIERS


@pytest.mark.parametrize("task", F.FAMILY_TASKS)
def test_exact_lengths_with_the_tiny_tokenizer(task):
    tok = _tok(task)
    for i, length in enumerate(LENGTHS):
        s = TK.make_task(task, length, tok, seed=11 + i)
        _check(s, tok, task, length)
    assert s.meta["n_items"] > 40  # 8064 tokens: many near-identical items


@pytest.mark.parametrize("task", F.FAMILY_TASKS)
def test_exact_lengths_with_smollm2(task):
    tok = smollm2()  # its own chat template for chat_history
    for length, seed in ((2048, 3), (4096, 4)):
        _check(TK.make_task(task, length, tok, seed), tok, task, length)


def test_registered_like_the_retrieval_tasks():
    assert set(F.FAMILY) == set(F.FAMILY_TASKS) and set(F.FAMILY_TASKS) <= set(TK.TASKS)
    assert set(F.FAMILY.values()) == set(F.FAMILY_TASKS) - {"log_lookup"}  # each task is its own family,
    assert F.FAMILY["log_lookup"] == "records"  # but log_lookup, a records task (the records fold of calibration)
    assert "chat_history" in TK.CHAT_TASKS and not set(F.FAMILY_TASKS) & set(TK.DECODE_TASKS)
    assert TK.canonical_task("json_records") == "json_records"


def test_wording_varies_with_the_seed():
    for task in F.FAMILY_TASKS:
        tok = _tok(task)
        samples = [TK.make_task(task, 1024, tok, seed) for seed in range(10)]
        assert len({s.meta["template"] for s in samples}) >= 2, task  # question templates
        assert len({s.meta["head"] for s in samples}) >= 2, task  # surrounding wording
        names = {s.meta.get("field") or s.meta.get("attr") or s.meta.get("const") or s.meta["key"] for s in samples}
        assert len(names) >= 3, (task, names)  # field / column / constant / fact names, or the chat's kinds
        assert len({s.meta["carriers"] for s in samples}) >= 2 or task == "log_lookup", task
        depths = [s.meta["depths"][0] for s in samples]
        assert min(depths) < 0.3 and max(depths) > 0.6, (task, depths)  # early and late
        assert len({s.prompt for s in samples}) == len(samples)
    formats = {TK.make_task(t, 1024, tiny(), seed).meta["format"]
               for t in ("json_records", "table") for seed in range(16)}
    assert formats == {"array", "lines", "indented", "csv", "markdown"}


def test_log_lookup_one_line_carries_the_token():
    """Near-identical lines (the same field names in the same order), the queried one alone with the token
    field right after its request id; the head names the field; the token is a pronounceable word; depths
    uniform over the lines."""
    depths = []
    for seed in range(16):
        s = TK.make_task("log_lookup", 1024, tiny(), seed)
        field, key_name, answer = s.meta["field"], s.meta["key_name"], s.answers[0]
        assert s.meta["family"] == "records" and s.target == answer
        assert re.fullmatch(r"([bdfgklmnprstvz][aeiou]){3}", answer), answer
        head, data = s.prompt.split("\n\n", 2)[:2]
        assert f" {field}." in head or f" {field} as well" in head  # the head says one line carries it
        lines = [x for x in data.split("\n") if f" {key_name}=" in x]
        assert len(lines) == s.meta["n_items"] >= 10
        carriers = [x for x in lines if f" {field}=" in x]
        assert len(carriers) == 1 and f"{key_name}={s.meta['key']} {field}={answer}" in carriers[0]
        names = {tuple(n for n in re.findall(r" (\w+)=", x) if n != field) for x in lines}
        assert len(names) == 1, names  # every line: the same fields in the same order
        depths.append(s.meta["index"] / (s.meta["n_items"] - 1))
    assert min(depths) < 0.1 and max(depths) > 0.9, depths  # first lines and last lines


def test_deterministic():
    a = TK.make_task("records", 1024, tiny(), 5)
    b = TK.make_task("records", 1024, tiny(), 5)
    assert a.prompt == b.prompt and a.answers == b.answers and a.spans == b.spans


def test_family_wording():
    words = F.family_wording()
    assert words == sorted(set(words)) and all(isinstance(w, str) and w == w.strip() and w for w in words)
    assert not any(re.search(r"\{\w*\}", w) for w in words)  # literal pieces only, no placeholders
    for expected in ("request_id", "sku", "Document", "Your", "windmill", "lentils", "Component"):
        assert any(expected in w for w in words), expected
    for left_out in ("AA-Ddddd", "GET", "INFO", "person"):
        assert left_out not in words
    # the wording a sample writes is listed: its question's pieces among them
    for task in ("records", "table", "multi_doc"):
        question = TK.make_task(task, 1024, tiny(), 0).prompt.rsplit("\n\n", 1)[1]
        assert any(w in question for w in words if len(w) >= 10), (task, question)
    assert "Answer:" in words


def test_errors():
    with pytest.raises(ValueError, match="chat template.*has none"):
        TK.make_task("chat_history", 1024, tiny(), 0)
    with pytest.raises(ValueError, match="too short"):
        TK.make_task("records", 64, tiny(), 0)
    with pytest.raises(ValueError, match="evaluation seeds"):
        TK.make_task("json_records", 1024, tiny(), 1_000_000)
    with pytest.raises(ValueError, match="unknown task.*records.*chat_history"):
        TK.make_task("logs", 1024, tiny(), 0)
    with pytest.raises(ValueError, match="not a family task"):
        F.family_shape("niah_single", random.Random(0))
    with pytest.raises(ValueError, match="render"):
        F.family_shape("chat_history", random.Random(0))


def test_demo_prints_a_sample(capsys):
    assert TK.main(["records", "1024", "--tokenizer", str(TINY_MODEL_DIR), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- 1024 tokens" in out and "Answer:" in out
