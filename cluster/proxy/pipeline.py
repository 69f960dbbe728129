"""One request's way through the slave, after validation: tokens -> master ->
engines -> text. The proxy tokenizes once (TokenCache) and passes token ids and
block hashes along; prefill and decode engines never tokenize.

mixed:      master picks one instance; it prefills and decodes.
sequential: master picks a prefill instance; it runs to the first token and
            exports the KV (object store); then the request waits in the
            master's decode queue for a decode instance under its budget,
            which loads the KV and goes on.
parallel:   master picks both at dispatch; the decode request goes out the
            moment the prefill's KV is in the object store.
In both P/D modes the client's first token goes out with the decode
instance's first output (as the original's decode returns the stream).

The slave tells the master when a request's prompt is done (its tokens leave
the instance's prefill budget) and when it finished; the stages the master and
the engines stamp arrive as ages on their answers (cluster.proxy.lifecycle).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray

from actors.kv_hash import block_hashes
from actors.engine.sequence import end_reason
from actors.protocol import EngineRequest, SamplingParams
from cluster.proxy.engine_streams import EngineStreams
from cluster.proxy.lifecycle import Lifecycle
from cluster.proxy.master import NoInstanceAvailable
from cluster.proxy.token_cache import TokenizerThread
from cluster.proxy.tokens import IncrementalDetokenizer, Tokenizer


logger = logging.getLogger(__name__)

MAX_RESUMES = 2  # instance failures one request survives


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # of this choice so far
    cached_tokens: int = 0
    index: int = 0  # the choice (n > 1)
    logprobs: list | None = None  # TokenLogprob per token that reached this delta, when asked
    prompt_logprobs: list | None = None  # TokenLogprob | None per prompt token, on a choice's first delta


class _Choice:
    """One choice's way from tokens to text: detokenized, cut at a stop string,
    streamed without a tail that could begin one."""

    def __init__(self, index: int, tokenizer: Tokenizer, stops: list[str], with_logprobs: bool):
        self.index, self.stops = index, stops
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text, self.emitted, self.out_ids = "", 0, []
        self.finish: str | None = None
        self.cut: int | None = None
        self.ended = False  # its engine said it finished
        self.logprobs: list | None = [] if with_logprobs else None  # not yet sent
        self.prompt_logprobs: list | None = None

    def feed(self, out, prompt_tokens: int, cached: int) -> Delta | None:
        """The delta this engine output makes, if any text (or the end) is ready."""
        if self.finish:
            return None  # (P/D: a choice that ended at the prefill, closed again by the decode side)
        if out.prompt_logprobs:
            self.prompt_logprobs = out.prompt_logprobs
        self.out_ids += out.token_ids
        for t in out.token_ids:
            self.text += self.detok.add(t)
        if self.logprobs is not None and out.logprobs:
            self.logprobs += out.logprobs
        if out.finished:
            self.ended = True
            self.finish = "length" if out.finish_reason == "length" else "stop"
            self.text += self.detok.flush()
        self.cut = _find_stop(self.text, self.stops, self.emitted)
        if self.cut is not None:
            self.text, self.finish = self.text[: self.cut], "stop"
        safe = len(self.text) if self.finish else _hold_back(self.text, self.stops)
        if safe <= self.emitted and not self.finish:
            return None
        lps, self.logprobs = self.logprobs, ([] if self.logprobs is not None else None)
        prompt_lps, self.prompt_logprobs = self.prompt_logprobs, None
        delta = Delta(self.text[self.emitted : safe], self.finish, prompt_tokens, len(self.out_ids), cached,
                      self.index, lps, prompt_lps)
        self.emitted = safe
        return delta


class Pipeline:
    def __init__(self, tokenizer: Tokenizer, master, block_size: int, on_done=None,
                 thread: TokenizerThread | None = None):
        """`on_done(life, outcome, prompt_tokens, completion_tokens)` runs as each request ends (metrics).
        `thread`: where the prompt's blocks are hashed, off the event loop (the slave's tokenizer thread)."""
        self.tokenizer, self.master, self.block_size = tokenizer, master, block_size
        self.on_done = on_done
        self.streams = EngineStreams("slave")  # one output stream per engine for all this slave's requests
        self.thread = thread or TokenizerThread(tokenizer)

    async def run(self, prompt_ids: list[int], sampling: dict, stops: list[str], life: Lifecycle) -> AsyncIterator[Delta]:
        """Text deltas of one request, of its `n` choices (one engine request: they
        share the prompt's KV). If an instance fails under a request of one choice,
        it is scheduled again elsewhere and resumes from the tokens it already has
        (a greedy request ends with the same tokens), up to MAX_RESUMES times; one of
        several choices fails loudly (their forks' KV went with the instance)."""
        rid = f"req-{uuid.uuid4().hex[:16]}"
        n = sampling.get("n", 1)
        params = SamplingParams(**{k: sampling[k] for k in SamplingParams.model_fields if k in sampling})
        base = {
            "prompt_ids": prompt_ids, "params": params, "max_tokens": sampling["max_tokens"],
            "stop_token_ids": frozenset(sampling["stop_token_ids"]), "ignore_eos": sampling["ignore_eos"],
            "eos_token_id": self.tokenizer.eos_token_id, "block_hashes": None, "output_ids": [],
            "n": n, "guide": sampling.get("guide"),
        }
        choices = [_Choice(i, self.tokenizer, stops, params.logprobs is not None) for i in range(n)]
        out_ids = choices[0].out_ids  # a single choice's tokens so far, across resumes
        cached, open_choices = 0, n
        engines, attempt = [], 0
        told = None  # the attempt whose prefill the master has been told of
        try:
            base["block_hashes"] = hashes = await self.thread.run(block_hashes, prompt_ids, self.block_size)
            while True:
                attempt_id = rid if attempt == 0 else f"{rid}-resume{attempt}"
                decision = await self.master.schedule.remote(attempt_id, len(prompt_ids) + len(out_ids),
                                                             n * (sampling["max_tokens"] - len(out_ids)), hashes)
                life.stamp_ages(decision.stamps)
                life.route.update(prefill=decision.prefill, decode=decision.decode, mode=decision.mode,
                                  local_blocks=decision.local_blocks, global_blocks=decision.global_blocks)
                base["output_ids"] = list(out_ids)
                try:
                    async for _, out in self._streams(attempt_id, decision, base, life, engines):
                        if out.token_ids and "first_token" not in life.stamps:
                            life.stamp("first_token")
                        if decision.mode == "mixed" and out.token_ids and told != attempt_id:
                            told = attempt_id  # its prompt is done: its tokens leave the prefill budget
                            self.master.prefill_done.remote(attempt_id)
                        cached = max(cached, out.num_cached_tokens)
                        choice = choices[out.index]
                        delta = choice.feed(out, len(prompt_ids), cached)
                        if delta is not None:
                            yield delta
                            open_choices -= delta.finish_reason is not None
                        if open_choices == 0:
                            return
                    return
                except (RuntimeError, ray.exceptions.RayError) as err:
                    task = asyncio.current_task()
                    if (not _instance_failed(err) or attempt >= MAX_RESUMES or (task and task.cancelling())
                            or n > 1):
                        raise  # (a cancelled request, e.g. its client left, is not an instance failure)
                    failed = [name for name, _ in engines[-1:]]  # the engine streaming when it broke
                    logger.warning("request %s: %s failed (%s); resuming from %d tokens elsewhere", rid, failed,
                                   err, len(out_ids))
                    for name in failed:
                        self.master.report_failure.remote(name)
                    self.master.finished.remote(attempt_id)
                    for _, engine in engines:
                        engine.abort.remote(attempt_id)
                    engines.clear()
                    attempt += 1
        finally:
            life.stamp("finished")
            last_id = rid if attempt == 0 else f"{rid}-resume{attempt}"
            stopped = any(c.cut is not None for c in choices)
            if not all(c.ended for c in choices) or stopped:  # a stop string, the client gone, a failure: free the KV
                for _, engine in engines:
                    engine.abort.remote(last_id)
                self.master.cancel.remote(last_id)  # still queued (timed out waiting): leave the queue
            self.master.finished.remote(last_id)
            if self.on_done is not None:
                finish = choices[0].finish
                self.on_done(life, finish or "aborted", len(prompt_ids), sum(len(c.out_ids) for c in choices))

    async def _streams(self, rid: str, decision, base: dict, life: Lifecycle, engines: list):
        """(engine handle, EngineOutput) pairs across the prefill and decode engines.
        `engines` collects every engine the request was sent to (to abort on exit)."""
        if decision.mode == "mixed":
            engines.append((decision.decode, decision.decode_engine))
            async for out in _outputs(self.streams.open(decision.decode_engine, EngineRequest(rid, **base)), life):
                yield decision.decode_engine, out
            return
        parallel = decision.mode == "parallel"
        prefill_req = EngineRequest(rid, **base, prefill_only=True)
        if parallel:  # both at once: decode parks the request until the prefill pushes the KV to it
            engines.append((decision.decode, decision.decode_engine))
            decode_outputs = self.streams.open(decision.decode_engine, EngineRequest(rid, **base, kv_pending=True))
            prefill_req.deliver_to = decision.decode_engine
        engines.append((decision.prefill, decision.prefill_engine))
        firsts = {}  # choice -> the prefill's output: its first token (n > 1: each choice's)
        async for out in _outputs(self.streams.open(decision.prefill_engine, prefill_req), life):
            firsts[out.index] = out
        first = firsts[0]
        so_far = base["output_ids"] + list(first.token_ids)
        forks = [list(firsts[j].token_ids) for j in range(1, base["n"])]
        req = EngineRequest(rid, **base)
        ends = {j: "stop" if out.finish_reason == "stop" else end_reason(req, so_far if j == 0 else list(out.token_ids))
                for j, out in firsts.items()}  # (the engine's "stop" also covers a completed grammar)
        if all(ends.values()):
            if parallel:
                decision.decode_engine.abort.remote(rid)  # the parked decode has nothing to do
            for j, out in firsts.items():
                out.finished, out.finish_reason = True, ends[j]
                yield decision.prefill_engine, out
            return
        for j, out in firsts.items():  # choice 0 the decode side closes (it carries the others' KV)
            out.finished, out.finish_reason = bool(j and ends[j]), ends[j] if j else None
        if parallel:
            self.master.prefill_done.remote(rid)
        else:  # the decode queue: the master answers when a decode instance has room
            decision = await self.master.schedule_decode.remote(rid, len(base["prompt_ids"]), base["max_tokens"])
            life.route.update(decode=decision.decode, decode_queued_s=decision.queued_s)
            engines.append((decision.decode, decision.decode_engine))
            decode_outputs = self.streams.open(decision.decode_engine, EngineRequest(
                rid, **{**base, "output_ids": so_far}, kv_transfer=first.kv_transfer, fork_outputs=forks))
        async for out in _outputs(decode_outputs, life):
            if firsts:  # the first tokens go out with the decode's first output
                for first_out in firsts.values():
                    yield decision.decode_engine, first_out
                firsts = {}
            yield decision.decode_engine, out


async def _outputs(stream, life: Lifecycle):
    """A request's EngineOutputs from its engine's stream; the stages the engine
    stamped are stamped on the request's lifecycle as each output arrives."""
    async for out in stream:
        if out.stamps:
            life.stamp_ages(out.stamps)
        yield out


def _instance_failed(err: Exception) -> bool:
    """An engine or its NPUs broke (not a bad request, not a full cluster)."""
    if isinstance(err, NoInstanceAvailable):
        return False
    return isinstance(err, (ray.exceptions.RayActorError, RuntimeError))


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the first stop string begins, searching from just before `start`."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s)))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _hold_back(text: str, stops: list[str]) -> int:
    """How much of text is safe to stream: hold back a tail that could begin a stop string."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                keep = min(keep, len(text) - k)
                break
    return keep
