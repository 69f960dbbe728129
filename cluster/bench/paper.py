"""`omniray simulate --paper`: every published Ascend serving figure at its own
configuration (one manifest each, under manifests/paper/), next to what the
emulator gives there.

A row is a calibration figure (the device's stack parameters were fitted on it,
`--fit`) or held out (never used to fit: it tests the model). The analytic price
of a row (`price`) is the cost model applied to the row's steady state: every
sequence of the batch at the mean context input + output / 2, MTP rows
proposing and verifying one draft. `run_row` runs the same configuration through
the engine (`omniray simulate`); the two agree within the engine's discreteness
(contexts grow during the decode window, drafts are accepted by a seeded draw).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

from actors.cost_model import CostModel, DieBatch
from actors.devices import Calibration, get_device
from cluster.config import load_manifest

CM384 = "arXiv:2506.12708 (CloudMatrix-Infer)"
PANGU = "arXiv:2505.21411 (Pangu Pro MoE)"
DECODE_WINDOW = 16  # tokens an engine run decodes per sequence around the mean context


@dataclass(frozen=True)
class PaperRow:
    name: str
    source: str
    published: float  # tokens/s per device (card, or 910C NPU), as the source counts them
    role: Literal["calibration", "held_out"]
    manifest: str  # under manifests/
    phase: Literal["prefill", "decode"]
    batch: int  # sequences per device
    input_len: int
    output_len: int  # decode: tokens each sequence generates (the mean context is input + output / 2)
    config: str  # the configuration and every assumption, as printed next to the figure

    @property
    def context(self) -> int:
        """Prefill: the prompt; decode: the mean KV length over the generation."""
        return self.input_len if self.phase == "prefill" else self.input_len + self.output_len // 2


ROWS: tuple[PaperRow, ...] = (
    PaperRow("pangu-800i-a2 prefill", PANGU, 4828, "calibration", "paper/pangu-800i-a2-prefill", "prefill", 1, 2048, 0,
             "800I A2 (910B), 2 cards, W8A8, batch 2 x 2,048 (one prompt per card)"),
    PaperRow("pangu-800i-a2 decode", PANGU, 1148, "calibration", "paper/pangu-800i-a2-decode", "decode", 114, 1024, 2048,
             "800I A2, 4 cards, W8A8, batch 456, TPOT 99.3 ms; assumed 1K in / 2K out, KV int8"),
    PaperRow("pangu-800i-a2 decode MTP", PANGU, 1528, "held_out", "paper/pangu-800i-a2-mtp", "decode", 146, 1024, 2048,
             "800I A2, 4 cards, batch 584, TPOT 95.6 ms; assumed 1K/2K, one MTP layer at 70 % acceptance"),
    PaperRow("pangu-300i-duo prefill", PANGU, 1055, "calibration", "paper/pangu-300i-duo-prefill", "prefill", 1, 2048, 0,
             "300I Duo, assumed 2 cards, W8A8, batch 2 x 2,048 as on the 800I A2"),
    PaperRow("pangu-300i-duo decode", PANGU, 201, "calibration", "paper/pangu-300i-duo-decode", "decode", 20, 1024, 2048,
             "300I Duo, 4 cards, W8A8, batch 80, TPOT 99.5 ms; assumed 1K/2K, KV int8"),
    PaperRow("pangu-300i-duo decode MTP", PANGU, 321, "held_out", "paper/pangu-300i-duo-mtp", "decode", 32, 1024, 2048,
             "300I Duo, 4 cards; assumed batch 128, 1K/2K, one MTP layer at 70 % acceptance"),
    PaperRow("cloudmatrix prefill", CM384, 6688, "calibration", "paper/cloudmatrix-prefill", "prefill", 4, 4096, 0,
             "910C, EP32 (16 NPUs, 32 dies), INT8, 16,384 tokens per NPU; assumed 4K prompts"),
    PaperRow("cloudmatrix decode", CM384, 1943, "calibration", "paper/cloudmatrix-decode", "decode", 96, 4096, 1024,
             "910C, EP320 (160 NPUs), INT8, 96 per NPU, MTP at 70 %, TPOT < 50 ms; assumed 4K in / 1K out"),
    PaperRow("cloudmatrix 1K/1K b128", CM384, 2733, "held_out", "paper/cloudmatrix-decode", "decode", 128, 1024, 1024,
             "EP320 as above, 1K in / 1K out, 128 per NPU"),
    PaperRow("cloudmatrix 2K/256 b112", CM384, 2360, "held_out", "paper/cloudmatrix-decode", "decode", 112, 2048, 256,
             "EP320 as above, 2K in / 256 out, 112 per NPU"),
    PaperRow("cloudmatrix 4K/256 b24", CM384, 974, "calibration", "paper/cloudmatrix-decode", "decode", 24, 4096, 256,
             "EP320 as above, 4K in / 256 out, 24 per NPU"),
    PaperRow("cloudmatrix TPOT 15 ms b8", CM384, 538, "held_out", "paper/cloudmatrix-decode", "decode", 8, 2048, 256,
             "EP320 as above, 8 per NPU (TPOT 15 ms); assumed 2K in / 256 out"),
)

#: the parameters `fit` may set, per device (the others keep their stated values)
FITTED = ("gemm_efficiency", "attention_efficiency", "layer_overhead_s")
BOUNDS = {"gemm_efficiency": (0.05, 1.0), "attention_efficiency": (0.05, 1.0), "layer_overhead_s": (0.0, 5e-3)}


@dataclass(frozen=True)
class RowResult:
    name: str
    published: float
    emulated: float
    ratio: float
    role: str
    config: str
    source: str
    tpot_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def price(row: PaperRow, calibration: Calibration | None = None) -> tuple[float, float | None]:
    """(tokens/s per device, TPOT in seconds or None) of `row` by the cost model."""
    m = load_manifest(row.manifest)
    device, spec, cfg, eng = get_device(m.device), m.instances[0], m.model, m.engine
    cost = CostModel(device, calibration)
    dies = device.dies
    ep_dies = spec.ep * (spec.dies_per_actor or dies)
    per_die = row.batch / dies
    if row.phase == "prefill":
        b = _scaled(DieBatch.of([(0, row.context, False)]), per_die)
        t = cost.step_time(cfg, b, ep_dies).total_s
        return row.batch * row.context / t, None
    mtp = eng.mtp
    ctx = row.context
    main = _scaled(DieBatch.of([(ctx, 2 if mtp else 1, True)]), per_die)
    drafts = _scaled(DieBatch.of([(ctx + 2, 1, True)]), per_die) if mtp else None
    t = cost.step_time(cfg, main, ep_dies, mtp=drafts).total_s
    per_seq = 1 + eng.mtp_acceptance_rate if mtp else 1.0
    return row.batch * per_seq / t, t / per_seq


def _scaled(one: DieBatch, n: float) -> DieBatch:
    """`n` copies of a one-sequence batch (n may be fractional: a device's batch over its dies)."""
    return DieBatch(**{f.name: getattr(one, f.name) * n for f in fields(DieBatch)})


def results(rows=ROWS, calibrations: dict[str, Calibration] | None = None) -> list[RowResult]:
    """Every row priced analytically (under `calibrations` by device, else the catalog's)."""
    out = []
    for row in rows:
        device = load_manifest(row.manifest).device
        cal = (calibrations or {}).get(device)
        emulated, tpot = price(row, cal)
        out.append(RowResult(row.name, row.published, emulated, emulated / row.published, row.role, row.config,
                             row.source, None if tpot is None else tpot * 1000))
    return out


def fit(device: str, rows=ROWS) -> Calibration:
    """The device's calibration with FITTED set by least squares (log ratios) on its
    calibration rows only; as many parameters as the rows can pin, in FITTED order."""
    from scipy.optimize import least_squares

    base = get_device(device).calibration
    cal_rows = [r for r in rows if r.role == "calibration" and load_manifest(r.manifest).device == get_device(device).name]
    if not cal_rows:
        raise ValueError(f"no calibration figure on {device}")
    # two figures (a prefill, a decode) pin the GEMM efficiency and the layer overhead;
    # a third (a second decode batch) the attention efficiency too
    names = FITTED if len(cal_rows) >= len(FITTED) else ("gemm_efficiency", "layer_overhead_s")[:len(cal_rows)]

    def make(x) -> Calibration:
        return replace(base, **dict(zip(names, x)))

    def residuals(x):
        return [math.log(price(r, make(x))[0] / r.published) for r in cal_rows]

    x0 = [getattr(base, n) if getattr(base, n) else 1e-4 for n in names]
    lo, hi = zip(*(BOUNDS[n] for n in names))
    sol = least_squares(residuals, x0, bounds=(lo, hi))
    return replace(make(sol.x), fitted=tuple(names), fitted_on=tuple(r.name for r in cal_rows))


def run_row(row: PaperRow, seed: int = 0) -> RowResult:
    """The row's configuration through the engine (`omniray simulate`, time_scale 0)."""
    from cluster.bench.simulate import run_simulation

    m = load_manifest(row.manifest)
    ep = m.instances[0].ep
    if row.phase == "prefill":
        r = run_simulation(m, row.batch * ep, row.context, 1, seed, phases=("prefill",))
        emulated, tpot = r.prefill_tok_s_per_npu, None
    else:
        r = run_simulation(m, row.batch * ep, row.context, DECODE_WINDOW, seed, phases=("decode",))
        emulated, tpot = r.decode_tok_s_per_npu, r.tpot_s * 1000
    return RowResult(row.name, row.published, emulated, emulated / row.published, row.role, row.config, row.source,
                     tpot)


def print_rows(results_: list[RowResult], console, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("figure", "published", "emulated", "ratio", "TPOT ms", "role", "configuration"):
        table.add_column(col, justify="right" if col in ("published", "emulated", "ratio", "TPOT ms") else "left")
    for r in results_:
        bar = 0.10 if r.role == "calibration" else 0.15
        style = "green" if abs(r.ratio - 1) <= bar else "red"
        table.add_row(r.name, f"{r.published:,.0f}", f"{r.emulated:,.0f}", f"[{style}]{r.ratio:.2f}[/{style}]",
                      "" if r.tpot_ms is None else f"{r.tpot_ms:.1f}", r.role, r.config)
    console.print(table)
