"""`omniray simulate`: an emulated model served by the real scheduling path
(instance engine: continuous batching, chunked prefill, paged KV, EP dispatch
across NPU actors), timed by the cost model instead of the wall clock.

The instance's engine adds up each step's device time (the slowest NPU of the
step, as the cost model prices attention, MoE GEMMs and the all-to-all). With
`time_scale: 0` nothing sleeps, so a 718B model is simulated in seconds. Two
phases on one instance, each with its own fresh prompts (so no prefix is
reused between them):

1. prefill: B requests of I tokens with max_tokens=1 -> device time Dp;
   prefill tokens/s per NPU = B * I / Dp / EP.
2. decode: B new requests of I tokens generating O tokens. The moment every
   request has its first token (all prefills done), the engine's counters are
   read (device time, steps, generated tokens), and again at the end; between
   the two, every step is a pure decode step. The token budget per step is
   raised to B * I so that the whole batch is prefilled in one step and then
   decodes in lockstep, as a throughput-oriented deployment runs it. decode tokens/s per NPU = tokens
   generated between / device time between / EP; TPOT = device time between /
   steps between (a step gives each running sequence one token).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import asdict, dataclass

import ray

from actors.engine.scheduler import SchedulerConfig
from actors.kv_hash import block_hashes
from actors.protocol import EngineRequest
from cluster.config import Manifest
from cluster.launcher import launch_engine, launch_instance


@dataclass
class SimulateResult:
    model: str
    device: str
    ep: int
    batch: int
    input_len: int
    output_len: int
    prefill_device_s: float  # phase 1
    decode_device_s: float  # phase 2, pure decode steps only
    prefill_tok_s_per_npu: float
    decode_tok_s_per_npu: float
    tpot_s: float
    steps: int
    preemptions: int

    def to_dict(self) -> dict:
        return asdict(self)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


async def _run(engine, prompts: list[list[int]], max_tokens: int, block_size: int) -> dict | None:
    """Run the requests to the end; returns the engine's stats taken the moment the
    last of them got its first token."""
    started, all_started = 0, asyncio.Event()
    snapshot = {}

    async def one(p):
        nonlocal started
        req = EngineRequest(f"sim-{uuid.uuid4().hex[:8]}", p, max_tokens=max_tokens, ignore_eos=True,
                            block_hashes=block_hashes(p, block_size))
        first = True
        async for ref in engine.generate.remote(req):
            await ref
            if first:
                first, started = False, started + 1
                if started == len(prompts):
                    snapshot.update(await engine.stats.remote())
                    all_started.set()

    await asyncio.gather(*(one(p) for p in prompts))
    return snapshot or None


def run_simulation(manifest: Manifest, batch: int, input_len: int, output_len: int, seed: int = 0) -> SimulateResult:
    if manifest.compute != "emulated":
        raise ValueError(f"compute: simulate times the cost model and needs compute: emulated, got {manifest.compute}")
    if output_len < 2:
        raise ValueError("--output-len: needs at least 2 tokens (one from prefill, one decoded)")
    spec, eng, cfg = manifest.instances[0], manifest.engine, manifest.model
    bs = eng.block_size
    # the whole batch is prefilled in one step, so every later step decodes all B sequences together
    sched = SchedulerConfig(max(eng.max_num_seqs, batch), max(eng.max_num_batched_tokens, batch * input_len), bs)
    inst = launch_instance(f"simulate-{uuid.uuid4().hex[:6]}", cfg, spec.ep, "emulated", manifest.device,
                           time_scale=0.0, block_size=bs, kv_blocks=eng.kv_blocks)
    try:
        engine = launch_engine(inst, sched)
        asyncio.run(_run(engine, _prompts(1, 8, cfg.vocab_size, seed - 1), 2, bs))  # warm-up: loops and groups
        t0 = ray.get(engine.stats.remote())["device_time_s"]
        asyncio.run(_run(engine, _prompts(batch, input_len, cfg.vocab_size, seed), 1, bs))
        t1 = ray.get(engine.stats.remote())["device_time_s"]
        mid = asyncio.run(_run(engine, _prompts(batch, input_len, cfg.vocab_size, seed + 1), output_len, bs))
        end = ray.get(engine.stats.remote())
    finally:
        inst.shutdown()
    prefill = t1 - t0
    decode = end["device_time_s"] - mid["device_time_s"]
    tokens, steps = end["generated_tokens"] - mid["generated_tokens"], end["steps"] - mid["steps"]
    if steps <= 0 or decode <= 0:
        raise RuntimeError("no pure decode step was observed; raise --output-len")
    return SimulateResult(
        cfg.name, manifest.device, spec.ep, batch, input_len, output_len, prefill, decode,
        batch * input_len / prefill / spec.ep, tokens / decode / spec.ep, decode / steps,
        end["steps"], end["preemptions"],
    )


def print_simulation(r: SimulateResult, console) -> None:
    from rich.table import Table

    table = Table(title=f"simulate {r.model} on {r.ep} x {r.device}: batch {r.batch}, {r.input_len} in, "
                        f"{r.output_len} out")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("prefill tokens/s per NPU", f"{r.prefill_tok_s_per_npu:,.0f}")
    table.add_row("decode tokens/s per NPU", f"{r.decode_tok_s_per_npu:,.0f}")
    table.add_row("TPOT", f"{r.tpot_s * 1000:.2f} ms")
    table.add_row("prefill device time", f"{r.prefill_device_s * 1000:.2f} ms")
    table.add_row("decode device time", f"{r.decode_device_s * 1000:.2f} ms")
    table.add_row("engine steps / preemptions", f"{r.steps} / {r.preemptions}")
    console.print(table)
