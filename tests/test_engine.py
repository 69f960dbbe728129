"""The instance engine: continuous batching over paged KV, prefix reuse, the
global KV cache, P/D hand-off, running out of blocks, and emulated mode."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import ray

from actors.compute.emulated import standin_token
from actors.engine.scheduler import SchedulerConfig
from actors.kv_cache import get_or_create_kv_cache
from actors.kv_hash import block_hashes
from actors.model.reference import generate
from actors.protocol import EngineRequest, SamplingParams
from cluster.config import load_manifest
from cluster.launcher import launch_engine, launch_instance

pytestmark = pytest.mark.ray

BS = 16


def _engine(cfg, refs, ep=2, role="mixed", kv_blocks=None, cache=None, compute="real", device="910B", sched=None,
            overlap=True):
    name = f"{role}-{uuid.uuid4().hex[:6]}"
    inst = launch_instance(name, cfg, ep, compute, device, refs, role=role, kv_blocks=kv_blocks, kv_cache_name=cache,
                           time_scale=0.0)
    launch_engine(inst, sched or SchedulerConfig(block_size=BS), kv_cache_name=cache, overlap_steps=overlap)
    return inst


async def _run(engine, req: EngineRequest, delay: float = 0.0):
    await asyncio.sleep(delay)
    outs = []
    async for ref in engine.generate.remote(req):
        outs.append(await ref)
    return outs


def _tokens(outs):
    return [t for o in outs for t in o.token_ids]


def _prompts(lengths, seed=0, vocab=512):
    rng = random.Random(seed)
    return [[rng.randrange(7, vocab) for _ in range(n)] for n in lengths]


def _req(i, prompt, max_tokens, **kw):
    return EngineRequest(f"r{i}-{uuid.uuid4().hex[:4]}", prompt, max_tokens=max_tokens,
                         block_hashes=block_hashes(prompt, BS), **kw)


def test_continuous_batching_gives_each_request_its_solo_tokens(model):
    cfg, refs, reference = model
    prompts = _prompts([5, 40, 17, 3, 33, 70])
    lengths = [12, 3, 20, 8, 1, 15]
    inst = _engine(cfg, refs, sched=SchedulerConfig(block_size=BS, max_num_batched_tokens=48))  # chunked prefill
    try:
        async def main():  # requests join at different times while others decode
            return await asyncio.gather(*[_run(inst.engine, _req(i, p, n), delay=0.02 * i) for i, (p, n) in enumerate(zip(prompts, lengths))])

        results = asyncio.run(main())
    finally:
        inst.shutdown()
    for prompt, n, outs in zip(prompts, lengths, results):
        assert _tokens(outs) == generate(reference, [prompt], n).tokens[0]
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].num_prompt_tokens == len(prompt)


def test_one_stream_per_consumer_carries_every_request_of_a_step_with_its_solo_tokens(model):
    """A consumer's requests come back on one stream, each item a step's updates of
    all of them (not one item per request); each request's tokens are its solo
    tokens, a bad one fails alone, and closing a consumer's requests early aborts
    them on the engine."""
    from cluster.proxy.engine_streams import EngineStreams

    cfg, refs, reference = model
    prompts, lengths = _prompts([6, 21, 13, 30], seed=7), [9, 4, 12, 7]
    inst = _engine(cfg, refs)
    try:
        async def main():
            streams = EngineStreams("test")

            async def one(req):
                return [out async for out in streams.open(inst.engine, req)]

            reqs = [_req(i, p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
            bad = EngineRequest("bad", [1, 2], max_tokens=10**6)
            results = await asyncio.gather(*map(one, reqs), one(bad), return_exceptions=True)
            early = streams.open(inst.engine, _req(9, prompts[0], 200))
            await early.__anext__()
            await early.aclose()  # left after one output: the engine aborts it
            for _ in range(200):
                if not ray.get(inst.engine.stats.remote()).running:
                    break
                await asyncio.sleep(0.01)
            streams.close()
            raw = inst.engine.stream.remote("raw")  # the stream as the engine sends it
            await asyncio.gather(*(inst.engine.submit.remote(r, "raw") for r in
                                   [_req(i, p, 5) for i, p in enumerate(prompts)]))
            items, done = [], 0
            async for ref in raw:
                items.append(await ref)
                done += sum(out.finished for _, out in items[-1])
                if done == len(prompts):
                    break
            return results, items

        (*results, bad), items = asyncio.run(main())
        stats = ray.get(inst.engine.stats.remote())
    finally:
        inst.shutdown()
    assert isinstance(bad, Exception) and "max_tokens" in str(bad)
    for prompt, n, outs in zip(prompts, lengths, results):
        assert _tokens(outs) == generate(reference, [prompt], n).tokens[0]
        assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert stats.running == 0 and stats.waiting == 0
    assert max(len({rid for rid, _ in item}) for item in items) == len(prompts)  # a step's updates, one item
    assert len(items) < sum(len(item) for item in items)


def test_a_consumer_that_does_not_read_holds_up_no_one(model):
    """The engine yields a step's item whether or not its consumer read the last:
    a consumer that never reads its stream delays neither the engine nor another
    consumer's requests, and its own request still runs to its end."""
    from cluster.proxy.engine_streams import EngineStreams

    cfg, refs, reference = model
    prompt = _prompts([12], seed=11)[0]
    inst = _engine(cfg, refs)
    try:
        async def main():
            stalled = inst.engine.stream.remote("never-reads")  # opened, never iterated
            await inst.engine.submit.remote(_req(0, prompt, 30), "never-reads")
            streams = EngineStreams("test")
            outs = [out async for out in streams.open(inst.engine, _req(1, prompt, 5))]
            for _ in range(500):
                stats = await inst.engine.stats.remote()
                if stats.counters.generated_tokens >= 35:
                    break
                await asyncio.sleep(0.01)
            streams.close()
            return outs, stats, stalled

        outs, stats, _ = asyncio.run(main())
    finally:
        inst.shutdown()
    assert _tokens(outs) == generate(reference, [prompt], 5).tokens[0]
    assert stats.counters.generated_tokens >= 35 and stats.running == 0  # the unread request ran to its end too


def test_stop_token_ends_a_request(model):
    cfg, refs, reference = model
    prompt = _prompts([9], seed=3)[0]
    full = generate(reference, [prompt], 10).tokens[0]
    stop = full[4]
    inst = _engine(cfg, refs)
    try:
        outs = asyncio.run(_run(inst.engine, _req(0, prompt, 10, stop_token_ids=frozenset({stop}))))
    finally:
        inst.shutdown()
    got = _tokens(outs)
    assert got == full[: full.index(stop) + 1]
    assert outs[-1].finish_reason == "stop"


def test_overlapped_steps_stop_exactly_and_equal_the_engine_without_them(model):
    """Overlapped steps send the next decode step before the last one's results are
    in: the tokens (greedy, seeded, with logprobs) are the reference's, a stop
    token ends its request exactly (the token computed past it is never sent, nor
    counted), and the engine without overlap gives the same outputs and counters."""
    cfg, refs, reference = model
    prompts = _prompts([9, 21, 30], seed=3)
    full = generate(reference, [prompts[0]], 10).tokens[0]
    stop = full[4]
    seeded = SamplingParams(temperature=0.8, seed=7)
    reqs = lambda: [_req(0, prompts[0], 10, stop_token_ids=frozenset({stop})),
                    _req(1, prompts[1], 12, params=seeded),
                    _req(2, prompts[2], 12, params=SamplingParams(logprobs=2))]
    got, stats = {}, {}
    for overlap in (True, False):
        inst = _engine(cfg, refs, overlap=overlap)
        try:
            async def main():
                return await asyncio.gather(*[_run(inst.engine, r) for r in reqs()])

            got[overlap] = asyncio.run(main())
            stats[overlap] = ray.get(inst.engine.stats.remote())
        finally:
            inst.shutdown()
    for outs in got.values():
        assert _tokens(outs[0]) == full[: full.index(stop) + 1] and outs[0][-1].finish_reason == "stop"
        assert _tokens(outs[1]) == generate(reference, [prompts[1]], 12, params=seeded).tokens[0]
        assert _tokens(outs[2]) == generate(reference, [prompts[2]], 12).tokens[0]
    lps = {o: [lp for out in outs[2] for lp in out.logprobs] for o, outs in got.items()}
    assert len(lps[True]) == 12  # (the batches' shapes may differ: float64 rounding, not other values)
    assert [lp.token_id for lp in lps[True]] == [lp.token_id for lp in lps[False]]
    assert lps[True][-1].logprob == pytest.approx(lps[False][-1].logprob, abs=1e-9)
    assert stats[True].counters.overlapped_steps > 0 and stats[False].counters.overlapped_steps == 0
    for key in ("computed_tokens", "generated_tokens"):  # (steps: the requests may join in one step or two)
        assert getattr(stats[True].counters, key) == getattr(stats[False].counters, key), key


def test_prefix_reuse_equals_full_prefill(model):
    cfg, refs, reference = model
    shared = _prompts([64], seed=5)[0]
    a, b = shared + [11, 12, 13], shared + [21, 22, 23, 24, 25]
    inst = _engine(cfg, refs)
    try:
        first = asyncio.run(_run(inst.engine, _req(0, a, 6)))
        second = asyncio.run(_run(inst.engine, _req(1, b, 6)))
        stats = ray.get(inst.engine.stats.remote())
    finally:
        inst.shutdown()
    assert first[-1].num_cached_tokens == 0
    assert second[-1].num_cached_tokens == 64  # 4 full blocks of the shared prefix, computed once
    assert _tokens(second) == generate(reference, [b], 6).tokens[0]
    assert stats.counters.computed_tokens < len(a) + len(b) + 12
    # the NPUs' time in steps, and the engine's own between two steps while it had work
    assert stats.counters.step_wall_s > 0 and stats.counters.host_gap_s > 0


def test_global_kv_cache_serves_another_instance_and_pd_equals_mixed(model):
    cfg, refs, reference = model
    cache_name = f"kv-{uuid.uuid4().hex[:6]}"
    cache = get_or_create_kv_cache(1 << 30, name=cache_name)
    prompt = _prompts([50], seed=7)[0]
    want = generate(reference, [prompt], 8).tokens[0]
    prefill = _engine(cfg, refs, role="prefill", cache=cache_name)
    decode = _engine(cfg, refs, role="decode", cache=cache_name)
    other = _engine(cfg, refs, role="mixed", cache=cache_name)
    try:
        # sequential P/D: prefill to the first token, hand the KV over through the object store
        pre = asyncio.run(_run(prefill.engine, _req(0, prompt, 8, prefill_only=True)))
        transfer = pre[-1].kv_transfer
        assert _tokens(pre) == want[:1] and transfer is not None and transfer.num_tokens == len(prompt)
        assert len(transfer.blocks) == 4  # three full blocks and the partial last one
        # a request whose first token is its last hands nothing on: no decode follows
        only = asyncio.run(_run(prefill.engine, _req(3, _prompts([40], seed=8)[0], 1, prefill_only=True)))
        assert only[-1].finished and only[-1].kv_transfer is None
        dec = asyncio.run(_run(decode.engine, _req(1, prompt, 8, output_ids=_tokens(pre), kv_transfer=transfer)))
        assert _tokens(pre) + _tokens(dec) == want
        assert ray.get(decode.engine.stats.remote()).counters.computed_tokens == 7  # decode computed no prompt token
        # a third instance finds the prompt's full blocks in the global cache
        hit = asyncio.run(_run(other.engine, _req(2, prompt, 8)))
        assert hit[-1].num_cached_tokens == 48
        assert _tokens(hit) == want
        stats = ray.get(cache.stats.remote())
        assert stats["blocks"] >= 3 and stats["hits"] >= 3
    finally:
        for inst in (prefill, decode, other):
            inst.shutdown()
        ray.kill(cache)


def test_global_cache_eviction_stays_under_capacity_and_misses_stay_correct(model):
    cfg, refs, reference = model
    cache_name = f"kv-{uuid.uuid4().hex[:6]}"
    block_bytes = BS * cfg.kv_bytes_per_token()
    cache = get_or_create_kv_cache(4 * block_bytes, name=cache_name)
    inst = _engine(cfg, refs, cache=cache_name)
    try:
        prompts = _prompts([40, 40, 40], seed=11)
        for i, p in enumerate(prompts):
            asyncio.run(_run(inst.engine, _req(i, p, 2)))
        stats = ray.get(cache.stats.remote())
        assert stats["bytes"] <= 4 * block_bytes and stats["evictions"] > 0
        # the first prompt's blocks were evicted globally and locally (tiny pool): it is recomputed, correctly
        other = _engine(cfg, refs, cache=cache_name)
        try:
            outs = asyncio.run(_run(other.engine, _req(9, prompts[0], 5)))
        finally:
            other.shutdown()
        assert _tokens(outs) == generate(reference, [prompts[0]], 5).tokens[0]
    finally:
        inst.shutdown()
        ray.kill(cache)


def test_out_of_blocks_queues_and_preempts_instead_of_failing(model):
    cfg, refs, reference = model
    prompts = _prompts([30, 30, 30, 30], seed=13)
    inst = _engine(cfg, refs, ep=1, kv_blocks=8)  # 128 tokens of KV: not enough for all four at once
    try:
        async def main():
            return await asyncio.gather(*[_run(inst.engine, _req(i, p, 20)) for i, p in enumerate(prompts)])

        results = asyncio.run(main())
        stats = ray.get(inst.engine.stats.remote())
    finally:
        inst.shutdown()
    for p, outs in zip(prompts, results):
        assert _tokens(outs) == generate(reference, [p], 20).tokens[0]
    assert stats.free_blocks == [8]
    # readmitted after a preemption, a sequence finds its own blocks again: not a prefix hit
    assert stats.preemptions > 0 and stats.counters.cached_tokens == 0
    assert all(outs[-1].num_cached_tokens == 0 for outs in results)


def test_kv_events_follow_what_the_npus_store_and_evict(model):
    cfg, refs, _ = model
    a, b = _prompts([40, 100], seed=21)
    inst = _engine(cfg, refs, ep=1, kv_blocks=8)  # 128 tokens: b's 120 evict a's cached blocks
    try:
        dump = ray.get(inst.engine.kv_events.remote(None, None))  # a new subscriber: a dump
        assert len(dump) == 1 and dump[0].cleared and dump[0].stored == ()

        async def first_steps():
            poll = inst.engine.kv_events.remote(dump[0].seq, dump[0].epoch)  # waiting before any step
            await _run(inst.engine, _req(0, a, 4))
            return await poll

        stored = asyncio.run(first_steps())
        seq = max(x.seq for x in stored)
        asyncio.run(_run(inst.engine, _req(1, b, 20)))
        later = ray.get(inst.engine.kv_events.remote(seq, dump[0].epoch))
        now = ray.get(inst.engine.kv_events.remote(None, None))[0]
    finally:
        inst.shutdown()
    a_blocks = block_hashes(a, BS)  # its two full blocks
    assert set(a_blocks) <= {h for x in stored for h in x.stored}
    assert set(a_blocks) <= {h for x in later for h in x.removed}  # evicted for b's blocks
    assert not set(a_blocks) & set(now.stored) and set(block_hashes(b, BS)[:6]) <= set(now.stored)
    assert [x.seq for x in later] == list(range(seq + 1, seq + 1 + len(later)))  # one numbered batch per step


def test_request_larger_than_an_npu_is_refused(model):
    cfg, refs, _ = model
    inst = _engine(cfg, refs, ep=1, kv_blocks=4)
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="max_tokens"):
            asyncio.run(_run(inst.engine, _req(0, list(range(7, 57)), 30)))
    finally:
        inst.shutdown()


def test_emulated_mode_runs_the_same_engine():
    m = load_manifest("pangu-pro-moe-72b")
    cfg = m.model
    prompt = _prompts([40], seed=17, vocab=cfg.vocab_size)[0]
    inst = _engine(cfg, None, ep=8, compute="emulated", device=m.device)
    try:
        outs = asyncio.run(_run(inst.engine, _req(0, prompt, 6)))
        stats = ray.get(inst.engine.stats.remote())
        idle = ray.get(inst.engine.after_steps.remote(2), timeout=30)  # no work: no step to wait for
    finally:
        inst.shutdown()
    expected, last = [], prompt[-1]
    for i in range(6):
        last = standin_token(last, len(prompt) + i, cfg.vocab_size)
        expected.append(last)
    assert _tokens(outs) == expected
    assert stats.device_time_s > 0 and stats.counters.steps == 6
    assert idle == [None, None]


def test_launch_manifest_serves_pd_through_the_global_cache(model):
    from cluster.config import parse_manifest
    from cluster.config import MANIFEST_DIR
    from cluster.launcher import launch_manifest

    cfg, _, reference = model
    manifest = parse_manifest({"model": "models/tiny-gqa-moge.yaml", "instances": [
        {"role": "prefill", "ep": 1}, {"role": "decode", "ep": 2}]}, MANIFEST_DIR)
    prefill, decode = launch_manifest(manifest)
    prompt = _prompts([37], seed=23)[0]
    try:
        pre = asyncio.run(_run(prefill.engine, _req(0, prompt, 5, prefill_only=True)))
        dec = asyncio.run(_run(decode.engine, _req(1, prompt, 5, output_ids=_tokens(pre), kv_transfer=pre[-1].kv_transfer)))
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert _tokens(pre) + _tokens(dec) == generate(reference, [prompt], 5).tokens[0]


def test_launch_manifest_starts_instances_together_and_a_failure_takes_the_others_down(ray_session, monkeypatch):
    """Instances start side by side; when one fails to start, the ones that did are
    shut down (their engines and NPUs go) and the failure is raised, not a half-built
    cluster."""
    import cluster.launcher as launcher
    from cluster.config import MANIFEST_DIR, parse_manifest

    manifest = parse_manifest({"model": "models/tiny-gqa-moge.yaml", "compute": "emulated", "instances": [
        {"name": "broken", "role": "mixed", "ep": 1}, {"name": "fine", "role": "mixed", "ep": 1}],
        "engine": {"global_kv_cache": False}}, MANIFEST_DIR)
    real, started = launcher.launch_manifest_instance, []

    def launch(m, spec, refs, cache=None, placement_group=None, owner=None):
        if spec.name == "broken":
            raise RuntimeError("broken: could not start")
        started.append(real(m, spec, refs, cache, placement_group, owner))
        return started[-1]

    monkeypatch.setattr(launcher, "launch_manifest_instance", launch)
    with pytest.raises(RuntimeError, match="broken: could not start"):
        launcher.launch_manifest(manifest)
    (fine,) = started  # it started beside the broken one, listed before it
    for actor in (fine.engine, *fine.npus):
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
    # the placement groups reserved for both (the manifest's default PACK) are gone too
    live = [g["name"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert not [n for n in live if n in ("broken-npus", "fine-npus")]


def _choices(outs) -> dict[int, list[int]]:
    """Tokens per choice of a request with n > 1."""
    got: dict[int, list[int]] = {}
    for o in outs:
        got.setdefault(o.index, []).extend(o.token_ids)
    return got


def test_n_choices_share_one_prefill_and_each_equals_its_seeded_reference(model):
    """n = 4: the prompt is computed once; the other three choices share its full
    blocks and copy its partial last one, and each draws with seed + its index."""
    cfg, refs, reference = model
    prompt = _prompts([37], seed=5)[0]  # two full blocks and a partial one
    params = SamplingParams(temperature=0.8, seed=11)
    inst = _engine(cfg, refs, ep=1)
    try:
        outs = asyncio.run(_run(inst.engine, _req(0, prompt, 6, params=params, n=4)))
        stats = ray.get(inst.engine.stats.remote())
    finally:
        inst.shutdown()
    got = _choices(outs)
    want = generate(reference, [prompt] * 4, 6,
                    params=[params.model_copy(update={"seed": 11 + j}) for j in range(4)]).tokens
    assert [got[j] for j in range(4)] == want
    assert len({tuple(t) for t in want}) > 1  # the seeds differ, so do the choices
    assert sum(o.finished for o in outs) == 4
    assert stats.counters.forked_seqs == 3 and stats.counters.shared_blocks == 3 * 2
    # one prefill: the prompt once, then each choice's own tokens (the last one is not fed back)
    assert stats.counters.computed_tokens == len(prompt) + 4 * (6 - 1)
    assert stats.counters.generated_tokens == 4 * 6


def test_logprobs_and_prompt_logprobs_equal_the_reference_with_a_cached_prefix(model):
    """Prompt logprobs come from the prefill's own forward: a request that asks for
    them computes its whole prompt even when its prefix is cached (it takes no cached
    blocks), so they equal the reference's either way."""
    cfg, refs, reference = model
    prompt = _prompts([40], seed=8)[0]
    params = SamplingParams(logprobs=3, prompt_logprobs=2)
    want = generate(reference, [prompt], 4, params=params)
    inst = _engine(cfg, refs, ep=2)
    try:
        asyncio.run(_run(inst.engine, _req(0, prompt, 2)))  # caches the prompt's full blocks
        outs = asyncio.run(_run(inst.engine, _req(1, prompt, 4, params=params)))
    finally:
        inst.shutdown()
    assert _tokens(outs) == want.tokens[0]
    assert outs[0].num_cached_tokens == 0
    prompt_lps = outs[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(prompt)
    for got, ref in zip(prompt_lps[1:], want.prompt_logprobs[0][1:]):
        assert got.token_id == ref.token_id and abs(got.logprob - ref.logprob) < 1e-9
        assert [t for t, _ in got.top] == [t for t, _ in ref.top]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == 4
    for got, ref in zip(lps, want.logprobs[0]):
        assert got.token_id == ref.token_id and abs(got.logprob - ref.logprob) < 1e-9 and len(got.top) == 3
