"""What crosses the boundary between the driver (engine, launcher) and an NPU actor.

Plain dataclasses, one per message: NPUSpec builds an NPU, NPUBatch is one
step's work for it, NPUStepResult what it sends back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.expert_map import ExpertMap
from actors.model.config import ModelConfig


class SamplingParams(BaseModel):
    """Per-request sampling; seeded draws are reproducible (see actors.model.sampler)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=10.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = all
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


ComputeMode = Literal["real", "emulated"]


@dataclass(frozen=True)
class NPUSpec:
    name: str  # e.g. "prefill0.npu2": instance name + rank, used in errors and metrics
    instance: str
    rank: int
    device: str  # Ascend device catalog name, e.g. "910C"
    compute: ComputeMode
    model: ModelConfig
    expert_map: ExpertMap
    group_name: str  # collective group of the instance (one per instance incarnation)
    backend: Literal["gloo"] = "gloo"
    time_scale: float = 1.0  # emulated: wall seconds slept per emulated device second
    block_size: int = 16  # tokens per KV block
    kv_blocks: int | None = None  # KV pool size; None: fill kv_memory_fraction of the HBM left after weights
    kv_memory_fraction: float = 0.9
    kv_cache_name: str | None = None  # the global KV cache actor to publish blocks to
    mtp_acceptance_rate: float = 0.9  # emulated MTP: the share of drafts accepted (real compute measures it)
    # keep the experts this spec's map drops, as they are (charged to the ledger as
    # "retained"), until the next switch: a scale-up sets it on the NPUs it keeps,
    # so that scaling back stages nothing (cluster.elastic)
    retain_dropped: bool = False

    @property
    def ep_size(self) -> int:
        return self.expert_map.ep_size

    @property
    def has_group(self) -> bool:
        """Whether NPUs of this spec exchange through a collective group: real
        compute at EP > 1 (emulated NPUs only charge the modelled transfer)."""
        return self.compute == "real" and self.ep_size > 1


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step."""

    seq_id: str
    token_ids: list[int]  # new tokens: a prompt chunk, or the last sampled token
    start_pos: int  # tokens of this sequence already in this NPU's KV cache
    sample: bool = True  # sample a next token (false for a non-final prefill chunk)
    params: SamplingParams = field(default_factory=SamplingParams)
    output_index: int = 0  # index of the token to sample in the output (seeds sampling)
    block_table: list[int] | None = None  # paged KV: the sequence's blocks (None: a scratch per-sequence cache)
    load_blocks: list = field(default_factory=list)  # (block id, [ref]): fill from the object store before the step
    # the blocks come from an NPU on this one's node (an elastic migration within the
    # instance): emulated compute charges the intra-node link, not RoCE
    load_intra_node: bool = False
    save_blocks: list = field(default_factory=list)  # (block id, prefix hash or None): put into the object store
    # MTP speculative decoding (greedy): the last `num_drafts` token_ids are drafts to
    # verify in this forward; `propose` asks the MTP head for the next step's draft,
    # which for a prefill chunk that is not the last needs the token after the chunk.
    num_drafts: int = 0
    propose: bool = False
    next_token: int | None = None


@dataclass(frozen=True)
class NPUBatch:
    step: int
    seqs: list[SeqWork]
    return_logits: bool = False
    # the first step after an EP resize or a new expert map carries the NPU's new
    # spec: it switches (group formed and experts staged beforehand) as the step
    # starts, so the switch costs no round trip of its own
    spec: NPUSpec | None = None


@dataclass
class NPUStepResult:
    rank: int
    tokens: dict[str, int]  # seq id -> sampled token (sampling sequences only)
    logits: dict[str, list[float]] | None  # when asked: seq id -> next-token logits
    device_time_s: float  # what the step would take on the emulated chip (cost model)
    wall_time_s: float
    exported: dict[str, list] = field(default_factory=dict)  # seq id -> [[ref]] of its saved blocks
    accepted: dict[str, list[int]] = field(default_factory=dict)  # seq id -> drafts accepted (before its token)
    drafts: dict[str, int] = field(default_factory=dict)  # seq id -> MTP draft for the next step
    # emulated: the host took longer than the modelled time (scaled by time_scale), so
    # this step lasted the host's time, not the chip's (an overrun of the emulator)
    overrun: bool = False
    load_s: float = 0.0  # wall seconds from the step's start until its KV loads were in place


@dataclass
class KVTransfer:
    """A prefilled request's KV, handed from a prefill instance to a decode one.

    `blocks` are object-store refs (each wrapped in a one-element list so Ray
    passes the ref, not the value) of the request's KV blocks in order; the
    prefill NPU wrote them once, owned by the global KV cache actor, and any
    decode NPU reads them (zero-copy on the same node)."""

    num_tokens: int  # tokens of KV in the blocks (the prompt)
    block_size: int
    blocks: list[list]  # [[ObjectRef]] per block


@dataclass
class EngineRequest:
    """What an instance engine is asked to generate. Tokens only: the proxy
    tokenized once, and nothing downstream tokenizes again."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    eos_token_id: int | None = None
    block_hashes: list[int] | None = None  # prefix-chain hashes of the prompt's full blocks
    output_ids: list[int] = field(default_factory=list)  # tokens already generated (P/D hand-off, resume)
    kv_transfer: KVTransfer | None = None  # decode side of P/D: the prompt's KV, prefilled elsewhere
    prefill_only: bool = False  # prefill role: stop after the first token and export the KV
    kv_pending: bool = False  # decode side of parallel P/D: wait, admitted, until deliver() brings the KV
    deliver_to: object | None = None  # prefill side of parallel P/D: the decode engine to push the KV to


@dataclass
class EngineOutput:
    """One streamed update of a request."""

    request_id: str
    token_ids: list[int]  # new tokens since the last update
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from a cache (local or global)
    kv_transfer: KVTransfer | None = None
    # lifecycle stages that happened in the engine ("prefill_done", "decode_scheduled",
    # "kv_transferred"), each as its age in seconds when this update left the engine: the
    # receiver stamps them on its own clock (cluster.proxy.lifecycle), whatever node it is on
    stamps: dict[str, float] = field(default_factory=dict)
