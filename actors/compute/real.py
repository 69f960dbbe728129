"""Real compute: the NPU runs its share of the model in torch.

It holds the replicated tensors (embedding, attention, dense FFN, shared
experts, routers, LM head) and its routed experts; the other experts are
reached through the EP group (actors.ep.EPExperts)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import numpy as np
import ray
import torch

from actors.compute.kv_ledger import KVCharges
from actors.compute.kv_pool import BlockPublisher, blocks_loaded, pool_blocks, reserve_pool
from actors.compute.speculative import propose_drafts, verify_drafts
from actors.cost_model import CostModel, DieBatch
from actors.ep import EPExperts
from actors.hbm import HBMLedger
from actors.model.batch import ForwardBatch
from actors.model.kv_store import SequenceKVStore
from actors.model.model import TORCH_DTYPES, MoEModel
from actors.model.layers import SwiGLU
from actors.model.moe import LocalExperts
from actors.model.paged_kv import PagedKVStore
from actors.model.sampler import RowContext, prompt_logprobs, sample_rows
from actors.model.shared_tensor import fetch_shared
from actors.model.weights import expert_of, shard_names
from actors.protocol import NPUBatch, NPUSpec, NPUStepResult


class RealCompute:
    def __init__(self, spec: NPUSpec, ledger: HBMLedger, cost: CostModel, group=None):
        self.spec, self.ledger, self.cost = spec, ledger, cost
        cfg = spec.model
        self.held = spec.expert_map.held_by(spec.rank)
        self.model: MoEModel | None = None
        self.cache = SequenceKVStore()  # scratch cache of the static-batch path (verify, bench ep)
        self.paged: PagedKVStore | None = None  # the engine's paged cache
        self.publisher = BlockPublisher(spec)
        self.kv_blocks_loaded: Counter[str] = Counter()  # by link (kv_pool.blocks_loaded)
        self.kv = KVCharges(ledger, cfg.kv_bytes_per_token())
        self.weight_refs: dict | None = None  # kept: experts moved here later load from the object store
        self.staged: dict[tuple[int, int], SwiGLU] = {}  # (layer, expert) modules built for the next map, not in use yet
        self.retained: dict[tuple[int, int], SwiGLU] = {}  # what the last switch dropped (spec.retain_dropped)
        self.tensors_fetched = 0  # at load, from the object store
        self.replicated_bytes = 0
        self.experts: LocalExperts | EPExperts | None = None
        self.experts = self._executor(group)

    def _executor(self, group):
        spec = self.spec
        if spec.ep_size == 1:
            return LocalExperts()
        if isinstance(self.experts, EPExperts):
            return self.experts.on(spec.expert_map, spec.rank, spec.model.num_experts, group)
        return EPExperts(spec.expert_map, spec.rank, spec.model.num_experts, group)

    def load_weights(self, weight_refs: dict | None, warm: "WarmReplica | None" = None) -> None:
        """This NPU's shard from the object store: the replicated part (`warm`: built
        while this NPU waited as a standby, else now), then its own experts."""
        if not weight_refs:
            raise ValueError(f"NPU {self.spec.name}: real compute needs weights (got none)")
        self.weight_refs = weight_refs
        if warm is None or not warm.fits(self.spec):
            warm = WarmReplica.build(self.spec, weight_refs)
            self.tensors_fetched = warm.fetched
        self.model, self.replicated_bytes = warm.model, warm.nbytes
        self.ledger.charge("weights", "replicated", warm.nbytes)
        self.tensors_fetched += self._stage_experts(self.spec)[1]
        self.remap(self.spec, None)  # swaps its experts in and charges them (the NPU joins its group after)
        self.num_blocks = reserve_pool(self.spec, self.ledger)
        self.paged = warm.paged

    def _charge_experts(self) -> None:
        self.ledger.release_category("retained")
        for moe in self.model.moe_layers():
            key = f"layer{moe.layer}.experts"
            if self.ledger.charged("weights", key) is not None:
                self.ledger.release("weights", key)
            self.ledger.charge("weights", key, sum(_nbytes(p) for p in moe.experts.parameters()))
        if self.retained:
            self.ledger.charge("retained", "experts",
                               sum(_nbytes(p) for m in self.retained.values() for p in m.parameters()))

    # ---- expert remapping (Omni Placement, elastic EP) ------------------------------------
    def prepare(self, spec: NPUSpec) -> int:
        """Fetch, ahead of the switch, the expert tensors `spec` assigns here that this
        NPU lacks (from the object store, while serving goes on) and build their
        modules, so that the switch only swaps them in. Returns bytes staged."""
        return self._stage_experts(spec)[0]

    def _stage_experts(self, spec: NPUSpec) -> tuple[int, int]:
        """prepare's work; returns the bytes and the number of tensors it fetched."""
        have = {m.layer: set(map(int, m.experts.keys())) for m in self.model.moe_layers()}
        for layer, e in self.retained:
            have[layer].add(e)
        missing = spec.expert_map.gained(spec.rank, have)
        names = [n for n in shard_names(self.weight_refs.keys(), missing) if expert_of(n) is not None]
        tensors = fetch_shared(self.weight_refs, names)
        dtype = TORCH_DTYPES[spec.model.dtype]
        self.staged = {}
        for layer, experts in missing.items():
            for e in experts:
                prefix = f"layers.{layer}.mlp.experts.{e}."
                self.staged[(layer, e)] = _expert_module(spec.model, dtype, {
                    n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        return sum(_nbytes(t) for t in tensors.values()), len(tensors)

    def remap(self, spec: NPUSpec, group) -> None:
        """Switch to `spec`'s expert map (between two steps): drop the experts no longer
        held (kept aside if `spec.retain_dropped`), swap in the staged or retained
        ones, recharge the ledger, and route by the new map."""
        want = spec.expert_map.held_by(spec.rank)
        dropped = {}
        for moe in self.model.moe_layers():
            keep = set(want.get(moe.layer, ()))
            for key in [k for k in moe.experts.keys() if int(k) not in keep]:
                dropped[(moe.layer, int(key))] = moe.experts[key]
                del moe.experts[key]
            for e in sorted(keep - set(map(int, moe.experts.keys()))):
                ready = self.staged if (moe.layer, e) in self.staged else self.retained
                if (moe.layer, e) not in ready:
                    raise RuntimeError(f"NPU {self.spec.name}: expert {e} of layer {moe.layer} was not staged (prepare)")
                moe.experts[str(e)] = ready[(moe.layer, e)]
        self.staged = {}
        self.retained = dropped if spec.retain_dropped else {}
        self.spec, self.held = spec, want
        self._charge_experts()
        self.experts = self._executor(group)

    def release(self) -> "WarmReplica":
        """What a standby keeps of this NPU once its instance released it: the
        replicated model (its experts and their load counts dropped) and the KV
        pool (whose blocks the next engine overwrites before it reads them)."""
        for moe in self.model.moe_layers():
            moe.experts.clear()
            moe.load.zero_()
        self.retained = {}
        return WarmReplica(self.spec, self.model, self.paged, self.replicated_bytes, 0)

    def export_blocks(self, blocks: list[int]) -> np.ndarray:
        """A sequence's KV blocks, moving to another NPU, as one array (one object)."""
        return self.paged.export_stacked(blocks)

    def _cache_for(self, batch: NPUBatch):
        """The paged store, bound to this step's block tables, or the scratch store."""
        if not any(w.block_table is not None for w in batch.seqs):
            for w in batch.seqs:
                self.kv.charge(w.seq_id, w.start_pos, len(w.token_ids))
            return self.cache
        self.paged.unbind_all()
        copies = [c for w in batch.seqs for c in w.copy_blocks]
        if copies:  # forks' copy on write, before anything writes this step
            self.paged.import_blocks([d for _, d in copies], self.paged.export_stacked([s for s, _ in copies]))
        # a block's source: [ref] of the block, or [ref, i]: row i of a migrated sequence's blocks
        loads = [(block, src) for w in batch.seqs for block, src in w.load_blocks]
        self.kv_blocks_loaded.update(blocks_loaded(batch))
        refs = list(dict.fromkeys(src[0] for _, src in loads))
        got = dict(zip(refs, ray.get(refs)))  # one fetch for all
        self.paged.import_blocks([b for b, _ in loads],
                                 [got[src[0]] if len(src) == 1 else got[src[0]][src[1]] for _, src in loads])
        for w in batch.seqs:
            self.paged.bind(w.seq_id, w.block_table, w.start_pos)
        return self.paged

    def _save(self, batch: NPUBatch) -> dict[str, list]:
        saves = [(w.seq_id, h, b) for w in batch.seqs for b, h in w.save_blocks]
        if not saves:
            return {}
        data = self.paged.export_stacked([b for _, _, b in saves])
        return self.publisher.publish([(seq_id, h) for seq_id, h, _ in saves], data)

    @torch.no_grad()
    def step(self, batch: NPUBatch) -> NPUStepResult:
        t0 = time.perf_counter()
        fb = ForwardBatch.build([(w.seq_id, w.token_ids, w.start_pos) for w in batch.seqs])
        cache = self._cache_for(batch)
        load_s = time.perf_counter() - t0 if any(w.load_blocks for w in batch.seqs) else 0.0
        comm0, self.experts.max_rows = self.experts.comm_s, batch.max_rows
        residual = self.model.residual(fb, cache, self.experts)
        hidden = self.model.norm(residual)
        tokens, accepted, logits_out = {}, {}, {} if batch.return_logits else None
        for seq, w in zip(fb.slices(), batch.seqs):
            if w.num_drafts:
                accepted[w.seq_id], tokens[w.seq_id] = verify_drafts(self.model, hidden, seq, w)
        sampling = [i for i, w in enumerate(batch.seqs) if w.sample and not w.num_drafts]
        logprobs = {}
        if sampling:
            logits = self.model.logits(hidden[fb.last_rows()[sampling]])
            rows = [RowContext.of(batch.seqs[i]) for i in sampling]
            ids = [batch.seqs[i].seq_id for i in sampling]
            src = list(range(len(sampling)))  # the logits row each draw is from (forks: their parent's)
            for row, i in enumerate(sampling):
                for fork_id, params in batch.seqs[i].forks:
                    rows.append(replace(rows[row], params=params))
                    ids.append(fork_id)
                    src.append(row)
            sampled, sampled_lps = sample_rows(logits[src] if len(src) > len(sampling) else logits, rows)
            for seq_id, token, lp in zip(ids, sampled, sampled_lps):
                tokens[seq_id] = token
                if lp is not None:
                    logprobs[seq_id] = lp
            if logits_out is not None:
                for row, i in enumerate(sampling):
                    logits_out[batch.seqs[i].seq_id] = logits[row].tolist()
        prompt_lps = prompt_logprobs(self.model.logits, hidden, fb, batch.seqs)
        drafts = propose_drafts(self.model, residual, fb, batch.seqs, tokens, accepted, cache) if self.model.mtp else {}
        # what the step would take on the chip (one die per actor in real compute)
        device_s = self.cost.step_time(
            self.spec.model,
            DieBatch.of((w.start_pos, len(w.token_ids), w.decode_row) for w in batch.seqs),
            self.spec.ep_size,
            max(1, len(self.held[next(iter(self.held))]) if self.held else 1),
        ).total_s
        exported = self._save(batch)
        return NPUStepResult(
            self.spec.rank, tokens, logits_out, device_s, time.perf_counter() - t0, exported, accepted, drafts,
            load_s=load_s, logprobs=logprobs, prompt_logprobs=prompt_lps, comm_s=self.experts.comm_s - comm0,
        )

    def free(self, seq_id: str) -> None:
        self.cache.free(seq_id)
        self.kv.release(seq_id)

    def expert_load(self) -> dict[int, list[int]]:
        return {m.layer: m.load.tolist() for m in self.model.moe_layers()} if self.model else {}


class WarmReplica:
    """The replicated part of an NPU's model (every tensor but the routed experts,
    loaded) and its KV pool: what a standby NPU builds while it waits, so that
    joining an instance costs only its experts and its group."""

    def __init__(self, spec: NPUSpec, model: MoEModel, paged: PagedKVStore, nbytes: int, fetched: int):
        self.spec, self.model, self.paged, self.nbytes, self.fetched = spec, model, paged, nbytes, fetched

    @classmethod
    def build(cls, spec: NPUSpec, weight_refs: dict) -> WarmReplica:
        cfg = spec.model
        names = shard_names(weight_refs.keys(), {})  # no experts held: the replicated tensors
        tensors = fetch_shared(weight_refs, names)
        dtype = TORCH_DTYPES[cfg.dtype]
        model = MoEModel(cfg, held_experts={}).to(dtype)
        model.load_state_dict(tensors, strict=True)
        paged = PagedKVStore(cfg, pool_blocks(spec), spec.block_size, dtype)
        return cls(spec, model.eval(), paged, sum(_nbytes(t) for t in tensors.values()), len(tensors))

    def fits(self, spec: NPUSpec) -> bool:
        """Whether an NPU of `spec` can use it: the same model and KV pool."""
        return (spec.model, spec.block_size, pool_blocks(spec)) == (self.spec.model, self.spec.block_size,
                                                                     pool_blocks(self.spec))


def _expert_module(cfg, dtype: torch.dtype, state: dict[str, torch.Tensor]) -> SwiGLU:
    """An expert's module holding a copy of `state`: built on the meta device,
    since initialising parameters that the weights overwrite costs a staging NPU's
    CPU (shared with the NPUs that serve) for nothing."""
    with torch.device("meta"):
        module = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size)
    module.load_state_dict({n: t.to(dtype, copy=True) for n, t in state.items()}, strict=True, assign=True)
    return module


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
