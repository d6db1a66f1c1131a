"""benchmarks/eval_smollm2_report.py and eval_tiny_report.py: the summaries they add to `kascade eval`'s."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import eval_smollm2_report as R  # noqa: E402
import eval_tiny_report as T  # noqa: E402


def _row(task, length, budget, strategy, sample, score):
    return {"task": task, "length": length, "budget": budget, "strategy": strategy, "sample": sample, "score": score}


def test_headline_on_first_samples_cuts_every_cell_to_the_common_prompts(tmp_path):
    rows = [_row("a", 10, None, "dense", i, 1.0) for i in range(4)]
    rows += [_row("a", 10, 0.1, "kascade", i, float(i < 2)) for i in range(4)]  # 4 samples: 2 right, 2 wrong
    rows += [_row("a", 10, 0.2, "kascade", i, 0.0) for i in range(2)]  # another budget: left out
    rows += [_row("b", 10, None, "dense", i, 0.5) for i in range(2)]
    rows += [_row("b", 10, 0.1, "kascade", i, 1.0) for i in range(2)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = R.headline_on_first_samples(path, ["a", "b"], [10], first=2)
    assert got == {"dense": {10: 75.0}, "kascade": {10: 100.0}}
    got = R.headline_on_first_samples(path, ["a", "b"], [10], first=4)
    assert got["kascade"][10] == 75.0  # a: 2 of 4 right, b: 2 of 2


def test_sample_counts_names_the_cells_off_the_usual_count():
    counts = {"0.1": {"dense": {"a@10": 60, "b@10": 20}, "kascade": {"a@10": 60, "b@10": 20}, "quest": {"a@10": 20, "b@10": 16}},
              "0.2": {"dense": {"a@10": 60, "b@10": 20}, "kascade": {"a@10": 20, "b@10": 20}, "quest": {"a@10": 20, "b@10": 20}}}
    text = R.sample_counts({"counts": counts})
    assert text.startswith("20 samples per cell")
    assert "16 in quest at rho 0.1 for b@10" in text
    assert "60 in dense for a@10" in text and "60 in kascade at rho 0.1 for a@10" in text
    assert "rho 0.2" not in text  # dense is one set for every budget, named once


def test_layer_level_ablations_cost_what_the_plan_costs():
    plans = {"kascade": {"selecting_layers_equivalent": 4.0}, "kascade-paper": {"selecting_layers_equivalent": 4.0}}
    assert R._cost("omnikv", plans, 12) == 4.0 and R._cost("oracle", plans, 12) == 12.0
    assert R._cost("quest", plans, 12) is None


def test_tiny_headline_per_length_needs_every_headline_task():
    summary = {"lengths": [10, 20], "headline_tasks": ["a", "b"],
               "budgets": {"0.1": {"kascade": {"a@10": 50.0, "b@10": 100.0, "a@20": 40.0}}}}
    assert T.headline_per_length(summary) == R.headline_per_length(summary)
    assert R.headline_per_length(summary) == {"0.1": {"kascade": {10: 75.0}}}


def test_decode_only_section_from_rows_marked_decode_only():
    """The section takes the decode-only rows (NAME+dense-prefill, the decode-time baselines) with dense and
    Kascade's sparse-prefill rows on the same tasks, and its own headline; no such rows: no section."""
    rows = [_row("niah_single", 10, None, "dense", i, 1.0) for i in range(2)]
    rows += [_row("copy", 10, None, "dense", i, 0.5) for i in range(2)]
    rows += [_row("vt", 10, None, "dense", i, 0.0) for i in range(2)]  # a task no decode-only row covers
    rows += [_row(t, 10, 0.1, "kascade", i, 1.0) for t in ("niah_single", "copy", "vt") for i in range(2)]
    rows += [_row("niah_single", 10, 0.1, "quest", i, 0.0) for i in range(2)]  # sparse prefill: main table only
    assert R.decode_only_summary(rows) is None
    rows += [_row(t, 10, 0.1, s, i, 0.25) for t in ("niah_single", "copy") for i in range(2)
             for s in ("tidaldecode", "kascade+dense-prefill", "quest-decode", "oracle+dense-prefill")]
    summary = R.decode_only_summary(rows)
    assert summary["tasks"] == ["niah_single", "copy"]  # in the order of kascade.eval.tasks.TASKS
    assert summary["strategies"] == ["dense", "kascade", "oracle+dense-prefill", "kascade+dense-prefill",
                                     "quest-decode", "tidaldecode"]
    table = summary["budgets"]["0.1"]
    assert table["dense"]["headline"] == 75.0 and table["kascade"]["headline"] == 100.0
    assert table["tidaldecode"]["niah_single@10"] == 25.0 and "quest" not in table
    text = "\n".join(R.decode_only_markdown(summary))
    assert "## Decode-only" in text and "### rho = 0.1" in text and "| 0.1 | tidaldecode | 25.0 |" in text
