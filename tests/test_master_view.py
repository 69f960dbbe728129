"""The master's prefix view of an instance survives a cache sync that races with the
requests it routes: blocks of a request that finished while the sync was in flight
stay in the view (the routing test that follows a cached prefix relies on it)."""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.proxy.master import InstanceRef, OmniMaster


class _Call:
    """`engine.method.remote()` of an engine that answers from the test."""

    def __init__(self, answer):
        self.answer = answer

    def remote(self):
        return self.answer()


class _Engine:
    def __init__(self):
        self.held: list[int] = []  # the blocks the engine reports
        self.release = asyncio.Event()
        self.asked = asyncio.Event()

        async def stats():
            return {"running": 0, "waiting": 0, "free_blocks": [100], "total_blocks": [100]}

        async def cached_hashes():
            held = list(self.held)  # the engine's answer is fixed when it is asked...
            self.asked.set()
            await self.release.wait()  # ...and reaches the master later
            return held

        async def npu_stats():
            return []

        self.stats, self.cached_hashes, self.npu_stats = _Call(stats), _Call(cached_hashes), _Call(npu_stats)


@pytest.fixture(autouse=True)
def no_named_actors(monkeypatch):
    """No controller and no global KV cache: the master keeps the instances it is given
    (and starts no Ray session to look for them)."""

    def missing(name, *args, **kwargs):
        raise ValueError(f"no actor named {name}")

    monkeypatch.setattr(ray, "get_actor", missing)


def _master_with(engine: _Engine) -> tuple[OmniMaster, InstanceRef]:
    master = OmniMaster([])
    inst = InstanceRef("mixed-0", "mixed", engine, max_num_seqs=8)
    master.instances = {inst.name: inst}
    return master, inst


def test_a_request_finishing_during_a_cache_sync_keeps_its_blocks_in_the_view():
    async def scenario():
        engine = _Engine()
        master, inst = _master_with(engine)
        sync = asyncio.create_task(master.refresh(sync_cache=True))
        await engine.asked.wait()  # the engine answered without the request's blocks
        master.assigned["r1"] = (inst.name, inst.name, 8, [11, 12, 13])
        master._remember(inst, [11, 12, 13])
        master.finished("r1")  # finished (and left `assigned`) before the answer arrives
        engine.release.set()
        await sync
        return list(inst.cached)

    assert asyncio.run(scenario()) == [11, 12, 13]


def test_a_sync_still_forgets_blocks_the_engine_dropped_before_it_was_asked():
    async def scenario():
        engine = _Engine()
        master, inst = _master_with(engine)
        master.assigned["old"] = (inst.name, inst.name, 8, [1, 2])
        master._remember(inst, [1, 2])
        master.finished("old")  # finished before the sync: the engine's answer is the truth
        engine.held = [2]  # block 1 was evicted
        engine.release.set()
        await master.refresh(sync_cache=True)
        return list(inst.cached), len(inst.finished_recently)

    assert asyncio.run(scenario()) == ([2], 0)  # and the finished request is no longer kept for later syncs


class _SlowEngine:
    """An engine too busy to answer the master's refresh in time."""

    def __init__(self):
        async def late():
            await asyncio.sleep(10)

        self.stats = self.cached_hashes = self.npu_stats = _Call(late)


def test_a_slow_engine_stays_in_routing_until_it_misses_several_refreshes_in_a_row():
    async def scenario():
        engine = _Engine()
        engine.release.set()
        master, inst = _master_with(engine)
        master.refresh_timeout_s = 0.01
        await master.refresh()
        answering = inst.engine
        inst.engine = _SlowEngine()
        seen = []
        for _ in range(3):
            await master.refresh()
            seen.append(inst.view.healthy)
        inst.engine = answering  # it answers again: back in routing
        await master.refresh()
        return seen + [inst.view.healthy]

    assert asyncio.run(scenario()) == [True, True, False, True]


def test_an_engine_that_died_leaves_routing_at_once():
    async def died():
        raise ray.exceptions.RayActorError()

    async def scenario():
        engine = _Engine()
        master, inst = _master_with(engine)
        engine.stats = _Call(died)
        await master.refresh()
        return inst.view.healthy

    assert asyncio.run(scenario()) is False
