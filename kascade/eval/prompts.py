"""Prompt strings of the evaluation tasks that `kascade.eval.templates` does not define (yet).

Kept in RULER's wording (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?") so that they can move into `kascade.eval.templates` unchanged. As there, a prompt
ends with the answer prefix (no trailing space) and the model continues after it.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# Common words extraction (cwe): a numbered list "1. word 2. word ..." in which ten words are
# frequent; the answer is those ten.
# --------------------------------------------------------------------------------------------
CWE_NUM_COMMON = 10
CWE_PREFIX = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    "\nQuestion: What are the 10 most common words in the above list? "
    "Answer: The top 10 words that appear most often in the list are:"
)

# --------------------------------------------------------------------------------------------
# Frequent words extraction (fwe): "coded" random words drawn from a Zipf law; the most frequent
# item is the noise "....", the answer is the next three.
# --------------------------------------------------------------------------------------------
FWE_NOISE = "...."
FWE_PREFIX = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text? "
    "Answer: According to the coded text above, the three most frequently appeared words are:"
)


def cwe_item(number: int, word: str) -> str:
    """One entry of the numbered list: ``"12. word"``."""
    return f"{number}. {word}"
