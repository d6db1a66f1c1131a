"""Byte-level BPE tokenizer of ``kascade-tiny`` and pre-tokenisation of the corpus.

* Byte-level BPE (``tokenizers``), vocabulary :data:`VOCAB_SIZE` including
  the special tokens ``<s>`` (bos), ``</s>`` (eos) and ``<pad>``.
* Digits are split one by one before the byte-level step, so every number
  tokenises as a sequence of single digits (magic numbers, values and
  positions read regularly).
* The post-processor prepends ``<s>`` to every encoded text.
* Trained on a deterministic sample of the training text plus synthetic task
  documents (training seeds), so the task formats get compact tokens.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json``: ``AutoTokenizer.from_pretrained(dir)`` gives a
fast tokenizer with bos/eos.

``pretokenize`` turns ``.data/train.txt`` into ``.data/train_tokens.npy``
(uint16; each document as ``<s> ... </s>``), optionally capped in tokens.

Command line::

    python -m kascade.tiny.tokenizer train [--out .data/tokenizer]
    python -m kascade.tiny.tokenizer pretokenize [--max-tokens N] [--carry .data/carry]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from . import DATA_DIR, HELDOUT_PATH

VOCAB_SIZE = 5120
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
MODEL_MAX_LENGTH = 8192
TOKENIZER_SEED = 1_000_007  # training range, see kascade.eval.templates


def build_tokenizer_object():
    """An untrained ``tokenizers.Tokenizer`` with the project's pipeline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _set_post_processor(tok) -> None:
    from tokenizers import processors

    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])


def training_texts(data_dir: Path, sample_mb: float, n_synthetic: int, seed: int = TOKENIZER_SEED) -> Iterator[str]:
    """A deterministic sample of training documents, then synthetic documents."""
    from .corpus import read_train_documents
    from .synthetic import TASKS, StringSource, make_sample

    rng = random.Random(seed)
    budget = int(sample_mb * 1e6)
    size = 0
    keep: list[str] = []
    for doc in read_train_documents(data_dir):
        if rng.random() < 0.35:
            yield doc
            size += len(doc)
            if len(keep) < 2000:
                keep.append(doc)
            if size >= budget:
                break
    essay = StringSource("\n".join(keep))
    for i in range(n_synthetic):
        task = TASKS[i % len(TASKS)]
        n_chars = rng.choice([1000, 2000, 4000])
        yield make_sample(task, seed + 1 + i, n_chars, "train", essay=essay).text


def train_tokenizer(out_dir: Path, data_dir: Path = DATA_DIR, vocab_size: int = VOCAB_SIZE,
                    sample_mb: float = 40.0, n_synthetic: int = 3000):
    """Train and save the tokenizer; return the ``PreTrainedTokenizerFast``."""
    from tokenizers import pre_tokenizers, trainers

    tok = build_tokenizer_object()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_texts(Path(data_dir), sample_mb, n_synthetic), trainer=trainer)
    _set_post_processor(tok)
    return save_tokenizer(tok, out_dir)


def save_tokenizer(tok, out_dir: Path):
    """Save a ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=MODEL_MAX_LENGTH)
    fast.save_pretrained(str(out_dir))
    # A plain, version-independent config (older and newer transformers agree on it).
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "model_max_length": MODEL_MAX_LENGTH,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
    return fast


def load_raw(tok_dir: Path):
    """The ``tokenizers.Tokenizer`` of a saved tokenizer folder."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))


def pretokenize(tok_dir: Path, data_dir: Path = DATA_DIR, max_tokens: int | None = None,
                out_name: str = "train_tokens.npy", batch: int = 512) -> dict:
    """Encode the training documents into one uint16 array (``<s> doc </s>`` each).

    With ``max_tokens``, documents are taken in a seeded shuffled order until
    the cap is reached, so a cap keeps a uniform sample of the corpus.
    """
    from .corpus import read_train_documents

    tok = load_raw(tok_dir)
    assert tok.get_vocab_size() <= 65535
    eos = tok.token_to_id(EOS)
    docs = list(read_train_documents(data_dir))
    order = list(range(len(docs)))
    random.Random(TOKENIZER_SEED).shuffle(order)
    chunks: list[np.ndarray] = []
    total = 0
    n_docs = 0
    for i in range(0, len(order), batch):
        texts = [docs[j] for j in order[i:i + batch]]
        encs = tok.encode_batch(texts)  # post-processor adds <s>
        for e in encs:
            ids = np.asarray(e.ids + [eos], dtype=np.uint16)
            chunks.append(ids)
            total += len(ids)
            n_docs += 1
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    arr = np.concatenate(chunks)
    if max_tokens is not None:
        arr = arr[:max_tokens]
    np.save(Path(data_dir) / out_name, arr)
    chars = sum(len(docs[j]) for j in order[:n_docs])
    stats = {"tokens": int(arr.size), "docs": n_docs, "docs_total": len(docs),
             "chars": chars, "chars_per_token": chars / max(1, arr.size)}
    (Path(data_dir) / (out_name + ".json")).write_text(json.dumps(stats, indent=1))
    return stats


def write_carry(dest: Path, tok_dir: Path, data_dir: Path = DATA_DIR, name: str = "train_tokens.npy") -> None:
    """Bundle what training needs: the xz-compressed token array and the tokenizer."""
    import lzma
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with open(Path(data_dir) / name, "rb") as f, lzma.open(dest / (name + ".xz"), "wb", preset=6) as g:
        shutil.copyfileobj(f, g, 1 << 24)
    shutil.copytree(tok_dir, dest / "tokenizer", dirs_exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kascade-tiny tokenizer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("train")
    a.add_argument("--out", type=Path, default=DATA_DIR / "tokenizer")
    a.add_argument("--data-dir", type=Path, default=DATA_DIR)
    a.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    a.add_argument("--sample-mb", type=float, default=40.0)
    a.add_argument("--synthetic", type=int, default=3000)
    b = sub.add_parser("pretokenize")
    b.add_argument("--tokenizer", type=Path, default=DATA_DIR / "tokenizer")
    b.add_argument("--data-dir", type=Path, default=DATA_DIR)
    b.add_argument("--max-tokens", type=int, default=None)
    b.add_argument("--carry", type=Path, default=None,
                   help="also write DIR/train_tokens.npy.xz and DIR/tokenizer/ (what training reads)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.cmd == "train":
        fast = train_tokenizer(args.out, args.data_dir, args.vocab_size, args.sample_mb, args.synthetic)
        held = HELDOUT_PATH.read_text(encoding="utf-8")[:200_000]
        n = len(fast(held)["input_ids"])
        print(json.dumps({"vocab": len(fast), "heldout_chars_per_token": len(held) / n}))
    else:
        print(json.dumps(pretokenize(args.tokenizer, args.data_dir, args.max_tokens)))
        if args.carry is not None:
            write_carry(args.carry, args.tokenizer, args.data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
