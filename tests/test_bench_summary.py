"""The figures of a bench summary that need no server: the experiment's clock
(one time_scale for arrivals, emulation and the reported unit), what the
/v1/cluster snapshots before and after a run say (hand-made snapshots, keys
missing as in older servers), and the short-prompt TTFT."""

from __future__ import annotations

import pytest

from cluster.bench.clock import Clock, experiment_clock, with_clock
from cluster.bench.loadgen import RequestResult
from cluster.bench.report import SLO, summarize, to_table
from cluster.bench.server_view import host_gap_fraction, overrun_fraction, overrun_warning, server_figures
from cluster.config import MANIFEST_DIR, parse_manifest

pytestmark = pytest.mark.fast


def _manifest(compute: str = "emulated", time_scale: float = 1.0, name: str = "m"):
    return parse_manifest({"name": name, "model": "models/tiny-gqa-moge.yaml", "compute": compute,
                           "time_scale": time_scale}, MANIFEST_DIR)


def _snap(*engines: dict, **top) -> dict:
    return {"instances": [{"role": role, "engine": e} for role, e in engines], **top}


# -- the clock -------------------------------------------------------------------------------------------------


def test_the_clock_is_the_option_else_the_emulated_manifests_own():
    assert experiment_clock([_manifest(time_scale=4)], None) == Clock(4.0, device=True)
    assert experiment_clock([_manifest(time_scale=4)], 2.0) == Clock(2.0, device=True)
    assert experiment_clock([_manifest("real", time_scale=4)], None) == Clock(1.0, device=False)
    assert experiment_clock(None, 3.0) == Clock(3.0, device=False)  # --url: only the arrivals scale
    assert experiment_clock(None, None).unit == "wall_s"
    emulated = with_clock(_manifest(time_scale=4), Clock(2.0, True))
    assert emulated.time_scale == 2.0
    assert with_clock(_manifest("real"), Clock(2.0, False)).time_scale == 1.0


def test_the_clock_refuses_what_maps_no_device_time():
    with pytest.raises(ValueError, match=r"time_scale differ \(a: 1, b: 2\)"):
        experiment_clock([_manifest(name="a"), _manifest(time_scale=2, name="b")], None)
    with pytest.raises(ValueError, match="manifest m has time_scale 0"):
        experiment_clock([_manifest(time_scale=0)], None)
    with pytest.raises(ValueError, match="--time-scale must be"):
        experiment_clock(None, 0.0)


def test_device_seconds_divide_latencies_and_multiply_rates():
    clock = Clock(4.0, device=True)
    summary = {"ttft_p50_s": 2.0, "itl_p99_s": None, "max_queue_wait_s": 8.0, "request_per_s": 0.5,
               "wall_s": 10.0, "tokenizer_s": 1.0, "kv_hit_rate": 0.5}
    out = clock.report(summary)
    assert out == {"ttft_p50_s": 0.5, "itl_p99_s": None, "max_queue_wait_s": 2.0, "request_per_s": 2.0,
                   "wall_s": 10.0, "tokenizer_s": 1.0, "kv_hit_rate": 0.5, "time_scale": 4.0,
                   "latency_unit": "device_s"}
    assert Clock(1.0, device=True).report(summary)["ttft_p50_s"] == 2.0
    assert Clock(1.0, device=True).unit == Clock(4.0, device=False).unit == "wall_s"
    assert clock.wall_slo(SLO(0.1, None, 2.0)) == SLO(0.4, None, 8.0)  # bounds are device seconds
    assert clock.wall_qps(2.0) == 0.5 and clock.wall_qps(None) is None  # qps per device second


def test_goodput_slo_counts_a_one_token_answer_by_its_ttft():
    """A one-token answer has no TPOT, so only its TTFT can miss; no first token misses."""
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    row = {"error": None, "ttft_s": 0.5, "tpot_s": None, "e2e_s": 0.5}
    assert slo.met(row)
    assert not slo.met({**row, "ttft_s": 1.5})
    assert not slo.met({**row, "tpot_s": 0.2})
    assert slo.met({**row, "tpot_s": 0.05})
    assert not slo.met({**row, "ttft_s": None})
    assert not slo.met({**row, "error": "HTTPError"})
    assert not SLO(e2e_s=1.0).met({**row, "e2e_s": None})


# -- what the server says --------------------------------------------------------------------------------------


def test_overrun_fraction_is_over_all_instances_and_unknown_without_its_keys():
    before = _snap(("prefill", {"steps": 10, "overrun_steps": 1}), ("decode", {"steps": 5, "overrun_steps": 0}))
    after = _snap(("prefill", {"steps": 40, "overrun_steps": 4}), ("decode", {"steps": 55, "overrun_steps": 2}))
    assert overrun_fraction(before, after) == pytest.approx((4 + 2 - 1) / (40 + 55 - 15))
    older = _snap(("mixed", {"steps": 40}))  # an engine that does not count overruns
    assert overrun_fraction(older, older) is None
    assert overrun_fraction(before, before) is None  # no steps in the run
    assert overrun_fraction(None, after) is None


def test_host_gap_fraction_is_the_engines_time_between_steps_over_their_busy_time():
    before = _snap(("prefill", {"host_gap_s": 1.0, "step_wall_s": 10.0}), ("decode", {"host_gap_s": 0.0, "step_wall_s": 2.0}))
    after = _snap(("prefill", {"host_gap_s": 4.0, "step_wall_s": 30.0}), ("decode", {"host_gap_s": 1.0, "step_wall_s": 8.0}))
    assert host_gap_fraction(before, after) == pytest.approx(4 / (4 + 26))
    assert host_gap_fraction(before, before) is None  # no busy time in the run
    assert host_gap_fraction(_snap(("mixed", {"steps": 3})), after) is None  # an engine that does not count it
    warning = overrun_warning({"emulation_overrun_fraction": 0.0, "emulation_host_gap_fraction": 0.25})
    assert "idled 25.0% of their busy time" in warning and "overran" not in warning
    assert overrun_warning({"emulation_host_gap_fraction": 0.05}) is None


def test_server_figures_read_peaks_after_the_run_and_unknown_when_absent():
    before = _snap(("mixed", {"steps": 0, "overrun_steps": 0, "cached_tokens": 0, "prompt_tokens": 0,
                              "preemptions": 1}), tokenizer={"tokenizer_s": 1.0, "tokenizer_calls": 3})
    after = _snap(("mixed", {"steps": 100, "overrun_steps": 2, "cached_tokens": 30, "prompt_tokens": 120,
                             "preemptions": 4}),
                  tokenizer={"tokenizer_s": 1.5, "tokenizer_calls": 10}, queue_wait_max_s=0.7, starvation_ms=400.0)
    figures = server_figures(before, after)
    assert figures == {"kv_hit_rate": 0.25, "emulation_overrun_fraction": 0.02, "emulation_host_gap_fraction": None,
                       "preemptions": 3,
                       "max_queue_wait_s": 0.7,
                       "max_decode_queue_wait_s": None, "starvation_ms": 400.0, "tokenizer_s": 0.5,
                       "tokenizer_calls": 7}
    assert "overran its modelled time in 2.0% of steps" in overrun_warning(figures)
    assert overrun_warning({"emulation_overrun_fraction": 0.01}) is None
    unknown = server_figures(None, None)
    assert set(unknown.values()) == {None} and "tokenizer_s" not in unknown


# -- from the client's side ------------------------------------------------------------------------------------


def test_short_third_ttft_is_over_the_shortest_prompts_ties_by_index():
    def res(i: int, prompt: int, ttft: float | None, error: str = "") -> RequestResult:
        return RequestResult(i, "", 0.0, prompt, 2, ttft, None, None if error else ttft + 1, [], error)

    rows = [res(0, 50, 0.9), res(1, 10, 0.1), res(2, 10, 0.3), res(3, 10, 0.5), res(4, 99, 2.0),
            res(5, 5, None, "HTTP 500"), res(6, 70, 1.0)]
    # 6 completed: the shortest third is 2 of them, the first two 10-token prompts (indices 1, 2)
    assert summarize(to_table(rows), 1.0)["ttft_p50_short_third_s"] == pytest.approx(0.2)
    assert summarize(to_table(rows[:1]), 1.0)["ttft_p50_short_third_s"] == 0.9
    assert summarize(to_table([]), 1.0)["ttft_p50_short_third_s"] is None
