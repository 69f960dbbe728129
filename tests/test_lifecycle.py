"""The 10-stage lifecycle: stamps, gaps bridging skipped stages, TTFT/E2E, debug dict."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.proxy.lifecycle import STAGES, Lifecycle

pytestmark = pytest.mark.fast


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_ten_stages():
    assert len(STAGES) == 10 and STAGES[0] == "received" and STAGES[-1] == "finished"


def test_unknown_stage_and_first_stamp_wins():
    life = Lifecycle("r", clock=FakeClock())
    with pytest.raises(ValueError, match="unknown lifecycle stage 'bogus'"):
        life.stamp("bogus")
    life.stamp("received", 1.0)
    life.stamp("received", 5.0)
    assert life.stamps == {"received": 1.0}


def test_clock_is_used_when_no_time_given():
    clock = FakeClock()
    life = Lifecycle("r", clock=clock)
    life.stamp("received")
    clock.t += 0.25
    life.stamp("tokenized")
    assert life.stamps == {"received": 100.0, "tokenized": 100.25}


def test_pd_request_all_gaps():
    life = Lifecycle("pd")
    for i, s in enumerate(STAGES):
        life.stamp(s, 10.0 + i * 0.5)
    gaps = life.gaps()
    assert list(gaps) == [f"{a}->{b}" for a, b in itertools.pairwise(STAGES)]
    assert all(g == pytest.approx(0.5) for g in gaps.values())
    assert life.ttft_s == pytest.approx(4.0) and life.e2e_s == pytest.approx(4.5)


def test_mixed_request_bridges_kv_and_decode_stages():
    life = Lifecycle("mixed")
    times = {"received": 0.0, "tokenized": 0.1, "prefix_matched": 0.15, "queued": 0.2, "prefill_scheduled": 0.5,
             "prefill_done": 0.9, "first_token": 1.0, "finished": 2.0}
    for s, t in times.items():
        life.stamp(s, t)
    gaps = life.gaps()
    assert "kv_transferred" not in str(gaps) and "decode_scheduled" not in str(gaps)
    assert gaps["prefill_done->first_token"] == pytest.approx(0.1)
    assert sum(gaps.values()) == pytest.approx(life.e2e_s) == pytest.approx(2.0)
    assert life.ttft_s == pytest.approx(1.0)


def test_gaps_follow_stage_order_not_stamp_order():
    life = Lifecycle("r")
    life.stamp("finished", 3.0)
    life.stamp("queued", 1.0)
    life.stamp("received", 0.0)
    assert list(life.stamps) == ["received", "queued", "finished"]
    assert life.gaps() == {"received->queued": 1.0, "queued->finished": 2.0}


def test_incomplete_request():
    life = Lifecycle("r")
    assert life.gaps() == {} and life.ttft_s is None and life.e2e_s is None
    life.stamp("received", 1.0)
    assert life.gaps() == {} and life.ttft_s is None
    assert life.to_debug()["stages"] == {"received": 0.0}


def test_debug_dict():
    life = Lifecycle("req-1")
    for s, t in {"received": 50.0, "tokenized": 50.01, "queued": 50.02, "first_token": 50.3, "finished": 51.0}.items():
        life.stamp(s, t)
    d = life.to_debug()
    assert d["request_id"] == "req-1"
    assert d["stages"] == pytest.approx({"received": 0.0, "tokenized": 0.01, "queued": 0.02, "first_token": 0.3,
                                        "finished": 1.0})
    assert d["gaps"] == pytest.approx({"received->tokenized": 0.01, "tokenized->queued": 0.01,
                                      "queued->first_token": 0.28, "first_token->finished": 0.7})
    assert d["ttft_s"] == pytest.approx(0.3) and d["e2e_s"] == pytest.approx(1.0)


@given(st.dictionaries(st.sampled_from(STAGES), st.floats(0.0, 1e6), min_size=1))
def test_gaps_bridge_and_telescope(stamps):
    life = Lifecycle("h")
    for s, t in stamps.items():
        life.stamp(s, t)
    present = [s for s in STAGES if s in stamps]
    gaps = life.gaps()
    assert list(gaps) == [f"{a}->{b}" for a, b in itertools.pairwise(present)]
    for a, b in itertools.pairwise(present):
        assert gaps[f"{a}->{b}"] == stamps[b] - stamps[a]
    total = stamps[present[-1]] - stamps[present[0]]
    assert sum(gaps.values()) == pytest.approx(total, abs=1e-6)


def test_remote_stages_arrive_as_ages_and_land_on_this_clock():
    clock = FakeClock()
    life = Lifecycle("r", clock=clock)
    life.stamp("received")  # 100.0
    clock.t = 100.5
    # the master answered: matched 0.3 s ago, queued 0.3 s ago, dispatched 0.1 s ago
    life.stamp_ages({"prefix_matched": 0.3, "queued": 0.3, "prefill_scheduled": 0.1})
    clock.t = 101.0
    life.stamp_ages({"prefill_done": 0.05})
    assert life.stamps == pytest.approx({"received": 100.0, "prefix_matched": 100.2, "queued": 100.2,
                                         "prefill_scheduled": 100.4, "prefill_done": 100.95})
    life.stamp_ages({"prefill_done": 0.0}, at=200.0)  # a second report of a stage keeps the first
    assert life.stamps["prefill_done"] == pytest.approx(100.95)
