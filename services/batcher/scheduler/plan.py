"""The contract between the batch scheduler and whatever runs its steps: one frozen
`BatchPlan` per step (plan in), answered by the tokens each member sampled (result out,
`Scheduler.update`). The executors are the batcher engine (a worker over gRPC) and the
simulator's cost model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """What the executor does in one step."""

    prefill: tuple[tuple[str, int], ...] = ()  # (request, prompt tokens) on the prefetch GPU
    mixed_prefill: tuple[tuple[str, int], ...] = ()  # chunks the decode GPU runs in its step
    decode: tuple[str, ...] = ()  # members decoded this step; their KV is on the decode GPU
    load: tuple[str, ...] = ()  # KV to bring from the CPU pool to the decode GPU first
    evict: tuple[str, ...] = ()  # leave the decode GPU: write their new KV back to the pool
    prefetch: tuple[str, ...] = ()  # start moving this next batch's KV towards the decode GPU
    is_switch: bool = False  # the running batch was replaced
    # of load, decode and evict, the requests whose KV is on the prefill device (it decodes
    # while no prompt waits: scheduler/aligned.py); the rest are the decode device's
    on_prefill_device: frozenset[str] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not (
            self.prefill
            or self.mixed_prefill
            or self.decode
            or self.load
            or self.evict
            or self.prefetch
        )

    @property
    def all_prefill(self) -> tuple[tuple[str, int], ...]:
        return self.prefill + self.mixed_prefill
