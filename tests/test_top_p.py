"""kascade.eval.top_p: mass-adaptive (top-p) budgets, on the reference path."""

from __future__ import annotations

import pytest
import torch

from kascade import ops
from kascade.budget import budget
from kascade.eval import top_p as TP


def test_counts_are_the_fewest_keys_holding_the_share():
    mass = torch.tensor([[0.2, 0.5, 0.3], [1.0, 1.0, 2.0]])
    assert TP.top_p_counts(mass, 0.5, 1).tolist() == [1, 1]
    assert TP.top_p_counts(mass, 0.75, 1).tolist() == [2, 2]
    assert TP.top_p_counts(mass, 0.81, 1).tolist() == [3, 3]
    assert TP.top_p_counts(mass, 0.5, 2).tolist() == [2, 2]  # at least min(k_min, n)
    assert TP.top_p_counts(mass, 0.5, 9).tolist() == [3, 3]


@pytest.mark.parametrize("qlen", [1, 70])
def test_selected_keys_hold_p_and_no_fewer_would(qlen):
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, qlen, 16) * 2, torch.randn(1, 2, 300, 16) * 2
    sels, kept = TP.top_p_selections(q, k, 0.7, 8, 32)
    assert len(sels) == 2 and kept == sum(int(s.counts.sum()) for s in sels)
    sc = 16 ** -0.5
    for h, sel in enumerate(sels):
        for u in range(sel.indices.shape[2]):
            cnt = int(sel.counts[0, u])
            if qlen == 1:
                logits = torch.einsum("gd,nd->gn", q[0, 2 * h:2 * h + 2, 0], k[0, h]) * sc
                mass = logits.softmax(-1).sum(0)
            else:
                t = (300 - qlen) // 32 + u  # the tile's index: its queries' probabilities, pooled
                first, rows = t * 32, range(max(t * 32, 300 - qlen), min(t * 32 + 32, 300))
                if first == 0:
                    assert cnt == 0
                    continue
                mass = torch.zeros(first)
                for i in rows:
                    lg = torch.einsum("gd,nd->gn", q[0, 2 * h:2 * h + 2, i - (300 - qlen)], k[0, h, : i + 1]) * sc
                    mass += lg.softmax(-1)[:, :first].sum(0)
            idx = sel.indices[0, 0, u, :cnt].long()
            share = float(mass[idx].sum() / mass.sum())
            assert share >= 0.7 - 1e-5 and (sel.indices[0, 0, u, cnt:] == -1).all()
            if cnt > 8:  # dropping the smallest kept key falls below p
                assert share - float(mass[idx].min() / mass.sum()) < 0.7 + 1e-5


@pytest.mark.parametrize("sparse_prefill", [True, False])
def test_all_the_mass_is_dense_attention(sparse_prefill):
    """p = 1 keeps every key of every tile and step: the strategy's output is dense attention's."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 90, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    s = TP.TopPStrategy("top-p", 1.0, 0.1, k_min=4, tile=32, backend="reference", sparse_prefill=sparse_prefill)
    for qq, kk, vv in ((q, k, v), (q[:, :, -1:], k, v)):
        assert torch.allclose(s.attend(3, qq, kk, vv, None, None), ops.dense(qq, kk, vv, backend="reference"),
                              atol=1e-5)


def test_key_share_counts_against_uniform_top_k():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 500, 16), torch.randn(1, 2, 500, 16)
    s = TP.TopPStrategy("top-p", 0.9, 0.1, k_min=16, tile=32, backend="reference")
    s.attend(2, q, k, v, None, None)
    assert s.uniform == 2 * budget(500, 0.1, 16) and s.kept > 0
    assert s.key_share() == s.kept / s.uniform
    assert TP.uniform_keys(300, 70, 2, 0.1, 16, 32) == 2 * sum(budget(t * 32, 0.1, 16) for t in range(7, 10))


def test_calibrated_p_interpolates_to_equal_keys():
    assert TP.calibrate_p([0.5, 0.8, 0.9], [0.4, 0.8, 1.2]) == pytest.approx(0.85)
    assert TP.calibrate_p([0.5, 0.8], [1.5, 2.0]) == 0.5 and TP.calibrate_p([0.5, 0.8], [0.1, 0.2]) == 0.8
    with pytest.raises(ValueError, match="shares: expected non-decreasing"):
        TP.calibrate_p([0.5, 0.8], [1.0, 0.5])
    with pytest.raises(ValueError, match=r"p: expected a share of the attention mass in \(0, 1\], got 1.5"):
        TP.TopPStrategy("top-p", 1.5, 0.1)
