"""kascade.routing: the routes a plan implies, worked out by hand for every kind of layer.

Four KV heads. Layer 1 selects on heads 1 and 3 and reads layer 0 for heads 0 and 2; layer 3 selects on
heads 0, 1 and 3 and reads the anchor (layer 2) for head 2; layer 4 reads four layers; layer 5 reads the
anchor through a permutation. Selections kept: layers 0 and 2 all four heads, layer 1 heads [1, 3],
layer 3 heads [0, 1, 3]."""

import pytest
import torch

from kascade.plan import Plan
from kascade.routing import Routing

SOURCES = [None, [[0, 0], None, [0, 2], None], None, [None, None, [2, 2], None], [[1, 1], [3, 0], [2, 0], [0, 3]],
           [[2, 1], [2, 0], [2, 3], [2, 2]]]


def test_routes_of_every_kind_of_layer():
    routing = Routing(Plan(anchors=[0, 2], head_sources=SOURCES, k_min=8), num_kv_heads=4)
    anchor = routing.layer(2)
    assert (anchor.own, anchor.layers, anchor.rows, anchor.head_map, anchor.part) == ([0, 1, 2, 3], [2], None, None,
                                                                                      None)
    one = routing.layer(1)  # stacked: layer 0's four heads, then its own two
    assert (one.own, one.layers, one.rows, one.slices, one.perm) == ([1, 3], [0, 1], [0, 4, 2, 5], [slice(1, 4, 2)],
                                                                     None)
    assert one.part == (0, slice(1, 4, 2), [0, -1, 2, -2])  # one view, one earlier layer: ops.part_anchor
    three = routing.layer(3)  # two views, [0, 1] and [3]; head 2 from the anchor's rows 0..3
    assert (three.own, three.layers, three.rows) == ([0, 1, 3], [2, 3], [4, 5, 2, 6])
    assert three.slices == [slice(0, 2, 1), slice(3, 4, 1)] and three.perm == [0, 1, 2] and three.part is None
    four = routing.layer(4)  # rows of [layer 0 (4), layer 1 (2), layer 2 (4), layer 3 (3)]
    assert (four.own, four.layers, four.rows, four.head_map) == ([], [0, 1, 2, 3], [4, 10, 6, 3], None)
    five = routing.layer(5)  # one anchor, permuted: a head map
    assert (five.layers, five.rows, five.head_map) == ([2], [1, 0, 3, 2], [1, 0, 3, 2])
    assert routing.used_by_later_layers(0) and routing.used_by_later_layers(3) and not routing.used_by_later_layers(4)
    t = routing.tensors(1, "cpu")
    assert t.rows.tolist() == [0, 4, 2, 5] and t.rows.dtype == torch.int64 and t.perm is None
    assert t.part_route.tolist() == [0, -1, 2, -2] and t.part_route.dtype == torch.int32
    assert routing.tensors(1, "cpu") is t  # built once per device


def test_slices_out_of_head_order_get_a_permutation():
    sources = [None, [None, [0, 1], [0, 2], None, None, None, [0, 6], None]]  # own 0, 3, 4, 5, 7
    route = Routing(Plan(anchors=[0], head_sources=sources), num_kv_heads=8).layer(1)
    assert route.slices == [slice(0, 8, 7), slice(3, 6, 1)]  # heads 0, 7 then 3, 4, 5
    assert route.perm == [0, 2, 3, 4, 1]  # own head 7 is the second row of the stacked views


def test_layer_granular_plan_routes_through_its_head_map():
    plan = Plan(anchors=[0, 2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]])
    routing = Routing(plan, num_kv_heads=2)
    assert routing.layer(1).head_map == [1, 0] and routing.layer(3).head_map == [1, 1]
    assert routing.layer(3).layers == [2] and routing.layer(1).own == []
    assert routing.used_by_later_layers(0) and not routing.used_by_later_layers(1)


def test_shard_routes_are_rebased_to_local_heads():
    """TP = 2 (rank 1 holds KV heads 2, 3): sources re-based, layers unchanged; rows count the rank's heads."""
    inside = [None, [[0, 1], None, None, [0, 2]], None, [None, [2, 0], [1, 2], None], [[3, 0], [1, 1], [2, 3], [3, 3]]]
    plan = Plan(anchors=[0, 2], head_sources=inside, tp_degree=2)
    rank1 = Routing(plan, num_kv_heads=2, tp_rank=1)
    assert (rank1.tp_degree, rank1.tp_rank) == (2, 1)
    assert rank1.layer(1).sources == [(1, 0), (0, 0)] and rank1.layer(1).own == [0]
    assert rank1.layer(3).sources == [(1, 0), (3, 1)] and rank1.layer(3).rows == [0, 1]
    assert rank1.layer(4).sources == [(2, 1), (3, 1)] and rank1.layer(4).rows == [1, 2]
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        Routing(plan, num_kv_heads=2)  # a shard, and no rank to place it
    with pytest.raises(ValueError, match="num_kv_heads: expected the plan's 4 KV heads or a shard of them"):
        Routing(plan, num_kv_heads=3)
    with pytest.raises(ValueError, match="tp_rank: expected an integer in"):
        Routing(plan, num_kv_heads=2, tp_rank=2)
