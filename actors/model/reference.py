"""The single-process reference: the ground truth every distributed path must match.

`ReferenceModel` holds all experts in one process and generates with a plain
batched loop: prefill every prompt, then one decode step at a time. Nothing
here knows about Ray, NPUs or EP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from actors.model.batch import ForwardBatch
from actors.model.config import ModelConfig
from actors.model.kv_store import SequenceKVStore
from actors.model.model import TORCH_DTYPES, MoEModel
from actors.model.moe import LocalExperts
from actors.model.sampler import RowContext, prompt_logprobs, sample_rows
from actors.protocol import SamplingParams, SeqWork, TokenLogprob
from actors.model.weights import init_module_


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # generated ids per prompt
    logits: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt, per generated token [V]
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per prompt, per generated token (params.logprobs)
    # per prompt, per prompt token, None for the first (params.prompt_logprobs; else empty)
    prompt_logprobs: list[list[TokenLogprob | None]] = field(default_factory=list)


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
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_token_ids: set[int] | None = None,
    keep_logits: bool = False,
    eos_token_id: int | None = None,
) -> GenerateOutput:
    """Generate up to max_new_tokens for every prompt (greedy unless params say otherwise).

    `params`: one for all prompts or one per prompt. A stop token or `eos_token_id`
    ends a sequence (and is emitted); both are banned until the output has
    params.min_tokens tokens. Penalties read the sequence's own prompt and output;
    logprobs and prompt logprobs are the sampler's (actors.model.sampler), the
    latter from the prefill's own forward."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    per = [params or SamplingParams()] * len(prompts) if not isinstance(params, Sequence) else list(params)
    if len(per) != len(prompts):
        raise ValueError(f"params: one for all prompts or one per prompt ({len(per)} for {len(prompts)})")
    out = GenerateOutput([[] for _ in prompts], [[] for _ in prompts] if keep_logits else [],
                         [[] for _ in prompts], [[] for _ in prompts])
    if max_new_tokens <= 0:
        return out
    stop = set(stop_token_ids or ()) | ({eos_token_id} if eos_token_id is not None else set())
    cache, experts = SequenceKVStore(), LocalExperts()
    live = {str(i): (list(p), 0) for i, p in enumerate(prompts)}  # seq id -> (new tokens, start position)
    prefill = True
    while live:
        batch = ForwardBatch.build([(sid, toks, start) for sid, (toks, start) in live.items()])
        hidden = model(batch, cache, experts)
        if prefill:
            prefill = False
            works = [SeqWork(str(i), p, 0, params=per[i]) for i, p in enumerate(prompts)]
            for sid, lps in prompt_logprobs(model.logits, hidden, batch, works).items():
                out.prompt_logprobs[int(sid)] = [None] + lps[:-1]
        logits = model.logits(hidden[batch.last_rows()])
        seqs = [int(seq.seq_id) for seq in batch.slices()]
        tokens, logprobs = sample_rows(logits, [
            RowContext(per[i], len(out.tokens[i]), out.tokens[i], prompts[i],
                       tuple(stop) if len(out.tokens[i]) < per[i].min_tokens else ())
            for i in seqs])
        nxt = {}
        for row, (seq, i, token) in enumerate(zip(batch.slices(), seqs, tokens)):
            out.tokens[i].append(token)
            if logprobs[row] is not None:
                out.logprobs[i].append(logprobs[row])
            if keep_logits:
                out.logits[i].append(logits[row].clone())
            if len(out.tokens[i]) < max_new_tokens and token not in stop:
                nxt[seq.seq_id] = ([token], seq.start_pos + seq.length)
            else:
                cache.free(seq.seq_id)
        live = nxt
    return out
