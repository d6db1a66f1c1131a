"""The project's own small long-context model, ``kascade-tiny``.

A 12-layer Llama (about 11.9M parameters, 8K context) trained from scratch on
Python source text and docstrings of the local installation plus synthetic
long-range retrieval documents. It ships in ``models/kascade-tiny`` and is the
default model of the demo, calibration and accuracy tables.

Steps (each a module with a command-line entry):

* :mod:`kascade.tiny.corpus` - build the text corpus and the held-out text.
* :mod:`kascade.tiny.tokenizer` - train the byte-level BPE tokenizer and
  pre-tokenize the training text.
* :mod:`kascade.tiny.synthetic` - seeded generators of retrieval documents.
* :mod:`kascade.tiny.train` - train the model (GPU).
* :mod:`kascade.tiny.evaluate` - perplexity and retrieval accuracy.
* :mod:`kascade.tiny.report` - results files and model card.
"""

from pathlib import Path

#: Repository root (``kascade/tiny/__init__.py`` -> two levels up).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where the shipped model lives.
MODEL_DIR = REPO_ROOT / "models" / "kascade-tiny"
#: Held-out text shipped with the repository.
HELDOUT_PATH = REPO_ROOT / "data" / "heldout.txt"
#: Ignored working folder for the training data.
DATA_DIR = REPO_ROOT / ".data"

__all__ = ["REPO_ROOT", "MODEL_DIR", "HELDOUT_PATH", "DATA_DIR"]
