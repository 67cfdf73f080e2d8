"""The batcher's record of every request, and the store that owns them all.

A request's KV lives in CPU-pool blocks from prefill to finish; its state says where the
decode side has it. Allowed transitions are one table, so an impossible move fails loudly.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from alignedserve.common.sampling_params import SamplingParams

# A token sampled by a step that is sent but not answered yet. The engine runs the scheduler
# one step ahead of the worker (see engine.py): it applies each step as soon as it is sent,
# with this in place of every token the step samples, and `Scheduler.resolve` sets each when
# its answer comes. Lengths are exact meanwhile; only the token values (and so a stop token)
# wait. PENDING tokens are always the last of a request's output.
PENDING = -1


class RequestState(enum.Enum):
    WAITING_PREFILL = "waiting_prefill"  # admitted, KV not computed yet
    POOLED = "pooled"  # KV in the CPU pool, waiting for a batch
    PREFETCHING = "prefetching"  # picked for the next batch, its KV moving to the decode GPU
    RUNNING = "running"  # member of the batch being decoded
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def is_done(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED)


S = RequestState
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    # A request can finish at prefill (max_tokens=1 or EOS first) or be preempted back to
    # waiting (fcfs recompute); every live state can be aborted. It finishes from the pool
    # when the stop token it sampled is answered after it left the decode GPU (the engine
    # plans a step ahead of the answers).
    S.WAITING_PREFILL: frozenset({S.POOLED, S.RUNNING, S.FINISHED, S.ABORTED}),
    S.POOLED: frozenset({S.PREFETCHING, S.RUNNING, S.WAITING_PREFILL, S.FINISHED, S.ABORTED}),
    S.PREFETCHING: frozenset({S.RUNNING, S.POOLED, S.WAITING_PREFILL, S.FINISHED, S.ABORTED}),
    S.RUNNING: frozenset({S.POOLED, S.WAITING_PREFILL, S.FINISHED, S.ABORTED}),
    S.FINISHED: frozenset(),
    S.ABORTED: frozenset(),
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: Sequence[int]  # the simulator passes range(n): only the length matters
    params: SamplingParams
    arrival_s: float
    state: RequestState = RequestState.WAITING_PREFILL
    output_token_ids: list[int] = field(default_factory=list)
    num_prefilled: int = 0  # tokens whose KV a (chunked) prefill has computed
    blocks: list[int] = field(default_factory=list)  # CPU-pool blocks holding its KV
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    pooled_since_s: float | None = None  # when it last entered the pool (starvation clock)
    max_pool_wait_s: float = 0.0  # longest single wait in the pool for a batch
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens: the KV length the next decode step attends over."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_answered(self) -> int:
        """Output tokens before the trailing PENDING ones: those whose value is known."""
        out = self.output_token_ids
        n = len(out)
        while n and out[n - 1] == PENDING:
            n -= 1
        return n

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV is written: all but the last sampled token (it is the next input)."""
        return self.num_tokens - 1 if self.output_token_ids else 0


class RequestStore:
    def __init__(self) -> None:
        self._requests: dict[str, Request] = {}
        # kept on every state change (add, transition, pop): metrics read it every step
        self._counts: Counter[RequestState] = Counter()
        # prompt + generated tokens of the live requests, kept the same way (routers poll it)
        self.num_live_tokens = 0

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests.values())

    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise KeyError(f"request_id {request.request_id!r} already exists")
        self._requests[request.request_id] = request
        self._counts[request.state] += 1
        if not request.state.is_done:
            self.num_live_tokens += request.num_tokens

    def get(self, request_id: str) -> Request:
        return self._requests[request_id]

    def pop(self, request_id: str) -> Request:
        request = self._requests[request_id]
        if not request.state.is_done or request.blocks:
            raise RuntimeError(f"request {request_id} removed while {request.state.value}")
        del self._requests[request_id]
        self._counts[request.state] -= 1
        return request

    def transition(self, request: Request, new: RequestState) -> None:
        if new not in TRANSITIONS[request.state]:
            raise RuntimeError(
                f"request {request.request_id}: illegal transition "
                f"{request.state.value} -> {new.value}"
            )
        self._counts[request.state] -= 1
        self._counts[new] += 1
        if new.is_done and not request.state.is_done:  # (done states lead nowhere)
            self.num_live_tokens -= request.num_tokens
        request.state = new

    def append_token(self, request: Request, token: int) -> None:
        """A sampled token (tokens change through here and cut_output, which keep the total)."""
        request.output_token_ids.append(token)
        if not request.state.is_done:
            self.num_live_tokens += 1

    def cut_output(self, request: Request, num_kept: int) -> None:
        """Drops the request's output tokens past the first num_kept."""
        num_cut = max(0, len(request.output_token_ids) - num_kept)
        del request.output_token_ids[num_kept:]
        if not request.state.is_done:
            self.num_live_tokens -= num_cut

    def count_by_state(self) -> Counter[RequestState]:
        return +self._counts  # a copy, without the zero entries

    def in_state(self, state: RequestState) -> Iterable[Request]:
        return (r for r in self._requests.values() if r.state is state)

    def check_invariants(self, block_tokens: int, num_pool_blocks: int) -> None:
        """Every pool block belongs to at most one request and lies in the pool; live requests
        past prefill hold exactly the blocks their KV needs; done requests hold none."""
        assert +self._counts == Counter(r.state for r in self._requests.values())
        owner: dict[int, str] = {}
        for r in self._requests.values():
            for b in r.blocks:
                assert 0 <= b < num_pool_blocks, f"{r.request_id}: block {b} outside the pool"
                assert b not in owner, f"block {b} owned by {owner[b]} and {r.request_id}"
                owner[b] = r.request_id
            if r.state.is_done:
                assert not r.blocks, f"{r.request_id} is {r.state.value} but holds blocks"
                assert r.finished_s is not None
            elif r.state is RequestState.WAITING_PREFILL:
                assert r.num_prefilled <= r.num_tokens
                assert len(r.blocks) * block_tokens >= r.num_prefilled
            else:  # its KV fits, with at most one block of room for the next token
                low = -(-r.num_kv_tokens // block_tokens)
                high = -(-(r.num_kv_tokens + 1) // block_tokens)
                assert low <= len(r.blocks) <= high, (
                    f"{r.request_id}: {len(r.blocks)} blocks for {r.num_kv_tokens} KV tokens"
                )
            assert len(r.output_token_ids) <= r.params.max_tokens
        live = (r for r in self._requests.values() if not r.state.is_done)
        assert self.num_live_tokens == sum(r.num_tokens for r in live), "live tokens out of sync"
