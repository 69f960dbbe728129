"""`omniray simulate`: an emulated model served by the real scheduling path
(instance engine: continuous batching, paged KV, MTP, EP dispatch across NPU
actors), timed by the cost model instead of the wall clock.

With `time_scale: 0` nothing sleeps, so a 718B model is simulated in seconds. The
engine records each step's shape and device time (the slowest die of the step).
Two phases on the manifest's first instance, each with fresh prompts (no prefix is
reused between them), each batch admitted whole while the engine holds its step
loop, so the batch starts in one step:

1. prefill: B prompts of I tokens, max_tokens=1. Prefill tokens/s per device =
   B * I / (device time of the steps that computed prompt tokens) / devices.
2. decode: B prompts of I tokens generating O tokens each. The decode window is
   the steps in which all B sequences decode, none prefills and none ends (its
   last step may be cut short by max_tokens); decode tokens/s
   per device = tokens generated in it / its device time / devices; tokens per
   step = those tokens / (B * steps) (above 1 with MTP); TPOT = step time /
   tokens per step.

The manifest's engine settings hold (block size, KV pool, MTP and its acceptance
rate), except that the batch limits are raised to fit B sequences and B * I
tokens in a step, as a throughput deployment runs them. A device is one NPU actor
(a 910C's two dies split its batch); `dies_per_actor` copies count once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import asdict, dataclass

import ray

from actors.devices import get_device
from actors.engine.scheduler import SchedulerConfig
from actors.kv_hash import block_hashes
from actors.protocol import EngineRequest
from cluster.config import Manifest
from cluster.launcher import launch_engine, launch_instance

ADMIT_TIMEOUT_S = 120.0  # how long a held engine may take to admit a batch


@dataclass
class SimulateResult:
    model: str
    device: str
    ep: int  # NPU actors, one device each
    ep_dies: int  # EP ranks the cost model priced (dies, copies included)
    mtp: bool
    batch: int
    input_len: int
    output_len: int
    prefill_device_s: float  # phase 1
    decode_device_s: float  # phase 2, the decode window only
    decode_steps: int  # steps in the decode window
    prefill_tok_s_per_npu: float
    decode_tok_s_per_npu: float
    tokens_per_step: float  # per sequence, in the decode window
    tpot_s: float
    steps: int
    preemptions: int

    def to_dict(self) -> dict:
        return asdict(self)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


async def _batch(engine, prompts: list[list[int]], max_tokens: int, block_size: int) -> list:
    """Admit every request while the engine holds, then run them to the end; returns
    the records of the steps they took."""
    await engine.hold.remote(True)

    async def one(p):
        req = EngineRequest(f"sim-{uuid.uuid4().hex[:8]}", p, max_tokens=max_tokens, ignore_eos=True,
                            block_hashes=block_hashes(p, block_size))
        async for ref in engine.generate.remote(req):
            await ref

    tasks = [asyncio.ensure_future(one(p)) for p in prompts]
    deadline = time.monotonic() + ADMIT_TIMEOUT_S
    while await engine.hold.remote(True) < len(prompts):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine admitted fewer than {len(prompts)} requests in {ADMIT_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.01)
    await engine.record_steps.remote(True)
    await engine.hold.remote(False)
    await asyncio.gather(*tasks)
    return await engine.record_steps.remote(False)


def run_simulation(manifest: Manifest, batch: int, input_len: int, output_len: int, seed: int = 0,
                   phases: tuple[str, ...] = ("prefill", "decode")) -> SimulateResult:
    if manifest.compute != "emulated":
        raise ValueError(f"compute: simulate times the cost model and needs compute: emulated, got {manifest.compute}")
    if "decode" in phases and output_len < 3:
        raise ValueError("--output-len: needs at least 3 tokens (one from prefill, then whole-batch decode steps)")
    spec, eng, cfg = manifest.instances[0], manifest.engine, manifest.model
    bs = eng.block_size
    sched = SchedulerConfig(max(eng.max_num_seqs, batch), max(eng.max_num_batched_tokens, batch * input_len), bs)
    inst = launch_instance(f"simulate-{uuid.uuid4().hex[:6]}", cfg, spec.ep, "emulated", manifest.device,
                           time_scale=0.0, block_size=bs, kv_blocks=eng.kv_blocks,
                           mtp_acceptance_rate=eng.mtp_acceptance_rate, dies_per_actor=spec.dies_per_actor or 0,
                           expert_skew=manifest.expert_skew)
    ep_dies = spec.ep * (spec.dies_per_actor or get_device(manifest.device).dies)
    prefill_s = decode_s = 0.0
    window_steps = window_tokens = 0
    try:
        engine = launch_engine(inst, sched, mtp=eng.mtp)
        asyncio.run(_batch(engine, _prompts(1, 8, cfg.vocab_size, seed - 1), 3, bs))  # warm-up: loops and groups
        if "prefill" in phases:
            records = asyncio.run(_batch(engine, _prompts(batch, input_len, cfg.vocab_size, seed), 1, bs))
            prefill_s = sum(r.device_s for r in records if r.prefill_tokens)
        if "decode" in phases:
            records = asyncio.run(_batch(engine, _prompts(batch, input_len, cfg.vocab_size, seed + 1), output_len, bs))
            window = [r for r in records if r.decode_seqs == batch and not r.prefill_tokens and not r.finished]
            if not window:
                raise RuntimeError("no step decoded the whole batch: raise --output-len or the KV pool")
            decode_s = sum(r.device_s for r in window)
            window_steps, window_tokens = len(window), sum(r.tokens for r in window)
        end = ray.get(engine.stats.remote())
    finally:
        inst.shutdown()
    per_step = window_tokens / (batch * window_steps) if window_steps else 0.0
    return SimulateResult(
        cfg.name, manifest.device, spec.ep, ep_dies, eng.mtp, batch, input_len, output_len, prefill_s, decode_s,
        window_steps,
        batch * input_len / prefill_s / spec.ep if prefill_s else 0.0,
        window_tokens / decode_s / spec.ep if decode_s else 0.0,
        per_step, decode_s / window_steps / per_step if window_steps else 0.0,
        end["steps"], end["preemptions"],
    )


def print_simulation(r: SimulateResult, console) -> None:
    from rich.table import Table

    table = Table(title=f"simulate {r.model} on {r.ep} x {r.device} (EP{r.ep_dies}{', MTP' if r.mtp else ''}): "
                        f"batch {r.batch}, {r.input_len} in, {r.output_len} out")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if r.prefill_device_s:
        table.add_row("prefill tokens/s per device", f"{r.prefill_tok_s_per_npu:,.0f}")
        table.add_row("prefill device time", f"{r.prefill_device_s * 1000:.2f} ms")
    if r.decode_steps:
        table.add_row("decode tokens/s per device", f"{r.decode_tok_s_per_npu:,.0f}")
        table.add_row("TPOT", f"{r.tpot_s * 1000:.2f} ms")
        table.add_row("tokens per step (per sequence)", f"{r.tokens_per_step:.2f}")
        table.add_row("decode window", f"{r.decode_steps} steps, {r.decode_device_s * 1000:.2f} ms")
    table.add_row("engine steps / preemptions", f"{r.steps} / {r.preemptions}")
    console.print(table)
