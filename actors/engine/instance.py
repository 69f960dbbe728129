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
from dataclasses import dataclass, field

from actors.engine.block_manager import BlockManager
from actors.engine.scheduler import Scheduled, Scheduler, SchedulerConfig
from actors.engine.sequence import Sequence
from actors.executor import InstanceExecutor
from actors.kv_events import HashCounts, KVEventBatch, KVEventLog
from actors.kv_hash import ROOT, hash_block
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


class InstanceEngine:
    def __init__(self, config: EngineConfig, npus: list, npu_memory: list[dict]):
        self.config = config
        bs = config.scheduler.block_size
        self.managers = [BlockManager(m["kv_blocks"], bs) for m in npu_memory]
        self.nodes: list[str | None] = [m.get("node") for m in npu_memory]  # per rank: where its KV is
        self.scheduler = Scheduler(config.scheduler, self.managers)
        self.executor = InstanceExecutor(npus)
        self.seqs: dict[str, Sequence] = {}
        self.queues: dict[str, asyncio.Queue] = {}
        self.hashes: dict[str, list[int]] = {}  # seq id -> prefix-chain hashes of its full blocks
        self.pending: dict[str, Sequence] = {}  # parallel P/D: admitted, waiting for their KV
        self.early: dict[str, tuple[float, list[int], KVTransfer]] = {}  # KV delivered before its request came
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.counters = {
            "steps": 0, "prompt_tokens": 0, "computed_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
            "drafted_tokens": 0, "accepted_tokens": 0, "reconfigurations": 0, "migrated_seqs": 0,
            "kv_exports": 0,  # export calls of leaving NPUs (one each, for all its migrating sequences)
            "overrun_steps": 0,  # steps in which an emulated NPU took longer than its modelled time
            # wall seconds the NPUs ran steps, and wall seconds between two steps while there was work
            # (the engine's own host time: scheduling, results, events): an emulated chip idles through
            # the second, which on a real host takes a few ms a step
            "step_wall_s": 0.0, "host_gap_s": 0.0,
        }
        self.device_time_s = 0.0
        self.healthy = True  # False once a step failed on an NPU: the instance needs a rebuild
        # (npus, specs, memory, future, recompute, exported): applied between two steps
        self._reconfig: tuple | None = None
        # resolved when the next step ends: (its end, None); (None, why) when it failed;
        # (None, None) when the work ran out first. Never left pending (a resize waits on it)
        self._after_step: list[asyncio.Future] = []
        self._adopted: dict[str, tuple[object, BlockManager]] = {}  # NPUs set up for the next switch, and
        # their block managers (built then: in the switch they would be its pause), by actor id
        self._retired: tuple | None = None  # what the last switch replaced: freed beside the next step, not in its pause
        # (time.time() at the step's end, tokens it generated): throughput over any window,
        # on the wall clock so that a controller or benchmark on another host can line it up
        self.step_log: deque[tuple[float, int]] = deque(maxlen=STEP_LOG_LEN)
        self.held = HashCounts()  # prefix hashes cached on any of its NPUs
        self.kv_log = KVEventLog(lambda: list(self.held.counts))

    # ---- requests ------------------------------------------------------------------
    async def generate(self, request: EngineRequest):
        """Stream EngineOutput for one request (a Ray streaming generator)."""
        self._ensure_loop()
        seq = await self._admit(request)
        queue = self.queues[request.request_id]
        try:
            while True:
                out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                if out.stamps:  # monotonic times -> ages as it leaves: the receiver has its own clock
                    now = time.monotonic()
                    out.stamps = {stage: now - t for stage, t in out.stamps.items()}
                yield out
                if out.finished:
                    return
        finally:
            if not seq.finish_reason:  # the consumer went away: free its KV now
                self._finish(seq, "abort")
            self.queues.pop(request.request_id, None)

    async def _admit(self, req: EngineRequest) -> Sequence:
        if not req.prompt_ids:
            raise ValueError("prompt_ids: empty prompt")
        if req.request_id in self.seqs:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        need = self.managers[0].blocks_needed(len(req.prompt_ids) + req.max_tokens)
        if need > max(m.num_blocks for m in self.managers):
            raise ValueError(
                f"max_tokens: prompt ({len(req.prompt_ids)}) + max_tokens ({req.max_tokens}) needs {need} KV blocks; "
                f"an NPU of {self.config.name} has {self.managers[0].num_blocks}"
            )
        seq = Sequence(req)
        if req.kv_pending:  # parallel P/D: open the stream now, schedule when the KV arrives
            self.seqs[req.request_id] = seq
            self.queues[req.request_id] = asyncio.Queue()
            self.pending[req.request_id] = seq
            early = self.early.pop(req.request_id, None)
            if early is not None:
                self.deliver(req.request_id, early[1], early[2])
            return seq
        if req.kv_transfer is not None:
            seq.remote_blocks, seq.remote_tokens = req.kv_transfer.blocks, req.kv_transfer.num_tokens
        elif self.config.kv_cache_name and req.block_hashes:
            await self._match_global(seq)
        self.seqs[req.request_id] = seq
        self.queues[req.request_id] = asyncio.Queue()
        self.counters["prompt_tokens"] += len(req.prompt_ids)
        self.scheduler.add(seq)
        self._wake.set()
        return seq

    def deliver(self, request_id: str, output_ids: list[int], transfer: KVTransfer) -> bool:
        """Parallel P/D: the prefill instance pushes a parked request's KV and first
        token(s); the request joins the scheduler. A delivery that overtook its
        request is kept until the request arrives (stale ones are dropped)."""
        seq = self.pending.pop(request_id, None)
        if seq is None:
            now = time.monotonic()
            self.early = {k: v for k, v in self.early.items() if now - v[0] < EARLY_KV_TTL_S}
            if request_id not in self.seqs:
                self.early[request_id] = (now, list(output_ids), transfer)
            return False
        seq.output_ids = list(output_ids)
        seq.emitted = len(seq.output_ids)
        seq.remote_blocks, seq.remote_tokens = transfer.blocks, transfer.num_tokens
        self.counters["prompt_tokens"] += len(seq.request.prompt_ids)
        self.scheduler.add(seq)
        self._wake.set()
        return True

    async def _match_global(self, seq: Sequence) -> None:
        import ray

        usable = seq.request.block_hashes[: (len(seq.request.prompt_ids) - 1) // self.config.scheduler.block_size]
        try:
            cache = ray.get_actor(self.config.kv_cache_name)
            hit = await cache.match.remote(usable)
        except Exception:  # no cache, or it is restarting: a miss costs only recomputation
            return
        seq.remote_blocks, seq.remote_tokens = hit["refs"], hit["num_blocks"] * self.config.scheduler.block_size

    async def abort(self, request_id: str) -> bool:
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

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
        last_end = None  # when the last step ended, while the work went on since
        while True:
            if self._reconfig is not None:
                await self._switch(*self._reconfig)
                self._reconfig = None
            if not self.scheduler.has_work():
                self._step_done(None)  # (aborted, or finished by a failed step): no step to wait for
                last_end = None
                self._wake.clear()
                await self._wake.wait()
                continue
            scheduled = self.scheduler.schedule()
            if not scheduled:
                self._publish_kv_events()  # a failed admission may have evicted
                last_end = None  # waiting for blocks, not host work
                await asyncio.sleep(0.001)  # admission waits for blocks freed by a finishing request
                continue
            works = [self._work(s) for s in scheduled]
            submitted = time.monotonic()
            if last_end is not None:
                self.counters["host_gap_s"] += submitted - last_end
            refs = self.executor.submit(works, ranks=[s.seq.rank for s in scheduled])
            self._retired = None  # freed while the NPUs run the step: what the last switch replaced
            try:
                out = InstanceExecutor.merge(await asyncio.gather(*refs))
            except Exception as err:  # an NPU failed: fail what ran, loudly, and keep serving the rest
                logger.exception("engine %s: step failed", self.config.name)
                import ray

                if isinstance(err, ray.exceptions.RayActorError):  # an NPU is gone: the instance needs a rebuild
                    self.healthy = False
                for s in scheduled:
                    self._fail(s.seq, f"engine {self.config.name}: step failed on an NPU: {err}")
                self._step_done(None, f"step failed on an NPU: {err}")
                self._publish_kv_events()
                continue
            self.device_time_s += out.device_time_s
            last_end = time.monotonic()
            self.counters["step_wall_s"] += last_end - submitted
            self.counters["steps"] += 1
            self.counters["overrun_steps"] += out.overruns > 0
            generated = self.counters["generated_tokens"]
            self._stamp_decode_side(scheduled, submitted, out)
            self._update(scheduled, out)
            self._publish_kv_events()
            ended = time.time()
            self.step_log.append((ended, self.counters["generated_tokens"] - generated))
            self._step_done(ended)

    def _work(self, s: Scheduled) -> SeqWork:
        seq, bs = s.seq, self.config.scheduler.block_size
        start, stop = seq.num_computed, seq.num_computed + s.num_tokens
        n_prompt = len(seq.request.prompt_ids)
        prompt_hashes = self._chain(seq, n_prompt)
        save = []
        if seq.request.prefill_only and s.samples:  # hand the whole prompt's KV on
            save = [(b, prompt_hashes[i] if i < len(prompt_hashes) else None) for i, b in enumerate(seq.block_table[: -(-n_prompt // bs)])]
        elif self.config.kv_cache_name and self.config.role != "decode":  # publish newly computed prompt blocks
            first = max(start, seq.num_cached) // bs
            save = [(seq.block_table[i], prompt_hashes[i]) for i in range(first, min(stop, n_prompt) // bs)]
        tokens = seq.token_ids[start:stop]
        drafting = s.samples and seq.draft is not None
        if drafting:
            tokens = tokens + [seq.draft]
        propose = self.config.mtp and seq.request.params.greedy and not seq.request.prefill_only
        return SeqWork(
            seq.seq_id, tokens, start, s.samples, seq.request.params, len(seq.output_ids),
            block_table=list(seq.block_table), load_blocks=s.load, save_blocks=save,
            load_intra_node=bool(s.load) and seq.remote_node is not None and seq.remote_node == self.nodes[seq.rank],
            num_drafts=1 if drafting else 0, propose=propose,
            next_token=seq.token_ids[stop] if stop < seq.num_tokens else None,
        )

    def _chain(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Prefix-chain hashes of the full blocks within seq's first num_tokens tokens."""
        bs = self.config.scheduler.block_size
        chain = self.hashes.setdefault(seq.seq_id, list(seq.request.block_hashes or []))
        tokens = seq.token_ids
        while (len(chain) + 1) * bs <= min(num_tokens, len(tokens)):
            i = len(chain)
            chain.append(hash_block(chain[-1] if chain else ROOT, tokens[i * bs : (i + 1) * bs]))
        return chain[: num_tokens // bs]

    def _update(self, scheduled: list[Scheduled], out) -> None:
        for s in scheduled:
            seq = s.seq
            if seq.finish_reason:  # aborted while its step ran
                continue
            accepted = out.accepted.get(seq.seq_id, [])
            if s.samples and seq.draft is not None:
                self.counters["drafted_tokens"] += 1
                self.counters["accepted_tokens"] += len(accepted)
            seq.draft = out.drafts.get(seq.seq_id)
            seq.num_computed += s.num_tokens + len(accepted)  # an accepted draft's KV is already written
            self.counters["computed_tokens"] += s.num_tokens
            finished = False
            if s.samples and not seq.decode_side:  # the prompt is computed: its first token sampled here
                seq.stamp("prefill_done")
            if s.samples:
                for token in accepted + [out.tokens[seq.seq_id]]:
                    seq.output_ids.append(token)
                    self.counters["generated_tokens"] += 1
                    if seq.check_finished():
                        finished = True
                        break
            self._register_blocks(seq)
            if not s.samples:
                continue
            if finished:
                transfer = None
                if seq.request.prefill_only:
                    transfer = KVTransfer(len(seq.request.prompt_ids), self.config.scheduler.block_size, out.exported.get(seq.seq_id, []))
                self._finish(seq, seq.finish_reason, transfer)
            else:
                self._emit(seq)

    @staticmethod
    def _stamp_decode_side(scheduled: list[Scheduled], submitted: float, out) -> None:
        """P/D decode side: the first step of a prefilled request here was scheduled
        at `submitted` and began by loading its KV, in place `load_s` after."""
        for s in scheduled:
            if s.seq.decode_side:
                s.seq.stamp("decode_scheduled", submitted)
                s.seq.stamp("kv_transferred", submitted + (out.load_s[s.seq.rank] if s.load and out.load_s else 0.0))

    def _publish_kv_events(self) -> None:
        """The prefix hashes this step stored and evicted on any NPU, as one batch."""
        changes = [e for m in self.managers for e in m.take_events()]
        if changes:
            self.kv_log.record(*self.held.apply(changes))

    def _recount_kv(self) -> None:
        """The set of NPUs changed (a resize, a rebuild): what the instance holds now,
        recounted, goes out as one batch of the differences."""
        for m in self.managers:
            m.take_events()  # the recount includes them
        self.kv_log.record(*self.held.reset(m.cached for m in self.managers))

    async def kv_events(self, after: int | None = None, epoch: str | None = None) -> list[KVEventBatch]:
        """KV events after `after` (a long poll; a full dump for a new subscriber): the
        master follows these to route by prefix (actors.kv_events)."""
        self._ensure_loop()
        return await self.kv_log.after(after, epoch)

    def _register_blocks(self, seq: Sequence) -> None:
        """Name the blocks this step filled by their prefix hash (local prefix caching)."""
        bm = self.managers[seq.rank]
        chain = self._chain(seq, seq.num_computed)
        for i in range(seq.registered_blocks, len(chain)):
            bm.register(seq.block_table[i], chain[i])
        seq.registered_blocks = max(seq.registered_blocks, len(chain))

    def _fail(self, seq: Sequence, message: str) -> None:
        queue = self.queues.get(seq.seq_id)
        seq.finish_reason = "error"
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)
        if queue is not None:
            queue.put_nowait(RuntimeError(message))

    def _emit(self, seq: Sequence, transfer: KVTransfer | None = None) -> None:
        queue = self.queues.get(seq.seq_id)
        new = seq.output_ids[seq.emitted :]
        seq.emitted = len(seq.output_ids)
        if queue is not None:
            queue.put_nowait(
                EngineOutput(
                    seq.seq_id, new, bool(seq.finish_reason), seq.finish_reason,
                    len(seq.request.prompt_ids), seq.first_cached or 0, transfer, seq.take_stamps(),
                )
            )

    def _finish(self, seq: Sequence, reason: str, transfer: KVTransfer | None = None) -> None:
        if transfer is not None and seq.request.deliver_to is not None and self._continues(seq):
            seq.request.deliver_to.deliver.remote(seq.seq_id, list(seq.output_ids), transfer)
        seq.finish_reason = reason
        self.pending.pop(seq.seq_id, None)
        self.counters["cached_tokens"] += seq.first_cached or 0
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)
        self.hashes.pop(seq.seq_id, None)
        self._emit(seq, transfer)

    @staticmethod
    def _continues(seq: Sequence) -> bool:
        """A prefilled request still has tokens to decode (its first token was not the end)."""
        req, last = seq.request, seq.output_ids[-1] if seq.output_ids else None
        stopped = last in req.stop_token_ids or (not req.ignore_eos and last == req.eos_token_id)
        return not stopped and len(seq.output_ids) < req.max_tokens

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
        if self._reconfig is not None:
            raise RuntimeError(f"engine {self.config.name}: a reconfiguration is already in progress")
        known = {n._actor_id.hex(): n for n in self.executor.npus} | {k: n for k, (n, _) in self._adopted.items()}
        missing = [i for i in npus if i not in known]
        if missing:
            raise ValueError(f"npus: {', '.join(missing)} neither serve in nor were adopted by "
                             f"engine {self.config.name}")
        t0 = time.time()
        switched = asyncio.get_running_loop().create_future()
        # the leaving NPUs export their sequences' KV now: each runs its export right after
        # its step in flight (a synchronous actor runs one caller's tasks in the order they
        # were sent), beside this engine's switch, so the first step on the new size finds it done
        exported = {} if recompute else self._export_kv(self._leaving(set(npus)), specs[0].compute == "real")
        self._reconfig = ([known[i] for i in npus], specs, memory, switched, recompute, exported)
        self._wake.set()
        info = await switched
        first = self._next_step()
        exports = info.pop("exports")
        if exports:  # the leaving NPUs go once this returns: their KV must be out by then (the engine owns the copies)
            import ray

            await asyncio.to_thread(ray.wait, exports, num_returns=len(exports), fetch_local=False)
        if first is not None:
            at, error = await first
            if at is not None:
                info["first_step_at"] = at  # wall clock, as the step log
                info["first_step_s"] = at - t0
            elif error is not None:  # switched all the same: its requests failed loudly, a lost NPU marks it unhealthy
                info["first_step_error"] = error
        return info

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
        if reports is None:
            reports = list(await asyncio.gather(*(n.setup.remote(weight_refs, s) for n, s in zip(npus, specs))))
        else:
            await asyncio.gather(*(n.ready.remote() for n in npus))
        bs = self.config.scheduler.block_size
        self._adopted.update((n._actor_id.hex(), (n, BlockManager(r["kv_blocks"], bs))) for n, r in zip(npus, reports))
        return reports

    def _leaving(self, staying) -> list[Sequence]:
        """The running sequences on NPUs not among `staying` (actor ids) after a switch."""
        npus = self.executor.npus
        return [s for s in self.scheduler.running if s.rank is not None and npus[s.rank]._actor_id.hex() not in staying]

    def _export_kv(self, seqs: list[Sequence], holds_data: bool) -> dict[str, tuple]:
        """The KV of `seqs`, each on an NPU that leaves: one export call and one object
        per NPU for all of its sequences (a call and an object a sequence would cost
        the NPU, this engine and the first step's fetch each, while the instance
        waits). Whole block tables: no step grows them before the switch. Returns,
        by sequence id, (the ref of its NPU's export, its first row there); the ref
        is None where the NPUs hold no KV data (emulated: the kept NPU models the
        copy from the block count alone)."""
        blocks, rows = {}, {}
        for seq in seqs:
            exported = blocks.setdefault(seq.rank, [])
            rows[seq.seq_id] = (seq.rank, len(exported))
            exported += seq.block_table
        refs = {r: self.executor.npus[r].export_blocks.remote(b) for r, b in blocks.items() if b and holds_data}
        self.counters["kv_exports"] += len(refs)
        return {seq_id: (refs.get(r), first) for seq_id, (r, first) in rows.items()}

    async def _switch(self, npus: list, specs: list, memory: list[dict], done: asyncio.Future,
                      recompute: bool, exported: dict[str, tuple]) -> None:
        import ray

        t0, switch_at = time.monotonic(), time.time()  # the old size's last step is in the step log
        try:
            old = self.executor.npus
            old_rank = {n._actor_id.hex(): r for r, n in enumerate(old)}
            new_rank = {n._actor_id.hex(): r for r, n in enumerate(npus)}
            bs = self.config.scheduler.block_size
            # the sequences on leaving NPUs, their KV exported when the command came
            # (those of them still running: none came since, no step ran between)
            moving = self._leaving(new_rank)
            if not self.scheduler.has_work():  # no step to carry the specs: switch the NPUs now
                await asyncio.gather(*(n.commit.remote(s) for n, s in zip(npus, specs)))
                specs = None
        except Exception as err:
            logger.exception("engine %s: reconfiguration failed", self.config.name)
            self.healthy = False
            for seq in list(self.seqs.values()):
                self._fail(seq, f"engine {self.config.name}: reconfiguration failed: {err}")
            done.set_exception(err)
            return
        # no await from here on: the switch is atomic for the loop and for aborts
        bs_managers = []
        for npu in npus:
            kept = old_rank.get(npu._actor_id.hex())  # else adopted (reconfigure checked): its manager is built
            bs_managers.append(self.managers[kept] if kept is not None else self._adopted[npu._actor_id.hex()][1])
        for seq in self.scheduler.running:
            if seq.rank is not None and old[seq.rank]._actor_id.hex() in new_rank:
                seq.rank = new_rank[old[seq.rank]._actor_id.hex()]
        for seq in moving:
            if not seq.finish_reason:  # block i of its KV: row first + i of its old NPU's export (on its node)
                ref, first = exported.get(seq.seq_id, (None, 0))
                tokens = seq.num_computed if seq.seq_id in exported else 0  # else (a rebuild) it recomputes its KV
                self.scheduler.migrate(seq, [[ref, first + i] for i in range(-(-tokens // bs))], tokens,
                                       self.nodes[seq.rank])
        self._retired = (self.executor, self.managers, self._adopted)
        self.managers = self.scheduler.managers = bs_managers
        self._recount_kv()
        self.nodes = [m.get("node") for m in memory]
        self.executor = InstanceExecutor(npus, specs)
        self._adopted = {}  # the ones not switched to went back to the standby pool or away
        self.counters["reconfigurations"] += 1
        self.healthy = True
        self.counters["migrated_seqs"] += len(moving)
        # the exports finish beside the first step (whose imports wait for them), not in the pause
        exports = list(dict.fromkeys(ref for ref, _ in exported.values() if ref is not None))
        done.set_result({"ep": len(npus), "pause_s": time.monotonic() - t0, "switch_at": switch_at,
                         "migrated": len(moving), "exports": exports})

    # ---- state for the master ---------------------------------------------------------
    async def npu_stats(self) -> list[dict]:
        """Each NPU's report: HBM ledger, device time, experts held and their load."""
        return list(await asyncio.gather(*(n.stats.remote() for n in self.executor.npus)))

    def steps_since(self, t: float) -> list[tuple[float, int]]:
        """The step log from wall-clock time `t` on."""
        return [e for e in self.step_log if e[0] >= t]

    def requests(self) -> list[dict]:
        """The requests this engine holds (a restarted master rebuilds its loads from these)."""
        return [{"request_id": seq.seq_id, "prompt_tokens": len(seq.request.prompt_ids),
                 "max_tokens": seq.request.max_tokens, "uncached_tokens": len(seq.request.prompt_ids) - seq.num_cached,
                 "prefilled": seq.decode_side or "prefill_done" in seq.stamps} for seq in self.seqs.values()]

    def stats(self) -> dict:
        return {
            "name": self.config.name,
            "role": self.config.role,
            "healthy": self.healthy,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self.pending),
            "free_blocks": [m.num_free for m in self.managers],
            "total_blocks": [m.num_blocks for m in self.managers],
            "preemptions": self.scheduler.num_preemptions,
            "device_time_s": self.device_time_s,
            "time": time.time(),
            **self.counters,
        }
