"""InstanceEngine: the engine actor of one instance. Its loop is one sentence:
schedule -> execute on the NPUs -> update the sequences and stream their tokens.

Requests arrive as token ids (the proxy tokenized them once) and leave as a
stream of EngineOutput. Role `prefill` runs a request until its first token
and hands its KV on (KVTransfer: block refs in the object store); role
`decode` starts from such a transfer; `mixed` does both. Full prompt blocks
are published to the global KV cache, so any instance can reuse a prefix.

Two things leave the engine besides tokens: KV events (the prefix hashes its
NPUs stored and evicted, one batch per step, actors.kv_events) that the master
follows with a long poll to route by prefix, and the lifecycle stages that
happen here (prefill_done; on the decode side of P/D decode_scheduled and
kv_transferred), carried on the request's stream as ages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

import ray

from actors.engine.block_manager import BlockManager
from actors.engine.consumers import ConsumerStream, RequestSink, stamps_as_ages
from actors.engine.elastic_switch import ElasticSwitch
from actors.engine.prefix_book import PrefixBook
from actors.engine.scheduler import Scheduled, Scheduler, SchedulerConfig
from actors.engine.sequence import Sequence, continues, end_reason
from actors.engine.stats import EngineCounters, EngineStats
from actors.executor import InstanceExecutor
from actors.kv_events import KVEventBatch
from actors.protocol import EngineOutput, EngineRequest, KVTransfer, SeqWork

logger = logging.getLogger(__name__)

STEP_LOG_LEN = 65536  # steps kept in the step log (minutes of serving)
EARLY_KV_TTL_S = 60.0  # a pushed KV whose request never arrives is dropped after this


@dataclass(frozen=True)
class EngineConfig:
    name: str
    role: str = "mixed"  # prefill | decode | mixed
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache_name: str | None = None  # global KV cache actor; None: local prefix caching only
    mtp: bool = False  # MTP speculative decoding for greedy requests (the model needs MTP heads)
    tokenizer_json: str | None = None  # guided decoding: the tokenizer (HF tokenizer.json text)
    vocab_size: int = 0  # the model's (guided decoding's token masks cover it)
    # overlapped steps (async scheduling): while the NPUs run a step of steady decoding, the
    # next one is already sent (the NPUs feed the tokens they sampled): the engine's host
    # work (results, streams, the next dispatch) leaves the step's critical path
    overlap_steps: bool = True


class InstanceEngine:
    def __init__(self, config: EngineConfig, npus: list, npu_memory: list[dict], specs: list | None = None):
        self.config = config
        # the NPUs it steps, their specs and memory reports: what a restarted controller reads back (layout)
        self._layout = (list(npus), list(specs or []), list(npu_memory))
        bs = config.scheduler.block_size
        self.managers = [BlockManager(m["kv_blocks"], bs) for m in npu_memory]
        self.nodes: list[str | None] = [m.get("node") for m in npu_memory]  # per rank: where its KV is
        self.scheduler = Scheduler(config.scheduler, self.managers)
        self.executor = InstanceExecutor(npus)
        self.seqs: dict[str, Sequence] = {}
        self.queues: dict[str, asyncio.Queue | RequestSink] = {}  # request -> where its outputs go
        self.consumers: dict[str, ConsumerStream] = {}  # consumer -> its stream's pending items (consumers.py)
        self.pending: dict[str, Sequence] = {}  # parallel P/D: admitted, waiting for their KV
        # KV delivered before its request came: (when, output ids, KV, forks' output ids)
        self.early: dict[str, tuple[float, list[int], KVTransfer, list | None]] = {}
        self.guides = None  # guided decoding: grammars compiled for this engine's tokenizer, on first use
        self._kv_cache = None  # the global KV cache actor's handle, once looked up
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.counters = EngineCounters()
        self.device_time_s = 0.0
        self.healthy = True  # False once a step failed on an NPU: the instance needs a rebuild
        self.elastic = ElasticSwitch(self)  # an EP resize or a new expert map, applied between two steps
        # resolved when the next step ends: (its end, None); (None, why) when it failed;
        # (None, None) when the work ran out first. Never left pending (a resize waits on it)
        self._after_step: list[asyncio.Future] = []
        # (time.time() at the step's end, tokens it generated): throughput over any window,
        # on the wall clock so that a controller or benchmark on another host can line it up
        self.step_log: deque[tuple[float, int]] = deque(maxlen=STEP_LOG_LEN)
        self.holding = False  # hold(): requests are admitted but no step runs (a batch starts together)
        self.step_records: list[StepRecord] | None = None  # record_steps(): each step's shape and device time
        self.prefixes = PrefixBook(bs)  # prefix-chain hashes, local prefix caching, KV events

    # ---- requests ------------------------------------------------------------------
    @ray.method(enable_task_events=False)  # a call per request, on the hot path (see kv_events)
    async def generate(self, request: EngineRequest):
        """Stream EngineOutput for one request (a Ray streaming generator)."""
        self._ensure_loop()
        await self._admit(request)
        queue = self.queues[request.request_id]
        open_choices = max(request.n, 1)
        try:
            while True:
                out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                stamps_as_ages(out, time.monotonic())
                yield out
                open_choices -= out.finished
                if open_choices == 0:
                    return
        finally:
            for seq in self._choices(request.request_id):  # the consumer went away: free their KV now
                if not seq.finish_reason:
                    self._finish(seq, "abort")
            self.queues.pop(request.request_id, None)

    @ray.method(enable_task_events=False)
    async def stream(self, consumer: str):
        """Every update of `consumer`'s requests (those it sent with `submit`), one
        item a step: a list of (request id, EngineOutput or the exception that
        failed it). Runs as long as the consumer reads; when it goes away, its
        unfinished requests are aborted."""
        self._ensure_loop()
        stream = self.consumers.setdefault(consumer, ConsumerStream())
        try:
            while True:
                await stream.ready.wait()
                yield stream.take()
        finally:
            if self.consumers.get(consumer) is stream:
                del self.consumers[consumer]
            for request_id in list(stream.requests):
                for seq in self._choices(request_id):
                    if not seq.finish_reason:
                        self._finish(seq, "abort")
                self.queues.pop(request_id, None)

    @ray.method(enable_task_events=False)  # a call per request, on the hot path (see kv_events)
    async def submit(self, request: EngineRequest, consumer: str) -> None:
        """Admit a request whose outputs go out on `consumer`'s stream; a bad
        request raises here."""
        self._ensure_loop()
        stream = self.consumers.setdefault(consumer, ConsumerStream())  # (its stream call may still be on its way)
        await self._admit(request, RequestSink(stream, request.request_id, request.n, self._sink_closed))
        stream.requests.add(request.request_id)  # (no output before the first step after this)

    def _sink_closed(self, request_id: str) -> None:
        if isinstance(self.queues.get(request_id), RequestSink):
            del self.queues[request_id]

    def _choices(self, request_id: str) -> list[Sequence]:
        """The live sequences of a request: its own, and its forks (n > 1)."""
        return [s for s in self.seqs.values() if s.request_id == request_id]

    async def _admit(self, req: EngineRequest, sink: RequestSink | None = None) -> Sequence:
        """Take a request in; its outputs go to `sink` (a consumer's stream) or to a
        queue of its own (generate)."""
        if not req.prompt_ids:
            raise ValueError("prompt_ids: empty prompt")
        if req.request_id in self.seqs:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        bm = self.managers[0]
        need = bm.blocks_needed(len(req.prompt_ids) + req.max_tokens) + (req.n - 1) * bm.blocks_needed(req.max_tokens + 1)
        if need > max(m.num_blocks for m in self.managers):
            raise ValueError(
                f"max_tokens: prompt ({len(req.prompt_ids)}) + max_tokens ({req.max_tokens}) needs {need} KV blocks; "
                f"an NPU of {self.config.name} has {self.managers[0].num_blocks}"
            )
        seq = Sequence(req)
        if req.guide is not None:
            seq.guide = self._guide(req.guide, seq.output_ids)
        if req.kv_pending:  # parallel P/D: open the stream now, schedule when the KV arrives
            self.seqs[req.request_id] = seq
            self.queues[req.request_id] = sink or asyncio.Queue()
            self.pending[req.request_id] = seq
            early = self.early.pop(req.request_id, None)
            if early is not None:
                self.deliver(req.request_id, *early[1:])
            return seq
        if req.kv_transfer is not None:
            seq.remote_blocks, seq.remote_tokens = req.kv_transfer.blocks, req.kv_transfer.num_tokens
        elif self.config.kv_cache_name and req.block_hashes and req.params.prompt_logprobs is None:
            await self._match_global(seq)  # (prompt logprobs need the whole prompt's forward: no cache)
        self.seqs[req.request_id] = seq
        self.queues[req.request_id] = sink or asyncio.Queue()
        self.counters.prompt_tokens += len(req.prompt_ids)
        self.scheduler.add(seq)
        self._wake.set()
        return seq

    def deliver(self, request_id: str, output_ids: list[int], transfer: KVTransfer,
                fork_outputs: list[list[int]] | None = None) -> bool:
        """Parallel P/D: the prefill instance pushes a parked request's KV and first
        token(s); the request joins the scheduler. A delivery that overtook its
        request is kept until the request arrives (stale ones are dropped)."""
        seq = self.pending.pop(request_id, None)
        if seq is None:
            now = time.monotonic()
            self.early = {k: v for k, v in self.early.items() if now - v[0] < EARLY_KV_TTL_S}
            if request_id not in self.seqs:
                self.early[request_id] = (now, list(output_ids), transfer, fork_outputs)
            return False
        seq.request.fork_outputs = list(fork_outputs or [])
        seq.output_ids = list(output_ids)
        if seq.guide is not None:  # the grammar goes on from the prefill's tokens
            seq.guide = self._guide(seq.request.guide, seq.output_ids)
        seq.emitted = len(seq.output_ids)
        seq.remote_blocks, seq.remote_tokens = transfer.blocks, transfer.num_tokens
        self.counters.prompt_tokens += len(seq.request.prompt_ids)
        self.scheduler.add(seq)
        self._wake.set()
        return True

    async def _match_global(self, seq: Sequence) -> None:
        usable = seq.request.block_hashes[: (len(seq.request.prompt_ids) - 1) // self.config.scheduler.block_size]
        if not usable:  # no full block before the last token: nothing the cache could hold
            return
        try:
            if self._kv_cache is None:  # looked up once (a GCS call), again after a failure
                self._kv_cache = ray.get_actor(self.config.kv_cache_name)
            hit = await self._kv_cache.match.remote(usable)
        except Exception:  # no cache, or it is restarting: a miss costs only recomputation
            self._kv_cache = None
            return
        seq.remote_blocks, seq.remote_tokens = hit["refs"], hit["num_blocks"] * self.config.scheduler.block_size

    async def abort(self, request_id: str) -> bool:
        choices = self._choices(request_id)
        for seq in choices:
            self._finish(seq, "abort")
        return bool(choices)

    # ---- the loop ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the step loop outside any request: Ray cancels the tasks a cancelled
        call submitted, so a loop begun inside a request's generate() would have its
        NPU steps cancelled when that request's client goes away."""
        self._ensure_loop()

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._steps()
        except Exception as err:  # a bug in the loop itself: fail every request loudly, never hang them
            logger.exception("engine %s: loop crashed", self.config.name)
            for seq in list(self.seqs.values()):
                self._fail(seq, f"engine {self.config.name}: loop crashed: {err!r}")
            self._step_done(None, f"loop crashed: {err!r}")
            self._loop_task = None

    def _next_step(self) -> asyncio.Future | None:
        """A future that the end of the next step resolves (see _after_step); None
        when there is no work, so no step to wait for."""
        if not self.scheduler.has_work():
            return None
        step = asyncio.get_running_loop().create_future()
        self._after_step.append(step)
        return step

    def _step_done(self, ended: float | None, error: str | None = None) -> None:
        for fut in self._after_step:
            if not fut.done():
                fut.set_result((ended, error))
        self._after_step = []

    async def _steps(self) -> None:
        last_end = None  # when the last step's results were in, while the work went on since
        flight: _Flight | None = None  # a step on the NPUs whose results are not taken in yet
        while True:
            if flight is None:
                if self.elastic.pending is not None:
                    await self.elastic.apply()
                if self.holding or not self.scheduler.has_work():
                    self._step_done(None)  # (aborted, or finished by a failed step): no step to wait for
                    last_end = None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                scheduling = time.monotonic()
                scheduled = self.scheduler.schedule()
                if not scheduled:
                    self.prefixes.publish(self.managers)  # a failed admission may have evicted
                    last_end = None  # waiting for blocks, not host work
                    await asyncio.sleep(0.001)  # admission waits for blocks freed by a finishing request
                    continue
                flight = self._send(scheduled, [self._work(s) for s in scheduled], scheduling)
            # overlapped steps: the next step goes out before this one's results are taken in
            follow = self._follow_on(flight) if self.config.overlap_steps else None
            awaiting = time.monotonic()
            if last_end is not None:
                self.counters.host_gap_s += awaiting - last_end
            self.elastic.retired = None  # freed while the NPUs run the step: what the last switch replaced
            try:
                out = InstanceExecutor.merge(await asyncio.gather(*flight.refs))
            except Exception as err:  # an NPU failed: fail what ran, loudly, and keep serving the rest
                logger.exception("engine %s: step failed", self.config.name)
                if isinstance(err, ray.exceptions.RayActorError):  # an NPU is gone: the instance needs a rebuild
                    self.healthy = False
                for s in flight.scheduled:
                    self._fail(s.seq, f"engine {self.config.name}: step failed on an NPU: {err}")
                if follow is not None:  # (its sequences were the failed step's)
                    await asyncio.gather(*follow.refs, return_exceptions=True)
                self._step_done(None, f"step failed on an NPU: {err}")
                self.prefixes.publish(self.managers)
                flight, last_end = None, None
                continue
            last_end = self._take_in(flight, out, awaiting)
            flight = follow

    def _send(self, scheduled: list[Scheduled], works: list[SeqWork], began: float) -> _Flight:
        """Send one step to the NPUs; `began`: when its scheduling began."""
        refs = self.executor.submit(works, ranks=[s.seq.rank for s in scheduled])
        submitted = time.monotonic()
        self.counters.dispatch_s += submitted - began
        return _Flight(scheduled, refs, submitted)

    def _take_in(self, flight: _Flight, out, awaiting: float) -> float:
        """A step's results are in (the loop began waiting for them at `awaiting`):
        update its sequences, stream their tokens, publish the KV events, log it.
        Returns when the results were in."""
        scheduled = flight.scheduled
        results_in = time.monotonic()
        self.device_time_s += out.device_time_s
        self.counters.step_wall_s += results_in - awaiting
        self.counters.steps += 1
        self.counters.overrun_steps += out.overruns > 0
        self.counters.npu_s += out.wall_time_s
        self.counters.a2a_s += out.comm_s
        generated = self.counters.generated_tokens
        self._stamp_decode_side(scheduled, flight.submitted, out)
        shape = StepRecord.of(scheduled, out.device_time_s) if self.step_records is not None else None
        self._update(scheduled, out)
        self.prefixes.publish(self.managers)
        ended = time.time()
        self.step_log.append((ended, self.counters.generated_tokens - generated))
        if shape is not None and self.step_records is not None:
            self.step_records.append(replace(shape, tokens=self.counters.generated_tokens - generated,
                                             finished=sum(1 for s in scheduled if s.seq.finish_reason)))
        self.counters.update_s += time.monotonic() - results_in
        self._step_done(ended)
        return results_in

    def _follow_on(self, flight: _Flight) -> _Flight | None:
        """Overlapped steps (async scheduling): the step after `flight`, sent now,
        while `flight` runs, when it is steady decoding: every sequence of it
        decodes one token with nothing that needs its result first (no MTP
        draft, no grammar, no penalty over the output, no min_tokens ban, no KV
        to load or copy), nothing waits to be admitted, and no switch or hold is
        pending. Each sequence's token to feed is the one its NPU samples in
        `flight` (SeqWork.follows). A sequence that ends in `flight` by length
        is left out; one that ends by a stop token or EOS has one token computed
        past its end, which is never taken in (its update skips a finished
        sequence) and whose KV goes with its blocks. None: the next step waits
        for this one's results, as without overlap."""
        if self.holding or self.elastic.pending is not None or self.scheduler.waiting:
            return None
        began = time.monotonic()
        nxt = []
        for s in flight.scheduled:
            seq = s.seq
            if seq.finish_reason:
                continue
            if not self._followable(s):
                return None
            if len(seq.output_ids) + 1 < seq.request.max_tokens:  # (else `flight` samples its last token)
                nxt.append(seq)
        if not nxt:
            return None
        for seq in nxt:  # the KV slot of the token it feeds: the one after `flight`'s
            if not self.managers[seq.rank].grow(seq.block_table, seq.num_computed + 2):
                return None
        works, follow = [], []
        for seq in nxt:
            works.append(SeqWork(seq.seq_id, [0], seq.num_computed + 1, True, self._params(seq),
                                 len(seq.output_ids) + 1, block_table=list(seq.block_table), follows=True))
            item = Scheduled(seq, 1)
            item.samples = True
            follow.append(item)
        self.counters.overlapped_steps += 1
        return self._send(follow, works, began)

    def _followable(self, s: Scheduled) -> bool:
        """A sequence of a step in flight whose next step can go out before that
        step's results are in (see _follow_on)."""
        seq, req = s.seq, s.seq.request
        p = req.params
        return (s.samples and s.num_tokens == 1 and bool(seq.output_ids) and not s.load and not seq.copy_blocks
                and seq.draft is None and not (self.config.mtp and _plain(req)) and seq.guide is None
                and not p.needs_history and len(seq.output_ids) + 1 >= p.min_tokens
                and (req.n == 1 or seq.forked) and seq.rank is not None)

    def _work(self, s: Scheduled) -> SeqWork:
        seq, bs = s.seq, self.config.scheduler.block_size
        start, stop = seq.num_computed, seq.num_computed + s.num_tokens
        n_prompt = len(seq.request.prompt_ids)
        prompt_hashes = self.prefixes.chain(seq, n_prompt)
        save = []
        if seq.request.prefill_only and s.samples and len(seq.output_ids) + 1 < seq.request.max_tokens:
            # hand the whole prompt's KV on (not when this token is the request's last: no decode follows)
            save = [(b, prompt_hashes[i] if i < len(prompt_hashes) else None) for i, b in enumerate(seq.block_table[: -(-n_prompt // bs)])]
        elif self.config.kv_cache_name and self.config.role != "decode":  # publish newly computed prompt blocks
            first = max(start, seq.num_cached) // bs
            save = [(seq.block_table[i], prompt_hashes[i]) for i in range(first, min(stop, n_prompt) // bs)]
        tokens = seq.token_ids[start:stop]
        drafting = s.samples and seq.draft is not None
        if drafting:
            tokens = tokens + [seq.draft]
        req, params = seq.request, self._params(seq)
        propose = self.config.mtp and _plain(req) and not req.prefill_only
        copies, seq.copy_blocks = seq.copy_blocks, []
        return SeqWork(
            seq.seq_id, tokens, start, s.samples, params, len(seq.output_ids),
            block_table=list(seq.block_table), load_blocks=s.load, save_blocks=save,
            load_intra_node=bool(s.load) and seq.remote_node is not None and seq.remote_node == self.nodes[seq.rank],
            num_drafts=1 if drafting else 0, propose=propose,
            next_token=seq.token_ids[stop] if stop < seq.num_tokens else None,
            output_ids=tuple(seq.output_ids) if params.needs_history else (),
            prompt_ids=tuple(req.prompt_ids) if params.repetition_penalty != 1.0 else (),
            banned=self._banned(seq) if s.samples else (),
            allowed=seq.guide.bitmask() if s.samples and seq.guide is not None else None,
            copy_blocks=tuple(copies),
            forks=self._fork_params(seq) if s.samples and self._forks_here(seq) else (),
        )

    @staticmethod
    def _params(seq: Sequence):
        """The sampling of this sequence's next step: a fork draws with its own seed
        (the request's + its index, as vLLM), and the prompt's logprobs are computed
        where the prompt is, once (never on the decode side of P/D, nor by a fork)."""
        params = seq.request.params
        update = {}
        if seq.index and params.seed is not None:
            update["seed"] = params.seed + seq.index
        if params.prompt_logprobs is not None and (seq.decode_side or seq.index or seq.output_ids):
            update["prompt_logprobs"] = None
        return params.model_copy(update=update) if update else params

    @staticmethod
    def _banned(seq: Sequence) -> tuple[int, ...]:
        """min_tokens: the end (EOS, stop token ids) may not be sampled before it."""
        req = seq.request
        if len(seq.output_ids) >= req.params.min_tokens:
            return ()
        ends = set(req.stop_token_ids) | ({req.eos_token_id} if req.eos_token_id is not None else set())
        return tuple(sorted(ends))

    @staticmethod
    def _forks_here(seq: Sequence) -> bool:
        """Parallel sampling: this step computes the last prompt token of a request
        with n > 1 whose forks do not exist yet: it samples their first tokens too."""
        return (seq.request.n > 1 and seq.index == 0 and not seq.decode_side and not seq.forked
                and not seq.output_ids)

    def _fork_params(self, seq: Sequence) -> tuple:
        base = seq.request.params
        return tuple((_fork_id(seq.request_id, j),
                      base.model_copy(update={"seed": base.seed + j}) if base.seed is not None else base)
                     for j in range(1, seq.request.n))

    def _guide(self, spec, output_ids: list[int]):
        """A grammar matcher for guided decoding, advanced past the tokens already generated."""
        if self.guides is None:
            from actors.engine.guided import GuideCompiler

            if not self.config.tokenizer_json:
                raise ValueError("response_format: guided decoding needs the tokenizer (EngineConfig.tokenizer_json)")
            self.guides = GuideCompiler(self.config.tokenizer_json, self.config.vocab_size)
        matcher = self.guides.matcher(spec)
        for t in output_ids:
            matcher.accept(t)
        return matcher

    def _fork(self, parent: Sequence, outputs: list[list[int]], logprobs: list[list] | None = None) -> list[Sequence]:
        """Parallel sampling (n > 1): the parent's prompt KV is complete; each other
        choice becomes a sequence on the parent's NPU that shares its full prompt
        blocks (reference-counted) and gets a copy of the partial last one (copy on
        write: the first block where the choices diverge), copied on the NPU before
        its first step. `outputs`: each fork's tokens so far (its first token, drawn
        from the parent's last prompt row). A fork that finds no free block waits to
        be admitted like a new sequence (its prefix cached: it recomputes the tail).
        Returns the forks placed with tokens to stream (the caller emits them)."""
        parent.forked, to_emit = True, []
        bs, n_prompt = self.config.scheduler.block_size, len(parent.request.prompt_ids)
        bm = self.managers[parent.rank]
        full = n_prompt // bs
        for j, ids in enumerate(outputs, start=1):
            child = Sequence(parent.request)
            child.index, child.seq_id_override, child.forked = j, _fork_id(parent.request_id, j), True
            child.output_ids = list(ids)
            child.emitted = len(ids) if parent.decode_side else 0  # on P/D they left with the prefill's output
            child.logprobs = list(logprobs[j - 1]) if logprobs else []
            child.first_cached = child.num_cached = n_prompt
            child.arrival = parent.arrival
            if parent.request.guide is not None:
                child.guide = self._guide(parent.request.guide, child.output_ids)
            self.seqs[child.seq_id] = child
            table = parent.block_table[:full]
            bm.attach(table)
            table = list(table)
            if child.check_finished():
                bm.release(table)
                self._finish(child, child.finish_reason)  # (a fork ended by its first token)
                continue
            if n_prompt % bs and not bm.grow(table, n_prompt):
                bm.release(table)
                child.first_cached = None
                self.scheduler.add(child)  # no block for its copy: admitted later, from the prefix cache
                to_emit.append(child)
                continue
            if n_prompt % bs:
                child.copy_blocks = [(parent.block_table[full], table[full])]
            child.rank, child.block_table, child.num_computed = parent.rank, table, n_prompt
            child.registered_blocks = full
            self.scheduler.adopt_running(child)
            self.counters.forked_seqs += 1
            self.counters.shared_blocks += full
            if child.emitted < len(child.output_ids):
                to_emit.append(child)
        return to_emit

    def _update(self, scheduled: list[Scheduled], out) -> None:
        for s in scheduled:
            seq = s.seq
            if seq.finish_reason:  # aborted while its step ran
                continue
            self._take_prompt_logprobs(seq, out.prompt_logprobs.get(seq.seq_id))
            accepted = out.accepted.get(seq.seq_id, [])
            if s.samples and seq.draft is not None:
                self.counters.drafted_tokens += 1
                self.counters.accepted_tokens += len(accepted)
            seq.draft = out.drafts.get(seq.seq_id)
            seq.num_computed += s.num_tokens + len(accepted)  # an accepted draft's KV is already written
            self.counters.computed_tokens += s.num_tokens
            finished = False
            if s.samples and not seq.decode_side:  # the prompt is computed: its first token sampled here
                seq.stamp("prefill_done")
            forks = self._forks_here(seq) and s.samples
            if s.samples and seq.request.n > 1 and seq.decode_side and not seq.forked and seq.index == 0:
                self._fork(seq, seq.request.fork_outputs)  # P/D decode side: their first tokens came along
                if not continues(seq.request, seq.output_ids):  # its own choice ended at the prefill
                    seq.check_finished()
                    self._finish(seq, seq.finish_reason)
                    continue
            if s.samples:
                for token in accepted + [out.tokens[seq.seq_id]]:
                    seq.output_ids.append(token)
                    if seq.guide is not None:
                        seq.guide.accept(token)
                    self.counters.generated_tokens += 1
                    if seq.check_finished():
                        finished = True
                        break
                if seq.seq_id in out.logprobs:
                    seq.logprobs.append(out.logprobs[seq.seq_id])
            self.prefixes.register(seq, self.managers[seq.rank])
            if not s.samples:
                continue
            forked = []
            if forks:  # its forks' first tokens were drawn from the same row (before it frees its blocks)
                ids = [_fork_id(seq.request_id, j) for j in range(1, seq.request.n)]
                self.counters.generated_tokens += len(ids)
                fork_lps = [[out.logprobs[i]] if i in out.logprobs else [] for i in ids]
                if seq.request.prefill_only:
                    self._emit_forks(seq, [[out.tokens[i]] for i in ids], fork_lps)
                else:
                    forked = self._fork(seq, [[out.tokens[i]] for i in ids], fork_lps)
            if finished:
                transfer = None
                if seq.request.prefill_only and self._continues(seq):  # (else no decode follows)
                    transfer = KVTransfer(len(seq.request.prompt_ids), self.config.scheduler.block_size, out.exported.get(seq.seq_id, []))
                self._finish(seq, seq.finish_reason, transfer)
            else:
                self._emit(seq)
            for child in forked:  # after their parent's output: it carries the prompt's logprobs
                self._emit(child)

    @staticmethod
    def _stamp_decode_side(scheduled: list[Scheduled], submitted: float, out) -> None:
        """P/D decode side: the first step of a prefilled request here was scheduled
        at `submitted` and began by loading its KV, in place `load_s` after."""
        for s in scheduled:
            if s.seq.decode_side:
                s.seq.stamp("decode_scheduled", submitted)
                s.seq.stamp("kv_transferred", submitted + (out.load_s[s.seq.rank] if s.load and out.load_s else 0.0))

    # one call per step, on the hot path: no task events, which would fill the GCS's
    # task-event buffer (hundreds of MiB over a 20-minute soak, `omniray bench chaos --faults none`)
    @ray.method(enable_task_events=False)
    async def kv_events(self, after: int | None = None, epoch: str | None = None) -> list[KVEventBatch]:
        """KV events after `after` (a long poll; a full dump for a new subscriber): the
        master follows these to route by prefix (actors.kv_events)."""
        self._ensure_loop()
        return await self.prefixes.events(after, epoch)

    def _take_prompt_logprobs(self, seq: Sequence, rows: list | None) -> None:
        """Prompt logprobs of the rows this step computed: row i of a chunk fed from
        position p scores the token at p + i + 1 (the prompt's first token has none)."""
        if rows is None or seq.output_ids:  # (a recomputed prompt's logprobs went out already)
            return
        n_prompt = len(seq.request.prompt_ids)
        if not seq.prompt_logprobs:
            seq.prompt_logprobs = [None] * n_prompt
        start = seq.num_computed
        for i, lp in enumerate(rows):
            if start + i + 1 < n_prompt:
                seq.prompt_logprobs[start + i + 1] = lp

    def _emit_forks(self, parent: Sequence, outputs: list[list[int]], logprobs: list[list]) -> None:
        """Prefill role, n > 1: the forks' first tokens leave with the parent's (their
        KV is the parent's: the decode instance forks them there)."""
        queue = self.queues.get(parent.request_id)
        parent.forked, parent.fork_outputs = True, outputs
        for j, (ids, lps) in enumerate(zip(outputs, logprobs), start=1):
            if queue is not None:
                reason = end_reason(parent.request, ids) or "length"  # a prefill hands on after one token
                queue.put_nowait(EngineOutput(parent.request_id, ids, True, reason, len(parent.request.prompt_ids),
                                              0, index=j, logprobs=lps or None))

    def _fail(self, seq: Sequence, message: str) -> None:
        queue = self.queues.get(seq.request_id)
        seq.finish_reason = "error"
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)
        if queue is not None:
            queue.put_nowait(RuntimeError(message))

    def _emit(self, seq: Sequence, transfer: KVTransfer | None = None) -> None:
        queue = self.queues.get(seq.request_id)
        new = seq.output_ids[seq.emitted :]
        seq.emitted = len(seq.output_ids)
        lps = seq.logprobs[seq.logprobs_emitted :] if seq.request.params.logprobs is not None else None
        seq.logprobs_emitted = len(seq.logprobs)
        prompt_lps, seq.prompt_logprobs = (seq.prompt_logprobs or None), []  # sent once, with the first token
        if queue is not None:
            queue.put_nowait(
                EngineOutput(
                    seq.request_id, new, bool(seq.finish_reason), seq.finish_reason,
                    # (P/D decode side: its prompt's KV came from the prefill, which reports its own cache hits)
                    len(seq.request.prompt_ids), 0 if seq.decode_side else seq.first_cached or 0, transfer,
                    seq.take_stamps(),
                    index=seq.index, logprobs=lps, prompt_logprobs=prompt_lps,
                )
            )

    def _finish(self, seq: Sequence, reason: str, transfer: KVTransfer | None = None) -> None:
        if transfer is not None and seq.request.deliver_to is not None and self._continues(seq):
            seq.request.deliver_to.deliver.remote(seq.request_id, list(seq.output_ids), transfer, seq.fork_outputs)
        seq.finish_reason = reason
        self.pending.pop(seq.seq_id, None)
        self.counters.cached_tokens += seq.first_cached or 0
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)
        self.prefixes.forget(seq)
        self._emit(seq, transfer)

    @staticmethod
    def _continues(seq: Sequence) -> bool:
        """A prefilled request still has tokens to decode (one of its choices' first
        token was not its end)."""
        return any(continues(seq.request, ids) for ids in [seq.output_ids, *seq.fork_outputs])

    # ---- elastic: new NPUs or a new expert map, switched between two steps -------------
    async def reconfigure(self, npus: list[str], specs: list, memory: list[dict], recompute: bool = False) -> dict:
        """Serve on `npus` (one spec and one memory report each) from the next step
        on: an EP resize (ElasticMoE) or a new expert map (Omni Placement). NPUs
        are named by actor id: each is one this engine steps now or adopted since
        its last switch, whose handle it holds (sending 8 handles and resolving
        them here costs 2.5 ms of CPU on an idle host, during the step in flight). The
        caller staged the new experts and formed the new group beforehand
        (NPU.prepare, form_group), so the switch is bookkeeping here and the spec
        riding on each NPU's next batch: no round trip of its own. NPUs kept from
        the current set keep their KV in place; sequences on NPUs that leave export
        their KV through the object store and resume on another NPU from where
        they were. The caller releases the NPUs that left once this returns.
        `recompute` (a rebuild after an NPU died): the leaving NPUs cannot be
        read, so their sequences recompute their KV from their tokens. Returns
        when the first step on the new NPUs ran (at once when there is no work)
        and the leaving NPUs' exports are done (they run beside that step, whose
        imports wait for them: not in the pause); the instance is healthy again.
        A first step that failed (an NPU lost in the switch) does not hold the
        caller: the switch stands, its requests failed loudly, and the reason is
        in `first_step_error`."""
        self._ensure_loop()
        return await self.elastic.reconfigure(npus, specs, memory, recompute)

    async def after_steps(self, n: int = 2) -> list[float | None]:
        """The wall-clock ends of the next n steps (None for one that failed, or
        when the work ran out first): a command that reaches the engine as a
        resize does and switches nothing, the control `omniray bench elastic`
        measures its scaling windows against."""
        self._ensure_loop()
        ends = []
        for _ in range(n):
            step = self._next_step()
            ends.append(None if step is None else (await step)[0])
        return ends

    async def adopt(self, npus: list, specs: list, weight_refs: dict | None,
                    reports: list[dict] | None = None) -> list[dict]:
        """Set up NPUs this engine will step after a switch (NPUActor.setup: a
        standby NPU takes its place, a new one loads from the object store) while
        it still serves on the current ones; returns their memory reports. Called
        from this process, so the setup also opens the connections the first step
        on them needs: a process's first call to an actor resolves it through the
        GCS (milliseconds each), which would otherwise stall that step. The engine
        keeps their handles: the switch names them by actor id. `reports`: NPUs
        set up already (parked by a scale-down back, as they were: these are
        their reports), only reached (NPUActor.ready), for the same reason."""
        return await self.elastic.adopt(npus, specs, weight_refs, reports)

    # ---- state for the master ---------------------------------------------------------
    async def npu_stats(self) -> list[dict]:
        """Each NPU's report: HBM ledger, device time, experts held and their load."""
        return list(await asyncio.gather(*(n.stats.remote() for n in self.executor.npus)))

    def layout(self) -> tuple[list, list, list[dict]]:
        """The NPU actors it steps now, their specs and memory reports (a restarted
        cluster controller rebuilds its view of the instance from these)."""
        return self._layout

    async def hold(self, holding: bool) -> int:
        """Hold the step loop (requests are still admitted) or let it go on: a batch
        admitted while held starts in one step. Returns the requests waiting."""
        self.holding = holding
        if not holding and self._wake is not None:
            self._wake.set()
        return len(self.scheduler.waiting) + len(self.pending)

    def record_steps(self, on: bool = True) -> list[StepRecord]:
        """Start (on) or stop recording each step's shape and device time; returns
        what was recorded since the last call."""
        taken, self.step_records = self.step_records or [], [] if on else None
        return taken

    def steps_since(self, t: float) -> list[tuple[float, int]]:
        """The step log from wall-clock time `t` on."""
        return [e for e in self.step_log if e[0] >= t]

    def requests(self) -> list[dict]:
        """The requests this engine holds (a restarted master rebuilds its loads from these)."""
        return [{"request_id": seq.request_id, "prompt_tokens": len(seq.request.prompt_ids),
                 "max_tokens": seq.request.max_tokens, "uncached_tokens": len(seq.request.prompt_ids) - seq.num_cached,
                 "prefilled": seq.decode_side or "prefill_done" in seq.stamps} for seq in self.seqs.values()
                if not seq.index]

    def stats(self) -> EngineStats:
        return EngineStats(
            self.config.name, self.config.role, self.healthy, len(self.scheduler.running),
            len(self.scheduler.waiting) + len(self.pending), [m.num_free for m in self.managers],
            [m.num_blocks for m in self.managers], self.scheduler.num_preemptions, self.device_time_s, time.time(),
            replace(self.counters),
        )


@dataclass
class _Flight:
    """A step sent to the NPUs: what it runs, the refs of their results, when it went."""

    scheduled: list[Scheduled]
    refs: list
    submitted: float


@dataclass(frozen=True)
class StepRecord:
    """One step as `omniray simulate` reads it: what ran and the device time it took."""

    device_s: float
    seqs: int
    prefill_tokens: int  # prompt tokens computed
    decode_seqs: int  # sequences past their prompt
    tokens: int = 0  # tokens generated
    finished: int = 0  # sequences that ended in it (their last step may take fewer tokens)

    @classmethod
    def of(cls, scheduled: list[Scheduled], device_s: float) -> StepRecord:
        prefill = decode = 0
        for s in scheduled:
            prompt_left = len(s.seq.request.prompt_ids) - s.seq.num_computed
            if prompt_left > 0:
                prefill += min(prompt_left, s.num_tokens)
            else:
                decode += 1
        return cls(device_s, len(scheduled), prefill, decode)


def _fork_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def _plain(req: EngineRequest) -> bool:
    """Greedy with nothing that shapes the distribution or reads it: what MTP drafting serves."""
    p = req.params
    return (p.greedy and not p.needs_history and not p.logit_bias and not p.min_tokens and p.logprobs is None
            and req.guide is None and req.n == 1)


