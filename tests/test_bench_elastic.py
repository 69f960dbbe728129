"""The throughput accounting of `omniray bench elastic` (no Ray: synthetic step logs)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from cluster.bench.elastic import (
    ScalingWindow,
    _rate_outside,
    during_vs_steady,
    during_vs_steady_ci,
    serving_lost_after_s,
    serving_lost_s,
)

pytestmark = pytest.mark.fast


def _steps(start, end, period, tokens=8, skip=()):
    """A step every `period` seconds in [start, end), none inside the `skip` spans."""
    times = [round(start + i * period, 9) for i in range(round((end - start) / period))]
    return [(t, tokens) for t in times if not any(a <= t < b for a, b in skip)]


def test_a_switch_that_costs_nothing_reads_one():
    steps = _steps(0.05, 10, 0.05)  # 160 tokens/s throughout
    w = ScalingWindow(start=2.0, switch=2.2, end=2.5, rate_old=160.0, rate_new=160.0)
    assert during_vs_steady(steps, [w]) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("offset", [0.0, 0.01, 0.05, 0.09])
def test_a_window_that_opens_mid_step_reads_one_for_a_free_switch(offset):
    """A command lands anywhere in a step: counting that step's tokens whole (or not
    at all) would read up to 8 tokens off in a 0.3 s window of 0.1 s steps."""
    steps = _steps(0.1, 10, 0.1)  # 80 tokens/s
    w = ScalingWindow(start=2.0 + offset, switch=2.1 + offset, end=2.4, rate_old=80.0, rate_new=80.0)
    assert during_vs_steady(steps, [w]) == pytest.approx(1.0, abs=1e-6)
    assert serving_lost_s(steps, [w]) == pytest.approx(0.0, abs=1e-6)


def test_a_pause_costs_its_share_of_the_window():
    steps = _steps(0.05, 10, 0.05, skip=[(2.2, 2.4)])  # 0.2 s without steps in a 0.5 s window
    w = ScalingWindow(start=2.0, switch=2.2, end=2.5, rate_old=160.0, rate_new=160.0)
    assert during_vs_steady(steps, [w]) == pytest.approx(0.6, abs=0.02)
    assert serving_lost_s(steps, [w]) == pytest.approx(0.2, abs=0.01)  # the pause, as serving time


def test_the_serving_lost_does_not_depend_on_the_window_length():
    """The same 0.1 s pause in a window twice as long: half the ratio's loss, the same seconds."""
    steps = _steps(0.05, 10, 0.05, skip=[(2.2, 2.3)])
    short, long = ScalingWindow(2.0, 2.2, 2.5, 160.0, 160.0), ScalingWindow(2.0, 2.2, 3.0, 160.0, 160.0)
    assert during_vs_steady(steps, [short]) == pytest.approx(0.8, abs=0.02)
    assert during_vs_steady(steps, [long]) == pytest.approx(0.9, abs=0.02)
    assert serving_lost_s(steps, [short]) == pytest.approx(serving_lost_s(steps, [long]), abs=0.005)
    assert serving_lost_s(steps, [short, long]) == pytest.approx(0.1, abs=0.01)


def test_the_new_size_is_held_to_its_own_steady_rate():
    """Slower steps after the switch are the new size's, not the switch's cost."""
    steps = _steps(0.05, 2.25, 0.05) + _steps(2.3, 10, 0.1)  # 160 tok/s to the switch at 2.2, then 80
    w = ScalingWindow(start=2.0, switch=2.2, end=2.5, rate_old=160.0, rate_new=80.0)
    assert during_vs_steady(steps, [w]) == pytest.approx(1.0, abs=0.05)
    assert during_vs_steady(steps, [ScalingWindow(2.0, 2.2, 2.5, 160.0, None)]) is None


def test_a_stall_after_the_window_is_counted_after_it_not_in_it():
    """A 0.3 s stall 0.5 s after the first step on the new size (a standby process starting)."""
    steps = _steps(0.05, 10, 0.05, skip=[(3.0, 3.3)])
    w = ScalingWindow(2.0, 2.2, 2.5, 160.0, 160.0)
    assert during_vs_steady(steps, [w]) == pytest.approx(1.0, abs=0.02)
    assert serving_lost_after_s(steps, [w]) == pytest.approx(0.3, abs=0.01)
    assert serving_lost_after_s(steps, [replace(w, rate_new=None)]) is None


def test_a_steady_phase_rate_leaves_its_control_window_out():
    """A stall inside the phase's control window does not lower the phase's steady rate
    (against which every window, the control's too, is held); outside it, it does."""
    steps = _steps(0.05, 10, 0.05, skip=[(4.0, 4.2)])  # 160 tokens/s but for 0.2 s inside the control window
    control = ScalingWindow(3.9, 4.0, 4.3)
    assert _rate_outside(steps, 2.0, 6.0, control) == pytest.approx(160.0, abs=1.0)
    assert _rate_outside(steps, 2.0, 6.0, None) == pytest.approx(160.0 * 3.8 / 4.0, abs=1.0)
    assert _rate_outside(steps, 2.0, 6.0, ScalingWindow(5.0, 5.1, 5.2)) == pytest.approx(160.0 * 3.6 / 3.8, abs=1.0)
    # half the window's tokens are missing: 4 step ends fall in the stall, the step after it brings only its own 8
    assert during_vs_steady(steps, [replace(control, rate_old=160.0, rate_new=160.0)]) == pytest.approx(0.5, abs=0.02)


def test_the_interval_brackets_the_figure_and_narrows_to_it_when_every_window_agrees():
    steps = _steps(0.05, 20, 0.05, skip=[(2.2, 2.3), (6.2, 6.25)])  # one window loses 0.1 s, one 0.05 s, two none
    windows = [ScalingWindow(s, s + 0.2, s + 0.5, 160.0, 160.0) for s in (2.0, 6.0, 10.0, 14.0)]
    low, high = during_vs_steady_ci(steps, windows)
    # the figure (0.925) inside; the bounds within what any resample could read: 0.8 (the worst window
    # four times) to 1.0 (a free one four times)
    assert 0.79 < low < during_vs_steady(steps, windows) < high < 1.01 and high - low > 0.05
    assert during_vs_steady_ci(steps, windows) == (low, high)  # seeded: the same log reads the same
    same = [ScalingWindow(s, s + 0.2, s + 0.5, 160.0, 160.0) for s in (10.0, 14.0, 18.0)]
    low, high = during_vs_steady_ci(steps, same)
    assert high - low == pytest.approx(0.0, abs=1e-3)
    assert during_vs_steady_ci(steps, windows[:1]) is None  # one window: nothing to resample


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_host_cpus_counts_the_cores_the_run_may_use_not_the_machines():
    """Confined to one core (as `taskset -c 0` does), the run reports one: its figures
    depend on the cores its NPUs' math can use."""
    code = "import os; os.sched_setaffinity(0, {0}); from cluster.bench.elastic import host_cpus; print(host_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
