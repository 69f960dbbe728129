"""Tests for cluster/proxy/token_cache.py: the slave's tokenizer thread (off the
event loop, batched) and the token cache's bounds. No Ray."""

import asyncio
import random
import threading
import time
from array import array

import pytest

from actors.kv_hash import block_hashes
from cluster.proxy.token_cache import TokenCache, TokenizerThread, entry_bytes
from cluster.proxy.tokens import Tokenizer

pytestmark = pytest.mark.fast

TEXTS = ["The scheduler routes requests.", "你好，世界！专家并行 🚀", "code:\n\treturn x ** 2\r\n", "", "  a  "]


class Counting(Tokenizer):
    """The shipped tokenizer, recording when encode_batch runs (and how often)."""

    def __init__(self):
        base = Tokenizer.from_file()
        super().__init__(base.hf, base.source)
        self.batch_sizes: list[int] = []
        self.busy = threading.Event()  # inside encode_batch now

    def encode_batch(self, texts, add_special_tokens=True):
        self.busy.set()
        try:
            return super().encode_batch(texts, add_special_tokens)
        finally:
            self.busy.clear()
            self.batch_sizes.append(len(texts))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file()


@pytest.fixture()
def counting():
    return Counting()


def megabyte_prompt() -> str:
    rng = random.Random(0)
    words = ["scheduler", "expert", "routing", "the", "NPU", "token", "你好", "cache", "of", "🚀"]
    return " ".join(rng.choice(words) for _ in range(200_000)).encode()[: 1 << 20].decode(errors="ignore")


def test_ids_are_the_tokenizers(tok):
    async def main(cache):
        many = await cache.encode_many(TEXTS + TEXTS[:2])  # a repeat within one call, then hits
        again = await cache.encode_many(TEXTS)
        chat = tok.chat_segments([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 🚀"}])
        return many, again, await cache.encode_segments(chat), "".join(chat)

    for enabled in (True, False):
        cache = TokenCache(tok, enabled=enabled)
        many, again, chat_ids, chat = asyncio.run(main(cache))
        assert many == [tok.encode(t) for t in TEXTS + TEXTS[:2]] and again == many[: len(TEXTS)]
        assert chat_ids == tok.encode(chat)
        assert many[0] is not many[-2]  # a repeated text gets its own list
        cache.thread.close()
    assert cache.stats()["tokenizer_cache_hits"] == 0  # (disabled)


def test_tokenizing_a_megabyte_prompt_does_not_block_the_loop(counting):
    """While the thread encodes ~1 MB, another coroutine on the loop keeps ticking.
    Also prints the loop's longest stall, then and as before (encode on the loop)."""
    text = megabyte_prompt()

    async def measure(tokenize):
        ticks_while_busy, gaps, done = 0, [], False

        async def ticker():
            nonlocal ticks_while_busy
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
                ticks_while_busy += counting.busy.is_set()

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        ids = await tokenize()
        took = time.perf_counter() - t0
        done = True
        await task
        return ids, ticks_while_busy, max(gaps), took

    cache = TokenCache(counting)

    async def on_thread():
        ids = await cache.encode(text)
        return ids, await cache.thread.run(block_hashes, ids, 16)

    async def on_loop():  # what the slave did before: tokenize and hash inline
        counting.busy.set()
        try:
            ids = counting.hf.encode(text).ids
            return ids, block_hashes(ids, 16)
        finally:
            counting.busy.clear()

    (ids, hashes), ticks, stall, took = asyncio.run(measure(on_thread))
    (want, want_hashes), ticks_before, stall_before, took_before = asyncio.run(measure(on_loop))
    cache.thread.close()
    print(f"\n1 MiB prompt ({len(text.encode()) / 2**20:.2f} MiB, {len(ids)} ids) tokenized and hashed: "
          f"loop's longest stall {1e3 * stall_before:.0f} ms on the loop (took {1e3 * took_before:.0f} ms), "
          f"{1e3 * stall:.1f} ms on the tokenizer thread (took {1e3 * took:.0f} ms, {ticks} ticks meanwhile)")
    assert ids == want and hashes == want_hashes
    assert ticks > 0 and ticks_before == 0


def test_waiting_texts_go_through_one_encode_batch(counting):
    async def main(cache):
        gate = threading.Event()
        held = asyncio.ensure_future(cache.thread.run(gate.wait))  # the thread is busy: jobs queue up
        texts = [f"request number {i}" for i in range(8)]
        tasks = [asyncio.ensure_future(cache.encode(t)) for t in [*texts, texts[0]]]  # texts[0] twice: in flight
        await asyncio.sleep(0)  # each has handed its text over
        gate.set()
        await held
        return texts, await asyncio.gather(*tasks)

    cache = TokenCache(counting)
    texts, got = asyncio.run(main(cache))
    cache.thread.close()
    assert got == [counting.encode(t) for t in [*texts, texts[0]]]
    assert counting.batch_sizes == [8]  # 9 requests, 8 texts, one call
    assert cache.stats() | {"tokenizer_s": 0} == {
        "tokenizer_calls": 8, "tokenizer_cache_hits": 1, "tokenizer_s": 0, "tokenizer_batches": 1,
        "tokenizer_cache_entries": 8, "tokenizer_cache_bytes": sum(entry_bytes(t, array("i", counting.encode(t)))
                                                                   for t in texts)}


def test_a_cancelled_request_leaves_the_text_to_the_others(tok):
    async def main(cache):
        gate = threading.Event()
        held = asyncio.ensure_future(cache.thread.run(gate.wait))
        first, second = asyncio.ensure_future(cache.encode("shared")), asyncio.ensure_future(cache.encode("shared"))
        await asyncio.sleep(0)
        first.cancel()
        gate.set()
        await held
        return await second

    cache = TokenCache(tok)
    assert asyncio.run(main(cache)) == tok.encode("shared")
    cache.thread.close()
    assert cache.stats()["tokenizer_cache_entries"] == 1


def test_errors_come_back_and_the_thread_goes_on(tok):
    async def main(thread):
        with pytest.raises(ZeroDivisionError):
            await thread.run(lambda: 1 / 0)
        with pytest.raises(ValueError, match="block_size"):
            await thread.run(block_hashes, [1, 2], 0)
        return await thread.encode_batch(["still here"], add_special_tokens=False)

    thread = TokenizerThread(tok)
    assert asyncio.run(main(thread)) == [tok.encode("still here", add_special_tokens=False)]
    thread.close()


def test_a_bad_text_fails_its_own_request_only(counting):
    async def main(cache):
        gate = threading.Event()
        held = asyncio.ensure_future(cache.thread.run(gate.wait))
        good = asyncio.ensure_future(cache.encode("fine"))
        bad = asyncio.ensure_future(cache.encode("lone \ud800 surrogate"))
        await asyncio.sleep(0)
        gate.set()
        await held
        return await good, await asyncio.gather(bad, return_exceptions=True)

    cache = TokenCache(counting)
    good, (bad,) = asyncio.run(main(cache))
    cache.thread.close()
    assert good == counting.encode("fine") and isinstance(bad, TypeError)
    assert cache.stats()["tokenizer_cache_entries"] == 1 and not cache._pending


def test_the_byte_budget_evicts_the_oldest(tok):
    texts = [f"entry {i} " * 50 for i in range(4)]
    sizes = [entry_bytes(t, array("i", tok.encode(t))) for t in texts]
    cache = TokenCache(tok, capacity=100, max_bytes=sizes[0] + sizes[1] + sizes[2] // 2)

    async def main():
        for t in texts[:2]:
            await cache.encode(t)
        await cache.encode(texts[0])  # now the most recently used
        await cache.encode(texts[2])  # over the budget: texts[1] goes
        assert list(cache._lru) == [texts[0], texts[2]] and cache.bytes == sizes[0] + sizes[2]
        huge = "x " * (cache.max_bytes // 2)
        assert await cache.encode(huge) == tok.encode(huge)  # larger than the budget: not kept
        assert list(cache._lru) == [texts[0], texts[2]]
        calls = cache.calls
        await cache.encode(huge)
        await cache.encode(texts[0])
        assert cache.calls == calls + 1  # the huge one again, texts[0] from the cache

    asyncio.run(main())
    cache.thread.close()
    assert cache.stats()["tokenizer_cache_bytes"] == cache.bytes <= cache.max_bytes


def test_the_entry_bound_still_holds(tok):
    cache = TokenCache(tok, capacity=2)

    async def main():
        for t in ["a", "b", "c", "a"]:
            await cache.encode(t)

    asyncio.run(main())
    cache.thread.close()
    assert list(cache._lru) == ["c", "a"] and cache.calls == 4 and cache.hits == 0
    assert cache.bytes == sum(entry_bytes(t, array("i", tok.encode(t))) for t in "ca")


def test_the_setting_defaults_to_64_mib():
    from cluster.config import ProxySettings

    assert ProxySettings().tokenizer_cache_bytes == 64 << 20
    with pytest.raises(ValueError, match="tokenizer_cache_bytes"):
        ProxySettings(tokenizer_cache_bytes=-1)
