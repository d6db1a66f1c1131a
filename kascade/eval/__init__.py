"""Accuracy harness: long-context task generators, LongBench-format data, metrics, baseline strategies,
attention-mass coverage and the `kascade eval` command (see each module's docstring)."""
