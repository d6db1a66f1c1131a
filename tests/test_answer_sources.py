"""benchmarks/answer_sources.py: the selecting units it reads from a plan, and how it counts rerouted heads."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import answer_sources as A  # noqa: E402
from kascade.calibrate import output_aware as OA  # noqa: E402

CFG = {"model_type": "llama", "num_layers": 6, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}


def test_the_units_of_a_plan_rebuild_it_and_rerouting_is_counted_per_head():
    units = {(0, 0), (0, 1), (2, 0), (2, 1), (3, 1), (5, 0)}
    sim = np.random.default_rng(0).random((6, 6, 2, 2))
    plan = OA.plan_of_units(units, sim, CFG)
    assert A.selecting_units(plan) == units
    assert A.routed_differently(plan, OA.plan_of_units(units, sim, CFG)) == 0
    flipped = sim.copy()
    flipped[0, 1] = flipped[0, 1][::-1]  # layer 1's heads now prefer the other head of layer 0
    other = OA.plan_of_units(units, flipped, CFG)
    assert [plan.head_sources[1], other.head_sources[1]] == [[[0, int(np.argmax(sim[0, 1, :, 0]))],
                                                            [0, int(np.argmax(sim[0, 1, :, 1]))]],
                                                           [[0, 1 - int(np.argmax(sim[0, 1, :, 0]))],
                                                            [0, 1 - int(np.argmax(sim[0, 1, :, 1]))]]]
    assert A.routed_differently(plan, other) >= 2
