"""Roofline cost model: how long one step would take on an Ascend chip.

In `compute: emulated` mode an NPU actor runs no model math; it waits the time
this model gives. Each piece of work is a roofline,

    t = max(flops / (peak * compute_eff), bytes / (hbm_bw * memory_eff)) + launch

so small-batch decode comes out memory-bound (weights and KV must be streamed
from HBM whatever the batch) and long prefill compute-bound, which is the
behaviour schedulers and autoscalers must react to. It is not a kernel
simulator: it ignores overlap between layers, cache effects and kernel fusion.

Default efficiencies: inference kernels typically reach ~50-70 % of peak
FLOP/s on large GEMMs (MFU) and ~70-90 % of peak HBM bandwidth on streaming
reads (MBU); 0.6 and 0.8 sit in the middle. AMLA (arXiv:2509.25224, "AMLA:
MUL by ADD in FlashAttention Rescaling") reports 86.8 % FLOPS utilisation for
MLA decode on Ascend, so attention run with kernel 'amla' gets 0.868 (applied to
the whole attention layer, projections included: a simplification).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from actors.devices import DeviceSpec
from actors.model.config import DTYPE_BYTES, ModelConfig

#: attention kernel -> compute efficiency; kernels not listed use `compute_efficiency`.
DEFAULT_ATTENTION_EFFICIENCY: Mapping[str, float] = MappingProxyType({"amla": 0.868})


@dataclass(frozen=True)
class Roofline:
    """One piece of work and its two time bounds; `seconds` is what it costs."""

    flops: float
    nbytes: float
    compute_s: float
    memory_s: float
    overhead_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s

    @property
    def memory_bound(self) -> bool:
        return self.memory_s >= self.compute_s


@dataclass(frozen=True)
class StepCost:
    """Seconds of one forward step on one NPU, by part."""

    attention_s: float
    moe_s: float  # routed experts
    dense_s: float  # dense FFN layers and shared experts
    all_to_all_s: float  # EP dispatch + combine
    other_s: float  # LM head

    @property
    def total_s(self) -> float:
        return self.attention_s + self.moe_s + self.dense_s + self.all_to_all_s + self.other_s


class CostModel:
    """Roofline times of the parts of an MoE forward step on one `device`."""

    def __init__(
        self,
        device: DeviceSpec,
        compute_efficiency: float = 0.6,
        memory_efficiency: float = 0.8,
        collective_latency_s: float = 20e-6,
        launch_overhead_s: float = 5e-6,
        attention_efficiency: Mapping[str, float] | None = None,
    ):
        for label, eff in (("compute_efficiency", compute_efficiency), ("memory_efficiency", memory_efficiency)):
            if not 0 < eff <= 1:
                raise ValueError(f"{label} must be in (0, 1], got {eff}")
        self.device = device
        self.compute_efficiency = compute_efficiency
        self.memory_efficiency = memory_efficiency
        self.collective_latency_s = collective_latency_s
        self.launch_overhead_s = launch_overhead_s
        table = DEFAULT_ATTENTION_EFFICIENCY if attention_efficiency is None else attention_efficiency
        self.attention_efficiency: Mapping[str, float] = MappingProxyType(dict(table))

    # ---- the roofline --------------------------------------------------------
    def peak_flops(self, cfg: ModelConfig) -> float:
        """INT8 peak when weights are int8 (W8A8 GEMMs), FP16/BF16 peak otherwise."""
        if cfg.weight_dtype == "int8":
            return self.device.int8_tops * 1e12
        return self.device.fp16_tflops * 1e12

    def roofline(self, cfg: ModelConfig, flops: float, nbytes: float, efficiency: float | None = None) -> Roofline:
        """max(flops / (peak * eff), bytes / (hbm_bw * memory_eff)) + launch overhead."""
        eff = self.compute_efficiency if efficiency is None else efficiency
        return Roofline(
            flops=flops,
            nbytes=nbytes,
            compute_s=flops / (self.peak_flops(cfg) * eff),
            memory_s=nbytes / (self.device.hbm_bandwidth * self.memory_efficiency),
            overhead_s=self.launch_overhead_s,
        )

    # ---- attention -----------------------------------------------------------
    def attention_roofline(self, cfg: ModelConfig, num_tokens: int, context_tokens: int, num_seqs: int) -> Roofline:
        """One attention layer on one NPU.

        num_tokens: new tokens this step (all sequences); context_tokens: KV tokens
        attended to, summed over sequences (including the new ones).
        FLOPs = 2 * num_tokens * attention_params            (projections)
              + pairs * per_pair                           (scores + values)
        with pairs = num_tokens * context_tokens / num_seqs, exact when every
        sequence has the same length (decode: one new token per sequence gives
        pairs = context_tokens); causal prefill is over-counted up to 2x.
        per_pair = 4 * heads * head_dim (GQA) or, for MLA in the absorbed form
        decode kernels use, 2 * heads * (2 * kv_lora_rank + qk_rope_head_dim).
        bytes = weights + KV read (context) + KV write (new) + activations in/out.
        """
        w_b, kv_b, act_b = DTYPE_BYTES[cfg.weight_dtype], DTYPE_BYTES[cfg.kv_dtype], DTYPE_BYTES[cfg.dtype]
        if cfg.attention == "mla":
            per_pair = 2 * cfg.num_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        else:
            per_pair = 4 * cfg.num_heads * cfg.head_dim
        pairs = num_tokens * context_tokens / max(num_seqs, 1)
        flops = 2 * num_tokens * cfg.attention_params() + pairs * per_pair
        kv_token = cfg.kv_elements_per_token() * kv_b
        nbytes = (
            cfg.attention_params() * w_b
            + context_tokens * kv_token
            + num_tokens * kv_token
            + 2 * num_tokens * cfg.hidden_size * act_b
        )
        eff = self.attention_efficiency.get(cfg.attention_kernel, self.compute_efficiency)
        return self.roofline(cfg, flops, nbytes, eff)

    def attention_time(self, cfg: ModelConfig, num_tokens: int, context_tokens: int, num_seqs: int) -> float:
        """Seconds of `attention_roofline`."""
        return self.attention_roofline(cfg, num_tokens, context_tokens, num_seqs).seconds

    # ---- feed-forward ----------------------------------------------------------
    def moe_roofline(self, cfg: ModelConfig, num_tokens_routed: int, num_local_experts: int) -> Roofline:
        """Routed experts of one MoE layer on one NPU.

        num_tokens_routed: (token, expert) pairs that landed on this NPU.
        FLOPs = 2 * 3 * hidden * moe_intermediate per pair (SwiGLU gate, up, down).
        bytes = weights of the touched experts + activations in/out, where touched =
        min(num_tokens_routed, num_local_experts): an expert with no token is not read.
        """
        touched = min(num_tokens_routed, num_local_experts)
        flops = 2 * cfg.expert_params() * num_tokens_routed
        nbytes = (
            touched * cfg.expert_params() * DTYPE_BYTES[cfg.weight_dtype]
            + 2 * num_tokens_routed * cfg.hidden_size * DTYPE_BYTES[cfg.dtype]
        )
        return self.roofline(cfg, flops, nbytes)

    def moe_time(self, cfg: ModelConfig, num_tokens_routed: int, num_local_experts: int) -> float:
        """Seconds of `moe_roofline`."""
        return self.moe_roofline(cfg, num_tokens_routed, num_local_experts).seconds

    def dense_ffn_roofline(self, cfg: ModelConfig, num_tokens: int, intermediate: int) -> Roofline:
        """A SwiGLU FFN of width `intermediate` (dense layer or shared experts).

        FLOPs = 2 * 3 * hidden * intermediate * num_tokens;
        bytes = 3 * hidden * intermediate weights + activations in/out."""
        params = 3 * cfg.hidden_size * intermediate
        flops = 2 * params * num_tokens
        nbytes = params * DTYPE_BYTES[cfg.weight_dtype] + 2 * num_tokens * cfg.hidden_size * DTYPE_BYTES[cfg.dtype]
        return self.roofline(cfg, flops, nbytes)

    def dense_ffn_time(self, cfg: ModelConfig, num_tokens: int, intermediate: int) -> float:
        """Seconds of `dense_ffn_roofline`."""
        return self.dense_ffn_roofline(cfg, num_tokens, intermediate).seconds

    def lm_head_time(self, cfg: ModelConfig, num_seqs: int) -> float:
        """LM head for the last token of each sequence.

        FLOPs = 2 * num_seqs * hidden * vocab; bytes = vocab * hidden weights + logits."""
        params = cfg.vocab_size * cfg.hidden_size
        nbytes = params * DTYPE_BYTES[cfg.weight_dtype] + num_seqs * cfg.vocab_size * DTYPE_BYTES[cfg.dtype]
        return self.roofline(cfg, 2 * params * num_seqs, nbytes).seconds

    # ---- communication ------------------------------------------------------------
    def all_to_all_time(self, nbytes_per_npu: int, num_npus: int, intra_node: bool = True) -> float:
        """latency + (n - 1) / n * nbytes / link bandwidth; 0 for one NPU.

        Only the (n-1)/n share leaving the NPU crosses a link; the bandwidth is the
        per-device scale-up link (HCCS/UB) or RoCE when the group spans nodes."""
        if num_npus <= 1:
            return 0.0
        bw = self.device.interconnect_bandwidth if intra_node else self.device.inter_node_bandwidth
        return self.collective_latency_s + (num_npus - 1) / num_npus * nbytes_per_npu / bw

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

    # ---- a whole step ----------------------------------------------------------------
    def step_time(
        self,
        cfg: ModelConfig,
        num_tokens: int,
        context_tokens: int,
        num_seqs: int,
        ep_size: int,
        num_local_experts: int,
        intra_node: bool = True,
    ) -> StepCost:
        """One forward step on one NPU of an EP instance, summed over all layers.

        Attention is data-parallel: this NPU runs its own num_tokens. Routing is
        assumed balanced (MoGE makes it so), so each NPU receives num_tokens * k
        (token, expert) pairs per MoE layer. Per MoE layer: dispatch and combine
        all-to-alls of num_tokens * k * hidden * activation bytes each; shared
        experts count as dense. Router GEMMs and norms are ignored (small)."""
        k, h, act_b = cfg.num_experts_per_tok, cfg.hidden_size, DTYPE_BYTES[cfg.dtype]
        n_moe = len(cfg.moe_layers)
        n_dense = cfg.num_layers - n_moe
        attention = cfg.num_layers * self.attention_time(cfg, num_tokens, context_tokens, num_seqs)
        dense = n_dense * self.dense_ffn_time(cfg, num_tokens, cfg.intermediate_size)
        if cfg.num_shared_experts:
            shared_width = cfg.num_shared_experts * cfg.moe_intermediate_size
            dense += n_moe * self.dense_ffn_time(cfg, num_tokens, shared_width)
        moe = n_moe * self.moe_time(cfg, num_tokens * k, num_local_experts)
        a2a = n_moe * 2 * self.all_to_all_time(num_tokens * k * h * act_b, ep_size, intra_node)
        return StepCost(
            attention_s=attention,
            moe_s=moe,
            dense_s=dense,
            all_to_all_s=a2a,
            other_s=self.lm_head_time(cfg, num_seqs),
        )
