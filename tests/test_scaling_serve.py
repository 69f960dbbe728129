"""ElasticMoE through a real server: `POST /v1/cluster/scale` and `/rebalance`
(admin key), an EP resize under a stream that keeps its tokens, an instance
added then another drained and removed without losing its request, and the
scaling events the controller records and exports."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import ray

from cluster.cli import main as cli_main
from cluster.proxy.master import fetch_published
from helpers import reference_text, serving

pytestmark = pytest.mark.serving

ADMIN = "admin-secret"
MODEL = "tiny-gqa-moge"


@pytest.fixture(scope="module")
def server(ray_session, one_thread):
    with serving({
        "model": "models/tiny-gqa-moge.yaml", "compute": "real",
        "instances": [{"name": "prefill0", "role": "prefill", "ep": 1}, {"name": "decode0", "role": "decode", "ep": 2}],
        "proxy": {"admin_keys": [ADMIN]},
        "elastic": {"drain_timeout_s": 60},
    }) as srv:
        yield srv


@pytest.fixture(scope="module")
def expect(server):
    return reference_text(server.manifest.model)


def _admin(url, path, body, key=ADMIN):
    return httpx.post(f"{url}{path}", json=body, timeout=300, headers={"Authorization": f"Bearer {key}"} if key else {})


def _stream_in_thread(url: str, prompt: str, n: int, progress: threading.Event, out: dict):
    """Stream a greedy completion; set `progress` after the first few chunks."""
    def run():
        body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
        chunks = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append("".join(c["text"] for c in json.loads(line[6:])["choices"]))
                    if len(chunks) >= 3:
                        progress.set()
        out["text"] = "".join(chunks)
        progress.set()

    t = threading.Thread(target=run)
    t.start()
    return t


def _describe(server):
    return ray.get(server.controller.describe.remote())


def test_admin_endpoints_need_the_admin_key_and_name_bad_fields(server):
    body = {"instance": "decode0", "npus": 4}
    assert _admin(server.url, "/v1/cluster/scale", body, key=None).status_code == 401
    assert _admin(server.url, "/v1/cluster/scale", body, key="wrong").status_code == 401
    r = _admin(server.url, "/v1/cluster/scale", {"instance": "decode0", "npus": 3})
    assert r.status_code == 400 and "npus: 3 does not divide" in r.json()["error"]["message"]
    r = _admin(server.url, "/v1/cluster/scale", {"instance": "nope", "npus": 2})
    assert r.status_code == 400 and "instance: no instance 'nope'" in r.json()["error"]["message"]
    r = _admin(server.url, "/v1/cluster/scale", {"instance": "decode0", "add_instance": "decode"})
    assert r.status_code in (400, 422) and "exactly one" in r.json()["error"]["message"]
    r = _admin(server.url, "/v1/cluster/scale", {"remove_instance": "prefill0"})
    assert r.status_code == 400 and "last prefill instance" in r.json()["error"]["message"]
    assert [i["npus"] for i in _describe(server)["instances"]] == [1, 2]  # nothing changed


def test_stream_across_ep_resizes_keeps_its_tokens(server, expect):
    prompt = "A stream that crosses two scale events"
    progress, out = threading.Event(), {}
    t = _stream_in_thread(server.url, prompt, 40, progress, out)
    assert progress.wait(120)
    # the bench's control command: the ends of the decode instance's next two steps, the stream's
    first, second = ray.get(server.controller.after_steps.remote("decode0", 2))
    assert first is not None and second is not None and first < second
    up = _admin(server.url, "/v1/cluster/scale", {"instance": "decode0", "npus": 4})
    assert up.status_code == 200, up.text
    assert up.json()["from_ep"] == 2 and up.json()["to_ep"] == 4
    down = _admin(server.url, "/v1/cluster/scale", {"instance": "decode0", "npus": 2})
    assert down.status_code == 200, down.text
    assert down.json()["back"] and not up.json()["back"]  # back to the launch's layout: nothing staged
    t.join(300)
    assert out["status"] == 200 and out["text"] == expect(prompt, 40)
    from cluster.launcher import engine_name

    assert ray.get(ray.get_actor(engine_name("decode0")).stats.remote()).counters.reconfigurations == 2
    events = [e for e in _describe(server)["events"] if e["action"] == "scale_ep"]
    assert [(e["from_ep"], e["to_ep"], e["outcome"]) for e in events[-2:]] == [(2, 4, "ok"), (4, 2, "ok")]
    # no standby pool, no placement group: the NPUs the scale-down released went
    view = httpx.get(f"{server.url}/v1/cluster", timeout=30).json()
    assert view["elastic"] == {"standby_npus": 0, "standby_warming": 0, "standby_nodes": [],
                               "reserve_npus": {"prefill0": 0, "decode0": 0}}


def test_add_then_remove_an_instance_drains_without_losing_its_request(server, expect):
    assert cli_main(["scale", "--url", server.url, "--add-instance", "decode", "--npus", "1",
                     "--admin-key", ADMIN]) == 0
    assert [i["name"] for i in _describe(server)["instances"]] == ["prefill0", "decode0", "decode1"]
    assert expect("served after the add", 6) == httpx.post(
        f"{server.url}/v1/completions", timeout=120,
        json={"model": MODEL, "prompt": "served after the add", "max_tokens": 6, "temperature": 0}).json()["choices"][0]["text"]
    # a long stream is running somewhere; remove decode0: it finishes what it holds first
    prompt = "This request is running while its instance is removed"
    progress, out = threading.Event(), {}
    t = _stream_in_thread(server.url, prompt, 48, progress, out)
    assert progress.wait(120)
    r = _admin(server.url, "/v1/cluster/scale", {"remove_instance": "decode0"})
    assert r.status_code == 200, r.text
    t.join(300)
    assert out["status"] == 200 and out["text"] == expect(prompt, 48)
    assert [i["name"] for i in _describe(server)["instances"]] == ["prefill0", "decode1"]
    deadline = time.monotonic() + 10  # the master's view follows
    while {i["name"] for i in ray.get(server.master.snapshot.remote())["instances"]} != {"prefill0", "decode1"}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    text = httpx.post(f"{server.url}/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": "after the removal", "max_tokens": 5, "temperature": 0})
    assert text.status_code == 200 and text.json()["choices"][0]["text"] == expect("after the removal", 5)
    # a restarted master starts from the instances it was told of, not the ones it was started with
    started = ray.get(server.master.snapshot.remote())["started"]
    ray.kill(server.master, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            snap = ray.get(server.master.snapshot.remote(), timeout=30)
        except ray.exceptions.RayError:
            snap = None
        if snap is not None and snap["started"] != started:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert {i["name"] for i in snap["instances"]} == {"prefill0", "decode1"}


def test_rebalance_endpoint_reports_the_imbalance(server):
    assert cli_main(["rebalance", "--url", server.url, "--admin-key", ADMIN]) == 0
    r = _admin(server.url, "/v1/cluster/rebalance", {"instance": "decode1"})
    assert r.status_code == 200, r.text
    (one,) = r.json()["instances"]
    assert one["instance"] == "decode1"
    if "imbalance_after" in one:
        assert one["imbalance_after"] <= one["imbalance_before"]
    actions = [e["action"] for e in _describe(server)["events"]]
    assert actions.count("rebalance") == 2 and "add_instance" in actions and "remove_instance" in actions


def test_autoscaler_round_grows_the_dispatch_role_under_a_queue(server, expect):
    ray.get(server.master.configure.remote(paused=True))  # requests pile up in the master's queue
    results = {}

    def send(i):
        r = httpx.post(f"{server.url}/v1/completions", timeout=300,
                       json={"model": MODEL, "prompt": f"queued request {i}", "max_tokens": 4, "temperature": 0})
        results[i] = r

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while True:  # the policy reads the master's published snapshot
            snap = asyncio.run(fetch_published(server.master, 5.0))
            if snap and snap["queue_length"] >= 6:
                break
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.1)
        done = ray.get(server.controller.autoscale_once.remote())
    finally:
        ray.get(server.master.configure.remote(paused=False))
        for t in threads:
            t.join(300)
    assert [(d["action"], d["instance"], d["from_ep"], d["to_ep"]) for d in done] == [("scale_ep", "prefill0", 1, 2)]
    assert "prefill queue" in done[0]["reason"]
    assert all(results[i].status_code == 200 for i in range(6))
    assert [r.json()["choices"][0]["text"] for r in (results[i] for i in range(6))] == \
        [expect(f"queued request {i}", 4) for i in range(6)]
    event = _describe(server)["events"][-1]
    assert (event["action"], event["trigger"], event["outcome"]) == ("scale_ep", "autoscaler", "ok")


def test_scaling_events_reach_prometheus(server):
    """The controller's counters are scraped from Ray's metrics agent (ray_ prefix)."""
    import re

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        seen = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^ray_omniray_scaling_events_total{[^}]*action="(\w+)"[^}]*} ([0-9.e+-]+)$', text, re.M)}
        if {"scale_ep", "add_instance", "remove_instance", "rebalance"} <= {a for a, v in seen.items() if v > 0}:
            return
        time.sleep(2)
    pytest.fail(f"scaling events exported: {seen}")


def test_a_dead_controller_gets_clear_answers_and_the_server_still_stops_last(server):
    """Runs last in this module: it kills the controller for good (no_restart).
    /v1/cluster still answers, the admin endpoints answer 503 naming what is
    missing, and the fixture's shutdown still frees every name."""
    from cluster.controller import CONTROLLER_NAME
    from cluster.server import wait_names_free

    ray.kill(server.controller, no_restart=True)
    deadline = time.monotonic() + 30
    while True:  # the kill goes through the GCS: a call right after it may still be answered
        try:
            ray.get(server.controller.describe.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the controller never died"
        time.sleep(0.05)
    # dead, its name perhaps not freed yet: either way the view leaves the controller's part out
    resp = httpx.get(f"{server.url}/v1/cluster", timeout=60)
    assert resp.status_code == 200 and resp.json()["elastic"] is None
    wait_names_free([CONTROLLER_NAME], timeout_s=30.0)
    with pytest.raises(ValueError):  # the dead controller's name was freed
        ray.get_actor(CONTROLLER_NAME)
    resp = _admin(server.url, "/v1/cluster/scale", {"instance": "decode0", "npus": 4})
    assert resp.status_code == 503 and resp.json()["error"]["message"] == "no cluster controller is running"
