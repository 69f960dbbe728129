"""The Omni Proxy master's decisions, against engines that answer from the test:
prefix indexes kept by KV events (no poll), the budgets that keep the queue in the
master, the decode queue's order, the starvation bound, a restart's rebuild, and
engines that are slow or gone."""

from __future__ import annotations

import asyncio

import pytest
import ray

import cluster.proxy.master as master_module
from actors.engine.stats import EngineStats
from actors.kv_events import KVEventLog
from cluster.proxy.budgets import Budgets
from cluster.proxy.master import InstanceRef, OmniMaster
from cluster.proxy.sorting import SortingConfig

pytestmark = pytest.mark.fast

BS = 16


class _Call:
    """`engine.method.remote(...)` of an engine that answers from the test."""

    def __init__(self, answer):
        self.answer = answer

    def remote(self, *args):
        return self.answer(*args)


class FakeEngine:
    """Stats, KV events (a real KVEventLog) and held requests, as the test sets them."""

    def __init__(self, holding=(), requests=()):
        self.held = set(holding)
        self.held_requests = list(requests)
        self.log = KVEventLog(lambda: sorted(self.held))
        self.calls = {"stats": 0}

        async def stats():
            self.calls["stats"] += 1
            return EngineStats("fake", "mixed", True, 0, 0, [1000], [1000], 0, 0.0, 0.0)

        async def npu_stats():
            return []

        async def requests():
            return list(self.held_requests)

        self.stats, self.npu_stats, self.requests = _Call(stats), _Call(npu_stats), _Call(requests)
        self.kv_events = _Call(self.log.after)

    def store(self, *hashes):
        self.held.update(hashes)
        self.log.record(stored=hashes)

    def evict(self, *hashes):
        self.held.difference_update(hashes)
        self.log.record(removed=hashes)


class _Metrics:
    """Stands in for the Ray metrics the master exports (no Ray session here)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """No controller, no global KV cache, no metrics agent: the master keeps the
    instances it is given (and starts no Ray session to look for them)."""

    def missing(name, *args, **kwargs):
        raise ValueError(f"no actor named {name}")

    monkeypatch.setattr(ray, "get_actor", missing)
    monkeypatch.setattr(master_module, "MasterMetrics", _Metrics)


def _master(engines: dict[str, FakeEngine], role="mixed", refresh=False, **kwargs) -> OmniMaster:
    """A master over `engines`; without `refresh` its refresh loop does not run, so
    nothing but the KV events can change what it knows of the instances' caches."""
    master = OmniMaster([], block_size=BS, **kwargs)
    roles = role if isinstance(role, dict) else {name: role for name in engines}
    master.instances = {n: InstanceRef(n, roles[n], e, free_blocks=1000) for n, e in engines.items()}
    if not refresh:
        async def idle():
            await asyncio.Event().wait()

        master._refresh_loop = idle
    return master


async def _until(cond, timeout_s: float = 5.0) -> None:
    """Wait for cond() (a behaviour, not a speed: the bound is generous)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_an_eviction_changes_routing_as_its_event_lands_without_any_poll():
    prefix = [11, 12, 13, 14]

    async def scenario():
        holder, other = FakeEngine(holding=prefix), FakeEngine()
        # "a" sorts first: with nothing cached anywhere, a tie goes to it
        master = _master({"b-holder": holder, "a-other": other})
        await master.start()
        await _until(lambda: master.instances["b-holder"].index.hashes == set(prefix))  # the dump
        first = await master.schedule("r1", 80, 8, prefix)
        master.finished("r1")
        holder.evict(13, 14)  # the engine reused those blocks
        await _until(lambda: master.instances["b-holder"].index.hashes == {11, 12})
        second = await master.schedule("r2", 80, 8, prefix)
        master.finished("r2")
        holder.evict(11, 12)
        await _until(lambda: not master.instances["b-holder"].index.hashes)
        third = await master.schedule("r3", 80, 8, prefix)
        return first, second, third, holder.calls["stats"]

    first, second, third, polls = asyncio.run(scenario())
    assert (first.decode, first.local_blocks) == ("b-holder", 4)
    assert (second.decode, second.local_blocks) == ("b-holder", 2)  # what is left of the prefix still attracts
    assert (third.decode, third.local_blocks) == ("a-other", 0)  # gone: the tie goes back to name order
    assert polls == 1  # the start's one read of the engines' stats; every change came as an event


def test_the_master_queue_respects_the_token_and_sequence_budgets():
    budgets = Budgets(max_batch_num_token=100, prefill_max_num_seqs=2, decode_max_num_seqs=3)

    async def scenario():
        master = _master({"m0": FakeEngine()}, budgets=budgets, sorting=SortingConfig(enabled=False))
        await master.start()
        load = master.instances["m0"].load
        tasks = [asyncio.create_task(master.schedule(f"r{i}", 60, 4, [])) for i in range(5)]
        await asyncio.sleep(0.05)
        seen = [(len(load.prefilling), load.queued_tokens, load.running, len(master.queue))]
        master.prefill_done("r0")  # r0 decodes on: its 60 tokens leave the token budget
        await asyncio.sleep(0.05)
        seen.append((len(load.prefilling), load.queued_tokens, load.running, len(master.queue)))
        master.prefill_done("r1")
        await asyncio.sleep(0.05)
        seen.append((len(load.prefilling), load.queued_tokens, load.running, len(master.queue)))
        master.finished("r0")  # a sequence leaves...
        await asyncio.sleep(0.05)
        seen.append((len(load.prefilling), load.queued_tokens, load.running, len(master.queue)))
        master.prefill_done("r2")
        await asyncio.sleep(0.05)
        seen.append((len(load.prefilling), load.queued_tokens, load.running, len(master.queue)))
        done = [t for t in tasks if t.done()]
        for t in tasks:
            t.cancel()
        return seen, len(done)

    seen, dispatched = asyncio.run(scenario())
    # 60 + 60 > 100 tokens: one prefill at a time although two sequences would fit
    assert seen[0] == (1, 60, 1, 4)
    assert seen[1] == (1, 60, 2, 3)
    # r1 prefilled: r2 starts; three sequences (the sequence budget) hold the instance
    assert seen[2] == (1, 60, 3, 2)
    assert seen[3] == (1, 60, 2, 2)  # ...but r2's 60 tokens still fill the token budget
    assert seen[4] == (1, 60, 3, 1)  # r2 prefilled: r3 comes in
    assert dispatched == 4


@pytest.mark.parametrize("sorting, dispatched", [(True, ["r0", "short"]), (False, ["r0"])])
def test_without_sorting_the_first_request_that_fits_nowhere_holds_the_line(sorting, dispatched):
    """FCFS (sorting off): a long prompt waiting for room keeps a later short one
    waiting too; with sorting, the short one goes into the room that is left."""
    async def scenario():
        master = _master({"m0": FakeEngine()}, budgets=Budgets(max_batch_num_token=100),
                         sorting=SortingConfig(enabled=sorting, starvation_ms=60_000))
        await master.start()
        tasks = [asyncio.create_task(master.schedule("r0", 60, 4, []))]
        await asyncio.sleep(0.02)
        tasks.append(asyncio.create_task(master.schedule("long", 80, 4, [])))  # 60 + 80 > 100
        await asyncio.sleep(0.02)
        tasks.append(asyncio.create_task(master.schedule("short", 30, 4, [])))  # 60 + 30 fits
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        return [e["request_id"] for e in master.dispatch_log]

    assert asyncio.run(scenario()) == dispatched


def test_a_request_over_the_whole_token_budget_goes_alone():
    async def scenario():
        master = _master({"m0": FakeEngine()}, budgets=Budgets(max_batch_num_token=100))
        await master.start()
        big = await master.schedule("big", 500, 4, [])
        small = asyncio.create_task(master.schedule("small", 10, 4, []))
        await asyncio.sleep(0.05)
        waited = not small.done()
        master.prefill_done("big")
        return big.decode, waited, (await small).decode

    assert asyncio.run(scenario()) == ("m0", True, "m0")


def test_a_starved_request_holds_the_line():
    budgets = Budgets(max_batch_num_token=100, prefill_max_num_seqs=4, decode_max_num_seqs=8)

    async def scenario():
        master = _master({"m0": FakeEngine()}, budgets=budgets, sorting=SortingConfig(starvation_ms=50))
        await master.start()
        await master.schedule("first", 90, 4, [])  # holds 90 of the 100 tokens
        long = asyncio.create_task(master.schedule("long", 80, 4, []))  # does not fit next to it
        await asyncio.sleep(0.01)
        small = asyncio.create_task(master.schedule("small", 5, 4, []))  # fits: goes ahead
        await asyncio.sleep(0.1)  # "long" is starved now
        late = asyncio.create_task(master.schedule("late", 5, 4, []))
        await asyncio.sleep(0.05)
        held_back = not late.done()  # fits, but the starved request is first in line
        master.prefill_done("first")
        master.prefill_done("small")
        await asyncio.gather(long, late)
        return small.done(), held_back, [e["request_id"] for e in master.dispatch_log]

    went_ahead, held_back, order = asyncio.run(scenario())
    assert went_ahead and held_back
    assert order == ["first", "small", "long", "late"]


def test_a_starved_request_reserves_the_instance_that_drains_first_and_the_others_keep_working():
    budgets = Budgets(max_batch_num_token=100, prefill_max_num_seqs=8, decode_max_num_seqs=64)

    async def scenario():
        master = _master({"a": FakeEngine(), "b": FakeEngine()}, budgets=budgets,
                         sorting=SortingConfig(starvation_ms=50))
        await master.start()
        a, b = master.instances["a"].load, master.instances["b"].load
        a.start_prefill("a-busy", 40)
        b.start_prefill("b-busy", 70)
        long = asyncio.create_task(master.schedule("long", 90, 4, []))  # fits on neither now
        await asyncio.sleep(0.1)  # starved: it reserves "a" (40 queued tokens drain before 70)
        small = await asyncio.wait_for(master.schedule("small", 20, 4, []), 5)  # "a" is reserved: "b"
        waiting = not long.done()
        a.finish("a-busy")
        master._wake.set()
        return small.decode, waiting, (await asyncio.wait_for(long, 5)).decode

    assert asyncio.run(scenario()) == ("b", True, "a")


def _congested(policy: str, starvation_ms: float = 60_000) -> list[tuple[str, str, int]]:
    """Two instances, one prefill at a time each, both busy: "b-holder" holds the
    prefix of a conversation's next turn, which queues behind four requests with
    nothing cached anywhere. Room frees on "a-free", then on the holder. Returns
    (request, instance, cached blocks) of the two dispatches."""
    prefix = list(range(100, 120))  # 20 blocks of 16 tokens

    async def scenario():
        holder, free = FakeEngine(holding=prefix), FakeEngine()
        master = _master({"b-holder": holder, "a-free": free}, policy=policy,
                         budgets=Budgets(prefill_max_num_seqs=1, decode_max_num_seqs=64),
                         sorting=SortingConfig(enabled=False, starvation_ms=starvation_ms))
        await master.start()
        await _until(lambda: master.instances["b-holder"].index.hashes == set(prefix))
        for name in master.instances:
            master.instances[name].load.start_prefill(f"busy-{name}", 50)
        tasks = [asyncio.create_task(master.schedule(f"q{i}", 400, 4, [])) for i in range(4)]
        tasks.append(asyncio.create_task(master.schedule("turn2", 400, 4, prefix)))
        await asyncio.sleep(0.02)
        await asyncio.sleep(0.02)  # (starvation_ms=1: all of them starved by now)
        for name in ("a-free", "b-holder"):
            master.instances[name].load.finish(f"busy-{name}")
            master._wake.set()
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        return [(e["request_id"], e["decode"], e["local_blocks"]) for e in master.dispatch_log]

    return asyncio.run(scenario())


def test_omni_gives_the_room_freed_on_the_holder_to_the_conversations_next_turn():
    assert _congested("omni") == [("q0", "a-free", 0), ("turn2", "b-holder", 20)]


@pytest.mark.parametrize("policy", ["omni_reference", "cache_aware", "round_robin"])
def test_a_policy_that_does_not_wait_gives_each_room_to_the_first_in_line(policy):
    assert [(rid, inst) for rid, inst, _ in _congested(policy)] == [("q0", "a-free"), ("q1", "b-holder")]


def test_starved_requests_go_first_in_line_onto_any_room():
    assert [(rid, inst) for rid, inst, _ in _congested("omni", starvation_ms=1)] == [("q0", "a-free"), ("q1", "b-holder")]


def test_omni_does_not_wait_for_a_full_instance_that_holds_no_more_of_the_prefix():
    budgets = Budgets(max_batch_num_token=10_000, prefill_max_num_seqs=8, decode_max_num_seqs=2)

    async def scenario():
        master = _master({"a-full": FakeEngine(), "b-open": FakeEngine()}, budgets=budgets)
        await master.start()
        full, busy = master.instances["a-full"].load, master.instances["b-open"].load
        full.start_decode("d1", 100)
        full.start_decode("d2", 100)  # at its sequence budget, nothing queued: the "least loaded" by tokens
        busy.start_prefill("p1", 3000)
        return await asyncio.wait_for(master.schedule("r", 500, 4, []), 5)

    assert asyncio.run(scenario()).decode == "b-open"


def test_the_decode_queue_is_served_in_decode_weight_order():
    budgets = Budgets(decode_max_num_seqs=1)
    roles = {"p0": "prefill", "d0": "decode"}

    async def scenario():
        master = _master({"p0": FakeEngine(), "d0": FakeEngine()}, role=roles, budgets=budgets)
        await master.start()
        for rid in ("hold", "short", "long", "mid"):
            await master.schedule(rid, {"hold": 10, "short": 10, "long": 900, "mid": 300}[rid], 4, [])
        first = await master.schedule_decode("hold", 10, 4)  # takes d0's only slot
        waiting = [asyncio.create_task(master.schedule_decode(r, n, 4)) for r, n in
                   (("short", 10), ("long", 900), ("mid", 300))]
        await asyncio.sleep(0.05)
        served = []
        current = "hold"
        for _ in waiting:
            master.finished(current)
            await _until(lambda: any(t.done() and t not in served for t in waiting))
            task = next(t for t in waiting if t.done() and t not in served)
            served.append(task)
            current = ("short", "long", "mid")[waiting.index(task)]
        return first.decode, [("short", "long", "mid")[waiting.index(t)] for t in served]

    decode, order = asyncio.run(scenario())
    assert decode == "d0"
    assert order == ["long", "mid", "short"]  # longest first (prompt + 0 * max_tokens)


def test_a_restarted_master_rebuilds_its_index_and_loads_from_the_engines():
    held = [{"request_id": "a", "prompt_tokens": 64, "max_tokens": 8, "uncached_tokens": 32, "prefilled": False},
            {"request_id": "b", "prompt_tokens": 40, "max_tokens": 8, "uncached_tokens": 40, "prefilled": True}]

    async def scenario():
        engine = FakeEngine(holding=[1, 2, 3], requests=held)
        engine.store(4)  # events before the new master subscribed: it gets them in its dump
        master = _master({"m0": engine})
        await master.start()
        await _until(lambda: master.instances["m0"].index.hashes == {1, 2, 3, 4})
        engine.store(5)
        await _until(lambda: 5 in master.instances["m0"].index.hashes)
        load = master.instances["m0"].load
        return load.prefilling, sorted(load.decoding), master.instances["m0"].index.dumps

    prefilling, decoding, dumps = asyncio.run(scenario())
    assert prefilling == {"a": 32}
    assert decoding == ["b"]
    assert dumps == 1  # one dump, then events


def test_a_gap_in_the_events_asks_for_a_dump():
    async def scenario():
        engine = FakeEngine(holding=[1])
        master = _master({"m0": engine})
        await master.start()
        index = master.instances["m0"].index
        await _until(lambda: index.hashes == {1})
        dumps = index.dumps
        for h in range(2, 7):  # five batches while the master does not run; the log keeps the last two
            engine.store(h)
        engine.log.batches = type(engine.log.batches)(list(engine.log.batches)[-2:], maxlen=2)
        await _until(lambda: index.hashes == {1, 2, 3, 4, 5, 6})
        return index.dumps - dumps

    assert asyncio.run(scenario()) == 1


class _SlowEngine(FakeEngine):
    """An engine too busy to answer the master's refresh in time."""

    def __init__(self):
        super().__init__()

        async def late(*args):
            await asyncio.sleep(10)

        self.stats = self.npu_stats = _Call(late)


def test_a_slow_engine_stays_in_routing_until_it_misses_several_refreshes_in_a_row():
    async def scenario():
        master = _master({"m0": FakeEngine()})
        inst = master.instances["m0"]
        master.refresh_timeout_s = 0.01
        await master.refresh()
        answering = inst.engine
        inst.engine = _SlowEngine()
        seen = []
        for _ in range(3):
            await master.refresh()
            seen.append(inst.healthy)
        inst.engine = answering  # it answers again: back in routing
        await master.refresh()
        return seen + [inst.healthy]

    assert asyncio.run(scenario()) == [True, True, False, True]


def test_an_engine_that_died_leaves_routing_at_once():
    async def died():
        raise ray.exceptions.RayActorError()

    async def scenario():
        engine = FakeEngine()
        master = _master({"m0": engine})
        engine.stats = _Call(died)
        await master.refresh()
        return master.instances["m0"].healthy

    assert asyncio.run(scenario()) is False
