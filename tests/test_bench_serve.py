"""`omniray bench serve` end to end on a small shared-prefix run: the summary it
prints and writes agrees with the parquet file it writes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from cluster.cli import main


def test_bench_serve_summary_matches_parquet(ray_session, tmp_path):
    out, png, js = tmp_path / "r.parquet", tmp_path / "r.png", tmp_path / "s.json"
    rc = main(["bench", "serve", "--workload", "shared-prefix", "--requests", "16", "--concurrency", "4",
               "--output-len", "6", "--slo-ttft-ms", "60000", "--out", str(out), "--plot", str(png),
               "--json", str(js)])
    assert rc == 0
    rows = pq.read_table(out).to_pylist()
    summary = json.loads(js.read_text())
    assert len(rows) == summary["requests"] == 16
    ok = [r for r in rows if not r["error"]]
    assert summary["completed"] == len(ok) == 16 and summary["failed"] == 0
    assert summary["output_tokens"] == sum(r["output_tokens"] for r in ok)
    assert all(r["output_tokens"] >= 1 for r in ok)
    assert summary["ttft_p50_s"] == np.percentile([r["ttft_s"] for r in ok], 50)
    assert summary["e2e_p99_s"] == np.percentile([r["e2e_s"] for r in ok], 99)
    assert summary["output_tok_per_s"] == summary["output_tokens"] / summary["wall_s"]
    assert summary["slo_attainment"] == 1.0
    # 16 requests over 4 shared prefixes: a request whose prefix ran before reuses its blocks
    assert summary["kv_hit_rate"] is not None and summary["kv_hit_rate"] > 0.3
    assert png.stat().st_size > 10_000


def test_simulate_reports_cost_model_throughput(ray_session, tmp_path):
    js = tmp_path / "sim.json"
    assert main(["simulate", "--manifest", "pangu-pro-moe-72b", "--batch", "4", "--input-len", "64",
                 "--output-len", "4", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["ep"] == 8 and r["device"] == "910B"
    assert r["prefill_tok_s_per_npu"] == 4 * 64 / r["prefill_device_s"] / 8
    assert 0 < r["tpot_s"] <= r["decode_device_s"]
    assert r["decode_tok_s_per_npu"] < r["prefill_tok_s_per_npu"]  # decode is memory-bound


def test_simulate_refuses_real_compute(ray_session):
    import pytest

    from cluster.bench.simulate import run_simulation
    from cluster.config import load_manifest

    with pytest.raises(ValueError, match="compute"):
        run_simulation(load_manifest("local"), 2, 8, 4)
