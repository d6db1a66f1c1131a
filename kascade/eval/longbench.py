"""LongBench-format data: a JSONL loader, prompts that fit a token budget, and per-dataset scores.

One example per line, with LongBench's fields (Bai et al., 2024, "LongBench: A Bilingual, Multitask
Benchmark for Long Context Understanding"):

    {"context": "...", "input": "question or query", "answers": ["..."], "all_classes": null | [...],
     "length": 12345, "dataset": "hotpotqa", "_id": "..."}

    from kascade.eval import longbench
    examples = longbench.load_jsonl("hotpotqa.jsonl")
    prompt = longbench.build_prompt(examples[0], tokenizer, max_tokens=8192)
    longbench.score(examples[0], prediction)        # max over the reference answers

Prompts use our own short instructions per task family (the question after the context). Contexts
longer than the budget lose their middle, as in LongBench, so the start and the end of the document
and the whole question stay in the prompt. Metrics per dataset (LongBench-E names with "_e" work too)
are those of LongBench (`kascade.eval.metrics`); few-shot datasets (trec, triviaqa, samsum, lsht) score
only the first line of the prediction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kascade.eval import metrics as M

METRIC_OF_DATASET = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_l_zh",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "vcsum": "rouge_l_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l", "lsht": "classification",
    "passage_retrieval_en": "retrieval", "passage_count": "count", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")
#: new tokens per dataset (LongBench's generation lengths)
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

_QA = ("Read the text below and answer the question after it. Give only the answer, no other words.\n\n"
       "{context}\n\nQuestion: {input}\nAnswer:")
_SUMMARY = "Read the text below, then write the summary it asks for.\n\n{context}\n\n{input}\nSummary:"
_FEWSHOT = "{context}\n{input}"
_COUNT = ("The paragraphs below may repeat. How many different paragraphs are there? Answer with one "
          "number only.\n\n{context}\n\nNumber of different paragraphs:")
_RETRIEVAL = ("Below are numbered paragraphs and then a summary. Which paragraph is the summary of? Answer "
              "like \"Paragraph 3\".\n\n{context}\n\nSummary: {input}\nAnswer:")
_CODE = "Complete the next line of the code below.\n\n{context}{input}"
PROMPT_OF_METRIC = {"qa_f1": _QA, "qa_f1_zh": _QA, "rouge_l": _SUMMARY, "rouge_l_zh": _SUMMARY,
                    "classification": _FEWSHOT, "count": _COUNT, "retrieval": _RETRIEVAL,
                    "retrieval_zh": _RETRIEVAL, "code_sim": _CODE}
REQUIRED = ("context", "input", "answers")


@dataclass
class LongBenchExample:
    dataset: str
    context: str
    input: str
    answers: list[str]
    all_classes: list[str] | None = None
    length: int | None = None
    id: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def base_dataset(self) -> str:
        """Dataset name without LongBench-E's "_e" suffix."""
        return self.dataset[:-2] if self.dataset.endswith("_e") else self.dataset

    @property
    def metric(self) -> str:
        name = self.base_dataset
        if name not in METRIC_OF_DATASET:
            raise ValueError(f"dataset: unknown LongBench dataset {self.dataset!r}; expected one of "
                             f"{sorted(METRIC_OF_DATASET)} (optionally with '_e')")
        return METRIC_OF_DATASET[name]


def load_jsonl(path, dataset: str | None = None, limit: int | None = None) -> list[LongBenchExample]:
    """Examples of a LongBench-format JSONL file. `dataset` names the dataset when lines lack the field
    (LongBench files are named after it: hotpotqa.jsonl); `limit` keeps the first examples only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"longbench: no file at {path}; expected a LongBench-format JSONL file")
    default = dataset or path.stem
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"longbench: line {n} of {path} is not valid JSON ({e})") from e
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                raise ValueError(f"longbench: line {n} of {path} lacks field(s) {missing}; expected {list(REQUIRED)}")
            answers = rec["answers"]
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"longbench: line {n} of {path}: 'answers' must be a list of strings, got {answers!r}")
            known = set(REQUIRED) | {"all_classes", "length", "dataset", "_id"}
            ex = LongBenchExample(
                dataset=rec.get("dataset") or default, context=str(rec["context"]), input=str(rec["input"]),
                answers=answers, all_classes=rec.get("all_classes"), length=rec.get("length"), id=rec.get("_id"),
                extra={k: v for k, v in rec.items() if k not in known})
            ex.metric  # unknown datasets fail here, with the list of known ones
            out.append(ex)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"longbench: {path} holds no examples")
    return out


def build_prompt(example: LongBenchExample, tokenizer=None, max_tokens: int | None = None) -> str:
    """The prompt of `example`; with a tokenizer and `max_tokens`, the context loses its middle until the
    prompt (special tokens included) fits in `max_tokens` tokens."""
    template = PROMPT_OF_METRIC[example.metric]
    full = template.format(context=example.context, input=example.input)
    if tokenizer is None or max_tokens is None:
        return full
    if len(tokenizer(full).input_ids) <= max_tokens:
        return full
    overhead = len(tokenizer(template.format(context="", input=example.input)).input_ids)
    room = max_tokens - overhead
    if room < 2:
        raise ValueError(f"max_tokens: {max_tokens} leaves no room for the context of a {example.dataset} example "
                         f"(instruction and question take {overhead} tokens)")
    ids = tokenizer(example.context, add_special_tokens=False).input_ids
    while True:
        half = room // 2
        ctx = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[len(ids) - (room - half):], skip_special_tokens=True)
        prompt = template.format(context=ctx, input=example.input)
        n = len(tokenizer(prompt).input_ids)
        if n <= max_tokens or room <= 2:
            return prompt
        room -= max(1, n - max_tokens)  # re-tokenising the decoded halves may merge differently


@dataclass
class LongBenchSample:
    """A LongBench example as a prompt of at most `length` tokens (what `kascade eval` runs)."""

    task: str
    seed: int
    length: int
    prompt: str
    target: str
    answers: list[str]
    example: LongBenchExample
    decode_heavy: bool = False

    def max_new_tokens(self, cap: int) -> int:
        return min(cap, MAX_NEW_TOKENS.get(self.example.base_dataset, 64))


def make_sample(example: LongBenchExample, tokenizer, max_tokens: int, task: str, index: int) -> LongBenchSample:
    prompt = build_prompt(example, tokenizer, max_tokens)
    return LongBenchSample(task, index, max_tokens, prompt, example.answers[0] if example.answers else "",
                           list(example.answers), example)


def score(example: LongBenchExample, prediction: str) -> float:
    """LongBench score of one prediction in [0, 1]: the best over the reference answers."""
    if example.base_dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = M.METRICS[example.metric]
    return max((fn(prediction, ref, all_classes=example.all_classes) for ref in example.answers), default=0.0)
