"""`omniray bench placement`: Omni Placement on measured expert load.

An instance generates a seeded random workload; its routers count the
token-expert pairs per expert and layer (real compute: the model's routers;
emulated: the seeded routing model, actors.compute.routing_model, at the
manifest's expert_skew, timed at time_scale 0). From that load the
contiguous layout and Omni Placement plans with 0, 1, 2... redundant slots per
NPU are scored by the imbalance of their NPU loads (max / mean: 1.0 is even).
The best plan is then applied while the instance is up (cluster.elastic.remap)
and the first workload is generated again: the tokens must be the same. The
NPU loads the routers measure under the new map are reported next to the
prediction, with the modelled device time per step of the same work (prompts of
the same lengths, other tokens: no prefix reused) before and after the remap: a
MoE layer costs what its most loaded die costs, the gain is the straggler removed.
"""

from __future__ import annotations

import asyncio
import random
import uuid

from cluster.placement import placement_report, plan_placement, slots_needed


#: prompt lengths: a tiny real model's, and an emulated large model's (long prompts: the
#: compute-bound prefill where a straggler die shows; in memory-bound decode every local
#: expert is read whatever its load)
REAL_PROMPTS, EMULATED_PROMPTS = (16, 64), (1024, 4096)


def _workload(n: int, vocab: int, seed: int, lengths: tuple[int, int] = REAL_PROMPTS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, min(vocab, 512)) for _ in range(rng.randrange(*lengths))] for _ in range(n)]


def _like(prompts: list[list[int]], vocab: int, seed: int) -> list[list[int]]:
    """Prompts of the same lengths with other tokens: the same work, no prefix to reuse."""
    rng = random.Random(seed)
    return [[rng.randrange(16, min(vocab, 512)) for _ in p] for p in prompts]


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


def _timed(inst, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """The workload's tokens and its modelled device seconds per engine step."""
    import ray

    s0 = ray.get(inst.engine.stats.remote())
    tokens = _generate(inst, prompts, max_tokens)
    s1 = ray.get(inst.engine.stats.remote())
    return tokens, (s1.device_time_s - s0.device_time_s) / max(1, s1.counters.steps - s0.counters.steps)


def _delta(after: dict[int, list[int]], before: dict[int, list[int]]) -> dict[int, list[int]]:
    return {layer: [a - b for a, b in zip(v, before.get(layer, [0] * len(v)))] for layer, v in after.items()}


def run_placement_bench(manifest, ep: int | None = None, requests: int = 32, max_tokens: int = 16,
                        redundant: list[int] = (0, 1, 2), seed: int = 0) -> dict:
    from actors.engine.scheduler import SchedulerConfig
    from cluster.elastic import measured_expert_load, remap
    from cluster.launcher import launch_engine, launch_instance, publish_weights

    cfg = manifest.model
    ep = ep or manifest.instances[0].ep
    emulated = manifest.compute == "emulated"
    refs = None if emulated else publish_weights(cfg, manifest.checkpoint)
    inst = launch_instance(f"placement-{uuid.uuid4().hex[:6]}", cfg, ep, manifest.compute, manifest.device, refs,
                           block_size=manifest.engine.block_size, time_scale=0.0 if emulated else manifest.time_scale,
                           expert_skew=manifest.expert_skew)
    try:
        hi = min(EMULATED_PROMPTS[1], cfg.max_position_embeddings // 2)  # room for the generated tokens
        lengths = (min(EMULATED_PROMPTS[0], hi // 2), hi) if emulated else REAL_PROMPTS
        prompts = _workload(requests, cfg.vocab_size, seed, lengths)
        bs = manifest.engine.block_size
        # emulated: the whole workload in one step, as `omniray simulate` runs a throughput deployment
        launch_engine(inst, SchedulerConfig(requests, sum(map(len, prompts)), bs) if emulated
                      else SchedulerConfig(block_size=bs))
        before_tokens = _generate(inst, prompts, max_tokens)
        load = measured_expert_load(inst)
        _, before_step = _timed(inst, _like(prompts, cfg.vocab_size, seed + 1), max_tokens)
        current = inst.specs[0].expert_map
        rows = {"contiguous": placement_report(current, load)}
        plans = {}
        for r in redundant:
            plans[r] = plan_placement(load, ep, slots_needed(cfg.num_experts, ep, r))
            rows[f"omni_r{r}"] = placement_report(plans[r], load)
        best_r = min(redundant, key=lambda r: (rows[f"omni_r{r}"]["max_imbalance"], r))
        remap(inst, plans[best_r])
        seen = measured_expert_load(inst)
        _, after_step = _timed(inst, _like(prompts, cfg.vocab_size, seed + 2), max_tokens)
        measured = placement_report(plans[best_r], _delta(measured_expert_load(inst), seen))
        after_tokens = _generate(inst, prompts, max_tokens)
        return {
            "manifest": manifest.name, "model": cfg.name, "ep": ep, "requests": requests,
            "layouts": {name: {"max_imbalance": rep["max_imbalance"], "mean_imbalance": rep["mean_imbalance"]}
                        for name, rep in rows.items()},
            "applied": f"omni_r{best_r}",
            "applied_measured": {"max_imbalance": measured["max_imbalance"],
                                 "mean_imbalance": measured["mean_imbalance"]},
            "copies": {str(layer): rep.get("copies", {}) for layer, rep in rows[f"omni_r{best_r}"]["layers"].items()},
            "tokens_unchanged": after_tokens == before_tokens,
            # the modelled device seconds per engine step, same workload, before and after the remap
            "step_device_s": {"before": before_step, "after": after_step},
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
    s = summary["step_device_s"]
    console.print(f"modelled device time per step: {s['before'] * 1000:.2f} ms before, {s['after'] * 1000:.2f} ms "
                  f"after ({s['before'] / s['after']:.2f}x)")
