"""benchmarks/decode_shapes.py: its pure-Python parts on the CPU (anchor placement, rows, markdown, plot);
on a GPU, one --smoke run end to end."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import decode_shapes as S  # noqa: E402


def test_anchor_layers_llama_plan_and_counts():
    assert S.anchor_layers(32) == (0, 2, 8, 13, 14)
    for layers in (1, 2, 7, 12, 28, 30, 40, 80, 126):
        a = S.anchor_layers(layers)
        assert a[0] == 0 and list(a) == sorted(set(a)) and a[-1] < layers
        assert len(a) == min(layers, max(1, round(layers / 6)))
    assert S.anchor_layers(80)[-1] < 40  # spread like the Llama plan: in the first half of the depth
    assert S.anchor_layers(5, fraction=1.0) == (0, 1, 2, 3, 4)  # every layer: pushed apart, inside


@pytest.mark.parametrize("kw", [dict(layers=0), dict(layers=True), dict(layers=8, fraction=0),
                                dict(layers=8, pattern=(1, 2)), dict(layers=8, pattern=(0, 40))])
def test_anchor_layers_errors(kw):
    with pytest.raises(ValueError, match=next(iter(k for k in kw if k != "layers"), "layers")):
        S.anchor_layers(**kw)


def fake_results(with_pdl=True):
    """A results dict as main() writes it, from made-up timings (ms)."""
    rows = []
    for name, hq, hkv, d, layers in S.SHAPES[:3]:
        timings, models = {}, {}
        for N in S.LENGTHS:
            for B in S.BATCHES:
                f = N / 131072 * B
                r = dict(B=B, N=N, fa3=dict(ms=0.14 * f, variant="fa3[splits=0,pack_gqa=None]"),
                         sdpa_cudnn=dict(ms=0.13 * f), ours_select=dict(ms=0.08 * f),
                         ours_anchor_sparse=dict(ms=0.09 * f), ours_anchor_dense=dict(ms=0.15 * f),
                         ours_reuse=dict(ms=0.03 * f), best_dense="sdpa_cudnn")
                model = dict(ours=dict(ms=1.2 * f), fa3=dict(ms=4.4 * f), speedup_vs_fa3=3.67)
                if with_pdl:
                    for i, m in enumerate(S.PDL_NAMES):
                        r[f"ours_anchor_pdl_{m}"] = dict(ms=(0.09 - 0.01 * i) * f)
                        r[f"ours_reuse_pdl_{m}"] = dict(ms=(0.03 - 0.001 * i) * f)
                    r.update(pdl_same_selection=True, pdl_same_output=True)
                    model["pdl"] = {m: dict(ours=dict(ms=(1.2 - 0.1 * i) * f), speedup_vs_fa3=4.4 / (1.2 - 0.1 * i))
                                    for i, m in enumerate(S.PDL_NAMES)}
                timings[S.size_key(B, N)] = r
                models[S.size_key(B, N)] = model
        rows.append(S.summary_row(name, hq, hkv, d, layers, S.anchor_layers(layers), timings, models, S.HEADLINE))
    meta = dict(device="Fake GPU", torch="0", triton="0", date="2026-01-01", fa3="fa3_fwd_interface")
    return dict(meta=meta, headline=list(S.HEADLINE), rows=rows)


def test_summary_row_ratios():
    row = fake_results()["rows"][0]
    assert row["shape"] == "32/8/128" and (row["hq"], row["hkv"], row["d"]) == (32, 8, 128)
    assert row["anchor_over_fa3"] == pytest.approx(0.09 / 0.14)
    assert row["reuse_over_best_dense"] == pytest.approx(0.03 / 0.13)  # best dense: cuDNN here
    assert row["model_speedup_over_fa3"] == pytest.approx(3.67)
    assert row["anchor_pdl_off_over_fa3"] == pytest.approx(0.09 / 0.14)
    assert row["anchor_pdl_exit_over_fa3"] == pytest.approx(0.07 / 0.14)
    assert row["reuse_pdl_start_over_best_dense"] == pytest.approx(0.029 / 0.13)
    assert row["model_pdl_exit_speedup_over_fa3"] == pytest.approx(4.4 / 1.0)
    assert set(row["timings"]) == {"1x32768", "8x32768", "1x131072", "8x131072"}


def test_summary_row_missing_fa3():
    """FA3 absent (no wheel): ratios against it are None, not an error."""
    timings = {"1x131072": dict(B=1, N=131072, sdpa_cudnn=dict(ms=0.1), ours_anchor_sparse=dict(ms=0.2),
                                ours_reuse=dict(ms=0.02), best_dense="sdpa_cudnn")}
    row = S.summary_row("x", 9, 3, 64, 30, (0,), timings, {}, (1, 131072))
    assert row["anchor_over_fa3"] is None and row["model_speedup_over_fa3"] is None
    assert row["reuse_over_best_dense"] == pytest.approx(0.2)
    assert "| 9/3/64 |" in S.markdown(dict(meta=dict(device="d", torch="0", triton="0", date="x"),
                                           headline=[1, 131072], rows=[row]))


def test_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    res = fake_results()
    path = tmp_path / "decode_shapes_fake.json"
    path.write_text(json.dumps(res))
    md, png = S.write_reports(json.loads(path.read_text()), str(path))
    text = open(md).read()
    assert text.startswith("# Decode attention per shape, Fake GPU")
    assert "| 32/8/128 | Llama-3.1-8B | 32 | [0, 2, 8, 13, 14] | 140.0 | 130.0 | 90.0 | 0.64x |" in text
    assert text.count("| 28/4/128 |") == 1 + 4 + 1  # the headline line, one per size, the PDL line
    assert os.path.getsize(png) > 1000
    S.main(["--report", str(path)])  # the --report mode writes both again
    assert "## Programmatic dependent launch" in text
    assert "| 32/8/128 | 90.0 | 30.0 | 3.67x | 80.0 | 29.0 | 4.00x | 70.0 | 28.0 | 4.40x | True | True |" in text
    res2 = fake_results(with_pdl=False)
    assert "anchor_pdl_off_over_fa3" not in res2["rows"][0]
    assert "## Programmatic dependent launch" not in S.markdown(res2)
    S.plot(res2, str(tmp_path / "b.png"))


def test_main_order_and_budget(tmp_path, monkeypatch):
    """main() without a GPU (measurements faked): the headline size of every shape first, the rest until
    the time budget is spent (then listed as skipped); rows, markdown and JSON written after each size."""
    seen = []

    def fake_measure(K, spec, B, N, fa3, rep, max_layers=None, other_paths=True):
        seen.append((spec[1:4], B, N, other_paths))
        r = dict(B=B, N=N, fa3=dict(ms=0.1), sdpa_cudnn=dict(ms=0.12), ours_anchor_sparse=dict(ms=0.07),
                 ours_reuse=dict(ms=0.02), best_dense="fa3")
        return r, dict(ours=dict(ms=1.0), fa3=dict(ms=3.0), speedup_vs_fa3=3.0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H200")
    monkeypatch.setattr(S.DB, "fa3_module", lambda: None)
    monkeypatch.setattr(S, "measure_size", fake_measure)
    S.main(["--out", str(tmp_path), "--shapes", "32/8/128,9/3/64", "--budget-s", "1e9"])
    assert seen[:2] == [((32, 8, 128), 1, 131072, True), ((9, 3, 64), 1, 131072, True)]
    assert len(seen) == 2 * 4 and not any(p for *_, p in seen[2:])
    res = json.loads((tmp_path / "decode_shapes_h200.json").read_text())
    assert [r["shape"] for r in res["rows"]] == ["32/8/128", "9/3/64"] and res["meta"]["skipped"] == []
    assert res["rows"][1]["anchor_over_fa3"] == pytest.approx(0.7) and res["rows"][1]["layers"] == 30
    assert (tmp_path / "decode_shapes_h200.md").exists()
    seen.clear()
    S.main(["--out", str(tmp_path), "--shapes", "9/3/64", "--budget-s", "0", "--tag", "b"])
    assert seen == [((9, 3, 64), 1, 131072, True)]  # the headline size is always measured
    res = json.loads((tmp_path / "decode_shapes_b.json").read_text())
    assert res["meta"]["skipped"] == ["9/3/64 1x32768", "9/3/64 8x32768", "9/3/64 8x131072"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_smoke(tmp_path):
    S.main(["--smoke", "--out", str(tmp_path), "--shapes", "32/8/128,9/3/64", "--rep", "5", "--tag", "t"])
    res = json.loads((tmp_path / "decode_shapes_t_smoke.json").read_text())
    assert [r["shape"] for r in res["rows"]] == ["32/8/128", "9/3/64"]
    for r in res["rows"]:
        assert r["reuse_over_best_dense"] is not None
        assert all(t.get("paths_select_equal", True) for t in r["timings"].values())


def test_decode_benchmark_report_has_both_whole_models(tmp_path):
    """benchmarks/decode.py's markdown and plot: the 5-anchor and the 10-selecting-layer whole model."""
    DB = S.DB
    meta = dict(device="Fake GPU", torch="0", triton="0", date="2026-01-01", config={"pdl": "off"})
    per = {"1x131072": dict(B=1, N=131072, fa3=dict(ms=0.15, TBps=3.6), sdpa_cudnn=dict(ms=0.138, TBps=3.9),
                            best_dense="sdpa_cudnn", ours_select=dict(ms=0.115, TBps=2.3),
                            ours_anchor_sparse=dict(ms=0.13, TBps=2.2), ours_anchor_dense=dict(ms=0.18, TBps=2.9),
                            ours_reuse=dict(ms=0.029, TBps=1.9))}
    whole = dict(B=1, N=131072, ours=dict(ms=1.26), fa3=dict(ms=4.39), speedup_vs_fa3=4.39 / 1.26,
                 speedup_vs_best_dense_x32=3.5, layer0="ours_anchor_dense", distinct_caches=32)
    w10 = dict(whole, ours=dict(ms=1.76), speedup_vs_fa3=4.39 / 1.76, anchors=list(DB.ANCHORS_10))
    res = dict(meta=meta, sweep=[], per_layer=per, whole_model={"1x131072": whole}, whole_model_10={"1x131072": w10})
    md = DB.markdown(meta, res)
    assert "| 1 | 128K | 1.260 | 4.390 | 3.48x |" in md
    assert f"## Whole model with 10 selecting layers of 32: anchors {list(DB.ANCHORS_10)}" in md
    assert "| 1 | 128K | 1.760 | 4.390 | 2.49x |" in md
    assert "selecting layers" not in DB.markdown(meta, dict(res, whole_model_10={}))
    pytest.importorskip("matplotlib")
    path = tmp_path / "decode_fake.json"
    path.write_text(json.dumps(res))
    DB.plot(str(path), str(tmp_path / "decode_fake.png"))
    assert os.path.getsize(tmp_path / "decode_fake.png") > 1000
