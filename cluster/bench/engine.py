"""`omniray bench engine`: the instance engine end to end, against the
single-process reference, measured in one run.

Two parts, each on its own engine (an EP instance of NPU actors driven by an
InstanceEngine actor, with the manifest's engine settings: block size, token
budget, global KV cache; `max_num_seqs` raised to the largest batch so that
B requests really run as one batch):

1. Throughput. B requests are submitted at once; the figure is output tokens/s
   = tokens generated / wall time from the first submit to the last finish. It
   includes everything a served request pays after tokenization: Ray calls and
   streaming, scheduling, chunked prefill, paged KV, the EP all-to-all. The
   reference's batched `generate` runs on the same prompts in the same repeat
   (interleaved, so drift hits both sides alike). Each repeat draws fresh
   prompts so the engine's prefix cache cannot serve a repeat from the last.
   The engine's tokens are compared with the reference's greedy tokens: a
   benchmark must not time wrong output.
2. Prefix reuse. Time to first token (submit -> first EngineOutput, with
   max_tokens=1, i.e. the prefill) of a prefix_len + suffix_len prompt whose
   prefix was never seen, vs one whose prefix a finished request just cached.
   Every measurement uses its own random prefix, so nothing leaks between them.

Figures are medians over `repeats`; one untimed warm-up request runs first on
each engine (it starts the engine loop and the gloo group's first all-to-all).

With `compare_overlap`, part 1 also runs a second engine with overlapped steps
off (each step waits for the last one's results), interleaved with the first
in every repeat: the A/B of async scheduling in one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field

import ray

from actors.engine.scheduler import SchedulerConfig
from actors.kv_cache import get_or_create_kv_cache
from actors.kv_hash import block_hashes
from actors.model.reference import build_reference, generate
from actors.model.shared_tensor import fetch_shared
from actors.protocol import EngineRequest
from cluster.config import Manifest
from cluster.proxy.engine_streams import EngineStreams
from cluster.launcher import launch_engine, launch_instance, publish_weights


@dataclass
class BatchRow:
    batch: int
    engine_tok_s: float
    reference_tok_s: float
    ratio: float  # engine / reference output tokens/s (higher is better)
    tokens_match: bool  # every engine token equals the reference's greedy token, in every repeat
    # compare_overlap: the same engine with overlapped steps off, and engine / that
    no_overlap_tok_s: float | None = None
    overlap_gain: float | None = None


SPLIT_COUNTERS = ("steps", "step_wall_s", "host_gap_s", "dispatch_s", "npu_s", "a2a_s", "update_s")


@dataclass
class StepSplit:
    """Where an engine step's wall time went, per step (ms), over a batch's timed runs:
    the step (NPUs at work: compute and all-to-all; then the results' way back) and
    the engine's host gap before the next one (scheduling and sending it, taking
    the results in, and the rest: the consumer streams' items and the event loop's
    other work, which share the engine's thread)."""

    batch: int
    steps: int
    step_ms: float  # the loop's time per step: step + host gap
    dispatch_ms: float  # schedule, build each sequence's work, send the batch to every NPU
    npu_compute_ms: float  # the slowest NPU's wall, less the NPUs' mean time in all-to-alls
    all_to_all_ms: float  # the NPUs' mean wall time in the EP all-to-alls (waits for each other included)
    # the engine's wait for the results less the slowest NPU's wall: the results' way back;
    # negative with overlapped steps, where the engine's host work ran beside the NPUs
    transfer_ms: float
    update_ms: float  # outputs, KV events and step records
    other_ms: float  # the host gap's rest: streaming the outputs, the event loop's other work

    @classmethod
    def of(cls, batch: int, d: dict) -> "StepSplit":
        n = max(d["steps"], 1)
        ms = lambda v: 1000 * v / n
        return cls(batch, d["steps"], ms(d["step_wall_s"] + d["host_gap_s"]), ms(d["dispatch_s"]),
                   ms(d["npu_s"] - d["a2a_s"]), ms(d["a2a_s"]), ms(d["step_wall_s"] - d["npu_s"]), ms(d["update_s"]),
                   ms(d["host_gap_s"] - d["dispatch_s"] - d["update_s"]))


@dataclass
class PrefixRow:
    ttft_uncached_s: float
    ttft_cached_s: float
    ratio: float  # cached / uncached TTFT (lower is better)
    cached_tokens: int  # num_cached_tokens the engine reported for the cached request
    tokens_match: bool  # both first tokens equal the reference's


@dataclass
class EngineBenchResult:
    model: str
    dtype: str
    ep: int
    prompt_len: int
    output_len: int
    prefix_len: int
    suffix_len: int
    repeats: int
    scheduler: dict
    global_kv_cache: bool
    batches: list[BatchRow] = field(default_factory=list)
    splits: list[StepSplit] = field(default_factory=list)  # per batch, over its timed runs
    prefix: PrefixRow | None = None

    @property
    def tokens_match(self) -> bool:
        return all(b.tokens_match for b in self.batches) and (self.prefix is None or self.prefix.tokens_match)

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(7, vocab) for _ in range(length)]


async def _stream(engine, prompt: list[int], max_tokens: int, block_size: int,
                  streams: EngineStreams | None = None) -> tuple[list[int], float, int]:
    """Run one request (on `streams`, a consumer's output streams as a proxy slave
    holds them; None: its own); return (tokens, seconds to its first output,
    num_cached_tokens)."""
    own = streams is None
    streams = streams or EngineStreams("bench")
    req = EngineRequest(f"bench-{uuid.uuid4().hex[:8]}", prompt, max_tokens=max_tokens,
                        block_hashes=block_hashes(prompt, block_size))
    t0 = time.perf_counter()
    tokens, ttft, cached = [], None, 0
    try:
        async for out in streams.open(engine, req):
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            tokens += out.token_ids
            cached = out.num_cached_tokens
    finally:
        if own:
            streams.close()
    return tokens, ttft, cached


def _engine_run(engine, prompts: list[list[int]], output_len: int, block_size: int) -> tuple[float, list[list[int]]]:
    """Submit all prompts at once; (output tokens/s from first submit to last finish, tokens)."""
    async def main():
        t0 = time.perf_counter()
        streams = EngineStreams("bench")  # one consumer, as a proxy slave
        results = await asyncio.gather(*[_stream(engine, p, output_len, block_size, streams) for p in prompts])
        streams.close()
        return time.perf_counter() - t0, [r[0] for r in results]

    wall, tokens = asyncio.run(main())
    return sum(map(len, tokens)) / wall, tokens


def _reference_run(model, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    tokens = generate(model, prompts, output_len).tokens
    return sum(map(len, tokens)) / (time.perf_counter() - t0), tokens


class _Engine:
    """One instance + engine actor (and its own global KV cache actor), killed on exit."""

    def __init__(self, manifest: Manifest, refs, ep: int, kv_blocks: int, sched: SchedulerConfig,
                 overlap_steps: bool | None = None):
        eng, tag = manifest.engine, uuid.uuid4().hex[:6]
        self.cache = None
        cache_name = None
        if eng.global_kv_cache:
            cache_name = f"bench-kv-{tag}"
            self.cache = get_or_create_kv_cache(eng.kv_cache_bytes, name=cache_name)
        self.inst = launch_instance(
            f"bench-engine-{tag}", manifest.model, ep, manifest.compute, manifest.device, refs,
            backend=manifest.collective_backend, block_size=sched.block_size, kv_blocks=kv_blocks,
            kv_cache_name=cache_name,
        )
        overlap = eng.overlap_steps if overlap_steps is None else overlap_steps
        self.engine = launch_engine(self.inst, sched, kv_cache_name=cache_name, overlap_steps=overlap)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inst.shutdown()
        if self.cache is not None:
            ray.kill(self.cache)


def run_engine_bench(
    manifest: Manifest, ep: int, batches: list[int], prompt_len: int, output_len: int,
    prefix_len: int, suffix_len: int, repeats: int, compare_overlap: bool = False,
) -> EngineBenchResult:
    if manifest.compute != "real":
        raise ValueError("compute: bench engine checks tokens against the reference and needs compute: real")
    cfg, eng = manifest.model, manifest.engine
    bs, vocab = eng.block_size, cfg.vocab_size
    sched = SchedulerConfig(max(eng.max_num_seqs, max(batches)), eng.max_num_batched_tokens, bs)
    # Worst case: every sequence of the largest batch on one NPU; the prefix part holds 2 prompts at most.
    need = max(max(batches) * -(-(prompt_len + output_len) // bs), 2 * -(-(prefix_len + suffix_len + 1) // bs))
    kv_blocks = max(eng.kv_blocks or 0, need + 8)
    refs = publish_weights(cfg, manifest.checkpoint)
    reference = build_reference(cfg, fetch_shared(refs))
    result = EngineBenchResult(cfg.name, cfg.dtype, ep, prompt_len, output_len, prefix_len, suffix_len, repeats,
                               asdict(sched), eng.global_kv_cache)

    # 1. throughput
    eng_runs = {b: [] for b in batches}
    ref_runs = {b: [] for b in batches}
    match = {b: True for b in batches}
    spent = {b: dict.fromkeys(SPLIT_COUNTERS, 0.0) for b in batches}  # engine counters over the timed runs
    plain_runs = {b: [] for b in batches}  # compare_overlap: the engine without overlapped steps
    with contextlib.ExitStack() as stack:
        e = stack.enter_context(_Engine(manifest, refs, ep, kv_blocks, sched))
        plain = stack.enter_context(_Engine(manifest, refs, ep, kv_blocks, sched, False)) if compare_overlap else None
        warm = [_prompt(prompt_len, vocab, seed=-1)]
        for engine in [e] + [plain] * compare_overlap:
            _engine_run(engine.engine, warm, output_len, bs)
        _reference_run(reference, warm, output_len)
        for r in range(repeats):
            for b in batches:
                prompts = [_prompt(prompt_len, vocab, seed=(r * 1000 + b) * 1000 + i) for i in range(b)]
                before = ray.get(e.engine.stats.remote())
                tok_s, got = _engine_run(e.engine, prompts, output_len, bs)
                after = ray.get(e.engine.stats.remote())
                for k in SPLIT_COUNTERS:
                    spent[b][k] += getattr(after.counters, k) - getattr(before.counters, k)
                eng_runs[b].append(tok_s)
                tok_s, want = _reference_run(reference, prompts, output_len)
                ref_runs[b].append(tok_s)
                match[b] = match[b] and got == want
                if plain is not None:
                    tok_s, got = _engine_run(plain.engine, prompts, output_len, bs)
                    plain_runs[b].append(tok_s)
                    match[b] = match[b] and got == want
    for b in batches:
        e_tok, r_tok = statistics.median(eng_runs[b]), statistics.median(ref_runs[b])
        row = BatchRow(b, e_tok, r_tok, e_tok / r_tok, match[b])
        if compare_overlap:
            row.no_overlap_tok_s = statistics.median(plain_runs[b])
            row.overlap_gain = e_tok / row.no_overlap_tok_s
        result.batches.append(row)
        result.splits.append(StepSplit.of(b, spent[b]))

    # 2. prefix reuse: prompt = prefix + suffix; seeds from 10**9 up are never used by part 1
    def prompt(r: int, which: int, part: int) -> list[int]:
        n = prefix_len if part == 0 else suffix_len
        return _prompt(n, vocab, seed=10**9 + (r * 10 + which) * 10 + part)

    uncached, cached, hits, ok = [], [], [], True
    with _Engine(manifest, refs, ep, kv_blocks, sched) as e:
        asyncio.run(_stream(e.engine, prompt(-1, 0, 0) + prompt(-1, 0, 1), 1, bs))  # warm-up
        for r in range(repeats):
            fresh = prompt(r, 0, 0) + prompt(r, 0, 1)
            tokens, ttft, n_cached = asyncio.run(_stream(e.engine, fresh, 1, bs))
            if n_cached:
                raise RuntimeError(f"bench engine: a never-seen prefix reported {n_cached} cached tokens")
            uncached.append(ttft)
            ok = ok and tokens == generate(reference, [fresh], 1).tokens[0]
            asyncio.run(_stream(e.engine, prompt(r, 1, 0) + prompt(r, 1, 1), 1, bs))  # caches prefix (r, 1)
            second = prompt(r, 1, 0) + prompt(r, 2, 1)  # same prefix, another suffix
            tokens, ttft, n_cached = asyncio.run(_stream(e.engine, second, 1, bs))
            if n_cached <= 0:
                raise RuntimeError(f"bench engine: the cached prefix ({prefix_len} tokens) reported "
                                   f"num_cached_tokens={n_cached}; prefix caching did not work")
            cached.append(ttft)
            hits.append(n_cached)
            ok = ok and tokens == generate(reference, [second], 1).tokens[0]
    t_u, t_c = statistics.median(uncached), statistics.median(cached)
    result.prefix = PrefixRow(t_u, t_c, t_c / t_u, min(hits), ok)
    return result


def print_engine_bench(result: EngineBenchResult, console) -> None:
    from rich.table import Table

    yes = lambda ok: "[green]yes" if ok else "[red]NO"
    table = Table(title=f"omniray bench engine — {result.model} ({result.dtype}), EP-{result.ep}, "
                  f"prompt {result.prompt_len}, {result.output_len} output tokens, median of {result.repeats}")
    ab = any(b.overlap_gain is not None for b in result.batches)
    cols = ("batch", "engine tok/s", "reference tok/s", "engine / reference")
    for col in cols + (("no overlap tok/s", "overlap gain") if ab else ()) + ("tokens match",):
        table.add_column(col, justify="right")
    for b in result.batches:
        extra = (f"{b.no_overlap_tok_s:.1f}", f"{b.overlap_gain:.2f}x") if ab else ()
        table.add_row(str(b.batch), f"{b.engine_tok_s:.1f}", f"{b.reference_tok_s:.1f}", f"{b.ratio:.2f}x", *extra,
                      yes(b.tokens_match))
    console.print(table)
    table = Table(title="where a step goes, ms per step (engine counters over the timed runs)")
    cols = (("batch", "batch"), ("steps", "steps"), ("step", "step_ms"), ("dispatch", "dispatch_ms"),
            ("NPU compute", "npu_compute_ms"), ("all-to-all", "all_to_all_ms"), ("results back", "transfer_ms"),
            ("update", "update_ms"), ("streams, other", "other_ms"))
    for title, _ in cols:
        table.add_column(title, justify="right")
    for sp in result.splits:
        table.add_row(*(str(getattr(sp, k)) if isinstance(getattr(sp, k), int) else f"{getattr(sp, k):.2f}"
                        for _, k in cols))
    console.print(table)
    p = result.prefix
    if p is None:
        return
    n = result.prefix_len + result.suffix_len
    table = Table(title=f"prefix reuse — TTFT of a {n}-token prompt (max_tokens 1), "
                  f"{result.prefix_len}-token prefix, median of {result.repeats}")
    for col in ("prefix", "cached tokens", "TTFT ms", "vs uncached", "first token matches"):
        table.add_column(col, justify="right")
    table.add_row("never seen", "0", f"{p.ttft_uncached_s * 1000:.1f}", "1.00x", yes(p.tokens_match))
    table.add_row("cached", str(p.cached_tokens), f"{p.ttft_cached_s * 1000:.1f}", f"{p.ratio:.2f}x", yes(p.tokens_match))
    console.print(table)
