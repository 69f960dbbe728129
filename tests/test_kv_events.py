"""KV events: the producer's log (numbering, long poll, dumps), instance-level
counting over several NPUs, and the subscriber's index (order, gaps, epochs)."""

from __future__ import annotations

import asyncio

import pytest

from actors.kv_events import HashCounts, KVEventBatch, KVEventLog
from cluster.proxy.prefix_index import PrefixIndex

pytestmark = pytest.mark.fast


def test_a_new_subscriber_gets_a_dump_then_the_batches_after_it():
    held = {1, 2}
    log = KVEventLog(lambda: sorted(held))

    async def scenario():
        dump = await log.after(None, None)
        held.add(3)
        log.record(stored=[3])
        log.record()  # a step that changed nothing records nothing
        later = await log.after(dump[0].seq, dump[0].epoch)
        return dump, later

    dump, later = asyncio.run(scenario())
    assert len(dump) == 1 and dump[0].cleared and dump[0].stored == (1, 2) and dump[0].seq == 0
    assert [(b.seq, b.stored, b.removed, b.cleared) for b in later] == [(1, (3,), (), False)]


def test_the_long_poll_returns_when_a_batch_lands_and_empty_when_none_does():
    log = KVEventLog(lambda: [])

    async def scenario():
        epoch = log.epoch
        waiting = asyncio.create_task(log.after(0, epoch, wait_s=5.0))
        await asyncio.sleep(0.01)
        pending = not waiting.done()
        log.record(removed=[7])
        got = await waiting
        empty = await log.after(1, epoch, wait_s=0.01)
        return pending, got, empty

    pending, got, empty = asyncio.run(scenario())
    assert pending and [b.removed for b in got] == [(7,)] and empty == []


def test_another_epoch_or_a_subscriber_too_far_behind_gets_a_dump():
    log = KVEventLog(lambda: [5], keep=2)
    for h in range(4):
        log.record(stored=[h])

    async def scenario():
        return (await log.after(3, "other-epoch"))[0], (await log.after(1, log.epoch))[0], await log.after(2, log.epoch)

    other, behind, kept = asyncio.run(scenario())
    assert other.cleared and behind.cleared and behind.seq == 4
    assert [b.seq for b in kept] == [3, 4]


def test_instance_events_count_every_npu_holding_a_hash():
    counts = HashCounts()
    assert counts.apply([(True, 1), (True, 2)]) == ([1, 2], [])
    assert counts.apply([(True, 1)]) == ([], [])  # a second NPU caches the same prefix block
    assert counts.apply([(False, 1)]) == ([], [])  # one of them evicts it: still held
    assert counts.apply([(False, 1), (True, 3), (False, 3)]) == ([], [1])  # 3 came and went within the step
    assert counts.reset([[2, 4], [4]]) == ([4], [])
    assert counts.counts == {2: 1, 4: 2}


def _batch(seq, stored=(), removed=(), cleared=False, epoch="e1"):
    return KVEventBatch(epoch, seq, 0.0, tuple(stored), tuple(removed), cleared)


def test_the_index_applies_batches_in_order_and_stops_at_a_gap():
    index = PrefixIndex()
    index.apply([_batch(3, [1, 2, 3], cleared=True), _batch(4, removed=[2]), _batch(5, stored=[9])])
    assert index.hashes == {1, 3, 9} and index.seq == 5
    assert index.depth([1, 3, 9]) == 3 and index.depth([1, 2, 3]) == 1
    index.apply([_batch(7, stored=[8]), _batch(8, stored=[10])])  # 6 is missing
    assert index.seq is None and index.hashes == {1, 3, 9}  # the next call asks for a dump
    index.apply([_batch(8, [1, 8, 10], cleared=True)])
    assert index.hashes == {1, 8, 10} and index.seq == 8
    index.apply([_batch(1, stored=[4], epoch="e2")])  # a restarted producer: not applied on top
    assert index.seq is None and 4 not in index.hashes
