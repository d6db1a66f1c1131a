"""Task generators: exact token lengths, facts where the sample says, determinism, scoring, errors."""

import copy
import functools
import re
from collections import Counter

import pytest

from fixtures import evaltools as E
from kascade.eval import families as F
from kascade.eval import prompts as P
from kascade.eval import tasks as TK
from kascade.eval import templates as T

TEXT = E.ESSAY.read_text()
# the shortest length each task reaches with the test tokenizer is below these
LENGTHS = {"niah_multiquery": (320, 1024), "cwe": (512, 1000), "fwe": (600, 1024), "doc_qa_chat": (777, 1500)}


def _cases():
    for task in TK.TASKS:
        if task in F.FAMILY:  # the structured families: tests/test_eval_families.py
            continue
        for length in LENGTHS.get(task, (256, 777)):
            for seed in (0, 1):
                yield task, length, seed


# a ChatML-style template (as SmolLM2's and Qwen's): one turn per message, then the assistant's header
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=None)
def chat_tokenizer(template: str = CHAT_TEMPLATE):
    """The test tokenizer with a chat template (a copy: the shared one stays without)."""
    tok = copy.deepcopy(E.tokenizer())
    tok.chat_template = template
    return tok


def _tokenizer_for(task):
    return chat_tokenizer() if task in TK.CHAT_TASKS else E.tokenizer()


@pytest.mark.parametrize("task,length,seed", list(_cases()))
def test_exact_length_and_facts_in_place(task, length, seed):
    tok = _tokenizer_for(task)
    haystack = "essay" if seed == 1 else "filler"
    s = TK.make_task(task, length, tok, seed, haystack=haystack, text=TEXT)
    assert len(tok(s.prompt).input_ids) == length
    assert s.task == task and s.length == length and s.seed == seed
    if task in TK.CHAT_TASKS:  # the chat template's generation prompt ends the prompt
        assert s.prompt.endswith("<|im_start|>assistant\n")
    else:
        assert s.prompt == s.prompt.rstrip()  # no trailing white space: the boundary tokenises as in training
    CHECKS[task](s)


def test_exact_length_without_digit_splitting():
    tok = E.tokenizer(split_digits=False)
    for task in ("niah_single", "kv", "vt", "copy", "sequence", "cwe"):
        for length in (600, 1500):
            s = TK.make_task(task, length, tok, 3, text=TEXT)
            assert len(tok(s.prompt).input_ids) == length, (task, length)


def _check_niah(s):
    needles = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", s.prompt)
    n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[s.task]
    n_values = 4 if s.task == "niah_multivalue" else 1
    assert len({k for k, _ in needles}) == n_keys
    assert len(needles) == n_keys - 1 + n_values if s.task != "niah_multiquery" else len(needles) == 4
    queried = s.meta["queried"]
    assert s.prompt.endswith(T.niah_question(queried, multi=s.task in ("niah_multivalue", "niah_multiquery")))
    assert len(s.spans) == len(s.answers)
    for (a, b), value in zip(sorted(s.spans), [v for k, v in needles if k in queried]):
        key, val = re.fullmatch(r"One of the special magic numbers for (\S+) is: (\d+)\.", s.prompt[a:b]).groups()
        assert key in queried and val == value and val in s.answers
    assert all(T.is_eval_key(k) for k, _ in needles)
    assert s.target == (" " + s.answers[0] if len(s.answers) == 1 else T.answer_list(s.answers))
    assert TK.score(s, s.target) == 1.0


def _check_vt(s):
    chain = s.meta["chains"][0]
    value = s.meta["values"][0]
    texts = [s.prompt[a:b] for a, b in s.spans]
    assert texts[0] == T.vt_assign(chain[0], value=value)
    assert texts[1:] == [T.vt_assign(b, source=a) for a, b in zip(chain[:-1], chain[1:])]
    assert [a for a, _ in s.spans] == sorted(a for a, _ in s.spans)  # in chain order
    assert s.prompt.endswith(T.vt_question(value))
    assert s.answers == chain and TK.score(s, s.target) == 1.0
    assert TK.score(s, " " + " ".join(chain[:2])) == pytest.approx(2 / len(chain))


def _check_kv(s):
    (a, b), = s.spans
    key = s.meta["key"]
    assert s.prompt[a:b] == T.kv_pair(key, s.answers[0])
    assert s.prompt.count(f'"{key}"') == 2  # once in the object, once in the question
    assert s.prompt.endswith(T.kv_question(key))
    assert TK.score(s, s.target) == 1.0 and TK.score(s, " nothing") == 0.0


def _check_cwe(s):
    (a, b), = s.spans
    words = re.findall(r"\d+\. (\w+)", s.prompt[a:b])
    counts = Counter(words)
    assert {w for w, _ in counts.most_common(10)} == set(s.answers)
    assert all(counts[w] == s.meta["freq_common"] for w in s.answers)
    assert max(c for w, c in counts.items() if w not in s.answers) < s.meta["freq_common"]
    numbers = [int(n) for n in re.findall(r"(\d+)\. \w", s.prompt[a:b])]
    assert numbers == list(range(1, len(numbers) + 1))
    assert s.prompt.endswith(P.CWE_QUESTION)


def _check_fwe(s):
    (a, b), = s.spans
    counts = Counter(w for w in s.prompt[a:b].split() if not set(w) <= {"."})
    top = counts.most_common(4)
    assert [w for w, _ in top[:3]] == s.answers
    assert top[2][1] > top[3][1]  # the answer is unambiguous
    assert s.prompt.endswith(P.FWE_QUESTION)


def _check_copy(s):
    (a, b), = s.spans
    passage = s.prompt[a:b]
    assert s.prompt.endswith(T.COPY_INSTRUCTION.rstrip()) and s.target == "\n\n" + passage
    assert passage in TEXT + "\n" + TEXT or len(passage) > len(TEXT)


def _check_sequence(s):
    (a, b), = s.spans
    body = s.prompt[a:b]
    assert b == len(s.prompt) and s.prompt.startswith(T.SEQ_PREFIX)
    full = body + s.target
    if s.meta["kind"] == "repeat":
        period = s.meta["period"]
        assert len(body) >= 2 * period
        assert all(full[i] == full[i - period] for i in range(period, len(full)))
    else:
        lines = full.split("\n")[1:-1]  # the first may be cut, the last unfinished
        for line in lines:
            m = re.fullmatch(r"(\S+) (\d{5}): (\d+)", line)
            assert m and m.group(1) == s.meta["label"]
            assert int(m.group(3)) == s.meta["start"] + (int(m.group(2)) - 1) * s.meta["step"]


def _check_doc_qa(s):
    (a, b), = s.spans
    lot = s.answers[0]
    material, rest = s.meta["key"].split(" ", 1)
    item, depot = rest.split(" from ")
    assert s.prompt[a:b] == P.DOC_QA_FACT.format(material=material, item=item, depot=depot, lot=lot)
    assert s.prompt.count(lot) == 1
    # eight entries, one lot number each; the queried delivery's material, item and depot appear only in its fact
    user = s.prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
    log, question = user.split("\n\nQuestion: ")
    entries = re.findall(r"Day (\d+), \w+\.", log)
    assert entries == [str(j + 1) for j in range(P.DOC_QA_ENTRIES)]
    assert len(re.findall(r"The lot number of the \w+ \w+ from \w+ \w+ is \d{5}\.", log)) == P.DOC_QA_ENTRIES
    for word in (f"{material} {item}", depot):
        assert log.count(word) == 1
    assert user.startswith("The daily log of the ") and "\n\nQuestion: " + question == P.DOC_QA_QUESTION.format(
        material=material, item=item, depot=depot)
    for banned in ("special magic", "pass key", "grass is green", "code word", "VAR ", "extension"):
        assert banned not in s.prompt
    assert s.target == P.DOC_QA_ANSWER.format(material=material, item=item, depot=depot, lot=lot)
    assert TK.score(s, s.target) == 1.0 and TK.score(s, "The lot number is 1234.") == 0.0
    assert not s.decode_heavy


CHECKS = {"niah_single": _check_niah, "niah_multikey": _check_niah, "niah_multivalue": _check_niah,
          "niah_multiquery": _check_niah, "vt": _check_vt, "kv": _check_kv, "cwe": _check_cwe, "fwe": _check_fwe,
          "copy": _check_copy, "sequence": _check_sequence, "doc_qa_chat": _check_doc_qa}


def test_chat_task_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat template.*has none.*set tokenizer.chat_template"):
        TK.make_task("doc_qa_chat", 512, E.tokenizer(), 0)


def test_chat_task_writes_bos_once():
    """A template that writes the BOS token itself, with a tokenizer that adds it: the model sees it once."""
    tok = chat_tokenizer("<s>" + CHAT_TEMPLATE)
    s = TK.make_task("doc_qa_chat", 800, tok, 2)
    ids = tok(s.prompt).input_ids
    assert len(ids) == 800 and ids.count(tok.bos_token_id) == 1 and s.prompt.startswith("<|im_start|>user")


def test_chat_task_with_the_tiny_models_tokenizer():
    from transformers import AutoTokenizer

    from kascade.models import TINY_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    s = TK.make_task("doc_qa_chat", 2048, tok, 0)
    assert len(tok(s.prompt).input_ids) == 2048 and s.meta["notes"] > 50
    assert TK.max_new_tokens(s, tok, 128) == len(tok(s.target, add_special_tokens=False).input_ids) + 16


def test_deterministic_and_seeded():
    tok = E.tokenizer()
    a = TK.make_task("niah_multikey", 512, tok, 5)
    b = TK.make_task("niah_multikey", 512, tok, 5)
    c = TK.make_task("niah_multikey", 512, tok, 6)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert a.prompt != c.prompt
    assert TK.make_task("seq", 300, tok, 1).task == "sequence"


def test_needle_depth_follows_the_seed():
    tok = E.tokenizer()
    depths = [TK.make_task("niah_single", 1024, tok, s).meta["depths"][0] for s in range(12)]
    assert min(depths) < 0.3 and max(depths) > 0.6  # spread over the haystack


def test_decode_task_scored_per_token():
    tok = E.tokenizer()
    s = TK.make_task("copy", 400, tok, 2, text=TEXT)
    exp = TK.expected_ids(s, tok, 20)
    assert len(exp) == 20
    assert tok.decode(exp) == s.target[: len(tok.decode(exp))]
    full = tok(s.prompt + s.target).input_ids  # the continuation as the whole document tokenises
    assert full[: len(tok(s.prompt).input_ids) + 20][-20:] == exp
    assert TK.score(s, "", generated_ids=exp, tokenizer=tok) == 1.0
    wrong = list(exp)
    wrong[3] = (wrong[3] + 1) % len(tok)
    wrong[7] = (wrong[7] + 1) % len(tok)
    assert TK.score(s, "", generated_ids=wrong, tokenizer=tok) == pytest.approx(18 / 20)
    # an early end of sequence: the missing tokens count as misses
    assert TK.score(s, "", generated_ids=exp[:10], tokenizer=tok, n_expected=20) == pytest.approx(0.5)
    assert TK.max_new_tokens(s, tok, 64) == 64
    with pytest.raises(ValueError, match="per token"):
        TK.score(s, "text")


def test_retrieval_task_budget_of_new_tokens():
    tok = E.tokenizer()
    s = TK.make_task("niah_single", 300, tok, 0)
    n = len(tok(s.target, add_special_tokens=False).input_ids)
    assert TK.max_new_tokens(s, tok, 128) == n + 16
    assert TK.max_new_tokens(s, tok, 4) == 4


def test_errors():
    tok = E.tokenizer()
    with pytest.raises(ValueError, match="niah_single.*vt.*sequence"):
        TK.make_task("needle", 512, tok, 0)
    with pytest.raises(ValueError, match="evaluation seeds"):
        TK.make_task("niah_single", 512, tok, 1_000_000)
    with pytest.raises(ValueError, match="too short"):
        TK.make_task("fwe", 64, tok, 0)
    with pytest.raises(ValueError, match="needs a long text"):
        TK.make_task("copy", 512, tok, 0)
    with pytest.raises(ValueError, match="needs a long text"):
        TK.make_task("niah_single", 512, tok, 0, haystack="essay")
    with pytest.raises(ValueError, match="haystack"):
        TK.make_task("niah_single", 512, tok, 0, haystack="noise")
    with pytest.raises(ValueError, match="length"):
        TK.make_task("niah_single", 0, tok, 0)
