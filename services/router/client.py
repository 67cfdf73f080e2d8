"""The router's gRPC client for its batchers: sends each request to the least loaded one,
streams its tokens back, aborts, and polls every batcher's load in the background (routing
and /ready both read it). Load is counted in context tokens by default (prompts still to
prefill and the KV of live requests, plus the prompts sent since the batcher's last report),
so a burst of requests is split by its work, not by its number. The batchers are found again
every resolve interval (DNS names such as a headless Service's: see discovery.py); a batcher
that leaves gets no new request, and its channel closes once its streams have finished.
While no batcher is ready (scaled to zero, or every worker loading), a request is held until
one is, within bounds.

All the requests sent to one batcher share one Stream call (batcher_stream.py's StreamMux)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from alignedserve.common.errors import QueueFullError, UnavailableError
from alignedserve.common.load_report import get_load
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc
from alignedserve.common.rpc import CHANNEL_OPTIONS
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.router import wire
from alignedserve.router.batcher_stream import BatcherError, StreamMux, coalesced, rpc_error
from alignedserve.router.config import RouterConfig
from alignedserve.router.discovery import Discovery, GetAddrInfo
from alignedserve.router.wire import GenerateChunk, LoadReport

log = logging.getLogger(__name__)

# A batcher slower than this to answer GetLoad or Abort counts as not answering.
CONTROL_TIMEOUT_S = 2.0
# "Not now" answers given before any token: another batcher may take the request.
TRY_ANOTHER = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass(eq=False)  # by identity: one address may come back as a new batcher
class BatcherState:
    """What the router knows about one batcher (mutable: the poll loop updates it)."""

    address: str
    channel: grpc.aio.Channel
    stub: batcher_pb2_grpc.BatcherStub
    load: LoadReport | None = None
    last_ready_s: float = -math.inf  # monotonic time of the last report with worker_ready
    # (monotonic time sent, prompt tokens) of the requests sent since the last GetLoad call
    # that has answered was made: its report may not count them yet
    sent: deque[tuple[float, int]] = field(default_factory=deque)
    sent_tokens: int = 0  # their prompt tokens, summed (routing reads it per request)
    is_answering: bool = True  # for logging changes only
    num_streams: int = 0  # requests open on its channel
    mux: StreamMux | None = None  # the Stream call its requests share
    is_removed: bool = False  # discovery no longer finds it: its channel closes when idle

    @property
    def reports_tokens(self) -> bool:
        """False for a batcher older than LoadReport.num_context_tokens."""
        return self.load is None or self.load.num_context_tokens is not None

    def score(self, balance_by: str) -> int:
        """The load routing compares: its live requests (waiting, running and pooled), or
        their context tokens; either with those sent since the last report."""
        load = self.load
        if balance_by == "requests":
            live = load.num_waiting + load.num_running + load.num_pooled if load else 0
            return live + len(self.sent)
        return ((load.num_context_tokens or 0) if load else 0) + self.sent_tokens

    def add_sent(self, now_s: float, num_tokens: int) -> tuple[float, int]:
        entry = (now_s, num_tokens)
        self.sent.append(entry)
        self.sent_tokens += num_tokens
        return entry

    def forget_sent(self, entry: tuple[float, int]) -> None:
        """A request it refused adds nothing to its load (unless a report dropped it)."""
        with contextlib.suppress(ValueError):
            self.sent.remove(entry)
            self.sent_tokens -= entry[1]

    def forget_sent_before(self, when_s: float) -> None:
        while self.sent and self.sent[0][0] < when_s:
            self.sent_tokens -= self.sent.popleft()[1]


class BatcherClient:
    """Use inside one event loop: start() before the first call, close() after the last."""

    def __init__(
        self,
        addresses: Sequence[str],
        poll_interval_s: float = 0.5,
        request_timeout_s: float | None = None,
        ready_window_s: float = 5.0,
        resolve_interval_s: float = 5.0,
        max_held: int = 1024,
        hold_timeout_s: float = 60.0,
        balance_by: str = "tokens",
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    ):
        self._balance_by = balance_by  # RouterConfig checks it
        self._discovery = Discovery(addresses, getaddrinfo)
        self._poll_interval_s = poll_interval_s
        # a report asked for after a send counts it within a poll interval and a call's
        # time; older entries go (no report may come from a batcher that stopped answering)
        self._sent_ttl_s = 2 * poll_interval_s + CONTROL_TIMEOUT_S
        self._request_timeout_s = request_timeout_s
        self._ready_window_s = ready_window_s
        self._resolve_interval_s = resolve_interval_s
        self._max_held = max_held
        self._hold_timeout_s = hold_timeout_s
        self._by_address: dict[str, BatcherState] = {}
        self._leaving: set[BatcherState] = set()  # removed, with streams still open
        self._routes: dict[str, BatcherState] = {}  # request_id -> its batcher, while streaming
        self._aborted: set[str] = set()  # of those, the ones whose Abort the batcher answered
        self._turn = 0  # rotates the choice among equally loaded batchers
        self._num_held = 0
        # Called with num_held at each change (a gauge that no scrape can read from here).
        self.on_num_held: Callable[[int], None] | None = None
        self._is_holding = max_held > 0  # False once the router drains
        self._readiness = asyncio.Event()  # set, then replaced, when a ready report arrives
        self._loops: list[asyncio.Task[None]] = []  # polling, resolving
        self._closing: set[asyncio.Task[None]] = set()  # channels of batchers that left

    @classmethod
    def from_config(cls, config: RouterConfig, **overrides) -> BatcherClient:
        options = dict(
            poll_interval_s=config.load_poll_interval_s,
            request_timeout_s=config.request_timeout_s,
            ready_window_s=config.ready_window_s,
            resolve_interval_s=config.resolve_interval_s,
            max_held=config.max_held,
            hold_timeout_s=config.hold_timeout_s,
            balance_by=config.balance_by,
        )
        return cls(config.batcher_addresses, **(options | overrides))

    async def start(self) -> None:
        # grpc.aio channels bind to the running loop, so they are made here, not in __init__.
        await self.refresh()  # route and answer /ready from real data at once
        for interval_s, action in (
            (self._poll_interval_s, self._poll_all),
            (self._resolve_interval_s, self.refresh),
        ):
            self._loops.append(asyncio.create_task(self._every(interval_s, action)))

    async def close(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, *self._closing, return_exceptions=True)
        for batcher in [*self._by_address.values(), *self._leaving]:
            await self._close_batcher(batcher)

    @property
    def batchers(self) -> list[BatcherState]:
        return list(self._by_address.values())

    @property
    def num_held(self) -> int:
        """Requests waiting for a ready batcher now."""
        return self._num_held

    def is_ready(self) -> bool:
        """A batcher reported a ready worker within the ready window."""
        now = time.monotonic()
        return any(self._is_ready(b, now) for b in self.batchers)

    def _is_ready(self, batcher: BatcherState, now: float) -> bool:
        return now - batcher.last_ready_s <= self._ready_window_s

    async def refresh(self) -> None:
        """Resolves the addresses again: new batchers are added (and polled at once), those
        gone are removed."""
        addresses = await self._discovery.resolve()
        for address in set(self._by_address) - set(addresses):
            batcher = self._by_address.pop(address)
            log.info("batcher %s removed (%d streams finishing)", address, batcher.num_streams)
            batcher.is_removed = True
            self._leaving.add(batcher)
            self._close_if_idle(batcher)
        added = []
        for address in addresses:
            if address not in self._by_address:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                stub = batcher_pb2_grpc.BatcherStub(channel)
                self._by_address[address] = BatcherState(address, channel, stub)
                added.append(self._by_address[address])
        if added:
            log.info("batchers added: %s", ", ".join(b.address for b in added))
            await asyncio.gather(*(self._poll(b) for b in added))

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[GenerateChunk, None]:
        """The request's chunks, the last with finish_reason set. Closing the iterator early
        (or cancelling the task reading it) aborts it at the batcher."""
        request = wire.generate_request_to_proto(request_id, prompt_ids, params)
        # One hold bound per request, taken as it arrives: a request held, refused by a batcher
        # that was ready, then held again waits hold_timeout_s in all, not that per wait.
        loop = asyncio.get_running_loop()
        hold_deadline_s = loop.time() + self._hold_timeout_s
        while True:
            await self._until_ready(hold_deadline_s)
            try:
                batcher, mux, queue, msg, timer = await self._start_call(request)
                break
            except BatcherError as e:
                # Every batcher it tried was gone or draining (a rollout, a pod the DNS has
                # not dropped yet) before any token: hold the request for the next ready one.
                unreachable = e.grpc_code == grpc.StatusCode.UNAVAILABLE
                if not (unreachable and self._is_holding and loop.time() < hold_deadline_s):
                    raise
        self._routes[request_id] = batcher
        finished = False
        try:
            while True:
                if isinstance(msg, BatcherError):
                    raise msg
                chunk, msg = coalesced(wire.chunk_from_proto(msg), queue)
                yield chunk
                if chunk.finish_reason is not None:
                    finished = True
                    return
                if msg is None:
                    msg = await queue.get()
        finally:
            if timer is not None:
                timer.cancel()
            del self._routes[request_id]
            # An Abort the batcher answered (a stop string's) ended the request there already:
            # one abort per request, not a second one on the Stream call.
            is_ended = finished or request_id in self._aborted
            self._aborted.discard(request_id)
            mux.release(request_id, abort=not is_ended)
            self._stream_ended(batcher)

    async def abort(self, request_id: str) -> bool:
        """Aborts a request still streaming, and returns once the batcher has answered, that
        is, has freed it. Best effort: False if the request is unknown, finished or the batcher
        did not answer. Once it answered, closing the request's stream aborts nothing more;
        else closing it aborts the request on the Stream call."""
        batcher = self._routes.get(request_id)
        if batcher is None:
            return False
        try:
            reply = await batcher.stub.Abort(
                batcher_pb2.AbortRequest(request_id=request_id), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            log.warning("abort %s: %s", request_id, rpc_error(batcher.address, e))
            return False
        if request_id in self._routes:  # its stream may have closed while the call was out
            self._aborted.add(request_id)
        return reply.found

    async def abort_all(self) -> int:
        """Aborts every request streaming now (a router told to stop at once): each ends
        with finish_reason "abort" and its batcher frees it. The calls run at once, each
        within CONTROL_TIMEOUT_S. Returns how many were aborted."""
        found = await asyncio.gather(*(self.abort(rid) for rid in list(self._routes)))
        return sum(found)

    def stop_holding(self) -> None:
        """The router drains: the held requests are answered 503 now, for their clients to
        retry on another router, and no more are held."""
        self._is_holding = False
        self._wake_held()

    def _wake_held(self) -> None:
        # Set the event they wait on, and give later ones a new one.
        self._readiness.set()
        self._readiness = asyncio.Event()

    async def _until_ready(self, hold_deadline_s: float) -> None:
        """Returns once a batcher is ready: at once, or after holding the request (at most
        max_held at a time, until the request's hold deadline, in loop time)."""
        if self.is_ready():
            return
        if not self._is_holding:
            raise UnavailableError("no batcher has a ready worker")
        if self._num_held >= self._max_held:
            raise QueueFullError(
                f"no batcher has a ready worker, and {self._num_held} requests already wait"
                f" for one (max_held={self._max_held})"
            )
        self._set_num_held(self._num_held + 1)
        try:
            async with asyncio.timeout_at(hold_deadline_s):
                while not self.is_ready():
                    if not self._is_holding:
                        raise UnavailableError("the router is shutting down; retry on another")
                    await self._readiness.wait()
        except TimeoutError:
            raise UnavailableError(
                f"no batcher became ready within {self._hold_timeout_s:g} s"
            ) from None
        finally:
            self._set_num_held(self._num_held - 1)

    def _set_num_held(self, num_held: int) -> None:
        self._num_held = num_held
        if self.on_num_held is not None:
            self.on_num_held(num_held)

    async def _start_call(self, request: batcher_pb2.GenerateRequest):
        """Sends the request to the least loaded batcher and waits for its first delta:
        admission errors arrive before it, while another batcher can still be tried.
        Returns the batcher, its StreamMux, the request's queue, that delta, and the timer that
        ends the request at its deadline (None without one)."""
        errors: list[BatcherError] = []
        request_id = request.request_id
        num_prompt_tokens = len(request.prompt_token_ids)
        for batcher in self._by_load():
            now = time.monotonic()
            batcher.forget_sent_before(now - self._sent_ttl_s)
            entry = batcher.add_sent(now, num_prompt_tokens)
            batcher.num_streams += 1
            if batcher.mux is None or batcher.mux.is_done:
                batcher.mux = StreamMux(batcher.address, batcher.stub)
            mux = batcher.mux
            queue = mux.open(request)
            timer = None
            if self._request_timeout_s is not None:
                expired = BatcherError(
                    f"batcher {batcher.address}: Deadline Exceeded",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                timer = asyncio.get_running_loop().call_later(
                    self._request_timeout_s, queue.put_nowait, expired
                )
            try:
                first = await queue.get()
            except BaseException:
                if timer is not None:
                    timer.cancel()
                mux.release(request_id, abort=True)
                self._stream_ended(batcher)
                raise
            if not isinstance(first, BatcherError):
                return batcher, mux, queue, first, timer
            if timer is not None:
                timer.cancel()
            mux.release(request_id, abort=first.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED)
            self._stream_ended(batcher)
            batcher.forget_sent(entry)
            errors.append(first)
            if first.grpc_code == grpc.StatusCode.UNAVAILABLE:  # gone or draining: not ready
                batcher.last_ready_s = -math.inf
            if first.grpc_code not in TRY_ANOTHER:
                raise first
        if not errors:  # every batcher left while the request waited
            raise UnavailableError("no batcher to send the request to")
        raise errors[-1]

    def _by_load(self) -> list[BatcherState]:
        """Batchers with a ready worker first, then by load (balance_by); ties rotate. By
        requests while any batcher reports no tokens (older than the field: a rolling
        upgrade), since its load would read as empty."""
        now = time.monotonic()
        self._turn += 1
        batchers = self.batchers
        n = len(batchers)
        balance_by = self._balance_by
        if balance_by == "tokens" and not all(b.reports_tokens for b in batchers):
            balance_by = "requests"
        order = sorted(
            range(n),
            key=lambda i: (
                not self._is_ready(batchers[i], now),
                batchers[i].score(balance_by),
                (i - self._turn) % n,
            ),
        )
        return [batchers[i] for i in order]

    def _stream_ended(self, batcher: BatcherState) -> None:
        batcher.num_streams -= 1
        self._close_if_idle(batcher)

    def _close_if_idle(self, batcher: BatcherState) -> None:
        if batcher.is_removed and batcher.num_streams == 0 and batcher in self._leaving:
            self._leaving.discard(batcher)
            task = asyncio.create_task(self._close_batcher(batcher))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_batcher(batcher: BatcherState) -> None:
        if batcher.mux is not None:
            await batcher.mux.close()
        await batcher.channel.close()

    @staticmethod
    async def _every(interval_s: float, action) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await action()
            except Exception:  # the loop must outlive one bad round
                log.exception("%s failed", action.__name__)

    async def _poll_all(self) -> None:
        await asyncio.gather(*(self._poll(b) for b in self.batchers))

    async def _poll(self, batcher: BatcherState) -> None:
        asked_s = time.monotonic()
        try:
            load = await get_load(batcher.stub, CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if batcher.is_answering:
                log.warning(
                    "batcher %s does not answer GetLoad: %s",
                    batcher.address,
                    rpc_error(batcher.address, e),
                )
            batcher.is_answering = False
            return
        if batcher.is_removed:
            return  # removed while the call was out
        if not batcher.is_answering:
            log.info("batcher %s answers GetLoad again", batcher.address)
        batcher.is_answering = True
        batcher.load = load
        # Those sent before the call have reached the batcher before it answered (all but a
        # request still in the stream's send queue then, a window of a few ms); those sent
        # since may be missing from the report, so they still count on top of it.
        batcher.forget_sent_before(asked_s)
        if load.worker_ready:
            batcher.last_ready_s = time.monotonic()
            self._wake_held()
