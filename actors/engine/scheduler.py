"""Scheduler: which sequences run in the next step, with how many tokens.

Continuous batching with chunked prefill, in the manner of vLLM v1: running
sequences first (a decode takes 1 token, an unfinished prefill its next
chunk), then waiting ones in queue order while the token budget, the
sequence cap and the KV blocks last. A new sequence goes to the NPU with the
longest cached prefix of its prompt (then the most free blocks). When a
running sequence needs a block and its NPU has none, the most recently
arrived sequence on that NPU is preempted: its blocks are freed and it waits
to be recomputed (prompt + tokens so far) — nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.engine.block_manager import BlockManager
from actors.engine.sequence import Sequence, Status
from actors.kv_hash import block_hashes


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # running sequences per instance
    max_num_batched_tokens: int = 512  # tokens per step (chunked prefill splits longer prompts)
    block_size: int = 16


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # new tokens fed this step
    load: list = field(default_factory=list)  # (block id, [ref]) to fill from the object store first
    samples: bool = False  # this step reaches the sequence's end: sample its next token

    def __post_init__(self):
        self.samples = self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, managers: list[BlockManager]):
        self.config, self.managers = config, managers
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def adopt_running(self, seq: Sequence) -> None:
        """A sequence placed outside admission (a fork sharing its parent's blocks)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _prompt_hashes(self, seq: Sequence) -> list[int]:
        req = seq.request
        if req.params.prompt_logprobs is not None and not seq.decode_side and not seq.index:
            return []  # its prompt logprobs come from computing the whole prompt: no prefix reuse
        hashes = req.block_hashes or block_hashes(req.prompt_ids, self.config.block_size)
        return hashes[: (len(req.prompt_ids) - 1) // self.config.block_size]  # keep >= 1 token to compute

    def _choose_rank(self, seq: Sequence, hashes: list[int]) -> int:
        return max(
            range(len(self.managers)),
            key=lambda r: (len(self.managers[r].match(hashes)), self.managers[r].num_free, -r),
        )

    def _admit(self, seq: Sequence, budget: int) -> Scheduled | None:
        """Place a waiting sequence on an NPU, reusing cached KV; None if no room."""
        hashes = self._prompt_hashes(seq)
        rank = self._choose_rank(seq, hashes)
        bm = self.managers[rank]
        local = bm.match(hashes)
        bm.attach(local)
        table, computed = list(local), len(local) * bm.block_size
        remote = seq.remote_blocks
        remote_tokens = min(seq.remote_tokens, seq.num_tokens - 1)
        load = []
        if remote_tokens > computed:
            if not bm.grow(table, remote_tokens):
                bm.release(table)
                return None
            first = len(local)
            load = [(table[i], remote[i]) for i in range(first, bm.blocks_needed(remote_tokens))]
            computed = remote_tokens
        n = min(seq.num_tokens - computed, budget)
        if n <= 0 or not bm.grow(table, computed + n):
            bm.release(table)
            return None
        seq.rank, seq.block_table, seq.num_computed = rank, table, computed
        seq.num_cached = min(computed, len(seq.request.prompt_ids))
        if seq.first_cached is None:
            seq.first_cached = seq.num_cached
        seq.registered_blocks = len(local)
        seq.status = Status.RUNNING
        return Scheduled(seq, n, load)  # after num_computed is set: `samples` depends on it

    def _preempt(self, seq: Sequence) -> None:
        self.managers[seq.rank].release(seq.block_table)
        seq.copy_blocks = []  # a fork's pending copy went with its blocks: it recomputes
        seq.status, seq.rank, seq.num_computed, seq.registered_blocks = Status.WAITING, None, 0, 0
        seq.draft = None
        self.running.remove(seq)
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

    def migrate(self, seq: Sequence, blocks: list, num_tokens: int, node: str | None = None) -> None:
        """Its NPU left the instance (elastic scale-in): the sequence waits, first in
        line, to be placed on another NPU, which loads its KV (`blocks`, [[ref]] of the
        first num_tokens tokens, on `node`) instead of recomputing it. Its old blocks
        went with the old NPU's block manager."""
        seq.status, seq.rank, seq.num_computed, seq.registered_blocks = Status.WAITING, None, 0, 0
        seq.block_table, seq.draft = [], None
        seq.remote_blocks, seq.remote_tokens, seq.remote_node = blocks, num_tokens, node
        self.running.remove(seq)
        self.waiting.insert(0, seq)

    def schedule(self) -> list[Scheduled]:
        budget = self.config.max_num_batched_tokens
        out: list[Scheduled] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            bm = self.managers[seq.rank]
            lookahead = 1 if seq.draft is not None and n == seq.num_uncomputed else 0  # the draft's KV slot
            while not bm.grow(seq.block_table, seq.num_computed + n + lookahead):
                scheduled = {s.seq.seq_id for s in out}
                victims = [s for s in self.running if s.rank == seq.rank and s.seq_id not in scheduled]
                victim = max(victims, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.append(Scheduled(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break  # out of KV blocks: it waits, in order, for a finished sequence to free some
            self.waiting.pop(0)
            self.running.append(item.seq)
            out.append(item)
            budget -= item.num_tokens
        return out

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.rank is not None:
            self.managers[seq.rank].release(seq.block_table)
            seq.rank = None
