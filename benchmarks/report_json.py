"""The `--report IN.json OUT_STEM` mode shared by benchmarks that keep their measurements as JSON:
the markdown and the plot are written again from the JSON, with no measurement (and no GPU)."""

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
