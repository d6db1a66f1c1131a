"""kascade bench (end-to-end generation speed) on the CPU: the run completes on a config alone (random
weights) and on the shipped tiny model, writes JSON + markdown + plot, derives shares and ratios
from its own measurements, and the CLI rejects bad arguments. Timings themselves are not asserted."""

import json

import pytest
import torch

from kascade import bench, cli
from kascade.models import RANDOM_CONFIG, TINY_MODEL_DIR, random_model


def test_bench_on_a_config_writes_results(tmp_path):
    out = tmp_path / "bench_tiny"
    res = bench.run(str(RANDOM_CONFIG), [160], [1, 2], new_tokens=2, output=str(out), device="cpu", k_min=16,
                    log=lambda *a: None)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["cases"] == json.loads(json.dumps(res["cases"])) and not data["errors"]
    assert out.with_suffix(".png").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert "| 1 | 160 | kascade |" in md and "Predicted" in md
    for case in data["cases"]:
        pr = case["providers"]
        assert set(pr) == {"none", "dense", "kascade"}
        for name in ("dense", "kascade"):
            r = pr[name]
            assert r["tokens_per_s"] == pytest.approx(case["B"] * 2 / r["decode_s"])
            assert r["decode_attention_share"] == pytest.approx(1 - pr["none"]["step_ms"] / r["step_ms"])
            assert len(r["first_tokens"]) == case["B"]
        assert case["decode_speedup"] == pytest.approx(pr["kascade"]["tokens_per_s"] / pr["dense"]["tokens_per_s"])
        k = case["kernels"]["decode"]
        assert k["sum_dense"] == pytest.approx(8 * k["dense"]["median"])  # 8 layers of the config
        anchors = data["plan"]["anchors"]
        assert k["sum_kascade"] == pytest.approx(k["kascade_layer0"]["median"] + (len(anchors) - 1)
                                                 * k["kascade_anchor"]["median"]
                                                 + (8 - len(anchors)) * k["kascade_reuse"]["median"])
    # dense and kascade generate from the same prompts: at this length (k_min 16, rho 0.1) kascade is sparse,
    # yet both produce a first token for every sequence; "none" is a different model entirely
    assert data["model"]["layers"] == 8 and data["env"]["dense"] == "sdpa"


@pytest.mark.skipif(not (TINY_MODEL_DIR / "config.json").is_file(), reason="shipped tiny model not present")
def test_bench_cli_on_the_shipped_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench_kt"
    rc = cli.main(["bench", str(TINY_MODEL_DIR), "--lengths", "150", "--batch", "1", "--new-tokens", "2",
                   "--providers", "dense,kascade", "--plan", "plans/kascade-tiny-paper.json", "--device", "cpu",
                   "-o", str(out)])
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["cases"][0]["providers"]) == {"dense", "kascade"}
    assert "weights of kascade-tiny" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["bench", "no/such/dir"], "MODEL_DIR_OR_CONFIG"),
    (["bench", str(RANDOM_CONFIG), "--lengths", "1k"], "--lengths"),
    (["bench", str(RANDOM_CONFIG), "--providers", "dense,flash"], "--providers"),
    (["bench", str(RANDOM_CONFIG), "--anchors", "1,3"], "--anchors"),
])
def test_bench_cli_errors(args, match, capsys):
    assert cli.main(args) == 2
    assert match in capsys.readouterr().err


def test_random_model_on_a_device_matches_the_cpu_build():
    """The meta-device build has the shapes, rotary buffers and an init scale of the CPU build."""
    ref = random_model(RANDOM_CONFIG)
    fast = random_model(RANDOM_CONFIG, dtype=torch.float32, device="cpu")
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in fast.named_parameters()]
    for (n, a), (_, b) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)
    w = fast.model.layers[0].self_attn.q_proj.weight
    assert abs(float(w.std()) - fast.config.initializer_range) < 0.1 * fast.config.initializer_range
    assert bool((fast.model.norm.weight == 1).all())
    ids = torch.randint(0, 1024, (1, 40))
    with torch.no_grad():
        assert torch.isfinite(fast(ids).logits).all()


def test_bench_decode_only_fills_the_cache(tmp_path):
    """--decode-only: no prefill, the decode runs on a cache of N random keys (positions N, N+1, ...)."""
    out = tmp_path / "bench_do"
    res = bench.run(str(RANDOM_CONFIG), [300], [1], new_tokens=2, output=str(out), device="cpu",
                    providers=("dense", "kascade"), kernels=False, decode_only=True, log=lambda *a: None)
    case = res["cases"][0]
    assert case["mode"].startswith("decode only") and not res["errors"]
    for r in case["providers"].values():
        assert "ttft_s" not in r and r["tokens_per_s"] > 0
    assert "| 1 | 300 | kascade | — |" in out.with_suffix(".md").read_text()
