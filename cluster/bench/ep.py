"""`omniray bench ep`: per-step time of EP instances against the single-process
reference on the same batch, measured in one run.

Both sides prefill the same B prompts, then time `steps` decode steps (one new
token per sequence per step); the figure is the median over `repeats` of the
mean step time. The EP side includes everything a real step pays: Ray calls,
the per-layer all-to-all over gloo, and result collection."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from actors.model.batch import ForwardBatch
from actors.model.kv_store import SequenceKVStore
from actors.model.moe import LocalExperts
from actors.model.reference import build_reference
from actors.model.shared_tensor import fetch_shared
from actors.protocol import SeqWork
from cluster.config import Manifest
from cluster.launcher import launch_instance, publish_weights


@dataclass
class EPBenchResult:
    model: str
    dtype: str
    batch: int
    prompt_len: int
    steps: int
    repeats: int
    reference_step_ms: float
    ep_step_ms: dict[int, float] = field(default_factory=dict)
    ep_device_step_ms: dict[int, float] = field(default_factory=dict)  # cost model, per step on the chip

    def ratio(self, ep: int) -> float:
        """EP step time / reference step time (lower is better)."""
        return self.ep_step_ms[ep] / self.reference_step_ms

    def write_json(self, path: str) -> None:
        data = asdict(self) | {"ratio_vs_reference": {ep: self.ratio(ep) for ep in self.ep_step_ms}}
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(7, vocab) for _ in range(prompt_len)] for _ in range(batch)]


@torch.no_grad()
def _reference_step_ms(model, prompts, steps: int) -> float:
    cache, experts = SequenceKVStore(), LocalExperts()
    items = [(str(i), p, 0) for i, p in enumerate(prompts)]
    model(ForwardBatch.build(items), cache, experts)
    pos = len(prompts[0])
    t0 = time.perf_counter()
    for s in range(steps):
        batch = ForwardBatch.build([(str(i), [1 + (s % 5)], pos + s) for i in range(len(prompts))])
        model.logits(model(batch, cache, experts)[batch.last_rows()])
    return (time.perf_counter() - t0) * 1000 / steps


def _ep_step_ms(executor, prompts, steps: int, tag: str) -> tuple[float, float]:
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    executor.step([SeqWork(sid, p, 0) for sid, p in zip(ids, prompts)])
    pos = len(prompts[0])
    device = 0.0
    t0 = time.perf_counter()
    for s in range(steps):
        out = executor.step([SeqWork(sid, [1 + (s % 5)], pos + s) for sid in ids])
        device += out.device_time_s
    wall = (time.perf_counter() - t0) * 1000 / steps
    executor.free(ids)
    return wall, device * 1000 / steps


def run_ep_bench(manifest: Manifest, ep_sizes: list[int], batch: int, prompt_len: int, steps: int, repeats: int) -> EPBenchResult:
    cfg = manifest.model
    prompts = _prompts(batch, prompt_len, cfg.vocab_size)
    refs = publish_weights(cfg, manifest.checkpoint)
    reference = build_reference(cfg, fetch_shared(refs))
    instances = {ep: launch_instance(f"bench-ep{ep}", cfg, ep, manifest.compute, manifest.device, refs) for ep in ep_sizes}
    result = EPBenchResult(cfg.name, cfg.dtype, batch, prompt_len, steps, repeats, 0.0)
    try:
        ref_runs, ep_runs, dev = [], {ep: [] for ep in ep_sizes}, {}
        for r in range(repeats):  # interleave, so drift hits both sides alike
            ref_runs.append(_reference_step_ms(reference, prompts, steps))
            for ep, inst in instances.items():
                wall, dev[ep] = _ep_step_ms(inst.executor, prompts, steps, f"r{r}")
                ep_runs[ep].append(wall)
        result.reference_step_ms = statistics.median(ref_runs)
        result.ep_step_ms = {ep: statistics.median(v) for ep, v in ep_runs.items()}
        result.ep_device_step_ms = dev
    finally:
        for inst in instances.values():
            inst.shutdown()
    return result


def print_ep_bench(result: EPBenchResult, console) -> None:
    from rich.table import Table

    table = Table(title=f"omniray bench ep — {result.model} ({result.dtype}), batch {result.batch}, "
                  f"prompt {result.prompt_len}, {result.steps} decode steps × {result.repeats}")
    for col in ("path", "step ms (median)", "vs reference", "emulated chip step ms"):
        table.add_column(col, justify="right")
    table.add_row("reference (1 process)", f"{result.reference_step_ms:.2f}", "1.00x", "-")
    for ep, ms in result.ep_step_ms.items():
        table.add_row(f"EP-{ep} ({ep} NPU actors)", f"{ms:.2f}", f"{result.ratio(ep):.2f}x", f"{result.ep_device_step_ms[ep]:.3f}")
    console.print(table)
