"""benchmarks/generalization_report.py: per-family rows and the targets' rule, from made-up eval rows."""

import json

import pytest
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import generalization_report as GR  # noqa: E402

PLAN = {"anchors": [0, 3], "selecting_layers_equivalent": 10.0, "provenance": {"search_candidates": 16}}
REPORT = {"seconds": 12.0, "plans_measured": 40, "peak_gpu_bytes": None, "divergence": 0.02,
          "divergence_by_family": {"records": 0.05, "needle": 0.01}, "paper_divergence": 0.3, "leave_out": None,
          "objective": "worst-family"}


def _rows(path, task, length, strategy, hits, n=40):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "results.jsonl", "a") as f:
        for i in range(n):
            f.write(json.dumps({"task": task, "length": length, "budget": 0.1, "strategy": strategy, "sample": i,
                                "seed": i, "score": float(i < hits)}) + "\n")


def test_rows_and_targets(tmp_path):
    work, ev = tmp_path / "work", tmp_path / "eval"
    for sub in ("plans", "reports"):
        (work / sub).mkdir(parents=True)
    for name in ("mixture-10", "lofo-records-10"):
        (work / "plans" / f"{name}.json").write_text(json.dumps(PLAN))
        (work / "reports" / f"{name}.json").write_text(json.dumps(REPORT))
    base = ev / "baselines" / "records-4096"
    for strategy, hits in (("dense", 20), ("oracle", 22), ("kascade", 8), ("kascade-paper", 2)):
        _rows(base, "records", 4096, strategy, hits)
    _rows(ev / "mixture-10" / "records-4096", "records", 4096, "kascade", 19)  # 47.5: within 3 of 50, 7.5 of 55
    _rows(ev / "lofo-records-10" / "records-4096", "records", 4096, "kascade", 21)  # 52.5: holds
    _rows(ev / "lofo-records-10" / "records-4096", "records", 4096, "dense", 0)  # a plan run's own dense: not its score
    _rows(ev / "baselines" / "code-4096", "code", 4096, "dense", 4)  # dense 10: not a headline family
    _rows(ev / "p66-mixture-10" / "records-4096", "records", 4096, "kascade", 18)  # another recipe's plans
    _rows(ev / "p66-lofo-records-10" / "records-4096", "records", 4096, "kascade", 20)
    _rows(ev / "shipped" / "records-4096", "records", 4096, "kascade", 21)  # the shipped plan's own run
    _rows(ev / "shipped" / "records-4096", "records", 4096, "dense", 0)  # its own dense: not reported
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({**PLAN, "selecting_layers_equivalent": 9.5}))
    GR.write_report(work, ev, str(tmp_path / "out"), None, shipped)
    doc = json.loads((tmp_path / "out.json").read_text())
    rec = next(r for r in doc["families"] if r["name"] == "records")
    # the baselines' kascade is the prose plan; the shipped plan is its own run
    assert (rec["dense"], rec["oracle"], rec["kascade_prose"], rec["kascade_paper"]) == (50.0, 55.0, 20.0, 5.0)
    assert rec["kascade_shipped"] == 52.5
    assert rec["kascade_mixture_10"] == 47.5 and rec["kascade_leave_one_out"] == 52.5
    assert (rec["cost"], rec["cost_shipped"]) == (10.0, 9.5)
    assert rec["holds"] == {"kascade_leave_one_out": True, "kascade_shipped": True, "kascade_prose": False}
    # paired over the same seeds: the leave-one-out plan hits samples 0..20, dense 0..19
    assert rec["paired_vs_dense"]["kascade_leave_one_out"]["mean"] == 2.5
    assert rec["paired_vs_dense"]["kascade_prose"]["mean"] == -30.0
    assert rec["dense_se"] == 7.91
    # the reuse's loss alone: against per-layer top-k (oracle hits 0..21)
    assert rec["paired_vs_oracle"]["kascade_leave_one_out"]["mean"] == -2.5
    assert rec["paired_vs_oracle"]["kascade_prose"]["mean"] == -35.0
    assert rec["paired_vs_dense"]["oracle"]["mean"] == 5.0
    code = next(r for r in doc["families"] if r["name"] == "code")
    assert not code["headline"] and code["holds"] == {}
    # the other recipe's plans are their own columns, not the main recipe's
    assert rec["recipes"]["p66"]["mixture-10"]["score"] == 45.0 and rec["recipes"]["p66"]["lofo-10"]["score"] == 50.0
    assert rec["recipes"]["p66"]["mixture-10"]["paired_vs_dense"]["mean"] == -5.0
    assert GR.recipe_of("p66-lofo-records-10") == ("p66", "lofo-records-10")
    assert GR.recipe_of("lofo-records-10") == ("", "lofo-records-10") and GR.recipe_of("mixture-6") == ("", "mixture-6")
    md = (tmp_path / "out.md").read_text()
    assert ("| records | 4096 | 40 | 50.0 ± 7.9 | 55.0 | 52.5 | 52.5 | 20.0 | 5.0 | 47.5 | +2.5 ± 2.5 | +2.5 ± 2.5 | "
            "-30.0 ± 7.3 | yes / yes / no |") in md
    assert "| records | 4096 | +5.0 ± 3.5 | -2.5 ± 2.5 | -35.0 ± 7.6 | -2.5 ± 2.5 |" in md
    assert "## Calibration recipe p66" in md and "| records | 4096 | 40 | 50.0 | 55.0 | 20.0 (-30.0 ± 7.3) | " \
        "50.0 (+0.0 ± 0.0) | 45.0 (-5.0 ± 3.5) |" in md
    assert (tmp_path / "out.png").stat().st_size > 0


def test_seed_puts_plans_and_rows_back_and_skips_what_is_there(tmp_path):
    import subprocess

    plans, searches = tmp_path / "plans", tmp_path / "searches"
    plans.mkdir()
    searches.mkdir()
    (plans / "lofo-records-10.json").write_text(json.dumps(PLAN))
    (searches / "lofo-records-10.json").write_text(json.dumps(REPORT))
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as f:
        for i in range(3):
            f.write(json.dumps({"run": "lofo-records-10", "task": "records", "length": 4096, "budget": 0.1,
                                "strategy": "kascade", "sample": i, "seed": i, "score": 1.0}) + "\n")
    args = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "generalization.py"), "seed",
            "--work", str(tmp_path / "gen"), "--eval", str(tmp_path / "ev"), "--plans", str(plans), "--rows", str(rows),
            "--searches", str(searches)]
    for _ in range(2):  # a second seeding adds nothing
        out = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    got = [json.loads(x) for x in (tmp_path / "ev" / "lofo-records-10" / "records-4096" / "results.jsonl").read_text().split("\n") if x]
    assert [r["sample"] for r in got] == [0, 1, 2] and all("run" not in r for r in got)
    assert (tmp_path / "gen" / "plans" / "lofo-records-10.json").is_file()
    assert (tmp_path / "gen" / "reports" / "lofo-records-10.json").is_file()


def test_jobs_run_log_lookup_with_the_records_fold(tmp_path, capsys):
    """log_lookup (a records task) is evaluated by default, and the records fold's plan runs on it too."""
    import generalization as G

    assert "log_lookup" in G.FAMILIES and "log_lookup" not in G.FOLDS  # evaluated, not a calibration fold
    (tmp_path / "plans").mkdir()
    for name in ("lofo-records-10", "lofo-table-10", "mixture-10"):
        (tmp_path / "plans" / f"{name}.json").write_text(json.dumps(PLAN))
    assert G.main(["jobs", "MODEL", "--work", str(tmp_path), "--eval", "EV"]) == 0
    jobs: dict = {}
    for line in capsys.readouterr().out.splitlines():
        name, command = line.split("\t")
        jobs.setdefault(name, []).append(command)
    assert len(jobs["baselines"]) == 2  # one per length
    assert "--lengths 4096 --budgets 0.1 --samples 40 --no-coverage --workers 2 --tasks records,json_records,table," \
        "code,multi_doc,chat_history,log_lookup " in jobs["baselines"][0]
    # log_lookup at 4096 only: dense finds 3 of 20 at 8064
    assert "--lengths 8064 " in jobs["baselines"][1] and "log_lookup" not in jobs["baselines"][1]
    assert "--tasks records,log_lookup " in jobs["lofo-records-10"][0] and "--tasks records " in jobs["lofo-records-10"][1]
    assert "--tasks table " in jobs["lofo-table-10"][0]
    # the baselines run the prose plan; the shipped plan (the default recipe's) has its own runs, in both modes
    assert f"--plan {G.PROSE} --paper-plan" in jobs["baselines"][0]
    assert f"--plan {G.SHIPPED} --strategies kascade --out EV/shipped" in jobs["shipped"][0]
    assert "--strategies kascade --sparse-prefill no --out EV/shipped-decode-only" in jobs["shipped-decode-only"][0]
    # decode-only mode: the prose plan and per-layer top-k beside the baselines, each fold's plan beside its run
    assert f"--plan {G.PROSE} --strategies oracle,kascade --sparse-prefill no --out EV/decode-only" in jobs["decode-only"][0]
    assert "--tasks records,log_lookup " in jobs["lofo-records-10-decode-only"][0]
    assert "--sparse-prefill no --out EV/lofo-records-10-decode-only" in jobs["lofo-records-10-decode-only"][0]
    assert "--sparse-prefill no --out EV/mixture-10-decode-only" in jobs["mixture-10-decode-only"][0]
    only = dict(G.eval_jobs(tmp_path, "MODEL", ["log_lookup"], "4096", 40, "EV"))
    assert "--tasks log_lookup " in only["lofo-records-10"] and "lofo-table-10" not in only
    assert G.eval_jobs(tmp_path, "MODEL", ["log_lookup"], "8064", 40, "EV") == []


def test_export_names_another_recipe_and_seed_reads_it_back(tmp_path):
    """export writes runs, plans and search reports under RECIPE-NAME; seeding them back gives the report the
    recipe's own columns."""
    import generalization as G

    work, ev = tmp_path / "gen", tmp_path / "ev"
    for sub in ("plans", "reports"):
        (work / sub).mkdir(parents=True)
    (work / "plans" / "mixture-10.json").write_text(json.dumps(PLAN))
    (work / "reports" / "mixture-10.json").write_text(json.dumps(REPORT))
    _rows(ev / "mixture-10" / "records-4096", "records", 4096, "kascade", 5, n=4)
    rows, plans, searches = tmp_path / "rows.jsonl", tmp_path / "plans", tmp_path / "searches"
    rows.write_text(json.dumps({"run": "baselines", "task": "records", "length": 4096, "budget": None,
                                "strategy": "dense", "sample": 0, "seed": 0, "score": 1.0}) + "\n")
    out = ["--rows", str(rows), "--plans", str(plans), "--searches", str(searches)]
    assert G.main(["export", "--work", str(work), "--eval", str(ev), "--prefix", "p66", "--append", *out]) == 0
    got = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [r["run"] for r in got] == ["baselines"] + ["p66-mixture-10"] * 4
    assert (plans / "p66-mixture-10.json").is_file() and (searches / "p66-mixture-10.json").is_file()
    import pytest

    with pytest.raises(SystemExit, match="--prefix: expected lowercase letters and digits"):
        G.main(["export", "--work", str(work), "--eval", str(ev), "--prefix", "P-6", *out])
    assert G.main(["seed", "--work", str(tmp_path / "w2"), "--eval", str(tmp_path / "e2"), *out]) == 0
    cells = GR.collect(tmp_path / "e2")
    assert set(cells) == {("dense", "records", 4096), ("p66:mixture-10", "records", 4096)}


def test_diagnosis_report_names_its_gap():
    import diagnose_families as D

    r = {"length": 4096, "samples": 2, "rho": 0.1, "gap": 0.1, "plans": {},
         "families": {"log_lookup": {"coverage": {"oracle": [[1.0, 0.9]], "p": [[1.0, 0.7]]},
                                     "gaps": {"p": [{"layer": 0, "head": 1, "gap": 0.2, "coverage": 0.7,
                                                     "oracle": 0.9, "source": [0, 0]}]}}}}
    md = D.markdown(r)
    assert "at least 0.1 below per-layer top-k" in md and "L0h1 0.70/0.90 from L0h0" in md


def test_answer_logprob_pairs_each_strategy_with_dense():
    import answer_logprob as A

    v = {"dense": [-3.0, -2.0, -5.0], "oracle": [-3.5, -2.0, -6.0]}
    mean, se = A.paired(v, "oracle")
    assert mean == -0.5 and abs(se - (0.5 / 3 ** 0.5)) < 1e-12  # differences -0.5, 0, -1: sd 0.5
    md = A.markdown({"length": 4096, "rho": 0.1, "device": "cpu", "dtype": "float32", "first_seed": 950000,
                     "samples": 3, "plan": "p.json", "strategies": ["dense", "oracle"],
                     "families": {"json_records": {"logprob": v, "first_ok": {"dense": [1, 1, 0], "oracle": [1, 0, 0]}}}})
    assert "| json_records | oracle | -3.83 | -0.50 ± 0.29 | 0.33 |" in md


def test_answer_logprob_pairs_against_another_strategy_and_builds_layer_budgets(tmp_path):
    from transformers import LlamaConfig

    import answer_logprob as A
    from kascade.eval.layer_budgets import LayerBudgetStrategy
    from kascade.plan import Plan

    v = {"dense": [-3.0, -2.0, -5.0], "oracle": [-3.5, -2.0, -6.0], "other": [-3.0, -2.5, -5.0]}
    result = {"length": 4096, "rho": 0.1, "device": "cpu", "dtype": "float32", "first_seed": 950000, "samples": 3,
              "plan": "p.json", "strategies": ["dense", "oracle", "other"],
              "families": {"records": {"logprob": v, "first_ok": {n: [1, 1, 1] for n in v}}}}
    md = A.markdown(result, against="oracle")
    assert "| records | other | +0.333 ± 0.441 | 2 / 3 |" in md and "| records | oracle | +" not in md.split("## Against")[1]
    with pytest.raises(ValueError, match="against: expected one of the run's strategies"):
        A.markdown(result, against="quest")
    (tmp_path / "r.json").write_text(__import__("json").dumps(result))
    assert A.main(["--report", str(tmp_path / "r.json"), "--against", "oracle", "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out.md").read_text() == md
    cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    plan = Plan.for_model(cfg, [0], rho=0.1, k_min=8, tile=8)
    (tmp_path / "b.json").write_text('{"rhos": [null, 0.2, 0.05]}')
    s = A.build("oracle-layer-budgets", plan, cfg, 0.1, str(tmp_path / "b.json"))
    assert isinstance(s, LayerBudgetStrategy) and s.rhos == [None, 0.2, 0.05]
    with pytest.raises(SystemExit, match="needs --layer-budgets"):
        A.build("oracle-layer-budgets", plan, cfg, 0.1)
    (tmp_path / "bad.json").write_text('{"rhos": [null, 0.2]}')
    with pytest.raises(ValueError, match="one budget per layer"):
        A.build("oracle-layer-budgets", plan, cfg, 0.1, str(tmp_path / "bad.json"))


def test_answer_logprob_builds_top_p_in_both_modes_and_reports_its_keys(tmp_path):
    from transformers import LlamaConfig

    import answer_logprob as A
    from kascade.eval.top_p import TopPStrategy
    from kascade.plan import Plan

    cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    plan = Plan.for_model(cfg, [0], rho=0.1, k_min=8, tile=8)
    (tmp_path / "p.json").write_text('{"p": 0.93}')
    sparse = A.build("oracle-top-p", plan, cfg, 0.1, top_p=str(tmp_path / "p.json"))
    decode_only = A.build("oracle-top-p+dense-prefill", plan, cfg, 0.1, top_p=str(tmp_path / "p.json"))
    assert isinstance(sparse, TopPStrategy) and sparse.p == 0.93 and sparse.sparse_prefill
    assert not decode_only.sparse_prefill
    with pytest.raises(SystemExit, match="needs --top-p FILE"):
        A.build("oracle-top-p", plan, cfg, 0.1)
    v = {"dense": [-3.0, -2.0], "oracle-top-p": [-3.5, -2.0]}
    md = A.markdown({"length": 4096, "rho": 0.1, "device": "cpu", "dtype": "float32", "first_seed": 950000,
                     "samples": 2, "plan": "p.json", "strategies": list(v),
                     "families": {"records": {"logprob": v, "first_ok": {n: [1, 1] for n in v},
                                              "key_share": {"oracle-top-p": 0.987}}}})
    assert "| records | oracle-top-p | 0.987 |" in md


def test_answer_logprob_merges_runs_over_the_same_prompts_and_refuses_others(tmp_path):
    import json

    import answer_logprob as A

    def run(plan, values, dense=(-3.0, -2.0)):
        v = {"dense": list(dense), "kascade+dense-prefill": values}
        return {"length": 4096, "samples": 2, "rho": 0.1, "first_seed": 950000, "device": "cpu", "dtype": "float32",
                "plan": plan, "strategies": list(v), "families": {"records": {"logprob": v,
                                                                              "first_ok": {n: [1, 0] for n in v}}}}

    six, ten = run("six.json", [-3.5, -2.0]), run("ten.json", [-3.0, -2.5])
    merged = A.merge({"six": six, "ten": ten})
    assert merged["strategies"] == ["dense", "six:kascade+dense-prefill", "ten:kascade+dense-prefill"]
    assert merged["plan"] == {"six": "six.json", "ten": "ten.json"}
    assert merged["families"]["records"]["logprob"]["ten:kascade+dense-prefill"] == [-3.0, -2.5]
    md = A.markdown(merged, against="ten:kascade+dense-prefill")
    assert "plans six: six.json, ten: ten.json" in md
    assert "| records | six:kascade+dense-prefill | -2.75 | -0.25 ± 0.25 | 0.50 |" in md
    assert "| records | six:kascade+dense-prefill | +0.000 ± 0.500 | 1 / 2 |" in md
    with pytest.raises(ValueError, match="dense log-probabilities of ten on records differ"):
        A.merge({"six": six, "ten": run("ten.json", [-3.0, -2.5], dense=(-3.0, -2.1))})
    with pytest.raises(ValueError, match="rho of ten is 0.05"):
        A.merge({"six": six, "ten": dict(ten, rho=0.05)})
    with pytest.raises(ValueError, match="at least two"):
        A.merge({"six": six})
    (tmp_path / "six.json").write_text(json.dumps(six))
    (tmp_path / "ten.json").write_text(json.dumps(ten))
    out = tmp_path / "both"
    assert A.main(["--merge", f"six={tmp_path / 'six.json'}", f"ten={tmp_path / 'ten.json'}", "-o", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text()) == merged
    with pytest.raises(SystemExit):
        A.main(["--merge", str(tmp_path / "six.json"), "-o", str(out)])


def test_answer_logprob_runs_several_plans_and_shares_dense_prompt_passes(tmp_path, monkeypatch):
    """--plan LABEL=FILE runs strategies LABEL:NAME with that plan; dense and the decode-only Kascade and
    per-layer top-k start from one dense prompt pass per prompt, with the log-probabilities of their own full
    runs (kascade-tiny, one short prompt)."""
    import json

    from transformers import AutoConfig

    import answer_logprob as A
    from kascade.models import TINY_MODEL_DIR
    from kascade.plan import Plan

    if not (TINY_MODEL_DIR / "config.json").is_file():
        pytest.skip("models/kascade-tiny is not in this checkout")
    cfg = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    for label, anchors in (("a", [0, 2]), ("b", [0, 5, 9])):
        Plan.for_model(cfg, anchors, rho=0.1, k_min=16, tile=16).save(tmp_path / f"{label}.json")
    names = "dense,a:kascade+dense-prefill,b:kascade+dense-prefill"
    argv = [str(TINY_MODEL_DIR), "--plan", f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}", "--strategies",
            names, "--families", "records", "--samples", "1", "--length", "500", "--device", "cpu", "--dtype",
            "float32"]
    assert A.main(argv + ["-o", str(tmp_path / "shared")]) == 0
    shared = json.loads((tmp_path / "shared.json").read_text())
    assert shared["plan"] == {"a": str(tmp_path / "a.json"), "b": str(tmp_path / "b.json")}
    assert not A.shares_dense_prompt("b:kascade", None) and A.shares_dense_prompt("dense", None)
    cfg_plan = Plan.load(tmp_path / "a.json")
    for name, shares in (("oracle+dense-prefill", True), ("oracle", False), ("quest+dense-prefill", False)):
        assert A.shares_dense_prompt(name, A.build(name, cfg_plan, cfg, 0.1)) is shares, name
    monkeypatch.setattr(A, "shares_dense_prompt", lambda name, strategy: False)
    assert A.main(argv + ["-o", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone.json").read_text())["families"]["records"]["logprob"]
    got = shared["families"]["records"]["logprob"]
    for n in names.split(","):
        assert got[n] == pytest.approx(alone[n], abs=1e-3), n
    assert got["a:kascade+dense-prefill"] != pytest.approx(got["b:kascade+dense-prefill"], abs=1e-4)  # two plans
    with pytest.raises(SystemExit, match="names plan 'c'"):
        A.plan_of("c:kascade", {"a": 1, "b": 2})
    assert A.plan_of("kascade", {"a": 1, "b": 2}) == (1, "kascade") and A.parse_plans(["p.json"]) == {"": "p.json"}
    with pytest.raises(SystemExit, match="given twice"):
        A.parse_plans(["a=x.json", "a=y.json"])


def test_sign_test_of_answers_lost_and_gained():
    assert GR.sign_test(0, 6) == 2 / 64 and GR.sign_test(0, 0) == 1.0 and GR.sign_test(5, 5) == 1.0
    assert abs(GR.sign_test(22, 13) - 0.1755) < 1e-3
    v = GR._paired({0: 1.0, 1: 0.0, 2: 1.0, 3: 0.5}, {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0})
    assert (v["lost"], v["gained"], v["samples"]) == (1, 1, 4) and v["sign_p"] == 1.0


def test_dense_tail_rows_are_dense_attention_and_the_rest_unchanged():
    import torch
    from transformers import LlamaConfig

    import answer_logprob as A
    from kascade import ops
    from kascade.plan import Plan

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    plan = Plan.for_model(cfg, [0], rho=0.1, k_min=8, tile=8)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    plain, tailed = A.build("oracle", plan, cfg, 0.1), A.build("oracle+dense-tail16", plan, cfg, 0.1)
    for s in (plain, tailed):
        s.begin_forward()
    a = [plain.attend(i, q, k, v, None, None) for i in range(2)]
    b = [tailed.attend(i, q, k, v, None, None) for i in range(2)]
    dense = ops.dense(q, k, v, backend="reference")
    assert torch.equal(a[1][:, :, :-16], b[1][:, :, :-16])
    assert torch.allclose(b[1][:, :, -16:], dense[:, :, -16:], atol=1e-6)
    assert not torch.allclose(a[1][:, :, -16:], dense[:, :, -16:], atol=1e-3)  # the sparse rows differ
    one = q[:, :, -1:]
    assert torch.equal(tailed.attend(1, one, k, v, None, None), plain.attend(1, one, k, v, None, None))  # decode
    with pytest.raises(SystemExit, match="dense-tailW"):
        A.build("oracle+dense-tailx", plan, cfg, 0.1)


def test_decode_only_rows_are_their_own_columns(tmp_path):
    work, ev = tmp_path / "work", tmp_path / "eval"
    for sub in ("plans", "reports"):
        (work / sub).mkdir(parents=True)
    for strategy, hits in (("dense", 20), ("oracle", 22), ("kascade", 8)):
        _rows(ev / "baselines" / "records-4096", "records", 4096, strategy, hits)
    for strategy, hits in (("dense", 20), ("oracle+dense-prefill", 21), ("kascade+dense-prefill", 19)):
        _rows(ev / "decode-only" / "records-4096", "records", 4096, strategy, hits)
    _rows(ev / "lofo-records-10" / "records-4096", "records", 4096, "kascade", 10)
    _rows(ev / "lofo-records-10-decode-only" / "records-4096", "records", 4096, "kascade+dense-prefill", 18)
    _rows(ev / "mixture-6-decode-only" / "records-4096", "records", 4096, "kascade+dense-prefill", 17)  # this mode only
    _rows(ev / "shipped-decode-only" / "records-4096", "records", 4096, "kascade+dense-prefill", 20)
    GR.write_report(work, ev, str(tmp_path / "out"), None)
    rec = json.loads((tmp_path / "out.json").read_text())["families"][0]
    assert (rec["dense"], rec["oracle"], rec["kascade_prose"], rec["kascade_leave_one_out"]) == (50.0, 55.0, 20.0, 25.0)
    assert rec["kascade_shipped"] is None  # not run with the sparse prefill
    do = rec["decode_only"]
    assert (do["oracle"], do["kascade_prose"], do["kascade_leave_one_out"], do["kascade_shipped"]) == (52.5, 47.5, 45.0,
                                                                                                      50.0)
    assert do["paired_vs_dense"]["kascade_prose"]["mean"] == -2.5
    # -5.0, +0.0 and -2.5 against dense
    assert do["holds"] == {"kascade_leave_one_out": False, "kascade_shipped": True, "kascade_prose": True}
    hold = json.loads((tmp_path / "out.json").read_text())["targets_hold"]
    assert hold["decode_only"]["kascade_shipped"] == {"cells": 1, "held": 1}
    assert hold["sparse_prefill"]["kascade_shipped"] == {"cells": 0, "held": 0}  # not run in that mode
    md = (tmp_path / "out.md").read_text()
    assert ("- Decode-only mode (kascade.enable's default): cells holding the targets: leave-one-out plans 0 of 1, "
            "shipped plan 1 of 1, prose plan 1 of 1.") in md
    assert "- With the sparse prefill (the paper's method): cells holding the targets: leave-one-out plans 0 of 1, " \
        "prose plan 0 of 1." in md
    assert "## Decode-only mode" in md
    assert rec["kascade_mixture_6"] is None and do["kascade_mixture_6"] == 42.5  # run in decode-only mode only
    assert "| holds (loo / shipped / prose) | mixture-6 |" in md
    assert "| records | 4096 | 50.0 | 52.5 | 50.0 | 47.5 | 45.0 | +2.5 ± 2.5 | +0.0 ± 0.0 | -2.5 ± 2.5 | -5.0 ± 3.5 | " \
        "no / yes / yes | 42.5 (-7.5 ± 4.2) |" in md


def test_gzip_rows_round_trip(tmp_path):
    """A rows file whose name ends in .gz (the committed one) is written and read compressed, appends included."""
    import gzip

    import generalization as G

    work, ev = tmp_path / "gen", tmp_path / "ev"
    for sub in ("plans", "reports"):
        (work / sub).mkdir(parents=True)
    (work / "plans" / "mixture-10.json").write_text(json.dumps(PLAN))
    _rows(ev / "mixture-10" / "records-4096", "records", 4096, "kascade", 2, n=3)
    rows = tmp_path / "rows.jsonl.gz"
    out = ["--rows", str(rows), "--plans", str(tmp_path / "plans"), "--searches", str(tmp_path / "searches")]
    assert G.main(["export", "--work", str(work), "--eval", str(ev), *out]) == 0
    assert G.main(["export", "--work", str(work), "--eval", str(ev), "--prefix", "p66", "--append", *out]) == 0
    with gzip.open(rows, "rt") as f:
        got = [json.loads(x) for x in f]
    assert [r["run"] for r in got] == ["mixture-10"] * 3 + ["p66-mixture-10"] * 3
    assert G.main(["seed", "--work", str(tmp_path / "w2"), "--eval", str(tmp_path / "e2"), *out]) == 0
    assert set(GR.collect(tmp_path / "e2")) == {("mixture-10", "records", 4096), ("p66:mixture-10", "records", 4096)}
