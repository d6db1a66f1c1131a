"""kascade: Kascade sparse attention for long-context LLM inference (arXiv 2512.16391)."""

__version__ = "0.1.0"
