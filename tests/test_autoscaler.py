"""The autoscaler's decision policy (pure: no Ray)."""

from __future__ import annotations

import copy
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cluster.autoscaler import (
    AutoscalerConfig,
    AutoscalerPolicy,
    ClusterSignals,
    InstanceSignals,
    ScalingDecision,
)

pytestmark = pytest.mark.fast


def inst(name, role="mixed", ep=2, **kw):
    return InstanceSignals(name=name, role=role, ep=ep, **kw)


def policy(ep_choices=None, **kw):
    cfg = AutoscalerConfig(enabled=True, **kw)
    return AutoscalerPolicy(cfg) if ep_choices is None else AutoscalerPolicy(cfg, ep_choices)


def divides(num_experts):
    return lambda n: num_experts % n == 0


def only(decisions):
    assert len(decisions) == 1, decisions
    return decisions[0]


# -- scale out ---------------------------------------------------------------------------


def test_out_by_queue_grows_the_most_loaded_instance():
    p = policy()
    sig = ClusterSignals(queue_length=10, instances=[inst("m0", running=1), inst("m1", running=5, waiting=1)])
    d = only(p.decide(sig, now=0.0))
    assert (d.action, d.role, d.instance, d.npus) == ("scale_ep", "mixed", "m1", 4)
    assert "queue 5.5/instance > queue_high 4.0" in d.reason


def test_out_by_queue_counts_instance_waiting():
    p = policy()
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", waiting=9)])
    d = only(p.decide(sig, 0.0))
    assert d.action == "scale_ep" and "mixed queue 9.0/instance > queue_high 4.0" in d.reason


def test_master_queue_goes_to_prefill_in_pd_mode():
    p = policy()
    sig = ClusterSignals(
        queue_length=9, instances=[inst("p0", "prefill", kv_usage=0.5), inst("d0", "decode", kv_usage=0.5)]
    )
    d = only(p.decide(sig, 0.0))
    assert d.role == "prefill" and d.instance == "p0"
    assert "prefill queue 9.0/instance > queue_high 4.0" in d.reason


def test_out_by_kv():
    p = policy()
    sig = ClusterSignals(queue_length=0, instances=[inst("d0", "decode", kv_usage=0.9), inst("p0", "prefill", kv_usage=0.5)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.role, d.instance, d.npus) == ("scale_ep", "decode", "d0", 4)
    assert "decode kv 0.90 > kv_high 0.85" in d.reason


def test_out_by_ttft_slo_affects_dispatch_role():
    p = policy(ttft_slo_s=0.5)
    sig = ClusterSignals(
        queue_length=0,
        instances=[inst("p0", "prefill", kv_usage=0.5), inst("d0", "decode", kv_usage=0.5)],
        ttft_attainment=0.7,
    )
    d = only(p.decide(sig, 0.0))
    assert d.role == "prefill" and d.action == "scale_ep"
    assert "ttft attainment 0.70 < slo_target 0.9" in d.reason


def test_out_by_ttft_slo_mixed():
    p = policy(ttft_slo_s=0.5)
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", kv_usage=0.5)], ttft_attainment=0.5)
    d = only(p.decide(sig, 0.0))
    assert d.role == "mixed" and "ttft attainment" in d.reason


def test_out_by_tpot_slo_affects_decode():
    p = policy(tpot_slo_s=0.05)
    sig = ClusterSignals(
        queue_length=0,
        instances=[inst("p0", "prefill", kv_usage=0.5), inst("d0", "decode", kv_usage=0.5)],
        tpot_attainment=0.8,
    )
    d = only(p.decide(sig, 0.0))
    assert d.role == "decode" and d.instance == "d0" and d.npus == 4
    assert "decode tpot attainment 0.80 < slo_target 0.9" in d.reason


def test_slo_ignored_without_slo_seconds_or_data():
    p = policy()  # no ttft_slo_s / tpot_slo_s
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", kv_usage=0.5)], ttft_attainment=0.1, tpot_attainment=0.1)
    assert p.decide(sig, 0.0) == []
    p = policy(ttft_slo_s=0.5, tpot_slo_s=0.05)
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", kv_usage=0.5)])  # attainment None: met
    assert p.decide(sig, 0.0) == []


def test_between_thresholds_nothing():
    p = policy()
    sig = ClusterSignals(queue_length=2, instances=[inst("m0", kv_usage=0.5)])
    assert p.decide(sig, 0.0) == []


def test_horizontal_when_vertical_maxed():
    p = policy(max_ep=4)
    sig = ClusterSignals(queue_length=20, instances=[inst("m0", ep=4), inst("m1", ep=4)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.role, d.instance, d.npus) == ("add_instance", "mixed", None, 4)
    assert "queue 10.0/instance > queue_high 4.0" in d.reason


def test_vertical_skips_maxed_instance_for_next_most_loaded():
    p = policy(max_ep=4)
    sig = ClusterSignals(queue_length=20, instances=[inst("m0", ep=4, running=9), inst("m1", ep=2, running=1)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.instance, d.npus) == ("scale_ep", "m1", 4)


def test_prefer_horizontal_adds_first_then_grows_at_max():
    p = policy(prefer="horizontal", max_instances=2)
    sig = ClusterSignals(queue_length=20, instances=[inst("m0", ep=2)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.npus) == ("add_instance", 2)
    sig = ClusterSignals(queue_length=20, instances=[inst("m0", ep=2), inst("m1", ep=2, running=3)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.instance, d.npus) == ("scale_ep", "m1", 4)


def test_nothing_when_fully_maxed():
    p = policy(max_ep=4, max_instances=2)
    sig = ClusterSignals(queue_length=50, instances=[inst("m0", ep=4), inst("m1", ep=4)])
    assert p.decide(sig, 0.0) == []


def test_max_instances_counts_unhealthy_and_draining():
    p = policy(max_ep=2, max_instances=2)
    sig = ClusterSignals(queue_length=50, instances=[inst("m0", ep=2), inst("m1", ep=2, healthy=False)])
    assert p.decide(sig, 0.0) == []


def test_grow_caps_at_max_ep():
    p = policy(max_ep=6)
    sig = ClusterSignals(queue_length=50, instances=[inst("m0", ep=4)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.npus) == ("scale_ep", 5)  # 8 > max_ep: the next larger allowed size


def test_add_instance_ep_is_brought_within_bounds():
    p = policy(max_ep=4, ep_choices=divides(12))
    sig = ClusterSignals(queue_length=50, instances=[inst("m0", ep=6)])  # manifest EP above max_ep
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.npus) == ("add_instance", 4)


# -- scale in ----------------------------------------------------------------------------


def test_in_by_idleness_removes_least_loaded():
    p = policy()
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", running=2), inst("m1", running=0), inst("m2", running=1)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.role, d.instance, d.npus) == ("remove_instance", "mixed", "m1", None)
    assert "idle" in d.reason and "queue_low 0.5" in d.reason and "kv_low 0.3" in d.reason


def test_in_shrinks_largest_ep_when_single_instance():
    p = policy(min_instances=0)
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", ep=8)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.instance, d.npus) == ("scale_ep", "m0", 4)


def test_in_shrinks_when_at_min_instances():
    p = policy(min_instances=2)
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", ep=2), inst("m1", ep=4)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.instance, d.npus) == ("scale_ep", "m1", 2)


def test_in_respects_min_ep():
    p = policy(min_ep=2)
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", ep=2)])
    assert p.decide(sig, 0.0) == []


def test_in_halves_first():
    p = policy(min_ep=3, max_ep=8)
    sig = ClusterSignals(queue_length=0, instances=[inst("m0", ep=8)])
    assert only(p.decide(sig, 0.0)).npus == 4
    p = policy(min_ep=5, max_ep=8)
    assert only(p.decide(sig, 0.0)).npus == 7  # 4 < min_ep: the next smaller size


def test_no_scale_in_while_slo_missed():
    p = policy(ttft_slo_s=0.5, tpot_slo_s=0.05)
    sig = ClusterSignals(
        queue_length=0,
        instances=[inst("p0", "prefill"), inst("p1", "prefill"), inst("d0", "decode"), inst("d1", "decode")],
        ttft_attainment=0.5,
    )
    ds = p.decide(sig, 0.0)
    assert [(d.role, d.action) for d in ds] == [("prefill", "scale_ep")]  # decode: no scale-in
    sig.ttft_attainment = 0.95
    ds = p.decide(sig, 0.0)
    assert [(d.role, d.action) for d in ds] == [("prefill", "remove_instance"), ("decode", "remove_instance")]
    assert all("SLO met" in d.reason for d in ds)


def test_one_decision_per_role():
    p = policy()
    sig = ClusterSignals(
        queue_length=40,
        instances=[inst("p0", "prefill"), inst("p1", "prefill"), inst("d0", "decode", kv_usage=0.95), inst("d1", "decode")],
    )
    ds = p.decide(sig, 0.0)
    assert sorted(d.role for d in ds) == ["decode", "prefill"]


# -- cool-down ---------------------------------------------------------------------------


def test_cooldown_suppresses_then_allows():
    p = policy(cooldown_s=10.0)
    sig = ClusterSignals(queue_length=20, instances=[inst("m0", ep=1)])
    d = only(p.decide(sig, now=100.0))
    p.record(d, now=100.0)
    assert p.history == [(100.0, d)]
    sig.instances[0].ep = d.npus
    assert p.decide(sig, now=105.0) == []
    assert p.decide(sig, now=109.99) == []
    d2 = only(p.decide(sig, now=110.0))
    assert d2.npus == 4


def test_cooldown_is_per_role():
    p = policy(cooldown_s=10.0)
    sig = ClusterSignals(
        queue_length=20, instances=[inst("p0", "prefill"), inst("d0", "decode", kv_usage=0.9)]
    )
    ds = p.decide(sig, 0.0)
    assert [d.role for d in ds] == ["prefill", "decode"]
    p.record(ds[0], 0.0)
    assert [d.role for d in p.decide(sig, 1.0)] == ["decode"]


def test_decide_does_not_mutate():
    p = policy()
    sig = ClusterSignals(queue_length=20, instances=[inst("m0"), inst("m1", waiting=3)])
    before = copy.deepcopy(sig)
    p.decide(sig, 0.0)
    p.decide(sig, 0.0)
    assert p.history == [] and sig == before


# -- EP choices --------------------------------------------------------------------------


def test_ep_choices_num_experts_12():
    p = policy(ep_choices=divides(12), max_ep=12)
    grow = {ep: p.grow_ep(ep) for ep in (1, 2, 3, 4, 6, 12)}
    assert grow == {1: 2, 2: 4, 3: 6, 4: 6, 6: 12, 12: None}
    shrink = {ep: p.shrink_ep(ep) for ep in (1, 2, 3, 4, 6, 12)}
    assert shrink == {1: None, 2: 1, 3: 2, 4: 2, 6: 3, 12: 6}
    p = policy(ep_choices=divides(12), max_ep=8)
    assert p.grow_ep(4) == 6 and p.grow_ep(6) is None
    sig = ClusterSignals(queue_length=20, instances=[inst("m0", ep=4)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.npus) == ("scale_ep", 6)


def test_ep_choices_rejecting_all_larger_adds_instance():
    p = policy(ep_choices=divides(12), max_ep=8)
    sig = ClusterSignals(queue_length=20, instances=[inst("m0", ep=6)])
    d = only(p.decide(sig, 0.0))
    assert (d.action, d.npus) == ("add_instance", 6)


# -- health ------------------------------------------------------------------------------


def test_unhealthy_and_draining_ignored():
    p = policy()
    sig = ClusterSignals(
        queue_length=0,
        instances=[
            inst("m0", running=3, kv_usage=0.5),
            inst("m1", healthy=False, waiting=100, kv_usage=1.0, running=50),
            inst("m2", draining=True, waiting=100, kv_usage=1.0),
        ],
    )
    assert p.decide(sig, 0.0) == []  # only m0 counts: no pressure, not idle (kv 0.5)
    sig.queue_length = 20
    d = only(p.decide(sig, 0.0))
    assert d.instance == "m0"
    sig.queue_length = 0
    sig.instances[0].kv_usage = 0.0
    d = only(p.decide(sig, 0.0))
    assert d.action == "scale_ep" and d.instance == "m0" and d.npus == 1  # never removes m1/m2


def test_role_with_no_active_instance_is_skipped():
    p = policy()
    sig = ClusterSignals(queue_length=50, instances=[inst("m0", healthy=False), inst("m1", draining=True)])
    assert p.decide(sig, 0.0) == []


# -- output ------------------------------------------------------------------------------


def test_decisions_logged_and_as_dict(caplog):
    p = policy()
    sig = ClusterSignals(queue_length=20, instances=[inst("m0")])
    with caplog.at_level(logging.INFO, logger="cluster.autoscaler"):
        d = only(p.decide(sig, 0.0))
    assert any("queue_high" in r.getMessage() and "m0" in r.getMessage() for r in caplog.records)
    assert d.as_dict() == {
        "action": "scale_ep",
        "role": "mixed",
        "instance": "m0",
        "npus": 4,
        "reason": d.reason,
    }
    with pytest.raises(Exception):
        d.npus = 8  # frozen


# -- config ------------------------------------------------------------------------------


def test_config_defaults():
    cfg = AutoscalerConfig()
    assert not cfg.enabled and cfg.prefer == "vertical" and cfg.ttft_slo_s is None


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"min_ep": 4, "max_ep": 2}, "max_ep"),
        ({"min_instances": 3, "max_instances": 2}, "max_instances"),
        ({"min_ep": 0}, "min_ep"),
        ({"max_instances": 0}, "max_instances"),
        ({"min_instances": -1}, "min_instances"),
        ({"interval_s": 0}, "interval_s"),
        ({"cooldown_s": -1}, "cooldown_s"),
        ({"kv_high": 1.5}, "kv_high"),
        ({"kv_low": 0.9, "kv_high": 0.5}, "kv_high"),
        ({"queue_low": 5, "queue_high": 4}, "queue_high"),
        ({"slo_target": 0}, "slo_target"),
        ({"prefer": "diagonal"}, "prefer"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValidationError, match=field):
        AutoscalerConfig(**kw)


# -- property ----------------------------------------------------------------------------

ROLES = ["prefill", "decode", "mixed"]


@st.composite
def scenario(draw):
    min_ep = draw(st.integers(1, 4))
    max_ep = draw(st.integers(min_ep, 16))
    min_inst = draw(st.integers(0, 3))
    max_inst = draw(st.integers(max(1, min_inst), 5))
    queue_low = draw(st.floats(0, 3))
    kv_low = draw(st.floats(0, 0.6))
    cfg = AutoscalerConfig(
        enabled=True,
        cooldown_s=draw(st.floats(0, 20)),
        min_ep=min_ep,
        max_ep=max_ep,
        min_instances=min_inst,
        max_instances=max_inst,
        queue_low=queue_low,
        queue_high=draw(st.floats(max(queue_low, 0.1), 10)),
        kv_low=kv_low,
        kv_high=draw(st.floats(max(kv_low, 0.01), 1)),
        ttft_slo_s=draw(st.none() | st.just(0.5)),
        tpot_slo_s=draw(st.none() | st.just(0.05)),
        slo_target=draw(st.floats(0.1, 1)),
        prefer=draw(st.sampled_from(["vertical", "horizontal"])),
    )
    num_experts = draw(st.sampled_from([None, 8, 12, 16, 60]))
    roles = draw(st.sampled_from([["mixed"], ["prefill", "decode"], ["prefill", "decode", "mixed"]]))
    instances = []
    for k in range(draw(st.integers(0, 8))):
        instances.append(
            InstanceSignals(
                name=f"i{k}",
                role=draw(st.sampled_from(roles)),
                ep=draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32])),
                healthy=draw(st.booleans()),
                draining=draw(st.booleans()),
                running=draw(st.integers(0, 40)),
                waiting=draw(st.just(0) | st.integers(0, 40)),
                kv_usage=draw(st.just(0.0) | st.floats(0, 1)),
            )
        )
    sig = ClusterSignals(
        queue_length=draw(st.just(0) | st.integers(0, 100)),
        instances=instances,
        ttft_attainment=draw(st.none() | st.floats(0, 1)),
        tpot_attainment=draw(st.none() | st.floats(0, 1)),
    )
    history = [
        (draw(st.floats(0, 100)), ScalingDecision("add_instance", draw(st.sampled_from(ROLES)), npus=1))
        for _ in range(draw(st.integers(0, 3)))
    ]
    return cfg, num_experts, sig, history, draw(st.floats(0, 120))


@settings(derandomize=True, deadline=None, max_examples=300)
@given(scenario())
def test_property_decisions_respect_bounds(case):
    cfg, num_experts, sig, history, now = case
    allowed = (lambda n: True) if num_experts is None else divides(num_experts)
    p = AutoscalerPolicy(cfg, allowed)
    for t, d in history:
        p.record(d, t)
    before_sig, before_hist = copy.deepcopy(sig), list(p.history)
    ds = p.decide(sig, now)
    assert sig == before_sig and p.history == before_hist

    by_name = {i.name: i for i in sig.instances}
    roles = [d.role for d in ds]
    assert len(roles) == len(set(roles))
    for d in ds:
        assert d.reason
        assert not any(d.role == hd.role and now - t < cfg.cooldown_s for t, hd in history)
        active = [i for i in sig.instances if i.role == d.role and i.healthy and not i.draining]
        assert active  # only roles present among active instances
        if d.action in ("scale_ep", "remove_instance"):
            target = by_name[d.instance]
            assert target.role == d.role and target.healthy and not target.draining
        if d.action in ("scale_ep", "add_instance"):
            assert cfg.min_ep <= d.npus <= cfg.max_ep and allowed(d.npus)
        if d.action == "scale_ep":
            assert d.npus != by_name[d.instance].ep
        if d.action == "add_instance":
            assert sum(i.role == d.role for i in sig.instances) < cfg.max_instances
        if d.action == "remove_instance":
            assert len(active) > max(1, cfg.min_instances)
