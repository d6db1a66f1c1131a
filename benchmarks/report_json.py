"""Shared by the benchmarks' reports: the `--report IN.json OUT_STEM` mode of benchmarks that keep their
measurements as JSON (the markdown and the plot written again from the JSON, with no measurement and no GPU),
how a report names a file (relative to the repository), and the GPU's short name in result file names."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rewrite_only(argv, write_report) -> bool:
    """If argv (default sys.argv[1:]) is `--report IN.json OUT_STEM`, call write_report(data, stem) and
    return True; otherwise return False and leave the arguments to the benchmark's own parser."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--report"]:
        return False
    if len(argv) != 3:
        raise SystemExit("--report: expected IN.json OUT_STEM")
    write_report(json.loads(Path(argv[1]).read_text()), Path(argv[2]))
    return True


ROOT = Path(__file__).resolve().parent.parent


def repo_relative(path) -> str:
    """`path` relative to the repository root when it lies inside it, else as given: results name files, not
    the folders of the machine that made them."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def short_device_name(name: str) -> str:
    """The model in a CUDA device name, for file names: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200"."""
    import re

    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else name.split()[-1]).lower()
