"""What an instance engine reports (`InstanceEngine.stats`): its state now and its
counters since it started. Read by the master (routing, health, the cluster
view), the controller (drains, health checks), recovery and the benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EngineCounters:
    """Totals since the engine started (a benchmark reads the difference of two)."""

    steps: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # tokens fed through the model (a prompt's uncached part, each decode token)
    cached_tokens: int = 0  # prompt tokens taken from a cache at first admission
    generated_tokens: int = 0
    drafted_tokens: int = 0  # MTP drafts verified
    accepted_tokens: int = 0
    reconfigurations: int = 0  # elastic switches
    migrated_seqs: int = 0  # sequences moved off NPUs that left
    forked_seqs: int = 0  # parallel sampling: forks made
    shared_blocks: int = 0  # ...and the prompt blocks they share
    kv_exports: int = 0  # export calls of leaving NPUs (one each, for all its migrating sequences)
    overrun_steps: int = 0  # steps in which an emulated NPU took longer than its modelled time
    overlapped_steps: int = 0  # steps sent before the last one's results were in
    # wall seconds the loop waited for the NPUs' results, and between taking one step's
    # results in and waiting for the next while there was work (the engine's own host
    # time: scheduling, results, events), which an emulated chip idles through
    step_wall_s: float = 0.0
    host_gap_s: float = 0.0
    # where a step's wall time goes (bench engine): scheduling and sending it, the slowest
    # NPU's wall and the NPUs' mean share of it in all-to-alls, taking the results in
    dispatch_s: float = 0.0
    npu_s: float = 0.0
    a2a_s: float = 0.0
    update_s: float = 0.0


@dataclass
class EngineStats:
    name: str
    role: str
    healthy: bool  # False once a step failed on an NPU: the instance needs a rebuild
    running: int
    waiting: int  # admitted and queued, or parked until their KV arrives (parallel P/D)
    free_blocks: list[int]  # per NPU
    total_blocks: list[int]
    preemptions: int
    device_time_s: float  # emulated device time of every step so far
    time: float  # wall clock when taken (time.time())
    counters: EngineCounters = field(default_factory=EngineCounters)

    def to_dict(self) -> dict:
        """One flat mapping (the cluster view's JSON): the state, then the counters."""
        flat = asdict(self)
        return {**flat, **flat.pop("counters")}
