"""OmniMaster: the Omni Proxy master — one actor holding the global state and
making every scheduling decision.

    slave --schedule()--> prefill queue --(weighted order, budgets, policy)--> Decision
    slave --schedule_decode()--> decode queue --(decode order, budgets)--> Decision   (sequential P/D)
    engines, global KV cache --KV events--> prefix indexes (cluster.proxy.prefix_index)
    slave --prefill_done() / finished()--> instance loads (cluster.proxy.budgets)

The master holds the queues: an instance gets a request only while it is under
its budgets, so the order the weighted sorter (cluster.proxy.sorting) gives the
queue is the order work starts in, and the starvation bound is enforced on
both queues (a starved request that does not fit holds the line). Each
instance's load (queued uncached tokens, requests) is the master's own
account, changed by its own decisions and the slaves' reports; its cached
prefix blocks come from the KV events its engine emits every step. A master
that restarts rebuilds both from the engines: the requests they hold, and a
full dump of their prefix blocks.

Lifecycle: the stages that happen here (prefix_matched, queued,
prefill_scheduled) travel back in the Decision as ages, which the slave turns
into stamps on its own clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

import ray
import ray.experimental.internal_kv as internal_kv

from actors.engine.stats import EngineStats
from cluster.metrics import MasterMetrics
from cluster.proxy.budgets import Budgets, InstanceLoad
from cluster.proxy.prefix_index import PrefixIndex, follow
from cluster.proxy.routing import InstanceView, RoutingConfig, make_policy
from cluster.proxy.sorting import QueuedRequest, SortingConfig, WeightedSorter

logger = logging.getLogger(__name__)

MASTER_NAME = "omniray_master"
DISPATCH_LOG_LEN = 256  # decisions kept for the cluster view
LATENCY_WINDOW = 256  # recent requests' TTFT/TPOT kept for the autoscaler's SLO attainment
# refreshes in a row an engine may leave unanswered (slow, not dead: a busy host) before
# it leaves routing; one that died leaves at once (Ray Serve's health checks likewise
# count failures before they call a replica unhealthy)
UNANSWERED_REFRESHES_UNHEALTHY = 3
REFRESH_TIMEOUT_S = 2.0  # how long a refresh waits for each engine's answer
REFRESH_PERIOD_S = 0.1  # engines' health and free KV blocks
DETAIL_EVERY = 5  # refreshes between reads of the NPUs' and the global KV cache's stats (the cluster view)
# published snapshots the master keeps owning after newer ones: a slave handed a ref
# fetches it after the master may have published again, and a ref its owner drops
# while a borrower fetches it can leave that fetch hanging (seen about 1 in 50 first
# reads on 2 cores); 8 x 0.1 s outlives any fetch
PUBLISHED_KEPT = 8


class NoInstanceAvailable(RuntimeError):
    """No healthy instance can take the request's role now (the slave answers 503)."""


@dataclass
class InstanceRef:
    """What the master knows of an instance: its engine, its load, its prefix blocks."""

    name: str
    role: str
    engine: object  # InstanceEngine actor handle
    load: InstanceLoad = None
    index: PrefixIndex = field(default_factory=PrefixIndex)
    healthy: bool = True
    failed: bool = False  # a slave saw it fail a request: out of routing until rebuilt
    draining: bool = False  # being removed: no new requests, the running ones finish
    free_blocks: int = 0  # of its fullest NPU (the engine's last stats)
    total_blocks: int = 1
    stats: EngineStats | None = None  # the engine's last stats()
    npus: list = field(default_factory=list)  # its NPUs' last stats()
    unanswered: int = 0  # refreshes in a row its engine did not answer in time

    def __post_init__(self):
        self.load = self.load or InstanceLoad(self.role)

    def view(self) -> InstanceView:
        load = self.load
        return InstanceView(self.name, self.role, running=load.running, queued_tokens=load.queued_tokens,
                            decode_tokens=load.decode_tokens, free_blocks=self.free_blocks,
                            total_blocks=self.total_blocks, healthy=self.healthy, cached=self.index.hashes)


@dataclass
class Decision:
    prefill: str | None  # instance name (None for a mixed instance doing everything)
    prefill_engine: object | None
    decode: str | None
    decode_engine: object | None
    mode: str  # "mixed" | "sequential" | "parallel"
    queued_s: float = 0.0  # time in the master's queue
    local_blocks: int = 0  # prompt blocks cached on the chosen instance (its prefix index)
    global_blocks: int = 0  # prompt blocks in the global KV cache
    stamps: dict[str, float] = field(default_factory=dict)  # stages at the master, as ages when it answered


@dataclass
class Assignment:
    """Where a dispatched request runs, and what it costs there."""

    prefill: str | None
    decode: str | None
    prompt_tokens: int
    max_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass
class Waiting:
    """A request in one of the master's queues, and the slave's call awaiting it."""

    req: QueuedRequest
    future: asyncio.Future
    stamps: dict[str, float] = field(default_factory=dict)  # stages at the master (monotonic)
    holder: str | None = None  # the one instance holding more of its prefix than any other (at arrival)


class OmniMaster:
    def __init__(self, instances: list[tuple], policy: str = "omni", pd_mode: str = "sequential",
                 sorting: SortingConfig | None = None, routing: RoutingConfig | None = None,
                 budgets: Budgets | None = None, block_size: int = 16, max_queue: int = 4096,
                 publish_period_s: float = 0.1, global_cache: bool = False):
        from cluster.launcher import engine_name

        self.instances = {
            name: InstanceRef(name, role, ray.get_actor(engine_name(name)))
            for name, role, *_ in _recorded_membership(instances)
        }
        self.routing = routing or RoutingConfig()
        self.policy, self.policy_name = make_policy(policy, self.routing), policy
        self.pd_mode = pd_mode
        self.sorter = WeightedSorter(sorting or SortingConfig())
        self.budgets = budgets or Budgets()
        self.block_size, self.max_queue = block_size, max_queue
        self.global_cache = global_cache
        self.queue: dict[str, Waiting] = {}  # prefill queue
        self.decode_queue: dict[str, Waiting] = {}  # sequential P/D: prefilled, waiting for a decode instance
        self.assigned: dict[str, Assignment] = {}
        # dispatch_s: the master's own time in dispatch rounds (its share of an emulated run's host CPU)
        self.counters = {"dispatched": 0, "finished": 0, "rejected": 0, "dispatch_rounds": 0, "dispatch_s": 0.0}
        self.waits_max = {"queue": 0.0, "decode_queue": 0.0}  # the longest wait in each queue so far
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._followers: dict[str, asyncio.Task] = {}  # instance name -> its KV event follower
        self.publish_period_s = publish_period_s
        self._published: deque[ray.ObjectRef] = deque(maxlen=PUBLISHED_KEPT)  # newest last
        self.started = time.time()
        self.metrics: MasterMetrics | None = None  # made in the actor, on start
        self.global_index = PrefixIndex()  # mirror of the global KV cache's block hashes
        self.kv_cache_stats: dict | None = None
        self.paused = False  # dispatch held (maintenance, resizing); requests queue up meanwhile
        self.dispatch_log: deque[dict] = deque(maxlen=DISPATCH_LOG_LEN)  # the latest decisions, for /v1/cluster
        self.latencies: deque[tuple[float, float | None]] = deque(maxlen=LATENCY_WINDOW)  # (ttft, tpot) of recent requests
        self.refresh_timeout_s = REFRESH_TIMEOUT_S

    @property
    def has_pd(self) -> bool:
        roles = {i.role for i in self.instances.values()}
        return "prefill" in roles and "decode" in roles

    # ---- slave-facing --------------------------------------------------------------
    # calls per request, on the hot path: no task events, which would fill the GCS's
    # task-event buffer (hundreds of MiB over a 20-minute soak, `omniray bench chaos --faults none`)
    @ray.method(enable_task_events=False)
    async def schedule(self, request_id: str, prompt_tokens: int, max_tokens: int, block_hashes: list[int]) -> Decision:
        """Queue a request and return where it runs once the dispatcher picks it."""
        self._ensure_tasks()
        if len(self.queue) >= self.max_queue:
            self._reject("queue_full")
            raise OverflowError(f"queue full ({self.max_queue} waiting)")
        candidates = self._candidates(self._dispatch_roles())
        if not candidates:
            self._reject("no_instance")
            raise NoInstanceAvailable(f"no healthy {'/'.join(self._dispatch_roles())} instance")
        req = QueuedRequest(request_id, prompt_tokens, max_tokens, time.monotonic(), list(block_hashes))
        req.global_depth = self.global_index.depth(req.block_hashes)  # APC match: global and per instance
        depth = {i.name: i.index.depth(req.block_hashes) for i in candidates}
        req.cached_tokens = max(depth.values()) * self.block_size
        waiting = Waiting(req, asyncio.get_running_loop().create_future(), {"prefix_matched": time.monotonic()},
                          _sole_holder(depth))
        self.queue[request_id] = waiting
        waiting.stamps["queued"] = time.monotonic()
        self._wake.set()
        decision = await waiting.future
        now = time.monotonic()
        decision.stamps = {stage: now - t for stage, t in waiting.stamps.items()}
        return decision

    @ray.method(enable_task_events=False)
    async def schedule_decode(self, request_id: str, prompt_tokens: int, max_tokens: int) -> Decision:
        """Sequential P/D: the prefill is done; the request waits in the decode queue
        until a decode instance is under its budget, in decode-weight order."""
        self._ensure_tasks()
        self.prefill_done(request_id)
        if not self._candidates(("decode",)):
            raise NoInstanceAvailable("no healthy decode instance")
        # a master restarted meanwhile does not know the request: the slave's figures stand
        self.assigned.setdefault(request_id, Assignment(None, None, prompt_tokens, max_tokens))
        req = QueuedRequest(request_id, prompt_tokens, max_tokens, time.monotonic())
        waiting = Waiting(req, asyncio.get_running_loop().create_future())
        self.decode_queue[request_id] = waiting
        self._wake.set()
        return await waiting.future

    @ray.method(enable_task_events=False)
    def prefill_done(self, request_id: str) -> None:
        """The request's prompt is computed (a slave saw its first token, or the
        prefill's KV hand-off): its tokens leave the prefill budget."""
        a = self.assigned.get(request_id)
        inst = self.instances.get(a.prefill) if a and a.prefill else None
        if inst is not None and inst.load.prefill_done(request_id, a.total_tokens) and self._wake is not None:
            self._wake.set()

    @ray.method(enable_task_events=False)
    def finished(self, request_id: str) -> None:
        self.cancel(request_id)
        a = self.assigned.pop(request_id, None)
        if a is None:
            return
        for name in {a.prefill, a.decode} - {None}:
            inst = self.instances.get(name)
            if inst is not None:
                inst.load.finish(request_id)
        self.counters["finished"] += 1
        if self._wake is not None:
            self._wake.set()

    def cancel(self, request_id: str) -> None:
        """A slave gave up on a queued request (client gone, timeout)."""
        for queue in (self.queue, self.decode_queue):
            entry = queue.pop(request_id, None)
            if entry is not None and not entry.future.done():
                entry.future.cancel()

    def report_failure(self, name: str) -> None:
        """A slave saw the instance fail a request: stop routing to it now (its engine
        reports itself unhealthy too; the next refresh keeps it so until rebuilt)."""
        inst = self.instances.get(name)
        if inst is not None:
            inst.healthy, inst.failed = False, True
            logger.warning("master: instance %s failed; routing around it", name)

    def observe(self, ttft_s: float, tpot_s: float | None) -> None:
        """A slave's finished request: its TTFT and TPOT (the autoscaler's SLO signal)."""
        self.latencies.append((ttft_s, tpot_s))

    def mark_rebuilt(self, name: str) -> None:
        """The instance was rebuilt on new NPUs: route to it again."""
        inst = self.instances.get(name)
        if inst is not None:
            inst.failed, inst.healthy = False, True
            logger.info("master: instance %s rebuilt; routing to it again", name)
            if self._wake is not None:
                self._wake.set()

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
            self.policy, self.policy_name = make_policy(policy, self.routing), policy
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
    async def add_instance(self, name: str, role: str) -> None:
        """Route to a newly started instance (its engine is named after it)."""
        from cluster.launcher import engine_name

        self.instances[name] = InstanceRef(name, role, ray.get_actor(engine_name(name)))
        _record_membership(self.instances.values())  # what a restart of this master starts from
        await self.refresh()
        self._follow(self.instances[name])
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
        st = inst.stats
        return {"inflight": inst.load.running, "running": st.running if st else 0, "waiting": st.waiting if st else 0}

    def remove_instance(self, name: str) -> None:
        self.instances.pop(name, None)
        _record_membership(self.instances.values())
        task = self._followers.pop(name, None)
        if task is not None:
            task.cancel()

    # ---- dispatch -----------------------------------------------------------------------
    def _ensure_tasks(self) -> None:
        if not self._tasks:
            self.metrics = MasterMetrics()
            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._dispatch_loop()), loop.create_task(self._refresh_loop())]
            if self.global_cache:
                self._tasks.append(loop.create_task(follow(_kv_cache_actor, self.global_index, "global KV cache")))
            for inst in self.instances.values():
                self._follow(inst)

    def _follow(self, inst: InstanceRef) -> None:
        """Follow the instance's KV events (its prefix index). They change where a
        request goes, not whether there is room: they do not wake the dispatcher."""
        if inst.name not in self._followers and self._tasks:
            self._followers[inst.name] = asyncio.get_running_loop().create_task(
                follow(lambda: inst.engine, inst.index, inst.name))

    async def start(self) -> None:
        """Read the instances' health and start the loops: the followers rebuild every
        prefix index from a full dump, the dispatcher first adopts the requests the
        engines hold. Called once by whoever starts the master; a restarted master
        starts them on its first call."""
        await self.refresh()
        self._ensure_tasks()

    async def _adopt_running(self) -> None:
        """The requests the engines hold, in the loads: a restarted master must not
        give an instance more than its budgets because it forgot what runs there."""
        async def one(inst: InstanceRef):
            try:
                return inst, await asyncio.wait_for(inst.engine.requests.remote(), self.refresh_timeout_s)
            except (asyncio.TimeoutError, ray.exceptions.RayError):
                return inst, []

        for inst, held in await asyncio.gather(*(one(i) for i in self.instances.values())):
            for r in held:
                a = self.assigned.setdefault(r["request_id"], Assignment(None, None, r["prompt_tokens"], r["max_tokens"]))
                if inst.role == "decode":
                    a.decode = inst.name
                    inst.load.start_decode(r["request_id"], a.total_tokens)
                    continue
                a.prefill = inst.name
                a.decode = inst.name if inst.role == "mixed" else a.decode
                inst.load.start_prefill(r["request_id"], r["uncached_tokens"])
                if r["prefilled"]:
                    inst.load.prefill_done(r["request_id"], a.total_tokens)

    def _candidates(self, roles: tuple[str, ...]) -> list[InstanceRef]:
        return [i for i in self.instances.values() if i.role in roles and i.healthy and not i.draining]

    def _dispatch_roles(self) -> tuple[str, ...]:
        return ("prefill",) if self.has_pd else ("mixed", "prefill", "decode")

    def _uncached(self, req: QueuedRequest, inst: InstanceRef) -> int:
        """Prompt tokens the instance would compute: those past its cached prefix
        (or the global cache's, which it loads)."""
        depth = max(inst.index.depth(req.block_hashes), req.global_depth)
        return max(1, req.prompt_tokens - depth * self.block_size)

    def _open(self, roles: tuple[str, ...]) -> list[InstanceRef]:
        """Instances that could take some request now (under their sequence budget,
        with room for at least one more prefill token)."""
        return [i for i in self._candidates(roles) if i.load.fits_prefill(1, self.budgets)]

    def _dispatch_prefill(self) -> None:
        """Assign queued requests, in weighted order, to instances under their budgets.

        Starved requests lead the order. One that fits nowhere reserves the instance
        that will have room for it soonest (the fewest queued tokens): nothing else
        goes there until it fits, while the other instances go on taking work (a
        reservation, as backfilling schedulers make one, rather than holding the
        whole line: one long prompt waiting for room must not idle every instance).
        Then, with a policy that waits for its choice, room freed on the instance that
        holds more of a request's prefix than any other goes first to such a request
        (a conversation's next turn) before one that would do as well anywhere: under
        load, whichever request is first would otherwise take the room the turn waits
        for, and the conversation would scatter. Then the rest, in order: with weighted
        sorting, any that fits goes (a shorter one passes a long one waiting for room);
        without, first come first served as vLLM's and SGLang's FCFS schedulers are, the
        first that fits nowhere holds the line."""
        now = time.monotonic()
        roles = self._dispatch_roles()
        if not (self._open(roles) and self.queue):
            return  # under overload the common case: no need to sort the queue
        order = self.sorter.prefill_order([w.req for w in self.queue.values()], now)
        reserved: set[str] = set()

        def open_now() -> list[InstanceRef]:
            return [i for i in self._open(roles) if i.name not in reserved]

        for req in order:  # the starved, first in the order
            if not self.sorter.starved(req, now):
                break
            req.global_depth = self.global_index.depth(req.block_hashes)
            inst = self._choose(req, open_now(), starved=True)
            if inst is None or not self._place(req, inst, now):
                free = [i for i in self._candidates(roles) if i.name not in reserved]
                if not free:
                    return
                reserved.add(min(free, key=lambda i: (i.load.queued_tokens, i.name)).name)
        if self.policy.waits_for_choice:
            for req in order:
                if req.request_id not in self.queue:
                    continue
                inst = next((i for i in open_now() if i.name == self.queue[req.request_id].holder), None)
                if inst is not None and self._holds_most(req, inst, roles):
                    self._place(req, inst, now)
        for req in order:
            if req.request_id not in self.queue or self.sorter.starved(req, now):
                continue  # placed above, or starved and waiting on its reservation
            open_ = open_now()
            if not open_:
                return  # every instance is at its budgets or reserved: nothing else fits either
            req.global_depth = self.global_index.depth(req.block_hashes)
            inst = self._choose(req, open_, starved=False)
            if inst is not None:
                self._place(req, inst, now)
            elif not self.sorter.config.enabled and not self._fitting(req, open_):
                return  # FCFS: nothing passes the head of the line

    def _choose(self, req: QueuedRequest, open_: list[InstanceRef], starved: bool) -> InstanceRef | None:
        """The policy's choice among the open instances where `req` fits; None: it
        fits nowhere, or (a policy that waits for its choice) it would rather wait
        for the full instance holding more of its prefix than any other."""
        fits = self._fitting(req, open_)
        if not fits:
            return None
        waiting = len(self.queue)
        best = self.instances[self.policy.choose(req, [i.view() for i in fits], self.block_size, waiting).name]
        holder = self.instances.get(self.queue[req.request_id].holder or "")
        if starved or not self.policy.waits_for_choice or holder is None or any(holder is i for i in fits):
            return best
        pick = self.policy.choose(req, [i.view() for i in (*fits, holder)], self.block_size, waiting)
        return None if pick.name == holder.name else best

    def _fitting(self, req: QueuedRequest, open_: list[InstanceRef]) -> list[InstanceRef]:
        """The open instances where `req` fits under the budgets."""
        return [i for i in open_ if i.load.fits_prefill(self._uncached(req, i), self.budgets)]

    def _holds_most(self, req: QueuedRequest, inst: InstanceRef, roles: tuple[str, ...]) -> bool:
        """`inst` holds more of the prompt's prefix than every other instance, and it fits there."""
        depth = inst.index.depth(req.block_hashes)
        others = (i.index.depth(req.block_hashes) for i in self._candidates(roles) if i is not inst)
        return depth > max(others, default=0) and inst.load.fits_prefill(self._uncached(req, inst), self.budgets)

    def _place(self, req: QueuedRequest, inst: InstanceRef, now: float) -> bool:
        """Dispatch `req` to `inst` (and, parallel P/D, to a decode instance with room)."""
        dec = None
        if self.has_pd and self.pd_mode == "parallel":
            decodes = [d for d in self._candidates(("decode",)) if d.load.fits_decode(self.budgets)]
            if not decodes:
                return False
            dec = self.instances[self.policy.choose_decode(req, [d.view() for d in decodes]).name]
        self._assign(self.queue.pop(req.request_id), inst, dec, now)
        return True

    def _assign(self, waiting: Waiting, inst: InstanceRef, dec: InstanceRef | None, now: float) -> None:
        req = waiting.req
        waiting.stamps["prefill_scheduled"] = now
        local = inst.index.depth(req.block_hashes)
        inst.load.start_prefill(req.request_id, self._uncached(req, inst))
        a = Assignment(inst.name, None, req.prompt_tokens, req.max_tokens)
        if self.has_pd:
            decision = Decision(inst.name, inst.engine, None, None, self.pd_mode)
            if dec is not None:
                dec.load.start_decode(req.request_id, a.total_tokens)
                a.decode, decision.decode, decision.decode_engine = dec.name, dec.name, dec.engine
        else:
            a.decode = inst.name
            decision = Decision(None, None, inst.name, inst.engine, "mixed")
        decision.queued_s, decision.local_blocks, decision.global_blocks = now - req.arrival_s, local, req.global_depth
        self.assigned[req.request_id] = a
        self.waits_max["queue"] = max(self.waits_max["queue"], decision.queued_s)
        self.counters["dispatched"] += 1
        self.metrics.dispatched.inc()
        self.dispatch_log.append({"request_id": req.request_id, "prompt_tokens": req.prompt_tokens,
                                  "prefill": a.prefill if self.has_pd else None, "decode": a.decode,
                                  "local_blocks": local, "global_blocks": req.global_depth,
                                  "queued_s": decision.queued_s})
        if not waiting.future.done():
            waiting.future.set_result(decision)

    def _dispatch_decode(self) -> None:
        """Assign prefilled requests, in decode-weight order, to decode instances under their budget."""
        now = time.monotonic()
        if not self._candidates(("decode",)):
            for rid in list(self.decode_queue):  # answer them now rather than leave them waiting
                waiting = self.decode_queue.pop(rid)
                if not waiting.future.done():
                    waiting.future.set_exception(NoInstanceAvailable("no healthy decode instance"))
            return
        for req in self.sorter.decode_order([w.req for w in self.decode_queue.values()], now):
            decodes = [d for d in self._candidates(("decode",)) if d.load.fits_decode(self.budgets)]
            if not decodes:
                return
            dec = self.instances[self.policy.choose_decode(req, [d.view() for d in decodes]).name]
            waiting = self.decode_queue.pop(req.request_id)
            a = self.assigned[req.request_id]
            a.decode = dec.name
            dec.load.start_decode(req.request_id, a.total_tokens)
            self.waits_max["decode_queue"] = max(self.waits_max["decode_queue"], now - req.arrival_s)
            if not waiting.future.done():
                waiting.future.set_result(Decision(a.prefill, None, dec.name, dec.engine, "sequential",
                                                   queued_s=now - req.arrival_s))

    async def _dispatch_loop(self) -> None:
        """Dispatch whenever something changed: a request came, room was freed, an
        instance came back, a KV event landed. No timer: room only changes then."""
        await self._adopt_running()
        while True:
            self._wake.clear()
            try:
                if not self.paused:
                    t0 = time.perf_counter()
                    self._dispatch_prefill()
                    self._dispatch_decode()
                    self.counters["dispatch_rounds"] += 1
                    self.counters["dispatch_s"] += time.perf_counter() - t0
            except Exception:
                logger.exception("master dispatch failed")
                await asyncio.sleep(0.01)
            await self._wake.wait()

    async def _refresh_loop(self) -> None:
        """Each engine's health and free KV blocks (and now and then its NPUs' and the
        global KV cache's stats, for the cluster view); publish the snapshot."""
        n = 0
        while True:
            try:
                await self.refresh(detail=n % DETAIL_EVERY == 0)
                self.metrics.instances(len(self.queue), len(self.decode_queue), self.instances.values())
                if n % max(1, round(self.publish_period_s / REFRESH_PERIOD_S)) == 0:
                    self._published.append(ray.put(self.snapshot()))
            except Exception:  # one bad round must not leave routing and /v1/cluster stale for good
                logger.exception("master: refreshing the instances' state failed")
            n += 1
            await asyncio.sleep(REFRESH_PERIOD_S)

    async def refresh(self, detail: bool = False) -> None:
        """Each engine's stats; with `detail`, its NPUs' too, and the global KV
        cache's. An engine that died is marked unhealthy, one that does not answer
        in time after a few refreshes in a row."""

        async def one(inst: InstanceRef):
            try:
                st = await asyncio.wait_for(inst.engine.stats.remote(), self.refresh_timeout_s)
                if detail:
                    inst.npus = await asyncio.wait_for(inst.engine.npu_stats.remote(), self.refresh_timeout_s)
            except asyncio.TimeoutError:
                inst.unanswered += 1
                if inst.unanswered >= UNANSWERED_REFRESHES_UNHEALTHY:
                    inst.healthy = False
                return
            except ray.exceptions.RayError:  # died, or its call failed
                inst.healthy = False
                return
            inst.unanswered = 0
            was = inst.healthy
            inst.healthy = st.healthy and not inst.failed  # a reported failure sticks (until rebuilt)
            inst.free_blocks, inst.total_blocks = min(st.free_blocks), min(st.total_blocks)
            inst.stats = st
            if inst.healthy and not was and self._wake is not None:
                self._wake.set()

        await asyncio.gather(*(one(i) for i in self.instances.values()))
        if detail and self.global_cache:
            try:
                self.kv_cache_stats = await asyncio.wait_for(_kv_cache_actor().stats.remote(), self.refresh_timeout_s)
                if self.metrics is not None:
                    self.metrics.kv_cache(self.kv_cache_stats)
            except (ValueError, asyncio.TimeoutError, ray.exceptions.RayError):  # restarting
                pass

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
            "decode_queue_length": len(self.decode_queue),
            "queue_wait_max_s": self.waits_max["queue"],
            "decode_queue_wait_max_s": self.waits_max["decode_queue"],
            "starvation_ms": self.sorter.config.starvation_ms,
            "budgets": vars(self.budgets),
            "max_queue": self.max_queue,
            "started": self.started,
            "time": time.time(),
            "counters": dict(self.counters),
            "latencies": list(self.latencies),
            "instances": [
                {"name": i.name, "role": i.role, "healthy": i.healthy, "draining": i.draining,
                 "inflight": i.load.running, "queued_tokens": i.load.queued_tokens,
                 "prefilling": len(i.load.prefilling), "decoding": len(i.load.decoding),
                 "cached_prefix_blocks": len(i.index.hashes), "kv_events_applied": i.index.applied,
                 "engine": i.stats.to_dict() if i.stats else {}, "npus": [_npu_summary(n) for n in i.npus]}
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


def _sole_holder(depth: dict[str, int]) -> str | None:
    """The instance holding more blocks of the prefix than any other (None: no such one)."""
    ranked = sorted(depth.items(), key=lambda kv: -kv[1])
    if not ranked or ranked[0][1] == 0 or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return None
    return ranked[0][0]


def _kv_cache_actor():
    from actors.kv_cache import KV_CACHE_NAME

    return ray.get_actor(KV_CACHE_NAME)


def _npu_summary(npu: dict) -> dict:
    """An NPU's line in the cluster view: HBM use and the experts it holds."""
    hbm = npu.get("hbm", {})
    return {"name": npu.get("name"), "device": npu.get("device"), "compute": npu.get("compute"),
            "device_time_s": npu.get("device_time_s"), "hbm": hbm, "experts": npu.get("experts", {}),
            "expert_load": npu.get("expert_load", {})}


def _membership_key() -> str | None:
    """Where this master actor records its instances in the GCS's key-value store:
    under its actor id, which a restart keeps (None outside an actor)."""
    actor_id = ray.get_runtime_context().get_actor_id()
    return f"omniray/membership/{actor_id}" if actor_id else None


def _recorded_membership(initial: list[tuple]) -> list[tuple]:
    """The instances now, as (name, role): what this master recorded when instances
    were added or removed (a restarted master), else what it was started with."""
    key = _membership_key()
    recorded = internal_kv._internal_kv_get(key) if key else None
    return [tuple(m) for m in json.loads(recorded)] if recorded else initial


def _record_membership(instances) -> None:
    key = _membership_key()
    if key:
        internal_kv._internal_kv_put(key, json.dumps([[i.name, i.role] for i in instances]))


def create_master(instances, **kwargs):
    """The named master actor and the ref its start returns: a caller can start
    other actors while it comes up. It restarts on failure (calls in flight are
    retried on the new one) and rebuilds its view from its arguments — instance
    names only — and the engines, found by name."""
    spec = [(i.name, i.role) for i in instances]
    master = ray.remote(OmniMaster).options(
        name=MASTER_NAME, num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=10_000
    ).remote(spec, **kwargs)
    return master, master.start.remote()
