"""kascade.eval.layer_budgets: the exact allocation at equal total keys, the coverage curves of a dense forward,
and per-layer top-k with per-layer budgets (full budget = dense; one budget everywhere = the oracle)."""

import itertools

import numpy as np
import pytest
import torch

import kascade
from fixtures import evaltools as E
from kascade.eval import layer_budgets as LB
from kascade.eval import strategies as S
from models import one_thread_fixture

VOCAB = 300
_one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def model():
    return E.tiny_llama(VOCAB, layers=4)


def _ids(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _brute(curves, rhos, rho):
    """Every assignment of the grid to layers 1..L-1 with mean rho at most `rho`: the most covered mass."""
    layers = curves.shape[0] - 1
    best = -np.inf
    for pick in itertools.product(range(len(rhos)), repeat=layers):
        if sum(rhos[j] for j in pick) <= rho * layers + 1e-9:
            best = max(best, sum(curves[i + 1, j] for i, j in enumerate(pick)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_best_assignment_at_equal_total_keys(seed):
    rng = np.random.default_rng(seed)
    rhos = [0.025, 0.05, 0.1, 0.2]
    # increasing curves, some flat at small budgets (k_min) and not concave
    curves = np.sort(rng.random((5, len(rhos))), axis=1)
    curves[:, 1] = np.where(rng.random(5) < 0.4, curves[:, 0], curves[:, 1])
    got = LB.allocate(curves, rhos, 0.1)
    assert got[0] is None and len(got) == 5
    assert sum(got[1:]) <= 0.1 * 4 + 1e-9
    covered = sum(curves[i, rhos.index(r)] for i, r in enumerate(got) if r is not None)
    assert covered == pytest.approx(_brute(curves, rhos, 0.1))
    assert covered >= sum(curves[1:, rhos.index(0.1)]) - 1e-12  # never worse than the uniform budget


def test_allocation_refuses_a_grid_it_cannot_count_in_units():
    curves = np.ones((3, 3))
    with pytest.raises(ValueError, match="rhos: expected an increasing grid of multiples"):
        LB.allocate(curves, [0.03, 0.05, 0.1], 0.1)
    with pytest.raises(ValueError, match="rhos: expected an increasing grid"):
        LB.allocate(curves, [0.1, 0.05, 0.2], 0.1)
    with pytest.raises(ValueError, match="at most rho=0.01"):
        LB.allocate(curves, [0.025, 0.05, 0.1], 0.01)


def test_coverage_curves_are_shares_of_mass_that_grow_with_the_budget(model):
    prompts = [_ids(200, seed=s)[0].tolist() for s in range(2)]
    curves = LB.coverage_curves(model, prompts, rhos=(0.05, 0.2, 0.5, 1.0), k_min=8, tile=32, progress=False)
    assert curves.shape == (4, 4)
    assert (np.diff(curves, axis=1) >= -1e-6).all() and (curves > 0).all()
    np.testing.assert_allclose(curves[:, -1], 1.0, atol=1e-5)  # every key before the tile: all of its mass
    assert (curves[:, 0] < 1.0).all()


def test_coverage_curves_need_a_last_tile_beyond_k_min(model):
    with pytest.raises(ValueError, match="prompts: too short"):
        LB.coverage_curves(model, [_ids(40)[0].tolist()], rhos=(0.5,), k_min=64, progress=False)


def _run(model, strategy, ids, decode_from):
    from kascade.eval.generation import step

    with torch.no_grad(), kascade.enable(model, strategy=strategy):
        logits, cache = step(model, ids[:, :decode_from])
        steps = [logits[:, -1]]
        for i in range(decode_from, ids.shape[1]):
            lg, cache = step(model, ids[:, i:i + 1], cache)
            steps.append(lg[:, -1])
    return logits, torch.stack(steps)


def test_full_budgets_are_dense_and_one_budget_everywhere_is_the_oracle(model):
    ids = _ids(171, seed=3)
    dense = _run(model, S.make_strategy("dense", None, model.config, 1.0, 4), ids, 160)
    full = _run(model, LB.LayerBudgetStrategy("lb", [None, 1.0, 1.0, 1.0], k_min=4), ids, 160)
    for a, b in zip(full, dense):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    oracle = _run(model, S.make_strategy("oracle", None, model.config, 0.1, 4, tile=32), ids, 160)
    same = _run(model, LB.LayerBudgetStrategy("lb", [None, 0.1, 0.1, 0.1], k_min=4), ids, 160)
    for a, b in zip(same, oracle):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    other = _run(model, LB.LayerBudgetStrategy("lb", [None, 0.3, 0.05, 0.05], k_min=4), ids, 160)
    assert not torch.allclose(other[1], oracle[1])  # the budgets matter


def test_layer_budget_strategy_checks_its_budgets(model):
    with pytest.raises(ValueError, match=r"rhos\[2\]"):
        LB.LayerBudgetStrategy("lb", [None, 0.1, 1.5, 0.1])
    with pytest.raises(ValueError, match="one budget per layer \\(4\\), got 3"):
        LB.LayerBudgetStrategy("lb", [None, 0.1, 0.1]).validate(model.config)
