"""Ascend device catalog: the figures an emulated NPU is timed and sized by.

An emulated NPU has no hardware behind it, so everything it claims about
itself (how much HBM it has, how fast it multiplies, how fast it talks to its
neighbours) comes from this table. Each figure carries a comment naming its
public source. Huawei publishes few per-chip datasheet numbers for the 910
family; where a figure is a widely reported or derived estimate rather than an
official one, the comment says so, so nobody mistakes the emulator's timing
for a measurement.

Units: FLOP/s figures are stored in TFLOP/s (TOPS for INT8) because that is how
every source quotes them; memory sizes in bytes; bandwidths in bytes/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 1 << 30
GB = 10**9

# Public sources, referred to by the comments below.
SRC_CM384 = "arXiv:2506.12708 Serving Large Language Models on Huawei CloudMatrix384 (Zuo et al., 2025)"
SRC_AMLA = "arXiv:2509.25224 AMLA: MUL by ADD in FlashAttention Rescaling (2025)"
SRC_PANGU_MOE = "arXiv:2505.21411 Pangu Pro MoE: Mixture of Grouped Experts (2025), serving on 800I A2 and 300I Duo"
SRC_ASCEND910_HC = "Huawei, Ascend 910 at Hot Chips 31 (2019): 256 TFLOPS FP16 / 512 TOPS INT8, Da Vinci cube"
SRC_910B_PRESS = "widely reported 910B figures (press/analyst summaries, e.g. SemiAnalysis, 2024)"
SRC_800IA2 = "Huawei Atlas 800I A2 inference server product page (e.huawei.com): 8 x Ascend NPU, HCCS full mesh"
SRC_300IDUO = "Huawei Atlas 300I Duo inference card product page/datasheet (e.huawei.com)"


@dataclass(frozen=True)
class Calibration:
    """How much of the chip one software stack gets: the cost model's per-device
    parameters. Those named in `fitted` were fitted (`omniray simulate --paper
    --fit`) on the published figures named in `fitted_on`, and on nothing else; the
    others keep the stated defaults (inference kernels reach ~50-70 % of the GEMM
    peak and ~70-90 % of HBM bandwidth). Never a factor per figure."""

    stack: str  # the software stack the figures were measured on
    gemm_efficiency: float = 0.6  # share of the GEMM peak large GEMMs reach
    attention_efficiency: float = 0.6  # share of the bf16 peak attention cores reach
    memory_efficiency: float = 0.8  # share of HBM bandwidth streaming reads reach
    layer_overhead_s: float = 0.0  # per decoder layer and step: launch gaps, synchronisation
    link_efficiency: float = 1.0  # share of the link bandwidth dispatch/combine reach
    microbatch_overlap: bool = False  # two-stream microbatching hides dispatch/combine behind compute
    int8_dispatch: bool = False  # routed activations dispatched as int8
    fitted: tuple[str, ...] = ()
    fitted_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator as the cost model and the HBM ledger see it.

    Figures are per device (package); `dies` of them split them evenly (a 910C is
    two dies, each its own EP rank). `interconnect_bandwidth` is per device, for
    intra-node (scale-up) device-to-device traffic; `inter_node_bandwidth` is per
    device over RoCE. `calibration`: the stack its published figures come from.
    """

    name: str
    fp16_tflops: float  # dense peak FP16/BF16, TFLOP/s
    int8_tops: float  # dense peak INT8, TOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    interconnect: str  # "HCCS", "UB", "PCIe"
    interconnect_bandwidth: float  # bytes/s per device, intra-node
    inter_node_bandwidth: float  # bytes/s per device, RoCE
    host_bandwidth: float  # bytes/s per device, host DRAM -> device memory (loading weights)
    sources: tuple[str, ...]
    dies: int = 1
    calibration: Calibration = Calibration("uncalibrated defaults")


@dataclass(frozen=True)
class NodeSpec:
    """A box (or a scale-up domain) of identical devices.

    `devices_per_node` counts the devices that reach each other over
    `device.interconnect`; traffic beyond them goes over RoCE.
    """

    name: str
    device: DeviceSpec
    devices_per_node: int
    sources: tuple[str, ...]


ASCEND_910B = DeviceSpec(
    name="910B",
    # ~320 TFLOPS FP16: widely reported estimate, not an official per-chip figure
    # (SKUs 910B1..B4 are reported between ~280 and ~376 TFLOPS). Source: SRC_910B_PRESS.
    fp16_tflops=320.0,
    # INT8 = 2 x FP16: the Da Vinci cube does twice the INT8 MACs of FP16 MACs
    # (SRC_ASCEND910_HC: 256 -> 512). Derived estimate.
    int8_tops=640.0,
    # 64 GB HBM2e per chip: Atlas 800T/800I A2 configurations, SRC_800IA2 and SRC_910B_PRESS.
    hbm_bytes=64 * GiB,
    # ~1.6 TB/s: estimate; SRC_CM384 gives 1.6 TB/s per 910C die, which is a 910B-class
    # die; press figures for the 910B range 1.2-1.6 TB/s.
    hbm_bandwidth=1.6e12,
    interconnect="HCCS",
    # HCCS full mesh of 8: 7 links x 56 GB/s = 392 GB/s per chip, widely reported for
    # A2 servers (SRC_800IA2 names the full mesh, the per-link figure is press-reported).
    interconnect_bandwidth=392 * GB,
    # 200 GbE RoCE port per NPU on Atlas 800 A2 servers (SRC_800IA2) = 25 GB/s.
    inter_node_bandwidth=25 * GB,
    # Assumption: a PCIe 4.0 x16 link to the host, ~32 GB/s theoretical per direction
    # (PCIe spec); Huawei publishes no per-chip host-link figure for the 910B.
    host_bandwidth=32 * GB,
    sources=(SRC_910B_PRESS, SRC_ASCEND910_HC, SRC_800IA2, SRC_CM384, SRC_PANGU_MOE),
    calibration=Calibration(
        "Pangu Pro MoE serving on Atlas 800I A2 (SRC_PANGU_MOE)",
        gemm_efficiency=0.304,
        layer_overhead_s=1131e-6,
        fitted=("gemm_efficiency", "layer_overhead_s"),
        fitted_on=("pangu-800i-a2 prefill", "pangu-800i-a2 decode"),
    ),
)

ASCEND_910C = DeviceSpec(
    name="910C",
    # SRC_CM384 §3: two dies per package, ~376 TFLOPS dense BF16/FP16 each, 752 per 910C.
    # Cross-check: AMLA (arXiv:2509.25224) measures 614 TFLOPS = 86.8 % of peak on a
    # CloudMatrix384 NPU, implying ~707 TFLOPS there; 752 is the nominal upper figure.
    fp16_tflops=752.0,
    # INT8 = 2 x FP16 on the Da Vinci cube (SRC_ASCEND910_HC ratio). Derived estimate.
    int8_tops=1504.0,
    # SRC_CM384: 128 GB in-package HBM per 910C (64 GB per die).
    hbm_bytes=128 * GiB,
    # SRC_CM384: 3.2 TB/s per package (1.6 TB/s per die).
    hbm_bandwidth=3.2e12,
    interconnect="UB",
    # SRC_CM384: UB plane, ~392 GB/s unidirectional per 910C, non-blocking all-to-all
    # across all 384 NPUs of the supernode (secondary summaries also quote 196 GB/s, which
    # matches one die; we take the per-package figure).
    interconnect_bandwidth=392 * GB,
    # SRC_CM384: RDMA (RoCE) plane, up to 400 Gb/s per NPU = 50 GB/s.
    inter_node_bandwidth=50 * GB,
    # SRC_CM384: CPUs sit on the same UB plane as the NPUs (its Elastic Memory Service
    # serves pooled DRAM, cached model weights included, over UB); derived: the UB
    # figure above.
    host_bandwidth=392 * GB,
    sources=(SRC_CM384, SRC_AMLA, SRC_ASCEND910_HC),
    # SRC_CM384: two dies per package, each its own EP rank (EP320 = 160 NPUs)
    dies=2,
    calibration=Calibration(
        "CloudMatrix-Infer (SRC_CM384)",
        gemm_efficiency=0.447,
        attention_efficiency=0.490,
        layer_overhead_s=250e-6,
        microbatch_overlap=True,  # SRC_CM384: microbatch-based pipelining, dispatch/combine beside compute
        int8_dispatch=True,  # SRC_CM384: tokens quantised to INT8 before dispatch
        fitted=("gemm_efficiency", "attention_efficiency", "layer_overhead_s"),
        fitted_on=("cloudmatrix prefill", "cloudmatrix decode", "cloudmatrix 4K/256 b24"),
    ),
)

ATLAS_300I_DUO = DeviceSpec(
    name="300I Duo",
    # SRC_300IDUO: 140 TFLOPS FP16 per card (two chips on one card, modelled as one device).
    fp16_tflops=140.0,
    # SRC_300IDUO: 280 TOPS INT8 per card.
    int8_tops=280.0,
    # SRC_300IDUO: 96 GB LPDDR4X per card (2 x 48 GB); taken as binary GiB, as
    # memory vendors size parts.
    hbm_bytes=96 * GiB,
    # SRC_300IDUO: 408 GB/s memory bandwidth per card (LPDDR4X, not HBM).
    hbm_bandwidth=408 * GB,
    interconnect="PCIe",
    # SRC_300IDUO: PCIe 4.0 x16 host link; ~32 GB/s theoretical per direction (PCIe spec).
    # Cards talk to each other through the host, so this is the ceiling.
    interconnect_bandwidth=32 * GB,
    # No NIC on the card: traffic leaves through the host's NIC. 100 GbE = 12.5 GB/s is an
    # assumption for a typical inference server, not a datasheet figure.
    inter_node_bandwidth=12.5 * GB,
    # SRC_300IDUO: the same PCIe 4.0 x16 host link.
    host_bandwidth=32 * GB,
    sources=(SRC_300IDUO, SRC_PANGU_MOE),
    calibration=Calibration(
        "Pangu Pro MoE serving on Atlas 300I Duo (SRC_PANGU_MOE)",
        gemm_efficiency=0.139,
        layer_overhead_s=161e-6,
        fitted=("gemm_efficiency", "layer_overhead_s"),
        fitted_on=("pangu-300i-duo prefill", "pangu-300i-duo decode"),
    ),
)

ATLAS_800I_A2 = NodeSpec(
    name="800I A2",
    device=ASCEND_910B,
    devices_per_node=8,  # SRC_800IA2: 8 NPUs per server
    sources=(SRC_800IA2, SRC_PANGU_MOE),
)

CLOUDMATRIX384 = NodeSpec(
    name="CloudMatrix384",
    device=ASCEND_910C,
    # SRC_CM384: 384 x 910C in one UB domain (48 servers x 8, 16 racks); treated as one
    # scale-up "node" because UB reaches every NPU at the same bandwidth.
    devices_per_node=384,
    sources=(SRC_CM384,),
)

_DEVICES: tuple[DeviceSpec, ...] = (ASCEND_910B, ASCEND_910C, ATLAS_300I_DUO)
_NODES: tuple[NodeSpec, ...] = (ATLAS_800I_A2, CLOUDMATRIX384)


def _norm(name: str) -> str:
    """'Ascend 910C' -> '910c', '300i-duo' -> '300iduo', 'Atlas 800I A2' -> '800ia2'."""
    key = re.sub(r"[\s\-_./]+", "", str(name).lower())
    for prefix in ("ascend", "atlas", "huawei"):
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix):]
    return key


def _lookup(name: str, table, kind: str):
    wanted = _norm(name)
    for item in table:
        if _norm(item.name) == wanted:
            return item
    known = ", ".join(repr(item.name) for item in table)
    raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {known}")


def node_of(device: DeviceSpec) -> NodeSpec | None:
    """The node (scale-up domain) a device is deployed in; None: no node in the
    catalog (every peer is reached over the device's own link)."""
    return next((n for n in _NODES if n.device.name == device.name), None)


def device_names() -> list[str]:
    """Canonical names of the devices in the catalog."""
    return [d.name for d in _DEVICES]


def node_names() -> list[str]:
    """Canonical names of the nodes in the catalog."""
    return [n.name for n in _NODES]


def get_device(name: str) -> DeviceSpec:
    """Device by name, case-, space- and dash-insensitive ('910c', '300i-duo')."""
    return _lookup(name, _DEVICES, "device")


def get_node(name: str) -> NodeSpec:
    """Node by name, case-, space- and dash-insensitive ('800i-a2', 'cloudmatrix 384')."""
    return _lookup(name, _NODES, "node")
