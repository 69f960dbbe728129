"""The manifest: what to serve, on which emulated chips, in which instances.

A manifest is YAML. `model` is a path to a model-shape file (relative to the
manifest) or an inline mapping of actors.model.config.ModelConfig fields.
Every error names the file and the field, e.g.
`manifests/x.yaml: instances.0.ep: Input should be greater than 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actors.devices import get_device
from actors.model.config import ModelConfig
from cluster.autoscaler import AutoscalerConfig
from cluster.validation import field_errors

MANIFEST_DIR = Path(__file__).resolve().parent.parent / "manifests"
API_KEY_ENV = "OMNIRAY_API_KEY"  # where `omniray serve` and the shipped Serve configs read the API key


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and field."""


class InstanceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    role: Literal["prefill", "decode", "mixed"] = "mixed"
    ep: int = Field(1, gt=0, le=1024)
    # how its NPU actors are placed (a Ray placement group, one omni_npu bundle per NPU):
    # STRICT_PACK one node; PACK as few nodes as possible; SPREAD across nodes
    placement: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # emulated only: the dies each NPU actor stands for (default: one device's). More than a
    # device's are identical copies of it, so a wide EP group (EP320) runs with a few actors;
    # the engine then sees one copy's share of the instance's throughput
    dies_per_actor: int | None = Field(None, gt=0, le=1024)


class EngineSettings(BaseModel):
    """How every instance engine schedules and caches (one setting per knob, for A/B runs)."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, gt=0, le=1024)  # tokens per KV block
    kv_blocks: int | None = Field(None, gt=0)  # KV pool per NPU; None: real 512, emulated 90% of free HBM
    max_num_seqs: int = Field(32, gt=0)
    max_num_batched_tokens: int = Field(512, gt=0)  # per step; longer prompts are prefilled in chunks
    mtp: bool = False  # MTP speculative decoding (greedy requests); the model needs MTP heads
    mtp_acceptance_rate: float = Field(0.9, ge=0.0, le=1.0)  # emulated compute only
    global_kv_cache: bool = True  # publish prompt blocks to the global KV cache actor
    # send the next step of steady decoding before the last one's results are in (async scheduling)
    overlap_steps: bool = True
    kv_cache_bytes: int = Field(1 << 30, gt=0)  # its capacity (LRU eviction past it)


class SlaveAutoscaling(BaseModel):
    """Ray Serve autoscaling of the slaves (ingress replicas) by ongoing requests."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "SlaveAutoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class ProxySettings(BaseModel):
    """The Omni Proxy: slaves (Serve ingress replicas) and the master's policies."""

    model_config = ConfigDict(extra="forbid")

    num_slaves: int = Field(1, gt=0)  # Serve ingress replicas (fixed; see autoscaling)
    autoscaling: SlaveAutoscaling | None = None  # set: the slave count follows the load instead
    # requests one slave holds at once; Serve's default (5) would queue the rest in its HTTP
    # proxy, invisible to the master's sorting (slaves only await, so this can be high)
    max_ongoing_requests: int = Field(1024, gt=0)
    # received -> finished; past it: 504, KV freed (None: no limit)
    request_timeout_s: float | None = Field(600.0, gt=0)
    policy: Literal["round_robin", "least_loaded", "cache_aware", "omni_reference", "omni"] = "omni"
    pd_mode: Literal["sequential", "parallel"] = "sequential"  # when both prefill and decode instances exist
    # budgets: an instance gets a request only while under them, so the master's queues
    # (not the engines') are where the order is decided (the original's defaults)
    max_batch_num_token: int = Field(32000, gt=0)  # uncached prompt tokens being prefilled per instance
    prefill_max_num_seqs: int = Field(32, gt=0)  # requests being prefilled per prefill or mixed instance
    decode_max_num_seqs: int = Field(32, gt=0)  # requests per decode or mixed instance, prefill to finish
    weighted_sorting: bool = True
    token_weight: float = Field(0.8, ge=0.0)
    time_weight: float = Field(0.2, ge=0.0)
    starvation_ms: float = Field(400.0, gt=0.0)  # enforced on both queues
    decode_max_tokens_weight: float = Field(0.0, ge=0.0)  # decode queue weight: prompt + this * max_tokens
    # routing constants (cluster.proxy.routing.RoutingConfig)
    omni_alpha: float = Field(1.0, ge=0.0)
    omni_beta: float = Field(0.5, ge=0.0)
    omni_gamma: float = Field(0.5, ge=0.0)
    omni_kappa: float = Field(1.0, ge=0.0)
    omni_waits: bool = True
    cache_threshold: float = Field(0.5, ge=0.0, le=1.0)
    balance_abs_threshold: float = Field(32.0, ge=0.0)
    balance_rel_threshold: float = Field(1.5, ge=1.0)
    tokenizer_reuse: bool = True
    tokenizer_cache_size: int = Field(4096, ge=0)
    tokenizer_cache_bytes: int = Field(64 << 20, ge=0)  # TokenCache's budget: texts + ids (4 bytes an id)
    max_queue: int = Field(1024, gt=0)  # waiting requests past which new ones get 429
    max_body_bytes: int = Field(1 << 20, gt=0)  # larger bodies get 413 before parsing
    api_keys: list[str] = Field(default_factory=list)  # empty: no key needed
    admin_keys: list[str] = Field(default_factory=list)  # for /v1/cluster/scale and /rebalance; empty: admin is off


class ElasticSettings(BaseModel):
    """ElasticMoE and Omni Placement while serving."""

    model_config = ConfigDict(extra="forbid")

    standby_npus: int = Field(0, ge=0)  # warm NPU actors a scale-up adopts (0: start actors on demand)
    # a pool a scale-up drew from starts processes for the rest only after this long (a scale-down
    # in that time gives NPUs back instead: a starting process takes a CPU second from serving)
    standby_refill_delay_s: float = Field(30.0, ge=0)
    redundant_experts: int = Field(1, ge=0)  # Omni Placement: extra expert slots per NPU for hot-expert copies
    drain_timeout_s: float = Field(300.0, gt=0)  # a removed instance finishes its requests within this
    auto_rebuild: bool = True  # an instance that lost an NPU gets new NPUs (the controller's health check)
    health_check_s: float = Field(1.0, gt=0)  # how often the controller looks for such instances


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "omniray"
    model: ModelConfig
    compute: Literal["real", "emulated"] = "real"
    device: str = "910B"
    checkpoint: str | None = None  # safetensors file; None = seeded random weights
    tokenizer: str | None = None  # HF tokenizer.json; None = the shipped byte-level BPE
    time_scale: float = Field(1.0, ge=0.0)  # emulated: wall seconds per device second
    # emulated: how unevenly top-k routing spreads tokens over experts, the spread of a seeded
    # log-normal popularity per layer (actors.compute.routing_model; 0 = even; MoGE is even per
    # group whatever it is). 0.5: the hottest of 256 experts takes ~3x the mean (assumption)
    expert_skew: float = Field(0.5, ge=0.0, le=3.0)
    # the EP group's transport (actors.collective's OMNI_GLOO); nccl would need a GPU tensor
    # path, which real compute (CPU torch) does not have
    collective_backend: Literal["gloo"] = "gloo"
    instances: list[InstanceSpec] = Field(default_factory=lambda: [InstanceSpec()], min_length=1)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    elastic: ElasticSettings = Field(default_factory=ElasticSettings)
    autoscaler: AutoscalerConfig = Field(default_factory=AutoscalerConfig)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return get_device(v).name

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        names = set()
        for i, inst in enumerate(self.instances):
            if inst.name is None:
                inst.name = f"{inst.role}{sum(1 for j in self.instances[:i] if j.role == inst.role)}"
            if inst.name in names:
                raise ValueError(f"instances.{i}.name: duplicate instance name {inst.name!r}")
            names.add(inst.name)
            if self.model.num_experts % inst.ep:
                raise ValueError(
                    f"instances.{i}.ep: {inst.ep} does not divide model.num_experts ({self.model.num_experts})"
                )
            if inst.dies_per_actor is not None and self.compute != "emulated":
                raise ValueError(f"instances.{i}.dies_per_actor: only emulated NPUs stand for several dies")
        if self.engine.mtp and not self.model.num_mtp_layers:
            raise ValueError(f"engine.mtp: model {self.model.name} has no MTP heads (model.num_mtp_layers: 0)")
        if self.checkpoint and self.compute == "emulated":
            raise ValueError("checkpoint: emulated compute loads no weights; remove the checkpoint")
        return self


def format_validation_error(err: ValidationError) -> str:
    """`field.path: message; ...`: a pydantic error as one line naming each bad field."""
    lines = []
    for e in field_errors(err.errors()):
        path = e.path or "(root)"
        lines.append(e.msg if e.msg.startswith(path) else f"{path}: {e.msg}")
    return "; ".join(lines)


def resolve_path(path: str | Path) -> Path:
    """A manifest path as given, or a name under the shipped manifests/ folder."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (MANIFEST_DIR / p, MANIFEST_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ManifestError(f"{path}: no such manifest (looked in . and {MANIFEST_DIR})")


def parse_manifest(data: dict, base: Path, source: str = "manifest") -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping at the top level")
    data = dict(data)
    model = data.get("model")
    if isinstance(model, str):
        mpath = (base / model).resolve()
        if not mpath.is_file():
            raise ManifestError(f"{source}: model: no such model file {model!r} (resolved to {mpath})")
        data["model"] = yaml.safe_load(mpath.read_text()) or {}
    overrides = data.pop("model_overrides", None)  # e.g. {weight_dtype: int8} for a W8A8 deployment
    if overrides is not None:
        if not isinstance(overrides, dict) or not isinstance(data.get("model"), dict):
            raise ManifestError(f"{source}: model_overrides: expected a mapping of model fields over a model mapping")
        data["model"] = {**data["model"], **overrides}
    for key in ("checkpoint", "tokenizer"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((base / data[key]).resolve())
    try:
        return Manifest(**data)
    except ValidationError as err:
        raise ManifestError(f"{source}: {format_validation_error(err)}") from None
    except ValueError as err:  # get_device and friends
        raise ManifestError(f"{source}: {err}") from None


def load_manifest(path: str | Path = "local") -> Manifest:
    p = resolve_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ManifestError(f"{p}: not valid YAML: {err}") from None
    return parse_manifest(data, p.parent, str(p))
