"""The master publishes its state to the object store and the slaves poll it: a fetch
that never returns (seen when the master dropped a ref a slave was still fetching)
costs one poll, not the slave's view for good."""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.proxy.master import fetch_published

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class _Never:
    """Holds a call open for as long as the actor lives: a ref that never resolves."""

    async def wait(self):
        await asyncio.Event().wait()


@ray.remote(num_cpus=0)
class _Master:
    """Hands out refs as the master does, the first of them one that never resolves."""

    def __init__(self, never):
        self.refs = [never.wait.remote(), ray.put({"time": 1.0})]

    def published(self) -> list:
        return [self.refs.pop(0)] if self.refs else []


def test_a_fetch_that_never_returns_costs_one_poll(ray_session):
    never = _Never.remote()
    master = _Master.remote(never)
    try:
        assert asyncio.run(fetch_published(master, 0.5)) is None  # bounded: it gives up
        assert asyncio.run(fetch_published(master, 5.0)) == {"time": 1.0}  # the next poll reads
        assert asyncio.run(fetch_published(master, 5.0)) is None  # nothing published: None, at once
    finally:
        ray.kill(master)
        ray.kill(never)


def test_a_master_that_is_gone_reads_none(ray_session):
    never = _Never.remote()
    master = _Master.remote(never)
    ray.kill(master)
    try:
        assert asyncio.run(fetch_published(master, 5.0)) is None
    finally:
        ray.kill(never)
