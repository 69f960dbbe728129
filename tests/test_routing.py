"""Routing policies: round robin, least loaded, cache-aware (SGLang style), the
original Omni Proxy's rule and the Omni formula; the decode choice they share."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.proxy.routing import (
    POLICIES,
    CacheAware,
    InstanceView,
    LeastLoaded,
    Omni,
    OmniReference,
    RoundRobin,
    RoutingConfig,
    make_policy,
    routing_config,
)
from cluster.proxy.sorting import QueuedRequest

pytestmark = pytest.mark.fast

BS = 16


def view(name, **kw):
    kw.setdefault("role", "prefill")
    kw.setdefault("free_blocks", 1000)
    return InstanceView(name, **kw)


def req(hashes=(), prompt=None, max_tokens=16):
    hashes = list(hashes)
    return QueuedRequest("r", prompt if prompt is not None else max(len(hashes) * BS, 1), max_tokens, 0.0, hashes)


def test_match_depth_is_a_prefix_chain():
    v = view("a", cached={1, 2, 4})
    assert v.match_depth([1, 2, 3, 4]) == 2
    assert v.match_depth([2, 1]) == 2
    assert v.match_depth([3, 1, 2]) == 0  # a miss ends the chain
    assert v.match_depth([]) == 0
    assert view("b", cached={1: None, 2: None}.keys()).match_depth([1, 2, 3]) == 2  # any container works


def test_load_is_queued_tokens_plus_running():
    assert view("a", queued_tokens=100, running=3).load == 103


def test_round_robin_cycles_in_name_order():
    rr = RoundRobin()
    cands = [view("c"), view("a"), view("b")]
    assert [rr.choose(req(), cands, BS).name for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_survives_changing_candidates():
    rr = RoundRobin()
    assert rr.choose(req(), [view("a"), view("b"), view("c")], BS).name == "a"
    assert rr.choose(req(), [view("a"), view("c")], BS).name == "c"  # b gone: next after a
    assert rr.choose(req(), [view("a"), view("b")], BS).name == "a"  # wrap


def test_least_loaded():
    ll = LeastLoaded()
    cands = [view("a", queued_tokens=50), view("b", queued_tokens=10, running=5), view("c", queued_tokens=10, running=2)]
    assert ll.choose(req(), cands, BS).name == "c"
    assert ll.choose(req(), [view("b"), view("a")], BS).name == "a"  # name breaks ties


def test_cache_aware_prefix_holder_when_balanced():
    hashes = [1, 2, 3, 4]
    holder = view("holder", cached=set(hashes), queued_tokens=20)
    idle = view("idle", queued_tokens=0)
    # imbalance 20 <= 32 tokens: balanced, match ratio 1.0 >= 0.5
    assert CacheAware().choose(req(hashes), [holder, idle], BS).name == "holder"


def test_cache_aware_least_loaded_when_imbalanced():
    hashes = [1, 2, 3, 4]
    holder = view("holder", cached=set(hashes), queued_tokens=200)
    idle = view("idle", queued_tokens=10)
    ca = CacheAware()
    assert ca.imbalanced([holder, idle])  # 200 - 10 > 32 and 200 > 1.5 * 10
    assert ca.choose(req(hashes), [holder, idle], BS).name == "idle"
    # a large absolute gap that is small relatively is still balanced
    holder2, busy = view("holder", cached=set(hashes), queued_tokens=1000), view("busy", queued_tokens=900)
    assert not ca.imbalanced([holder2, busy])
    assert ca.choose(req(hashes), [holder2, busy], BS).name == "holder"


def test_cache_aware_low_match_ratio_goes_least_loaded():
    hashes = [1, 2, 3, 4]
    partial = view("partial", cached={1}, queued_tokens=10)  # ratio 0.25 < 0.5
    idle = view("idle")
    assert CacheAware().choose(req(hashes), [partial, idle], BS).name == "idle"
    assert CacheAware(RoutingConfig(cache_threshold=0.25)).choose(req(hashes), [partial, idle], BS).name == "partial"


def test_omni_deepest_match_when_cache_outweighs_queue():
    hashes = [1, 2, 3, 4]
    holder = view("holder", cached=set(hashes), queued_tokens=20, running=1)
    idle = view("idle")
    om, r = Omni(), req(hashes)
    # 4 blocks * 16 = 64 cached tokens - 1.0 * 20 queued - 0.5 * 1 running * 16 = 36 > 0
    assert om.score(r, holder, BS) == 64 - 20 - 8 == 36
    assert om.score(r, idle, BS) == 0
    assert om.choose(r, [idle, holder], BS).name == "holder"


def test_omni_least_loaded_when_queue_outweighs_cache():
    hashes = [1, 2, 3, 4]
    holder = view("holder", cached=set(hashes), queued_tokens=100, running=2)
    idle = view("idle", queued_tokens=10)
    om, r = Omni(), req(hashes)
    # 64 - 100 - 0.5 * 2 * 16 = -52 < 0 - 10 = -10
    assert om.score(r, holder, BS) == -52
    assert om.score(r, idle, BS) == -10
    assert om.choose(r, [holder, idle], BS).name == "idle"
    # cheaper queue (alpha 0.2): 64 - 20 - 16 = 28 > -2
    assert Omni(RoutingConfig(omni_alpha=0.2)).choose(r, [holder, idle], BS).name == "holder"


def test_omni_credits_global_cache_blocks_at_gamma():
    hashes = [1, 2, 3, 4]
    r = req(hashes)
    r.global_depth = 4  # the whole prefix is in the global KV cache
    partial = view("partial", cached={1}, queued_tokens=30)
    idle = view("idle")
    om = Omni()
    # partial: (1 + 0.5 * 3) * 16 - 30 = 10; idle: 0.5 * 4 * 16 = 32
    assert om.score(r, partial, BS) == 10 and om.score(r, idle, BS) == 32
    assert om.choose(r, [partial, idle], BS).name == "idle"
    holder = view("holder", cached={1, 2}, queued_tokens=20)
    # without the global credit the holder wins (32 - 20 = 12 > 0); with it the idle
    # instance, which loads all four blocks, wins ((2 + 0.5 * 2) * 16 - 20 = 28 < 32)
    assert Omni(RoutingConfig(omni_gamma=0.0)).choose(r, [holder, idle], BS).name == "holder"
    assert om.choose(r, [holder, idle], BS).name == "idle"
    r.global_depth = 0
    assert om.score(r, partial, BS) == 16 - 30


def test_omni_ties_fewer_queued_then_name():
    om = Omni()
    # a: 32 cached - 32 queued = 0; b: 0; c: 0 -> b and c have fewer queued tokens, then name
    a, b, c = view("a", cached={1, 2}, queued_tokens=32), view("c"), view("b")
    assert om.choose(req([1, 2]), [a, b, c], BS).name == "b"


def test_omni_skips_instances_without_kv_room():
    hashes = [1, 2, 3, 4]
    r = req(hashes, prompt=64, max_tokens=100)  # needs ceil(164 / 16) = 11 blocks
    assert Omni.blocks_needed(r, BS) == 11
    no_kv = view("no_kv", cached=set(hashes), free_blocks=10)
    ok = view("ok", free_blocks=11, queued_tokens=500)
    assert Omni().choose(r, [no_kv, ok], BS).name == "ok"
    # none qualifies: all are considered, best score wins
    assert Omni().choose(r, [no_kv, view("busy", free_blocks=3, queued_tokens=10)], BS).name == "no_kv"


def test_omni_reference_deepest_match_whatever_the_queue():
    hashes = [1, 2, 3, 4]
    deep = view("deep", cached={1, 2, 3}, queued_tokens=10_000, running=30)
    shallow = view("shallow", cached={1}, queued_tokens=0)
    idle = view("idle")
    ref = OmniReference()
    assert ref.choose(req(hashes), [idle, shallow, deep], BS).name == "deep"  # the cached prefix always wins
    # equal depth: fewer queued tokens, then fewer running
    a, b = view("a", cached={1, 2}, queued_tokens=50), view("b", cached={1, 2}, queued_tokens=20, running=9)
    c = view("c", cached={1, 2}, queued_tokens=20, running=3)
    assert ref.choose(req(hashes), [a, b, c], BS).name == "c"


def test_omni_reference_without_a_match_scans_round_robin_from_the_last_choice():
    ref = OmniReference()
    cands = [view("a", queued_tokens=5), view("b", queued_tokens=5), view("c", queued_tokens=5)]
    # all equal: the scan starts after the last choice, so the picks rotate
    assert [ref.choose(req([9]), cands, BS).name for _ in range(4)] == ["a", "b", "c", "a"]
    # fewest queued tokens wins wherever the scan starts
    cands[2] = view("c", queued_tokens=1)
    assert ref.choose(req([9]), cands, BS).name == "c"
    # a match anywhere beats the rotation
    cands[0] = view("a", cached={9}, queued_tokens=900)
    assert ref.choose(req([9]), cands, BS).name == "a"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_decode_choice_is_fewest_decode_tokens_then_running_then_name(name):
    policy, r = make_policy(name), req()
    cands = [view("a", role="decode", decode_tokens=900, running=1), view("b", role="decode", decode_tokens=300, running=4),
             view("c", role="decode", decode_tokens=300, running=2), view("d", role="decode", decode_tokens=300, running=2)]
    assert policy.choose_decode(r, cands).name == "c"


def test_make_policy():
    assert set(POLICIES) == {"round_robin", "least_loaded", "cache_aware", "omni_reference", "omni"}
    for name, cls in POLICIES.items():
        p = make_policy(name)
        assert isinstance(p, cls) and p.name == name
    assert make_policy("omni", RoutingConfig(omni_alpha=2.0)).alpha == 2.0
    assert make_policy("cache_aware", RoutingConfig(cache_threshold=0.9)).cache_threshold == 0.9
    with pytest.raises(ValueError, match="cache_aware, least_loaded, omni, omni_reference, round_robin"):
        make_policy("random")


def test_every_constant_is_a_manifest_setting():
    from cluster.config import ProxySettings

    values = dict(omni_alpha=0.25, omni_beta=2.0, omni_gamma=0.0, omni_kappa=3.0, omni_waits=False,
                  cache_threshold=0.9, balance_abs_threshold=7, balance_rel_threshold=3.0)
    assert routing_config(ProxySettings(**values)) == RoutingConfig(**values)
    om = make_policy("omni", routing_config(ProxySettings(**values)))
    assert (om.alpha, om.beta, om.gamma, om.kappa, om.waits_for_choice) == (0.25, 2.0, 0.0, 3.0, False)


instances = st.lists(
    st.builds(
        lambda i, depth, q, run, free: view(
            f"i{i}", cached=set(range(depth)), queued_tokens=q, running=run, free_blocks=free),
        st.integers(0, 99), st.integers(0, 8), st.integers(0, 500), st.integers(0, 40), st.integers(0, 30),
    ),
    min_size=1, max_size=8, unique_by=lambda v: v.name,
)


@given(instances, st.integers(0, 8), st.integers(1, 200), st.floats(0.0, 4.0), st.floats(0.0, 2.0))
def test_omni_picks_max_score_among_qualifying(cands, n_hashes, max_tokens, alpha, beta):
    om, r = Omni(RoutingConfig(omni_alpha=alpha, omni_beta=beta)), req(range(n_hashes), max_tokens=max_tokens)
    need = math.ceil((r.prompt_tokens + r.max_tokens) / BS)
    room = [v for v in cands if v.free_blocks >= need] or cands
    pick = om.choose(r, cands, BS)
    assert pick in room
    assert om.score(r, pick, BS) == max(om.score(r, v, BS) for v in room)


@given(instances, st.integers(0, 8))
def test_every_policy_returns_a_candidate(cands, n_hashes):
    for name in POLICIES:
        policy = make_policy(name)
        assert policy.choose(req(range(n_hashes)), cands, BS) in cands
        assert policy.choose_decode(req(range(n_hashes)), cands) in cands
