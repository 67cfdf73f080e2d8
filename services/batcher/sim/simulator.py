"""Run the real scheduler code against a cost model of GPU pairs.

Each GPU pair gets an equal share of the requests (round-robin) and its own clock:
- `aligned`: one Scheduler per pair. The decode GPU runs the plan's decode step (with any
  mixed-in prefill chunks); the prefetch GPU prefills in parallel, given as many prompt
  tokens per step as it can compute in the previous step's time; the next batch streams in
  over both PCIe links while the resident groups decode (the prefill GPU's own residents,
  and a GPU without a prefetch GPU, over one); when nothing is resident the decode GPU waits
  for the copy (charged as a stall).
- `fcfs`: the baseline gets the same two GPUs as two independent data-parallel engines,
  each doing continuous batching with chunked prefill mixed into its decode steps.
An evicted member writes back the KV it decoded since it was loaded, over its GPU's own
link, after that GPU's pass: the worker queues the copies behind the pass on the same
stream and answers the step once they are done, so they lengthen that GPU's step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from alignedserve.batcher.scheduler import QueueFullError, SchedulerConfig, make_scheduler
from alignedserve.batcher.sim.cost_model import CostModel
from alignedserve.batcher.sim.workload import SimRequest
from alignedserve.common.policy import PREFILL_DEVICE_RESERVE_BYTES
from alignedserve.common.sampling_params import SamplingParams

# A step with no device work on the decode side (it only queues a prefill batch, or starts a
# load): the round trip to the worker and back. Measured through the worker's Session stream:
# 0.43-0.53 ms on a 2-core CPU machine (benchmarks/worker_step.py --tiny --device cpu
# --batches 0 --in-flight 1; docs/benchmarks.md, the serving loop's own ceiling).
IDLE_STEP_S = 0.5e-3
# The benchmark checkpoints' context (worker/tiny.py FULL_SIZE): sizes the staging cache.
MAX_CONTEXT_TOKENS = 16384


@dataclass
class EngineStats:
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finish_s: float = 0.0
    num_steps: int = 0
    num_switches: int = 0
    num_preemptions: int = 0
    num_rejected: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    batch_spreads: list[float] = field(default_factory=list)  # (max - min) / max length
    schedule_s: list[float] = field(default_factory=list)  # wall time of each decision
    peak_pool_blocks: int = 0
    stall_s: float = 0.0  # decode GPU waiting for KV copies
    step_s: float = 0.0  # the steps' summed time
    # the decode GPU's share of it spent waiting for the prefill device's pass of the same
    # step (role switching: a step's answer waits for both devices)
    lane_wait_s: float = 0.0
    max_pool_wait_s: float = 0.0  # longest wait of any request in the pool for a batch


def simulate_engine(
    requests: list[SimRequest], config: SchedulerConfig, cost: CostModel, check: bool = False
) -> EngineStats:
    """One engine (one aligned GPU pair, or one fcfs GPU) over its share of the requests,
    driven as `BatcherEngine` drives the scheduler against the worker:
    - a step's time is its slowest device's: the decode GPU's pass (its decode members and
      any prefill mixed into its step: fcfs's chunks, aligned's turns, or aligned's prefill
      with no prefill device), and the prefill device's own decode pass when it has residents
      (role switching);
    - KV landing on a device is copied from the pool from the step that lands it, beside
      the steps (each step's loads of a device in one copy call, as the worker issues them,
      landing together; one call after another per device),
      over both PCIe links onto a decode GPU with a prefetch GPU beside it, else over that
      GPU's own. A pass that decodes a request whose copy still runs waits for it
      (`stall_s`, on the decode GPU); the scheduler learns a copy is done at the first step
      answered after it ended (`on_copied`), and leaves such requests out of its steps
      until then;
    - a prefill batch planned for the prefill device (`num_prefill_device_blocks`) runs there
      after the one before it, across steps; the engine learns it is done at the first step
      answered after it finished (`prefill_done`);
    - each device's evicted members then write back the KV decoded since their load;
    - the decode GPU's time is what `observe_step` gets (it bounds prefill turns)."""
    sched = make_scheduler(config)
    kv_bytes = cost.model.kv_bytes_per_token
    has_device = config.num_prefill_device_blocks > 0
    stats = EngineStats()
    pending = sorted(requests, key=lambda r: r.arrival_s)
    now, i = 0.0, 0
    device_free_s = 0.0  # when the prefill device finishes its queued batches
    prefilling: list[tuple[float, list[str]]] = []  # (done at, requests) on the prefill device
    synced: dict[str, int] = {}  # a resident's KV tokens also in the pool (as of its load)
    link_free_s = [0.0, 0.0]  # per device (decode, prefill): when its loads' copies end
    copied_at: dict[str, float] = {}  # landed requests whose copy end is not yet answered
    while i < len(pending) or len(sched.store):
        while i < len(pending) and pending[i].arrival_s <= now:
            r = pending[i]
            params = SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True)
            try:
                sched.add_request(r.request_id, range(r.prompt_tokens), params, now)
            except QueueFullError:
                stats.num_rejected += 1
            i += 1
        while prefilling and prefilling[0][0] <= now:
            _, ids = prefilling.pop(0)
            _finished(sched, sched.prefill_done(ids, dict.fromkeys(ids, 0), now), stats, synced)
        t0 = time.perf_counter()
        plan = sched.schedule(now)
        stats.schedule_s.append(time.perf_counter() - t0)
        if has_device and plan.prefill:
            # a chunk after the first copies its prompt's KV so far in from the pool (the
            # prefill device keeps nothing between chunks), before the pass that reads it
            cached = [sched.store.get(request_id).num_prefilled for request_id, _ in plan.prefill]
            run_s = cost.prefill_s([n for _, n in plan.prefill], cached)
            run_s += cost.h2d_s(sum(cached) * cost.model.kv_bytes_per_token)
            device_free_s = max(now, device_free_s) + run_s
            prefilling.append((device_free_s, [request_id for request_id, _ in plan.prefill]))
        in_step = sched.decode_device_prefill(plan)
        there = plan.on_prefill_device
        decode_s, load_s = 0.0, 0.0
        for on_prefill_device in (False, True):
            lengths = np.array(
                [
                    sched.store.get(r).num_tokens
                    for r in plan.decode
                    if (r in there) == on_prefill_device
                ],
                dtype=np.int64,
            )
            loads = [r for r in plan.load if (r in there) == on_prefill_device]
            synced.update((r, sched.store.get(r).num_kv_tokens) for r in loads)
            # the decode GPU loads over both links when it has a prefetch GPU beside it; the
            # prefill device's own residents, and a GPU alone, over one
            links = 2 if has_device and not on_prefill_device else 1
            lane = int(on_prefill_device)
            if loads:  # one copy call a step: its loads land together, when it ends
                tokens = sum(sched.store.get(r).num_kv_tokens for r in loads)
                copy_s = cost.h2d_s(tokens * kv_bytes, links=links)
                link_free_s[lane] = max(now, link_free_s[lane]) + copy_s
                copied_at.update(dict.fromkeys(loads, link_free_s[lane]))
            members = [r for r in plan.decode if (r in there) == on_prefill_device]
            # the pass starts once the copies of the members it decodes have landed
            lane_load_s = max([now, *(copied_at.get(r, now) for r in members)]) - now
            prefill_tokens = 0 if on_prefill_device else sum(n for _, n in in_step)
            lane_s = lane_load_s
            if len(lengths) or prefill_tokens:
                lane_s += cost.mixed_step_s(lengths, prefill_tokens)
            written = sum(
                _write_back_tokens(sched, synced, r, r in plan.decode)
                for r in plan.evict
                if (r in there) == on_prefill_device
            )
            lane_s += cost.d2h_s(written * kv_bytes)
            if not on_prefill_device:
                decode_gpu_s, load_s = lane_s, lane_load_s
                if len(lengths):
                    stats.batch_sizes.append(len(lengths))
                    stats.batch_spreads.append(
                        float((lengths.max() - lengths.min()) / lengths.max())
                    )
            decode_s = max(decode_s, lane_s)
        if plan.is_empty:  # nothing to do until the next event
            nxt = [t for t, _ in prefilling[:1]]
            if i < len(pending):
                nxt.append(pending[i].arrival_s)
            if not nxt:
                raise RuntimeError(f"simulation stalled at t={now:.3f}s with work left")
            now = max(min(nxt), now + 1e-6)
            continue
        decode_s = max(decode_s, IDLE_STEP_S)
        now += decode_s
        stats.stall_s += load_s
        stats.step_s += decode_s
        stats.lane_wait_s += max(0.0, decode_s - max(decode_gpu_s, IDLE_STEP_S))
        stats.num_steps += 1
        # as the engine: the step is applied when sent, its answer observed after it
        tokens = dict.fromkeys(plan.decode, 0)
        tokens.update((rid, 0) for rid, _ in in_step)
        sched.take_preempted()  # the cost model frees a preempted request's KV at once
        _finished(sched, sched.update(plan, tokens, now), stats, synced)
        sched.observe_step(plan, decode_gpu_s)
        if plan.prefetch:  # landed at the next step, whose copies then run beside the steps
            sched.policy.on_prefetch_done()
        copied = [r for r, at in copied_at.items() if at <= now]
        if copied:
            sched.policy.on_copied(copied)
            for r in copied:
                del copied_at[r]
        stats.peak_pool_blocks = max(stats.peak_pool_blocks, sched.allocator.num_used)
        if check:
            sched.check_invariants()
    stats.finish_s = now
    stats.num_switches = sched.num_switches
    stats.num_preemptions = sched.num_preemptions
    return stats


def _write_back_tokens(sched, synced: dict[str, int], request_id: str, decoded: bool) -> int:
    """KV tokens an evicted resident writes back (those decoded since its load, this step's
    included); it is no longer resident after."""
    loaded = synced.pop(request_id, 0)  # 0: prefilled in place (fcfs), none of it synced
    return max(0, sched.store.get(request_id).num_kv_tokens + int(decoded) - loaded)


def _finished(sched, done: list, stats: EngineStats, synced: dict[str, int]) -> None:
    for r in done:
        synced.pop(r.request_id, None)
        stats.max_pool_wait_s = max(stats.max_pool_wait_s, r.max_pool_wait_s)
        stats.output_tokens += len(r.output_token_ids)
        stats.ttft_s.append(r.first_token_s - r.arrival_s)
        if len(r.output_token_ids) > 1:
            stats.tpot_s.append((r.finished_s - r.first_token_s) / (len(r.output_token_ids) - 1))
        sched.store.pop(r.request_id)


@dataclass(frozen=True)
class SimSummary:
    policy: str
    output_tokens: int
    makespan_s: float
    throughput_tok_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    switch_fraction: float  # batch switches per decode iteration
    mean_batch: float
    mean_spread: float
    schedule_p99_ms: float
    peak_pool_fraction: float
    num_preemptions: int
    num_rejected: int
    lane_wait_fraction: float = 0.0  # of step time, the decode GPU waiting for the other


def simulate(
    requests: list[SimRequest],
    config: SchedulerConfig,
    cost: CostModel,
    num_pairs: int = 1,
    check: bool = False,
) -> SimSummary:
    """Requests spread round-robin over `num_pairs` GPU pairs (fcfs: 2 engines per pair)."""
    engines = num_pairs * (2 if config.policy == "fcfs" else 1)
    runs = [
        simulate_engine(requests[e::engines], config, cost, check=check) for e in range(engines)
    ]
    ttft = np.concatenate([r.ttft_s for r in runs])
    tpot = np.concatenate([r.tpot_s for r in runs]) if any(r.tpot_s for r in runs) else [0.0]
    tokens = sum(r.output_tokens for r in runs)
    makespan = max(r.finish_s for r in runs)
    steps = sum(r.num_steps for r in runs)
    sizes = np.concatenate([r.batch_sizes for r in runs])
    return SimSummary(
        policy=config.policy,
        output_tokens=tokens,
        makespan_s=makespan,
        throughput_tok_s=tokens / makespan,
        ttft_p50_s=float(np.percentile(ttft, 50)),
        ttft_p99_s=float(np.percentile(ttft, 99)),
        tpot_p50_s=float(np.percentile(tpot, 50)),
        tpot_p99_s=float(np.percentile(tpot, 99)),
        switch_fraction=sum(r.num_switches for r in runs) / max(steps, 1),
        mean_batch=float(sizes.mean()) if len(sizes) else 0.0,
        mean_spread=float(np.mean(np.concatenate([r.batch_spreads for r in runs]))),
        schedule_p99_ms=1e3
        * float(np.percentile(np.concatenate([r.schedule_s for r in runs]), 99)),
        peak_pool_fraction=max(r.peak_pool_blocks for r in runs) / config.num_pool_blocks,
        num_preemptions=sum(r.num_preemptions for r in runs),
        num_rejected=sum(r.num_rejected for r in runs),
        lane_wait_fraction=sum(r.lane_wait_s for r in runs)
        / max(sum(r.step_s for r in runs), 1e-12),
    )


def configs_for(
    cost: CostModel, pool_bytes: float, **overrides: dict[str, object]
) -> dict[str, SchedulerConfig]:
    """Side-by-side configs sized from the cost model: aligned with a CPU pool of
    `pool_bytes`, fcfs with vLLM v1's defaults for large GPUs (8192-token step budget,
    1024 sequences) and its KV on the GPU."""
    gpu_tokens = cost.kv_capacity_tokens()
    block = 16
    base = SchedulerConfig(
        gpu_kv_tokens=gpu_tokens,
        block_tokens=block,
        max_waiting=1 << 22,
        weight_kv_tokens=cost.model.weight_bytes // cost.model.kv_bytes_per_token,
        # as the worker measures it on its GPU
        ridge_flops_per_byte=round(cost.gpu.matmul_flops_per_s / cost.gpu.hbm_read_bytes_per_s),
        kernel_cost="padded" if cost.padded else "balanced",
        max_batch_size=1024,  # one decode step's members, for both policies
    )
    staging_blocks = (MAX_CONTEXT_TOKENS + base.prefill_tokens_per_step) // block
    left = cost.gpu.hbm_bytes - cost.model.weight_bytes - PREFILL_DEVICE_RESERVE_BYTES
    prefill_gpu_tokens = int(left // cost.model.kv_bytes_per_token) - staging_blocks * block
    aligned = replace(
        base,
        policy="aligned",
        num_pool_blocks=int(pool_bytes // (cost.model.kv_bytes_per_token * block)),
        # as the worker's defaults give it: a staging cache of one whole context and a step's
        # prefill on the prefill GPU, which decodes residents of its own once prompts stop,
        # in as many blocks as the decode GPU's where its memory left (weights, staging cache,
        # a reserve) holds them (worker/server.py; --set aligned.num_prefill_decode_blocks=0:
        # it only prefills)
        num_prefill_device_blocks=staging_blocks,
        num_prefill_decode_blocks=min(gpu_tokens, prefill_gpu_tokens) // block,
    )
    fcfs = replace(
        base,
        policy="fcfs",
        num_pool_blocks=gpu_tokens // block,
        prefill_tokens_per_step=8192,
    )
    return {
        "aligned": replace(aligned, **overrides.get("aligned", {})),
        "fcfs": replace(fcfs, **overrides.get("fcfs", {})),
    }
