"""Calibration: the DP against brute force, the statistics against a naive computation, end to end."""

import numpy as np
import pytest
import torch

from kascade.calibrate import calibrate_report, head_map_for, layer_scores, save_plots
from kascade.calibrate.collect import CalibrationStrategy
from kascade.calibrate.dp import best_anchors, brute_force_anchors, plan_value
from models import tiny_model


@pytest.mark.parametrize("L", [1, 2, 5, 8, 10])
def test_dp_equals_brute_force(L):
    rng = np.random.default_rng(L)
    for trial in range(5):
        score = np.triu(rng.random((L, L)))
        for K in range(1, L + 1):
            anchors, value = best_anchors(score, K)
            bf_anchors, bf_value = brute_force_anchors(score, K)
            assert anchors[0] == 0 and len(anchors) == K and anchors == sorted(set(anchors))
            assert value == pytest.approx(bf_value)
            assert plan_value(score, anchors) == pytest.approx(value)


def test_dp_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_anchors"):
        best_anchors(np.zeros((4, 4)), 5)
    with pytest.raises(ValueError, match="square"):
        best_anchors(np.zeros((4, 3)), 2)


def _naive_min_cov(qs, ks, tile, topk, last_tiles=None):
    """min over tiles (the last `last_tiles` only, if given) of cov[a, b, ha, hb] from full attention matrices
    (one prompt, all layers)."""
    L = len(qs)
    Hq, N, D = qs[0].shape
    H = ks[0].shape[0]
    G = Hq // H
    pooled = []
    for q, k in zip(qs, ks):
        s = torch.einsum("hgnd,hmd->hgnm", q.double().view(H, G, N, D), k.double()) * D ** -0.5
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(s, -1).sum(1)  # [H, N, N]
        pooled.append(torch.stack([p[:, t * tile:(t + 1) * tile].sum(1) for t in range(N // tile)], 1))  # [H, T, N]
    cov = np.ones((L, L, H, H))
    first = topk // tile + 1 if last_tiles is None else max(topk // tile + 1, N // tile - last_tiles)
    for t in range(first, N // tile):
        n = t * tile
        idx = [torch.topk(pl[:, t, :n], topk).indices for pl in pooled]
        for b in range(L):
            diag = pooled[b][:, t, n:].sum(-1)
            own = pooled[b][:, t, :n].gather(1, idx[b]).sum(-1) + diag
            for a in range(b):
                for ha in range(H):
                    for hb in range(H):
                        c = (pooled[b][hb, t, idx[a][ha]].sum() + diag[hb]) / own[hb]
                        cov[a, b, ha, hb] = min(cov[a, b, ha, hb], float(c))
    return cov


def test_statistics_match_naive_computation():
    L, Hq, H, N, D, tile, topk = 3, 4, 2, 160, 8, 16, 20
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(Hq, N, D, generator=g) * 2 for _ in range(L)]
    ks = [torch.randn(H, N, D, generator=g) * 2 for _ in range(L)]
    ks[2] = ks[1]  # layer 2 looks at what layer 1 looks at: coverage of its own heads is 1
    qs[2] = qs[1]
    strat = CalibrationStrategy(L, H, topk=topk, tile=tile, backend="reference")
    strat.begin_forward()
    for layer in range(L):
        v = torch.randn(1, H, N, D, generator=g)
        strat.attend(layer, qs[layer][None], ks[layer][None], v, None, None)
    sim = strat.similarity()
    # scores are float32 in the collector, float64 here: agreement to float32 rounding
    np.testing.assert_allclose(sim, _naive_min_cov(qs, ks, tile, topk), rtol=1e-5, atol=1e-6)
    assert sim[1, 2, 0, 0] == pytest.approx(1.0) and sim[1, 2, 1, 1] == pytest.approx(1.0)
    assert sim[0, 1].max() < 1.0


@pytest.mark.parametrize("last_tiles", [1, 3, 50])
def test_statistics_of_the_last_tiles_match_naive_computation(last_tiles):
    """last_tiles: only the prompt's last tiles count (the answer's queries); more tiles than the prompt has
    is the whole prompt."""
    L, Hq, H, N, D, tile, topk = 3, 4, 2, 160, 8, 16, 20
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(Hq, N, D, generator=g) * 2 for _ in range(L)]
    ks = [torch.randn(H, N, D, generator=g) * 2 for _ in range(L)]
    strat = CalibrationStrategy(L, H, topk=topk, tile=tile, backend="reference", last_tiles=last_tiles)
    strat.begin_forward()
    for layer in range(L):
        strat.attend(layer, qs[layer][None], ks[layer][None], torch.randn(1, H, N, D, generator=g), None, None)
    want = _naive_min_cov(qs, ks, tile, topk, last_tiles)
    np.testing.assert_allclose(strat.similarity(), want, rtol=1e-5, atol=1e-6)
    if last_tiles == 1:  # a minimum over fewer tiles: never lower than over all of them, and higher somewhere
        every = _naive_min_cov(qs, ks, tile, topk)
        assert np.all(want >= every - 1e-12) and np.any(want > every + 1e-6)
    with pytest.raises(ValueError, match="last_tiles: expected None or an integer >= 1"):
        CalibrationStrategy(L, H, last_tiles=0)


def test_layer_scores_and_head_map():
    sim = np.ones((3, 3, 2, 2)) * 0.5
    sim[0, 1] = [[0.2, 0.9], [0.8, 0.1]]  # layer 1 head 0 is best served by anchor head 1, head 1 by head 0
    score = layer_scores(sim, np.array([1.0, 2.0, 3.0]))
    assert score[0, 1] == pytest.approx(2.0 * np.mean([0.8, 0.9]))
    assert score[1, 0] == 0
    assert head_map_for(sim, [0, 2]) == [[0, 1], [1, 0], [0, 1]]


def test_calibrate_end_to_end_on_tiny_model(tmp_path):
    model = tiny_model("qwen3")
    texts = [torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plan, report = calibrate_report(model, texts, num_anchors=3, topk=16, tile=32, k_min=16, progress=False,
                                    data_name="random tokens")
    plan.validate(model.config)
    assert len(plan.anchors) == 3 and plan.anchors[0] == 0
    assert plan.provenance["num_prompts"] == 2 and plan.provenance["prompt_tokens"] == [300, 300]
    assert report["similarity"].shape == (6, 6, 2, 2)
    assert np.all(report["importance"] > 0)
    paths = save_plots(report, tmp_path)
    assert all((tmp_path / p).stat().st_size > 1000 for p in paths)


def test_calibrate_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="num_anchors"):
        calibrate_report(model, [torch.arange(200)], num_anchors=7, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate_report(model, ["some text"], num_anchors=2, progress=False)
    with pytest.raises(ValueError, match="more than topk"):
        calibrate_report(model, [torch.arange(50)], num_anchors=2, progress=False)
