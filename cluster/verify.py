"""`omniray verify`: the distributed model must produce exactly the reference's tokens.

For each EP size, an instance of NPU actors generates greedily from fixed
prompts; every token must equal the single-process reference's and every
next-token logit must agree within the dtype's tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.model.reference import build_reference, generate
from actors.model.shared_tensor import fetch_shared
from cluster.config import Manifest
from cluster.launcher import launch_instance, publish_weights
from cluster.proxy.tokens import Tokenizer

PROMPTS = [
    "The NPU holds a shard of the experts.",
    "Hello!",
    "Mixture-of-Experts models route every token to a few experts, and expert parallelism spreads them over devices.",
    "2 + 2 =",
    "Once upon a time",
    "def add(a, b):\n    return a + b",
]

# Max |logit - reference logit|. float64 leaves rounding at ~1e-15; lower
# precisions see batch-dependent matmul rounding (different batch shapes per NPU).
LOGIT_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


@dataclass
class VerifyRow:
    ep: int
    prompts: int
    tokens: int
    mismatched_tokens: int
    max_logit_diff: float
    tolerance: float
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.mismatched_tokens == 0 and self.max_logit_diff <= self.tolerance


def run_verify(manifest: Manifest, ep_sizes: list[int], num_tokens: int, prompts: list[str] | None = None) -> list[VerifyRow]:
    if manifest.compute != "real":
        raise ValueError("compute: verify needs a manifest with compute: real (emulated mode computes no logits)")
    cfg = manifest.model
    tok = Tokenizer.from_file(manifest.tokenizer)
    ids = [tok.encode(p) for p in (prompts or PROMPTS)]
    too_big = [i for p in ids for i in p if i >= cfg.vocab_size]
    if too_big:
        raise ValueError(f"tokenizer: token id {max(too_big)} is outside model.vocab_size {cfg.vocab_size}")
    refs = publish_weights(cfg, manifest.checkpoint)
    reference = build_reference(cfg, fetch_shared(refs))
    expected = generate(reference, ids, num_tokens, keep_logits=True)
    tol = LOGIT_TOLERANCE[cfg.dtype]
    rows = []
    for ep in ep_sizes:
        if cfg.num_experts % ep:
            raise ValueError(f"--ep: {ep} does not divide the model's {cfg.num_experts} experts")
        inst = launch_instance(f"verify-ep{ep}", cfg, ep, "real", manifest.device, refs, backend=manifest.collective_backend)
        try:
            tokens, logits, steps = inst.executor.generate(ids, num_tokens, keep_logits=True)
        finally:
            inst.shutdown()
        mismatched = sum(a != b for got, want in zip(tokens, expected.tokens) for a, b in zip(got, want))
        mismatched += sum(abs(len(got) - len(want)) for got, want in zip(tokens, expected.tokens))
        diff = max(
            (abs(x - y) for got, want in zip(logits, expected.logits) for g, w in zip(got, want) for x, y in zip(g, w.tolist())),
            default=0.0,
        )
        rows.append(VerifyRow(ep, len(ids), sum(map(len, tokens)), mismatched, diff, tol, sum(s.wall_time_s for s in steps)))
    return rows
