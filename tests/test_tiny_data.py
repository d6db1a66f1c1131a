"""kascade-tiny data: corpus split, synthetic generators, templates, tokenizer."""

import random
import re
from pathlib import Path

import pytest

from kascade.eval import templates as T
from kascade.tiny import HELDOUT_PATH, MODEL_DIR
from kascade.tiny import corpus
from kascade.tiny.synthetic import (
    TASKS, FillerHaystack, StringSource, fit_to_tokens, make_key, make_sample, var_name, hex_uuid,
)

ESSAY = StringSource("".join(f"Line {i} of held-out text about parsers and tokens.\n" for i in range(400)))


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    for i in range(60):
        d = root / f"pkg{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(
            f'"""Module {i}: a docstring long enough to keep, with several words of prose.\n\n'
            f'It explains what the module does, in a paragraph of plain words, so that the\n'
            f'docstring document of the file passes the minimum length."""\n'
            f"def f{i}(x):\n    \"\"\"Return x plus {i}, a function docstring of enough length.\"\"\"\n"
            f"    return x + {i}\n" + "# padding\n" * 8)
    (root / "pkg0" / "dup.py").write_text((root / "pkg0" / "mod0.py").read_text())  # exact duplicate
    (root / "pkg0" / "data.txt").write_text("not python")
    return root


def test_corpus_split_is_deterministic_and_disjoint(tmp_path):
    root = _fake_root(tmp_path)
    files = corpus.list_files([("stdlib", root)])
    assert files == corpus.list_files([("stdlib", root)])
    assert [r for r, _ in files] == sorted(r for r, _ in files)
    assert all(r.endswith(".py") for r, _ in files)
    held = {r for r, _ in files if corpus.is_heldout(r)}
    train = {r for r, _ in files if not corpus.is_heldout(r)}
    assert held.isdisjoint(train) and held | train == {r for r, _ in files}
    docs = list(corpus.iter_documents(files, workers=1))
    assert docs == list(corpus.iter_documents(files, workers=1))
    sources = [d for d in docs if d.kind == "source"]
    assert len(sources) == len(files) - 1  # the duplicate is dropped
    assert any(d.kind == "docstrings" for d in docs)


def test_heldout_fraction_and_stability():
    paths = [f"site-packages/pkg{i}/module_{i}.py" for i in range(20000)]
    frac = sum(map(corpus.is_heldout, paths)) / len(paths)
    assert 0.02 < frac < 0.04
    # the split is a pure function of the path
    assert [corpus.is_heldout(p) for p in paths[:200]] == [corpus.is_heldout(p) for p in paths[:200]]


def test_heldout_text_shipped():
    assert HELDOUT_PATH.exists()
    size = HELDOUT_PATH.stat().st_size
    assert 500_000 < size <= 2_000_000


@pytest.mark.parametrize("task", TASKS)
def test_synthetic_deterministic_per_seed(task):
    a = make_sample(task, 1_000_321, 3000, "train", essay=ESSAY)
    b = make_sample(task, 1_000_321, 3000, "train", essay=ESSAY)
    c = make_sample(task, 1_000_322, 3000, "train", essay=ESSAY)
    assert (a.prompt, a.answer, a.spans) == (b.prompt, b.answer, b.spans)
    assert a.text != c.text
    assert a.answer and a.answers


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_niah_answer_is_where_it_says(task, seed):
    s = make_sample(task, seed, 4000, "eval", essay=ESSAY)
    assert s.prompt.startswith(T.NIAH_PREFIX)
    found = []
    for a, b in s.spans:
        m = re.fullmatch(r"One of the special magic numbers for (\S+) is: (\d+)\.", s.prompt[a:b])
        assert m, s.prompt[a:b]
        assert m.group(1) in s.meta["queried"]
        found.append(m.group(2))
    assert sorted(found) == sorted(s.answers)
    for v in s.answers:
        assert s.prompt.count(v) == 1 and v in s.answer
    assert s.prompt.endswith("mentioned in the provided text is" if task in ("niah_single", "niah_multikey")
                             else "mentioned in the provided text are")
    assert s.answer.startswith(" ")


def test_niah_depth_is_respected():
    s = make_sample("niah_single", 5, 20000, "eval", haystack="filler", depths=[0.75])
    a, _ = s.spans[0]
    assert 0.65 < a / len(s.prompt) < 0.85


def test_kv_vt_copy_seq_answers():
    kv = make_sample("kv", 21, 3000, "eval")
    (a, b), = kv.spans
    key = kv.prompt[a + 1:a + 37]
    assert kv.prompt[a:b] == T.kv_pair(key, kv.answers[0]) and kv.answer == " " + kv.answers[0]
    assert kv.prompt.endswith(T.kv_question(key))

    vt = make_sample("vt", 22, 3000, "eval", haystack="filler", n_chains=2, n_hops=4)
    chain = vt.answers
    assert len(chain) == 5 and vt.answer == T.vt_answer(chain)
    stmts = [vt.prompt[a:b] for a, b in vt.spans]
    assert stmts[0] == T.vt_assign(chain[0], value=vt.meta["value"])
    assert stmts[1:] == [T.vt_assign(b, source=a) for a, b in zip(chain[:-1], chain[1:])]
    assert [a for a, _ in vt.spans] == sorted(a for a, _ in vt.spans)
    assert vt.prompt.endswith(T.vt_question(vt.meta["value"]))

    cp = make_sample("copy", 23, 2000, "eval", essay=ESSAY)
    (a, b), = cp.spans
    assert cp.prompt[a:b] == cp.answer and cp.prompt.endswith(T.COPY_INSTRUCTION)

    sq = make_sample("seq", 24, 2000, "eval")
    assert sq.prompt.startswith(T.SEQ_PREFIX) and len(sq.answer) > 0


def test_training_vt_documents_carry_more_questions():
    s = make_sample("vt", 1_000_555, 3000, "train", haystack="filler", n_chains=3, n_questions=3)
    assert s.answer.count("Question:") == 2
    assert s.answer.startswith(T.vt_answer(s.answers))


def test_seed_ranges_and_key_pools():
    with pytest.raises(ValueError):
        make_sample("niah_single", 5, 1000, "train")
    with pytest.raises(ValueError):
        make_sample("niah_single", 1_000_000, 1000, "eval")
    rng = random.Random(0)
    for _ in range(300):
        assert not T.is_eval_key(make_key(rng, "train"))
        assert T.is_eval_key(make_key(rng, "eval"))
        assert not T.is_eval_key(var_name(rng, "train"))
        assert T.is_eval_key(hex_uuid(rng, "eval"))


def test_fit_to_tokens_stays_under_budget():
    def count(text):
        return len(text) // 4 + 1

    for target in (500, 2000, 8192):
        s, n = fit_to_tokens(lambda c: make_sample("niah_single", 7, c, "eval", haystack="filler"),
                             target, count, chars_per_token=3.0)
        assert n == count(s.text) and 0.9 * target <= n <= target


def test_template_helpers():
    assert T.join_keys(["a"]) == "a" and T.join_keys(["a", "b", "c"]) == "a, b and c"
    assert T.answer_list([1, 2]) == " 1 and 2"
    assert T.niah_question("k").endswith("text is")
    assert T.niah_question(["k", "j"]).endswith("text are")
    assert T.match_all("1 and 2", ["1", "2", "3"]) == pytest.approx(2 / 3)


def test_tokenizer_splits_digits():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    ids = tok("is 4721093", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-7:] == list("4721093")
    full = tok("hello")["input_ids"]
    assert full[0] == tok.bos_token_id
    assert tok.decode(tok("x = 12  # ok\n")["input_ids"], skip_special_tokens=True) == "x = 12  # ok\n"
