"""`omniray bench chaos --faults none`: the soak's arithmetic and its command line
(the run itself is minutes of load: BENCHMARKS.md records one)."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from cluster.bench.loadgen import RequestResult
from cluster.bench.soak import RSSSampler, _label, _windows
from cluster.cli import main

pytestmark = pytest.mark.fast

MB = 2**20


def test_growth_is_measured_from_the_end_of_the_warm_up():
    s = RSSSampler()
    s.labels = {1: "ray::NPUActor", 2: "raylet", 3: "ray::InstanceEngine"}
    s.samples = {
        1: [(0, 100 * MB), (10, 200 * MB), (20, 210 * MB), (30, 220 * MB)],  # warm-up growth does not count
        2: [(0, 50 * MB), (10, 50 * MB), (30, 50 * MB)],
        3: [(15, 80 * MB), (30, 90 * MB)],  # started after the warm-up: no baseline
    }
    rows = s.growth(warmup_s=10)
    assert [r["process"] for r in rows] == ["ray::NPUActor", "raylet"]
    assert rows[0]["growth_pct"] == 10.0 and rows[0]["rss_mb_warm"] == 200.0 and rows[0]["rss_mb_max"] == 220.0
    assert rows[1]["growth_pct"] == 0.0


def test_p99_per_window_after_the_warm_up():
    def r(start, e2e, error=""):
        return RequestResult(0, "", start, 1, 1, 0.1, 0.1, e2e, error=error)

    results = [r(5, 9.0), r(12, 1.0), r(14, 2.0), r(22, 3.0), r(25, 4.0, error="HTTP 500")]
    w = _windows(results, warmup_s=10, end_s=30, n=2)
    assert [x["requests"] for x in w] == [2, 1]  # before the warm-up and failed requests left out
    assert w[1]["p99_e2e_s"] == 3.0 and 1.0 < w[0]["p99_e2e_s"] <= 2.0


def test_only_ray_processes_of_this_session_are_sampled():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _label(psutil.Process(child.pid)) is None  # a process, but not Ray's
        s = RSSSampler()
        s.sample(0.0)
        assert child.pid not in s.samples
    finally:
        child.kill()


def test_soak_flags_are_checked(capsys):
    assert main(["bench", "chaos", "--faults", "none"]) == 2
    assert "--duration: required with --faults none" in capsys.readouterr().err
    assert main(["bench", "chaos", "--faults", "npu", "--duration", "5"]) == 2
    assert "--duration: only with --faults none" in capsys.readouterr().err
