"""`kascade eval`: a whole run on a tiny model, resume without repeated work, outputs, clear errors."""

import argparse
import json

import pytest
import torch

from fixtures import evaltools as E
from kascade.cli import main as cli_main
from kascade.eval import command
from models import one_thread_fixture


_one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = E.save_model_dir(root / "model", layers=3, max_positions=1024)
    model = E.tiny_llama(len(E.tokenizer()), layers=3, max_positions=1024)
    plan = E.plan_for(model, anchors=(0, 2), k_min=16)
    plan.save(root / "plan.json")
    return root, model_dir, root / "plan.json"


def _args(files, out, **kw):
    root, model_dir, plan = files
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = [str(model_dir), "--plan", str(plan), "--out", str(out), "--tasks", "niah_single,copy", "--lengths", "256",
            "--budgets", "0.1,0.3", "--strategies", "kascade,streamingllm", "--samples", "1", "--max-new-tokens", "6",
            "--data", str(E.ESSAY), "--no-coverage"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = str(v)
        elif v is True:
            argv.append(flag)
        else:
            argv += [flag, str(v)]
    return parser.parse_args(argv)


def _count_runs(monkeypatch, batches=None):
    """Rows run, as (task, seed, strategy); `batches` (a list) also gets the seeds of each batch."""
    calls = []
    real = command._run_batch

    def counting(model, tok, samples, prompts, strategy, args):
        for sample in samples:
            calls.append((sample.task, sample.seed, None if strategy is None else strategy.name))
        if batches is not None:
            batches.append([s.seed for s in samples])
        return real(model, tok, samples, prompts, strategy, args)

    monkeypatch.setattr(command, "_run_batch", counting)
    return calls


def _keys(out):
    return [command._key(r) for r in command.read_results(out / "results.jsonl")]


def test_run_resume_and_outputs(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = _count_runs(monkeypatch)
    assert command.run(_args(files, out)) == 0
    per_sample = 2 * (1 + 2 * 2)  # 2 tasks x (dense once + 2 strategies x 2 budgets)
    assert len(calls) == per_sample and len(_keys(out)) == per_sample
    # more samples: only the new sample runs
    calls.clear()
    assert command.run(_args(files, out, samples=2)) == 0
    assert len(calls) == per_sample and {seed for _, seed, _ in calls} == {1}
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 2 * per_sample
    # nothing left to do
    calls.clear()
    assert command.run(_args(files, out, samples=2)) == 0
    assert calls == []
    # a report of more samples than were run: nothing runs, cells say how many they hold
    assert command.run(_args(files, out, samples=5, report_only=True)) == 0
    assert calls == [] and "(2 samples per cell)" in (out / "summary.md").read_text()
    rows = command.read_results(out / "results.jsonl")
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert {r["budget"] for r in rows if r["strategy"] == "dense"} == {None}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["budgets"]) == {"0.1", "0.3"}
    assert list(summary["budgets"]["0.1"]) == ["dense", "kascade", "streamingllm"]
    assert summary["counts"]["0.3"]["kascade"]["copy@256"] == 2
    md = (out / "summary.md").read_text()
    assert "## rho = 0.1" in md and "| dense |" in md and "niah_single 256" in md and "avg - dense" in md
    assert (out / "accuracy_vs_budget.png").stat().st_size > 1000
    assert json.loads((out / "run.json").read_text())["k_min"] == 16


def test_interrupted_run_resumes(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert command.run(_args(files, out, tasks="niah_single", strategies="quest", budgets="0.2")) == 0
    path = out / "results.jsonl"
    rows = path.read_text().splitlines()
    assert len(rows) == 2
    # an interruption: the last result was being written
    path.write_text(rows[0] + "\n" + rows[1][: len(rows[1]) // 2])
    calls = _count_runs(monkeypatch)
    assert command.run(_args(files, out, tasks="niah_single", strategies="quest", budgets="0.2")) == 0
    assert len(calls) == 1
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 2


def test_coverage_outputs(files, tmp_path):
    out = tmp_path / "out"
    args = _args(files, out, tasks="kv", strategies="oracle,kascade,omnikv", budgets="0.1", samples=1)
    args.no_coverage = False
    assert command.run(args) == 0
    cov = json.loads((out / "coverage.json").read_text())
    assert set(cov["prefill"]) == {"oracle", "kascade", "omnikv"} and len(cov["prefill"]["kascade"]) == 3
    assert cov["budget"] == 0.1 and (out / "coverage.png").stat().st_size > 1000


def test_longbench_file(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = _args(files, out, strategies="kascade", budgets="0.2", samples=3)
    args.tasks, args.longbench = None, [str(E.FIXTURES / "longbench_sample.jsonl")]
    calls = _count_runs(monkeypatch)
    assert command.run(args) == 0
    assert {t for t, _, _ in calls} == {"longbench/longbench_sample"} and len(calls) == 3 * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == ["longbench/longbench_sample"]
    # a synthetic task can join the same folder
    args = _args(files, out, strategies="kascade", budgets="0.2", samples=1, tasks="kv")
    assert command.run(args) == 0


def test_other_setting_refused(files, tmp_path):
    out = tmp_path / "out"
    assert command.run(_args(files, out, tasks="niah_single", strategies="quest", budgets="0.2")) == 0
    with pytest.raises(ValueError, match="another setting.*k_min"):
        command.run(_args(files, out, tasks="niah_single", strategies="quest", budgets="0.2", k_min=32))


@pytest.mark.parametrize("change,match", [
    ({"tasks": "niah_single,needle"}, "unknown task 'needle'.*niah_single.*sequence"),
    ({"strategies": "kascade,h2o"}, "unknown strategy 'h2o'.*oracle.*omnikv"),
    ({"lengths": "256,1020"}, "max_position_embeddings 1024.*<= 1018"),
    ({"lengths": "4k"}, "integers"),
    ({"budgets": "0.1,1.5"}, "fractions in"),
    ({"plan": "/nonexistent/plan.json"}, "no file at /nonexistent/plan.json"),
    ({"data": "/nonexistent/text.txt"}, "--data: no file"),
    ({"samples": 0}, "--samples"),
])
def test_errors(files, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        command.run(_args(files, tmp_path / "out", **change))


def test_missing_model_and_plan(files, tmp_path):
    args = _args(files, tmp_path / "out")
    args.model_dir = str(tmp_path / "no-model")
    with pytest.raises(ValueError, match="not a local directory"):
        command.run(args)
    args = _args(files, tmp_path / "out")
    args.plan = None
    with pytest.raises(ValueError, match="need a calibrated plan"):
        command.run(args)


def test_through_the_cli(files, tmp_path, capsys):
    root, model_dir, plan = files
    rc = cli_main(["eval", str(model_dir), "--plan", str(plan), "--tasks", "vt,bogus", "--out", str(tmp_path)])
    assert rc == 2 and "unknown task 'bogus'" in capsys.readouterr().err


def test_paper_plan_and_default_strategies(files, tmp_path, monkeypatch):
    root, model_dir, plan = files
    args = _args(files, tmp_path / "a", tasks="niah_single")
    args.strategies = None  # the default: every strategy but kascade-paper and the measured mechanisms
    from kascade.eval.strategies import MECHANISMS, STRATEGIES

    assert command._Setup(args).strategies == [s for s in STRATEGIES if s not in ("kascade-paper",) + MECHANISMS]
    args.paper_plan = str(plan)
    setup = command._Setup(args)
    assert setup.strategies == [s for s in STRATEGIES if s not in MECHANISMS]
    assert setup.identity["paper_plan"] == command._sha(plan)
    with pytest.raises(ValueError, match="--paper-plan: strategy kascade-paper needs"):
        command.run(_args(files, tmp_path / "b", strategies="kascade-paper"))
    # kascade-paper runs, and coverage builds it too
    calls = _count_runs(monkeypatch)
    args = _args(files, tmp_path / "c", tasks="kv", strategies="kascade-paper", budgets="0.1", paper_plan=str(plan))
    args.no_coverage = False
    assert command.run(args) == 0
    assert {s for _, _, s in calls} == {None, "kascade-paper"}
    assert "kascade-paper" in json.loads((tmp_path / "c" / "coverage.json").read_text())["prefill"]
    assert json.loads((tmp_path / "c" / "run.json").read_text())["paper_plan"] == command._sha(plan)
    # the same folder without --paper-plan (kascade-paper left out), then with it again: both accepted
    assert command.run(_args(files, tmp_path / "c", tasks="kv", strategies="quest", budgets="0.1")) == 0
    assert json.loads((tmp_path / "c" / "run.json").read_text())["paper_plan"] == command._sha(plan)
    other = tmp_path / "other.json"
    other.write_text(plan.read_text().replace('"k_min": 16', '"k_min": 17'))
    with pytest.raises(ValueError, match="another setting.*paper_plan"):
        command.run(_args(files, tmp_path / "c", tasks="kv", strategies="kascade-paper", budgets="0.1",
                          paper_plan=str(other)))


def test_batch_option(files, tmp_path):
    assert command._Setup(_args(files, tmp_path / "o")).batch == 1  # the CPU default
    assert command._Setup(_args(files, tmp_path / "o", batch=8)).batch == 8
    with pytest.raises(ValueError, match="--batch"):
        command._Setup(_args(files, tmp_path / "o", batch=0))


def test_headline_summary():
    from kascade.eval import report

    rows = []
    for task, dense, sparse in (("easy", 1.0, 0.5), ("hard", 0.1, 0.0)):
        for n in (100, 200):
            rows.append({"task": task, "length": n, "budget": None, "strategy": "dense", "sample": 0, "score": dense})
            rows.append({"task": task, "length": n, "budget": 0.1, "strategy": "quest", "sample": 0, "score": sparse})
    rows.append({"task": "easy", "length": 100, "budget": 0.2, "strategy": "quest", "sample": 0, "score": 1.0})
    s = report.summarise(rows, ["easy", "hard"], [100, 200], [0.1, 0.2], ["dense", "quest"])
    assert s["headline_tasks"] == ["easy"]
    assert s["budgets"]["0.1"]["dense"]["headline"] == 100.0 and s["budgets"]["0.1"]["quest"]["headline"] == 50.0
    assert s["budgets"]["0.1"]["quest"]["avg"] == 25.0
    assert s["budgets"]["0.2"]["quest"]["headline"] is None  # easy@200 has no result at 0.2
    md = report.markdown(s)
    assert "Headline tasks (dense >= 20 on average over lengths): easy." in md
    assert "| quest | 50.0 | 50.0 | 0.0 | 0.0 | 25.0 | -30.0 | 50.0 | -50.0 |" in md
    assert report.headline_tasks({"a@1": 30.0, "a@2": None, "b@1": 19.9}, ["a", "b"], [1, 2]) == ["a"]
