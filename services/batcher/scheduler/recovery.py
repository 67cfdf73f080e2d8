"""What the scheduler does when its worker dies: whatever the worker held on its device is
gone, and every request goes on from the KV that reached the pool."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from alignedserve.batcher.request import Request, RequestState

if TYPE_CHECKING:
    from alignedserve.batcher.scheduler.core import Scheduler


def requeue_lost(
    sched: Scheduler,
    synced: Mapping[str, int],
    evicting: Sequence[str],
    unanswered: Collection[str],
) -> list[str]:
    """Each request the worker held (and each it was `evicting` in a step that was lost:
    pooled since, but its new KV may never have reached the pool) goes back to waiting for a
    prefill that continues from `synced[id]`, the tokens whose KV reached the pool; its pool
    blocks are kept. The prefill recomputes the rest and samples the next token: with
    counter-based sampling, the very token it would have produced. The `unanswered` requests
    lose their PENDING tokens (the steps that were to sample them are lost); one that had
    finished by length on one is reopened (see _reopen). Returns the ids of the reopened."""
    for r in sched.store.in_state(RequestState.WAITING_PREFILL):
        # a chunked prefill kept on the device (fcfs) lost the chunks not in the pool
        r.num_prefilled = min(r.num_prefilled, synced.get(r.request_id, 0))
    on_device = (RequestState.RUNNING, RequestState.PREFETCHING)
    lost = sorted(
        (
            r
            for r in sched.store
            if r.state in on_device
            # pooled by a lost step: evicted, or prefilled there (its KV is not in the pool)
            or (
                r.state is RequestState.POOLED
                and (r.request_id in evicting or r.request_id in unanswered)
            )
        ),
        key=lambda r: r.arrival_s,
    )
    for r in lost:
        sched.policy.forget(sched, r)  # (at the length it counted, PENDING tokens included)
        sched.store.transition(r, RequestState.WAITING_PREFILL)
    reopened: list[Request] = []
    for request_id in unanswered:
        r = sched.store.get(request_id) if request_id in sched.store else None
        if r is None or r.num_answered == len(r.output_token_ids):
            continue
        sched.store.cut_output(r, r.num_answered)
        if r.state is RequestState.FINISHED:
            reopened.append(_reopen(sched, r))
    for r in lost:  # admitted again: room for the whole prefill and its token (see
        # plan_prefill); one the pool cannot top up is recomputed from scratch instead
        keep = sched.blocks_for(r.num_tokens + 1)  # (it had room for its lost tokens too)
        sched.allocator.free(r.blocks[keep:])
        del r.blocks[keep:]
        if sched.try_reserve(r, r.num_tokens + 1):
            r.num_prefilled = min(synced.get(r.request_id, 0), r.num_kv_tokens)
        else:
            sched.allocator.free(r.blocks)
            r.blocks = []
            r.num_prefilled = 0
    # reopened ones wait unadmitted (no blocks): admitted at their first chunk, as new
    again = sorted([*lost, *reopened], key=lambda r: r.arrival_s)
    sched.waiting.extendleft(r.request_id for r in reversed(again))
    return [r.request_id for r in reopened]


def _reopen(sched: Scheduler, r: Request) -> Request:
    """A request that finished by length on a token a lost step was to sample: that
    token must still be computed. A new record of it waits for a prefill of its prompt
    and its tokens so far (its KV blocks were freed when it finished)."""
    sched.store.pop(r.request_id)
    again = replace(
        r,
        state=RequestState.WAITING_PREFILL,
        num_prefilled=0,
        blocks=[],
        finished_s=None,
        pooled_since_s=None,
        finish_reason=None,
    )
    sched.store.add(again)
    return again
