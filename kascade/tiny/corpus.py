"""Offline text corpus from the Python installation of this machine.

Documents come from the ``.py`` files of the standard library and of
site-packages (the folders of :func:`sysconfig.get_paths`): each file gives a
*source* document (its text) and, where it has enough of them, a *docstring*
document (its module, class and function docstrings, as prose).

* Order is deterministic: files are visited sorted by their relative path
  (``stdlib/...`` or ``site-packages/...``).
* Exact duplicates (same file content) are kept once, the first in that order.
* The train / held-out split is a hash of the relative path: a file is held
  out iff ``sha1(relpath) mod 1000 < HELDOUT_PER_MILLE`` (about 3%). Both
  documents of a file fall on the same side.

Outputs:

* ``.data/train.txt`` - training documents separated by ``DOC_SEP`` (NUL);
* ``data/heldout.txt`` - held-out text (at most 2 MB), documents separated by
  a blank line: the docstring document of every held-out file and the source
  of every third one. It is used for calibration, perplexity and as the
  "essay" haystack.

The text is third-party Python source under its own (mostly permissive)
licenses; it is used as data only.

Command line: ``python -m kascade.tiny.corpus [--max-train-mb N]``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator

from . import DATA_DIR, HELDOUT_PATH

HELDOUT_PER_MILLE = 30
DOC_SEP = "\x00"
MAX_FILE_BYTES = 400_000
MAX_SOURCE_CHARS = 48_000
MAX_LINE_CHARS = 2_000
MIN_DOCSTRING_CHARS = 200
HELDOUT_MAX_BYTES = 2_000_000


@dataclass(frozen=True)
class Document:
    relpath: str
    kind: str  # "source" or "docstrings"
    text: str


def source_roots() -> list[tuple[str, Path]]:
    """``[(label, folder)]`` for the standard library and site-packages."""
    paths = sysconfig.get_paths()
    roots: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for key, label in (("stdlib", "stdlib"), ("purelib", "site-packages"), ("platlib", "site-packages")):
        p = paths.get(key)
        if not p:
            continue
        rp = Path(p).resolve()
        if rp in seen or not rp.is_dir():
            continue
        seen.add(rp)
        roots.append((label, rp))
    return roots


def list_files(roots: Iterable[tuple[str, Path]] | None = None) -> list[tuple[str, Path]]:
    """All ``.py`` files as ``(relpath, path)``, sorted by relpath.

    The standard library walk skips its own ``site-packages`` /
    ``dist-packages`` (those are covered by their own root).
    """
    roots = list(source_roots() if roots is None else roots)
    out: dict[str, Path] = {}
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if label == "stdlib":
                dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
            dirnames.sort()
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath) / name
                rel = f"{label}/{path.relative_to(root).as_posix()}"
                out.setdefault(rel, path)
    return sorted(out.items())


def is_heldout(relpath: str) -> bool:
    """The deterministic split: True for about 3% of relative paths."""
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < HELDOUT_PER_MILLE


def clean_source(raw: bytes) -> str | None:
    """Decoded, normalised file text, or None when the file is unsuitable."""
    if len(raw) > MAX_FILE_BYTES or len(raw) < 64:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if max((len(line) for line in text.split("\n")), default=0) > MAX_LINE_CHARS:
        return None
    return text


def truncate_lines(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > 0 else limit]


def extract_docstrings(text: str) -> str:
    """Module, class and function docstrings of ``text``, as blank-line separated prose."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ""
    parts: list[str] = []
    nodes = [tree]
    while nodes:
        node = nodes.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                nodes.append(child)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc.strip()) >= 20:
                parts.append(inspect.cleandoc(doc).strip())
    text = "\n\n".join(parts)
    return text if "\x00" not in text else ""


def _process(item: tuple[str, str]) -> tuple[str, str | None, str]:
    rel, path = item
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return rel, None, ""
    text = clean_source(raw)
    if text is None:
        return rel, None, ""
    return rel, text, extract_docstrings(text)


def iter_documents(files: list[tuple[str, Path]] | None = None, workers: int | None = None) -> Iterator[Document]:
    """Documents in deterministic order, exact duplicates removed."""
    files = list_files() if files is None else files
    seen: set[bytes] = set()
    items = [(rel, str(p)) for rel, p in files]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with Pool(workers) as pool:
        for rel, text, docs in pool.imap(_process, items, chunksize=64):
            if text is None:
                continue
            digest = hashlib.sha1(text.encode("utf-8")).digest()
            if digest in seen:
                continue
            seen.add(digest)
            yield Document(rel, "source", truncate_lines(text, MAX_SOURCE_CHARS))
            if len(docs) >= MIN_DOCSTRING_CHARS:
                ddig = hashlib.sha1(b"doc:" + docs.encode("utf-8")).digest()
                if ddig not in seen:
                    seen.add(ddig)
                    yield Document(rel, "docstrings", truncate_lines(docs, MAX_SOURCE_CHARS))


def build(data_dir: Path = DATA_DIR, heldout_path: Path = HELDOUT_PATH,
          max_train_mb: float | None = None, workers: int | None = None) -> dict:
    """Write the training text and the held-out text; return statistics."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    heldout_path = Path(heldout_path)
    heldout_path.parent.mkdir(parents=True, exist_ok=True)
    stats = {"files": 0, "train_docs": 0, "train_chars": 0, "heldout_docs": 0,
             "heldout_files": 0, "heldout_chars_total": 0, "heldout_bytes_written": 0}
    files = list_files()
    stats["files"] = len(files)
    max_train = None if max_train_mb is None else int(max_train_mb * 1e6)
    heldout_written = 0
    heldout_source_count = 0
    held_files: set[str] = set()
    with open(data_dir / "train.txt", "w", encoding="utf-8") as ftrain, \
            open(heldout_path, "w", encoding="utf-8") as fheld:
        for doc in iter_documents(files, workers):
            if is_heldout(doc.relpath):
                held_files.add(doc.relpath)
                stats["heldout_docs"] += 1
                stats["heldout_chars_total"] += len(doc.text)
                take = doc.kind == "docstrings"
                if doc.kind == "source":
                    take = heldout_source_count % 3 == 0
                    heldout_source_count += 1
                if not take:
                    continue
                chunk = doc.text.strip("\n") + "\n\n"
                n = len(chunk.encode("utf-8"))
                if heldout_written + n <= HELDOUT_MAX_BYTES:
                    fheld.write(chunk)
                    heldout_written += n
                continue
            if max_train is not None and stats["train_chars"] >= max_train:
                continue
            ftrain.write(doc.text)
            ftrain.write(DOC_SEP)
            stats["train_docs"] += 1
            stats["train_chars"] += len(doc.text)
    stats["heldout_files"] = len(held_files)
    stats["heldout_bytes_written"] = heldout_written
    with open(data_dir / "corpus_stats.json", "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def read_train_documents(data_dir: Path = DATA_DIR) -> Iterator[str]:
    """Iterate over the training documents written by :func:`build`."""
    with open(Path(data_dir) / "train.txt", encoding="utf-8") as f:
        buf = ""
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            buf += block
            *docs, buf = buf.split(DOC_SEP)
            yield from (d for d in docs if d)
        if buf:
            yield buf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--heldout", type=Path, default=HELDOUT_PATH)
    ap.add_argument("--max-train-mb", type=float, default=None)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    stats = build(args.data_dir, args.heldout, args.max_train_mb, args.workers)
    json.dump(stats, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
