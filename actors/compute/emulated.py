"""Emulated compute: no weights, no math, Ascend-like timing.

The ledger is charged what the weights and KV of the configured shapes would
take; each step sleeps the cost model's time for the chip (scaled by
`time_scale`); the next token is a deterministic stand-in that depends only
on the sequence's last token and position, so any schedule (batching, P/D
split, NPU count) yields the same tokens.

Sampling options, with no logits to apply them to: the stand-in is chosen among
the tokens a step may sample (SeqWork.allowed minus SeqWork.banned) as the
digest modulo their count, so min_tokens and guided decoding hold; penalties,
logit_bias (bans aside), temperature and seeds change nothing. Logprobs are a
stand-in too: the uniform distribution over those tokens (logprob
-log(#sampleable); top N: the chosen token, then the lowest other sampleable
ids), and prompt logprobs the uniform one over the vocabulary (likewise with
the prompt token first)."""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from actors.compute.kv_ledger import KVCharges
from actors.compute.kv_pool import BlockPublisher, block_bytes, blocks_loaded, reserve_pool
from actors.compute.routing_model import pairs_routed, straggler_loads
from actors.cost_model import CostModel, DieBatch, split_dies
from actors.hbm import HBMLedger
from actors.model.config import DTYPE_BYTES, ModelConfig
from actors.protocol import NPUBatch, NPUSpec, NPUStepResult, SeqWork, TokenLogprob, sampleable


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def standin_token(last_token: int, position: int, vocab_size: int) -> int:
    return _digest(f"{last_token}:{position}") % vocab_size


def standin_sample(w: SeqWork, vocab_size: int) -> tuple[int, TokenLogprob | None]:
    """The stand-in token of a sampling work (among the tokens it may sample) and,
    if its params ask, its stand-in logprobs (see the module docstring)."""
    last, position = w.token_ids[-1], w.start_pos + len(w.token_ids)
    mask = sampleable(w.allowed, w.banned, vocab_size)
    if mask is None:
        token, count, lowest = standin_token(last, position, vocab_size), vocab_size, range(vocab_size)
    else:
        ids = np.flatnonzero(mask)
        if not ids.size:
            raise ValueError(f"sequence {w.seq_id}: its allowed bitmask and banned ids exclude every token")
        token, count, lowest = int(ids[_digest(f"{last}:{position}") % ids.size]), int(ids.size), ids
    n = w.params.logprobs
    return token, None if n is None else _uniform(token, count, lowest, n)


def standin_prompt_logprobs(w: SeqWork, vocab_size: int) -> list[TokenLogprob | None]:
    """NPUStepResult.prompt_logprobs of a chunk, uniform over the vocabulary."""
    after, n = w.prompt_targets, w.params.prompt_logprobs
    return [_uniform(t, vocab_size, range(vocab_size), n) for t in after] + [None] * (len(w.token_ids) - len(after))


def _uniform(token: int, count: int, lowest, n: int) -> TokenLogprob:
    """`token`'s logprob under the uniform distribution over `count` tokens, with
    itself and then the lowest others of `lowest` (ascending ids) as the top n."""
    lp = -math.log(count)
    top = [token]
    for t in lowest:
        if len(top) >= n:
            break
        if t != token:
            top.append(int(t))
    return TokenLogprob(token, lp, tuple((t, lp) for t in top[:n]))


def standin_accepts(last_token: int, position: int, rate: float) -> bool:
    """Whether the emulated MTP draft for `position` is accepted: true for a
    deterministic `rate` share of (token, position) pairs."""
    return _digest(f"mtp:{last_token}:{position}") < rate * 2**64


def replicated_bytes(cfg) -> int:
    """The bytes of the part of the model every NPU holds: all but the routed
    experts, the MTP layers' included. The Ascend stacks shard an MTP layer's
    experts over the EP group as a main layer's (CloudMatrix-Infer, Pangu), so
    the emulated ledger does too; real compute's MTP module holds all of its
    experts (actors/model/mtp.py) and charges the tensors it built."""
    return (cfg.parameter_counts().replicated - cfg.mtp_expert_params()) * DTYPE_BYTES[cfg.weight_dtype]


@dataclass(frozen=True)
class EmulatedReplica:
    """The replicated weights of an emulated standby NPU, copied into its HBM while
    it waited (the counterpart of real compute's WarmReplica, which builds them):
    joining an instance of the same model then copies only its experts."""

    model: ModelConfig
    load_s: float  # the modelled seconds the copy took, below serving priority

    @classmethod
    def build(cls, spec: NPUSpec, cost: CostModel) -> EmulatedReplica:
        """Sleep the modelled copy (scaled by time_scale) and return the replica."""
        load_s = cost.load_time(replicated_bytes(spec.model))
        time.sleep(load_s * spec.time_scale)
        return cls(spec.model, load_s)

    def fits(self, spec: NPUSpec) -> bool:
        return spec.model == self.model


class EmulatedCompute:
    def __init__(self, spec: NPUSpec, ledger: HBMLedger, cost: CostModel):
        self.spec, self.ledger, self.cost = spec, ledger, cost
        self.held = spec.expert_map.held_by(spec.rank)
        self.retained: dict[int, list[int]] = {}  # per layer, what the last switch dropped (spec.retain_dropped)
        self.kv = KVCharges(ledger, spec.model.kv_bytes_per_token())
        self.publisher = BlockPublisher(spec)
        self.num_blocks = 0
        self.load_s = 0.0  # modelled seconds of the last load_weights
        self.kv_blocks_loaded: Counter[str] = Counter()  # by link (kv_pool.blocks_loaded)
        self.routed_tokens = 0  # the tokens its steps ran: the routing model spreads their pairs (expert_load)
        self.moe_loads = self._moe_loads()

    def load_weights(self, weight_refs: dict | None, warm: EmulatedReplica | None = None) -> None:
        """Charge the weights and reserve the KV pool, and sleep the modelled copy of
        the weights from host memory into HBM (scaled by time_scale): what a real NPU
        spends when it starts or joins an instance. An NPU that waited as a standby
        copied the replicated part already (`warm`, as real compute's WarmReplica
        built it): it copies only its experts. Records the copy as `load_s`."""
        t0 = time.perf_counter()
        replicated = replicated_bytes(self.spec.model)
        self.ledger.charge("weights", "replicated", replicated)
        self._charge_experts()
        self.num_blocks = reserve_pool(self.spec, self.ledger)
        copied = self.ledger.used_by("weights") - (replicated if warm is not None and warm.fits(self.spec) else 0)
        self.load_s = self.cost.load_time(copied)
        remaining = self.load_s * self.spec.time_scale - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)

    def release(self) -> EmulatedReplica:
        """What a standby keeps of this NPU once its instance released it: the
        replicated weights, still in its HBM (its experts go with this compute)."""
        return EmulatedReplica(self.spec.model, 0.0)

    def _expert_bytes(self) -> int:
        cfg = self.spec.model
        return cfg.expert_params() * DTYPE_BYTES[cfg.weight_dtype]

    def _experts_bytes(self, count: int) -> int:
        """The bytes one device holds of `count` of the actor's experts: all of them, or
        its share when the actor stands for more dies than a device has (dies_per_actor)."""
        per_actor = self.spec.dies_per_actor or self.cost.dies
        return -(-count * self.cost.dies // max(per_actor, self.cost.dies)) * self._expert_bytes()

    def _charge_experts(self) -> None:
        self.ledger.release_category("retained")
        for layer, experts in self.held.items():
            key = f"layer{layer}.experts"
            if self.ledger.charged("weights", key) is not None:
                self.ledger.release("weights", key)
            self.ledger.charge("weights", key, self._experts_bytes(len(experts)))
        if self.spec.model.num_mtp_layers and self.held:  # each MTP layer's experts sharded as a main layer's
            share = round(sum(map(len, self.held.values())) / len(self.held))  # experts a main layer holds here
            key = "mtp.experts"
            if self.ledger.charged("weights", key) is not None:
                self.ledger.release("weights", key)
            self.ledger.charge("weights", key, self._experts_bytes(self.spec.model.num_mtp_layers * share))
        if self.retained:
            self.ledger.charge("retained", "experts", self._experts_bytes(sum(map(len, self.retained.values()))))

    # ---- expert remapping (Omni Placement, elastic EP) ------------------------------------
    def prepare(self, spec: NPUSpec) -> int:
        """Take the experts `spec` adds here from a peer NPU: sleeps the modelled
        device-to-device copy (scaled by time_scale). Returns the bytes moved."""
        have = {layer: [*experts, *self.retained.get(layer, ())] for layer, experts in self.held.items()}
        gained = spec.expert_map.gained(spec.rank, have)
        moved = self._experts_bytes(sum(len(experts) for experts in gained.values()))
        if moved:
            time.sleep(self.cost.transfer_time(moved, intra_node=True) * self.spec.time_scale)
        return moved

    def remap(self, spec: NPUSpec, group=None) -> None:
        """Switch to `spec`'s experts; the ones it drops are kept aside if
        `spec.retain_dropped` (they stay charged, as "retained")."""
        held = spec.expert_map.held_by(spec.rank)
        self.retained = {}
        if spec.retain_dropped:
            for layer, experts in self.held.items():
                keep = set(held.get(layer, ()))
                if dropped := [e for e in experts if e not in keep]:
                    self.retained[layer] = dropped
        self.spec, self.held = spec, held
        self.moe_loads = self._moe_loads()
        self._charge_experts()

    def step(self, batch: NPUBatch) -> NPUStepResult:
        t0 = time.perf_counter()
        cfg = self.spec.model
        for w in batch.seqs:
            if w.block_table is None:
                self.kv.charge(w.seq_id, w.start_pos, len(w.token_ids))
        loaded = blocks_loaded(batch)
        self.kv_blocks_loaded.update(loaded)
        load_device_s = self._load_time(loaded)
        device_s = load_device_s
        # the loads come first in the modelled step, and the sleep below covers them
        load_s = load_device_s * self.spec.time_scale + (time.perf_counter() - t0) if loaded else 0.0
        tokens, accepted, drafts, logprobs, prompt_lps = {}, {}, {}, {}, {}
        for w in batch.seqs:
            if w.num_drafts:  # the draft's value is not modelled, only whether it is accepted
                last, pos = w.token_ids[-1 - w.num_drafts], w.start_pos + len(w.token_ids) - w.num_drafts
                accepted[w.seq_id] = []
                while len(accepted[w.seq_id]) < w.num_drafts and standin_accepts(last, pos, self.spec.mtp_acceptance_rate):
                    last = standin_token(last, pos, cfg.vocab_size)
                    accepted[w.seq_id].append(last)
                    pos += 1
                tokens[w.seq_id] = standin_token(last, pos, cfg.vocab_size)
            elif w.sample:
                # forks (n > 1) draw the same stand-in: it depends on the token and position only
                for seq_id, params in [(w.seq_id, w.params), *w.forks]:
                    tokens[seq_id], lp = standin_sample(w, cfg.vocab_size)
                    if lp is not None and params.logprobs is not None:
                        logprobs[seq_id] = lp
            if w.params.prompt_logprobs is not None:
                prompt_lps[w.seq_id] = standin_prompt_logprobs(w, cfg.vocab_size)
            if w.propose and w.seq_id in tokens:
                drafts[w.seq_id] = tokens[w.seq_id]  # a placeholder: see above
        device_s += self.step_device_s(batch, drafts)
        self.routed_tokens += sum(len(w.token_ids) for w in batch.seqs)
        remaining = device_s * self.spec.time_scale - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)
        # the host's own work outlasted the modelled step: it lasted the host's time, not the chip's
        # (an NPU with nothing to do this step models none: it waits for the others, as the chip would)
        overrun = self.spec.time_scale > 0 and remaining < 0 and bool(batch.seqs)
        # no tensors: a block is a marker; the index still charges its real size
        saved = [(w.seq_id, h) for w in batch.seqs for _, h in w.save_blocks]
        exported = self.publisher.publish(saved, np.zeros((len(saved), 0), dtype=np.uint8)) if saved else {}
        return NPUStepResult(
            self.spec.rank, tokens, None, device_s, time.perf_counter() - t0, exported, accepted, drafts,
            overrun, load_s, logprobs, prompt_lps,
        )

    def _moe_loads(self) -> list[float] | None:
        """Per MoE layer, the most loaded rank's routed load over the balanced share
        under this map (actors.compute.routing_model): the layer's combine waits for
        it. None when every layer is balanced."""
        cfg = self.spec.model
        if not cfg.moe_layers or self.spec.ep_size <= 1:
            return None
        loads = straggler_loads(cfg, self.spec.expert_map, self.spec.expert_skew)
        return None if all(abs(f - 1.0) < 1e-9 for f in loads) else loads

    def step_device_s(self, batch: NPUBatch, drafts: dict) -> float:
        """The cost model's time for this step: the device's batch split over its dies
        (the slowest die decides), the MTP layer over the rows that proposed a draft."""
        dies, per_actor = self.cost.dies, self.spec.dies_per_actor or self.cost.dies
        ep_dies = self.spec.ep_dies(dies)
        held = len(next(iter(self.held.values()), []))
        local = max(1, -(-held // per_actor))  # each die holds its share of the actor's experts
        rows = [(w.start_pos, len(w.token_ids), w.decode_row, w.seq_id in drafts) for w in batch.seqs]
        slowest = 0.0
        for part in split_dies(rows, dies):
            main = DieBatch.of((start, n, decode) for start, n, decode, _ in part)
            mtp = DieBatch.of((start + n, 1, True) for start, n, _, proposes in part if proposes)
            cost = self.cost.step_time(self.spec.model, main, ep_dies, local, mtp, self.moe_loads)
            slowest = max(slowest, cost.total_s)
        return slowest

    def _load_time(self, loaded: dict[str, int]) -> float:
        """The modelled copy of KV blocks loaded per link (kv_pool.blocks_loaded):
        HCCS within the node, else RoCE; 0 when none."""
        return sum(self.cost.transfer_time(n * block_bytes(self.spec), intra_node=link == "intra_node")
                   for link, n in loaded.items())

    def free(self, seq_id: str) -> None:
        self.kv.release(seq_id)

    def expert_load(self) -> dict[int, list[int]]:
        """The pairs this NPU's tokens routed per expert and layer, as a real NPU's routers
        count them: the routing model's popularity does not change between steps, so
        the tokens' total says it all (nothing is counted on the step's path)."""
        if not self.routed_tokens:
            return {}
        cfg = self.spec.model
        return {layer: np.rint(pairs_routed(cfg, layer, self.routed_tokens, self.spec.expert_skew)).astype(int).tolist()
                for layer in cfg.moe_layers}
