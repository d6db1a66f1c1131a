"""Metrics against hand-computed values; the LongBench-format loader, prompts and scores on fixtures."""

import json

import pytest

from fixtures import evaltools as E
from kascade.eval import longbench as LB
from kascade.eval import metrics as M

SAMPLE = E.FIXTURES / "longbench_sample.jsonl"


def test_string_match():
    assert M.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert M.string_match_all("ABC", ["abc"]) == 1.0  # case-insensitive, as RULER
    assert M.string_match_all("anything", []) == 0.0
    assert M.string_match_part("only 456 here", ["123", "456"]) == 1.0
    assert M.string_match_part("nothing", ["123", "456"]) == 0.0


def test_normalisation_and_f1():
    assert M.normalize_answer("The  Cat, sat!  on a mat.") == "cat sat on mat"
    # pred [cat, sat, on, mat], ref [cat, on, mat]: 3 common -> P 3/4, R 1 -> F1 6/7
    assert M.qa_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert M.qa_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped
    assert M.qa_f1("dog", "cat") == 0.0
    assert M.qa_f1("", "cat") == 0.0


def test_lcs_and_rouge_l():
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4
    assert M.lcs_length([], [1, 2]) == 0
    # 7 predicted words, 6 reference words, LCS 6 -> P 6/7, R 1 -> F1 12/13
    assert M.rouge_l("The cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)
    assert M.rouge_l("", "abc") == 0.0
    assert M.rouge_l("x y z", "a b c") == 0.0


def test_edit_similarity_and_code_sim():
    # LCS("kitten", "sitting") = 4 ("ittn") -> 2 * 4 / 13
    assert M.edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert M.edit_similarity("", "") == 1.0
    assert M.edit_similarity("abc", "") == 0.0
    pred = "```python\n# the next line\n    return a * b\nprint(1)"
    assert M.first_code_line(pred) == "    return a * b"
    assert M.code_sim(pred, "    return a * b") == 1.0


def test_classification_retrieval_count():
    classes = ["Abbreviation", "Abbreviation expansion", "Location", "Human being"]
    assert M.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert M.classification_score("Location or Human being", "Location", all_classes=classes) == 0.5
    assert M.classification_score("Human being", "Location", all_classes=classes) == 0.0
    # a found class that is part of the reference's name does not count against it
    assert M.classification_score("Abbreviation expansion", "Abbreviation expansion", all_classes=classes) == 1.0
    assert M.retrieval_score("Paragraph 12, or maybe 3", "Paragraph 12") == 0.5
    assert M.retrieval_score("no idea", "Paragraph 12") == 0.0
    assert M.count_score("There are 7 paragraphs", "7") == 1.0
    assert M.count_score("7 or 8", "7") == 0.5
    assert M.qa_f1_zh("北京是首都", "首都北京") == pytest.approx(2 * (4 / 5) * 1 / (4 / 5 + 1))
    assert M.retrieval_score_zh("段落3", "段落3") == 1.0


def test_longbench_loader_and_scores():
    examples = LB.load_jsonl(SAMPLE)
    assert [e.dataset for e in examples] == ["hotpotqa", "gov_report", "trec_e", "lcc", "passage_count",
                                             "passage_retrieval_en"]
    assert [e.metric for e in examples] == ["qa_f1", "rouge_l", "classification", "code_sim", "count", "retrieval"]
    hq, gr, trec, lcc, pc, pr = examples
    assert hq.answers == ["1889"] and hq.id == "hq-1" and hq.length == 20
    assert LB.score(hq, "1889.") == 1.0
    assert LB.score(hq, "It was 1889.") == pytest.approx(0.5)  # P 1/3, R 1
    assert LB.score(hq, "in 1889 I think") == pytest.approx(2 * (1 / 4) / (1 + 1 / 4))
    assert LB.score(gr, "The committee approved new funds for the library.") == 1.0
    assert LB.score(trec, "Location\nHuman being") == 1.0  # few-shot tasks: first line only
    assert LB.score(lcc, "    return a * b\n") == 1.0
    assert LB.score(pc, "2") == 1.0 and LB.score(pc, "3") == 0.0
    assert LB.score(pr, "Paragraph 2") == 1.0
    assert len(LB.load_jsonl(SAMPLE, limit=2)) == 2


def test_longbench_prompt_fits_budget():
    tok = E.tokenizer()
    ex = LB.load_jsonl(SAMPLE)[0]
    full = LB.build_prompt(ex)
    assert ex.context in full and full.rstrip().endswith("Answer:") and ex.input in full
    long_ex = LB.LongBenchExample("hotpotqa", "START " + E.ESSAY.read_text() + " END", "Which year?", ["1889"])
    prompt = LB.build_prompt(long_ex, tok, max_tokens=300)
    assert len(tok(prompt).input_ids) <= 300
    assert "START" in prompt and "END" in prompt and "Which year?" in prompt  # the middle went
    assert LB.build_prompt(ex, tok, max_tokens=10_000) == full
    with pytest.raises(ValueError, match="no room"):
        LB.build_prompt(long_ex, tok, max_tokens=5)


def test_longbench_errors(tmp_path):
    with pytest.raises(ValueError, match="no file"):
        LB.load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        LB.load_jsonl(bad)
    bad.write_text(json.dumps({"context": "c", "answers": ["a"], "dataset": "hotpotqa"}) + "\n")
    with pytest.raises(ValueError, match="input"):
        LB.load_jsonl(bad)
    bad.write_text(json.dumps({"context": "c", "input": "i", "answers": ["a"], "dataset": "mystery"}) + "\n")
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        LB.load_jsonl(bad)
    named = tmp_path / "qasper.jsonl"  # the dataset name from the file name
    named.write_text(json.dumps({"context": "c", "input": "i", "answers": "a"}) + "\n")
    assert LB.load_jsonl(named)[0].dataset == "qasper"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        LB.load_jsonl(tmp_path / "empty.jsonl")
