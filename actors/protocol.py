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
    backend: Literal["gloo", "nccl"] = "gloo"
    time_scale: float = 1.0  # emulated: wall seconds slept per emulated device second

    @property
    def ep_size(self) -> int:
        return self.expert_map.ep_size


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step."""

    seq_id: str
    token_ids: list[int]  # new tokens: a prompt chunk, or the last sampled token
    start_pos: int  # tokens of this sequence already in this NPU's KV cache
    sample: bool = True  # sample a next token (false for a non-final prefill chunk)
    params: SamplingParams = field(default_factory=SamplingParams)
    output_index: int = 0  # index of the token to sample in the output (seeds sampling)


@dataclass(frozen=True)
class NPUBatch:
    step: int
    seqs: list[SeqWork]
    return_logits: bool = False


@dataclass
class NPUStepResult:
    rank: int
    tokens: dict[str, int]  # seq id -> sampled token (sampling sequences only)
    logits: dict[str, list[float]] | None  # when asked: seq id -> next-token logits
    device_time_s: float  # what the step would take on the emulated chip (cost model)
    wall_time_s: float
