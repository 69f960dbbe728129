"""The Omni Proxy end to end: a real `start_server` (instances, master, Serve
HTTP), the `openai` client and raw HTTP against it, outputs checked against
the single-process reference model. One server for the whole module; tests
that switch a scheduling feature switch it back."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
import ray
from openai import NotFoundError, OpenAI

from actors.model.reference import build_reference, generate
from actors.protocol import SamplingParams
from cluster.bench.serve import free_port
from cluster.config import MANIFEST_DIR, parse_manifest
from cluster.proxy.lifecycle import STAGES
from cluster.proxy.tokens import Tokenizer

pytestmark = pytest.mark.serving

KEY = "sk-omniray-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The experts of a mixture", "Ray actors hold the weights of one NPU each and"]



@pytest.fixture(scope="module")
def server(ray_session, one_thread):
    from cluster.server import start_server

    manifest = parse_manifest({
        "name": "serve-test", "model": "models/tiny-gqa-moge.yaml", "compute": "real",
        "instances": [{"name": "prefill0", "role": "prefill", "ep": 1}, {"name": "prefill1", "role": "prefill", "ep": 1},
                      {"name": "decode0", "role": "decode", "ep": 2}],
        # a starvation bound far above how long queueing a test's requests takes on a slow box: the
        # sorting tests see the weighted order, not requests that waited past the bound (400 ms by default)
        "proxy": {"api_keys": [KEY], "max_body_bytes": 65536, "starvation_ms": 30000},
    }, MANIFEST_DIR)
    srv = start_server(manifest, port=free_port(), grpc_port=free_port())
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def reference(server):
    return build_reference(server.manifest.model), Tokenizer.from_file(server.manifest.tokenizer)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def _expect(reference, ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """The reference's greedy text, completion token count and finish reason."""
    model, tok = reference
    tokens = generate(model, [ids], max_tokens, stop_token_ids={tok.eos_token_id}).tokens[0]
    finish = "stop" if tokens[-1] == tok.eos_token_id else "length"
    return tok.decode(tokens), len(tokens), finish


def _chat_ids(reference, messages) -> list[int]:
    tok = reference[1]
    return tok.encode(tok.apply_chat_template(messages))


def _configure(server, **settings):
    return ray.get(server.master.configure.remote(**settings))


def _wait_queue(server, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.get(server.master.snapshot.remote())["queue_length"] < n:
        assert time.monotonic() < deadline, f"queue never reached {n}"
        time.sleep(0.02)


def _in_threads(fns):
    results = [None] * len(fns)

    def run(i, fn):
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    return threads, results


# ---- outputs equal the reference ---------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_reference(client, reference, prompt):
    text, n, finish = _expect(reference, reference[1].encode(prompt), 12)
    r = client.completions.create(model="tiny-gqa-moge", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(reference[1].encode(prompt)) and r.usage.completion_tokens == n


def test_completion_stream_equals_reference(client, reference):
    prompt = PROMPTS[1]
    text, n, _ = _expect(reference, reference[1].encode(prompt), 10)
    chunks = list(client.completions.create(model="tiny-gqa-moge", prompt=prompt, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == n and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None


def test_token_id_prompt(client, reference):
    ids = reference[1].encode(PROMPTS[0])
    text, _, _ = _expect(reference, ids, 6)
    r = client.completions.create(model="tiny-gqa-moge", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == text


def test_chat_equals_reference_streaming_and_not(client, reference):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name an expert."}]
    text, n, finish = _expect(reference, _chat_ids(reference, messages), 9)
    r = client.chat.completions.create(model="tiny-gqa-moge", messages=messages, max_tokens=9, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish and r.usage.completion_tokens == n
    chunks = list(client.chat.completions.create(model="tiny-gqa-moge", messages=messages, max_tokens=9,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_stop_string_cuts_the_text(client, reference):
    prompt = PROMPTS[0]
    text, _, _ = _expect(reference, reference[1].encode(prompt), 16)
    stop = text[4:7]
    assert stop and len(text) > 8
    cut = text.find(stop)
    r = client.completions.create(model="tiny-gqa-moge", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:cut] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-gqa-moge", prompt=prompt, max_tokens=16, temperature=0,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]


def test_seeded_sampling_is_reproducible(client):
    kw = {"model": "tiny-gqa-moge", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0.9, "seed": 7}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


# ---- the other endpoints -----------------------------------------------------------------------


def test_models_health_and_cluster(http, client):
    assert http.get("/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny-gqa-moge"]
    assert client.models.retrieve("tiny-gqa-moge").id == "tiny-gqa-moge"
    with pytest.raises(NotFoundError):
        client.models.retrieve("no-such-model")
    client.completions.create(model="tiny-gqa-moge", prompt="warm", max_tokens=2)
    time.sleep(0.6)  # one cache sync of the master
    cluster = http.get("/v1/cluster").json()
    names = {i["name"]: i for i in cluster["instances"]}
    assert set(names) == {"prefill0", "prefill1", "decode0"}
    assert [len(names[n]["npus"]) for n in ("prefill0", "prefill1", "decode0")] == [1, 1, 2]
    npu = names["decode0"]["npus"][0]
    assert npu["hbm"]["used"] > 0 and npu["experts"]  # HBM use and placement
    assert cluster["kv_cache"]["blocks"] >= 0 and cluster["tokenizer"]["tokenizer_calls"] >= 1
    assert cluster["queue_length"] == 0 and cluster["policy"] == "omni"


def _sse_events(http, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed answer, read raw; [DONE] must end it."""
    with http.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_is_in_every_chunk(http, reference, path):
    """vLLM's stream_options.continuous_usage_stats (guidellm sends it): usage so far on every chunk."""
    chat = path.endswith("chat/completions")
    body = {"model": "tiny-gqa-moge", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body |= {"messages": [{"role": "user", "content": PROMPTS[0]}]} if chat else {"prompt": PROMPTS[0]}
    events = _sse_events(http, path, body)
    prompt = len(_chat_ids(reference, body["messages"]) if chat else reference[1].encode(PROMPTS[0]))
    usages = [e["usage"] for e in events]  # KeyError: a chunk without usage
    assert all(u["prompt_tokens"] == prompt and u["total_tokens"] == prompt + u["completion_tokens"] for u in usages)
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == 6
    assert not events[-1]["choices"] and events[-1]["usage"] == events[-2]["usage"]  # include_usage's last chunk
    if chat:
        assert events[0]["choices"][0]["delta"]["role"] == "assistant" and done[0] == 0
    body["stream_options"] = {"continuous_usage_stats": True}  # without include_usage: no usage-only chunk
    assert all(e["choices"] and "usage" in e for e in _sse_events(http, path, body))


def test_metrics_endpoint_serves_prometheus_text(server, http):
    from prometheus_client.parser import text_string_to_metric_families

    def requests_total() -> float:
        resp = httpx.get(f"{server.url}/metrics", timeout=30)  # no key needed, as vLLM's
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(resp.text)}
        assert {"omniray_ttft_seconds", "omniray_tokens", "omniray_tokenizer_calls"} <= set(families)
        return sum(s.value for s in families["omniray_requests"].samples if s.name == "omniray_requests_total")

    before = requests_total()
    http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": "count me", "max_tokens": 1})
    assert requests_total() == before + 1


def test_version_and_max_model_len(server, http, client):
    from importlib.metadata import version

    assert http.get("/version").json() == {"version": version("omniray")}
    _error(httpx.get(f"{server.url}/version"), 401)
    limit = server.manifest.model.max_position_embeddings
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == limit
    assert http.get("/v1/models/tiny-gqa-moge").json()["max_model_len"] == limit
    assert client.models.retrieve("tiny-gqa-moge").model_extra["max_model_len"] == limit


def test_tokenize_detokenize_round_trip(server, http, reference):
    tok = reference[1]
    text = "Mixture of experts é <|end|>"
    # lm-eval's remote tokenizer sends no model
    out = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert out["tokens"] == tok.encode(text) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == server.manifest.model.max_position_embeddings
    assert out["token_strs"] == [tok.hf.id_to_token(i) for i in out["tokens"]]
    back = http.post("/detokenize", json={"model": "tiny-gqa-moge", "tokens": out["tokens"]}).json()
    assert back == {"prompt": text}
    assert "token_strs" not in http.post("/tokenize", json={"model": "tiny-gqa-moge", "prompt": "x"}).json()
    _error(http.post("/tokenize", json={"model": "gpt-9", "prompt": "x"}), 404, "model")
    _error(http.post("/tokenize", json={"prompt": "x", "frobnicate": 1}), 400, "frobnicate")
    _error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens.0")
    _error(httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}), 401)


def test_tokenize_messages_applies_the_chat_template(http, reference):
    messages = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Name an expert."}]
    out = http.post("/tokenize", json={"model": "tiny-gqa-moge", "messages": messages}).json()
    as_system = [{"role": "system", "content": "Be terse."}, messages[1]]
    assert out["tokens"] == _chat_ids(reference, as_system)  # what a chat completion is prompted with
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == out["tokens"][:-2]  # without "<|assistant|>\n"


def test_tokenizer_info_is_what_lm_eval_reads(server, http, reference):
    import jinja2

    info = http.get("/tokenizer_info").json()
    tok = reference[1]
    assert info["eos_token"] == "<|eos|>" and info["bos_token"] == "<|bos|>" and info["pad_token"] == "<|pad|>"
    assert info["name_or_path"] == "tiny-gqa-moge" and info["tokenizer_class"]
    assert info["model_max_length"] == server.manifest.model.max_position_embeddings
    eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [tok.eos_token_id]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=messages,
                                                                              add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(messages)
    _error(httpx.get(f"{server.url}/tokenizer_info"), 401)


def test_developer_role_is_the_system_role(client, reference):
    def reply(role):
        return client.chat.completions.create(model="tiny-gqa-moge", max_tokens=5, temperature=0, messages=[
            {"role": role, "content": "You are terse."}, {"role": "user", "content": "Name an expert."}])

    text, _, _ = _expect(reference, _chat_ids(reference, [{"role": "system", "content": "You are terse."},
                                                          {"role": "user", "content": "Name an expert."}]), 5)
    assert reply("developer").choices[0].message.content == reply("system").choices[0].message.content == text


def test_tool_calling_is_refused_unless_tool_choice_none(http):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    base = {"model": "tiny-gqa-moge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    err = _error(http.post("/v1/chat/completions", json=base | {"tools": tools}), 400, "tools")
    assert "tool calling is not served" in err["message"]
    _error(http.post("/v1/chat/completions", json=base | {"tool_choice": "required"}), 400, "tool_choice")
    _error(http.post("/v1/chat/completions", json=base | {"functions": [{"name": "f"}]}), 400, "functions")
    ok = http.post("/v1/chat/completions", json=base | {"tools": tools, "tool_choice": "none",
                                                        "parallel_tool_calls": False})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("pd_mode", ["sequential", "parallel"])
def test_debug_stamps_all_ten_stages_in_order(server, http, pd_mode):
    body = {"model": "tiny-gqa-moge", "prompt": PROMPTS[1], "max_tokens": 4, "debug": True}
    _configure(server, pd_mode=pd_mode, paused=True)
    try:
        threads, results = _in_threads([lambda: http.post("/v1/completions", json=body).json()])
        _wait_queue(server, 1)
        time.sleep(0.2)  # held in the master's queue
        _configure(server, paused=False)
        threads[0].join(120)
    finally:
        _configure(server, pd_mode="sequential", paused=False)
    debug = results[0]["debug"]
    assert debug["route"]["mode"] == pd_mode
    stages = debug["stages"]
    assert list(stages) == list(STAGES)  # P/D: every stage stamped, in canonical order
    assert all(gap >= 0 for gap in debug["gaps"].values())  # monotone
    assert debug["gaps"]["queued->prefill_scheduled"] >= 0.2  # stamped where it happened: in the master's queue
    assert debug["route"]["prefill"] in ("prefill0", "prefill1") and debug["route"]["decode"] == "decode0"


# ---- errors: OpenAI's error JSON with the right status -----------------------------------------


def _error(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_unknown_paths_and_methods_answer_openai_errors(http):
    err = _error(http.get("/v1/no-such-endpoint"), 404)
    assert err["message"] == "Invalid URL (GET /v1/no-such-endpoint)"
    resp = http.delete("/v1/completions")
    assert "POST" in resp.headers["allow"] and "DELETE /v1/completions" in _error(resp, 405)["message"]
    assert _error(http.get("/v1/models/other-model"), 404, "model")["code"] == "model_not_found"


def test_missing_or_wrong_api_key_is_401(server):
    body = {"model": "tiny-gqa-moge", "prompt": "x"}
    _error(httpx.post(f"{server.url}/v1/completions", json=body), 401)
    _error(httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    _error(httpx.get(f"{server.url}/v1/models"), 401)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny-gqa-moge", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "tiny-gqa-moge", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny-gqa-moge", "prompt": "x", "max_tokens": 0}, "echo"),  # (0 only with echo: the prompt's logprobs)
    ({"model": "tiny-gqa-moge", "prompt": "x", "n": 17}, "n"),
    ({"model": "tiny-gqa-moge", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "tiny-gqa-moge", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"model": "tiny-gqa-moge"}, "prompt"),
    ({"model": "tiny-gqa-moge", "prompt": [1, 10**9]}, "prompt"),
])
def test_bad_fields_are_400_naming_the_field(http, body, param):
    _error(http.post("/v1/completions", json=body), 400, param)


def test_bad_chat_messages_are_400(http):
    _error(http.post("/v1/chat/completions", json={"model": "tiny-gqa-moge", "messages": []}), 400, "messages")
    _error(http.post("/v1/chat/completions", json={"model": "tiny-gqa-moge",
                                                   "messages": [{"role": "wizard", "content": "hi"}]}), 400)


def test_malformed_json_is_400(http):
    resp = http.post("/v1/completions", content=b'{"model": "tiny-gqa-moge", "prompt": ',
                     headers={"Content-Type": "application/json"})
    assert "JSON" in _error(resp, 400)["message"]


def test_unknown_model_is_404(http):
    assert _error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model")["code"] \
        == "model_not_found"


def test_prompt_over_the_context_is_400(http, server):
    limit = server.manifest.model.max_position_embeddings
    err = _error(http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": [5] * limit,
                                                    "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded"


def test_body_too_large_is_413_and_wrong_content_type_415(http):
    _error(http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": "x" * 70_000}), 413)
    _error(http.post("/v1/completions", content=b"prompt=x", headers={"Content-Type": "text/plain"}), 415)


def test_over_capacity_is_429_and_queued_requests_still_finish(server, http, reference):
    _configure(server, paused=True, max_queue=2)
    body = {"model": "tiny-gqa-moge", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    try:
        threads, results = _in_threads([lambda: http.post("/v1/completions", json=body)] * 2)
        _wait_queue(server, 2)
        resp = http.post("/v1/completions", json=body)
        # the master's own words, not the traceback of the remote call it raised in
        assert _error(resp, 429)["message"] == "server overloaded: queue full (2 waiting)"
        assert resp.headers["Retry-After"] == "1"
    finally:
        _configure(server, paused=False, max_queue=server.manifest.proxy.max_queue)
    for t in threads:
        t.join(120)
    text, _, _ = _expect(reference, reference[1].encode(PROMPTS[0]), 5)
    assert [r.json()["choices"][0]["text"] for r in results] == [text, text]


# ---- scheduling features ----------------------------------------------------------------------------


def _dispatch_order(server, http, prompts: list[str]) -> list[int]:
    """Queue the prompts while dispatch is paused (in this order), resume, and
    return the prompt token counts in the order the master dispatched them."""
    before = len(ray.get(server.master.snapshot.remote())["recent_dispatches"])
    _configure(server, paused=True)
    try:
        threads = []
        for i, p in enumerate(prompts):
            t, _ = _in_threads([lambda p=p: http.post("/v1/completions", json={
                "model": "tiny-gqa-moge", "prompt": p, "max_tokens": 1})])
            threads += t
            _wait_queue(server, i + 1)
    finally:
        _configure(server, paused=False)
    for t in threads:
        t.join(120)
    log = ray.get(server.master.snapshot.remote())["recent_dispatches"]
    return [d["prompt_tokens"] for d in log[before:]]


def test_weighted_sorting_dispatches_short_prompts_first(server, http):
    longs = [f"{i} " + "mixture of experts " * 12 for i in range(2)]
    shorts = [f"hi {i}" for i in range(2)]
    order = _dispatch_order(server, http, longs + shorts)
    assert max(order[:2]) < min(order[2:])  # the shorts overtook the longs queued before them
    _configure(server, weighted_sorting=False)
    try:
        fifo = _dispatch_order(server, http, longs + shorts)
    finally:
        _configure(server, weighted_sorting=True)
    assert min(fifo[:2]) > max(fifo[2:])  # switched off: first come, first served


def test_omni_routing_follows_the_cached_prefix(server, http):
    prefix = "Omni placement balances the experts across every NPU of the instance. " * 2

    matched, cached = [], []

    def route(suffix: str) -> str:
        body = http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": prefix + suffix,
                                                  "max_tokens": 1, "debug": True}).json()
        matched.append(body["debug"]["route"]["local_blocks"])
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])  # as OpenAI reports it
        return body["debug"]["route"]["prefill"]

    holder = route("first")
    assert [route(f"again {i}") for i in range(4)] == [holder] * 4
    assert matched[0] == 0 and min(matched[1:]) >= 2  # the master matched the prompt's blocks on the holder
    assert cached[0] == 0 and min(cached[1:]) >= 2 * server.manifest.engine.block_size  # and the engine used them
    _configure(server, policy="round_robin")
    try:
        assert len({route(f"rr {i}") for i in range(4)}) == 2  # the baseline ignores the prefix
    finally:
        _configure(server, policy="omni")


def test_tokenizer_runs_once_per_distinct_text(http):
    def stats():
        return http.get("/v1/cluster").json()["tokenizer"]

    before = stats()
    for _ in range(3):
        http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": "a text seen three times",
                                           "max_tokens": 1})
    after = stats()
    assert after["tokenizer_calls"] - before["tokenizer_calls"] == 1
    assert after["tokenizer_cache_hits"] - before["tokenizer_cache_hits"] == 2
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"}]
    http.post("/v1/chat/completions", json={"model": "tiny-gqa-moge", "messages": turn1, "max_tokens": 1})
    mid = stats()
    turn2 = turn1 + [{"role": "assistant", "content": "an answer"}, {"role": "user", "content": "second question"}]
    http.post("/v1/chat/completions", json={"model": "tiny-gqa-moge", "messages": turn2, "max_tokens": 1})
    end = stats()
    assert end["tokenizer_calls"] - mid["tokenizer_calls"] == 2  # only the two new messages


def test_parallel_pd_equals_sequential(server, client, reference):
    def outputs():
        return [client.completions.create(model="tiny-gqa-moge", prompt=p, max_tokens=8, temperature=0)
                .choices[0].text for p in PROMPTS]

    sequential = outputs()
    _configure(server, pd_mode="parallel")
    try:
        parallel = outputs()
    finally:
        _configure(server, pd_mode="sequential")
    assert parallel == sequential == [_expect(reference, reference[1].encode(p), 8)[0] for p in PROMPTS]


def test_master_restart_keeps_serving(server, client, http, reference):
    text, _, _ = _expect(reference, reference[1].encode(PROMPTS[1]), 24)
    first = http.get("/v1/cluster").json()
    stream = client.completions.create(model="tiny-gqa-moge", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                       stream=True)
    got = [next(stream).choices[0].text]  # in flight
    ray.kill(server.master, no_restart=False)
    got += [c.choices[0].text for c in stream]
    assert "".join(got) == text  # the request in flight finished
    r = client.completions.create(model="tiny-gqa-moge", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    assert r.choices[0].text == text  # a new one is scheduled by the new master
    deadline = time.monotonic() + 30
    while (now := http.get("/v1/cluster").json())["started"] == first["started"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    held = sum(i["cached_prefix_blocks"] for i in now["instances"])
    assert held > 0  # the prefix view was rebuilt from the instances


# ---- gRPC ingress (Ray Serve's gRPC proxy) ------------------------------------------------------


# ---- the OpenAI / vLLM sampling API real clients use ---------------------------------------


def _ref_tokens(reference, ids, max_tokens, **params):
    model, tok = reference
    return generate(model, [ids], max_tokens, params=SamplingParams(**params), eos_token_id=tok.eos_token_id)


def test_n_choices_are_seeded_draws_that_equal_the_reference(client, reference):
    """n = 3 through P/D: one prefill samples every choice's first token, the decode
    instance forks the choices on the prompt's KV; choice j draws with seed + j."""
    tok = reference[1]
    ids = tok.encode(PROMPTS[1])
    r = client.completions.create(model="tiny-gqa-moge", prompt=PROMPTS[1], max_tokens=8, temperature=0.9, seed=5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    want = [_ref_tokens(reference, ids, 8, temperature=0.9, seed=5 + j).tokens[0] for j in range(3)]
    assert [c.text for c in r.choices] == [tok.decode(t) for t in want]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == sum(len(t) for t in want)


def test_a_list_of_prompts_answers_each_in_order(client, reference):
    """lm-eval's batches: a list of token lists (or strings), n choices each, choice i * n + j."""
    tok = reference[1]
    ids = [tok.encode(p) for p in PROMPTS]
    r = client.completions.create(model="tiny-gqa-moge", prompt=ids, max_tokens=5, temperature=0, n=2)
    want = [_expect(reference, p, 5)[0] for p in ids]
    assert [(c.index, c.text) for c in r.choices] == [(0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])]
    assert r.usage.prompt_tokens == sum(len(p) for p in ids)


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_echo_with_logprobs_gives_the_reference_prompt_logprobs(http, reference, max_tokens):
    """lm-eval's loglikelihood request: the prompt's logprobs come from the prefill's
    forward and equal the reference's; sent twice, the second time the prefix is
    cached, and they still do. max_tokens 0 answers the prompt alone."""
    model, tok = reference
    ids = tok.encode(PROMPTS[0] + " and the routers of a layer")
    want = generate(model, [ids], 1, params=SamplingParams(prompt_logprobs=1, logprobs=1))
    body = {"model": "tiny-gqa-moge", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0, "seed": 1234}
    for _ in range(2):
        resp = http.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        lps = choice["logprobs"]
        assert len(lps["tokens"]) == len(ids) + max_tokens and lps["token_logprobs"][0] is None
        for got, ref in zip(lps["token_logprobs"][1:len(ids)], want.prompt_logprobs[0][1:]):
            assert abs(got - ref.logprob) < 1e-9
        assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=False))
        assert all(len(top) >= 1 for top in lps["top_logprobs"][1:])
        assert resp.json()["usage"]["completion_tokens"] == max_tokens
    if max_tokens:
        assert abs(lps["token_logprobs"][-1] - want.logprobs[0][0].logprob) < 1e-9


def test_chat_logprobs_stream_and_not(client, reference):
    messages = [{"role": "user", "content": "Name a color."}]
    ids = _chat_ids(reference, messages)
    want = _ref_tokens(reference, ids, 4, logprobs=2).logprobs[0]
    r = client.chat.completions.create(model="tiny-gqa-moge", messages=messages, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [abs(c.logprob - w.logprob) < 1e-9 for c, w in zip(content, want)] == [True] * len(want)
    assert all(len(c.top_logprobs) == 2 for c in content)
    chunks = list(client.chat.completions.create(model="tiny-gqa-moge", messages=messages, max_tokens=4,
                                                 temperature=0, logprobs=True, stream=True))
    streamed = [c for ch in chunks for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
    assert [c.logprob for c in streamed] == [c.logprob for c in content]


def test_penalties_bias_and_min_tokens_follow_the_reference(http, reference):
    model, tok = reference
    ids = tok.encode(PROMPTS[1])
    opts = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}
    r = http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": ids, "max_tokens": 12,
                                           "temperature": 0, **opts}).json()
    want = _ref_tokens(reference, ids, 12, **opts).tokens[0]
    assert r["choices"][0]["text"] == tok.decode(want)
    assert want != _ref_tokens(reference, ids, 12).tokens[0]  # the penalties changed the answer
    eos = {"logit_bias": {str(tok.eos_token_id): 100}}  # EOS at once, unless min_tokens holds it off
    body = {"model": "tiny-gqa-moge", "prompt": ids, "max_tokens": 10, "temperature": 0}
    first = http.post("/v1/completions", json=body | eos).json()
    held = http.post("/v1/completions", json=body | eos | {"min_tokens": 3}).json()
    assert first["usage"]["completion_tokens"] == 1 and first["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop"


def test_json_schema_output_parses_and_validates(client):
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "color", "n"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny-gqa-moge", messages=[{"role": "user", "content": "a JSON please"}], max_tokens=60, temperature=1,
        seed=3, n=2, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "stop"
    r = client.chat.completions.create(model="tiny-gqa-moge", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=1, response_format={"type": "json_object"})
    assert r.choices[0].message.content in ("{", "")  # (one token: the object opens)


def test_bad_json_schema_is_400_naming_response_format(http):
    resp = http.post("/v1/chat/completions", json={
        "model": "tiny-gqa-moge", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format"


@pytest.fixture(scope="module")
def grpc_stub(server):
    import grpc

    from cluster.proxy.omniray_pb2_grpc import OmniRayStub

    with grpc.insecure_channel(server.grpc_address) as channel:
        yield OmniRayStub(channel)


GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)


def test_grpc_generate_streams_the_reference_text(grpc_stub, reference):
    from cluster.proxy import omniray_pb2 as pb

    text, n, finish = _expect(reference, reference[1].encode(PROMPTS[0]), 10)
    chunks = list(grpc_stub.Generate(pb.GenerateRequest(model="tiny-gqa-moge", prompt=PROMPTS[0], max_tokens=10,
                                                        temperature=0), metadata=GRPC_AUTH))
    assert "".join(c.text for c in chunks) == text
    assert chunks[-1].finish_reason == finish and chunks[-1].completion_tokens == n
    assert all(not c.finish_reason for c in chunks[:-1])
    messages = [{"role": "user", "content": "Name an expert."}]
    chat_text, _, _ = _expect(reference, _chat_ids(reference, messages), 6)
    chat = grpc_stub.Generate(pb.GenerateRequest(model="tiny-gqa-moge", messages=[pb.ChatMessage(**messages[0])],
                                                 max_tokens=6, temperature=0), metadata=GRPC_AUTH)
    assert "".join(c.text for c in chat) == chat_text
    assert list(grpc_stub.ListModels(pb.ListModelsRequest(), metadata=GRPC_AUTH).models) == ["tiny-gqa-moge"]


@pytest.mark.parametrize(("fields", "auth", "code"), [
    ({"model": "gpt-9", "prompt": "x"}, True, "NOT_FOUND"),
    ({"model": "tiny-gqa-moge", "prompt": "x"}, False, "UNAUTHENTICATED"),
    ({"model": "tiny-gqa-moge", "prompt": "x", "temperature": 7.0}, True, "INVALID_ARGUMENT"),
    ({"model": "tiny-gqa-moge"}, True, "INVALID_ARGUMENT"),
])
def test_grpc_errors_have_status_codes(grpc_stub, fields, auth, code):
    import grpc

    from cluster.proxy import omniray_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        list(grpc_stub.Generate(pb.GenerateRequest(**fields), metadata=GRPC_AUTH if auth else ()))
    assert info.value.code().name == code and info.value.details(), info.value.details()



# ---- hardening: body and message limits, the key before the message, timeouts, fuzz -----

FUZZ_SEED = 20261207  # the payloads are drawn from it: a failure names a payload that reproduces
# how many payloads a run sends; a longer fuzz: OMNIRAY_FUZZ_HTTP=5000 OMNIRAY_FUZZ_GRPC=1000 pytest -k fuzzed
FUZZ_HTTP = int(os.environ.get("OMNIRAY_FUZZ_HTTP", 1000))
FUZZ_GRPC = int(os.environ.get("OMNIRAY_FUZZ_GRPC", 200))


def test_chunked_body_is_counted_as_it_arrives(server):
    """No Content-Length to check first: the slave counts the chunks and cuts at the limit."""
    limit = server.manifest.proxy.max_body_bytes
    headers = {**AUTH, "Content-Type": "application/json"}

    def chunks(prompt: str, size: int):
        text = json.dumps({"model": "tiny-gqa-moge", "max_tokens": 2, "prompt": prompt}).encode()
        yield from (text[i:i + size] for i in range(0, len(text), size))

    resp = httpx.post(f"{server.url}/v1/completions", content=chunks("a" * (limit + 8192), 4096), headers=headers,
                      timeout=60)
    assert resp.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in resp.request.headers
    assert "proxy.max_body_bytes" in _error(resp, 413)["message"]
    ok = httpx.post(f"{server.url}/v1/completions", content=chunks(PROMPTS[0], 7), headers=headers, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text


def test_generation_past_request_timeout_s_is_504_and_frees_the_request():
    """The slave's deadline (unit level: a pipeline that never finishes); end to end:
    tests/test_faults.py. The default bounds every request."""
    import asyncio
    from types import SimpleNamespace

    from cluster.config import ProxySettings
    from cluster.proxy.app import OmniProxySlave
    from cluster.proxy.protocol import APIError

    assert ProxySettings().request_timeout_s == 600.0
    freed = []

    class StuckPipeline:
        async def run(self, *_args):
            try:
                yield "first"
                await asyncio.sleep(60)
            finally:  # the real pipeline's cleanup: queue entry and KV freed
                freed.append(True)

    slave = SimpleNamespace(settings=ProxySettings(request_timeout_s=0.05), pipeline=StuckPipeline(),
                            _ensure_poller=lambda: None)

    async def consume():
        return [d async for d in OmniProxySlave.func_or_class._generate(slave, [1], {}, [], None)]

    start = time.monotonic()
    with pytest.raises(APIError) as info:
        asyncio.run(consume())
    assert info.value.status == 504 and info.value.code == "request_timeout" and time.monotonic() - start < 5
    assert freed == [True]


def _raw_grpc(server, method: str):
    """A call that sends bytes as they are (no serializer): malformed messages too."""
    import grpc

    channel = grpc.insecure_channel(server.grpc_address)
    call = channel.unary_stream if method == "Generate" else channel.unary_unary
    return channel, call(f"/omniray.OmniRay/{method}")


def test_grpc_message_over_max_body_bytes_is_refused_and_serving_goes_on(grpc_stub, server, reference):
    import grpc

    from cluster.proxy import omniray_pb2 as pb

    big = pb.GenerateRequest(model="tiny-gqa-moge", prompt="x" * (server.manifest.proxy.max_body_bytes + 1))
    with pytest.raises(grpc.RpcError) as info:
        list(grpc_stub.Generate(big, metadata=GRPC_AUTH))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_body_bytes" in info.value.details()
    text, _, _ = _expect(reference, reference[1].encode(PROMPTS[0]), 4)
    chunks = grpc_stub.Generate(pb.GenerateRequest(model="tiny-gqa-moge", prompt=PROMPTS[0], max_tokens=4,
                                                   temperature=0), metadata=GRPC_AUTH)
    assert "".join(c.text for c in chunks) == text


@pytest.mark.parametrize("method", ["Generate", "ListModels"])
def test_grpc_key_is_checked_before_the_message_is_parsed(server, method):
    import grpc

    channel, call = _raw_grpc(server, method)
    with channel:
        for metadata in [(), (("authorization", "Bearer nope"),)]:
            with pytest.raises(grpc.RpcError) as info:
                result = call(b"\xff\xff\xff\xff", metadata=metadata, timeout=60)
                list(result) if method == "Generate" else result
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # with the key: now the message is read, and refused
            result = call(b"\xff\xff\xff\xff", metadata=GRPC_AUTH, timeout=60)
            list(result) if method == "Generate" else result
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


def test_fuzzed_http_requests_get_4xx_never_5xx(server, client, reference):
    from concurrent.futures import ThreadPoolExecutor

    from fuzz_payloads import http_payloads

    payloads = http_payloads(FUZZ_SEED, FUZZ_HTTP)
    with httpx.Client(base_url=server.url, timeout=60) as c, ThreadPoolExecutor(8) as pool:
        def send(p):
            headers = dict(AUTH, **({"Content-Type": p.content_type} if p.content_type is not None else {}))
            return c.post(p.path, content=p.body, headers=headers).status_code

        statuses = list(pool.map(send, payloads))
    # a body the request model refuses must be a 4xx; one it accepts may still be refused (vocabulary, context)
    wrong = [(s, p) for s, p in zip(statuses, payloads) if s >= 500 or not (p.valid_locally or 400 <= s < 500)]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
    assert sum(400 <= s < 500 for s in statuses) >= 0.8 * FUZZ_HTTP
    text, _, _ = _expect(reference, reference[1].encode(PROMPTS[0]), 6)
    assert client.completions.create(model="tiny-gqa-moge", prompt=PROMPTS[0], max_tokens=6,
                                     temperature=0).choices[0].text == text


def test_fuzzed_grpc_messages_never_get_internal_or_unknown(server, grpc_stub, reference):
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from cluster.proxy import omniray_pb2 as pb
    from fuzz_payloads import grpc_payloads

    payloads = grpc_payloads(FUZZ_SEED, FUZZ_GRPC)
    channel, call = _raw_grpc(server, "Generate")

    def send(raw: bytes):
        try:
            list(call(raw, metadata=GRPC_AUTH, timeout=60))
        except grpc.RpcError as err:
            return err.code(), err.details()
        return grpc.StatusCode.OK, ""

    with channel, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, payloads))
    wrong = [(code, details, raw) for (code, details), raw in zip(answers, payloads)
             if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
    assert sum(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in answers) >= 0.5 * FUZZ_GRPC
    text, _, _ = _expect(reference, reference[1].encode(PROMPTS[0]), 4)
    chunks = grpc_stub.Generate(pb.GenerateRequest(model="tiny-gqa-moge", prompt=PROMPTS[0], max_tokens=4,
                                                   temperature=0), metadata=GRPC_AUTH)
    assert "".join(c.text for c in chunks) == text


def test_status_renders_the_cluster_view(server):
    from cluster.cli import main

    assert main(["status", "--url", server.url, "--api-key", KEY, "--once"]) == 0
    assert main(["status", "--url", server.url, "--once"]) == 2  # 401 without the key: a clear error


def test_prometheus_endpoint_exports_omniray_metrics(server):
    """After the requests above, Ray's metrics agent serves the omniray_ metrics
    (Ray prefixes them with ray_) with non-zero values."""
    import re

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("ray_omniray_requests_total", "ray_omniray_ttft_seconds_count", "ray_omniray_request_stage_seconds_count",
              "ray_omniray_npu_hbm_used_bytes", "ray_omniray_dispatched_total", "ray_omniray_instance_free_kv_blocks",
              "ray_omniray_instance_npus")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        values = {}
        for name in wanted:
            found = [float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)]
            values[name] = max(found, default=0.0)
        if all(v > 0 for v in values.values()):
            return
        time.sleep(2)
    pytest.fail(f"not exported with a value > 0: {[n for n in wanted if values.get(n, 0) <= 0]}")


def test_no_healthy_decode_instance_is_503_last(server, http):
    """Runs last in this module: it kills the decode engine."""
    from cluster.launcher import engine_name

    ray.kill(ray.get_actor(engine_name("decode0")))
    deadline = time.monotonic() + 30
    while any(i["healthy"] for i in ray.get(server.master.snapshot.remote())["instances"] if i["name"] == "decode0"):
        assert time.monotonic() < deadline, "the master never noticed the dead engine"
        time.sleep(0.1)
    resp = http.post("/v1/completions", json={"model": "tiny-gqa-moge", "prompt": PROMPTS[0], "max_tokens": 4})
    err = _error(resp, 503)
    assert err["type"] == "service_unavailable"
    assert err["message"] == "no capacity: no healthy decode instance"  # not the remote call's traceback
    assert int(resp.headers["Retry-After"]) > 0
