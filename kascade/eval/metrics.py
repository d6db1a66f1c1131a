"""Scores of the accuracy harness: RULER's string match and LongBench's metrics.

RULER (Hsieh et al., 2024):
    string_match_all(pred, refs)   share of the references found in the prediction (case-insensitive)
    string_match_part(pred, refs)  1 if any reference is found

LongBench (Bai et al., 2024), one prediction against one reference; the dataset score of an example is
the maximum over its references (`kascade.eval.longbench.score`):
    qa_f1          token F1 after LongBench's normalisation (lower case, no punctuation, no articles
                   a/an/the, single spaces)
    rouge_l        ROUGE-L F1: longest common subsequence of lower-cased word tokens
    classification 1/m if the reference class is among the m class names found in the prediction (a
                   found name that is a proper substring of the reference does not count), else 0
    retrieval      share of the numbers in the prediction equal to the paragraph number of the reference
    count          share of the numbers in the prediction equal to the reference count
    qa_f1_zh, rouge_l_zh, retrieval_zh: the Chinese variants, over characters instead of jieba words
    code_sim       similarity of the first code line of the prediction (skipping lines with ``` , # or //)
                   to the reference: 2 * LCS / (len(a) + len(b)) over characters, i.e. 1 - normalised
                   insertion/deletion distance, the ratio that LongBench takes from fuzzywuzzy. Written
                   here by hand (a dynamic programme), not difflib, whose ratio is a heuristic.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+")


# ----------------------------------------------------------------------------------------------
# RULER
# ----------------------------------------------------------------------------------------------


def string_match_all(prediction: str, references) -> float:
    refs = list(references)
    if not refs:
        return 0.0
    pred = prediction.lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def string_match_part(prediction: str, references) -> float:
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


# ----------------------------------------------------------------------------------------------
# LongBench
# ----------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens, reference_tokens) -> float:
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F1 over lower-cased word tokens (\\w+)."""
    p, r = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, reference: str, all_classes=None, **_) -> float:
    found = [c for c in (all_classes or []) if c in prediction]
    found = [c for c in found if not (c in reference and c != reference)]
    return 1.0 / len(found) if reference in found else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    m = re.search(r"Paragraph (\d+)", reference)
    if m is None:
        return 0.0
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == m.group(1) for n in numbers) / len(numbers)


def count_score(prediction: str, reference: str, **_) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == str(reference) for n in numbers) / len(numbers)


def first_code_line(prediction: str) -> str:
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def edit_similarity(a: str, b: str) -> float:
    """2 * LCS / (len(a) + len(b)) over characters (1.0 for two empty strings)."""
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def code_sim(prediction: str, reference: str, **_) -> float:
    return edit_similarity(first_code_line(prediction), reference)


def _zh_chars(text: str) -> list[str]:
    return [ch for ch in text if not ch.isspace() and ch not in _PUNCT and ch not in _ZH_PUNCT]


_ZH_PUNCT = set("，。！？；：、“”‘’（）《》【】")


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    """Token F1 over characters (LongBench segments Chinese words with jieba; characters are our
    dependency-free approximation)."""
    return token_f1(_zh_chars(prediction), _zh_chars(reference))


def rouge_l_zh(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F1 over characters (see qa_f1_zh)."""
    p, r = _zh_chars(prediction), _zh_chars(reference)
    lcs = lcs_length(p, r) if p and r else 0
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))


def retrieval_score_zh(prediction: str, reference: str, **_) -> float:
    m = re.search(r"段落(\d+)", reference)
    if m is None:
        return 0.0
    numbers = _NUMBER.findall(prediction)
    return sum(n == m.group(1) for n in numbers) / len(numbers) if numbers else 0.0


METRICS = {"qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge_l": rouge_l, "rouge_l_zh": rouge_l_zh,
           "classification": classification_score, "retrieval": retrieval_score,
           "retrieval_zh": retrieval_score_zh, "count": count_score, "code_sim": code_sim}
