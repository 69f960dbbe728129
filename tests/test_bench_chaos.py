"""`omniray bench chaos`: faults under load lose no accepted request, down to the
cluster controller's death: it restarts, and the NPUs it started (a rebuild's)
outlive it, so the server holds as many NPUs after as before."""

from __future__ import annotations

import pytest

from cluster.bench.chaos import run_chaos_bench
from cluster.config import load_manifest

pytestmark = pytest.mark.serving


def test_an_npu_then_the_controller_killed_under_load_lose_no_request_and_no_npu(ray_session, one_thread):
    summary = run_chaos_bench(load_manifest("local-mixed"), ["npu", "controller"], concurrency=4, phase_s=2.5,
                              output_len=16)
    assert [f["killed"] for f in summary["faults"]] == ["mixed0.npu0", "controller"]
    assert summary["accepted"] > 0 and summary["requests_hit_by_a_fault"] > 0
    assert summary["failed"] == 0, summary["errors"]
    assert summary["completed"] == summary["accepted"]
    # the rebuild's NPU (started for the controller) survived it; the restarted one found all three again
    assert summary["rebuilds"] and summary["rebuilds"][0]["outcome"] == "ok"
    assert summary["controller_restarts"] and summary["controller_restarts"][0]["npus"] == 3
    assert summary["npus_before"] == summary["npus_after"] == 3


@pytest.mark.parametrize("faults, says", [
    (["npu", "disk"], "unknown fault 'disk'"),
])
def test_a_bad_fault_list_is_refused_before_a_server_starts(faults, says):
    with pytest.raises(ValueError, match=says):
        run_chaos_bench(load_manifest("local-mixed"), faults)
