"""benchmarks/flat_topk.py: merging runs at several batch sizes into one table and plot (no GPU)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import flat_topk as F  # noqa: E402


def run(batch: int, scale: float, device: str = "NVIDIA H100 80GB HBM3") -> dict:
    ms = {"sdpa_decode": 0.5 * batch}
    for kind, single in (("peaked", 0.4), ("flat", 0.6), ("tied", 0.7)):
        for finish, t in (("single", single), ("chunked", single * scale)):
            ms[f"anchor_{kind}_{finish}_finish"] = 2 * t * batch
            ms[f"anchor_{kind}_{finish}_finish_graph"] = t * batch
    return {"device": device, "torch": "2.11", "triton": "3.6", "batch": batch, "keys": 131072, "kv_heads": 8,
            "group": 4, "head_dim": 128, "ms": ms, "same_sets": {"flat": True, "tied": True}}


def test_merge_sorts_by_batch_and_reports_graph_ratios(tmp_path):
    paths = []
    for b, scale in ((8, 0.85), (1, 0.5)):
        paths.append(tmp_path / f"b{b}.json")
        paths[-1].write_text(json.dumps(run(b, scale)))
    res = F.write_merged([str(p) for p in paths], "2026-12-07", tmp_path / "out")
    assert [row["batch"] for row in res["rows"]] == [1, 8] and res["date"] == "2026-12-07"
    md = (tmp_path / "out.md").read_text()
    assert ("| 1 | 0.500 | 0.400 | 0.200 | 0.50x | 0.600 | 0.300 | 0.50x | 0.700 | 0.350 | 0.50x | "
            "flat True, tied True |") in md
    assert "| 8 | 4.000 | 3.200 | 2.720 | 0.85x |" in md
    assert json.loads((tmp_path / "out.json").read_text()) == res and (tmp_path / "out.png").stat().st_size > 0


def test_merge_refuses_runs_of_other_devices_or_none():
    with pytest.raises(ValueError, match="device differs"):
        F.merge([run(1, 0.5), run(3, 0.5, device="NVIDIA H200")], "2026-12-07")
    with pytest.raises(ValueError, match="at least one run"):
        F.merge([], "2026-12-07")


def test_runs_made_before_the_tied_kind_still_merge():
    old = run(1, 0.5)
    del old["same_sets"]
    for finish in ("single", "chunked"):
        del old["ms"][f"anchor_tied_{finish}_finish"], old["ms"][f"anchor_tied_{finish}_finish_graph"]
    old["flat_same_sets"] = True
    res = F.merge([old], "2026-12-07")
    assert res["rows"][0]["same_sets"] == {"flat": True} and F.kinds_of(res) == ["peaked", "flat"]
    assert "| 1 | 0.500 | 0.400 | 0.200 | 0.50x | 0.600 | 0.300 | 0.50x | flat True |" in F.markdown(res)
