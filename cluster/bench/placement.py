"""`omniray bench placement`: Omni Placement on measured expert load.

An instance (real compute) generates a seeded random workload; its routers
count the token-expert pairs per expert and layer. From that load the
contiguous layout and Omni Placement plans with 0, 1, 2... redundant slots per
NPU are scored by the imbalance of their NPU loads (max / mean: 1.0 is even).
The best plan is then applied while the instance is up (cluster.elastic.remap)
and the same workload is generated again: the tokens must be the same, and the
NPU loads the routers measure under the new map are reported next to the
prediction.
"""

from __future__ import annotations

import asyncio
import random
import uuid

from cluster.placement import placement_report, plan_placement, slots_needed


def _workload(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, min(vocab, 512)) for _ in range(rng.randrange(16, 64))] for _ in range(n)]


def _generate(inst, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from actors.protocol import EngineRequest

    async def one(i, prompt):
        out = []
        req = EngineRequest(f"pl{i}-{uuid.uuid4().hex[:6]}", prompt, max_tokens=max_tokens, ignore_eos=True)
        async for ref in inst.engine.generate.remote(req):
            out += (await ref).token_ids
        return out

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(main())


def _delta(after: dict[int, list[int]], before: dict[int, list[int]]) -> dict[int, list[int]]:
    return {layer: [a - b for a, b in zip(v, before.get(layer, [0] * len(v)))] for layer, v in after.items()}


def run_placement_bench(manifest, ep: int | None = None, requests: int = 32, max_tokens: int = 16,
                        redundant: list[int] = (0, 1, 2), seed: int = 0) -> dict:
    from actors.engine.scheduler import SchedulerConfig
    from cluster.elastic import measured_expert_load, remap
    from cluster.launcher import launch_engine, launch_instance, publish_weights

    if manifest.compute != "real":
        raise ValueError("manifest: bench placement needs real compute (emulated NPUs route no tokens)")
    cfg = manifest.model
    ep = ep or manifest.instances[0].ep
    refs = publish_weights(cfg, manifest.checkpoint)
    inst = launch_instance(f"placement-{uuid.uuid4().hex[:6]}", cfg, ep, "real", manifest.device, refs,
                           block_size=manifest.engine.block_size)
    try:
        launch_engine(inst, SchedulerConfig(block_size=manifest.engine.block_size))
        prompts = _workload(requests, cfg.vocab_size, seed)
        before_tokens = _generate(inst, prompts, max_tokens)
        load = measured_expert_load(inst)
        current = inst.specs[0].expert_map
        rows = {"contiguous": placement_report(current, load)}
        plans = {}
        for r in redundant:
            plans[r] = plan_placement(load, ep, slots_needed(cfg.num_experts, ep, r))
            rows[f"omni_r{r}"] = placement_report(plans[r], load)
        best_r = min(redundant, key=lambda r: (rows[f"omni_r{r}"]["max_imbalance"], r))
        remap(inst, plans[best_r])
        after_tokens = _generate(inst, prompts, max_tokens)
        measured = placement_report(plans[best_r], _delta(measured_expert_load(inst), load))
        return {
            "manifest": manifest.name, "model": cfg.name, "ep": ep, "requests": requests,
            "layouts": {name: {"max_imbalance": rep["max_imbalance"], "mean_imbalance": rep["mean_imbalance"]}
                        for name, rep in rows.items()},
            "applied": f"omni_r{best_r}",
            "applied_measured": {"max_imbalance": measured["max_imbalance"],
                                 "mean_imbalance": measured["mean_imbalance"]},
            "copies": {str(layer): rep.get("copies", {}) for layer, rep in rows[f"omni_r{best_r}"]["layers"].items()},
            "tokens_unchanged": after_tokens == before_tokens,
        }
    finally:
        inst.shutdown()


def print_placement(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"bench placement: {summary['model']} EP {summary['ep']}, {summary['requests']} requests "
                    f"(NPU load max/mean; 1.0 = even)")
    t.add_column("layout")
    t.add_column("max over layers", justify="right")
    t.add_column("mean over layers", justify="right")
    for name, row in summary["layouts"].items():
        t.add_row(name, f"{row['max_imbalance']:.3f}", f"{row['mean_imbalance']:.3f}")
    m = summary["applied_measured"]
    t.add_row(f"{summary['applied']} applied, measured", f"{m['max_imbalance']:.3f}", f"{m['mean_imbalance']:.3f}")
    console.print(t)
    console.print(f"tokens unchanged after the rebalance: {summary['tokens_unchanged']}")
