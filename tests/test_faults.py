"""Faults under a real server: an NPU actor killed mid-generation, the global KV
cache actor killed, the cluster controller killed (it restarts), a client that
goes away. Every accepted request completes with the reference's tokens, and
nothing leaks."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray

from helpers import reference_text, serving

pytestmark = pytest.mark.serving

PROMPT = "An NPU dies in the middle of this answer"
TIMEOUT_S = 15.0  # the test server's request timeout: far above any request here, short enough to wait out



@pytest.fixture(scope="module")
def server(ray_session, one_thread):
    with serving({
        "model": "models/tiny-gqa-moge.yaml", "compute": "real",
        "instances": [{"name": "mixed0", "role": "mixed", "ep": 1}, {"name": "mixed1", "role": "mixed", "ep": 1}],
        "proxy": {"policy": "round_robin", "request_timeout_s": TIMEOUT_S},
    }) as srv:
        yield srv


@pytest.fixture(scope="module")
def expect(server):
    return reference_text(server.manifest.model)


def _stream(url: str, prompt: str, max_tokens: int, ignore_eos: bool = False):
    body = {"model": "tiny-gqa-moge", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": ignore_eos}
    return httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120)


def _texts(lines):
    for line in lines:
        if line.startswith("data: {"):
            yield "".join(c["text"] for c in json.loads(line[6:])["choices"])


def _complete(url: str, prompt: str, n: int) -> str:
    r = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"model": "tiny-gqa-moge", "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_request_over_the_timeout_is_504_and_leaves_the_queue(server):
    ray.get(server.master.configure.remote(paused=True))  # it can only wait
    try:
        r = httpx.post(f"{server.url}/v1/completions", timeout=120,
                       json={"model": "tiny-gqa-moge", "prompt": "never dispatched", "max_tokens": 4})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        deadline = time.monotonic() + 10
        while ray.get(server.master.snapshot.remote())["queue_length"]:
            assert time.monotonic() < deadline, "the timed-out request stayed queued"
            time.sleep(0.1)
    finally:
        ray.get(server.master.configure.remote(paused=False))


def test_client_disconnect_frees_the_kv_blocks_and_spares_the_batch(server, expect):
    import concurrent.futures

    others = ["the request beside it", "and another one"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool, _stream(server.url, "a client that leaves early", 400) as resp:
        lines = resp.iter_lines()
        next(t for t in _texts(lines) if t)  # generating now
        futures = [pool.submit(_complete, server.url, p, 24) for p in others]  # round robin: one shares its engine
        next(t for t in _texts(lines) if t)
    # leaving cancelled only its own request, not the engine steps the others ride in
    assert [f.result() for f in futures] == [expect(p, 24) for p in others]
    deadline = time.monotonic() + 30
    while True:
        stats = [ray.get(i.engine.stats.remote()) for i in server.instances]
        if all(s.running == 0 and s.waiting == 0 for s in stats) and \
                all(s.free_blocks == s.total_blocks for s in stats):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


def test_kv_cache_actor_dying_loses_only_cached_blocks(server, expect):
    from actors.kv_cache import KV_CACHE_NAME

    want = expect(PROMPT + " cached", 8)
    assert _complete(server.url, PROMPT + " cached", 8) == want  # publishes its blocks
    ray.kill(ray.get_actor(KV_CACHE_NAME), no_restart=False)
    for _ in range(3):  # the same prefix again: cache gone or empty, the answer the same
        assert _complete(server.url, PROMPT + " cached", 8) == want


def test_npu_killed_mid_generation_resumes_elsewhere_with_the_same_tokens(server, expect):
    want = expect(PROMPT, 160, stop_at_eos=False)  # long enough to be mid-generation when the NPU dies
    got = []
    with _stream(server.url, PROMPT, 160, ignore_eos=True) as resp:
        texts = _texts(resp.iter_lines())
        got.append(next(t for t in texts if t))
        route = ray.get(server.master.snapshot.remote())["recent_dispatches"][-1]["decode"]
        victim = next(i for i in server.instances if i.name == route)
        ray.kill(victim.npus[0])
        got += list(texts)
        engine = ray.get(victim.engine.stats.remote())
    assert engine.counters.generated_tokens < 160  # it broke under this request
    assert "".join(got) == want  # greedy: resumed from its tokens so far on the other instance
    # the controller's health check gives it new NPUs; the master routes to it again
    deadline = time.monotonic() + 120
    while True:
        events = [e for e in ray.get(server.controller.describe.remote())["events"] if e["action"] == "rebuild"]
        healthy = {i["name"]: i["healthy"] for i in ray.get(server.master.snapshot.remote())["instances"]}
        if events and events[-1]["outcome"] == "ok" and healthy[victim.name]:
            break
        assert time.monotonic() < deadline, f"{victim.name} was not rebuilt: {events}"
        time.sleep(0.2)
    assert events[-1]["trigger"] == "health" and events[-1]["instance"] == victim.name
    before = ray.get(victim.engine.stats.remote()).counters.generated_tokens
    for _ in range(4):  # round robin: the rebuilt instance serves its share, correctly
        assert _complete(server.url, PROMPT, 6) == expect(PROMPT, 6)
    assert ray.get(victim.engine.stats.remote()).counters.generated_tokens > before


def _restarted_view(controller, timeout_s: float = 120.0) -> dict:
    """The controller's view once a restarted one answers (its event log starts
    afresh, with its recovery): the kill goes through the GCS, so the one killed
    may still answer a call right after it."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = ray.get(controller.describe.remote(), timeout=timeout_s)
        if [e["action"] for e in view["events"]] == ["recover"]:
            return view
        assert time.monotonic() < deadline, f"no restarted controller answered: {view['events']}"
        time.sleep(0.2)


def test_controller_killed_mid_generation_restarts_with_every_npu_and_scales_again(server, expect):
    """Ray restarts it; it finds the instances, their NPUs and the NPUs it started
    (the rebuild's above, the scale-up's here) alive, and acts again."""
    from cluster.bench.chaos import count_npus

    before = ray.get(server.controller.describe.remote())
    want = expect(PROMPT, 120, stop_at_eos=False)
    with _stream(server.url, PROMPT, 120, ignore_eos=True) as resp:
        texts = _texts(resp.iter_lines())
        got = [next(t for t in texts if t)]
        ray.kill(server.controller, no_restart=False)
        got += list(texts)
    assert "".join(got) == want  # the request did not notice
    view = _restarted_view(server.controller)
    assert count_npus(view) == count_npus(before) == 2
    assert [(i["name"], i["npus"]) for i in view["instances"]] == [(i["name"], i["npus"]) for i in before["instances"]]
    up = ray.get(server.controller.scale.remote("mixed0", 2))  # a new NPU, started for the restarted controller
    assert up["to_ep"] == 2 and not up["first_step_error"]
    for _ in range(2):  # round robin: mixed0 serves one of them on 2 NPUs
        assert _complete(server.url, PROMPT, 6) == expect(PROMPT, 6)
    ray.kill(server.controller, no_restart=False)  # again: the scale-up's NPU outlives this one too
    view = _restarted_view(server.controller)
    assert {i["name"]: i["npus"] for i in view["instances"]} == {"mixed0": 2, "mixed1": 1}
    ray.get(server.controller.scale.remote("mixed0", 1))  # as the module's other tests found it
    assert _complete(server.url, PROMPT, 6) == expect(PROMPT, 6)


# ---- bad input: fuzzing the real HTTP server ---------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed",
                           "stop", "stream", "n", "logprobs", "stream_options", "ignore_eos", "stop_token_ids"])
_bodies = st.one_of(
    _json,
    st.dictionaries(_fields, _json, max_size=6).map(lambda d: {"model": "tiny-gqa-moge", **d}),
    st.fixed_dictionaries({"model": st.just("tiny-gqa-moge"), "prompt": st.text(max_size=40) | st.lists(
        st.integers(-5, 600), max_size=8), "max_tokens": st.integers(-3, 8)}),
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_json_never_gets_a_5xx(server, body, path):
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_never_get_a_5xx(server, raw):
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code < 500, r.text


def test_still_serves_after_the_fuzzing(server, expect):
    assert _complete(server.url, PROMPT, 6) == expect(PROMPT, 6)
