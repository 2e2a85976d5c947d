"""TP / DP layout arithmetic and its error messages (no processes)."""

from __future__ import annotations

import pytest

from kcache_dist.parallel.layout import local_position, plan_layout


def test_groups_are_consecutive_ranks():
    layout = plan_layout(8, 4)
    assert layout.dp_size == 2
    assert layout.all_tp_groups() == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert layout.dp_leaders() == (0, 4)
    assert plan_layout(6, 1).all_tp_groups() == [(r,) for r in range(6)]


@pytest.mark.parametrize("world, tp, message", [
    (4, 3, r"tensor_parallel_size 3 does not divide the world size 4 .* one of \[1, 2, 4\]"),
    (1, 2, r"tensor_parallel_size 2 needs 2 processes, but this process was started alone"),
    (4, 0, r"integer >= 1, got 0"),
])
def test_sizes_that_do_not_fit(world, tp, message):
    with pytest.raises(ValueError, match=message):
        plan_layout(world, tp)


def test_tp_group_must_stay_on_one_node():
    two_nodes = ["a", "a", "b", "b"]
    assert plan_layout(4, 2, two_nodes).all_tp_groups() == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match=r"tensor_parallel_size 4 is larger than the 2 ranks per node .*"
                                         r"allow_cross_node_tp=True"):
        plan_layout(4, 4, two_nodes)
    assert plan_layout(4, 4, two_nodes, allow_cross_node_tp=True).tp_size == 4
    with pytest.raises(ValueError, match=r"ranks \[0, 1\] spans hosts \['a', 'b'\] because ranks are not laid out"):
        plan_layout(4, 2, ["a", "b", "a", "b"])


def test_local_position_counts_ranks_on_the_same_host():
    hosts = ["a", "a", "b", "b", "b"]
    assert [local_position(hosts, r) for r in range(5)] == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
