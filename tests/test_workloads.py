"""cluster.bench.workloads: seeded synthetic workloads, Mooncake trace replay, expected prefix hits."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.bench.workloads import WorkItem, expected_prefix_hits, ideal_hit_rate, make_workload

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "cluster" / "bench" / "traces" / "sample_mooncake.jsonl"
SYNTHETIC = ("random", "shared-prefix", "multi-turn")


def write_trace(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f"trace:{path}"


def row(ts: int, n_in: int, n_out: int, hash_ids: list[int]) -> dict:
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": hash_ids}


def brute_force_hits(items: list[WorkItem], bt: int) -> int:
    """The definition, spelled out: whole prefixes of full blocks seen in an earlier prompt."""
    seen: set[tuple[int, ...]] = set()
    hits = 0
    for it in items:
        chains = [tuple(it.prompt_ids[:end]) for end in range(bt, len(it.prompt_ids) + 1, bt)]
        hits += sum(c in seen for c in chains)
        seen.update(chains)
    return hits


# -- synthetic -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SYNTHETIC)
def test_deterministic_per_seed(spec):
    a = make_workload(spec, 12, seed=3)
    assert a == make_workload(spec, 12, seed=3)
    assert a != make_workload(spec, 12, seed=4)
    assert len(a) == 12 and all(it.arrival_s == 0.0 for it in a)


@settings(max_examples=25, deadline=None)
@given(spec=st.sampled_from(SYNTHETIC), n=st.integers(1, 9), seed=st.integers(0, 2**32),
       low=st.integers(0, 50), width=st.integers(1, 100), input_len=st.integers(1, 40),
       output_len=st.integers(1, 20), prefix_len=st.integers(1, 30), turns=st.integers(1, 4))
def test_lengths_and_token_ranges(spec, n, seed, low, width, input_len, output_len, prefix_len, turns):
    items = make_workload(spec, n, seed=seed, token_range=(low, low + width), input_len=input_len,
                          output_len=output_len, prefix_len=prefix_len, num_prefixes=2, turns=turns)
    assert len(items) == n
    for it in items:
        assert it.prompt_ids and all(low <= t < low + width for t in it.prompt_ids)
        assert it.max_tokens >= 1
    if spec == "random":
        assert all(max(1, input_len // 2) <= len(it.prompt_ids) <= input_len * 3 // 2 + 1 for it in items)
        assert all(max(1, output_len // 2) <= it.max_tokens <= output_len * 3 // 2 + 1 for it in items)
        assert all(it.group == "" for it in items)
    if spec == "shared-prefix":
        assert all(len(it.prompt_ids) > prefix_len for it in items)  # a suffix of at least one token
    if spec == "multi-turn":
        assert all(it.max_tokens == output_len for it in items)


def test_shared_prefix_groups_share_their_prefix():
    items = make_workload("shared-prefix", 40, seed=1, num_prefixes=3, prefix_len=20, input_len=30)
    groups: dict[str, list[WorkItem]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    assert set(groups) == {"prefix-0", "prefix-1", "prefix-2"}
    prefixes = {g: its[0].prompt_ids[:20] for g, its in groups.items()}
    for g, its in groups.items():
        assert all(it.prompt_ids[:20] == prefixes[g] for it in its)
        assert len({tuple(it.prompt_ids[20:]) for it in its}) == len(its)  # suffixes are the request's own
    assert len({tuple(p) for p in prefixes.values()}) == 3
    # a perfect cache reuses each prefix's 5 full blocks (20 tokens / 4) for every request but its group's first
    assert expected_prefix_hits(items, 4) == 5 * (40 - 3)


def test_multi_turn_extends_the_previous_turn():
    items = make_workload("multi-turn", 10, seed=2, turns=4, input_len=12, output_len=5)
    assert len(items) == 10
    last: dict[str, list[int]] = {}
    for it in items:
        prev = last.get(it.group)
        if prev is not None:
            assert it.prompt_ids[:len(prev)] == prev
            assert len(it.prompt_ids) >= len(prev) + 5 + 1  # the reply + at least one user token
        last[it.group] = it.prompt_ids
    # 3 conversations round-robin: turn 0 of conv-0..2, turn 1 of conv-0..2, ...; cut at 10
    assert [it.group for it in items[:6]] == ["conv-0", "conv-1", "conv-2"] * 2
    assert [it.group for it in items].count("conv-0") == 4
    assert expected_prefix_hits(items, 4) == brute_force_hits(items, 4) > 0


def test_random_has_no_prefix_hits():
    assert expected_prefix_hits(make_workload("random", 50, seed=0), 16) == 0
    assert expected_prefix_hits(make_workload("random", 5, token_range=(0, 2)), 1) > 0  # 1-token blocks collide


# -- trace replay ----------------------------------------------------------------------------------------------


def test_trace_hand_computed_prefix_hits(tmp_path):
    spec = write_trace(tmp_path / "t.jsonl", [row(0, 1024, 512, [1, 2]), row(500, 1536, 100, [1, 2, 3]),
                                              row(2000, 512, 1, [4])])
    items = make_workload(spec, block_tokens=4)
    assert [len(it.prompt_ids) for it in items] == [8, 12, 4]
    assert [it.max_tokens for it in items] == [4, 1, 1]  # 512 * 4/512, max(1, round(0.78)), max(1, round(0.008))
    assert [it.arrival_s for it in items] == [0.0, 0.5, 2.0]
    assert items[1].prompt_ids[:8] == items[0].prompt_ids
    assert expected_prefix_hits(items, 4) == 2


def test_trace_shares_exactly_the_leading_blocks(tmp_path):
    spec = write_trace(tmp_path / "t.jsonl", [row(0, 2048, 10, [0, 1, 2, 3]), row(0, 2048, 10, [0, 1, 7, 8]),
                                              row(0, 2048, 10, [5, 1, 2, 3]), row(0, 2048, 10, [0, 1, 2, 3])])
    a, b, c, d = (it.prompt_ids for it in make_workload(spec, block_tokens=8, seed=5))
    assert a[:16] == b[:16] and a[16:24] != b[16:24]
    assert a[:8] != c[:8] and a[8:] == c[8:]  # same hash id, same tokens, even at another prefix
    assert a == d
    items = make_workload(spec, block_tokens=8, seed=5)
    assert expected_prefix_hits(items, 8) == 2 + 0 + 4
    assert make_workload(spec, block_tokens=8, seed=6)[0].prompt_ids != a


def test_trace_blocks_depend_on_seed_and_hash_id_only(tmp_path):
    one = write_trace(tmp_path / "one.jsonl", [row(0, 512, 1, [42])])
    two = write_trace(tmp_path / "two.jsonl", [row(0, 1024, 1, [9, 10]), row(3, 1024, 1, [42, 11])])
    assert make_workload(one, seed=1)[0].prompt_ids == make_workload(two, seed=1)[1].prompt_ids[:16]


def test_trace_cut_and_extended_to_the_scaled_length(tmp_path):
    spec = write_trace(tmp_path / "t.jsonl", [row(0, 700, 1, [1, 2, 3]), row(0, 2000, 1, [1]),
                                              row(0, 2000, 1, [1]), row(0, 0, 0, [])])
    a, b, c, d = (it.prompt_ids for it in make_workload(spec, block_tokens=16))
    assert len(a) == 22 and len(b) == len(c) == 62 and len(d) == 1  # round(700/32), round(2000/32), at least 1
    assert a[:16] == b[:16] == c[:16]
    assert b[16:] != c[16:] and b[16] != c[16]  # extensions are each request's own


def test_trace_time_scale_and_max_requests(tmp_path):
    spec = write_trace(tmp_path / "t.jsonl", [row(1000 + 250 * i, 512, 512, [i]) for i in range(6)])
    assert [it.arrival_s for it in make_workload(spec)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    # wall seconds per trace second, as the emulator's time_scale: 10 stretches the replay tenfold
    assert [it.arrival_s for it in make_workload(spec, time_scale=10)] == pytest.approx([2.5 * i for i in range(6)])
    assert [it.arrival_s for it in make_workload(spec, time_scale=0.1)] == pytest.approx([0.025 * i for i in range(6)])
    # speedup: the trace's rate times 4, in device time; on the same clock
    assert [it.arrival_s for it in make_workload(spec, time_scale=2, speedup=4)] == pytest.approx([0.125 * i for i in range(6)])
    assert len(make_workload(spec, 1, max_requests=4)) == 4  # num_requests is ignored for traces
    assert len(make_workload(spec, max_requests=100)) == 6


@pytest.mark.parametrize(("line", "field"), [
    ('{"timestamp": 5, "input_length": 10, "output_length": 1}', "hash_ids"),
    ('{"timestamp": 5, "input_length": -1, "output_length": 1, "hash_ids": []}', "input_length"),
    ('{"timestamp": 5, "input_length": 10, "output_length": "x", "hash_ids": []}', "output_length"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [1, "a"]}', "hash_ids"),
    ('{"timestamp": null, "input_length": 10, "output_length": 1, "hash_ids": []}', "timestamp"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": []}', "timestamp"),  # goes back
    ('{"timestamp": 5, "input_length": 10', "JSON"),
    ('[5, 10, 1, []]', "JSON object"),
])
def test_trace_bad_line_names_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row(2, 512, 1, [0])) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{field}"):
        make_workload(f"trace:{path}")


def test_sample_trace_is_regenerated_by_its_script():
    spec = importlib.util.spec_from_file_location("make_sample_trace", ROOT / "scripts" / "make_sample_trace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == mod.make_trace(0)
    items = make_workload(f"trace:{SAMPLE}", seed=0)
    assert len(items) == len(lines) >= 30
    assert all(b.arrival_s >= a.arrival_s for a, b in itertools.pairwise(items))
    assert 0 < expected_prefix_hits(items, 16) == brute_force_hits(items, 16)


# -- bad arguments and the hit counter -------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "kwargs", "match"), [
    ("zipf", {}, "unknown workload spec"),
    ("random", {"num_requests": 0}, "num_requests"),
    ("random", {"token_range": (5, 5)}, "token_range"),
    ("random", {"input_len": -3}, "input_len"),
    ("shared-prefix", {"num_prefixes": 0}, "num_prefixes"),
    ("multi-turn", {"turns": 0}, "turns"),
    ("random", {"block_tokens": 0}, "block_tokens"),
    ("trace:", {}, "trace:PATH"),
    ("trace:{sample}", {"time_scale": 0}, "time_scale"),
    ("trace:{sample}", {"speedup": -1}, "speedup"),
    ("trace:{sample}", {"max_requests": 0}, "max_requests"),
])
def test_bad_arguments(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_workload(spec.format(sample=SAMPLE), **kwargs)


def test_missing_trace_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make_workload(f"trace:{tmp_path / 'nope.jsonl'}")


@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, 2), max_size=9), max_size=6), bt=st.integers(1, 3))
def test_expected_prefix_hits_matches_its_definition(prompts, bt):
    items = [WorkItem(0.0, p, 1) for p in prompts]
    assert expected_prefix_hits(items, bt) == brute_force_hits(items, bt)


def test_ideal_hit_rate_counts_only_the_blocks_an_engine_can_reuse():
    """Blocks of 2 tokens. [1,2,3,4,5] (5 tokens) then [1,2,3,4] (4) then [1,2,3,4,9,9] (6):
    the second shares both full blocks but must compute its last token: 1 reusable
    block of (4-1)//2 = 1; the third shares 2 of its (6-1)//2 = 2 reusable blocks."""
    items = [WorkItem(0.0, p, 1) for p in ([1, 2, 3, 4, 5], [1, 2, 3, 4], [1, 2, 3, 4, 9, 9])]
    assert expected_prefix_hits(items, 2) == 2 + 2
    assert expected_prefix_hits(items, 2, reusable=True) == 1 + 2
    assert ideal_hit_rate(items, 2) == (1 + 2) * 2 / (5 + 4 + 6)
    assert ideal_hit_rate([WorkItem(0.0, [1, 2], 1)] * 2, 4) == 0.0  # no full block
    assert ideal_hit_rate([], 16) is None


@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, 2), max_size=9), max_size=6), bt=st.integers(1, 3))
def test_reusable_hits_are_the_hits_capped_per_prompt(prompts, bt):
    items = [WorkItem(0.0, p, 1) for p in prompts]
    capped = sum(min(expected_prefix_hits(items[: i + 1], bt) - expected_prefix_hits(items[:i], bt),
                     (len(p) - 1) // bt) for i, p in enumerate(prompts) if p)
    assert expected_prefix_hits(items, bt, reusable=True) == capped


def test_multi_turn_messages_concatenate_to_the_prompt_and_alternate_roles():
    items = make_workload("multi-turn", 12, seed=3, turns=3)
    for item in items:
        assert [i for _, ids in item.messages for i in ids] == item.prompt_ids
        roles = [role for role, _ in item.messages]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))
    assert {len(i.messages) for i in items} == {1, 3, 5}
