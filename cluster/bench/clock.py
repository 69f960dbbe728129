"""One time knob for a whole experiment: `time_scale`, wall seconds per device
second, as an emulated manifest means it (each step sleeps its modelled time
times time_scale). A trace's arrivals and a Poisson rate are stretched by it
alike, so a slower emulation sees the same load per device second; and when the
bench starts an emulated server, the summary reads in device seconds (wall /
time_scale), with SLO bounds given in device seconds too."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.bench.report import LATENCY_KEYS, RATE_KEYS, SLO


@dataclass(frozen=True)
class Clock:
    time_scale: float = 1.0  # wall seconds per device (trace) second
    device: bool = False  # the summary reads in device seconds (an emulated server started here)

    @property
    def unit(self) -> str:
        return "device_s" if self.device and self.time_scale != 1 else "wall_s"

    def wall_qps(self, qps: float | None) -> float | None:
        """A Poisson rate per device second, as requests per wall second."""
        return None if qps is None else qps / self.time_scale

    def wall_slo(self, slo: SLO | None) -> SLO | None:
        """SLO bounds given in the summary's unit, in wall seconds (what the client measures)."""
        if slo is None or self.unit == "wall_s":
            return slo
        scale = lambda v: None if v is None else v * self.time_scale  # noqa: E731
        return SLO(scale(slo.ttft_s), scale(slo.tpot_s), scale(slo.e2e_s))

    def report(self, summary: dict) -> dict:
        """The summary in its unit (latencies and rates; `wall_s` stays the wall time),
        saying which (`time_scale`, `latency_unit`)."""
        out = dict(summary)
        if self.unit == "device_s":
            for key in LATENCY_KEYS:
                if out.get(key) is not None:
                    out[key] = out[key] / self.time_scale
            for key in RATE_KEYS:
                if out.get(key) is not None:
                    out[key] = out[key] * self.time_scale
        out["time_scale"], out["latency_unit"] = self.time_scale, self.unit
        return out


def experiment_clock(manifests: list | None, time_scale: float | None) -> Clock:
    """The clock of a run against `manifests` (the servers the bench starts; None: a
    server at --url, whose time it does not set). `time_scale` (--time-scale) wins;
    else the emulated manifests' own, which must agree (one experiment, one clock)."""
    if time_scale is not None and (not math.isfinite(time_scale) or time_scale <= 0):
        raise ValueError(f"--time-scale must be a finite number > 0, got {time_scale!r}")
    emulated = [m for m in manifests or () if m.compute == "emulated"]
    if time_scale is None and emulated:
        scales = {m.name: m.time_scale for m in emulated}
        if len(set(scales.values())) > 1:
            raise ValueError(f"--time-scale: the manifests' time_scale differ ({_listing(scales)}); pass one")
        time_scale = emulated[0].time_scale
        if time_scale == 0:
            raise ValueError(f"--time-scale: manifest {emulated[0].name} has time_scale 0 (its steps take no wall "
                             "time, so no arrival or latency maps to device time); pass --time-scale > 0")
    return Clock(1.0 if time_scale is None else float(time_scale), device=bool(emulated))


def with_clock(manifest, clock: Clock):
    """An emulated manifest sleeping by the experiment's clock (others as they are)."""
    if manifest.compute != "emulated" or manifest.time_scale == clock.time_scale:
        return manifest
    return manifest.model_copy(update={"time_scale": clock.time_scale})


def _listing(scales: dict[str, float]) -> str:
    return ", ".join(f"{name}: {v:g}" for name, v in scales.items())
