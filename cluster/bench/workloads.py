"""Seeded workloads for the load generator of `omniray bench serve`.

A benchmark is only comparable across runs, servers and proxy settings if every
run sends the same requests, so each workload here is a pure function of its
arguments and seed: prompts are token-id lists (no tokenizer needed), output
lengths are exact (the client sends `ignore_eos`), and the prefix structure is
explicit, so `expected_prefix_hits` can say how many KV blocks a perfect prefix
cache would reuse and a run's measured hit rate can be judged against it
(`ideal_hit_rate`).

Specs:
- `random`: independent prompts, nothing shared.
- `shared-prefix`: a few system prompts, each request one of them plus its own question.
- `multi-turn`: chats whose every turn resends the whole history.
- `trace:PATH`: replay a Mooncake JSONL trace (hash ids of 512-token blocks
  become reproducible blocks of `block_tokens` token ids; lengths scale alike;
  arrival times are the trace's times `time_scale` wall seconds per second, the
  emulator's `time_scale`, so one knob slows a whole experiment down alike;
  `speedup` replays the trace that many times as fast in device time: the
  offered load, for a cluster smaller than the trace's).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in the original Mooncake traces


@dataclass(frozen=True)
class WorkItem:
    """One request of a workload."""

    arrival_s: float  # send time offset from the run's start, seconds (0.0 = as fast as the concurrency allows)
    prompt_ids: list[int]  # the prompt as token ids (sent as a token-id prompt to /v1/completions)
    max_tokens: int  # output length to request (the client sends ignore_eos so it is exact)
    group: str = ""  # what it shares with others: "prefix-3", "conv-7", "" for none
    # multi-turn: the prompt as chat messages, ((role, ids), ...) alternating user/assistant, whose
    # concatenation is prompt_ids; a chat-mode client sends these instead (empty: not a chat)
    messages: tuple = ()


def make_workload(spec: str, num_requests: int = 100, *, seed: int = 0, token_range: tuple[int, int] = (16, 512),
                  input_len: int = 128, output_len: int = 32, block_tokens: int = 16, time_scale: float = 1.0,
                  speedup: float = 1.0,
                  max_requests: int | None = None, num_prefixes: int = 4, prefix_len: int = 96,
                  turns: int = 4) -> list[WorkItem]:
    """spec: "random" | "shared-prefix" | "multi-turn" | "trace:PATH".

    Synthetic specs make `num_requests` items with lengths around `input_len` /
    `output_len`; `trace:PATH` replays (at most `max_requests` lines of) a
    Mooncake trace with `block_tokens` tokens per hash id and arrival times
    multiplied by `time_scale` (wall seconds per trace second) and divided by `speedup` (the
    replay's rate against the trace's). Token ids are drawn from [token_range[0], token_range[1]).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"workload spec must be a non-empty string, got {spec!r}")
    low, high = _token_range(token_range)
    _positive_int("block_tokens", block_tokens)
    if spec.startswith("trace:"):
        path = spec[len("trace:"):]
        if not path:
            raise ValueError("workload spec 'trace:PATH' needs a path after 'trace:'")
        for name, value in (("time_scale", time_scale), ("speedup", speedup)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if max_requests is not None:
            _positive_int("max_requests", max_requests)
        return _trace(Path(path), seed, low, high, block_tokens, time_scale / speedup, max_requests)
    if spec not in ("random", "shared-prefix", "multi-turn"):
        raise ValueError(f"unknown workload spec {spec!r}: expected random, shared-prefix, multi-turn or trace:PATH")
    _positive_int("num_requests", num_requests)
    _positive_int("input_len", input_len)
    _positive_int("output_len", output_len)
    rng = random.Random(f"omniray-workload:{spec}:{seed}")
    if spec == "random":
        return [WorkItem(0.0, _tokens(rng, _around(rng, input_len), low, high), _around(rng, output_len))
                for _ in range(num_requests)]
    if spec == "shared-prefix":
        _positive_int("num_prefixes", num_prefixes)
        _positive_int("prefix_len", prefix_len)
        return _shared_prefix(rng, num_requests, low, high, input_len, output_len, num_prefixes, prefix_len)
    _positive_int("turns", turns)
    return _multi_turn(rng, num_requests, low, high, input_len, output_len, turns)


def expected_prefix_hits(items: list[WorkItem], block_tokens: int, reusable: bool = False) -> int:
    """Full blocks of each prompt whose whole prefix chain (every token from the prompt's start through the end of
    that block) already appeared, as a full block at the same position, in an EARLIER item's prompt (list order).
    This is how many KV blocks a perfect prefix cache of unbounded size would reuse. `reusable`: count only each
    prompt's first (len - 1) // block_tokens blocks, as an engine does (it computes at least the prompt's last
    token, to sample the next one), though every full block still enters the cache."""
    _positive_int("block_tokens", block_tokens)
    # A trie of full blocks: node id of (parent node id, block tokens). A node stands for a whole prefix chain.
    nodes: dict[tuple[int, tuple[int, ...]], int] = {}
    hits = 0
    for item in items:
        parent, ids = -1, item.prompt_ids
        countable = (len(ids) - 1) // block_tokens if reusable else len(ids)
        for k, start in enumerate(range(0, len(ids) - block_tokens + 1, block_tokens)):
            key = (parent, tuple(ids[start:start + block_tokens]))
            node = nodes.get(key)
            if node is None:  # nodes added while walking this item have new parents: no self-hits
                node = nodes[key] = len(nodes)
            elif k < countable:
                hits += 1
            parent = node
    return hits


def ideal_hit_rate(items: list[WorkItem], block_size: int) -> float | None:
    """The share of prompt tokens an unbounded prefix cache of `block_size`-token
    blocks could serve over the workload, in order: the ceiling a run's measured KV
    hit rate is judged against (None for a workload without prompt tokens)."""
    total = sum(len(item.prompt_ids) for item in items)
    return expected_prefix_hits(items, block_size, reusable=True) * block_size / total if total else None


# -- synthetic -------------------------------------------------------------------------------------------------


def _shared_prefix(rng: random.Random, n: int, low: int, high: int, input_len: int, output_len: int,
                   num_prefixes: int, prefix_len: int) -> list[WorkItem]:
    """Each request: one of `num_prefixes` system prompts + its own suffix."""
    prefixes = [_tokens(rng, prefix_len, low, high) for _ in range(num_prefixes)]
    suffix_len = max(1, input_len - prefix_len)
    items = []
    for _ in range(n):
        k = rng.randrange(num_prefixes)
        prompt = prefixes[k] + _tokens(rng, _around(rng, suffix_len), low, high)
        items.append(WorkItem(0.0, prompt, _around(rng, output_len), f"prefix-{k}"))
    return items


def _multi_turn(rng: random.Random, n: int, low: int, high: int, input_len: int, output_len: int,
                turns: int) -> list[WorkItem]:
    """Chats: turn t resends turn t-1's prompt + a canned reply of `output_len` tokens + a new user message.

    The first message is ~input_len tokens, follow-ups ~input_len/2. Items go round-robin over the
    conversations (all first turns, then all second turns, ...), so consecutive turns of one chat are far
    apart in the list, then the list is cut to `n`."""
    convs = []
    for _ in range(math.ceil(n / turns)):
        prompt = _tokens(rng, _around(rng, input_len), low, high)
        messages = (("user", tuple(prompt)),)
        history = [(prompt, messages)]
        for _ in range(1, turns):
            reply = _tokens(rng, output_len, low, high)
            user = _tokens(rng, _around(rng, max(1, input_len // 2)), low, high)
            prompt = prompt + reply + user
            messages = (*messages, ("assistant", tuple(reply)), ("user", tuple(user)))
            history.append((prompt, messages))
        convs.append(history)
    items = [WorkItem(0.0, convs[c][t][0], output_len, f"conv-{c}", convs[c][t][1])
             for t in range(turns) for c in range(len(convs))]
    return items[:n]


def _around(rng: random.Random, mean: int) -> int:
    """A length uniform in [0.5 * mean, 1.5 * mean], at least 1."""
    return max(1, rng.randint(mean // 2, mean + mean // 2))


def _tokens(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    return [rng.randrange(low, high) for _ in range(n)]


# -- trace replay ----------------------------------------------------------------------------------------------


def _trace(path: Path, seed: int, low: int, high: int, block_tokens: int, time_scale: float,
           max_requests: int | None) -> list[WorkItem]:
    """Replay a Mooncake JSONL trace, lengths and blocks scaled by block_tokens / 512."""
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    factor = block_tokens / MOONCAKE_BLOCK_TOKENS
    blocks: dict[int, list[int]] = {}  # hash id -> its tokens (same in every request)
    items: list[WorkItem] = []
    first_ts: float | None = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if max_requests is not None and len(items) >= max_requests:
                break
            if not line.strip():
                continue
            ts, n_in, n_out, hash_ids = _parse_line(path, lineno, line)
            if first_ts is None:
                first_ts = ts
            if ts < first_ts:
                raise ValueError(f"{path}:{lineno}: field 'timestamp' ({ts}) is before the first line's ({first_ts})")
            length = max(1, round(n_in * factor))
            prompt: list[int] = []
            for h in hash_ids:
                if len(prompt) >= length:
                    break
                if h not in blocks:
                    blocks[h] = _tokens(random.Random(f"omniray-trace:{seed}:block:{h}"), block_tokens, low, high)
                prompt += blocks[h]
            del prompt[length:]
            if len(prompt) < length:  # more tokens than the hash ids cover: fill with this request's own tokens
                own = random.Random(f"omniray-trace:{seed}:line:{lineno}")
                prompt += _tokens(own, length - len(prompt), low, high)
            arrival = (ts - first_ts) / 1000.0 * time_scale
            items.append(WorkItem(arrival, prompt, max(1, round(n_out * factor))))
    return items


def _parse_line(path: Path, lineno: int, line: str) -> tuple[float, int, int, list[int]]:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    fields = ("timestamp", "input_length", "output_length", "hash_ids")
    missing = [name for name in fields if name not in row] if isinstance(row, dict) else None
    if missing is None:
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")
    ts = row["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise ValueError(f"{where}: field 'timestamp' must be a finite number >= 0 (ms), got {ts!r}")
    lengths = []
    for name in ("input_length", "output_length"):
        v = row[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: field {name!r} must be an integer >= 0, got {v!r}")
        lengths.append(v)
    hash_ids = row["hash_ids"]
    if not isinstance(hash_ids, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in hash_ids):
        raise ValueError(f"{where}: field 'hash_ids' must be a list of integers, got {hash_ids!r}")
    return float(ts), lengths[0], lengths[1], hash_ids


# -- argument checks -------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _token_range(token_range: tuple[int, int]) -> tuple[int, int]:
    try:
        low, high = token_range
    except (TypeError, ValueError):
        raise ValueError(f"token_range must be a (low, high) pair, got {token_range!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (low, high)) or low < 0 or high <= low:
        raise ValueError(f"token_range must be integers with 0 <= low < high, got {token_range!r}")
    return low, high
