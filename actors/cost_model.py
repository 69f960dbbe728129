"""Cost model: how long one step would take on an Ascend chip.

In `compute: emulated` mode an NPU actor runs no model math; it waits the time
this model gives. It prices one die (a 910C package is two dies, each an EP rank
with its own share of the batch, as CloudMatrix-Infer runs it) and one decoder
layer at a time; each term is a roofline,

    t = max(flops / (peak * efficiency), bytes / (hbm_bw * memory_efficiency))

so small-batch decode comes out memory-bound and long prefill compute-bound,
which is what schedulers and autoscalers react to. Per decoder layer:

- attention projections: a GEMM roofline (the int8 peak for W8A8 weights);
- attention core: (query, key) pairs, causal within a prompt chunk, priced at the
  bf16 peak (attention runs in bf16 under W8A8) with its own efficiency; MLA in
  the absorbed form decode kernels use (scores over the latent), and in prefill
  the non-absorbed form (the context's latents up-projected to per-head keys and
  values first), as DeepSeek's and CloudMatrix-Infer's kernels do;
- vector work: RMSNorms, RoPE, residual adds, activation quantisation, routing and
  the permute/unpermute of routed tokens: bytes streamed at HBM speed
  (`VECTOR_PASSES`, `ROUTED_PASSES`);
- routed experts, shared experts and dense FFNs: GEMM rooflines, reading only the
  experts that receive a token;
- dispatch and combine: the routed activations leave the die, (n-1)/n of them,
  int8 on dispatch where the stack quantises it, over the scale-up link to dies of
  the same node and over RoCE beyond it, at the stack's share of the link;
- with two-stream microbatching (CloudMatrix-Infer) dispatch/combine hide behind
  compute (max of the two), else they add;
- a per-layer overhead: kernel launch gaps and synchronisation, which dominate
  small-batch decode on real stacks and no roofline shows.
Plus the LM head over the rows that sample and, when MTP proposes, its layer: a
decoder layer, experts sharded like the others, over the proposing rows.

The efficiencies and the overhead are per device and software stack
(`actors.devices.Calibration`): fitted on named published figures, never per
figure. `omniray simulate --paper` shows how far each published figure is.
Not modelled: cache effects, kernel fusion beyond what the efficiencies absorb,
load imbalance between dies (routing is taken as balanced, as MoGE makes it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from actors.devices import Calibration, DeviceSpec, node_of
from actors.model.config import DTYPE_BYTES, ModelConfig

#: attention kernel -> attention-core efficiency, over the stack's own: AMLA
#: (arXiv:2509.25224) measures 86.8 % of the bf16 peak for MLA decode on a CloudMatrix384 NPU.
DEFAULT_ATTENTION_EFFICIENCY: Mapping[str, float] = MappingProxyType({"amla": 0.868})
#: hidden-size passes of bf16 activations per token and layer, read or written by
#: vector units: 2 RMSNorms (read + write: 4), 2 residual adds (read 2, write 1: 6),
#: RoPE on q and k (~1), activation quantisation before the int8 GEMMs (~1).
VECTOR_PASSES = 12
#: hidden-size passes per routed (token, expert) pair: permute before dispatch and
#: the weighted unpermute after combine (read + write each).
ROUTED_PASSES = 2
ACT_BYTES = 2  # activations are bf16


@dataclass(frozen=True)
class Roofline:
    """One piece of work and its two time bounds; `seconds` is what it costs."""

    flops: float
    nbytes: float
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def memory_bound(self) -> bool:
        return self.memory_s >= self.compute_s


@dataclass(frozen=True)
class DieBatch:
    """What one die computes in a step, summed over its sequences."""

    num_seqs: int = 0
    num_tokens: int = 0
    kv_tokens: int = 0  # KV entries attention reads: each sequence's context and new tokens
    prefill_pairs: float = 0.0  # (query, key) pairs of prompt chunks, causal
    decode_pairs: float = 0.0  # those of decode rows (a token, or a token and its MTP draft)
    prefill_context: int = 0  # KV entries of prompt chunks (non-absorbed MLA up-projects them)
    logit_rows: int = 0  # rows through the LM head

    @classmethod
    def of(cls, chunks: Iterable[tuple[int, int, bool]]) -> DieBatch:
        """From (tokens already in the KV cache, new tokens, is a decode row) per sequence."""
        seqs = tokens = kv = ctx = rows = 0
        pre = dec = 0.0
        for start, n, decode in chunks:
            pairs = n * start + n * (n + 1) / 2
            seqs, tokens, kv = seqs + 1, tokens + n, kv + start + n
            if decode:
                dec += pairs
                rows += n
            else:
                pre += pairs
                ctx += start + n
                rows += 1
        return cls(seqs, tokens, kv, pre, dec, ctx, rows)


@dataclass(frozen=True)
class StepCost:
    """Seconds of one forward step on one die, by part."""

    attention_s: float  # projections and core
    moe_s: float  # routed experts
    dense_s: float  # dense FFN layers and shared experts
    vector_s: float  # norms, RoPE, residuals, quantisation, routing, permute
    all_to_all_s: float  # dispatch + combine, the part not hidden behind compute
    overhead_s: float  # per-layer launch gaps
    other_s: float  # LM head
    mtp_s: float = 0.0  # the MTP layer and its LM head, over the proposing rows

    @property
    def total_s(self) -> float:
        return (self.attention_s + self.moe_s + self.dense_s + self.vector_s + self.all_to_all_s
                + self.overhead_s + self.other_s + self.mtp_s)


@dataclass(frozen=True)
class _Layer:
    attention: float
    moe: float
    dense: float
    vector: float
    comm: float  # exposed dispatch + combine

    @property
    def total(self) -> float:
        return self.attention + self.moe + self.dense + self.vector + self.comm


@dataclass(frozen=True)
class CostModel:
    """Times of the parts of an MoE forward step on one die of `device`, under its
    stack's `calibration` (the device catalog's unless given)."""

    device: DeviceSpec
    calibration: Calibration | None = None
    collective_latency_s: float = 20e-6
    attention_kernels: Mapping[str, float] = field(default_factory=lambda: DEFAULT_ATTENTION_EFFICIENCY)

    def __post_init__(self):
        if self.calibration is None:
            object.__setattr__(self, "calibration", self.device.calibration)
        cal = self.calibration
        for label in ("gemm_efficiency", "attention_efficiency", "memory_efficiency", "link_efficiency"):
            if not 0 < getattr(cal, label) <= 1:
                raise ValueError(f"{label} must be in (0, 1], got {getattr(cal, label)}")

    # ---- one die's figures ------------------------------------------------------
    @property
    def dies(self) -> int:
        return self.device.dies

    def peak_flops(self, cfg: ModelConfig) -> float:
        """A die's GEMM peak: INT8 when weights are int8 (W8A8), FP16/BF16 otherwise."""
        tops = self.device.int8_tops if cfg.weight_dtype == "int8" else self.device.fp16_tflops
        return tops * 1e12 / self.dies

    @property
    def hbm_bandwidth(self) -> float:
        return self.device.hbm_bandwidth / self.dies

    def roofline(self, flops: float, nbytes: float, peak: float, efficiency: float) -> Roofline:
        return Roofline(flops, nbytes, flops / (peak * efficiency),
                        nbytes / (self.hbm_bandwidth * self.calibration.memory_efficiency))

    def gemm(self, cfg: ModelConfig, flops: float, nbytes: float) -> Roofline:
        return self.roofline(flops, nbytes, self.peak_flops(cfg), self.calibration.gemm_efficiency)

    # ---- attention -----------------------------------------------------------------
    def attention_roofline(self, cfg: ModelConfig, b: DieBatch) -> tuple[Roofline, Roofline]:
        """(projections, core) of one attention layer.

        Projections: 2 * tokens * attention_params FLOPs, the weights read once.
        Core: pairs * per_pair FLOPs, per_pair = 4 * heads * head_dim (GQA: scores
        and values); MLA absorbed (decode): 2 * heads * (2 * kv_lora_rank +
        qk_rope_head_dim); MLA non-absorbed (prefill): 2 * heads * (qk_head_dim +
        v_head_dim), plus the up-projection of the chunk's context latents,
        2 * context * kv_lora_rank * heads * (qk_nope + v). Bytes: the KV read and
        the new KV written."""
        w_b, kv_b = DTYPE_BYTES[cfg.weight_dtype], DTYPE_BYTES[cfg.kv_dtype]
        params = cfg.attention_params()
        proj = self.gemm(cfg, 2 * b.num_tokens * params, params * w_b + 2 * b.num_tokens * cfg.hidden_size * ACT_BYTES)
        heads = cfg.num_heads
        if cfg.attention == "mla":
            decode_pair = 2 * heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            prefill_pair = 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim)
            up = 2 * b.prefill_context * cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        else:
            decode_pair = prefill_pair = 4 * heads * cfg.head_dim
            up = 0
        flops = b.decode_pairs * decode_pair + b.prefill_pairs * prefill_pair + up
        nbytes = (b.kv_tokens + b.num_tokens) * cfg.kv_elements_per_token() * kv_b
        eff = self.attention_kernels.get(cfg.attention_kernel, self.calibration.attention_efficiency)
        core = self.roofline(flops, nbytes, self.device.fp16_tflops * 1e12 / self.dies, eff)
        return proj, core

    # ---- feed-forward ----------------------------------------------------------------
    def moe_roofline(self, cfg: ModelConfig, pairs: float, local_experts: int) -> Roofline:
        """Routed experts of one MoE layer: `pairs` (token, expert) pairs landed on this
        die. FLOPs = 2 * expert_params per pair; bytes = the experts touched
        (min(pairs, local experts): an expert with no token is not read) + activations."""
        touched = min(pairs, local_experts)
        return self.gemm(cfg, 2 * cfg.expert_params() * pairs,
                         touched * cfg.expert_params() * DTYPE_BYTES[cfg.weight_dtype]
                         + 2 * pairs * cfg.hidden_size * ACT_BYTES)

    def ffn_roofline(self, cfg: ModelConfig, tokens: int, intermediate: int) -> Roofline:
        """A SwiGLU FFN of width `intermediate` (dense layer or shared experts)."""
        params = 3 * cfg.hidden_size * intermediate
        return self.gemm(cfg, 2 * params * tokens,
                         params * DTYPE_BYTES[cfg.weight_dtype] + 2 * tokens * cfg.hidden_size * ACT_BYTES)

    def lm_head_time(self, cfg: ModelConfig, rows: int) -> float:
        """The LM head over `rows` rows: 2 * rows * hidden * vocab FLOPs, its weights and logits."""
        if rows <= 0:
            return 0.0
        params = cfg.vocab_size * cfg.hidden_size
        return self.gemm(cfg, 2 * params * rows,
                         params * DTYPE_BYTES[cfg.weight_dtype] + rows * cfg.vocab_size * ACT_BYTES).seconds

    # ---- communication ---------------------------------------------------------------------
    def all_to_all_time(self, nbytes: float, ep_dies: int) -> float:
        """latency + the (n-1)/n share of `nbytes` that leaves the die, at the stack's
        share of the link: the scale-up link (HCCS/UB) to dies of the same node, RoCE
        beyond it (both at once: the slower share decides); 0 for one die."""
        if ep_dies <= 1:
            return 0.0
        node = node_of(self.device)
        near = ep_dies if node is None else min(ep_dies, node.devices_per_node * self.dies)
        eff = self.calibration.link_efficiency
        intra = (near - 1) / ep_dies * nbytes / (self.device.interconnect_bandwidth / self.dies * eff)
        inter = (ep_dies - near) / ep_dies * nbytes / (self.device.inter_node_bandwidth / self.dies * eff)
        return self.collective_latency_s + max(intra, inter)

    def transfer_time(self, nbytes: int, intra_node: bool = False) -> float:
        """latency + nbytes / link bandwidth: a point-to-point copy, e.g. KV blocks from a prefill NPU."""
        if nbytes <= 0:
            return 0.0
        bw = self.device.interconnect_bandwidth if intra_node else self.device.inter_node_bandwidth
        return self.collective_latency_s + nbytes / bw

    def load_time(self, nbytes: int) -> float:
        """latency + nbytes / host link bandwidth: weights copied from host memory
        into device memory, e.g. by an NPU that joins an instance."""
        return self.collective_latency_s + nbytes / self.device.host_bandwidth if nbytes > 0 else 0.0

    # ---- a whole step -------------------------------------------------------------------------
    def layer(self, cfg: ModelConfig, b: DieBatch, ep_dies: int, moe: bool, local_experts: int,
              load: float = 1.0) -> _Layer:
        """One decoder layer on one die (MoE or dense); `load`: the routed pairs landing
        on this die over the balanced share (actors.compute.routing_model)."""
        proj, core = self.attention_roofline(cfg, b)
        tokens, h = b.num_tokens, cfg.hidden_size
        vector_bytes = tokens * h * ACT_BYTES * VECTOR_PASSES
        if not moe:
            dense = self.ffn_roofline(cfg, tokens, cfg.intermediate_size).seconds
            vector = vector_bytes / (self.hbm_bandwidth * self.calibration.memory_efficiency)
            return _Layer(proj.seconds + core.seconds, 0.0, dense, vector, 0.0)
        pairs = tokens * cfg.num_experts_per_tok * load  # the pairs this die's experts compute
        vector_bytes += pairs * h * ACT_BYTES * ROUTED_PASSES
        vector = vector_bytes / (self.hbm_bandwidth * self.calibration.memory_efficiency)
        routed = self.moe_roofline(cfg, pairs, local_experts).seconds
        shared = (self.ffn_roofline(cfg, tokens, cfg.num_shared_experts * cfg.moe_intermediate_size).seconds
                  if cfg.num_shared_experts else 0.0)
        dispatch_b = 1 if self.calibration.int8_dispatch else ACT_BYTES
        comm = self.all_to_all_time(pairs * h * dispatch_b, ep_dies) + self.all_to_all_time(pairs * h * ACT_BYTES, ep_dies)
        compute = proj.seconds + core.seconds + routed + shared + vector
        if self.calibration.microbatch_overlap:
            comm = max(0.0, comm - compute)
        return _Layer(proj.seconds + core.seconds, routed, shared, vector, comm)

    def step_time(self, cfg: ModelConfig, b: DieBatch, ep_dies: int = 1, local_experts: int | None = None,
                  mtp: DieBatch | None = None, moe_loads: list[float] | None = None) -> StepCost:
        """One forward step on one die of an instance whose EP group spans `ep_dies`
        dies, each holding `local_experts` routed experts (default: an even share);
        `mtp`: the rows the MTP layer proposes for; `moe_loads`: per MoE layer, this
        die's routed load over the balanced share (None: balanced)."""
        if local_experts is None:
            local_experts = max(1, -(-cfg.num_experts // ep_dies))
        n_moe = len(cfg.moe_layers)
        n_dense = cfg.num_layers - n_moe
        parts = {"attention": 0.0, "moe": 0.0, "dense": 0.0, "vector": 0.0, "comm": 0.0}
        if b.num_tokens:
            loads = [(n_moe, 1.0)] if moe_loads is None else [(1, f) for f in moe_loads]
            layers = [(count, True, f) for count, f in loads if count] + ([(n_dense, False, 1.0)] if n_dense else [])
            for count, is_moe, f in layers:
                layer = self.layer(cfg, b, ep_dies, is_moe, local_experts, f)
                for k in parts:
                    parts[k] += count * getattr(layer, k)
        overhead = cfg.num_layers * self.calibration.layer_overhead_s if b.num_tokens else 0.0
        mtp_s = 0.0
        if mtp is not None and mtp.num_tokens:
            mtp_s = (self.layer(cfg, mtp, ep_dies, bool(n_moe), local_experts, max(moe_loads or [1.0])).total
                     + self.calibration.layer_overhead_s + self.lm_head_time(cfg, mtp.logit_rows))
        return StepCost(
            attention_s=parts["attention"], moe_s=parts["moe"], dense_s=parts["dense"], vector_s=parts["vector"],
            all_to_all_s=parts["comm"], overhead_s=overhead, other_s=self.lm_head_time(cfg, b.logit_rows), mtp_s=mtp_s,
        )


def split_dies(rows: list[tuple], dies: int) -> list[list[tuple]]:
    """A device's batch over its `dies` dies (attention is data-parallel per die):
    each sequence (a tuple whose second item is its new tokens) to the die with the
    fewest new tokens so far, longest first."""
    if dies <= 1:
        return [rows]
    load, parts = [0] * dies, [[] for _ in range(dies)]
    for row in sorted(rows, key=lambda r: -r[1]):
        d = load.index(min(load))
        parts[d].append(row)
        load[d] += row[1]
    return parts
