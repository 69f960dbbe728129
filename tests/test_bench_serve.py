"""`omniray bench serve` end to end on a small shared-prefix run: the summary it
prints and writes agrees with the parquet file it writes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import ray
import pyarrow.parquet as pq

from cluster.cli import main

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def server(ray_session):
    """One mixed EP-1 instance, local prefix caching only, a pool big enough to
    evict nothing: shared by the tests that need a server (each starts in ~20 s here)."""
    from cluster.bench.serve import local_server
    from cluster.config import MANIFEST_DIR, parse_manifest

    manifest = parse_manifest({"model": "models/tiny-gqa-moge.yaml", "instances": [{"role": "mixed", "ep": 1}],
                               "engine": {"global_kv_cache": False, "kv_blocks": 2048}}, MANIFEST_DIR)
    with local_server(manifest) as srv:
        yield srv


def test_bench_serve_summary_matches_parquet(server, tmp_path):
    out, png, js = tmp_path / "r.parquet", tmp_path / "r.png", tmp_path / "s.json"
    rc = main(["bench", "serve", "--url", server.url, "--workload", "shared-prefix", "--requests", "16",
               "--concurrency", "4", "--output-len", "6", "--slo-ttft-ms", "60000", "--out", str(out), "--plot", str(png),
               "--json", str(js), "--time-scale", "3"])
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
    assert 0 < summary["ideal_kv_hit_rate"] < 1  # at the default block size of a server that does not say its own
    assert summary["kv_hit_fraction_of_ideal"] == summary["kv_hit_rate"] / summary["ideal_kv_hit_rate"]
    shortest = sorted(ok, key=lambda r: (r["prompt_tokens"], r["index"]))[:6]  # a third of 16, rounded up
    assert summary["ttft_p50_short_third_s"] == np.percentile([r["ttft_s"] for r in shortest], 50)
    # a server at --url: the time scale stretches only the arrivals (none here), the summary stays in wall seconds
    assert summary["time_scale"] == 3.0 and summary["latency_unit"] == "wall_s"
    for key in ("emulation_overrun_fraction", "emulation_host_gap_fraction", "max_queue_wait_s",
                "max_decode_queue_wait_s", "starvation_ms"):
        assert key in summary  # None until the server publishes it
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
    from cluster.bench.simulate import run_simulation
    from cluster.config import load_manifest

    with pytest.raises(ValueError, match="compute"):
        run_simulation(load_manifest("local"), 2, 8, 4)


def test_simulate_through_the_proxy_refuses_a_cluster_that_serves_already(server):
    """It would serve on Serve's existing port and stop that Serve at the end."""
    from cluster.bench.simulate import run_simulation
    from cluster.config import load_manifest

    with pytest.raises(RuntimeError, match="Serve already runs"):
        run_simulation(load_manifest("pangu-pro-moe-72b"), 2, 8, 4, through_proxy=True)
    assert ray.get(server.instances[0].engine.stats.remote()).healthy


def test_bench_latency_times_omniray_and_a_bare_serve_echo_in_one_run(server, tmp_path):
    """Both answered every request (a non-200 raises); the echo leaves the server's Serve again."""
    from ray import serve

    from cluster.bench.latency import ECHO_APP, run_latency_bench

    r = run_latency_bench(server.manifest, requests=6, warmup=1, url=server.url)
    assert r.requests == 6 and r.omniray_p50_ms > 0 and r.echo_p50_ms > 0
    assert r.omniray_p90_ms >= r.omniray_p50_ms and r.ratio == r.omniray_p50_ms / r.echo_p50_ms
    assert ECHO_APP not in serve.status().applications


def test_trace_replay_hits_the_prefixes_the_hash_ids_imply(server):
    """One mixed instance with a pool big enough to evict nothing, one request at a
    time: the engine reuses exactly the prefix blocks the trace's hash ids share
    (less the last block when a repeat covers the whole prompt: its last token is
    always recomputed to produce the next one), which is the workload's ideal."""
    from cluster.bench.loadgen import LoadConfig
    from cluster.bench.serve import run_serve_bench
    from cluster.bench.workloads import expected_prefix_hits, make_workload

    bs = 16
    items = make_workload("trace:cluster/bench/traces/sample_mooncake.jsonl", block_tokens=bs, time_scale=1e-6,
                          max_requests=24, token_range=(16, 512))
    implied = expected_prefix_hits(items, bs, reusable=True)
    assert implied > 20  # the sample trace shares prefixes
    engine = server.instances[0].engine
    before = ray.get(engine.stats.remote())  # the server is the module's: count this run's part
    result = run_serve_bench(items, LoadConfig(server.url, concurrency=1), block_size=bs)
    after = ray.get(engine.stats.remote())
    cached, prompt = (getattr(after.counters, k) - getattr(before.counters, k) for k in ("cached_tokens", "prompt_tokens"))
    assert result.summary["failed"] == 0
    assert cached == implied * bs
    assert result.summary["kv_hit_rate"] == implied * bs / prompt
    assert result.summary["ideal_kv_hit_rate"] == implied * bs / sum(len(it.prompt_ids) for it in items)
    assert result.summary["kv_hit_fraction_of_ideal"] == pytest.approx(1.0)


class _StaleClusterView(BaseHTTPRequestHandler):
    """A /v1/cluster whose state never moves past what it published once."""

    def do_GET(self):
        body = json.dumps({"time": 1.0, "instances": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_cluster_view_that_does_not_move_past_the_run_reads_unknown():
    """Counters read off a state published before the run ended would be wrong: the
    bench reports them unknown instead."""
    from cluster.bench.loadgen import LoadConfig, cluster_stats

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StaleClusterView)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cfg = LoadConfig(f"http://127.0.0.1:{httpd.server_address[1]}")
        assert asyncio.run(cluster_stats(cfg))["time"] == 1.0  # any state will do
        assert asyncio.run(cluster_stats(cfg, newer_than=time.time(), wait_s=0.5)) is None
    finally:
        httpd.shutdown()
