"""The single-process reference: the ground truth every distributed path must match.

`ReferenceModel` holds all experts in one process and generates with a plain
batched loop: prefill every prompt, then one decode step at a time. Nothing
here knows about Ray, NPUs or EP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actors.model.batch import ForwardBatch
from actors.model.config import ModelConfig
from actors.model.kv_store import SequenceKVStore
from actors.model.model import TORCH_DTYPES, MoEModel
from actors.model.moe import LocalExperts
from actors.model.sampler import sample
from actors.protocol import SamplingParams
from actors.model.weights import init_module_


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # generated ids per prompt
    logits: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt, per generated token [V]


def build_reference(cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> MoEModel:
    """The full model, seeded-initialised or loaded from a state dict."""
    model = MoEModel(cfg).to(TORCH_DTYPES[cfg.dtype])
    if state is None:
        init_module_(model, cfg)
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def generate(
    model: MoEModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: set[int] | None = None,
    keep_logits: bool = False,
) -> GenerateOutput:
    """Generate up to max_new_tokens for every prompt (greedy unless params say otherwise)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    params = params or SamplingParams()
    if max_new_tokens <= 0:
        return GenerateOutput([[] for _ in prompts], [[] for _ in prompts] if keep_logits else [])
    stop = stop_token_ids or set()
    cache, experts = SequenceKVStore(), LocalExperts()
    out = GenerateOutput([[] for _ in prompts], [[] for _ in prompts] if keep_logits else [])
    live = {str(i): (list(p), 0) for i, p in enumerate(prompts)}  # seq id -> (new tokens, start position)
    while live:
        batch = ForwardBatch.build([(sid, toks, start) for sid, (toks, start) in live.items()])
        hidden = model(batch, cache, experts)
        logits = model.logits(hidden[batch.last_rows()])
        nxt = {}
        for row, seq in enumerate(batch.slices()):
            i = int(seq.seq_id)
            token = sample(logits[row], params, len(out.tokens[i]))
            out.tokens[i].append(token)
            if keep_logits:
                out.logits[i].append(logits[row].clone())
            if len(out.tokens[i]) < max_new_tokens and token not in stop:
                nxt[seq.seq_id] = ([token], seq.start_pos + seq.length)
            else:
                cache.free(seq.seq_id)
        live = nxt
    return out
