"""The monitoring path end to end: a small real-compute OmniRay server, Debian's
`prometheus` scraping Ray through Ray's own service discovery file, a short load,
then every PromQL expression of dashboards/omniray.json evaluated through
Prometheus' HTTP API must return at least one series.

Ray's dashboard process writes `<session dir>/prom_metrics_service_discovery.json`
(every node's metrics agent, the dashboard's and autoscaler's exporters) every 5 s;
`/tmp/ray/prom_metrics_service_discovery.json` is a link to the latest session's,
so this test names the session's own file (another Ray on the machine moves the link).
The writer is a dashboard module: this module starts its own Ray with the dashboard.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray

from actors.npu import NPU_RESOURCE
from cluster.bench.serve import free_port
from cluster.config import MANIFEST_DIR, parse_manifest
from conftest import LOCAL_CPUS, LOCAL_NPUS

pytestmark = pytest.mark.serving

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "omniray.json"
SD_FILE = "prom_metrics_service_discovery.json"
SCRAPE_S = 1
# Grafana's own variables, as a panel of a recent time range would get them
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}
CLUSTER = "omniray-test"
PROMPT = "The experts of a mixture of experts model hold the weights that a router picks for each token"


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Prometheus takes it: Grafana's interval variables a
    concrete window, every template variable (`$Model`, `${Instance}`) the `.*` regex."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard_queries() -> list[tuple[str, str, str | None]]:
    """(where, PromQL, label) of every expression in the dashboard: each panel target,
    and each template variable's `label_values(selector, label)` as its selector (whose
    series must carry the label)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    panels = [q for p in dash["panels"] for q in (p, *p.get("panels", []))]
    for p in panels:
        for t in p.get("targets", []):
            if t.get("expr", "").strip():
                out.append((f"panel {p['title']!r} {t['refId']}", grafana_to_promql(t["expr"]), None))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
            assert m, f"variable {v['name']}: a query this test cannot read: {query}"
            out.append((f"variable {v['name']}", grafana_to_promql(m.group(1)), m.group(2)))
    return out


@pytest.fixture(scope="module")
def ray_with_dashboard(_local_ray):
    """Its own Ray: the shared one runs without the dashboard, which writes the discovery file;
    workers report metrics every second (Ray's default: 10 s)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=LOCAL_CPUS, resources={NPU_RESOURCE: LOCAL_NPUS}, include_dashboard=True,
             dashboard_port=free_port(), log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
    _local_ray["namespace"] = None  # the next module starts the shared Ray afresh
    yield Path(ray._private.worker.global_worker.node.get_session_dir_path())
    ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_with_dashboard):
    from cluster.server import start_server

    manifest = parse_manifest({
        "name": "prometheus-test", "model": "models/tiny-gqa-moge.yaml", "compute": "real",
        "instances": [{"name": "mixed0", "role": "mixed", "ep": 1}],
    }, MANIFEST_DIR)
    # room for a few prompts' blocks: the load below makes the global KV cache evict
    manifest.engine.kv_cache_bytes = 6 * manifest.engine.block_size * manifest.model.kv_bytes_per_token()
    srv = start_server(manifest, port=free_port())
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def prometheus(ray_with_dashboard, tmp_path_factory):
    """Debian's prometheus on a free port, scraping what Ray's discovery file lists."""
    sd = ray_with_dashboard / SD_FILE
    deadline = time.monotonic() + 30
    while not sd.exists():
        assert time.monotonic() < deadline, f"Ray never wrote {sd}"
        time.sleep(0.5)
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: {SCRAPE_S}s
  evaluation_interval: {SCRAPE_S}s
scrape_configs:
- job_name: ray
  file_sd_configs:
  - files: ['{sd}']
  relabel_configs:  # as KubeRay's PodMonitor does: the Cluster variable's label
  - target_label: ray_io_cluster
    replacement: {CLUSTER}
""")
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "prometheus never became ready"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _load(server) -> None:
    """A few dozen requests: one prompt again and again (global KV cache and tokenizer
    cache hits), distinct ones (misses, and evictions past the cache's few blocks), one
    request refused while dispatch is paused (queue_full), then a rebalance."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        def complete(prompt: str, max_tokens: int = 4) -> httpx.Response:
            return http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": prompt,
                                                      "max_tokens": max_tokens, "temperature": 0})

        for i in range(24):
            prompt = PROMPT if i % 2 else f"{i} {PROMPT} {i}"
            assert complete(prompt).status_code == 200
        ray.get(server.master.configure.remote(paused=True, max_queue=1))
        try:
            waiting = threading.Thread(target=complete, args=(PROMPT,))
            waiting.start()
            deadline = time.monotonic() + 30
            while ray.get(server.master.snapshot.remote())["queue_length"] < 1:
                assert time.monotonic() < deadline, "the request never queued"
                time.sleep(0.05)
            assert complete(PROMPT).status_code == 429
        finally:
            ray.get(server.master.configure.remote(paused=False, max_queue=1024))
        waiting.join(timeout=60)
    ray.get(server.controller.rebalance.remote())


def _series(prometheus: str, promql: str) -> list[dict]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", f"{promql}: {body}"
    return body["data"]["result"]


def test_running_totals_become_counter_increments():
    """A source's running totals go out as increments; a total that fell (the source
    restarted) counts from zero again, as rate() reads a counter reset."""
    from prometheus_client.parser import text_string_to_metric_families

    from cluster.metrics import ProxyMetrics, _Deltas

    metrics = ProxyMetrics("m")
    for calls, hits in ((3, 0), (5, 2), (5, 2), (1, 4)):  # the last: a restarted token cache
        metrics.tokenizer({"tokenizer_calls": calls, "tokenizer_cache_hits": hits})
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.exposition().decode())
               for s in f.samples}
    assert samples["omniray_tokenizer_calls_total"] == 3 + 2 + 1
    assert samples["omniray_tokenizer_cache_hits_total"] == 2 + 2
    deltas = _Deltas()
    assert [deltas.vector("npu0", v) for v in ([1, 2], [4, 2], [4, 2], [0, 1])] == [[1, 2], [3, 0], [0, 0], [0, 1]]


@needs_prometheus
def test_every_dashboard_query_returns_series(server, prometheus):
    queries = dashboard_queries()
    assert len(queries) > 30
    _load(server)
    deadline = time.monotonic() + 60
    while True:
        empty = [(where, q) for where, q, label in queries
                 if not any(label is None or label in s["metric"] for s in _series(prometheus, q))]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, "no series:\n" + "\n".join(f"{w}: {q}" for w, q in empty)
