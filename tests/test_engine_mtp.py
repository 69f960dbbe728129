"""MTP speculative decoding in the engine: the same greedy tokens as without
it, with drafts verified in the main model's forward and acceptance counted."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import ray

from actors.compute.emulated import standin_token
from actors.engine.scheduler import SchedulerConfig
from actors.kv_hash import block_hashes
from actors.model.reference import build_reference, generate
from actors.protocol import EngineRequest
from cluster.config import load_manifest
from cluster.launcher import launch_engine, launch_instance
from test_mtp import make_copy_model, tiny

pytestmark = pytest.mark.ray

PROMPTS = [[5, 17, 300, 42, 9, 33, 21], [7, 8], list(range(20, 60)), [400, 401, 402]]
MAX_TOKENS = 24


def _serve(cfg, refs, compute="real", device="910B", ep=2, mtp=True, rate=0.9):
    inst = launch_instance(f"mtp-{uuid.uuid4().hex[:6]}", cfg, ep, compute, device, refs, time_scale=0.0,
                           mtp_acceptance_rate=rate)
    launch_engine(inst, SchedulerConfig(block_size=16), mtp=mtp)

    async def one(i, p):
        toks = []
        req = EngineRequest(f"m{i}", p, max_tokens=MAX_TOKENS, block_hashes=block_hashes(p, 16))
        async for ref in inst.engine.generate.remote(req):
            toks += (await ref).token_ids
        return toks

    async def main():
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(PROMPTS)])

    try:
        return asyncio.run(main()), ray.get(inst.engine.stats.remote())
    finally:
        inst.shutdown()


def _refs(model):
    return {name: ray.put(t.detach().clone()) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("leak", [None, 0.05, 0.0])  # random weights; a head right sometimes; always right
def test_mtp_on_gives_the_greedy_tokens_of_mtp_off(ray_session, leak):
    cfg = tiny("tiny-gqa-moge")
    model = build_reference(cfg) if leak is None else make_copy_model(cfg, leak)
    want = generate(model, PROMPTS, MAX_TOKENS).tokens
    got, stats = _serve(cfg, _refs(model))
    assert got == want
    assert stats.counters.drafted_tokens > 0
    assert 0 <= stats.counters.accepted_tokens <= stats.counters.drafted_tokens
    assert stats.counters.generated_tokens == len(PROMPTS) * MAX_TOKENS
    if leak == 0.0:  # every draft right: two tokens per step once decoding
        assert stats.counters.accepted_tokens == stats.counters.drafted_tokens
        assert stats.counters.steps < MAX_TOKENS * 0.6
    if leak == 0.05:
        assert 0 < stats.counters.accepted_tokens < stats.counters.drafted_tokens


def test_emulated_mtp_accepts_at_the_manifest_rate_and_keeps_the_tokens(ray_session):
    m = load_manifest("pangu-ultra-moe-718b")
    cfg = m.model
    assert cfg.num_mtp_layers == 1
    got, stats = _serve(cfg, None, compute="emulated", device=m.device, ep=8, rate=0.8)
    for prompt, tokens in zip(PROMPTS, got):
        last, expected = prompt[-1], []
        for i in range(MAX_TOKENS):
            last = standin_token(last, len(prompt) + i, cfg.vocab_size)
            expected.append(last)
        assert tokens == expected
    rate = stats.counters.accepted_tokens / stats.counters.drafted_tokens
    assert 0.6 < rate < 0.95
    assert stats.counters.steps < MAX_TOKENS
