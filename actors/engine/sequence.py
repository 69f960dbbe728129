"""Sequence: one request's state inside an instance engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from actors.protocol import EngineRequest


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request: EngineRequest
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    rank: int | None = None  # the NPU holding its KV (attention is data-parallel)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the block table
    num_cached: int = 0  # prompt tokens taken from a cache instead of computed (at its latest admission)
    # ...at its first admission: what prefix reuse saved it. A preempted sequence finds its
    # own blocks again when readmitted; that is not reuse, and must not count as a hit
    first_cached: int | None = None
    registered_blocks: int = 0  # full blocks already named by their prefix hash
    arrival: float = field(default_factory=time.monotonic)
    finish_reason: str | None = None
    emitted: int = 0  # output tokens already streamed out
    remote_blocks: list = field(default_factory=list)  # [[ref]] of KV blocks to load (global cache hit, P/D)
    remote_tokens: int = 0  # tokens the remote blocks cover
    remote_node: str | None = None  # the node they are on, where known (a migration's source NPU)
    draft: int | None = None  # MTP draft of the token after the next one, to verify in the next step
    stamps: dict[str, float] = field(default_factory=dict)  # lifecycle stages that happened here (monotonic)
    stamps_sent: int = 0  # how many of them went out on the stream already
    # parallel sampling (n > 1): choice `index` of its request; a fork shares its
    # parent's prompt blocks and has its own id (the request's id + "#index")
    index: int = 0
    seq_id_override: str | None = None
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): copy on write, next step
    logprobs: list = field(default_factory=list)  # TokenLogprob per output token (when asked)
    logprobs_emitted: int = 0
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob | None per prompt token (when asked)
    guide: object | None = None  # guided decoding: the grammar matcher (actors.engine.guided)
    forked: bool = False  # its request's other choices exist (or left with its prefill's output)
    fork_outputs: list[list[int]] = field(default_factory=list)  # prefill role: the other choices' first tokens

    def __post_init__(self):
        self.output_ids = list(self.request.output_ids)
        self.emitted = len(self.output_ids)

    @property
    def seq_id(self) -> str:
        return self.seq_id_override or self.request.request_id

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def decode_side(self) -> bool:
        """The decode side of P/D: its prompt's KV was computed by another instance."""
        return self.request.kv_transfer is not None or self.request.kv_pending

    def stamp(self, stage: str, t: float | None = None) -> None:
        """A lifecycle stage happened here (the first stamp of a stage wins)."""
        self.stamps.setdefault(stage, time.monotonic() if t is None else t)

    def take_stamps(self) -> dict[str, float]:
        """The stamps not sent yet, for the next update on the stream."""
        new = dict(list(self.stamps.items())[self.stamps_sent:])
        self.stamps_sent = len(self.stamps)
        return new

    def check_finished(self) -> bool:
        req = self.request
        reason = end_reason(req, self.output_ids)
        if reason == "stop":
            self.finish_reason = "stop"
        elif self.guide is not None and self.guide.done:
            self.finish_reason = "stop"  # the grammar is complete (its EOS was the only way on)
        elif reason == "length" or (req.prefill_only and self.output_ids):
            self.finish_reason = "length"
        return self.finish_reason is not None


def end_reason(req: EngineRequest, output_ids: list[int]) -> str | None:
    """How a choice whose tokens so far are `output_ids` ended ("stop": a stop token
    or EOS; "length": max_tokens); None while it goes on."""
    last = output_ids[-1] if output_ids else None
    if last is not None and (last in req.stop_token_ids or (not req.ignore_eos and last == req.eos_token_id)):
        return "stop"
    return "length" if len(output_ids) >= req.max_tokens else None


def continues(req: EngineRequest, output_ids: list[int]) -> bool:
    return end_reason(req, output_ids) is None
