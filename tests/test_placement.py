"""Omni Placement (cluster.placement): expert -> NPU maps with redundant copies of hot experts."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.expert_map import ExpertMap
from cluster import placement
from cluster.placement import (imbalance, npu_loads, placement_report, plan_layer, plan_placement,
                               slots_needed)

pytestmark = pytest.mark.fast


def zipf(n: int, s: float = 1.0, scale: float = 1000.0) -> list[float]:
    return [scale / (i + 1) ** s for i in range(n)]


def contiguous(num_experts: int, ep_size: int) -> list[list[int]]:
    return ExpertMap.contiguous([0], num_experts, ep_size).slots[0]


def copies_of(slots: list[list[int]], num_experts: int) -> list[int]:
    return [sum(e in held for held in slots) for e in range(num_experts)]


def check_plan(slots: list[list[int]], load: list[float], ep_size: int, slots_per_npu: int) -> None:
    ExpertMap({0: slots}).validate(len(load))
    assert len(slots) == ep_size
    assert all(len(held) <= slots_per_npu for held in slots)
    assert all(held == sorted(held) for held in slots)
    assert all(n <= ep_size for n in copies_of(slots, len(load)))


# -- skewed load: the point of the exercise -------------------------------------------------


def test_skewed_load_beats_contiguous():
    load = zipf(16)
    ep, slots = 4, slots_needed(16, 4, redundant_per_npu=1)
    assert slots == 5
    plan = plan_layer(load, ep, slots)
    check_plan(plan, load, ep, slots)
    base = imbalance(contiguous(16, ep), load)
    got = imbalance(plan, load)
    assert base > 2.0  # rank 0 holds the four hottest experts
    assert got < base
    assert got <= 1.25
    assert max(npu_loads(plan, load)) < max(npu_loads(contiguous(16, ep), load))


def test_hot_experts_get_the_copies():
    load = zipf(16)
    plan = plan_layer(load, 4, 5)
    copies = copies_of(plan, 16)
    assert copies[0] >= 2  # the hottest expert is replicated
    assert sum(copies) > 16  # spare slots were spent
    # more load never means fewer copies; the coldest experts are not replicated
    for a in range(16):
        for b in range(16):
            if load[a] > load[b]:
                assert copies[a] >= copies[b]
    assert copies[-1] == 1


def test_no_copies_without_spare_slots():
    load = zipf(16)
    plan = plan_layer(load, 4, 4)
    check_plan(plan, load, 4, 4)
    assert copies_of(plan, 16) == [1] * 16
    assert all(len(held) == 4 for held in plan)
    assert imbalance(plan, load) < imbalance(contiguous(16, 4), load)


def test_single_hot_expert_spread_over_every_npu():
    load = [100.0] + [1.0] * 7
    plan = plan_layer(load, 4, 3)  # 12 slots, 4 spare
    check_plan(plan, load, 4, 3)
    assert copies_of(plan, 8)[0] == 4  # capped at ep_size copies, one per rank
    assert imbalance(plan, load) == pytest.approx(1.0, abs=0.05)


def test_zero_load_experts_get_no_copies():
    load = [50.0, 0.0, 0.0, 0.0, 30.0, 0.0, 0.0, 0.0]
    plan = plan_layer(load, 2, 6)
    check_plan(plan, load, 2, 6)
    copies = copies_of(plan, 8)
    assert all(copies[e] == 1 for e in range(8) if load[e] == 0)
    assert imbalance(plan, load) == pytest.approx(1.0)


def test_uniform_load_full_budget_is_balanced():
    for ep, per in [(1, 8), (2, 4), (4, 4), (8, 2), (16, 16)]:
        load = [7.0] * (ep * per)
        plan = plan_layer(load, ep, per)
        check_plan(plan, load, ep, per)
        assert imbalance(plan, load) == 1.0


def test_uniform_load_spare_slots_stay_balanced_without_copies():
    load = [1.0] * 8
    plan = plan_layer(load, 2, 6)
    assert imbalance(plan, load) == 1.0
    assert copies_of(plan, 8) == [1] * 8  # copies that do not help are not made


def test_deterministic():
    load = [float(x) for x in (5, 3, 3, 9, 0, 1, 1, 7, 2, 2, 8, 4)]
    first = plan_layer(load, 3, 5)
    for _ in range(3):
        assert plan_layer(list(load), 3, 5) == first
    assert plan_layer(tuple(int(x) for x in load), 3, 5) == first  # any sequence, ints too


# -- all-zero load: the default layout ----------------------------------------------------------


def test_all_zero_load_is_contiguous():
    for e, ep in [(8, 2), (16, 4), (6, 6), (4, 1)]:
        assert plan_layer([0.0] * e, ep, e // ep) == contiguous(e, ep)
        assert plan_layer([0] * e, ep, e // ep + 2) == contiguous(e, ep)  # no copies either


def test_all_zero_load_not_divisible_is_round_robin():
    plan = plan_layer([0.0] * 7, 3, 3)
    assert plan == [[0, 3, 6], [1, 4], [2, 5]]
    check_plan(plan, [0.0] * 7, 3, 3)


# -- npu_loads / imbalance ------------------------------------------------------------------


def test_npu_loads_split_copies_evenly():
    assert npu_loads([[0, 1], [0, 2]], [4.0, 1.0, 1.0]) == [3.0, 3.0]
    assert npu_loads([[0], [0], [0], [1]], [9.0, 3.0]) == [3.0, 3.0, 3.0, 3.0]
    assert npu_loads([[0, 1], []], [2.0, 5.0]) == [7.0, 0.0]


def test_planned_copies_split_evenly():
    load = [120.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    plan = plan_layer(load, 4, 3)
    loads = npu_loads(plan, load)
    copies = copies_of(plan, 8)
    assert copies[0] == 4
    assert sum(loads) == pytest.approx(sum(load))
    # each rank carries a quarter of expert 0 plus its singletons
    for held, got in zip(plan, loads):
        assert got == pytest.approx(sum(load[e] / copies[e] for e in held))
    assert max(loads) == pytest.approx(50.0)


def test_npu_loads_rejects_lost_load_and_unknown_experts():
    with pytest.raises(ValueError, match="slots"):
        npu_loads([[0], [0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="slots"):
        npu_loads([[0], [5]], [1.0, 2.0])
    assert npu_loads([[0], [0]], [1.0, 0.0]) == [0.5, 0.5]  # an unloaded expert may be absent


def test_imbalance():
    assert imbalance([[0], [1]], [1.0, 1.0]) == 1.0
    assert imbalance([[0], [1]], [3.0, 1.0]) == 1.5
    assert imbalance([[0], [1]], [0.0, 0.0]) == 1.0
    assert imbalance([[0, 1], []], [1.0, 1.0]) == 2.0


# -- placement over layers, report --------------------------------------------------------------


def test_plan_placement_and_report():
    load = {3: zipf(16), 1: zipf(16, s=1.5)[::-1], 5: [0.0] * 16}
    emap = plan_placement(load, 4, 5)
    assert isinstance(emap, ExpertMap)
    assert sorted(emap.slots) == [1, 3, 5]
    assert emap.ep_size == 4
    emap.validate(16)
    for layer, lo in load.items():
        assert emap.slots[layer] == plan_layer(lo, 4, 5)
    assert emap.slots[5] == contiguous(16, 4)

    report = placement_report(emap, load)
    assert set(report["layers"]) == {1, 3, 5}
    for layer, row in report["layers"].items():
        per_rank = npu_loads(emap.slots[layer], load[layer])
        assert row["imbalance"] == pytest.approx(imbalance(emap.slots[layer], load[layer]))
        assert row["max_load"] == pytest.approx(max(per_rank))
        assert row["mean_load"] == pytest.approx(sum(load[layer]) / 4)
        assert row["copies"] == {e: n for e, n in enumerate(copies_of(emap.slots[layer], 16)) if n > 1}
    assert report["layers"][3]["copies"][0] >= 2  # the hot expert of layer 3 (expert 0)
    assert report["layers"][1]["copies"][15] >= 2  # the hot expert of layer 1 (expert 15)
    assert report["layers"][5] == {"imbalance": 1.0, "max_load": 0.0, "mean_load": 0.0, "copies": {}}
    ratios = [row["imbalance"] for row in report["layers"].values()]
    assert report["max_imbalance"] == max(ratios)
    assert report["mean_imbalance"] == pytest.approx(sum(ratios) / 3)

    baseline = placement_report(ExpertMap.contiguous([1, 3, 5], 16, 4), load)
    assert report["max_imbalance"] < baseline["max_imbalance"]
    assert all(not row["copies"] for row in baseline["layers"].values())


def test_report_needs_every_loaded_layer_in_the_map():
    emap = ExpertMap.contiguous([0], 4, 2)
    with pytest.raises(ValueError, match="layer 1"):
        placement_report(emap, {0: [1.0] * 4, 1: [1.0] * 4})


def test_plan_placement_empty():
    assert plan_placement({}, 4, 2).slots == {}


# -- validation -------------------------------------------------------------------------------


def test_budget_error_names_the_argument():
    with pytest.raises(ValueError, match=r"^slots_per_npu: 3 slots x 2 NPUs cannot hold 8 experts$"):
        plan_layer([1.0] * 8, 2, 3)
    with pytest.raises(ValueError, match="slots_per_npu"):
        plan_placement({0: [1.0] * 8}, 2, 0)
    with pytest.raises(ValueError, match="ep_size"):
        plan_layer([1.0] * 8, 0, 8)
    with pytest.raises(ValueError, match="load"):
        plan_layer([1.0, -2.0], 2, 1)
    with pytest.raises(ValueError, match="load"):
        plan_layer([1.0, math.nan], 2, 1)
    with pytest.raises(ValueError, match="load"):
        plan_layer([], 2, 1)


def test_slots_needed():
    assert slots_needed(16, 4) == 4
    assert slots_needed(16, 4, 1) == 5
    assert slots_needed(7, 3) == 3
    assert slots_needed(256, 32, 2) == 10
    assert slots_needed(0, 4) == 0
    with pytest.raises(ValueError, match="ep_size"):
        slots_needed(16, 0)
    with pytest.raises(ValueError, match="redundant_per_npu"):
        slots_needed(16, 4, -1)


def test_repair_when_every_free_rank_holds_the_expert():
    # Forced copy counts the greedy would not choose: expert 4 (tiny, 2 copies) comes last;
    # rank 1 fills with experts 1-3, rank 0 (expert 0) takes expert 4's first copy, and
    # the second copy has no free rank without expert 4 until one expert moves over.
    held = placement._place([10.0, 1.0, 1.0, 1.0, 0.2], [1, 1, 1, 1, 2], 2, 3)
    assert [sorted(h) for h in held] == [[0, 1, 4], [2, 3, 4]]


# -- properties -------------------------------------------------------------------------------


@st.composite
def layer_cases(draw):
    ep = draw(st.integers(1, 6))
    num_experts = draw(st.integers(1, 24))
    slots = -(-num_experts // ep) + draw(st.integers(0, 3))
    value = st.one_of(st.just(0.0), st.floats(0.0, 1000.0, allow_nan=False), st.integers(0, 9).map(float))
    load = draw(st.lists(value, min_size=num_experts, max_size=num_experts))
    return load, ep, slots


@settings(derandomize=True, max_examples=200, deadline=None)
@given(layer_cases())
def test_plan_properties(case):
    load, ep, slots = case
    plan = plan_layer(load, ep, slots)
    check_plan(plan, load, ep, slots)
    copies = copies_of(plan, len(load))
    for a, la in enumerate(load):
        if la == 0:
            assert copies[a] == 1
        for b, lb in enumerate(load):
            if la > lb:
                assert copies[a] >= copies[b]
    ratio = imbalance(plan, load)
    assert ratio >= 1.0 - 1e-9
    # a plan is never worse than the default layout it replaces
    num_experts = len(load)
    if num_experts % ep == 0:
        assert ratio <= imbalance(contiguous(num_experts, ep), load) * (1 + 1e-12)
    else:
        default = [list(range(r, num_experts, ep)) for r in range(ep)]
        assert ratio <= imbalance(default, load) * (1 + 1e-12)
    # sanity: a rank carries at least each copy it holds
    per_rank = npu_loads(plan, load)
    assert max(per_rank) >= max(load[e] / copies[e] for e in range(num_experts)) - 1e-9
    assert plan_layer(load, ep, slots) == plan


def test_device_load_metric_splits_a_replicated_expert_among_its_copies():
    """omniray_expert_device_load after a rebalance with copies: what each NPU receives."""
    from cluster.metrics import device_loads

    npus = [  # expert 0 is hot and on both NPUs; each NPU counts what its own tokens chose
        {"experts": {"1": [0, 1]}, "expert_load": {"1": [60, 10, 0, 0]}},
        {"experts": {"1": [0, 2, 3]}, "expert_load": {"1": [40, 0, 20, 10]}},
    ]
    assert device_loads(npus) == {1: [50.0 + 10.0, 50.0 + 20.0 + 10.0]}
    assert sum(device_loads(npus)[1]) == 140  # every routed pair counted once
    npus[1]["experts"]["1"] = [2, 3]  # expert 0 on one NPU only: all its load there
    assert device_loads(npus) == {1: [100.0 + 10.0, 30.0]}
    npus[0]["experts"]["1"] = [1]  # expert 0 on none (a snapshot taken mid-switch): the layer is left out
    assert device_loads(npus) == {}


# -- resizing an instance's map (ElasticMoE): the NPUs it keeps keep their experts ----------
@settings(max_examples=60, deadline=None)
@given(st.sampled_from([8, 12, 16]), st.data())
def test_resized_map_moves_only_what_the_new_size_forces(num_experts, data):
    sizes = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    old, new = data.draw(st.sampled_from(sizes)), data.draw(st.sampled_from(sizes))
    load = data.draw(st.lists(st.floats(0, 100), min_size=num_experts, max_size=num_experts))
    start = ExpertMap({0: plan_layer(load, old, num_experts // old + 1)})  # with copies of hot experts
    ranks = start.resized(num_experts, new).slots[0]
    ExpertMap({0: ranks}).validate(num_experts)
    share = num_experts // new
    assert [len(held) for held in ranks] == [share] * new
    assert sorted(e for held in ranks for e in held) == list(range(num_experts))  # one copy each
    placed = set()
    for rank in range(min(old, new)):  # a kept NPU keeps as many of its experts as fit
        own = [e for e in start.slots[0][rank] if e not in placed]
        assert ranks[rank][: min(share, len(own))] == own[:share]
        placed.update(ranks[rank])


def test_resized_contiguous_doubling_moves_half_and_comes_back():
    m = ExpertMap.contiguous([1], 8, 2)
    up = m.resized(8, 4)
    assert up.slots[1] == [[0, 1], [4, 5], [2, 3], [6, 7]]  # kept ranks 0 and 1 stage nothing
    assert up.resized(8, 2) == m
    with pytest.raises(ValueError, match="multiple of the EP size"):
        m.resized(8, 3)


def test_gained_is_what_a_rank_must_stage():
    up = ExpertMap.contiguous([1, 3], 8, 2).resized(8, 4)
    assert up.gained(1, {1: [4, 5, 6, 7], 3: [4, 5, 6, 7]}) == {1: [], 3: []}  # a kept rank: nothing
    assert up.gained(2, {}) == {1: [2, 3], 3: [2, 3]}  # a new rank: all it holds
    assert ExpertMap.contiguous([1], 8, 2).gained(0, {1: [0, 1]}) == {1: [2, 3]}


def test_a_kept_npu_stages_only_experts_none_of_its_maps_hold():
    """cluster.elastic._gains: what a kept NPU holds is its map's experts and those
    it kept aside from before its last switch (rank 1 here: EP 2's 4-7 under EP 4's 4, 5)."""
    from dataclasses import replace

    from actors.protocol import NPUSpec
    from cluster.elastic import _gains

    ep2 = ExpertMap.contiguous([1, 3], 8, 2)
    ep4 = ep2.resized(8, 4)
    spec = NPUSpec("x.npu1", "x", 1, "910B", "emulated", None, ep2, "x-group")
    assert not _gains(spec, [ep4, ep2])  # back to the map it kept: nothing compared
    assert not _gains(replace(spec, expert_map=ExpertMap.contiguous([1, 3], 8, 2)), [ep4, ep2])  # an equal one
    assert _gains(spec, [ep4])  # 6 and 7 were not kept aside
    assert not _gains(replace(spec, expert_map=ep4), [ep4])


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(0, 95), st.lists(st.lists(st.integers(0, 300), max_size=6), min_size=1, max_size=5),
                       max_size=6))
def test_an_expert_map_survives_the_wire(slots):
    """Any map (uneven copies, empty ranks) comes back equal, with int lists;
    a process that receives the same map again decodes it once."""
    ranks = len(next(iter(slots.values()))) if slots else 0
    slots = {layer: (held + [[]] * ranks)[:ranks] for layer, held in slots.items()}  # one rank count a map
    m = ExpertMap(slots)
    back = pickle.loads(pickle.dumps(m))
    assert back == m and back.slots == slots
    assert all(type(e) is int for held in back.slots.values() for experts in held for e in experts)
    assert pickle.loads(pickle.dumps(ExpertMap(dict(slots)))) is back
