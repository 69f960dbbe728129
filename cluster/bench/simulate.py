"""`omniray simulate`: an emulated model served by the real scheduling path
(instance engine: continuous batching, paged KV, MTP, EP dispatch across NPU
actors), timed by the cost model instead of the wall clock.

With `time_scale: 0` nothing sleeps, so a 718B model is simulated in seconds. The
engine records each step's shape and device time (the slowest die of the step).
Two phases, each with fresh prompts (no prefix is reused between them), each
batch admitted whole while the engines hold their step loops, so the batch starts
in one step:

1. prefill: B prompts of I tokens, max_tokens=1. Prefill tokens/s per device =
   B * I / (device time of the steps that computed prompt tokens, times the
   devices of the instance that ran them, summed over instances).
2. decode: B prompts of I tokens generating O tokens each. An instance's decode
   window is the steps in which all of its share of the batch decodes, none
   prefills and none ends (its last step may be cut short by max_tokens); decode
   tokens/s per device = tokens generated in the windows / (window device time
   times devices, summed over instances); tokens per step = those tokens /
   (sequences x steps, summed) (above 1 with MTP); TPOT = step time / tokens per
   step.

Two paths in:
- direct (default): the manifest's first instance, its engine sent the batch.
- `through_proxy`: the whole manifest served (`omniray serve`'s server: master,
  slaves, every instance), the batch sent as OpenAI completions over HTTP, so the
  master's routing, budgets and P/D hand-off decide where each request runs. With
  P/D, the prefill instances are held until they have the batch, then the decode
  instances until the KV of every request reached them, so decode too starts
  whole.

The manifest's engine settings hold (block size, KV pool, MTP and its acceptance
rate), except that the batch limits (and through the proxy, the master's budgets)
are raised to fit B sequences and B * I tokens in a step, as a throughput
deployment runs them. A device is one NPU actor (a 910C's two dies split its
batch); `dies_per_actor` copies count once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import httpx
import ray

from actors.devices import get_device
from actors.engine.instance import StepRecord
from actors.engine.scheduler import SchedulerConfig
from actors.kv_hash import block_hashes
from actors.protocol import EngineRequest
from cluster.config import Manifest
from cluster.launcher import launch_engine, launch_instance

ADMIT_TIMEOUT_S = 120.0  # how long held engines may take to admit a batch
HTTP_TIMEOUT_S = 600.0  # one request through the proxy, from send to its last token


@dataclass
class SimulateResult:
    model: str
    device: str
    ep: int  # NPU actors of the instances timed, one device each
    ep_dies: int  # EP ranks the cost model priced per instance (dies, copies included)
    mtp: bool
    batch: int
    input_len: int
    output_len: int
    prefill_device_s: float  # phase 1, the longest instance's
    decode_device_s: float  # phase 2, the decode window only, the longest instance's
    decode_steps: int  # steps in the decode window, the longest instance's
    prefill_tok_s_per_npu: float
    decode_tok_s_per_npu: float
    tokens_per_step: float  # per sequence, in the decode window
    tpot_s: float
    steps: int
    preemptions: int
    through_proxy: bool = False
    instances: int = 1  # instances that ran part of the batch

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timed:
    """An engine the harness holds and reads step records from."""

    engine: object
    devices: int  # NPU actors
    role: str


@dataclass
class Path:
    """Where a batch goes in: `send(prompt, max_tokens)` runs one request to its
    end; `stages` are the engines to release in order once they hold the batch
    (one stage, or prefill then decode instances)."""

    send: Callable[[list[int], int], Awaitable[None]]
    stages: list[list[Timed]]
    close: Callable[[], Awaitable[None]] | None = None  # in the event loop that sent


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


async def _until_held(stage: list[Timed], n: int) -> list[int]:
    """Wait until the stage's engines hold `n` requests between them; each one's share."""
    deadline = time.monotonic() + ADMIT_TIMEOUT_S
    while True:
        shares = await asyncio.gather(*(t.engine.hold.remote(True) for t in stage))
        if sum(shares) >= n:
            return list(shares)
        if time.monotonic() > deadline:
            raise RuntimeError(f"held engines admitted {sum(shares)} of {n} requests in {ADMIT_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.01)


async def _batch(path: Path, prompts: list[list[int]], max_tokens: int,
                 stages: int | None = None) -> list[tuple[Timed, int, list[StepRecord]]]:
    """Admit every request while the engines hold, release them stage by stage,
    run the requests to the end; each timed engine with its share of the batch
    and the records of the steps it took. `stages`: how many of the path's stages
    to hold (the rest run freely)."""
    held = path.stages[:stages]
    timed = [t for stage in path.stages for t in stage]
    await asyncio.gather(*(t.engine.hold.remote(True) for stage in held for t in stage))
    await asyncio.gather(*(t.engine.record_steps.remote(True) for t in timed))  # held engines step no more
    tasks = [asyncio.ensure_future(path.send(p, max_tokens)) for p in prompts]
    shares = {}
    try:
        for stage in held:
            for t, share in zip(stage, await _until_held(stage, len(prompts))):
                shares[id(t)] = share
            await asyncio.gather(*(t.engine.hold.remote(False) for t in stage))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(t.engine.hold.remote(False) for stage in held for t in stage))
    records = await asyncio.gather(*(t.engine.record_steps.remote(False) for t in timed))
    return [(t, shares.get(id(t), 0), r) for t, r in zip(timed, records)]


def _direct(manifest: Manifest, batch: int, input_len: int):
    """The first instance alone, its engine sent each request; (path, teardown)."""
    spec, eng = manifest.instances[0], manifest.engine
    sched = SchedulerConfig(max(eng.max_num_seqs, batch), max(eng.max_num_batched_tokens, batch * input_len),
                            eng.block_size)
    inst = launch_instance(f"simulate-{uuid.uuid4().hex[:6]}", manifest.model, spec.ep, "emulated", manifest.device,
                           time_scale=0.0, block_size=eng.block_size, kv_blocks=eng.kv_blocks,
                           mtp_acceptance_rate=eng.mtp_acceptance_rate, dies_per_actor=spec.dies_per_actor or 0,
                           expert_skew=manifest.expert_skew)
    try:
        engine = launch_engine(inst, sched, mtp=eng.mtp, overlap_steps=eng.overlap_steps)
    except Exception:
        inst.shutdown()
        raise

    async def send(prompt: list[int], max_tokens: int) -> None:
        req = EngineRequest(f"sim-{uuid.uuid4().hex[:8]}", prompt, max_tokens=max_tokens, ignore_eos=True,
                            block_hashes=block_hashes(prompt, eng.block_size))
        async for ref in engine.generate.remote(req):
            await ref

    return Path(send, [[Timed(engine, spec.ep, inst.role)]]), inst.shutdown


def proxy_manifest(manifest: Manifest, batch: int, input_len: int) -> Manifest:
    """The manifest served at time_scale 0, with the engines' batch limits and the
    master's budgets raised to fit the whole batch."""
    eng, p = manifest.engine, manifest.proxy
    engine = eng.model_copy(update={"max_num_seqs": max(eng.max_num_seqs, batch),
                                    "max_num_batched_tokens": max(eng.max_num_batched_tokens, batch * input_len)})
    proxy = p.model_copy(update={"prefill_max_num_seqs": max(p.prefill_max_num_seqs, batch),
                                 "decode_max_num_seqs": max(p.decode_max_num_seqs, batch),
                                 "max_batch_num_token": max(p.max_batch_num_token, batch * input_len),
                                 "max_queue": max(p.max_queue, batch)})
    return manifest.model_copy(update={"time_scale": 0.0, "engine": engine, "proxy": proxy})


def _through_proxy(manifest: Manifest, batch: int, input_len: int):
    """The whole manifest served, each request an OpenAI completion over HTTP; (path, teardown)."""
    from cluster.bench.serve import free_port
    from cluster.server import start_server

    if _serve_running():
        raise RuntimeError("--through-proxy: Ray Serve already runs on this Ray cluster; the simulation serves the "
                           "manifest itself and stops Serve at the end: run it on a cluster of its own "
                           "(leave out --address for a local one)")
    server = start_server(proxy_manifest(manifest, batch, input_len), port=free_port())
    timed = [Timed(i.engine, len(i.npus), i.role) for i in server.instances]
    prefill = [t for t in timed if t.role == "prefill"]
    stages = [prefill, [t for t in timed if t.role == "decode"]] if prefill else [timed]
    clients = []  # one, made in the event loop that sends

    async def send(prompt: list[int], max_tokens: int) -> None:
        if not clients:
            limits = httpx.Limits(max_connections=batch, max_keepalive_connections=batch)  # the batch at once
            clients.append(httpx.AsyncClient(base_url=server.url, timeout=HTTP_TIMEOUT_S, limits=limits))
        resp = await clients[0].post("/v1/completions", json={"model": manifest.model.name, "prompt": prompt,
                                                           "max_tokens": max_tokens, "ignore_eos": True,
                                                           "temperature": 0.0})
        if resp.status_code != 200:
            raise RuntimeError(f"the proxy answered {resp.status_code}: {resp.text[:300]}")

    async def close() -> None:
        for client in clients:
            await client.aclose()

    return Path(send, stages, close), server.shutdown


def _serve_running() -> bool:
    """Whether a Ray Serve controller lives on the connected cluster (its name and
    namespace are Serve's own constants)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _windows(runs: list[tuple[Timed, int, list[StepRecord]]], decode: bool) -> list[tuple[Timed, int, list[StepRecord]]]:
    """Each engine's steps that count: those that computed prompt tokens, or its
    decode window (all its share decoding, none prefilling or ending)."""
    if not decode:
        return [(t, n, [r for r in recs if r.prefill_tokens]) for t, n, recs in runs]
    return [(t, n, [r for r in recs if r.decode_seqs == n and not r.prefill_tokens and not r.finished])
            for t, n, recs in runs if n and t.role != "prefill"]


def run_simulation(manifest: Manifest, batch: int, input_len: int, output_len: int, seed: int = 0,
                   phases: tuple[str, ...] = ("prefill", "decode"), through_proxy: bool = False) -> SimulateResult:
    if manifest.compute != "emulated":
        raise ValueError(f"compute: simulate times the cost model and needs compute: emulated, got {manifest.compute}")
    if "decode" in phases and output_len < 3:
        raise ValueError("--output-len: needs at least 3 tokens (one from prefill, then whole-batch decode steps)")
    cfg, spec = manifest.model, manifest.instances[0]
    path, teardown = (_through_proxy if through_proxy else _direct)(manifest, batch, input_len)

    async def run() -> tuple[list, list]:
        prefill = decode = []
        try:
            await _batch(path, _prompts(1, 8, cfg.vocab_size, seed - 1), 3)  # warm-up: loops, groups, HTTP
            if "prefill" in phases:
                prefill = _windows(await _batch(path, _prompts(batch, input_len, cfg.vocab_size, seed), 1, 1), False)
            if "decode" in phases:
                decode = _windows(await _batch(path, _prompts(batch, input_len, cfg.vocab_size, seed + 1),
                                               output_len), True)
        finally:
            if path.close is not None:
                await path.close()
        return prefill, decode

    try:
        prefill, decode = asyncio.run(run())
        if "decode" in phases and not any(recs for _, _, recs in decode):
            raise RuntimeError("no step decoded an instance's whole share of the batch: raise --output-len "
                               "or the KV pool")
        ends = ray.get([t.engine.stats.remote() for stage in path.stages for t in stage])
    finally:
        teardown()
    prefill_dev_s = sum(t.devices * sum(r.device_s for r in recs) for t, _, recs in prefill)
    decode_dev_s = sum(t.devices * sum(r.device_s for r in recs) for t, _, recs in decode)
    tokens = sum(r.tokens for _, _, recs in decode for r in recs)
    seq_steps = sum(n * len(recs) for _, n, recs in decode)
    per_step = tokens / seq_steps if seq_steps else 0.0
    longest = max(decode, key=lambda run: sum(r.device_s for r in run[2]), default=None)
    decode_s = sum(r.device_s for r in longest[2]) if longest else 0.0
    steps = len(longest[2]) if longest else 0
    used = {id(t): t for t, n, recs in prefill + decode if n or recs}
    return SimulateResult(
        cfg.name, manifest.device, sum(t.devices for t in used.values()) if through_proxy else spec.ep,
        spec.ep * (spec.dies_per_actor or get_device(manifest.device).dies), manifest.engine.mtp,
        batch, input_len, output_len,
        max((sum(r.device_s for r in recs) for _, _, recs in prefill), default=0.0), decode_s, steps,
        batch * input_len / prefill_dev_s if prefill_dev_s else 0.0,
        tokens / decode_dev_s if decode_dev_s else 0.0,
        per_step, decode_s / steps / per_step if steps and per_step else 0.0,
        sum(e.counters.steps for e in ends), sum(e.preemptions for e in ends),
        through_proxy, len(used),
    )


def print_simulation(r: SimulateResult, console) -> None:
    from rich.table import Table

    where = f", through the proxy over {r.instances} instance{'s' if r.instances > 1 else ''}" if r.through_proxy else ""
    table = Table(title=f"simulate {r.model} on {r.ep} x {r.device} (EP{r.ep_dies}{', MTP' if r.mtp else ''}{where}): "
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
