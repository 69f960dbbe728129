"""The load generator of `omniray bench serve`: sends a workload to any
OpenAI-compatible /v1/completions endpoint (OmniRay, vLLM, SGLang) and times
every request from the client's side.

Each request streams (`stream: true`, usage in the last chunk) with a token-id
prompt (or, with `detokenize`, its text, so that the server's tokenizer works), `ignore_eos` so that the output length is the workload's, and greedy
decoding. Per request: TTFT (send -> first chunk with text), the gaps between
later text chunks (ITL), TPOT ((e2e - TTFT) / (output tokens - 1)), end to end,
token counts from the server's usage, and the error if any. Arrivals follow the
workload's `arrival_s` (trace replay), a seeded Poisson process (`qps`), or as
fast as `concurrency` allows; `concurrency` always caps requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from cluster.bench.workloads import WorkItem


@dataclass
class RequestResult:
    index: int
    group: str
    start_s: float  # send time, from the run's start
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class LoadConfig:
    url: str  # base URL of the server, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str | None = None  # None: the first model /v1/models lists
    concurrency: int = 16
    qps: float | None = None  # Poisson arrivals at this rate (ignored if the workload has arrival times)
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    detokenize: Callable[[list[int]], str] | None = None  # set: prompts go as text (the server tokenizes)
    chat: bool = False  # items with messages go to /v1/chat/completions as text messages (needs detokenize)

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


def _arrivals(items: list[WorkItem], qps: float | None, seed: int) -> list[float]:
    if any(it.arrival_s > 0 for it in items):
        return [it.arrival_s for it in items]
    if not qps:
        return [0.0] * len(items)
    rng, t, out = random.Random(seed), 0.0, []
    for _ in items:
        out.append(t)
        t += rng.expovariate(qps)
    return out


async def _one(client: httpx.AsyncClient, cfg: LoadConfig, model: str, index: int, item: WorkItem,
               t0: float) -> RequestResult:
    body = {"model": model, "max_tokens": item.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    path = "/v1/completions"
    if cfg.chat and item.messages and cfg.detokenize:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": role, "content": cfg.detokenize(list(ids))} for role, ids in item.messages]
    else:
        body["prompt"] = cfg.detokenize(item.prompt_ids) if cfg.detokenize else item.prompt_ids
    start = time.perf_counter()
    res = RequestResult(index, item.group, start - t0, len(item.prompt_ids), 0, None, None, None)
    last = None
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                if any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        res.error = f"{type(err).__name__}: {err}"
        return res
    res.e2e_s = time.perf_counter() - start
    if res.ttft_s is None:
        res.error = "no tokens streamed"
    elif res.output_tokens > 1:
        res.tpot_s = (res.e2e_s - res.ttft_s) / (res.output_tokens - 1)
    return res


async def _resolve_model(client: httpx.AsyncClient, model: str | None) -> str:
    if model:
        return model
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_load(items: list[WorkItem], cfg: LoadConfig,
                   on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send every item; return the results in workload order and the run's wall time."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.base, headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        model = await _resolve_model(client, cfg.model)
        gate = asyncio.Semaphore(cfg.concurrency)
        arrivals = _arrivals(items, cfg.qps, cfg.seed)
        t0 = time.perf_counter()

        async def send(i: int, item: WorkItem) -> RequestResult:
            delay = arrivals[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                res = await _one(client, cfg, model, i, item, t0)
            if on_done is not None:
                on_done(res)
            return res

        results = await asyncio.gather(*(send(i, it) for i, it in enumerate(items)))
        return list(results), time.perf_counter() - t0


async def run_closed_loop(items: list[WorkItem], cfg: LoadConfig, stop: Callable[[], bool],
                          started: Callable[[float], None] | None = None) -> list[RequestResult]:
    """Keep `concurrency` requests in flight, cycling through `items`, until stop()
    says so; then let the ones in flight finish. `started(t0)` gets the run's clock
    origin (time.perf_counter()), to which every result's start_s is relative."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.base, headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        model = await _resolve_model(client, cfg.model)
        return await closed_loop(lambda i, item, t0: _one(client, cfg, model, i, item, t0),
                                 items, cfg.concurrency, stop, started)


class BackgroundLoad:
    """run_closed_loop on a thread of its own (its own event loop) while the caller
    does something else (kills actors, samples memory): `t0` is the run's clock
    origin once it started, `results` its results once the block is left."""

    def __init__(self, items: list[WorkItem], cfg: LoadConfig):
        self.items, self.cfg = items, cfg
        self.t0: float | None = None
        self.results: list[RequestResult] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        def started(t0: float) -> None:
            self.t0 = t0
            self._started.set()

        try:
            self.results = asyncio.run(run_closed_loop(self.items, self.cfg, self._stop.is_set, started))
        except BaseException as err:  # noqa: BLE001 (raised in the caller's thread)
            self.error = err
        finally:
            self._started.set()  # (it failed before starting: do not leave the caller waiting)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        self._started.wait()
        if self.t0 is None:
            self._thread.join()
            raise RuntimeError(f"the load generator failed to start: {self.error!r}") from self.error
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


async def closed_loop(send: Callable[[int, WorkItem, float], Awaitable[RequestResult]], items: list[WorkItem],
                      concurrency: int, stop: Callable[[], bool],
                      started: Callable[[float], None] | None = None) -> list[RequestResult]:
    """run_closed_loop over any transport: `send(i, item, t0)` runs one request."""
    t0 = time.perf_counter()
    if started is not None:
        started(t0)
    results: list[RequestResult] = []
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while not stop():
            i = next(counter)
            results.append(await send(i, items[i % len(items)], t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(results, key=lambda r: r.index)


def token_times(res: RequestResult) -> list[float]:
    """When each output token reached the client, from the run's start: the
    streamed chunks' times, a chunk's tokens spread evenly over it."""
    if res.ttft_s is None:
        return []
    chunks = [res.start_s + res.ttft_s]
    for gap in res.itl_s:
        chunks.append(chunks[-1] + gap)
    per = res.output_tokens / len(chunks) if res.output_tokens else 1.0
    return [t for t in chunks for _ in range(max(1, round(per)))]


async def cluster_stats(cfg: LoadConfig, newer_than: float | None = None, wait_s: float = 15.0) -> dict | None:
    """OmniRay's /v1/cluster (None from servers without it). Waits, up to `wait_s`,
    while it answers 503 (a fresh server's master has not published its state yet)
    and, with `newer_than` (wall clock), for a state the master published after
    then: a snapshot taken right after a run can predate its last requests. None
    if no such state came in time: counters read off an older one would be wrong."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    deadline = time.monotonic() + wait_s
    try:
        async with httpx.AsyncClient(base_url=cfg.base, headers=headers, timeout=30) as client:
            while True:
                resp = await client.get("/v1/cluster")
                snap = resp.json() if resp.status_code == 200 else None
                fresh = snap is not None and (newer_than is None or snap.get("time", newer_than) >= newer_than)
                if fresh or resp.status_code not in (200, 503):
                    return snap
                if time.monotonic() > deadline:
                    return None
                await asyncio.sleep(0.2)
    except httpx.HTTPError:
        return None

