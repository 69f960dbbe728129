"""What crosses the boundary between the driver (engine, launcher) and an NPU actor.

Plain dataclasses, one per message: NPUSpec builds an NPU, NPUBatch is one
step's work for it, NPUStepResult what it sends back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.expert_map import ExpertMap
from actors.model.config import ModelConfig


MAX_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's limit)


class SamplingParams(BaseModel):
    """Per-request sampling, with vLLM's semantics (see actors.model.sampler for
    the order the options apply in); seeded draws are reproducible."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=10.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = all
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # minus this once a token is in the output
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # minus this per occurrence in the output
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)  # prompt or output tokens: logit / p if > 0, else * p
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to its logit
    # no EOS or stop token before this many output tokens: the engine bans them (SeqWork.banned)
    min_tokens: int = Field(0, ge=0)
    # None: no logprobs; N: the sampled token's (raw) logprob and the N most likely tokens'
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # likewise, every prompt token after the first

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, bias: dict[int, float]) -> dict[int, float]:
        for token, value in bias.items():
            if token < 0 or not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias: token {token}: ids are >= 0 and biases in [-100, 100] (got {value})")
        return bias

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens generated so far (SeqWork.output_ids)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob (raw: the model's log-softmax, before any sampling option)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the N most likely tokens, (id, logprob), most likely first


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
    # emulated: the dies this actor stands for, 0 = one device's (actors.devices.DeviceSpec.dies). It
    # computes one device's batch, split over the device's dies; dies beyond them are identical
    # copies, which widen the EP group the cost model prices (EP320 with a handful of actors)
    dies_per_actor: int = 0
    # emulated: the spread of the seeded expert popularity per MoE layer (actors.compute.routing_model)
    expert_skew: float = 0.0
    # keep the experts this spec's map drops, as they are (charged to the ledger as
    # "retained"), until the next switch: a scale-up sets it on the NPUs it keeps,
    # so that scaling back stages nothing (cluster.elastic)
    retain_dropped: bool = False

    @property
    def ep_size(self) -> int:
        return self.expert_map.ep_size

    def ep_dies(self, device_dies: int) -> int:
        """The dies of the instance's EP group, each an EP rank (the cost model's EP size)."""
        return self.ep_size * (self.dies_per_actor or device_dies)

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
    # the token after a non-final prefill chunk (for MTP's proposal, and as the target
    # of that chunk's last row for prompt logprobs)
    next_token: int | None = None
    # sampling options that need more than the params (filled by the engine only when used)
    output_ids: tuple[int, ...] = ()  # tokens generated so far (presence/frequency/repetition penalties)
    prompt_ids: tuple[int, ...] = ()  # the prompt (repetition penalty)
    banned: tuple[int, ...] = ()  # may not be sampled this step (min_tokens: EOS and stop ids)
    # guided decoding: a packed int32 bitmask of ceil(V/32) words, bit j of word i =
    # token 32*i+j allowed (xgrammar / llguidance layout); tokens past it are disallowed
    allowed: np.ndarray | None = None
    # parallel sampling (n > 1): (seq id, params) of the request's other choices, whose
    # first tokens are drawn from this row too (one prefill for all; each its own seed)
    forks: tuple[tuple[str, SamplingParams], ...] = ()
    # copy on write: (source, destination) blocks to copy before the step (a fork's copy
    # of its parent's partial last prompt block, where the choices diverge)
    copy_blocks: tuple[tuple[int, int], ...] = ()
    # overlapped steps: the engine sent this step before the last one's results were in,
    # so it does not know the token to feed; the NPU feeds the one it sampled for this
    # sequence in its previous step (token_ids holds a placeholder of the right length)
    follows: bool = False

    @property
    def decode_row(self) -> bool:
        """One new token (and its MTP draft) after a context, not a prompt chunk."""
        return self.start_pos > 0 and len(self.token_ids) - self.num_drafts == 1

    @property
    def prompt_targets(self) -> list[int]:
        """The prompt tokens this chunk's rows predict, from its first row on (prompt
        logprobs): token_ids[1:], then next_token if the chunk does not sample."""
        return list(self.token_ids[1:]) + ([self.next_token] if not self.sample and self.next_token is not None else [])


def sampleable(allowed: np.ndarray | None, banned, vocab_size: int) -> np.ndarray | None:
    """The tokens a step may sample ([V] bool) under a SeqWork's `allowed` bitmask and
    `banned` ids (ids outside the vocabulary are ignored); None when both are empty."""
    if allowed is None and not banned:
        return None
    if allowed is None:
        mask = np.ones(vocab_size, dtype=bool)
    else:
        bits = np.unpackbits(np.ascontiguousarray(allowed, dtype="<i4").view(np.uint8), bitorder="little")
        mask = np.zeros(vocab_size, dtype=bool)
        mask[: min(vocab_size, bits.size)] = bits[:vocab_size].astype(bool)
    ids = np.fromiter((t for t in banned if 0 <= t < vocab_size), dtype=np.int64)
    mask[ids] = False
    return mask


@dataclass(frozen=True)
class NPUBatch:
    step: int
    seqs: list[SeqWork]
    return_logits: bool = False
    # the first step after an EP resize or a new expert map carries the NPU's new
    # spec: it switches (group formed and experts staged beforehand) as the step
    # starts, so the switch costs no round trip of its own
    spec: NPUSpec | None = None
    # the most token rows any NPU of the instance feeds this step: bounds what one NPU
    # sends another in an MoE layer, so the dispatch carries its own counts (actors/ep.py)
    max_rows: int | None = None


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
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # seq id -> its sampled token's (params.logprobs)
    # seq id -> an entry per row of the chunk fed this step (params.prompt_logprobs): row i's is
    # the logprob of the prompt token after it (token_ids[i+1], or next_token after the last row
    # of a non-final chunk); None for the last row of a chunk that samples (its target is generated)
    prompt_logprobs: dict[str, list[TokenLogprob | None]] = field(default_factory=dict)
    comm_s: float = 0.0  # wall seconds of the step in the EP all-to-alls (waits for the other ranks included)


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
    n: int = 1  # parallel sampling: choices sharing the prompt's KV (one prefill; actors.engine.instance._fork)
    fork_outputs: list[list[int]] = field(default_factory=list)  # decode side of P/D: choices 1..n-1's tokens so far
    guide: object | None = None  # guided decoding: an actors.engine.guided.GuideSpec


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
    index: int = 0  # the choice (n > 1) these tokens belong to
    logprobs: list | None = None  # TokenLogprob per token of token_ids, when the request asked
    prompt_logprobs: list | None = None  # TokenLogprob | None per prompt token (the first None), once
