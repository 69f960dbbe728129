"""OmniMaster: the Omni Proxy master — one actor holding the global state and
making every scheduling decision.

Slaves (the Serve ingress replicas) hand it a request summary (token count,
block hashes) and await a Decision. The master keeps the waiting queue in
weighted order (cluster.proxy.sorting), and a dispatch loop assigns queued
requests to prefill (or mixed) instances with the routing policy
(cluster.proxy.routing) while they have room; for P/D the decode instance is
chosen when the prefill is done (sequential) or at dispatch (parallel).
Instance load comes from the engines' own stats, refreshed in the background,
plus what the master dispatched since. Its view of each instance's cached
prefix blocks is built from what it routed there (the hashes of those
prompts). Everything is rebuilt from the instances if the master restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

import ray

from cluster.metrics import MasterMetrics
from cluster.proxy.routing import InstanceView, make_policy, prefix_depth
from cluster.proxy.sorting import QueuedRequest, SortingConfig, WeightedSorter

logger = logging.getLogger(__name__)

MASTER_NAME = "omniray_master"
DISPATCH_LOG_LEN = 256  # decisions kept for the cluster view
LATENCY_WINDOW = 256  # recent requests' TTFT/TPOT kept for the autoscaler's SLO attainment
CACHED_HASHES_PER_INSTANCE = 65_536  # bound on the master's prefix view of one instance
FINISHED_KEPT_PER_INSTANCE = 1024  # finished requests remembered across one cache sync
# refreshes in a row an engine may leave unanswered (slow, not dead: a busy host) before
# it leaves routing; one that died leaves at once (Ray Serve's health checks likewise
# count failures before they call a replica unhealthy)
UNANSWERED_REFRESHES_UNHEALTHY = 3
REFRESH_TIMEOUT_S = 2.0  # how long a refresh waits for each engine's answer
# published snapshots the master keeps owning after newer ones: a slave handed a ref
# fetches it after the master may have published again, and a ref its owner drops
# while a borrower fetches it can leave that fetch hanging (seen about 1 in 50 first
# reads on 2 cores); 8 x 0.1 s outlives any fetch
PUBLISHED_KEPT = 8


class NoInstanceAvailable(RuntimeError):
    """No healthy instance can take the request's role now (the slave answers 503)."""


@dataclass
class InstanceRef:
    """What the master knows of an instance: its engine and its load."""

    name: str
    role: str
    engine: object  # InstanceEngine actor handle
    max_num_seqs: int
    view: InstanceView = None
    inflight: int = 0  # dispatched by the master, not yet finished
    inflight_tokens: int = 0
    cached: dict = field(default_factory=dict)  # hash -> None, insertion-ordered (LRU-ish)
    failed: bool = False  # a slave saw it fail a request: out of routing until rebuilt
    draining: bool = False  # being removed: no new requests, the running ones finish
    stats: dict = field(default_factory=dict)  # the engine's last stats()
    npus: list = field(default_factory=list)  # its NPUs' last stats()
    # (finish time, block hashes) of requests routed here that finished lately: a cache
    # sync asked before they finished must not drop their blocks from the view
    finished_recently: deque = field(default_factory=lambda: deque(maxlen=FINISHED_KEPT_PER_INSTANCE))
    unanswered: int = 0  # refreshes in a row its engine did not answer in time

    def __post_init__(self):
        self.view = InstanceView(self.name, self.role, max_num_seqs=self.max_num_seqs)

    @property
    def load(self) -> int:
        """Requests on the instance: the engine's last count, or what the master sent since, if more."""
        return max(self.view.running + self.view.waiting, self.inflight)

    def refresh_view(self) -> InstanceView:
        v = self.view
        return InstanceView(
            self.name, self.role, running=self.load, waiting=v.waiting, queued_tokens=self.inflight_tokens,
            free_blocks=v.free_blocks, total_blocks=v.total_blocks, max_num_seqs=self.max_num_seqs,
            healthy=v.healthy, cached=self.cached.keys(),
        )


@dataclass
class Decision:
    prefill: str | None  # instance name (None for a mixed instance doing everything)
    prefill_engine: object | None
    decode: str | None
    decode_engine: object | None
    mode: str  # "mixed" | "sequential" | "parallel"
    queued_s: float = 0.0
    local_blocks: int = 0  # prompt blocks cached on the chosen instance (the master's view)
    global_blocks: int = 0  # prompt blocks in the global KV cache


class OmniMaster:
    def __init__(self, instances: list[tuple[str, str, int]], policy: str = "omni", pd_mode: str = "sequential",
                 sorting: SortingConfig | None = None, block_size: int = 16, max_queue: int = 4096,
                 publish_period_s: float = 0.1):
        from cluster.launcher import engine_name

        self.instances = {
            name: InstanceRef(name, role, ray.get_actor(engine_name(name)), seqs)
            for name, role, seqs in _current_membership(instances)
        }
        self.policy = make_policy(policy)
        self.policy_name = policy
        self.pd_mode = pd_mode
        self.sorter = WeightedSorter(sorting or SortingConfig())
        self.block_size, self.max_queue = block_size, max_queue
        self.queue: dict[str, tuple[QueuedRequest, asyncio.Future]] = {}
        # request -> (prefill, decode, tokens, block hashes)
        self.assigned: dict[str, tuple[str | None, str | None, int, list[int]]] = {}
        self.counters = {"dispatched": 0, "finished": 0, "rejected": 0}
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self.publish_period_s = publish_period_s
        self._published: deque[ray.ObjectRef] = deque(maxlen=PUBLISHED_KEPT)  # newest last
        self.started = time.time()
        self.metrics: MasterMetrics | None = None  # made in the actor, on start
        self.global_index: set[int] = set()  # mirror of the global KV cache's block hashes
        self.paused = False  # dispatch held (maintenance, resizing); requests queue up meanwhile
        self.dispatch_log: deque[dict] = deque(maxlen=DISPATCH_LOG_LEN)  # the latest decisions, for /v1/cluster
        self.latencies: deque[tuple[float, float | None]] = deque(maxlen=LATENCY_WINDOW)  # (ttft, tpot) of recent requests
        self.refresh_timeout_s = REFRESH_TIMEOUT_S

    @property
    def has_pd(self) -> bool:
        roles = {i.role for i in self.instances.values()}
        return "prefill" in roles and "decode" in roles

    # ---- slave-facing --------------------------------------------------------------
    async def schedule(self, request_id: str, prompt_tokens: int, max_tokens: int, block_hashes: list[int]) -> Decision:
        """Queue a request and return where it runs once the dispatcher picks it."""
        self._ensure_tasks()
        if len(self.queue) >= self.max_queue:
            self._reject("queue_full")
            raise OverflowError(f"queue full ({self.max_queue} waiting)")
        if not self._candidates(self._dispatch_roles()):
            self._reject("no_instance")
            raise NoInstanceAvailable(f"no healthy {'/'.join(self._dispatch_roles())} instance")
        req = QueuedRequest(request_id, prompt_tokens, max_tokens, time.monotonic(), list(block_hashes))
        fut = asyncio.get_running_loop().create_future()
        self.queue[request_id] = (req, fut)
        self._wake.set()
        return await fut

    async def schedule_decode(self, request_id: str) -> Decision:
        """Sequential P/D: the prefill is done; choose the decode instance by its load now."""
        prefill, _, tokens, hashes = self.assigned.get(request_id, (None, None, 0, []))
        decode = self._pick_decode(request_id, tokens)
        self.assigned[request_id] = (prefill, decode.name, tokens, hashes)
        self._release(prefill, tokens)
        self._take(decode, tokens)
        return Decision(prefill, None, decode.name, decode.engine, "sequential")

    def finished(self, request_id: str) -> None:
        prefill, decode, tokens, hashes = self.assigned.pop(request_id, (None, None, 0, []))
        holder = self.instances.get(prefill) if prefill else None
        if holder is not None and hashes:
            holder.finished_recently.append((time.monotonic(), hashes))
        self._release(decode or prefill, tokens)
        if self.has_pd and self.pd_mode == "parallel":
            self._release(prefill, tokens)
        self.counters["finished"] += 1

    def report_failure(self, name: str) -> None:
        """A slave saw the instance fail a request: stop routing to it now (its engine
        reports itself unhealthy too; the next refresh keeps it so until rebuilt)."""
        inst = self.instances.get(name)
        if inst is not None:
            inst.view.healthy, inst.failed = False, True
            logger.warning("master: instance %s failed; routing around it", name)

    def observe(self, ttft_s: float, tpot_s: float | None) -> None:
        """A slave's finished request: its TTFT and TPOT (the autoscaler's SLO signal)."""
        self.latencies.append((ttft_s, tpot_s))

    def mark_rebuilt(self, name: str) -> None:
        """The instance was rebuilt on new NPUs: route to it again."""
        inst = self.instances.get(name)
        if inst is not None:
            inst.failed, inst.view.healthy = False, True
            logger.info("master: instance %s rebuilt; routing to it again", name)

    def cancel(self, request_id: str) -> None:
        """A slave gave up on a queued request (client gone, timeout)."""
        entry = self.queue.pop(request_id, None)
        if entry and not entry[1].done():
            entry[1].cancel()

    def _reject(self, reason: str) -> None:
        self.counters["rejected"] += 1
        if self.metrics is not None:
            self.metrics.rejected.inc(1, {"reason": reason})

    # ---- operator-facing ------------------------------------------------------------------
    def configure(self, policy: str | None = None, pd_mode: str | None = None, weighted_sorting: bool | None = None,
                  max_queue: int | None = None, paused: bool | None = None) -> dict:
        """Switch scheduling features while serving (A/B runs, drain before a resize).
        Unpausing dispatches what queued meanwhile. Returns the settings now in force."""
        if policy is not None:
            self.policy, self.policy_name = make_policy(policy), policy
        if pd_mode is not None:
            if pd_mode not in ("sequential", "parallel"):
                raise ValueError(f"pd_mode: {pd_mode!r} is not one of sequential, parallel")
            self.pd_mode = pd_mode
        if weighted_sorting is not None:
            self.sorter = WeightedSorter(replace(self.sorter.config, enabled=weighted_sorting))
        if max_queue is not None:
            if max_queue < 1:
                raise ValueError("max_queue: must be at least 1")
            self.max_queue = max_queue
        if paused is not None:
            self.paused = paused
            if self._wake is not None:
                self._wake.set()
        return self.settings()

    def settings(self) -> dict:
        return {"policy": self.policy_name, "pd_mode": self.pd_mode, "weighted_sorting": self.sorter.config.enabled,
                "max_queue": self.max_queue, "paused": self.paused}

    # ---- membership (ElasticMoE horizontal scaling) -----------------------------------------
    async def add_instance(self, name: str, role: str, max_num_seqs: int) -> None:
        """Route to a newly started instance (its engine is named after it)."""
        from cluster.launcher import engine_name

        self.instances[name] = InstanceRef(name, role, ray.get_actor(engine_name(name)), max_num_seqs)
        await self.refresh(sync_cache=True)
        if self._wake is not None:
            self._wake.set()

    def drain(self, name: str) -> dict:
        """No new requests for `name`; returns what it still has in flight."""
        self.instances[name].draining = True
        return self.in_flight(name)

    def in_flight(self, name: str) -> dict:
        """What `name` still holds: requests the master routed there, the engine's
        running and waiting sequences (as of the last refresh)."""
        inst = self.instances[name]
        return {"inflight": inst.inflight, "running": inst.view.running, "waiting": inst.view.waiting}

    def remove_instance(self, name: str) -> None:
        self.instances.pop(name, None)

    # ---- dispatch -----------------------------------------------------------------------
    def _ensure_tasks(self) -> None:
        if not self._tasks:
            self.metrics = MasterMetrics()
            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._dispatch_loop()), loop.create_task(self._refresh_loop())]

    async def start(self) -> None:
        """Rebuild the view from the instances (load, cached prefixes) and start the
        loops. Called once by whoever starts the master; a restarted master calls it
        on its first request."""
        await self.refresh(sync_cache=True)
        self._ensure_tasks()

    def _candidates(self, roles: tuple[str, ...]) -> list[InstanceRef]:
        return [i for i in self.instances.values() if i.role in roles and i.view.healthy and not i.draining]

    def _has_room(self, inst: InstanceRef) -> bool:
        return inst.load < inst.max_num_seqs * 2  # a little queue at the engine keeps its batches full

    def _take(self, inst: InstanceRef, tokens: int) -> None:
        inst.inflight += 1
        inst.inflight_tokens += tokens

    def _release(self, name: str | None, tokens: int) -> None:
        inst = self.instances.get(name) if name else None
        if inst is not None:
            inst.inflight = max(0, inst.inflight - 1)
            inst.inflight_tokens = max(0, inst.inflight_tokens - tokens)

    def _remember(self, inst: InstanceRef, hashes: list[int]) -> None:
        for h in hashes:
            inst.cached.pop(h, None)
            inst.cached[h] = None
        while len(inst.cached) > CACHED_HASHES_PER_INSTANCE:
            inst.cached.pop(next(iter(inst.cached)))

    def _dispatch_roles(self) -> tuple[str, ...]:
        return ("prefill",) if self.has_pd else ("mixed", "prefill", "decode")

    def _pick_decode(self, request_id: str, tokens: int) -> InstanceRef:
        decodes = self._candidates(("decode",))
        if not decodes:
            raise NoInstanceAvailable("no healthy decode instance")
        req = QueuedRequest(request_id, tokens, 0, time.monotonic())
        view = self.policy.choose_decode(req, [d.refresh_view() for d in decodes]) if hasattr(self.policy, "choose_decode") \
            else min((d.refresh_view() for d in decodes), key=lambda v: (v.running, -v.free_blocks, v.name))
        return self.instances[view.name]

    def _dispatch_once(self) -> bool:
        """Assign queued requests in weighted order while instances have room."""
        if self.paused:
            return False
        roles = self._dispatch_roles()
        progressed = False
        for req in self.sorter.prefill_order([r for r, _ in self.queue.values()], time.monotonic()):
            room = [i for i in self._candidates(roles) if self._has_room(i)]
            if not room:
                break
            req.global_depth = prefix_depth(req.block_hashes, self.global_index)
            view = self.policy.choose(req, [i.refresh_view() for i in room], self.block_size)
            inst = self.instances[view.name]
            local_depth = view.match_depth(req.block_hashes)
            _, fut = self.queue.pop(req.request_id)
            tokens = req.prompt_tokens + req.max_tokens
            dec = None
            if self.has_pd and self.pd_mode == "parallel":
                try:
                    dec = self._pick_decode(req.request_id, tokens)
                except NoInstanceAvailable as err:  # answer it now rather than leave it waiting
                    self._reject("no_instance")
                    if not fut.done():
                        fut.set_exception(err)
                    continue
                self._take(dec, tokens)
            self._take(inst, tokens)
            self._remember(inst, req.block_hashes)
            decision = Decision(inst.name, inst.engine, None, None, "mixed", time.monotonic() - req.arrival_s,
                                local_depth, req.global_depth)
            if self.has_pd:
                decision.mode = self.pd_mode
                if dec is not None:
                    decision.decode, decision.decode_engine = dec.name, dec.engine
            else:
                decision.prefill, decision.prefill_engine = None, None
                decision.decode, decision.decode_engine = inst.name, inst.engine
            self.assigned[req.request_id] = (inst.name, decision.decode, tokens, req.block_hashes)
            self.counters["dispatched"] += 1
            self.metrics.dispatched.inc()
            self.dispatch_log.append({"request_id": req.request_id, "prompt_tokens": req.prompt_tokens,
                                      "prefill": decision.prefill, "decode": decision.decode,
                                      "local_blocks": local_depth, "global_blocks": req.global_depth,
                                      "queued_s": decision.queued_s})
            if not fut.done():
                fut.set_result(decision)
            progressed = True
        return progressed

    async def _dispatch_loop(self) -> None:
        while True:
            if not self.queue or self.paused:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if not self._dispatch_once():
                    await asyncio.sleep(0.001)  # the original's 1 ms timer: wait for room
            except Exception:
                logger.exception("master dispatch failed")
                await asyncio.sleep(0.01)

    async def _refresh_loop(self, period_s: float = 0.05, cache_sync_every: int = 10) -> None:
        """Pull each engine's load (and now and then its cached prefixes); publish the
        snapshot for the slaves."""
        n = 0
        while True:
            try:
                await self.refresh(sync_cache=n % cache_sync_every == 0)
                self.metrics.instances(len(self.queue), self.instances.values())
                if n % max(1, round(self.publish_period_s / period_s)) == 0:
                    self._published.append(ray.put(self.snapshot()))
            except Exception:  # one bad round must not leave routing and /v1/cluster stale for good
                logger.exception("master: refreshing the instances' state failed")
            n += 1
            await asyncio.sleep(period_s)

    async def refresh(self, sync_cache: bool = False) -> None:
        """Each engine's load; with sync_cache, also the prefix blocks it really holds
        (plus those of requests routed there and still running). An engine that died
        is marked unhealthy, one that does not answer in time after a few refreshes
        in a row."""

        async def one(inst: InstanceRef):
            try:
                st = await asyncio.wait_for(inst.engine.stats.remote(), self.refresh_timeout_s)
                asked = time.monotonic()  # what finished after this may be missing from `held`
                held = await asyncio.wait_for(inst.engine.cached_hashes.remote(), self.refresh_timeout_s) \
                    if sync_cache else None
                if sync_cache:
                    inst.npus = await asyncio.wait_for(inst.engine.npu_stats.remote(), self.refresh_timeout_s)
            except asyncio.TimeoutError:
                inst.unanswered += 1
                if inst.unanswered >= UNANSWERED_REFRESHES_UNHEALTHY:
                    inst.view.healthy = False
                return
            except ray.exceptions.RayError:  # died, or its call failed
                inst.view.healthy = False
                return
            inst.unanswered = 0
            v = inst.view
            v.running, v.waiting = st["running"], st["waiting"]
            v.healthy = st.get("healthy", True) and not inst.failed  # a reported failure sticks (until rebuilt)
            v.free_blocks, v.total_blocks = min(st["free_blocks"]), min(st["total_blocks"])
            inst.stats = st
            if held is not None:
                inst.cached = dict.fromkeys(held)
                for prefill, _, _, hashes in self.assigned.values():
                    if prefill == inst.name:
                        self._remember(inst, hashes)
                recent = inst.finished_recently
                while recent and recent[0][0] < asked:  # in `held` already (unless evicted): no later sync needs them
                    recent.popleft()
                for _, hashes in recent:
                    self._remember(inst, hashes)

        await asyncio.gather(*(one(i) for i in self.instances.values()))
        if sync_cache:
            await self._sync_global_index()

    async def _sync_global_index(self) -> None:
        from actors.kv_cache import KV_CACHE_NAME

        try:
            cache = ray.get_actor(KV_CACHE_NAME)
            self.global_index = set(await asyncio.wait_for(cache.hashes.remote(), 2.0))
            if self.metrics is not None:
                self.metrics.kv_cache(await asyncio.wait_for(cache.stats.remote(), 2.0))
        except (ValueError, asyncio.TimeoutError, ray.exceptions.RayError):  # no global cache, or restarting
            self.global_index = set()

    async def published(self) -> list:
        """[ref] of the latest published snapshot (in a list so Ray hands over the ref):
        slaves poll this now and then instead of calling per request. (A restarted
        master's loops start on its first call.)"""
        self._ensure_tasks()
        return [self._published[-1]] if self._published else []

    # ---- state -----------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            **self.settings(),
            "pd_mode": self.pd_mode if self.has_pd else "mixed",
            "recent_dispatches": list(self.dispatch_log),
            "queue_length": len(self.queue),
            "max_queue": self.max_queue,
            "started": self.started,
            "time": time.time(),
            "counters": dict(self.counters),
            "latencies": list(self.latencies),
            "instances": [
                {"name": i.name, "role": i.role, "healthy": i.view.healthy, "draining": i.draining, "inflight": i.inflight,
                 "cached_prefix_blocks": len(i.cached), "engine": i.stats, "npus": [_npu_summary(n) for n in i.npus]}
                for i in self.instances.values()
            ],
        }


async def fetch_published(master, timeout_s: float) -> dict | None:
    """The master's latest published snapshot (None: none yet, the master does not
    answer, or the fetch took longer than `timeout_s`). Bounded as a whole, so that
    the loops that poll it (the slaves', the autoscaler's) survive a call or a fetch
    that never returns."""

    async def fetch():
        refs = await master.published.remote()
        return await refs[0] if refs else None

    try:
        return await asyncio.wait_for(fetch(), timeout_s)
    except (asyncio.TimeoutError, ray.exceptions.RayError):  # the next poll tries again
        return None


def _npu_summary(npu: dict) -> dict:
    """An NPU's line in the cluster view: HBM use and the experts it holds."""
    hbm = npu.get("hbm", {})
    return {"name": npu.get("name"), "device": npu.get("device"), "compute": npu.get("compute"),
            "device_time_s": npu.get("device_time_s"), "hbm": hbm, "experts": npu.get("experts", {}),
            "expert_load": npu.get("expert_load", {})}


def _current_membership(initial: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The instances now: the cluster controller's list when there is one (instances
    were added or removed since start), else what the master was started with."""
    from cluster.controller import CONTROLLER_NAME

    try:
        return ray.get(ray.get_actor(CONTROLLER_NAME).membership.remote(), timeout=10)
    except (ValueError, ray.exceptions.RayError):
        return initial


def create_master(instances, **kwargs):
    """The named master actor and the ref its start returns: a caller can start
    other actors while it comes up. It restarts on failure (calls in flight are
    retried on the new one) and rebuilds its view from its arguments — instance
    names only — and the engines, found by name."""
    seqs = kwargs.pop("max_num_seqs", 32)
    spec = [(i.name, i.role, seqs) for i in instances]
    master = ray.remote(OmniMaster).options(
        name=MASTER_NAME, num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=10_000
    ).remote(spec, **kwargs)
    return master, master.start.remote()
