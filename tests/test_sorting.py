"""Weighted sorting: the Omni Proxy's prefill/decode weights, enforced starvation bound, FIFO switch."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.proxy.sorting import QueuedRequest, SortingConfig, WeightedSorter

pytestmark = pytest.mark.fast


def req(rid, prompt, arrival=0.0, max_tokens=16):
    return QueuedRequest(rid, prompt, max_tokens, arrival)


def ids(reqs):
    return [r.request_id for r in reqs]


def test_short_prompts_first():
    q = [req("long", 1000), req("mid", 500), req("short", 10)]
    assert ids(WeightedSorter().prefill_order(q, now_s=0.01)) == ["short", "mid", "long"]


def test_prefill_weight_arithmetic():
    # max_prompt 1000, waits 100 ms and 20 ms -> normaliser max(100, 50) = 100
    q = [req("a", 1000, arrival=0.9), req("b", 250, arrival=0.98)]
    w = WeightedSorter().prefill_weights(q, now_s=1.0)
    assert w[0] == pytest.approx(0.8 * 0 / 1000 + 0.2 * 100 / 100)
    assert w[1] == pytest.approx(0.8 * 750 / 1000 + 0.2 * 20 / 100)


def test_min_wait_norm_floor():
    # both waited < 50 ms: time term divided by 50, not by the max wait (10 ms)
    q = [req("a", 100, arrival=0.99), req("b", 100, arrival=1.0)]
    w = WeightedSorter().prefill_weights(q, now_s=1.0)
    assert w[0] == pytest.approx(0.2 * 10 / 50)
    assert w[1] == pytest.approx(0.0)


def test_long_wait_catches_up_without_starvation():
    # long prompt waited 300 ms (< 400): time term 0.2 < token gap 0.8*0.9: short still first
    q = [req("long", 1000, arrival=0.0), req("short", 100, arrival=0.3)]
    assert ids(WeightedSorter().prefill_order(q, now_s=0.3)) == ["short", "long"]


def test_starved_long_request_goes_first():
    q = [req("long", 1000, arrival=0.0)] + [req(f"s{i}", 10, arrival=0.45) for i in range(5)]
    now = 0.5  # long waited 500 ms >= 400
    assert ids(WeightedSorter().prefill_order(q, now))[0] == "long"
    # the original (bound never applied) would keep it last
    lax = WeightedSorter(SortingConfig(starvation_ms=1e9))
    assert ids(lax.prefill_order(q, now))[-1] == "long"


def test_starved_requests_oldest_first():
    q = [req("young", 1000, arrival=0.5), req("old", 2000, arrival=0.1), req("fresh", 1, arrival=0.99)]
    out = ids(WeightedSorter().prefill_order(q, now_s=1.0))
    assert out == ["old", "young", "fresh"]


def test_disabled_is_fifo():
    q = [req("c", 1, arrival=3.0), req("a", 1000, arrival=1.0), req("b", 5, arrival=2.0)]
    s = WeightedSorter(SortingConfig(enabled=False))
    assert ids(s.prefill_order(q, 10.0)) == ["a", "b", "c"]
    assert ids(s.decode_order(q, 10.0)) == ["a", "b", "c"]


def test_ties_by_arrival_then_id():
    q = [req("b", 100, arrival=0.0), req("a", 100, arrival=0.0), req("c", 100, arrival=0.0)]
    assert ids(WeightedSorter().prefill_order(q, 0.0)) == ["a", "b", "c"]
    assert ids(WeightedSorter().decode_order(q, 0.0)) == ["a", "b", "c"]


def test_decode_longest_first():
    q = [req("s", 10, max_tokens=1000), req("l", 900, max_tokens=1), req("m", 100, max_tokens=10)]
    assert ids(WeightedSorter().decode_order(q, 0.0)) == ["l", "m", "s"]
    # weight max_tokens: s = 10 + 1000, l = 901, m = 110
    s = WeightedSorter(SortingConfig(decode_max_tokens_weight=1.0))
    assert ids(s.decode_order(q, 0.0)) == ["s", "l", "m"]
    assert s.decode_weights(q) == pytest.approx([1.0, 901 / 1010, 110 / 1010])


def test_empty_queue():
    assert WeightedSorter().prefill_order([], 0.0) == []
    assert WeightedSorter().decode_order([], 0.0) == []


queues = st.lists(
    st.tuples(st.integers(0, 4000), st.integers(0, 2000), st.floats(0.0, 2.0)), min_size=0, max_size=30
).map(lambda xs: [QueuedRequest(f"r{i:02d}", p, m, a) for i, (p, m, a) in enumerate(xs)])


@given(queues, st.floats(2.0, 3.0), st.floats(1.0, 2000.0))
def test_prefill_order_properties(q, now, starvation_ms):
    s = WeightedSorter(SortingConfig(starvation_ms=starvation_ms))
    out = s.prefill_order(q, now)
    assert sorted(ids(out)) == sorted(ids(q))
    starved = [r for r in out if s.waited_ms(r, now) >= starvation_ms]
    k = len(starved)
    assert out[:k] == starved  # every starved request precedes every other
    assert [(r.arrival_s, r.request_id) for r in starved] == sorted((r.arrival_s, r.request_id) for r in starved)
    weights = dict(zip(ids(q), s.prefill_weights(q, now)))
    rest = [weights[r.request_id] for r in out[k:]]
    assert all(a >= b for a, b in itertools.pairwise(rest))
    assert s.prefill_order(list(reversed(q)), now) == out  # deterministic, input order irrelevant


@given(queues, st.floats(0.0, 3.0))
def test_decode_order_properties(q, k):
    s = WeightedSorter(SortingConfig(decode_max_tokens_weight=k))
    out = s.decode_order(q, 0.0)
    weights = s.decode_weights(out)  # (prompt + k * max_tokens) / max_total: longest first
    assert all(a >= b for a, b in itertools.pairwise(weights))
    assert s.decode_order(list(reversed(q)), 0.0) == out


@given(queues)
def test_disabled_fifo_property(q):
    out = WeightedSorter(SortingConfig(enabled=False)).prefill_order(q, 5.0)
    assert [(r.arrival_s, r.request_id) for r in out] == sorted((r.arrival_s, r.request_id) for r in q)


def test_waits_are_in_device_time_under_a_time_scale():
    r = req("a", 100, arrival=0.0)
    assert WeightedSorter(SortingConfig(time_scale=1.0)).starved(r, now_s=0.6)  # 600 ms >= 400
    slowed = WeightedSorter(SortingConfig(time_scale=2.0))  # the emulator runs at half speed
    assert slowed.waited_ms(r, now_s=0.6) == pytest.approx(300.0) and not slowed.starved(r, now_s=0.6)
