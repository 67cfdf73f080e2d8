"""The Worker gRPC service, end to end on loopback: the test plays the batcher (it owns the CPU
pool and every request's pool blocks, and sends step plans) against a real server running a
tiny model, and checks the tokens against the in-process reference loop (LocalRuntime)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common.errors import ConfigError, InvalidRequestError, OutOfBlocksError
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.proto import health_pb2, health_pb2_grpc, worker_pb2, worker_pb2_grpc
from alignedserve.common.rpc import CHANNEL_OPTIONS, REJECTED_STEP_KEY
from alignedserve.common.sampling_params import finish_reason
from alignedserve.common.wire import layout_from_proto, layout_to_proto, sampling_to_proto
from alignedserve.serve import free_port
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.kv_cache import TORCH_DTYPES, KVCache
from alignedserve.worker.pool_mapping import PoolMapping
from alignedserve.worker.residency import DeviceResidency
from alignedserve.worker.server import serve_worker
from alignedserve.worker.service import (
    SERVICE_NAME,
    WorkerConfig,
    WorkerServicer,
    add_worker_arguments,
    config_from_args,
)
from alignedserve.worker.tiny import EOS, EOT

from factories import greedy, random_prompts

PROMPT_LENGTHS = (5, 17, 30, 3)
MAX_TOKENS = 20
GREEDY = greedy(MAX_TOKENS)
NUM_POOL_BLOCKS = 64
EVICT_EVERY = 5  # steps
RELOAD_AFTER = 2  # steps an evicted request waits in the pool
PREFILL_CHUNK = 16  # tokens: the longer prompts are prefilled in two steps


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(PROMPT_LENGTHS, seed=3)


@pytest.fixture(scope="module")
def reference(model_dir, prompts) -> list[list[int]]:
    gens = LocalRuntime.from_dir(model_dir).generate(prompts, [GREEDY] * len(prompts))
    return [g.token_ids for g in gens]


# ---------------------------------------------------------------- a server and a batcher


@contextlib.asynccontextmanager
async def running_worker(
    model_dir: Path, **overrides
) -> AsyncIterator[tuple[WorkerServicer, worker_pb2_grpc.WorkerStub, grpc.aio.Channel]]:
    config = WorkerConfig(model_dir=str(model_dir), num_device_blocks=64, **overrides)
    started: list[WorkerServicer] = []
    ready = asyncio.Event()
    serving = asyncio.ensure_future(serve_worker(config, ready, started.append))
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if serving.done():
        serving.result()  # raises why it did not start
    servicer = started[0]
    try:
        target = f"127.0.0.1:{servicer.port}"
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            yield servicer, worker_pb2_grpc.WorkerStub(channel), channel
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


def pool_tensor(pool: CpuKVPool) -> torch.Tensor:
    """[num_pool_blocks, layers, 2, block_tokens, kv_heads, head_dim], over the segment."""
    layout = pool.layout
    raw = torch.from_numpy(pool.blocks())
    return raw.view(TORCH_DTYPES[layout.dtype]).view(pool.num_blocks, *layout.block_shape)


@dataclass
class Req:
    request_id: str
    tokens: list[int]  # prompt + generated; once generating, the last one has no KV yet
    num_prompt: int
    pool_blocks: list[int] = field(default_factory=list)
    num_kv: int = 0  # tokens whose KV has been computed (on the device or in the pool)
    num_synced: int = 0  # tokens whose KV is in the pool (the last write-back)
    state: str = "new"  # new (prefilling) | pooled | resident | finished
    load_at: int = 0  # step at which a pooled request goes back onto the device

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]


class FakeBatcher:
    """The batcher's side of the contract, with a fixed policy: prefill in chunks of at most
    PREFILL_CHUNK tokens with the KV going to the pool, load, decode; every EVICT_EVERY steps
    evict two requests (one after decoding in that step, one without) and load them again
    RELOAD_AFTER steps later. Plans take effect on the bookkeeping when they are made."""

    def __init__(self, pool: CpuKVPool, info: worker_pb2.ModelInfo, prompts: list[list[int]]):
        self.pool = pool
        self.layout = layout_from_proto(info.kv_layout)
        self.info = info
        self.reqs = [Req(f"r{i}", list(p), num_prompt=len(p)) for i, p in enumerate(prompts)]
        self.step = 0
        self.keep_resident = False  # where prefilled KV goes: the pool, or stays on device
        self.to_release: list[str] = []
        self.snapshots: dict[str, torch.Tensor] = {}  # device bytes before a plain evict
        self.num_bytes_checked = 0
        # decodes name no token: the worker takes the one it sampled last (as when the
        # batcher sends a step before the previous one is answered)
        self.last_sampled = False
        self.snapshot = True  # check plain evicts byte for byte (only when nothing is ahead)
        self.answered = 0  # the last step answered

    @property
    def active(self) -> list[Req]:
        return [r for r in self.reqs if r.state != "finished"]

    def cover(self, r: Req, num_tokens: int) -> None:
        need = self.layout.blocks_for(num_tokens) - len(r.pool_blocks)
        if need > 0:
            r.pool_blocks += self.pool.allocate(need)

    def restart(self) -> None:
        """A new session after the old one died: every request is re-prefilled from its last
        write-back (the pool's KV up to num_synced is valid), and stays resident."""
        for r in self.active:
            r.state, r.num_kv = "new", r.num_synced
        self.keep_resident = True
        self.answered = self.step  # the steps in flight are lost with the session

    def plan(self, servicer: WorkerServicer) -> worker_pb2.StepRequest:
        self.step += 1
        s = worker_pb2.StepRequest(step=self.step, release=self.to_release)
        self.to_release = []
        computed: set[str] = set()
        for r in self.active:
            if r.state == "new":
                chunk = r.tokens[r.num_kv : r.num_kv + PREFILL_CHUNK]
                is_last = r.num_kv + len(chunk) == len(r.tokens)
                self.cover(r, r.num_kv + len(chunk))
                s.prefill.append(
                    worker_pb2.PrefillChunk(
                        request_id=r.request_id,
                        token_ids=chunk,
                        num_cached_tokens=r.num_kv,
                        pool_blocks=r.pool_blocks,
                        params=sampling_to_proto(GREEDY),
                        sample=is_last,
                        keep_resident=self.keep_resident,
                    )
                )
                computed.add(r.request_id)
                r.num_kv += len(chunk)
                if not self.keep_resident:
                    r.num_synced = r.num_kv
                if is_last:
                    r.state = "resident" if self.keep_resident else "pooled"
                    r.load_at = self.step + 1
            elif r.state == "pooled" and r.load_at <= self.step:
                s.load.append(
                    worker_pb2.LoadEntry(
                        request_id=r.request_id, pool_blocks=r.pool_blocks, num_kv_tokens=r.num_kv
                    )
                )
                r.state = "resident"
        evict: list[Req] = []
        if self.step % EVICT_EVERY == 0:
            resident = [
                r for r in self.active if r.state == "resident" and r.request_id not in computed
            ]
            k = self.step // EVICT_EVERY
            evict = [resident[(k + i) % len(resident)] for i in range(min(2, len(resident)))]
        plain_evict = evict[1] if len(evict) > 1 else None  # evicted without decoding
        for r in self.active:
            if r.state == "resident" and r.request_id not in computed and r is not plain_evict:
                s.decode.append(
                    worker_pb2.DecodeEntry(
                        request_id=r.request_id,
                        token_id=0 if self.last_sampled else r.tokens[-1],
                        last_sampled=self.last_sampled,
                        num_kv_tokens=r.num_kv,
                        params=sampling_to_proto(GREEDY),
                    )
                )
                r.num_kv += 1
        for r in evict:
            self.cover(r, r.num_kv)  # the pool must hold the KV grown on the device
            s.evict.append(
                worker_pb2.EvictEntry(request_id=r.request_id, pool_blocks=r.pool_blocks)
            )
            r.num_synced = r.num_kv
            r.state = "pooled"
            r.load_at = self.step + RELOAD_AFTER
        if plain_evict is not None and self.snapshot:
            residency = servicer.residency
            table = list(residency.block_table(plain_evict.request_id))
            self.snapshots[plain_evict.request_id] = residency.kv_cache.blocks[table].clone()
        return s

    def absorb(self, response: worker_pb2.StepResponse) -> None:
        assert response.step == self.answered + 1, (response.step, self.answered)
        self.answered = response.step
        by_id = {r.request_id: r for r in self.reqs}
        for t in response.tokens:
            r = by_id[t.request_id]
            if r.state == "finished":  # a step sent before its finish was known: dropped
                continue
            r.tokens.append(t.token_id)
            reason = finish_reason(
                GREEDY,
                t.token_id,
                len(r.generated),
                len(r.tokens),
                tuple(self.info.eos_token_ids),
                self.info.max_model_len,
            )
            if reason is not None:
                r.state = "finished"
                self.to_release.append(r.request_id)
        pool = pool_tensor(self.pool)
        for request_id, device_bytes in self.snapshots.items():
            r = by_id[request_id]
            n = self.layout.blocks_for(r.num_synced)
            assert torch.equal(pool[r.pool_blocks[:n]], device_bytes[:n]), request_id
            self.num_bytes_checked += 1
        self.snapshots.clear()


@contextlib.asynccontextmanager
async def attached(stub, info) -> AsyncIterator[CpuKVPool]:
    with CpuKVPool.create(layout_from_proto(info.kv_layout), NUM_POOL_BLOCKS) as pool:
        await stub.Attach(
            worker_pb2.AttachRequest(
                pool_name=pool.name, num_pool_blocks=pool.num_blocks, kv_layout=info.kv_layout
            )
        )
        yield pool


async def drive(
    call, batcher: FakeBatcher, servicer: WorkerServicer, until: Callable[[], bool]
) -> None:
    while batcher.active and not until():
        await call.write(batcher.plan(servicer))
        batcher.absorb(await call.read())


async def drive_ahead(call, batcher: FakeBatcher, servicer: WorkerServicer) -> None:
    """As `drive`, with two steps in flight: each is sent before the previous is answered."""
    in_flight = 0
    while batcher.active or in_flight:
        while batcher.active and in_flight < 2:
            await call.write(batcher.plan(servicer))
            in_flight += 1
        batcher.absorb(await call.read())
        in_flight -= 1


class SlowDevice:
    """A device slower than the host, as a GPU is: a launched step's work ends only once the
    next step has been launched, or `wait_s` after its own launch when none comes (the last
    steps). On the CPU a step's work is done when its launch returns, and whether the next
    plan arrives before the worker answers would race the host's load."""

    def __init__(self, servicer: WorkerServicer, wait_s: float = 2.0) -> None:
        self.executor, self.wait_s = servicer.executor, wait_s
        self._launch = self.executor.launch
        self._previous: threading.Event | None = None
        self.executor.launch = self.launch  # before the Session starts: it binds the method

    def launch(self, request, residency):
        launched = self._launch(request, residency)
        if self._previous is not None:
            self._previous.set()
        self._previous = threading.Event()
        launched.done = (*launched.done, self._Done(self._previous, self.wait_s))
        return launched

    @dataclass
    class _Done:  # what Launched.wait synchronizes, as a CUDA event
        ended: threading.Event
        wait_s: float

        def synchronize(self) -> None:
            self.ended.wait(self.wait_s)


def outputs(batcher: FakeBatcher) -> list[list[int]]:
    return [r.generated for r in batcher.reqs]


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await awaitable
    return e.value


# ---------------------------------------------------------------- through gRPC


@pytest.mark.parametrize(
    "last_sampled, ahead",
    [(False, False), (True, False), (True, True)],
    ids=["named-tokens", "last-sampled", "two-steps-in-flight"],
)
def test_greedy_tokens_equal_the_reference_loop(model_dir, prompts, reference, last_sampled, ahead):
    """With two steps in flight the worker launches each before answering the previous one,
    and decodes take the previous step's tokens where they lie (TokenCarry)."""

    async def main():
        async with running_worker(model_dir) as (servicer, stub, _):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            async with attached(stub, info) as pool:
                batcher = FakeBatcher(pool, info, prompts)
                batcher.last_sampled = last_sampled
                batcher.snapshot = not ahead
                if ahead:
                    SlowDevice(servicer)
                call = stub.Session()
                if ahead:
                    await drive_ahead(call, batcher, servicer)
                else:
                    await drive(call, batcher, servicer, until=lambda: False)
                # the last finished requests are released by one more step
                await call.write(worker_pb2.StepRequest(step=0, release=batcher.to_release))
                assert not (await call.read()).tokens
                assert servicer.residency.num_resident == 0
                assert servicer.residency.allocator.num_used == 0
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
                return info, batcher, servicer.num_launched_ahead

    info, batcher, num_launched_ahead = asyncio.run(main())
    assert outputs(batcher) == reference
    assert batcher.step > 2 * EVICT_EVERY  # loads and evictions happened, more than once
    if ahead:
        # every plan but the first came while the step before it was on the (slow) device
        assert num_launched_ahead == batcher.step - 1
    else:
        assert batcher.num_bytes_checked >= 2
        assert num_launched_ahead == 0
    assert set(info.eos_token_ids) == {EOS, EOT}  # config eos + generation_config end-of-turn


def test_restart_from_the_last_write_back_continues_the_same_tokens(model_dir, prompts, reference):
    async def main():
        async with running_worker(model_dir) as (servicer, stub, _):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            async with attached(stub, info) as pool:
                batcher = FakeBatcher(pool, info, prompts)
                call = stub.Session()
                await drive(call, batcher, servicer, until=lambda: batcher.step == 8)
                # One more step is in flight when the stream dies: its tokens are lost. (It
                # writes nothing back, so the batcher's num_synced stays true whether or
                # not the worker ran it.)
                lost = batcher.plan(servicer)
                assert lost.decode and not lost.evict
                await call.write(lost)
                call.cancel()
                batcher.restart()
                call = stub.Session()
                await drive(call, batcher, servicer, until=lambda: False)
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
                return batcher

    batcher = asyncio.run(main())
    assert outputs(batcher) == reference


def test_session_before_attach_is_failed_precondition(model_dir):
    async def main():
        async with running_worker(model_dir) as (_, stub, _):
            err = await rpc_error(stub.Session().read())
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "Attach" in err.details()

    asyncio.run(main())


def test_attach_with_another_layout_is_invalid_argument(model_dir):
    async def main():
        async with running_worker(model_dir) as (_, stub, _):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            ours = layout_from_proto(info.kv_layout)
            other = KVLayout(
                ours.num_layers, ours.num_kv_heads, ours.head_dim, ours.block_tokens * 2, "float16"
            )
            with CpuKVPool.create(other, 4) as pool:
                request = worker_pb2.AttachRequest(
                    pool_name=pool.name, num_pool_blocks=4, kv_layout=layout_to_proto(other)
                )
                err = await rpc_error(stub.Attach(request))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert str(other) in err.details() and str(ours) in err.details()
            missing = worker_pb2.AttachRequest(
                pool_name="alignedserve-kv-nonexistent", num_pool_blocks=4, kv_layout=info.kv_layout
            )
            assert (await rpc_error(stub.Attach(missing))).code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


def test_bad_step_aborts_the_session_and_the_worker_keeps_serving(model_dir):
    async def main():
        async with running_worker(model_dir, session_handover_s=0.5) as (servicer, stub, channel):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            async with attached(stub, info) as pool:
                blocks = pool.allocate(1)
                params = sampling_to_proto(GREEDY)
                prefill = worker_pb2.PrefillChunk(
                    request_id="a",
                    token_ids=[1, 2, 3],
                    pool_blocks=blocks,
                    params=params,
                    sample=True,
                    keep_resident=True,
                )
                call = stub.Session()
                await call.write(worker_pb2.StepRequest(step=1, prefill=[prefill]))
                first = await call.read()
                assert [t.request_id for t in first.tokens] == ["a"]
                wrong = worker_pb2.DecodeEntry(
                    request_id="a",
                    token_id=first.tokens[0].token_id,
                    num_kv_tokens=2,
                    params=params,
                )
                await call.write(worker_pb2.StepRequest(step=2, decode=[wrong]))
                err = await rpc_error(call.read())
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "'a'" in err.details() and "num_kv_tokens=2" in err.details()

                # the aborted session released the device; a new one works
                call = stub.Session()
                await call.write(worker_pb2.StepRequest(step=1, prefill=[prefill]))
                again = await call.read()
                assert again.tokens[0].token_id == first.tokens[0].token_id
                assert servicer.residency.num_resident == 1

                # only one session at a time, and no re-Attach under a running one
                err = await rpc_error(stub.Session().read())
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "another Session" in err.details()
                reattach = worker_pb2.AttachRequest(
                    pool_name=pool.name, num_pool_blocks=pool.num_blocks, kv_layout=info.kv_layout
                )
                err = await rpc_error(stub.Attach(reattach))
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK

            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


@pytest.mark.parametrize("overlap_steps", [True, False])
def test_a_step_sent_before_the_last_is_answered_decodes_the_sampled_token(
    model_dir, overlap_steps
):
    """Steps 2 and 3 go out before step 1 is answered; their decodes name no token
    (last_sampled) and must give what decodes naming the sampled tokens give. A decode with
    last_sampled for a request this session never sampled is refused."""
    params = sampling_to_proto(GREEDY)

    def decode(num_kv: int, token: int | None) -> worker_pb2.DecodeEntry:
        return worker_pb2.DecodeEntry(
            request_id="a",
            token_id=token or 0,
            last_sampled=token is None,
            num_kv_tokens=num_kv,
            params=params,
        )

    async def main():
        async with running_worker(model_dir, overlap_steps=overlap_steps) as (servicer, stub, _):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            async with attached(stub, info) as pool:
                prefill = worker_pb2.PrefillChunk(
                    request_id="a",
                    token_ids=[5, 9, 4, 7],
                    pool_blocks=pool.allocate(1),
                    params=params,
                    sample=True,
                    keep_resident=True,
                )
                call = stub.Session()
                await call.write(worker_pb2.StepRequest(step=1, prefill=[prefill]))
                await call.write(worker_pb2.StepRequest(step=2, decode=[decode(4, None)]))
                await call.write(worker_pb2.StepRequest(step=3, decode=[decode(5, None)]))
                ahead = [(await call.read()).tokens[0].token_id for _ in range(3)]
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK

                call = stub.Session()  # the same, each step sent once the last is answered
                await call.write(worker_pb2.StepRequest(step=1, prefill=[prefill]))
                named = [(await call.read()).tokens[0].token_id]
                for step, num_kv in ((2, 4), (3, 5)):
                    msg = worker_pb2.StepRequest(step=step, decode=[decode(num_kv, named[-1])])
                    await call.write(msg)
                    named.append((await call.read()).tokens[0].token_id)
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK

                call = stub.Session()  # nothing sampled in this session yet
                await call.write(worker_pb2.StepRequest(step=1, decode=[decode(4, None)]))
                err = await rpc_error(call.read())
                return ahead, named, err, servicer.num_launched_ahead

    ahead, named, err, num_launched_ahead = asyncio.run(main())
    assert ahead == named
    # with overlap, steps 2 and 3 were launched before 1 and 2 were answered
    assert num_launched_ahead == (2 if overlap_steps else 0)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "last_sampled" in err.details() and "'a'" in err.details()


def test_a_bad_step_sent_ahead_is_refused_after_the_step_before_is_answered(model_dir):
    """Step 2 arrives while step 1 is launched and unanswered, and cannot run: step 1's
    tokens are still answered, then the session ends marked as step 2's rejection."""

    async def main():
        async with running_worker(model_dir) as (_, stub, _):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            async with attached(stub, info) as pool:
                params = sampling_to_proto(GREEDY)
                prefill = worker_pb2.PrefillChunk(
                    request_id="a",
                    token_ids=[1, 2, 3],
                    pool_blocks=pool.allocate(1),
                    params=params,
                    sample=True,
                    keep_resident=True,
                )
                wrong = worker_pb2.DecodeEntry(
                    request_id="a", last_sampled=True, num_kv_tokens=7, params=params
                )
                call = stub.Session()
                await call.write(worker_pb2.StepRequest(step=1, prefill=[prefill]))
                await call.write(worker_pb2.StepRequest(step=2, decode=[wrong]))
                first = await call.read()
                err = await rpc_error(call.read())
                return first, err, await call.trailing_metadata()

    first, err, trailing = asyncio.run(main())
    assert first.step == 1 and [t.request_id for t in first.tokens] == ["a"]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_kv_tokens=7" in err.details()
    assert (REJECTED_STEP_KEY, "2") in tuple(trailing)


def test_chunks_for_the_prefill_device_run_there_or_are_refused(model_dir):
    """With a prefill device (a CPU replica here) Describe reports it; a chunk marked for it
    runs there (prefill_s), gives the decode device's token and leaves nothing resident; one
    that asks to stay resident, or one sent to a worker without a prefill device, is an
    INVALID_ARGUMENT that names the field."""

    def chunk(request_id, blocks, **flags):
        return worker_pb2.PrefillChunk(
            request_id=request_id,
            token_ids=[5, 6, 7, 8, 9],
            pool_blocks=blocks,
            params=sampling_to_proto(GREEDY),
            sample=True,
            **flags,
        )

    async def first_token(stub, step):
        call = stub.Session()
        await call.write(step)
        response = await call.read()
        await call.done_writing()
        return response

    async def main():
        async with running_worker(model_dir, prefetch_device="cpu", prefill_kv_tokens=64) as (
            servicer,
            stub,
            _,
        ):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            assert (info.prefill_device, info.num_prefill_blocks) == ("cpu", 64 // 16)
            async with attached(stub, info) as pool:
                there = await first_token(
                    stub,
                    worker_pb2.StepRequest(
                        step=1,
                        prefill=[chunk("a", pool.allocate(1), on_prefill_device=True)],
                        wait_prefill=True,  # nothing else to do: answer when it is done
                    ),
                )
                assert list(there.prefilled) == ["a"] and there.prefill_s > 0
                assert servicer.residency.num_resident == 0
                here = await first_token(
                    stub, worker_pb2.StepRequest(step=1, prefill=[chunk("b", pool.allocate(1))])
                )
                assert [t.token_id for t in there.tokens] == [t.token_id for t in here.tokens]
                assert here.prefill_s == 0 and not here.prefilled
                # without wait_prefill a step answers at once; a batch is answered as done
                # by a later step, in the order sent; a second queues behind the first, a
                # third is refused while both are there
                call = stub.Session()
                answers = []
                for step, request_id in enumerate("de", start=1):
                    queued = chunk(request_id, pool.allocate(1), on_prefill_device=True)
                    await call.write(worker_pb2.StepRequest(step=step, prefill=[queued]))
                    answers.append(await call.read())
                done = [r for answer in answers for r in answer.prefilled]
                if not done:
                    third = chunk("f", pool.allocate(1), on_prefill_device=True)
                    await call.write(worker_pb2.StepRequest(step=3, prefill=[third]))
                    err = await rpc_error(call.read())
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "2 batches are queued" in err.details()
                else:  # quicker than the answers: a step that waits finds the rest
                    await call.write(worker_pb2.StepRequest(step=3, wait_prefill=True))
                    answers.append(await call.read())
                    await call.done_writing()
                    assert done + list(answers[2].prefilled) == ["d", "e"]
                call = stub.Session()
                both = chunk("c", pool.allocate(1), on_prefill_device=True, keep_resident=True)
                await call.write(worker_pb2.StepRequest(step=1, prefill=[both]))
                err = await rpc_error(call.read())
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "keep_resident" in err.details()
        async with running_worker(model_dir) as (_, stub, _):
            info = await stub.Describe(worker_pb2.DescribeRequest())
            assert (info.prefill_device, info.num_prefill_blocks) == ("", 0)
            async with attached(stub, info) as pool:
                call = stub.Session()
                elsewhere = chunk("a", pool.allocate(1), on_prefill_device=True)
                await call.write(worker_pb2.StepRequest(step=1, prefill=[elsewhere]))
                err = await rpc_error(call.read())
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "no prefill device" in err.details()

    asyncio.run(main())


# ---------------------------------------------------------------- DeviceResidency alone

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_tokens=4, dtype="float32")


@pytest.fixture
def residency(request) -> DeviceResidency:
    layout = getattr(request, "param", LAYOUT)
    pool = CpuKVPool.create(layout, 8)
    owner_view = pool_tensor(pool)
    owner_view.copy_(torch.randn(owner_view.shape).to(owner_view.dtype))
    del owner_view
    mapping = PoolMapping(CpuKVPool.attach(pool.name, layout, 8), "mapped")
    res = DeviceResidency(KVCache(layout, 6), mapping)
    yield res
    res.close()
    mapping.close()
    pool.close()
    pool.unlink()


@pytest.mark.parametrize(
    "residency", [LAYOUT, KVLayout(2, 2, 4, 4, "bfloat16")], indirect=True, ids=str
)
def test_write_back_copies_only_blocks_past_the_synced_length(residency):
    pool = pool_tensor(residency.pool)
    kv = residency.kv_cache.blocks
    residency.load("x", [5, 2, 7], num_kv_tokens=6)  # 2 blocks: tokens 0..5
    table = list(residency.block_table("x"))
    assert torch.equal(kv[table], pool[[5, 2]])
    # decode 5 tokens on the "device": block 1 changes, block 2 is new
    table = list(residency.ensure_room("x", 11))
    assert len(table) == 3
    kv[table[1:]] = torch.randn(kv[table[1:]].shape).to(kv.dtype)
    residency.advance("x", 5)
    kv[table[0]] = 0  # block 0 holds synced tokens only: write-back must not touch it
    before = pool[5].clone()
    residency.write_back("x", [5, 2, 7])
    assert torch.equal(pool[5], before)
    assert torch.equal(pool[[2, 7]], kv[table[1:]])
    assert residency.num_synced("x") == 11
    residency.release("x")
    assert residency.allocator.num_used == 0


def test_a_mirror_only_pool_is_never_locked_and_its_residency_moves_no_kv():
    """fcfs's pool (AttachRequest.mirror_only) only numbers the device's blocks: a residency
    over it holds requests on the device but refuses every copy through the pool, rather
    than read or write a sparse, unlocked segment; such a pool is never page-locked."""
    pool = CpuKVPool.create(LAYOUT, 8)
    with pytest.raises(ValueError, match="access 'locked' not one of"):
        PoolMapping(pool, "locked")
    mapping = PoolMapping(CpuKVPool.attach(pool.name, LAYOUT, 8), "mirror")
    assert not mapping.is_pinned
    res = DeviceResidency(KVCache(LAYOUT, 6), mapping)
    try:
        res.prefill_chunk("x", [5] * 6, 0, [1, 2], None)  # kept on the device: no copy
        res.advance("x", 6)
        assert len(res.block_table("x")) == 2 and res.num_kv_tokens("x") == 6
        for copy in (lambda: res.load("y", [3], 4), lambda: res.write_back("x", [1, 2])):
            with pytest.raises(RuntimeError, match="mirror-only"):
                copy()
    finally:
        res.close()
        mapping.close()
        pool.close()
        pool.unlink()


def test_loads_report_their_seconds_once_and_on_the_cpu_are_never_copying(residency):
    residency.load_batch([("x", [5, 2], 6), ("y", [0], 3)])
    assert residency.copying() == []  # CPU copies are done when load returns
    assert residency.landed_seconds() > 0
    assert residency.landed_seconds() == 0.0  # reported once
    residency.load_batch([])
    assert residency.landed_seconds() == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loads_copy_beside_the_stream_and_report_when_landed():
    """A GPU load's copies run on side streams: the residency lists the request as copying
    until they end (never waiting for them), then reports the batch's seconds once; a
    released request is copying no more. Its blocks hold the pool's KV once used."""
    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="bfloat16")
    pool = CpuKVPool.create(layout, 512)
    owner = pool_tensor(pool)
    owner.copy_(torch.randn(owner.shape).to(owner.dtype))
    mapping = PoolMapping(CpuKVPool.attach(pool.name, layout, 512), "pinned")
    res = DeviceResidency(KVCache(layout, 600, device="cuda"), mapping)
    try:
        torch.cuda._sleep(1 << 30)  # the stream busy (~0.5 s): the copies queue behind it
        res.load_batch([("x", list(range(256)), 256 * 16), ("y", list(range(256, 512)), 4096)])
        assert set(res.copying()) == {"x", "y"} and res.landed_seconds() == 0.0
        res.release("y")
        assert "y" not in res.copying()
        torch.cuda.synchronize()
        assert res.copying() == []
        assert res.landed_seconds() > 0 and res.landed_seconds() == 0.0
        table = list(res.block_table("x"))
        res.decode_chunk("x", 1, 256 * 16, GREEDY)  # a use: the stream waits for the copies
        torch.cuda.synchronize()
        assert torch.equal(res.kv_cache.blocks[table].cpu(), owner[:256])
    finally:
        res.close()
        mapping.close()
        del owner
        pool.close()
        pool.unlink()


def test_device_full_raises_and_changes_nothing(residency):
    residency.load("x", [0, 1, 2, 3], num_kv_tokens=16)
    with pytest.raises(OutOfBlocksError):
        residency.ensure_room("x", 4 * 7)
    assert len(residency.block_table("x")) == 4
    assert residency.allocator.num_used == 4


def test_bad_plans_are_invalid_requests(residency):
    with pytest.raises(InvalidRequestError, match="needs 2"):
        residency.load("x", [0], num_kv_tokens=5)
    with pytest.raises(InvalidRequestError, match="out of range"):
        residency.load("x", [0, 99], num_kv_tokens=5)
    with pytest.raises(InvalidRequestError, match="not resident"):
        residency.decode_chunk("y", 1, 0, GREEDY)
    residency.load("x", [0, 1], num_kv_tokens=5)
    with pytest.raises(InvalidRequestError, match="already resident"):
        residency.load("x", [0, 1], num_kv_tokens=5)
    with pytest.raises(InvalidRequestError, match="num_kv_tokens=4"):
        residency.decode_chunk("x", 1, 4, GREEDY)
    residency.release("never-loaded")  # finished wherever its KV is: nothing to free


def test_a_steps_loads_copy_together_and_a_failing_one_keeps_those_before(residency):
    """load_batch: every load's blocks land; one that fails raises after the loads before
    it are in (their blocks copied), and leaves nothing of its own."""
    pool = pool_tensor(residency.pool)
    kv = residency.kv_cache.blocks
    residency.load_batch([("a", [3, 4], 5), ("b", [6], 4), ("c", [], 0)])
    assert residency.landed_seconds() > 0 and residency.copying() == []
    assert torch.equal(kv[list(residency.block_table("a"))], pool[[3, 4]])
    assert torch.equal(kv[list(residency.block_table("b"))], pool[[6]])
    assert residency.block_table("c") == () and residency.allocator.num_used == 3
    with pytest.raises(OutOfBlocksError):
        residency.load_batch([("d", [0, 1], 8), ("e", [2, 5], 8)])  # 6 device blocks
    assert torch.equal(kv[list(residency.block_table("d"))], pool[[0, 1]])
    assert not residency.is_resident("e") and residency.allocator.num_used == 5


# ---------------------------------------------------------------- config, CLI, process


def test_flags_come_from_the_config_fields():
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert config_from_args(parser.parse_args(["--model", "m"])) == WorkerConfig(model_dir="m")
    argv = "--model m --device cuda:1 --dtype bfloat16 --host 0.0.0.0 --port 7001"
    argv += " --num-device-blocks 9 --block-tokens 32 --session-handover-s 0.5"
    assert config_from_args(parser.parse_args(argv.split())) == WorkerConfig(
        model_dir="m",
        device="cuda:1",
        dtype="bfloat16",
        host="0.0.0.0",
        port=7001,
        num_device_blocks=9,
        block_tokens=32,
        session_handover_s=0.5,
    )


@pytest.mark.parametrize(
    "field_name, value",
    [("port", 70000), ("num_device_blocks", 0), ("block_tokens", 0), ("dtype", "int8")],
)
def test_config_rejects_bad_values_by_name(field_name, value):
    with pytest.raises(ConfigError, match=f"WorkerConfig.{field_name}="):
        WorkerConfig(model_dir="m", **{field_name: value})


def test_import_pulls_in_no_http_stack_and_no_torch():
    code = textwrap.dedent(
        """
        import sys
        import alignedserve.worker.service
        print(sorted(m for m in ("fastapi", "uvicorn", "openai", "torch") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_run_worker_stops_gracefully_on_sigterm(model_dir):
    port = free_port()
    code = (
        "import sys\n"
        "from alignedserve.worker.server import run_worker\n"
        "from alignedserve.worker.service import WorkerConfig\n"
        f"sys.exit(run_worker(WorkerConfig(model_dir={str(model_dir)!r}, port={port})))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    async def wait_serving() -> None:
        """It listens while it loads the model (NOT_SERVING), then serves."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            async for reply in health.Watch(request, wait_for_ready=True, timeout=60):
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            raise AssertionError("the worker never served")

    try:
        asyncio.run(wait_serving())
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr


def test_the_batcher_queues_no_more_prefill_batches_than_the_worker_takes():
    from alignedserve.batcher.scheduler.core import PREFILL_BATCHES_IN_FLIGHT
    from alignedserve.worker.executor import MAX_PREFILL_BATCHES

    assert PREFILL_BATCHES_IN_FLIGHT == MAX_PREFILL_BATCHES
