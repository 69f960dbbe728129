"""Which standby NPUs a scale-up takes for an instance with a placement strategy
(cluster.node_placement): pure decisions, no Ray."""

from __future__ import annotations

import pytest

from cluster.node_placement import NodePlacement, choose_standby, home_node

pytestmark = pytest.mark.fast

POOL = [("s0", "b"), ("s1", "a"), ("s2", "c"), ("s3", "a"), ("s4", "b")]


def pick(strategy: str, nodes: list[str], n: int) -> list[str]:
    return [actor for actor, _ in choose_standby(NodePlacement(strategy), nodes, POOL, n)]


def test_home_node_is_where_most_npus_are():
    assert home_node(["b", "a", "a"]) == "a"
    assert home_node(["b", "a"]) == "b"  # a tie: the first


def test_pack_takes_the_home_node_first_and_strict_pack_nothing_else():
    assert pick("PACK", ["a", "a", "b"], 3) == ["s1", "s3", "s0"]
    assert pick("STRICT_PACK", ["a"], 3) == ["s1", "s3"]
    assert pick("STRICT_PACK", ["d"], 2) == []


def test_spread_takes_the_least_used_nodes_and_strict_spread_only_new_ones():
    assert pick("SPREAD", ["a", "b"], 3) == ["s2", "s0", "s1"]  # c (unused), then b and a once each
    assert pick("STRICT_SPREAD", ["a"], 3) == ["s0", "s2"]  # one on b, one on c, none on a
    assert pick("STRICT_SPREAD", ["a", "b", "c"], 1) == []
