"""ElasticMoE and Omni Placement on a real instance: EP resizes and expert
rebalances while requests generate leave every token as the reference's."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import uuid

import pytest
import ray

from actors import group_status
from actors.engine.scheduler import SchedulerConfig
from actors.model.reference import generate
from actors.model.weights import expert_of, shard_names
from actors.protocol import EngineRequest
from cluster.config import load_manifest
from cluster.elastic import StandbyPool, measured_expert_load, remap, resize, resized_specs
from cluster.launcher import launch_engine, launch_instance
from cluster.placement import imbalance, plan_placement
from helpers import generate_during

pytestmark = pytest.mark.ray

BS = 16


def _instance(cfg, refs, ep=2, compute="real"):
    inst = launch_instance(f"el-{uuid.uuid4().hex[:6]}", cfg, ep, compute, "910B", refs, time_scale=0.0)
    launch_engine(inst, SchedulerConfig(block_size=BS, max_num_batched_tokens=64))
    return inst


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(7, 512) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def test_ep_2_to_4_to_2_during_generation_keeps_the_reference_tokens(model):
    cfg, refs, reference = model
    inst = _instance(cfg, refs)
    prompts = _prompts(5)
    launched_group = inst.specs[0].group_name
    try:
        def scale_up_then_down():
            # forming a group never holds a task of a serving NPU on its peers (its next
            # step could queue behind it while a peer's step waits for this NPU): for a
            # group whose other members never come, form_group returns all the same
            lonely = resized_specs(inst, 4)[0]
            ray.get(inst.npus[0].form_group.remote(lonely), timeout=30)
            alone = group_status.formed(lonely.group_name, 4)
            up = resize(inst, 4, refs)
            scaled = inst.stats()
            down = resize(inst, 2, refs)
            return up, scaled, down, alone

        tokens, (up, scaled, down, alone) = generate_during(inst, prompts, 24, scale_up_then_down)
        expected = [generate(reference, [p], 24).tokens[0] for p in prompts]
        assert tokens == expected
        assert alone is False
        assert (up["from_ep"], up["to_ep"], down["from_ep"], down["to_ep"]) == (2, 4, 4, 2)
        # at EP 4 the kept NPUs stayed in the EP-2 group and kept the experts they
        # dropped (charged, as "retained"); the new ones hold none aside
        assert [len(s["groups"]) for s in scaled] == [2, 2, 1, 1]
        assert [launched_group in s["groups"] for s in scaled] == [True, True, False, False]
        retained = [s["hbm"]["by_category"].get("retained", 0) for s in scaled]
        assert retained[0] > 0 and retained[1] > 0 and retained[2:] == [0, 0]
        # so scaling back staged nothing and formed no group: the launch's group again
        assert down["back"] and not up["back"]
        assert inst.specs[0].group_name == launched_group
        assert [s["prepares"] for s in inst.stats()] == [0, 0]
        assert all("retained" not in s["hbm"]["by_category"] for s in inst.stats())
        stats = ray.get(inst.engine.stats.remote())
        assert stats.counters.reconfigurations == 2 and len(stats.free_blocks) == 2
        assert len(inst.npus) == 2
        # each NPU is in the group of the size it serves at, the ones it passed through left
        assert [s["groups"] for s in inst.stats()] == [[inst.specs[0].group_name]] * 2
        # the members' records of forming a group go once read (at launch and by each resize)
        assert not any(group_status.formed(g, 1) for g in (launched_group, inst.specs[0].group_name))
        # the step log accounts for every generated token, on either size
        steps = ray.get(inst.engine.steps_since.remote(0.0))
        assert sum(n for _, n in steps) == stats.counters.generated_tokens == 5 * 24
        assert [t for t, _ in steps] == sorted(t for t, _ in steps)
    finally:
        inst.shutdown()


def test_a_scale_down_moves_each_leaving_npus_sequences_in_one_export(model):
    """A scale-down moves the KV of all the sequences on a leaving NPU in one export
    call and one object, which the first step on the new size fetches once, not
    once per sequence; each sequence resumes from its own rows of it with the
    reference's tokens."""
    cfg, refs, reference = model
    inst = _instance(cfg, refs)
    prompts = _prompts(8, seed=11)
    try:
        resize(inst, 4, refs)  # idle: the sequences then spread over four NPUs
        tokens, down = generate_during(inst, prompts, 24, lambda: resize(inst, 2, refs))
        assert tokens == generate(reference, prompts, 24).tokens
        stats = ray.get(inst.engine.stats.remote())
        assert down["migrated"] == stats.counters.migrated_seqs >= 3  # more sequences than leaving NPUs
        assert stats.counters.kv_exports == 2  # one per leaving NPU
    finally:
        inst.shutdown()


def test_rebalance_with_redundant_experts_during_generation_keeps_the_tokens(model):
    cfg, refs, reference = model
    inst = _instance(cfg, refs)
    prompts = _prompts(4, seed=1)
    try:
        def rebalance():
            measured = measured_expert_load(inst)
            assert measured and all(sum(v) > 0 for v in measured.values())  # the routers counted real traffic
            # MoGE already balances the NPUs (one group each); skew the load so the plan replicates
            load = {layer: [sum(v) * 4] + v[1:] for layer, v in measured.items()}
            plan = plan_placement(load, ep_size=2, slots_per_npu=cfg.num_experts // 2 + 1)
            return plan, load, remap(inst, plan)

        tokens, (plan, load, info) = generate_during(inst, prompts, 20, rebalance)
        assert tokens == [generate(reference, [p], 20).tokens[0] for p in prompts]
        for layer, ranks in plan.slots.items():  # the hot expert on both NPUs, its tokens split between them
            assert [0 in r for r in ranks] == [True, True]
            assert imbalance(ranks, load[layer]) <= imbalance([[0, 1, 2, 3], [4, 5, 6, 7]], load[layer]) + 1e-9
        held = [s["experts"] for s in inst.stats()]
        assert held == [{str(layer): ranks[r] for layer, ranks in plan.slots.items()} for r in range(2)]
        assert info["staged_bytes"] > 0
        # the ledger charges exactly the experts each NPU now holds
        expert_bytes = [sum(v for k, v in s["hbm"]["by_category"].items() if k == "weights") for s in inst.stats()]
        assert expert_bytes[0] > 0
    finally:
        inst.shutdown()


def test_standby_pool_scale_up_and_emulated_resize(model):
    cfg, refs, reference = model
    inst = _instance(cfg, refs)
    pool = StandbyPool(inst.specs[0], 2, refs)  # the replicated weights prefetched while waiting
    try:
        launched = [len(shard_names(refs, s.expert_map.held_by(s.rank))) for s in inst.specs]
        info = resize(inst, 4, refs, standby=pool)
        assert info["to_ep"] == 4 and pool.actors == []  # used both; no process started right after
        assert pool.top_up(after_s=3600) == 0  # not while a scale-down may still give NPUs back
        fetched = [st["tensors_fetched"] for st in inst.stats()]
        assert fetched[:2] == launched  # launched at EP 2: the whole shard from the object store
        adopted = [shard_names(refs, inst.specs[r].expert_map.held_by(r)) for r in (2, 3)]
        experts_only = [sum(expert_of(n) is not None for n in a) for a in adopted]
        assert fetched[2:] == experts_only  # prefetched: experts only
        # a scale-down gives the released NPUs back; the next scale-up adopts them again.
        # With a map of its own it returns to no earlier layout: a new group is formed,
        # while the experts the kept NPUs held aside serve any map (none staged)
        released = [n._actor_id for n in inst.npus[2:]]
        inst_map = resized_specs(inst, 2)[0].expert_map
        down = resize(inst, 2, refs, expert_map=inst_map, standby=pool)
        assert not down["back"] and [len(s["groups"]) for s in inst.stats()] == [1, 1]
        assert [s["prepares"] for s in inst.stats()] == [0, 0]
        assert [n._actor_id for n in pool.actors] == released
        resize(inst, 4, refs, standby=pool)
        assert [n._actor_id for n in inst.npus[2:]] == released
        assert [st["tensors_fetched"] for st in inst.stats()][2:] == experts_only  # recycled: experts only
        prompt = _prompts(1, seed=3)[0]
        tokens, _ = generate_during(inst, [prompt], 6, lambda: None)
        assert tokens[0] == generate(reference, [prompt], 6).tokens[0]
        # loading ran at idle priority, the joining did not: no thread of any NPU (gloo's,
        # which carry its all-to-alls, among them) is left at SCHED_IDLE
        def idle_threads(_npu) -> int:  # (nested: shipped to the actor by value)
            idle = 0
            for tid in os.listdir("/proc/self/task"):
                try:
                    idle += os.sched_getscheduler(int(tid)) == os.SCHED_IDLE
                except OSError:
                    pass  # the thread ended meanwhile
            return idle

        if hasattr(os, "SCHED_IDLE"):
            assert ray.get([n.__ray_call__.remote(idle_threads) for n in inst.npus]) == [0] * 4
        assert pool.top_up() == 2 and len(pool.actors) == 2  # short, and due: processes start
    finally:
        pool.shutdown()
        inst.shutdown()
    big = load_manifest("pangu-pro-moe-800i-a2").model  # emulated 72B: ledgers follow the new expert maps
    emu = _instance(big, None, ep=4, compute="emulated")
    try:
        before = [s["hbm"]["by_category"]["weights"] for s in emu.stats()]
        resize(emu, 8, None)
        after = [s["hbm"]["by_category"] for s in emu.stats()]
        assert len(after) == 8 and after[0]["weights"] < before[0]  # half the experts per NPU
        # the kept NPUs keep the other half aside: their HBM holds what it held
        assert [a["weights"] + a.get("retained", 0) for a in after[:4]] == before
        assert all("retained" not in a for a in after[4:])
        # back to EP 4 while 8 sequences generate, one on each NPU: the leaving NPUs'
        # sequences move to kept ones on the same node, over its intra-node link
        prompts = _prompts(8, seed=5)
        tokens, down = generate_during(emu, prompts, 64, lambda: resize(emu, 4, None))
        assert down["back"] and down["migrated"] > 0
        again, _ = generate_during(emu, prompts, 64, lambda: None)
        assert tokens == again  # (emulated tokens depend on the token and position only)
        stats = emu.stats()
        loaded = [s["kv_blocks_loaded"] for s in stats]
        assert sum(d.get("intra_node", 0) for d in loaded) > 0 and not any("inter_node" in d for d in loaded)
        assert [s["hbm"]["by_category"]["weights"] for s in stats] == before
        assert [s["prepares"] for s in stats] == [0] * 4  # nothing to copy from the leaving NPUs
        assert not any(s["torch_imported"] or s["groups"] for s in stats)  # no torch, no group
        # a switch names its NPUs by actor id: one the engine neither steps nor adopted
        # is refused before anything changes
        with pytest.raises(ValueError, match="npus: 00ff neither serve in nor were adopted"):
            ray.get(emu.engine.reconfigure.remote(["00ff"], emu.specs[:1], emu.memory[:1]))
        assert ray.get(emu.engine.stats.remote()).counters.reconfigurations == 2
    finally:
        emu.shutdown()


def test_a_scale_down_back_parks_its_npus_and_the_next_scale_up_back_adopts_them_as_they_are(model):
    """ElasticMoE's pre-built communication domains both ways: a scale-down back to
    the layout of before the scale-up parks the NPUs it releases in the standby pool
    as they are (experts, KV pool, still in the larger group, as the kept NPUs
    are), so the next scale-up back loads, stages and forms nothing. Taken for
    anything else, a parked NPU is recycled first. Tokens stay the reference's."""
    cfg, refs, reference = model
    inst = _instance(cfg, refs)
    pool = StandbyPool(inst.specs[0], 2, refs)
    prompts = _prompts(3, seed=5)
    try:
        small = inst.specs[0].group_name
        seen: dict = {}

        def cycle():
            seen["up"] = resize(inst, 4, refs, standby=pool)
            big, released = inst.specs[0].group_name, list(inst.npus[2:])
            seen["fetched"] = [st["tensors_fetched"] for st in inst.stats()]
            seen["down"] = resize(inst, 2, refs, standby=pool)
            seen["parked"] = dict(pool.parked), [n._actor_id for n in pool.actors], released, big
            seen["groups_down"] = [sorted(st["groups"]) for st in inst.stats()]
            seen["parked_groups"] = [st["groups"] for st in ray.get([n.stats.remote() for n in released])]
            seen["again"] = resize(inst, 4, refs, standby=pool)
            seen["npus_again"] = list(inst.npus[2:])
            seen["stats_again"] = inst.stats()
            return True

        tokens, done = generate_during(inst, prompts, 24, cycle)
        assert done
        assert tokens == generate(reference, prompts, 24).tokens
        parked, pooled, released, big = seen["parked"]
        assert seen["down"]["back"] and not seen["up"]["back"]
        assert set(parked.values()) == {big} and pooled == [n._actor_id for n in released]
        assert seen["groups_down"] == [sorted([small, big])] * 2  # the kept NPUs stay in the larger group
        assert seen["parked_groups"] == [[big]] * 2
        again = seen["again"]
        assert again["back"] and inst.specs[0].group_name == big
        assert [n._actor_id for n in seen["npus_again"]] == [n._actor_id for n in released]
        assert [st["tensors_fetched"] for st in seen["stats_again"]] == seen["fetched"]  # nothing loaded again
        assert [st["prepares"] for st in seen["stats_again"]] == [0] * 4 and pool.parked == {}
        # parked again, then taken for a layout of its own: recycled, set up, in a new group
        resize(inst, 2, refs, standby=pool)
        assert len(pool.parked) == 2
        own = resize(inst, 4, refs, expert_map=resized_specs(inst, 4)[0].expert_map, standby=pool)
        assert not own["back"] and pool.parked == {}
        assert all(st["groups"] == [inst.specs[0].group_name] or sorted(st["groups"]) ==
                   sorted([inst.specs[0].group_name, small]) for st in inst.stats())
        # parked again, one of them dies: the scale-up back starts over (adopts from the pool, forms a group)
        own_group = inst.specs[0].group_name
        resize(inst, 2, refs, standby=pool)
        assert set(pool.parked.values()) == {own_group}
        ray.kill(pool.actors[0])
        after = resize(inst, 4, refs, standby=pool)
        assert not after["back"] and inst.ep_size == 4 and inst.specs[0].group_name != own_group
        prompt = _prompts(1, seed=9)[0]
        assert generate_during(inst, [prompt], 8, lambda: None)[0][0] == generate(reference, [prompt], 8).tokens[0]
    finally:
        pool.shutdown()
        inst.shutdown()


def test_an_emulated_standby_npu_joins_copying_only_its_experts(model):
    """Emulated NPUs model what real ones do: a standby copied the replicated weights
    into HBM while it waited, so a scale-up that adopts it models the copy of its
    experts alone; a released NPU keeps them for its next adoption (recycled);
    an NPU started on demand copies everything."""
    from actors.compute.emulated import replicated_bytes
    from actors.cost_model import CostModel
    from actors.devices import get_device

    cfg, _, _ = model
    cost = CostModel(get_device("910B"))
    inst = _instance(cfg, None, ep=1, compute="emulated")
    pool = StandbyPool(inst.specs[0], 1, None)
    try:
        def weights(report) -> int:
            return report["by_category"]["weights"]

        for own_map in (False, True):  # adopted warm; then parked, taken for a layout of its own: recycled
            info = resize(inst, 2, None, standby=pool,
                          expert_map=resized_specs(inst, 2)[0].expert_map if own_map else None)
            joined = inst.memory[1]  # its report: load_s, the modelled copy into HBM
            assert joined["load_s"] == pytest.approx(cost.load_time(weights(joined) - replicated_bytes(cfg)))
            assert info["modelled_load_s"] == pytest.approx(joined["load_s"])
            resize(inst, 1, None, standby=pool)
            assert len(pool.actors) == 1
        resize(inst, 2, None)  # no pool: a new actor, started now
        started = inst.memory[1]
        assert started["load_s"] == pytest.approx(cost.load_time(weights(started)))
        assert started["load_s"] > info["modelled_load_s"]
    finally:
        pool.shutdown()
        inst.shutdown()


def test_a_first_step_that_fails_on_a_lost_npu_does_not_hold_the_switch(model):
    """An NPU lost between its adoption and the switch: the first step on the new
    size fails. Its request fails loudly, the engine goes unhealthy (a rebuild's
    cue), and the switch's caller (the controller, under its lock) gets the reason
    instead of waiting for a step that never comes."""
    cfg, _, _ = model
    inst = _instance(cfg, None, ep=1, compute="emulated")
    pool = StandbyPool(inst.specs[0], 1, None)
    got: dict = {}
    try:
        specs = resized_specs(inst, 2)
        new = pool.take(1)
        reports = ray.get(inst.engine.adopt.remote(new, specs[1:], None))
        ray.kill(new[0])

        def switch():
            try:
                got["info"] = ray.get(inst.engine.reconfigure.remote(
                    [n._actor_id.hex() for n in inst.npus + new], specs, inst.memory + reports), timeout=30)
            except Exception as err:  # the assertion below names it
                got["error"] = err

        async def stream():
            req = EngineRequest(f"lost-{uuid.uuid4().hex[:4]}", [7, 8, 9], max_tokens=5000, ignore_eos=True)
            n = 0
            try:
                async for ref in inst.engine.generate.remote(req):
                    n += len((await ref).token_ids)
                    if n >= 3 and "thread" not in got:  # running when the switch comes
                        got["thread"] = threading.Thread(target=switch)
                        got["thread"].start()
            except Exception as err:  # the step that failed: asserted below
                return err
            return n

        streamed = asyncio.run(stream())
        got["thread"].join(60)
        assert "error" not in got, got.get("error")
        assert "step failed on an NPU" in got["info"]["first_step_error"]
        assert "first_step_at" not in got["info"]
        assert isinstance(streamed, Exception) and "step failed on an NPU" in str(streamed)
        assert not ray.get(inst.engine.stats.remote()).healthy
    finally:
        pool.shutdown()
        inst.shutdown()


def test_npus_of_a_placement_group_stay_the_instances_and_a_rebuild_takes_their_bundles(ray_session, monkeypatch):
    """An NPU in an instance's placement group dies with that group. A scale-down keeps it
    in the instance's reserve, not the standby pool (which would lose it when the
    instance goes); the next scale-up takes it back. A rebuild starts the new NPUs in the
    bundles of the ones they replace: the same group, no new one, also after a try that
    failed (which kept the group)."""
    import cluster.elastic
    from cluster.elastic import rebuild

    cfg = load_manifest("local").model
    inst = launch_instance(f"pg-{uuid.uuid4().hex[:6]}", cfg, 4, "emulated", "910B", time_scale=0.0,
                           placement="PACK")
    launch_engine(inst, SchedulerConfig(block_size=BS, max_num_batched_tokens=64))
    pool = StandbyPool(inst.specs[0], 2, None)
    for a in pool.take(2):  # drawn by another instance: the pool has room for two
        ray.kill(a)
    launch_group = inst.groups[0]
    try:
        prompt = _prompts(1, seed=5)[0]
        before, _ = generate_during(inst, [prompt], 4, lambda: None)
        released = inst.npus[2:]
        resize(inst, 2, None, standby=pool)
        assert pool.actors == [] and [a for a, _ in inst.reserve] == released
        resize(inst, 4, None, standby=pool)
        assert inst.npus[2:] == released and inst.reserve == [] and inst.groups == [launch_group]

        old = list(inst.npus)
        ray.kill(old[1])  # an NPU dies: the group is broken

        def group_fails(specs):
            raise RuntimeError("injected: the new group did not form")

        with monkeypatch.context() as m:
            m.setattr(cluster.elastic, "_await_group", group_fails)
            with pytest.raises(RuntimeError, match="injected"):
                rebuild(inst, None, standby=pool)
        assert inst.groups == [launch_group] and inst.bundles == {}
        rebuild(inst, None, standby=pool)
        assert not set(inst.npus) & set(old)
        assert inst.groups == [launch_group]
        assert sorted(i for pg, i in inst.bundles.values()) == [0, 1, 2, 3]
        after, _ = generate_during(inst, [prompt], 4, lambda: None)
        assert after == before
    finally:
        inst.shutdown()
        pool.shutdown()
    assert inst.groups == [] and inst.bundles == {}


def test_bench_elastic_direct_scales_the_instance_alone_and_loses_no_request(ray_session):
    """`omniray bench elastic --direct`: the engine fed straight, scaled up and back
    (to the launch's layout) under the closed loop; every request completes."""
    from cluster.bench.elastic import ElasticBenchConfig, run_elastic_bench

    cfg = ElasticBenchConfig(concurrency=4, phase_s=1.0, warmup_s=0.5, cycles=2, input_len=8, output_len=12,
                             direct=True)
    summary = run_elastic_bench(load_manifest("local"), cfg)
    assert summary["direct"] and (summary["from_ep"], summary["to_ep"]) == (2, 4)
    assert summary["failed"] == 0 and summary["requests"] >= 4
    assert summary["host_cpus"] >= 1
    # both scale-downs went back (and parked their NPUs); the second scale-up went back to those
    assert summary["scaled_back"] == 2 and summary["scaled_back_up"] == 1
    assert summary["scale_up_back_s"] is not None and summary["scale_up_s"] is not None
    assert summary["throughput_before"] > 0 and summary["throughput_between"] > 0
    assert summary["during_vs_steady"] is not None and summary["cold_start_s"] > 0
    assert summary["during_vs_steady_up"] is not None and summary["during_vs_steady_down"] is not None
    # the control command in each of the 5 steady phases (small, large, small, ...) returned two step ends
    assert len(summary["control_vs_steady_per_window"]) == 5 and None not in summary["control_vs_steady_per_window"]
    assert summary["serving_lost_s_control"] is not None
