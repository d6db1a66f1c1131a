"""The documentation points at what exists, and the README's Python example runs.

README.md and docs/*.md are checked for:
- every relative markdown link (images included) pointing at a file or folder of the repository, and its
  `#anchor`, when the target is a markdown file, at one of the target's headings (GitHub's slugs);
- every `benchmarks/results/...` path they name anywhere (links, inline code, commands; `{a,b}` lists
  expanded) existing; a path without a suffix may be a file stem (`-o PREFIX` of a command);
- every repository path written as inline code (`kascade/...`, `tests/...`, ...) existing (globs must match).

The README block after the `readme-example` marker runs on models/kascade-tiny on the CPU, with the
calibration settings shrunk (`SMALL`) so that it takes well under a minute.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = ROOT / "models" / "kascade-tiny"

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
RESULTS = re.compile(r"benchmarks/results/[A-Za-z0-9_.{},*/-]*")
CODE = re.compile(r"`([^`\n]+)`")
REPO_DIRS = ("kascade/", "benchmarks/", "scripts/", "plans/", "tests/", "docs/", "data/", ".ci/")


def _prose(text: str) -> str:
    """The text without fenced code blocks (links and headings are read from prose only)."""
    return FENCE.sub("", text)


def _expand(path: str) -> list[str]:
    """`a.{json,md}` -> [a.json, a.md] (one or more brace lists)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _exists(path: Path) -> bool:
    """A file or folder, a glob that matches, or a file stem (PATH.* exists)."""
    if any(c in path.name for c in "*?["):
        return any(path.parent.glob(path.name))
    if path.exists():
        return True
    return not path.suffix and any(path.parent.glob(path.name + ".*"))


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", _prose(page.read_text()), re.M)}


def test_pages_exist():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1, "docs/ holds the user pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links(page):
    bad = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT) or not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading '#{frag}' in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_results_files(page):
    named = {p for m in RESULTS.findall(page.read_text()) for p in _expand(m.rstrip(".,;:"))}
    missing = sorted(p for p in named if not _exists(ROOT / p))
    assert not missing, f"{page.relative_to(ROOT)} names result files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_inline_code_paths(page):
    named = set()
    for span in CODE.findall(page.read_text()):
        span = span.strip()
        if span.startswith(REPO_DIRS) and " " not in span and not re.search(r"[A-Z]{3,}|<|\.\.\.", span):
            named.update(_expand(span.rstrip(".,;:")))
    missing = sorted(p for p in named if not _exists(ROOT / p))
    assert not missing, f"{page.relative_to(ROOT)} names repository paths that do not exist: {missing}"


def test_slug():
    assert slug("Static cache and CUDA graphs") == "static-cache-and-cuda-graphs"
    assert slug("The harness: `kascade eval`") == "the-harness-kascade-eval"
    assert slug("Kascade on your own model") == "kascade-on-your-own-model"


def readme_example() -> str:
    m = re.search(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert m, "README.md: expected a ```python block right after the <!-- readme-example ... --> marker"
    return m.group(1)


# What the README shows -> what this test runs. kascade-tiny has 12 layers x 4 KV heads: at 11.75
# selecting-layer equivalents the search removes one (layer, KV head) unit, one step of 44 measured plans.
SMALL = {
    'model_dir = "path/to/your-model"': f"model_dir = {str(TINY)!r}",
    "length=4096": "length=256, num_prompts=2",  # the first two formats of the mixture, not two of each
    "num_anchors=10": "num_anchors=11.75",
}


@pytest.mark.slow
def test_readme_example_runs_on_kascade_tiny(tmp_path, monkeypatch):
    import kascade

    code = readme_example()
    for shown, run in SMALL.items():
        assert code.count(shown) == 1, f"README example: expected `{shown}` once (tests/test_docs.py SMALL)"
        code = code.replace(shown, run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")
    text = (ROOT / "data" / "heldout.txt").read_text()[:3000]
    (tmp_path / "prompt.txt").write_text(text + "\nThe first line of this file was:")
    env: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md example", "exec"), env)
    plan = kascade.Plan.load(tmp_path / "plan.json")
    assert plan.recipe == "output-aware" and plan.selecting_layers_equivalent == 11.75
    assert plan.model["num_layers"] == 12
    model, inputs, out = env["model"], env["inputs"], env["out"]
    assert out.shape[1] > inputs.input_ids.shape[1]  # generated
    assert getattr(model, "_kascade_previous_attn", None) is None  # disabled on leaving the block
