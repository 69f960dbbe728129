"""Sampling: greedy, or seeded temperature / top-k / top-p.

A seeded draw uses a generator seeded by (seed, index of the token in the
output), never a shared RNG stream, so a sequence samples the same tokens
whatever it is batched with and whichever NPU runs it.
"""

from __future__ import annotations

import torch

from actors.protocol import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, output_index: int) -> int:
    """Next token from one row of logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.double() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_p, 0) - sorted_p >= params.top_p  # drop once the mass before reaches top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()  # unseeded requests are not reproducible, as in OpenAI's API
    else:
        gen.manual_seed((params.seed * 1_000_003 + output_index) % (2**63))
    return int(torch.multinomial(probs, 1, generator=gen).item())
