"""Prompt strings of the evaluation tasks that `kascade.eval.templates` does not define (yet).

cwe and fwe are kept in RULER's wording (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?") so that they can move into `kascade.eval.templates` unchanged. As there, a
prompt ends with the answer prefix (no trailing space) and the model continues after it. doc_qa_chat
(the last section) is the project's own: a user turn rendered with the model's chat template.
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


# --------------------------------------------------------------------------------------------
# Document question answering in a chat turn (doc_qa_chat): the project's own wording, not RULER's.
# A warehouse's daily log: a few entries, each with one delivery's lot number among generated notes;
# the user turn ends with a question about one delivery, and the prompt is rendered with the model's
# chat template.
# --------------------------------------------------------------------------------------------
DOC_QA_ENTRIES = 8  # log entries, one delivery (one lot number) each, whatever the length
DOC_QA_INTRO = "The daily log of the {warehouse} warehouse follows.\n\n"
DOC_QA_ENTRY = "Day {day}, {weekday}."
DOC_QA_FACT = "The lot number of the {material} {item} from {depot} is {lot}."
DOC_QA_NOTES = (
    "{person} checked the seals on the {container}s along the {side} wall.",
    "The forklift in the {side} aisle was serviced before the {shift} shift.",
    "{person} asked for more room near the loading dock.",
    "Rain delayed the trucks from {depot} by an hour.",
    "The {shift} shift swept the floor and stacked the empty {container}s.",
    "{person} and {other} counted the {material} stock again.",
    "A driver from {depot} waited at the gate until the {shift} shift began.",
    "{person} moved the ladders to the {side} corner.",
    "The lights over the {side} racks were replaced.",
    "{person} reported that the scanner at the {side} door was slow.",
    "{person} trained {other} on the new labelling rules.",
    "The {side} loading bay stayed closed for cleaning during the {shift} shift.",
)
DOC_QA_REMARKS = "\nRemarks:"
DOC_QA_QUESTION = (
    "\n\nQuestion: In the log above, what is the lot number of the {material} {item} from {depot}? "
    "Answer with the lot number."
)
DOC_QA_ANSWER = DOC_QA_FACT
DOC_QA_MATERIALS = ("copper", "steel", "brass", "cedar", "oak", "glass", "ceramic", "rubber", "linen", "wool",
                    "granite", "bamboo", "nickel", "walnut", "marble", "canvas")
DOC_QA_ITEMS = ("valves", "hinges", "lanterns", "spools", "brackets", "kettles", "tiles", "gears", "pulleys",
                "buckets", "ladders", "clamps", "bolts", "pipes", "fittings", "rollers", "chisels", "lamps",
                "springs", "rivets", "handles", "panels", "wheels", "shutters")
DOC_QA_CONTAINERS = ("crate", "pallet", "case", "carton", "drum", "bundle")
DOC_QA_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
DOC_QA_SIDES = ("north", "south", "east", "west")
DOC_QA_SHIFTS = ("morning", "evening", "night")
DOC_QA_DEPOT_KINDS = ("Depot", "Yard", "Works", "Mill", "Wharf", "Station")
DOC_QA_REMARK_WORDS = ("sealed", "counted", "intact", "stacked", "dry", "labelled", "weighed", "clean",
                       "checked", "wrapped")
