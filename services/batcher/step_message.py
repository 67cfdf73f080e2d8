"""A step plan as the worker's StepRequest (`worker.proto`): pool block numbers and token
ids, never KV bytes."""

from __future__ import annotations

from collections.abc import Callable

from alignedserve.batcher.request import PENDING, Request
from alignedserve.batcher.scheduler import BatchPlan, Scheduler
from alignedserve.common.proto import common_pb2, worker_pb2


def step_message(
    number: int,
    plan: BatchPlan,
    scheduler: Scheduler,
    params_of: Callable[[Request], common_pb2.SamplingParams],
) -> tuple[worker_pb2.StepRequest, dict[str, int]]:
    """Step `number` of the plan, read from the scheduler's requests as they are before the
    plan is applied; and the KV tokens its write-backs put in the pool, per request.
    `params_of`: a request's sampling parameters as a message (the engine builds each once)."""
    store = scheduler.store
    keep_resident = scheduler.config.policy == "fcfs"
    writing: dict[str, int] = {}
    msg = worker_pb2.StepRequest(step=number)
    there = plan.on_prefill_device  # of load, decode and evict: on the prefill device
    for rid in plan.load:
        r = store.get(rid)
        msg.load.add(
            request_id=rid,
            pool_blocks=r.blocks,
            num_kv_tokens=r.num_kv_tokens,
            on_prefill_device=rid in there,
        )
    offload = scheduler.config.num_prefill_device_blocks > 0
    chunks = [(rid, n, offload) for rid, n in plan.prefill]
    chunks += [(rid, n, False) for rid, n in plan.mixed_prefill]
    for rid, n, on_prefill_device in chunks:
        r = store.get(rid)
        assert PENDING not in r.output_token_ids, "planned before its tokens were answered"
        tokens = [*r.prompt_token_ids, *r.output_token_ids]
        end = r.num_prefilled + n
        msg.prefill.add(
            request_id=rid,
            token_ids=tokens[r.num_prefilled : end],
            num_cached_tokens=r.num_prefilled,
            pool_blocks=r.blocks,
            params=params_of(r),
            sample=end == r.num_tokens,
            keep_resident=keep_resident,
            on_prefill_device=on_prefill_device,
        )
        if not keep_resident and not on_prefill_device:  # (that one: when it is done)
            writing[rid] = end
    for rid in plan.decode:
        r = store.get(rid)
        token = r.output_token_ids[-1]
        msg.decode.add(
            request_id=rid,
            # still PENDING: the worker sampled it in a step it ran before this one
            token_id=max(token, 0),
            last_sampled=token == PENDING,
            num_kv_tokens=r.num_kv_tokens,
            params=params_of(r),
            on_prefill_device=rid in there,
        )
    for rid in plan.evict:
        r = store.get(rid)
        msg.evict.add(request_id=rid, pool_blocks=r.blocks, on_prefill_device=rid in there)
        writing[rid] = r.num_kv_tokens
    # nothing for the decode device: answer when the prefill device's batch is done
    msg.wait_prefill = not (msg.load or msg.decode or msg.evict or plan.mixed_prefill)
    return msg, writing
