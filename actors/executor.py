"""InstanceExecutor: one forward step across every NPU of an EP instance.

Attention is data-parallel, so each sequence is pinned to one NPU (the one
that holds its KV cache), chosen as the NPU with the fewest sequences when it
first appears. Every NPU gets a batch every step, possibly empty, because the
MoE all-to-all needs all ranks in lock step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray

from actors.protocol import NPUBatch, NPUStepResult, SeqWork


@dataclass
class StepOutput:
    tokens: dict[str, int]
    logits: dict[str, list[float]]
    device_time_s: float  # the slowest NPU's emulated device time: the step's time on the chip
    wall_time_s: float
    exported: dict[str, list] = field(default_factory=dict)  # seq id -> [[ref]] of blocks it saved
    accepted: dict[str, list[int]] = field(default_factory=dict)  # MTP drafts accepted, per sequence
    drafts: dict[str, int] = field(default_factory=dict)  # MTP drafts for the next step
    overruns: int = 0  # NPUs whose host time exceeded the modelled time (emulated)
    load_s: list[float] = field(default_factory=list)  # per rank: wall seconds until its KV loads were in place
    logprobs: dict = field(default_factory=dict)  # seq id -> TokenLogprob of its sampled token (when asked)
    prompt_logprobs: dict = field(default_factory=dict)  # seq id -> per row of its chunk (when asked)
    comm_s: float = 0.0  # the NPUs' mean wall seconds in EP all-to-alls this step


class InstanceExecutor:
    def __init__(self, npus: list, switch_to: list | None = None):
        """`switch_to`: a spec per NPU that its next batch carries (the switch of a
        resize or remap, applied by each NPU as that step starts)."""
        self.npus = npus
        self.owner: dict[str, int] = {}
        self._seqs_on = [0] * len(npus)
        self._step = 0
        self._switch_to = switch_to

    @property
    def ep_size(self) -> int:
        return len(self.npus)

    def rank_of(self, seq_id: str) -> int:
        if seq_id not in self.owner:
            rank = min(range(len(self.npus)), key=lambda r: (self._seqs_on[r], r))
            self.owner[seq_id] = rank
            self._seqs_on[rank] += 1
        return self.owner[seq_id]

    def submit(self, works: list[SeqWork], return_logits: bool = False, ranks: list[int] | None = None) -> list[ray.ObjectRef]:
        """Send one step to every NPU; `ranks` pins each work to an NPU (the
        engine's scheduler chose them), else sequences are placed here."""
        per_rank: list[list[SeqWork]] = [[] for _ in self.npus]
        for i, w in enumerate(works):
            per_rank[self.rank_of(w.seq_id) if ranks is None else ranks[i]].append(w)
        self._step += 1
        specs, self._switch_to = self._switch_to or [None] * len(self.npus), None
        max_rows = max(sum(len(w.token_ids) for w in seqs) for seqs in per_rank)
        return [npu.step.remote(NPUBatch(self._step, seqs, return_logits, spec, max_rows))
                for npu, seqs, spec in zip(self.npus, per_rank, specs)]

    @staticmethod
    def merge(results: list[NPUStepResult]) -> StepOutput:
        tokens, logits, exported, accepted, drafts, logprobs, prompt_logprobs = {}, {}, {}, {}, {}, {}, {}
        for r in results:
            logprobs.update(r.logprobs)
            prompt_logprobs.update(r.prompt_logprobs)
            tokens.update(r.tokens)
            logits.update(r.logits or {})
            exported.update(r.exported)
            accepted.update(r.accepted)
            drafts.update(r.drafts)
        return StepOutput(
            tokens,
            logits,
            max(r.device_time_s for r in results),
            max(r.wall_time_s for r in results),
            exported,
            accepted,
            drafts,
            sum(r.overrun for r in results),
            [r.load_s for r in results],
            logprobs,
            prompt_logprobs,
            sum(r.comm_s for r in results) / len(results),
        )

    def step(self, works: list[SeqWork], return_logits: bool = False) -> StepOutput:
        return self.merge(ray.get(self.submit(works, return_logits)))

    def free(self, seq_ids: list[str]) -> None:
        by_rank: dict[int, list[str]] = {}
        for sid in seq_ids:
            rank = self.owner.pop(sid, None)
            if rank is not None:
                self._seqs_on[rank] -= 1
                by_rank.setdefault(rank, []).append(sid)
        ray.get([self.npus[r].free.remote(ids) for r, ids in by_rank.items()])

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, params=None, keep_logits: bool = False
    ) -> tuple[list[list[int]], list[list[list[float]]], list[StepOutput]]:
        """Static-batch generation (prefill all prompts in one step, then decode
        step by step): the distributed twin of actors.model.reference.generate,
        used by `omniray verify` and `omniray bench ep`. Serving uses the engine."""
        from actors.protocol import SamplingParams

        params = params or SamplingParams()
        ids = [f"gen{self._step}-{i}" for i in range(len(prompts))]
        tokens: list[list[int]] = [[] for _ in prompts]
        logits: list[list[list[float]]] = [[] for _ in prompts]
        steps: list[StepOutput] = []
        works = [SeqWork(sid, list(p), 0, True, params, 0) for sid, p in zip(ids, prompts)]
        pos = [len(p) for p in prompts]
        while works:
            out = self.step(works, return_logits=keep_logits)
            steps.append(out)
            nxt = []
            for w in works:
                i = ids.index(w.seq_id)
                tokens[i].append(out.tokens[w.seq_id])
                if keep_logits:
                    logits[i].append(out.logits[w.seq_id])
                if len(tokens[i]) < max_new_tokens:
                    nxt.append(SeqWork(w.seq_id, [tokens[i][-1]], pos[i], True, params, len(tokens[i])))
                    pos[i] += 1
            works = nxt
        self.free(ids)
        return tokens, logits, steps
