"""Regenerate cluster/bench/traces/sample_mooncake.jsonl: a small synthetic trace in the Mooncake format.

Why synthetic: the public Mooncake trace stays out of the repo; tests and demos need a tiny trace with the
same structure. Chats share a system prompt (whole 512-token blocks, like hash id 0 in the real trace), and
every later turn resends its history, so its hash ids extend the full blocks of the previous turn's prompt.
Deterministic for a given seed:

    python scripts/make_sample_trace.py [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

BLOCK = 512  # tokens per hash id
OUT = Path(__file__).resolve().parent.parent / "cluster" / "bench" / "traces" / "sample_mooncake.jsonl"


def make_trace(seed: int = 0, conversations: int = 14, max_turns: int = 5, max_lines: int = 40) -> list[dict]:
    """Rows sorted by timestamp (ms); hash ids numbered in order of first appearance."""
    rng = random.Random(seed)
    system_prompts = [[("sys", s, b) for b in range(rng.randint(1, 2))] for s in range(2)]
    rows = []
    for c in range(conversations):
        system = system_prompts[rng.randrange(len(system_prompts))]
        n_in, keys, t = len(system) * BLOCK, list(system), rng.uniform(0, 60_000)
        for turn in range(rng.randint(1, max_turns)):
            n_in += rng.randint(50, 1500)  # the new user message
            keys = keys + [("conv", c, turn, i) for i in range(math.ceil(n_in / BLOCK) - len(keys))]
            n_out = rng.randint(20, 600)
            rows.append({"t": t, "input_length": n_in, "output_length": n_out, "keys": keys})
            # next turn resends this prompt + the reply: only this prompt's full blocks keep their hash ids
            keys = keys[: n_in // BLOCK]
            n_in += n_out
            t += rng.uniform(5_000, 40_000)
    rows.sort(key=lambda r: r["t"])
    rows = rows[:max_lines]
    ids: dict[tuple, int] = {}
    out = []
    for r in rows:
        hash_ids = [ids.setdefault(k, len(ids)) for k in r["keys"]]
        out.append({"timestamp": round(r["t"] - rows[0]["t"]), "input_length": r["input_length"],
                    "output_length": r["output_length"], "hash_ids": hash_ids})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = make_trace(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} lines to {args.out}")


if __name__ == "__main__":
    main()
