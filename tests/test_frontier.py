"""benchmarks/frontier.py on the CPU: the calibrate stage on kascade-tiny, the evaluation jobs, the dense rows they
share, the mapping of a plan to the 8B shape at the same cost, and the report from made-up rows and speeds (the GPU
stages themselves run elsewhere)."""

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import frontier as F  # noqa: E402
import frontier_report as FR  # noqa: E402
import frontier_speed as FS  # noqa: E402
from kascade.calibrate import output_aware as OA  # noqa: E402
from kascade.plan import Plan  # noqa: E402

SMOL = FS.shape("smollm2")
SIM = np.random.default_rng(0).random((30, 30, 3, 3))


def _head_plan(cost: int, seed: int = 0) -> Plan:
    units = sorted((layer, h) for layer in range(1, 30) for h in range(3))
    random.Random(seed).shuffle(units)
    return OA.plan_of_units(set(units[: (cost - 1) * 3]), SIM, SMOL)


def _work(tmp_path: Path, costs=(4, 6)) -> Path:
    work = tmp_path / "work"
    (work / "plans").mkdir(parents=True)
    for c in costs:
        _head_plan(c).save(work / "plans" / f"head-{c}.json")
        OA.plan_of_layers(range(1, 3 * c, 3)[: c - 1], SIM, SMOL).save(work / "plans" / f"layer-{c}.json")
        Plan(anchors=list(range(0, 2 * c, 2)), model=dict(SMOL)).save(work / "plans" / f"paper-{c}.json")
        _head_plan(c, seed=1).save(work / "plans" / f"decodeonly-{c}.json")
    return work


def test_jobs_list_every_plan_task_set_and_length(tmp_path):
    work = _work(tmp_path)
    jobs = F.eval_jobs(work, "/m", "/ev")
    names = [j.name for j in jobs]
    runs = list(dict.fromkeys(n.split("/")[0] for n in names))
    assert runs == ["baselines", "default", "default-rho0.05", "default-rho0.2", "head-6", "layer-6", "decodeonly-6",
                    "paper-6", "head-4", "layer-4", "decodeonly-4", "paper-4"]  # the paper's cost first, its recipe
    # elsewhere last
    assert len(jobs) == len(runs) * 2 * 2 and len(set(names)) == len(names)
    line = {j.name: j.command for j in jobs}
    assert line["baselines/tasks-4096"] == (
        "python3 -m kascade.cli eval /m --samples 60 --no-coverage --workers 2 --tasks niah_single,niah_multikey,"
        "niah_multivalue,niah_multiquery,fwe,doc_qa_chat --lengths 4096 --budgets 0.1 --strategies dense,oracle,"
        "oracle+dense-prefill "
        "--out /ev/baselines/tasks-4096")
    assert line["head-4/families-8064"] == (
        f"python3 -m kascade.cli eval /m --samples 60 --no-coverage --workers 2 --tasks records,json_records,table,"
        f"code,multi_doc,chat_history --lengths 8064 --budgets 0.1 --plan {work / 'plans' / 'head-4.json'} "
        "--strategies kascade,kascade+dense-prefill --out /ev/head-4/families-8064")  # both modes, one process
    assert "chat_history,log_lookup --lengths 4096" in line["head-4/families-4096"]  # log_lookup at 4096 only
    assert f"--budgets 0.05 --plan {F.DEFAULT_PLAN} --strategies kascade," in line["default-rho0.05/tasks-8064"]
    assert "--budgets 0.2 " in line["default-rho0.2/families-4096"]
    assert line["decodeonly-4/tasks-4096"].endswith(  # judged decode-only: run in that mode only
        f"--plan {work / 'plans' / 'decodeonly-4.json'} --strategies kascade+dense-prefill "
        "--out /ev/decodeonly-4/tasks-4096")
    missing = F.speed_missing(work)  # what the speed stage has left: every plan in 3 decode measurements, every plan
    # with a sparse prefill in 3 prefill measurements
    assert len(missing) == 3 * (len(runs) - 1) + 3 * (len(runs) - 3) and missing[0] == "smollm2-decode-8192 default"
    assert "8b-decode-131072 decodeonly-4" in missing and "8b-prefill-131072 decodeonly-4" not in missing
    # the headline tasks are those of the committed SmolLM2 evaluation
    ev = json.loads((F.ROOT / "benchmarks" / "results" / "eval_smollm2.json").read_text())
    assert list(F.HEADLINE_TASKS) == ev["headline_tasks"]


def _rows(path: Path, task, length, strategy, hits, n=60, budget=0.1):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "results.jsonl", "a") as f:
        for i in range(n):
            f.write(json.dumps({"task": task, "length": length, "budget": None if strategy == "dense" else budget,
                                "strategy": strategy, "sample": i, "seed": i, "score": float(i < hits)}) + "\n")


def test_a_job_is_done_when_every_task_has_its_samples(tmp_path):
    job = next(j for j in F.eval_jobs(_work(tmp_path), "/m", "/ev") if j.name == "head-4/tasks-4096")
    ev = tmp_path / "ev"
    assert not job.done(ev, 2)
    for t in F.HEADLINE_TASKS:
        _rows(ev / job.name, t, 4096, "dense", 1, n=2)
        _rows(ev / job.name, t, 4096, "kascade", 1, n=2 if t != "fwe" else 1)
    assert not job.done(ev, 2)
    _rows(ev / job.name, "fwe", 4096, "kascade", 1, n=2)
    assert not job.done(ev, 2)  # decode-only mode not run yet
    for t in F.HEADLINE_TASKS:
        _rows(ev / job.name, t, 4096, "kascade+dense-prefill", 1, n=2)
    assert job.done(ev, 2) and not job.done(ev, 3)
    only = next(j for j in F.eval_jobs(_work(tmp_path / "b"), "/m", "/ev") if j.name == "decodeonly-4/tasks-4096")
    for t in F.HEADLINE_TASKS:
        _rows(ev / only.name, t, 4096, "dense", 1, n=2)
        _rows(ev / only.name, t, 4096, "kascade+dense-prefill", 1, n=2)
    assert only.done(ev, 2)  # decode-only mode is all such a plan runs


def test_seed_gives_plan_runs_the_baselines_dense_rows(tmp_path):
    ev = tmp_path / "ev"
    _rows(ev / "baselines" / "tasks-4096", "fwe", 4096, "dense", 30, n=4)
    _rows(ev / "baselines" / "tasks-4096", "fwe", 4096, "oracle", 30, n=4)
    _rows(ev / "head-4" / "tasks-4096", "fwe", 4096, "kascade", 1, n=4)  # has results already: left alone
    seeded = F.seed_dense(ev, ["baselines", "head-6", "head-4"])
    assert seeded == [str(ev / "head-6" / "tasks-4096")]
    rows = [json.loads(x) for x in (ev / "head-6" / "tasks-4096" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["strategy"] for r in rows} == {"dense"}
    assert F.seed_dense(ev, ["head-6"]) == []


@pytest.mark.parametrize("cost", [4, 6, 8, 10, 12, 15])
def test_mapping_to_the_8b_shape_keeps_the_cost(cost):
    fp = FS.shape("8b")
    assert (fp["num_layers"], fp["num_q_heads"], fp["num_kv_heads"], fp["head_dim"]) == (32, 32, 8, 128)
    for plan in (_head_plan(cost, seed=cost), OA.plan_of_layers(range(2, 2 * cost, 2)[: cost - 1], SIM, SMOL)):
        mapped = FS.map_plan(plan, fp)
        assert mapped.selecting_layers_equivalent == plan.selecting_layers_equivalent == cost
        assert mapped.model == fp and len(mapped.anchors) == len(plan.anchors) and mapped.anchors[0] == 0
        assert mapped.head_granular == plan.head_granular
        if plan.head_granular:  # the selecting heads of a layer are one strided view, as on SmolLM2
            from kascade.routing import head_slices

            for layer in range(32):
                heads = mapped.selecting_heads(layer, 8)
                assert len(head_slices(heads)) <= 1
        last = FS.last_readers(mapped, 8)
        assert all(b >= a for a, b in last.items())


def test_mapping_the_shipped_plans_and_refusing_smaller_shapes():
    for path in ("plans/smollm2-135m-instruct.json", "plans/smollm2-135m-instruct-paper.json"):
        plan = Plan.load(F.ROOT / path)
        mapped = FS.plans_on({"p": plan}, "8b")["p"]
        assert mapped.selecting_layers_equivalent == plan.selecting_layers_equivalent
        assert mapped.anchors == [FS.layer_positions(30, 32)[a] for a in plan.anchors]
        assert FS.plans_on({"p": plan}, "smollm2")["p"] is plan
    assert FS.layer_positions(30, 32)[:3] == [0, 1, 2] and FS.layer_positions(30, 32)[-1] == 31
    with pytest.raises(ValueError, match="layers"):
        FS.layer_positions(32, 30)
    with pytest.raises(ValueError, match="KV heads"):
        FS.map_plan(_head_plan(4), {**SMOL, "num_kv_heads": 2, "num_layers": 32})


def _speed(work: Path, stem: str, speedups: dict):
    shape, phase, n = stem.split("-")
    run = {"index": 0, "device": "GPU X", "dense": {"baseline": "fa3", "best": "fa3", "model": {"fa3": {"ms": 4.0}}}}
    plans = {k: {"ms": 4.0 / v, "speedup": v, "speedup_vs_best_dense": v, "predicted_speedup": v + 0.1,
                 "selecting_layers_equivalent": 6.0, "anchors": [0], "run": 0} for k, v in speedups.items()}
    (work / "speed").mkdir(exist_ok=True)
    (work / "speed" / f"{stem}.json").write_text(json.dumps({"shape": shape, "fingerprint": FS.shape(shape),
                                                             "phase": phase, "N": int(n), "runs": [run],
                                                             "plans": plans}))


def test_report_writes_the_issue_keys_from_made_up_rows(tmp_path):
    work, ev = _work(tmp_path, costs=(6,)), tmp_path / "ev"
    for n in (4096, 8064):
        for t in F.HEADLINE_TASKS:
            _rows(ev / "baselines" / f"tasks-{n}", t, n, "dense", 30)  # dense 50 on every task
            _rows(ev / "baselines" / f"tasks-{n}", t, n, "oracle", 30)
            _rows(ev / "head-6" / f"tasks-{n}", t, n, "kascade", 29)  # 48.3: within 2 points
            _rows(ev / "head-6" / f"tasks-{n}", t, n, "kascade+dense-prefill", 30)  # decode-only: dense's 50
            _rows(ev / "baselines" / f"tasks-{n}", t, n, "oracle+dense-prefill", 27)
            _rows(ev / "head-6" / f"tasks-{n}", t, n, "dense", 0)  # a plan run's own dense rows are not dense's
            _rows(ev / "paper-6" / f"tasks-{n}", t, n, "kascade", 12)
        for t in F.FAMILIES:
            _rows(ev / "baselines" / f"families-{n}", t, n, "dense", 30 if t != "table" else 6)  # table: dense 10
            _rows(ev / "head-6" / f"families-{n}", t, n, "kascade", 29)
            _rows(ev / "head-6" / f"families-{n}", t, n, "kascade+dense-prefill", 30 if t != "code" else 6)
        for t in F.HEADLINE_TASKS + F.FAMILIES:
            _rows(ev / "decodeonly-6" / f"{'tasks' if t in F.HEADLINE_TASKS else 'families'}-{n}", t, n,
                  "kascade+dense-prefill", 30 if t != "table" else 6)  # dense's scores
    _speed(work, "8b-decode-131072", {"head-6": 2.5, "paper-6": 3.0, "decodeonly-6": 2.6})
    _speed(work, "8b-prefill-131072", {"head-6": 1.5})
    doc = FR.write_report(work, ev, str(tmp_path / "out"))
    assert doc["dense_headline"] == 50.0 and doc["oracle_headline"] is None  # oracle ran on the tasks only
    assert "table" not in doc["headline_tasks"] and len(doc["headline_tasks"]) == len(F.HEADLINE_TASKS) + len(F.FAMILIES) - 1
    plans = {p["name"]: p for p in doc["plans"]}
    head = plans["head-6"]
    for key in ("name", "recipe", "granularity", "cost", "headline", "samples", "decode_speedup_8b",
                "prefill_speedup_8b"):
        assert key in head
    assert (head["recipe"], head["granularity"], head["cost"], head["samples"]) == ("output-aware", "head", 6.0, 60)
    assert head["headline"] == pytest.approx(48.33) and head["headline_vs_dense"]["mean"] == pytest.approx(-1.67)
    assert (head["decode_speedup_8b"], head["prefill_speedup_8b"]) == (2.5, 1.5)
    # decode-only mode, its own keys: code 6 of 60 -> 10 at both lengths, 40 below dense in 2 of the columns
    cols = 2 * len(doc["headline_tasks"])
    assert head["samples_decode_only"] == 60 and head["headline_decode_only"] == pytest.approx(50 - 2 * 40 / cols, abs=0.01)
    assert head["cells_decode_only"]["code@4096"] == 10.0 and head["cells"]["code@4096"] == pytest.approx(48.33)
    assert plans["paper-6"]["headline_decode_only"] is None and doc["oracle_headline_decode_only"] is None
    paper = plans["paper-6"]
    assert (paper["recipe"], paper["granularity"], paper["headline"]) == ("paper", "layer", None)  # families not run
    assert paper["decode_speedup_8b"] == 3.0 and paper["prefill_speedup_8b"] is None
    assert plans["default"]["granularity"] == "head" and plans["default-rho0.2"]["rho"] == 0.2
    assert doc["goal"]["cheapest_within"]["head"] == {"name": "head-6", "cost": 6.0} and doc["goal"]["met"]
    only = plans["decodeonly-6"]  # judged and run decode-only: no sparse-prefill cells
    assert (only["series"], only["granularity"], only["headline"], only["headline_decode_only"]) == (
        "decodeonly", "head", None, 50.0)
    assert doc["goal"]["cheapest_within"]["decodeonly"] is None
    assert doc["goal_decode_only"]["mode"] == "decode-only" and doc["goal_decode_only"]["met"] is True
    assert doc["goal_decode_only"]["cheapest_within"] == {
        "head": None, "layer": None, "decodeonly": {"name": "decodeonly-6", "cost": 6.0}, "paper": None,
        "default": None}  # head-6 decode-only: 46.9
    saved = json.loads((tmp_path / "out.json").read_text())
    assert "dense_headline" in saved and isinstance(saved["plans"], list)
    md = (tmp_path / "out.md").read_text()
    assert "| head-6 | output-aware | head | 6 | 0.1 | 48.3 | -1.7 ± " in md and "Goal decode-only" in md
    assert "| head-6, decode-only | " in md and "| decodeonly-6, decode-only | " in md
    cells = md.split("## Every cell")[1].split("## Speed")[0]
    assert "\n| decodeonly-6 | " not in cells and "\n| head-6 | " in cells  # no sparse-prefill row for it
    assert (tmp_path / "out.png").stat().st_size > 0


def test_a_pass_that_drops_read_selections_attends_as_one_that_keeps_them():
    """The speed stage's prefill pass frees each selection after its last reader: same output, fewer live
    selections (a head-granular plan on a small shape, reference kernels on the CPU)."""
    import torch

    from kascade.strategy import KascadeStrategy

    small = {"model_type": "llama", "num_layers": 10, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    units = {(1, 0), (2, 0), (2, 1), (4, 1), (6, 0), (6, 1), (7, 0), (8, 1)}
    plan = OA.plan_of_units(units, np.random.default_rng(1).random((10, 10, 2, 2)), small, k_min=16, tile=16)
    assert plan.head_granular and plan.anchors == [0, 2, 6]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 48, 16, generator=g) for h in (4, 2, 2))
    kept, freed = KascadeStrategy(plan, backend="reference"), KascadeStrategy(plan, backend="reference")
    out = FS.forward(kept, 10, lambda _: q, lambda _: (k, v))
    live = []
    freed.attend = (lambda attend: lambda *a: (live.append(len(freed.state)), attend(*a))[1])(freed.attend)
    again = FS.forward(freed, 10, lambda _: q, lambda _: (k, v), FS.last_readers(plan, 2))
    assert torch.equal(again, out)
    assert max(live) < len(kept.state) and not freed.state


def test_speed_measurements_resume_and_keep_each_plan_against_its_own_dense(tmp_path):
    """measure() with a stand-in for the GPU runner: dense first in every process, one entry per plan with its
    speedup against that dense, the 8B shape's mapped cost and the cost model's prediction, failures kept
    as errors and measured again by the next process."""
    calls, failed = [], []

    class Fake:
        device = "stand-in"

        def __init__(self, fp, n):
            self.fp = fp

        def dense(self):
            calls.append("dense")
            return {"baseline": "fa3", "best": "sdpa_cudnn", "model": {"fa3": {"ms": 8.0}, "sdpa_cudnn": {"ms": 6.0}}}

        def plan(self, plan):
            calls.append(plan.selecting_layers_equivalent)
            if plan.selecting_layers_equivalent == 6 and not failed:
                failed.append(6)
                raise RuntimeError("out of memory")
            return {"ms": plan.selecting_layers_equivalent / 2, "p20": 0.0, "p80": 0.0}

    plans = {"head-4": _head_plan(4), "head-6": _head_plan(6)}
    out = tmp_path / "speed" / "8b-decode-131072.json"
    assert FS.measure(plans, "8b", "decode", 131072, out, 60.0, runner=Fake)
    doc = json.loads(out.read_text())
    four = doc["plans"]["head-4"]
    assert (four["speedup"], four["speedup_vs_best_dense"], four["selecting_layers_equivalent"]) == (4.0, 3.0, 4.0)
    assert four["predicted_speedup"] > 1 and four["dense"] == "fa3" and four["run"] == 0
    assert "error" in doc["plans"]["head-6"] and doc["runs"][0]["device"] == "stand-in"
    calls.clear()
    assert FS.measure(plans, "8b", "decode", 131072, out, 60.0, runner=Fake)
    doc = json.loads(out.read_text())
    assert calls == ["dense", 6.0] and doc["plans"]["head-6"]["run"] == 1 and doc["plans"]["head-6"]["speedup"] == 8 / 3
    assert FS.measure(plans, "8b", "decode", 131072, out, 60.0, runner=Fake) and calls == ["dense", 6.0]


def test_the_checkpointing_wrapper_passes_the_mode_and_saves_new_measurements(tmp_path):
    class Calib:
        def __init__(self):
            self.memo, self.saved = {}, []

        def per_prompt(self, plan, sparse_prefill=True):
            self.memo[(plan, sparse_prefill)] = sparse_prefill
            return sparse_prefill

        def save(self, path):
            self.saved.append(path)

    calib = F._checkpointed(Calib(), tmp_path / "calib.pt", every_s=0.0)
    assert calib.per_prompt("p", False) is False and calib.per_prompt("p", sparse_prefill=True) is True
    assert ("p", False) in calib.memo and calib.saved == [tmp_path / "calib.pt"] * 2
    calib.per_prompt("p", False)  # memoised: nothing new to save
    assert len(calib.saved) == 2


def test_the_searches_option_names_known_searches_and_defaults_to_the_sparse_ones():
    assert F._searches("decodeonly,head") == ["decodeonly", "head"]
    with pytest.raises(Exception, match="expected names of head, layer, decodeonly"):
        F._searches("head,decode")
    with pytest.raises(SystemExit):
        F.main(["calibrate", "/m", "--work", "/w", "--searches", "prefill"])


def test_the_papers_recipe_away_from_its_cost_and_the_defaults_runs_after_every_output_aware_plan(tmp_path):
    names = list(F.frontier_plans(_work(tmp_path, costs=(4, 6, 8, 10)), default_plan=None))
    assert names == ["head-6", "layer-6", "decodeonly-6", "paper-6", "head-4", "layer-4", "decodeonly-4", "head-8",
                     "layer-8", "decodeonly-8", "head-10", "layer-10", "decodeonly-10", "paper-10", "paper-4", "paper-8"]


def test_the_calibrate_stage_writes_every_recipes_plans_and_resumes(tmp_path, capsys):
    """The stage end to end on kascade-tiny at a tiny scale: the three searches, the paper's recipe, the held-out
    divergences in both modes; a second call finds everything done and measures nothing."""
    from kascade.models import TINY_MODEL_DIR

    if not (TINY_MODEL_DIR / "config.json").is_file():
        pytest.skip("models/kascade-tiny is not in this checkout")
    work = tmp_path / "work"
    argv = ["calibrate", str(TINY_MODEL_DIR), "--work", str(work), "--length", "320", "--num-prompts", "2",
            "--heldout-prompts", "1", "--batch-size", "2", "--costs", "11", "--candidates", "2", "--search-step", "12",
            "--answer-tokens", "2", "--device", "cpu", "--dtype", "float32", "--searches", "head,layer,decodeonly",
            "--default-plan", str(Path(F.ROOT) / "plans" / "kascade-tiny.json")]
    assert F.main(argv) == 0
    assert sorted(p.name for p in (work / "plans").iterdir()) == ["decodeonly-11.json", "head-11.json",
                                                                   "layer-11.json", "paper-11.json"]
    only = Plan.load(work / "plans" / "decodeonly-11.json")
    assert only.provenance["sparse_prefill"] is False and only.provenance["granularity"] == "head"
    head = Plan.load(work / "plans" / "head-11.json")
    assert head.selecting_layers_equivalent == 11 and head.provenance["granularity"] == "head"
    assert Plan.load(work / "plans" / "layer-11.json").provenance["granularity"] == "layer"
    held = json.loads((work / "reports" / "heldout.json").read_text())
    assert set(held["plans"]) == {"default", "head-11", "layer-11", "paper-11"} and held["num_prompts"] == 1
    assert set(held["plans_decode_only"]) == set(held["calibration_decode_only"]) == set(held["plans"]) | {
        "decodeonly-11"}
    capsys.readouterr()
    assert F.main(argv) == 0
    out = capsys.readouterr().out
    assert "search:" not in out and "held out," not in out and "calibration done" in out
