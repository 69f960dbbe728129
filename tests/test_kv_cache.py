"""Prefix-chain block hashes and the global KV cache actor."""

from __future__ import annotations

import asyncio

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import ray

from actors.kv_cache import KV_CACHE_NAME, GlobalKVCache, get_or_create_kv_cache
from actors.kv_hash import ROOT, block_hashes, hash_block

pytestmark = pytest.mark.ray

# Workers must unpickle the producer actor defined here; tests/ is not a package on their path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BS = 4
BLOCK_BYTES = 4 * 8  # one block: 4 float64


# ---------------------------------------------------------------- hashes


def test_same_tokens_same_hashes_and_64_bit():
    toks = list(range(100, 117))
    a = block_hashes(toks, BS)
    assert a == block_hashes(list(toks), BS)
    assert all(0 <= h < 1 << 64 for h in a)
    assert len(set(a)) == len(a)


def test_hashes_identical_across_processes():
    toks = [7, 3, 99, 100000, 0, 1, 2, 3, 5, 5, 5, 5, 42]
    code = (
        "import json; from actors.kv_hash import block_hashes; "
        f"print(json.dumps([block_hashes({toks!r}, {BS}), block_hashes({toks!r}, {BS}, extra='lora-a')]))"
    )
    for seed in ("0", "12345"):  # a different string-hash salt must not matter
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        assert json.loads(out) == [block_hashes(toks, BS), block_hashes(toks, BS, extra="lora-a")]


def test_change_in_block_2_changes_hashes_from_2_on():
    toks = list(range(20))
    other = list(toks)
    other[2 * BS + 1] += 1
    a, b = block_hashes(toks, BS), block_hashes(other, BS)
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:]))


def test_partial_block_not_hashed():
    assert len(block_hashes(list(range(11)), BS)) == 2
    assert block_hashes(list(range(11)), BS) == block_hashes(list(range(8)), BS)
    assert block_hashes([1, 2, 3], BS) == []
    with pytest.raises(ValueError):
        block_hashes([1], 0)


def test_extra_changes_chain_and_incremental_matches():
    toks = list(range(12))
    plain, a, b = (block_hashes(toks, BS, extra=e) for e in (None, "a", "b"))
    assert plain != a and a != b and plain[0] != a[0]
    assert block_hashes(toks, BS, extra="") != plain  # "" is not None
    parent, chain = ROOT, []
    for i in range(0, 12, BS):
        parent = hash_block(parent, toks[i : i + BS], "a")
        chain.append(parent)
    assert chain == a
    assert block_hashes(toks, BS, root=123) != plain


# ---------------------------------------------------------------- cache actor


def _new_cache(capacity_bytes):
    # A unique name per test: the actor is named and tests share one Ray session.
    return get_or_create_kv_cache(capacity_bytes, name=f"kv-test-{uuid.uuid4().hex}")


def _put_blocks(cache, hashes, seed=0):
    arrays = [np.arange(BS, dtype=np.float64) + seed + 10 * i for i in range(len(hashes))]
    entries = [(h, [ray.put(a)], a.nbytes) for h, a in zip(hashes, arrays)]
    return arrays, ray.get(cache.put.remote(entries))


@ray.remote(num_cpus=0)
class Producer:
    """Stands in for an NPU actor: computes blocks, puts them, registers them with the cache.

    The refs it puts are owned by this actor; once `put` returned, the cache owns copies.
    """

    def produce(self, cache, hashes, size=BS):
        entries = []
        for i, h in enumerate(hashes):
            a = np.full(size, float(i), dtype=np.float64)
            entries.append((h, [ray.put(a)], a.nbytes))
        return ray.get(cache.put.remote(entries))


def test_put_and_match_longest_prefix(ray_session):
    cache = _new_cache(100 * BLOCK_BYTES)
    hashes = block_hashes(list(range(5 * BS)), BS)
    arrays, new = _put_blocks(cache, hashes[:3])
    assert new == 3
    assert ray.get(cache.put.remote([(hashes[0], [ray.put(np.zeros(1))], 8)])) == 0  # already there

    m = ray.get(cache.match.remote(hashes))
    assert m["num_blocks"] == 3
    got = ray.get([r[0] for r in m["refs"]])
    for g, a in zip(got, arrays):
        np.testing.assert_array_equal(g, a)  # the first ref kept, not the duplicate's

    s = ray.get(cache.stats.remote())
    assert ray.get(cache.contains.remote(hashes)) == [True, True, True, False, False]
    assert ray.get(cache.stats.remote()) == s  # contains changes nothing
    assert s["blocks"] == 3 and s["bytes"] == 3 * BLOCK_BYTES and s["puts"] == 3


def test_hit_and_miss_counters(ray_session):
    cache = _new_cache(100 * BLOCK_BYTES)
    hashes = block_hashes(list(range(5 * BS)), BS)
    _put_blocks(cache, [hashes[0], hashes[1], hashes[3]])
    m = ray.get(cache.match.remote(hashes))
    assert m["num_blocks"] == 2  # a gap at block 2 ends the match; block 3 is not used
    assert ray.get(cache.match.remote([]))["num_blocks"] == 0
    s = ray.get(cache.stats.remote())
    assert (s["hits"], s["misses"]) == (2, 3)


def test_blocks_outlive_producer(ray_session):
    cache = _new_cache(100 * BLOCK_BYTES)
    hashes = block_hashes(list(range(3 * BS)), BS)
    producer = Producer.remote()
    assert ray.get(producer.produce.remote(cache, hashes)) == 3
    ray.kill(producer)
    m = ray.get(cache.match.remote(hashes))
    assert m["num_blocks"] == 3
    got = ray.get([r[0] for r in m["refs"]], timeout=30)
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, np.full(BS, float(i)))


def test_lru_eviction(ray_session):
    n = 3
    cache = _new_cache(n * BLOCK_BYTES)
    hashes = block_hashes(list(range(6 * BS)), BS)
    _put_blocks(cache, hashes[:3])
    ray.get(cache.match.remote(hashes[:1]))  # block 0 becomes most recently used
    _, new = _put_blocks(cache, hashes[3:4])
    assert new == 1
    assert ray.get(cache.contains.remote(hashes[:4])) == [True, False, True, True]  # 1 was LRU
    s = ray.get(cache.stats.remote())
    assert s["evictions"] == 1 and s["bytes"] <= s["capacity_bytes"] and s["blocks"] == n

    _put_blocks(cache, hashes[4:6])  # evicts 2, then 0 (3 was put after 0's touch)
    assert ray.get(cache.contains.remote(hashes)) == [False, False, False, True, True, True]
    s = ray.get(cache.stats.remote())
    assert s["evictions"] == 3 and s["bytes"] == n * BLOCK_BYTES <= s["capacity_bytes"]

    # A re-put of a present hash refreshes it: 3 survives the next eviction.
    assert ray.get(cache.put.remote([(hashes[3], [ray.put(np.zeros(BS))], BLOCK_BYTES)])) == 0
    _put_blocks(cache, hashes[:1])
    assert ray.get(cache.contains.remote(hashes[3:6])) == [True, False, True]


def test_oversize_block_evict_and_clear(ray_session):
    cache = _new_cache(2 * BLOCK_BYTES)
    hashes = block_hashes(list(range(3 * BS)), BS)
    big = np.zeros(3 * BS)
    assert ray.get(cache.put.remote([(hashes[0], [ray.put(big)], big.nbytes)])) == 0
    _put_blocks(cache, hashes[:2])
    assert ray.get(cache.evict.remote([hashes[0], hashes[2]])) == 1
    s = ray.get(cache.stats.remote())
    assert (s["blocks"], s["bytes"], s["evictions"]) == (1, BLOCK_BYTES, 0)
    assert ray.get(cache.clear.remote()) == 1
    s = ray.get(cache.stats.remote())
    assert (s["blocks"], s["bytes"], s["puts"]) == (0, 0, 2)


def test_get_or_create_returns_same_actor(ray_session):
    a = get_or_create_kv_cache(10 * BLOCK_BYTES)
    b = get_or_create_kv_cache(999)  # exists already: capacity of the first wins
    assert a._actor_id == b._actor_id
    assert ray.get_actor(KV_CACHE_NAME)._actor_id == a._actor_id
    h = block_hashes(list(range(BS)), BS)
    _put_blocks(a, h)
    assert ray.get(b.contains.remote(h)) == [True]
    assert ray.get(b.stats.remote())["capacity_bytes"] == 10 * BLOCK_BYTES
    ray.kill(a)


def test_an_npu_publishes_through_a_cache_that_died_and_indexes_in_its_successor(ray_session):
    """The prefix index is an optimisation: an NPU's step must not fail because the
    cache actor is restarting or gone (it did, under a killed cache: a step raised
    ActorUnavailableError and took a request's failover down with it)."""
    from actors.compute.kv_pool import BlockPublisher
    from actors.expert_map import ExpertMap
    from actors.protocol import NPUSpec
    from cluster.config import load_manifest

    cfg = load_manifest("local").model
    name = f"omniray.kv_cache.test-{uuid.uuid4().hex[:6]}"
    spec = NPUSpec("x.npu0", "x", 0, "910B", "emulated", cfg, ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 1),
                   "x-group", kv_cache_name=name)
    publisher = BlockPublisher(spec)
    first = get_or_create_kv_cache(1 << 20, name=name)
    h1, h2 = block_hashes(list(range(2 * BS)), BS)
    assert list(publisher.publish([("s1", h1)], np.zeros((1, BS)))) == ["s1"]
    assert ray.get(publisher._told) == 1  # (told, not awaited: an async actor's calls may run out of order)
    assert ray.get(first.contains.remote([h1])) == [True]
    ray.kill(first, no_restart=True)
    exported = publisher.publish([("s1", h2)], np.ones((1, BS)))  # no error: the block is the sequence's still
    (ref, row), = exported["s1"]
    assert (ray.get(ref)[row] == 1).all()
    ray.wait([publisher._told], timeout=30)  # the dead cache's answer: the publisher looks the name up again
    second = get_or_create_kv_cache(1 << 20, name=name)  # a successor under the name is found again
    publisher.publish([("s2", h2)], np.ones((1, BS)))
    assert ray.get(publisher._told) == 1  # told the successor (then asked: an async actor's calls may reorder)
    assert ray.get(second.contains.remote([h2])) == [True]
    ray.kill(second)


def test_a_step_object_of_several_blocks_is_indexed_at_once_and_copied_out_block_by_block(ray_session):
    """An NPU puts a step's blocks as one object and tells the cache without waiting:
    a match while the put copies them out sees them (the producer's object and
    row), and once the put is done each is a block object of the cache's own."""
    cache = GlobalKVCache(100 * BLOCK_BYTES)  # the actor's class, its calls interleaved by hand
    hashes = block_hashes(list(range(3 * BS)), BS)
    ref = ray.put(np.stack([np.full(BS, float(i)) for i in range(3)]))

    async def main():
        put = asyncio.get_running_loop().create_task(cache.put([(h, [ref, i], BLOCK_BYTES) for i, h in enumerate(hashes)]))
        await asyncio.sleep(0)  # the put runs until it waits for its copies
        early = cache.match(hashes)
        return early, await put, cache.match(hashes)

    early, stored, late = asyncio.run(main())
    assert early["num_blocks"] == 3 and [src[1] for src in early["refs"]] == [0, 1, 2]
    assert stored == 3 and cache.stats()["puts"] == 3
    assert all(len(src) == 1 for src in late["refs"])  # the cache's own copies
    for i, (block,) in enumerate(late["refs"]):
        np.testing.assert_array_equal(ray.get(block), np.full(BS, float(i)))


def test_a_put_whose_blocks_are_lost_leaves_the_index_as_it_was(ray_session):
    """Blocks that cannot be copied out (their producer died, or its step object is
    an error) leave the index again: a later match misses, nothing else breaks."""
    cache = _new_cache(100 * BLOCK_BYTES)
    hashes = block_hashes(list(range(2 * BS)), BS)
    lost = _lost_step.remote()
    assert ray.get(cache.put.remote([(h, [lost, i], BLOCK_BYTES) for i, h in enumerate(hashes)])) == 0
    assert ray.get(cache.contains.remote(hashes)) == [False, False]
    s = ray.get(cache.stats.remote())
    assert (s["blocks"], s["bytes"], s["puts"]) == (0, 0, 0)
    _put_blocks(cache, hashes)  # the next put of them is stored
    assert ray.get(cache.contains.remote(hashes)) == [True, True]


@ray.remote(num_cpus=0, max_retries=0)
def _lost_step():
    raise RuntimeError("the step object never came")


def test_plain_class_sync_methods():
    c = GlobalKVCache(2)
    assert c.contains([1]) == [False]
    assert c.match([1, 2]) == {"num_blocks": 0, "refs": []}
    assert c.stats()["misses"] == 2
    with pytest.raises(ValueError):
        GlobalKVCache(-1)


def test_concurrent_puts_of_same_hashes_store_once(ray_session):
    cache = _new_cache(100 * BLOCK_BYTES)
    hashes = block_hashes(list(range(4 * BS)), BS)
    a = np.ones(BS)
    calls = [cache.put.remote([(h, [ray.put(a)], a.nbytes) for h in hashes]) for _ in range(5)]
    assert sum(ray.get(calls)) == 4
    s = ray.get(cache.stats.remote())
    assert (s["blocks"], s["bytes"], s["puts"]) == (4, 4 * BLOCK_BYTES, 4)


def test_large_blocks_in_plasma_outlive_producer(ray_session):
    # 1 MiB blocks are stored in shared memory, not inlined like the small ones above.
    size = 1 << 17
    cache = _new_cache(10 * size * 8)
    hashes = block_hashes(list(range(2 * BS)), BS)
    producer = Producer.remote()
    assert ray.get(producer.produce.remote(cache, hashes, size)) == 2
    ray.kill(producer)
    refs = [r[0] for r in ray.get(cache.match.remote(hashes))["refs"]]
    for i, g in enumerate(ray.get(refs, timeout=30)):
        assert g.shape == (size,) and (g == float(i)).all()
