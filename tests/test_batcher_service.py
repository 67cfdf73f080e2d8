"""The batcher service driving a real worker service, both over loopback gRPC: greedy tokens
equal the runtime's own, aborts free blocks, and a worker that dies mid-run costs a delay,
never a token."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from alignedserve.batcher import engine
from alignedserve.batcher.service import BatcherConfig, serve_batcher
from alignedserve.common import wire
from alignedserve.common.errors import ConfigError
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.serve import free_port, free_ports
from alignedserve.worker.executor import StepExecutor
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.server import serve_worker
from alignedserve.worker.service import WorkerConfig

import factories
from factories import random_prompts
from fake_batcher import eventually


@contextlib.asynccontextmanager
async def stack(
    model_dir,
    worker_port,
    device="cpu",
    prefetch_device=None,
    device_blocks=2048,
    prefill_decode_blocks=0,
    worker_first=False,
    **batcher_kw,
):
    """A worker and a batcher on loopback; yields (batcher stub, worker task holder). The
    batcher starts at once (it attaches while the worker loads), or once the worker has
    loaded its model (`worker_first`)."""
    config = WorkerConfig(
        model_dir,
        port=worker_port,
        device=device,
        prefetch_device=prefetch_device,
        num_device_blocks=device_blocks,
        prefill_decode_blocks=prefill_decode_blocks,
    )
    loaded = asyncio.Event()
    worker = {"task": asyncio.create_task(serve_worker(config, loaded))}
    if worker_first:
        await asyncio.wait_for(loaded.wait(), 60)
    started = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    config = BatcherConfig(
        worker=f"127.0.0.1:{worker_port}", port=0, pool_gib=0.05, drain_s=5, **batcher_kw
    )
    batcher = asyncio.create_task(serve_batcher(config, started=started, stop=stop))
    port = await asyncio.wait_for(started, 60)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield batcher_pb2_grpc.BatcherStub(channel), worker
    finally:
        stop.set()
        await asyncio.wait_for(batcher, 30)
        await channel.close()
        worker["task"].cancel()
        await asyncio.gather(worker["task"], return_exceptions=True)


async def generate(stub, request_id, prompt, params, progress=None):
    tokens = progress.setdefault(request_id, []) if progress is not None else []
    finish, usage = None, None
    call = stub.Generate(
        batcher_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt, params=wire.sampling_to_proto(params)
        )
    )
    async for msg in call:
        tokens += msg.token_ids
        if msg.finish_reason:
            finish, usage = msg.finish_reason, msg.usage
    return tokens, finish, usage


def greedy(n):
    return factories.greedy(n, ignore_eos=True)


def assert_serves_the_runtimes_tokens(model_dir, device, prompts, n, prefix, **stack_kw):
    """Every prompt at once through a worker on `device` ("decode" or "decode+prefetch") and
    a batcher (`stack_kw`), greedy for n tokens: each gets the runtime's tokens, all n."""
    expected = LocalRuntime.from_dir(model_dir).generate(prompts, [greedy(n)] * len(prompts))

    async def main():
        decode, _, prefetch = device.partition("+")
        async with stack(model_dir, free_port(), decode, prefetch or None, **stack_kw) as (
            stub,
            _,
        ):
            return await asyncio.wait_for(
                asyncio.gather(
                    *(generate(stub, f"{prefix}{i}", p, greedy(n)) for i, p in enumerate(prompts))
                ),
                120,
            )

    for (tokens, finish, _), ref in zip(asyncio.run(main()), expected, strict=True):
        assert tokens == ref.token_ids
        assert finish == "length"


@pytest.mark.parametrize(
    ("policy", "device"),
    [
        ("aligned", "cpu"),
        ("fcfs", "cpu"),
        # prefill on a second replica (the prefetch device), its KV into the pool, from there
        # loaded onto the decode device; fcfs, the baseline, keeps every chunk on the latter
        ("aligned", "cpu+cpu"),
        ("fcfs", "cpu+cpu"),
        # the worker on a GPU: CUDA-graph decode, fused kernels, pinned-pool loads/write-backs
        pytest.param("aligned", "cuda", marks=pytest.mark.gpu),
        # the GPU pair: loads over both PCIe links (the prefetch GPU's via NVLink)
        pytest.param("aligned", "cuda:0+cuda:1", marks=pytest.mark.gpu2),
        # a worker on a GPU that is not the process's first (Triton launches on the
        # current device): one fcfs engine of a data-parallel pair
        pytest.param("fcfs", "cuda:1", marks=pytest.mark.gpu2),
    ],
)
def test_greedy_tokens_equal_the_runtime(model_dir, policy, device, monkeypatch):
    prompts = random_prompts((5, 17, 33, 60, 9, 24), seed=4)
    expected = LocalRuntime.from_dir(model_dir).generate(prompts, [greedy(20)] * len(prompts))
    from alignedserve.worker.prefiller import Prefiller

    offloaded = []  # request ids the prefill device prefilled
    run = Prefiller.run

    def counting_run(self, jobs, pool):
        offloaded.extend(job.request_id for job in jobs)
        return run(self, jobs, pool)

    monkeypatch.setattr(Prefiller, "run", counting_run)

    async def main():
        decode, _, prefetch = device.partition("+")
        async with stack(model_dir, free_port(), decode, prefetch or None, policy=policy) as (
            stub,
            _,
        ):
            results = await asyncio.gather(
                *(generate(stub, f"r{i}", p, greedy(20)) for i, p in enumerate(prompts))
            )
            load = await stub.GetLoad(batcher_pb2.GetLoadRequest())
            return results, load

    results, load = asyncio.run(main())
    for (tokens, finish, usage), prompt, ref in zip(results, prompts, expected, strict=True):
        assert tokens == ref.token_ids
        assert finish == "length"
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 20)
    assert load.worker_ready and load.kv_pool_usage == 0.0 and load.num_running == 0
    # aligned beside a prefill device prefills there (all but what the idle decode device
    # helps with); without one, or for fcfs, nothing runs there
    assert bool(offloaded) == (policy == "aligned" and "+" in device), offloaded


@pytest.mark.parametrize(
    ("device", "weight_kv_tokens"),
    [
        ("cpu+cpu", None),
        ("cpu+cpu", 1),
        pytest.param("cuda:0+cuda:1", 1, marks=pytest.mark.gpu2),
    ],
)
def test_the_prefill_device_decodes_too_and_gives_the_runtimes_tokens(
    model_dir, device, weight_kv_tokens, monkeypatch
):
    """With decode blocks on the prefill device, aligned sends it residents of its own once
    no prompt waits: from the pool, while the decode device is full (12 blocks here), or
    from the decode device itself (the weights made cheap to read: weight_kv_tokens=1, so
    any KV gap between the two is worth closing). Prompts that arrive later send them back
    to the pool. The tokens are the runtime's, whichever device decoded them."""
    from alignedserve.worker.residency import DeviceResidency

    there = []  # requests decoded on the prefill device
    decode_chunk = DeviceResidency.decode_chunk

    def counting_decode_chunk(self, request_id, *args):
        if self.on_prefill_device:
            there.append(request_id)
        return decode_chunk(self, request_id, *args)

    monkeypatch.setattr(DeviceResidency, "decode_chunk", counting_decode_chunk)
    # each answer with the passes its step ran: (decode device's, prefill device's)
    answered = []
    finish = StepExecutor.finish

    def recording_finish(self, launched):
        response = finish(self, launched)
        answered.append((response, launched.run is not None, launched.second_run is not None))
        return response

    monkeypatch.setattr(StepExecutor, "finish", recording_finish)
    # the lane's mechanics: it opens as soon as no prompt waits (no quiet period first)
    for_worker = engine.scheduler_config_for
    monkeypatch.setattr(
        engine,
        "scheduler_config_for",
        lambda *args: replace(for_worker(*args), prefill_lane_quiet_s=0.0),
    )
    prompts = random_prompts((40, 35, 50, 45, 38, 42, 47, 33), seed=5)
    n = 30
    expected = LocalRuntime.from_dir(model_dir).generate(prompts, [greedy(n)] * len(prompts))

    async def main():
        decode, _, prefetch = device.partition("+")
        async with stack(
            model_dir,
            free_port(),
            decode,
            prefetch,
            device_blocks=12 if weight_kv_tokens is None else 64,
            prefill_decode_blocks=24,
            weight_kv_tokens=weight_kv_tokens,
        ) as (stub, _):
            first = [generate(stub, f"a{i}", p, greedy(n)) for i, p in enumerate(prompts[:6])]
            tasks = [asyncio.ensure_future(job) for job in first]
            async with asyncio.timeout(60):
                while len(there) < 10:  # the later prompts come once it decodes
                    await asyncio.sleep(0.01)
            later = [generate(stub, f"b{i}", p, greedy(n)) for i, p in enumerate(prompts[6:])]
            return await asyncio.wait_for(asyncio.gather(*tasks, *later), 120)

    for (tokens, finish_reason, _), ref in zip(asyncio.run(main()), expected, strict=True):
        assert tokens == ref.token_ids
        assert finish_reason == "length"
    assert len(set(there)) >= 2, there
    # each device's pass time is its own: the decode device's in compute_s (the prefill
    # share reads it as such), the prefill device's in second_compute_s
    assert any(second for _, _, second in answered)
    for response, first, second in answered:
        assert (response.compute_s > 0, response.second_compute_s > 0) == (first, second)


@pytest.mark.parametrize(
    ("policy", "device"),
    [
        ("aligned", "cpu"),
        ("fcfs", "cpu"),
        # pinned-pool loads and write-backs, CUDA graphs, a scratch block beside the 12
        pytest.param("aligned", "cuda", marks=pytest.mark.gpu),
        pytest.param("fcfs", "cuda", marks=pytest.mark.gpu),
        # prefill on a CPU prefetch device (a replica), loads from the pool on the CPU
        ("aligned", "cpu+cpu"),
        # loads through the prefetch GPU too, and prefill there
        pytest.param("aligned", "cuda:0+cuda:1", marks=pytest.mark.gpu2),
    ],
)
def test_a_full_device_preempts_and_still_gives_the_runtimes_tokens(model_dir, policy, device):
    """Device KV for about two of eight requests: fcfs preempts (and recomputes) running
    requests, aligned keeps most in the pool. The worker must free a preempted request's
    blocks before the plan hands them on (it ran out of blocks and looped on recovery)."""
    prompts = random_prompts((40, 35, 50, 45, 38, 42, 47, 33), seed=9)
    assert_serves_the_runtimes_tokens(
        model_dir, device, prompts, 40, "p", device_blocks=12, policy=policy
    )


@pytest.mark.parametrize(("device", "prefill_decode_blocks"), [("cpu", 0), ("cpu+cpu", 24)])
def test_loads_listed_as_copying_for_several_answers_still_give_the_runtimes_tokens(
    model_dir, device, prefill_decode_blocks, monkeypatch
):
    """On a GPU a load's copies can outlast several steps: the worker lists the request as
    copying in its answers meanwhile, and the batcher decodes it only once an answer no
    longer does (or if nothing else is ready). Here the CPU worker lists every load in its
    next six answers: requests loaded by steps still in flight, onto either device, must
    all still be decoded, to the runtime's tokens, and each is reported landed to the
    policy once an answer no longer lists it. (Which members a step leaves out is the
    policy's rule, tested in test_scheduler.py.)"""
    from alignedserve.worker.residency import DeviceResidency

    listed: dict[str, int] = {}  # request -> answers still to list it in (both devices)
    load_batch = DeviceResidency.load_batch

    def slow_load_batch(self, loads):
        load_batch(self, loads)
        listed.update((request_id, 6) for request_id, _, _ in loads)

    def slow_copying(self):
        if self.on_prefill_device:  # asked once per answer of each device: count the first's
            return []
        for request_id in list(listed):
            listed[request_id] -= 1
            there = self.second is not None and self.second.is_resident(request_id)
            if listed[request_id] <= 0 or not (self.is_resident(request_id) or there):
                del listed[request_id]
        return list(listed)

    monkeypatch.setattr(DeviceResidency, "load_batch", slow_load_batch)
    monkeypatch.setattr(DeviceResidency, "copying", slow_copying)
    from alignedserve.batcher.scheduler.aligned import AlignedPolicy

    copied: list[str] = []  # what the engine told the policy has landed
    on_copied = AlignedPolicy.on_copied

    def recording_on_copied(self, request_ids):
        copied.extend(request_ids)
        return on_copied(self, request_ids)

    monkeypatch.setattr(AlignedPolicy, "on_copied", recording_on_copied)
    answers: list[set[str]] = []  # each answer's listed requests
    finish = StepExecutor.finish

    def recording_finish(self, launched):
        response = finish(self, launched)
        answers.append(set(response.copying))
        return response

    monkeypatch.setattr(StepExecutor, "finish", recording_finish)
    prompts = random_prompts((40, 35, 50, 45, 38, 42, 47, 33), seed=7)
    assert_serves_the_runtimes_tokens(
        model_dir,
        device,
        prompts,
        24,
        "c",
        device_blocks=12,  # about two requests: loads keep coming from the pool
        prefill_decode_blocks=prefill_decode_blocks,
    )
    ever_listed = set().union(*answers)
    assert ever_listed  # loads were listed across answers
    assert ever_listed <= set(copied)  # each was reported landed once no answer listed it


@pytest.mark.parametrize("policy", ["aligned", "fcfs"])
def test_a_step_the_worker_rejects_fails_its_requests_and_the_batcher_serves_on(
    model_dir, policy, monkeypatch, caplog
):
    """A worker that claims 64 device blocks but has 6 (a misconfiguration): the plan for a
    request of 8 blocks is answered RESOURCE_EXHAUSTED. Sending it again would fail again,
    so it is no lost worker: that request fails with the worker's reason (logged once), and
    the batcher goes on serving the next one with the runtime's tokens."""
    from alignedserve.worker import server as worker_server

    load = worker_server.load

    def claims_more_blocks(config):
        model = load(config)
        model.info.num_device_blocks = 64
        return model

    monkeypatch.setattr(worker_server, "load", claims_more_blocks)
    big, small = random_prompts((120, 20), seed=12)
    expected = LocalRuntime.from_dir(model_dir).generate([small], [greedy(10)])[0]

    async def main():
        async with stack(model_dir, free_port(), device_blocks=6, policy=policy) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(generate(stub, "big", big, greedy(10)), 60)
            served = await asyncio.wait_for(generate(stub, "small", small, greedy(10)), 60)
            load = await stub.GetLoad(batcher_pb2.GetLoadRequest())
            return failed.value, served, load

    with caplog.at_level("ERROR", logger="alignedserve.batcher.engine"):
        error, (tokens, finish, _), load = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "RESOURCE_EXHAUSTED" in error.details() and "KV blocks" in error.details()
    rejected = [r for r in caplog.records if "rejected step" in r.getMessage()]
    assert len(rejected) == 1, caplog.text
    assert (tokens, finish) == (expected.token_ids, "length")
    assert load.worker_ready and load.num_running + load.num_waiting + load.num_pooled == 0


def test_abort_and_cancel_free_everything(model_dir):
    prompts = random_prompts((12,) * 8, seed=5)

    async def main():
        async with stack(model_dir, free_port()) as (stub, _):
            calls = [
                stub.Generate(
                    batcher_pb2.GenerateRequest(
                        request_id=f"a{i}",
                        prompt_token_ids=p,
                        params=wire.sampling_to_proto(greedy(1000)),
                    )
                )
                for i, p in enumerate(prompts)
            ]
            for call in calls:
                await call.read()  # each has a first token
            for i in range(4):
                assert (await stub.Abort(batcher_pb2.AbortRequest(request_id=f"a{i}"))).found
            for call in calls[4:]:
                call.cancel()  # a router whose client went away
            finals = []
            for call in calls[:4]:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    if msg.finish_reason:
                        finals.append(msg.finish_reason)
            for _ in range(100):
                load = await stub.GetLoad(batcher_pb2.GetLoadRequest())
                if load.kv_pool_usage == 0 and load.num_running + load.num_waiting == 0:
                    break
                await asyncio.sleep(0.05)
            return finals, load

    finals, load = asyncio.run(main())
    assert finals == ["abort"] * 4
    assert load.kv_pool_usage == 0.0 and load.num_running == load.num_pooled == 0


def start_worker_process(model_dir: str, port: int) -> subprocess.Popen:
    code = (
        "from alignedserve.worker.server import run_worker; "
        "from alignedserve.worker.service import WorkerConfig; "
        f"run_worker(WorkerConfig({model_dir!r}, port={port}))"
    )
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)


@contextlib.asynccontextmanager
async def batcher_of(worker_port: int, recovery_s: float):
    """A batcher (a small pool) of the worker at that port, recovering for `recovery_s`;
    yields its stub, and stops it on the way out."""
    started = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    config = BatcherConfig(
        worker=f"127.0.0.1:{worker_port}", port=0, pool_gib=0.05, worker_recovery_s=recovery_s
    )
    batcher = asyncio.create_task(serve_batcher(config, started=started, stop=stop))
    bport = await asyncio.wait_for(started, 60)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bport}") as channel:
            yield batcher_pb2_grpc.BatcherStub(channel)
    finally:
        stop.set()
        await batcher


def test_worker_process_killed_mid_run_loses_no_token(model_dir, caplog):
    """SIGKILL the worker process mid-generation, start a new one on the same address: every
    request completes with exactly the tokens an uninterrupted run gives."""
    prompts = random_prompts((7, 30, 15, 22), seed=6)
    n = 300
    # EOS ignored by all four, the sampled one too: each must still be mid-run at the kill (the
    # sampled one hit EOS after 11 tokens, and on a busy machine it had sometimes finished).
    sampled = SamplingParams(max_tokens=n, temperature=0.9, seed=11, ignore_eos=True)
    params = [greedy(n), greedy(n), sampled, greedy(n)]
    expected = LocalRuntime.from_dir(model_dir).generate(prompts, params)
    port = free_port()
    progress: dict[str, list[int]] = {}
    workers = [start_worker_process(model_dir, port)]

    async def main():
        async with batcher_of(port, recovery_s=60) as stub:
            runs = [
                asyncio.create_task(generate(stub, f"k{i}", p, params[i], progress))
                for i, p in enumerate(prompts)
            ]
            while len(progress) < len(prompts) or min(map(len, progress.values())) < 5:
                await asyncio.sleep(0.005)
            at_kill = [len(t) for t in progress.values()]
            workers[0].kill()  # SIGKILL: no goodbye, its device KV is gone
            workers[0].wait()
            workers.append(start_worker_process(model_dir, port))
            results = await asyncio.wait_for(asyncio.gather(*runs), 90)
        return at_kill, results

    try:
        with caplog.at_level("WARNING", logger="alignedserve.batcher.engine"):
            at_kill, results = asyncio.run(main())
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert "worker lost" in caplog.text  # the batcher saw the crash and recovered
    assert all(n_then < len(ref.token_ids) for n_then, ref in zip(at_kill, expected, strict=True))
    for (tokens, finish, _), ref in zip(results, expected, strict=True):
        assert tokens == ref.token_ids
        assert finish == ref.finish_reason


def test_a_worker_back_with_another_kv_layout_fails_the_live_requests_then_serves_again(
    model_dir, tmp_path
):
    """The worker restarts with a model of another KV layout: it refuses the batcher's pool
    (INVALID_ARGUMENT, which no retry mends). The requests in flight fail UNAVAILABLE at
    once, rather than hang or wait out the recovery window, and the batcher keeps running:
    once the right worker is back, a new request gets the runtime's tokens."""
    from alignedserve.worker.tiny import init_tiny

    other = str(init_tiny(tmp_path / "opt", arch="opt"))  # another model: another KV layout
    (prompt,) = random_prompts((12,), seed=8)
    expected = LocalRuntime.from_dir(model_dir).generate([prompt], [greedy(6)])[0]
    port = free_port()
    progress: dict[str, list[int]] = {}
    workers = [start_worker_process(model_dir, port)]

    async def main():
        async with batcher_of(port, recovery_s=2) as stub:
            run = asyncio.create_task(generate(stub, "long", prompt, greedy(10_000), progress))
            while len(progress.get("long", ())) < 3:
                await asyncio.sleep(0.005)
            workers[0].kill()
            workers[0].wait()
            workers.append(start_worker_process(other, port))
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await asyncio.wait_for(run, 60)
            workers[1].kill()
            workers[1].wait()
            workers.append(start_worker_process(model_dir, port))
            again = await asyncio.wait_for(generate(stub, "again", prompt, greedy(6)), 90)
        return lost.value, again

    try:
        lost, (tokens, finish, _) = asyncio.run(main())
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert lost.code() == grpc.StatusCode.UNAVAILABLE
    assert "layout" in lost.details()
    assert (tokens, finish) == (expected.token_ids, "length")


def test_health_is_serving_only_while_a_worker_answers(model_dir):
    """Readiness means "can serve": NOT_SERVING before the worker is up and after it dies,
    SERVING while it answers (what Kubernetes' gRPC readiness probe of the pod reads)."""
    from alignedserve.common.proto import health_pb2, health_pb2_grpc

    port, bport = free_ports(2)  # the worker's (it starts later) and the batcher's
    workers: list[subprocess.Popen] = []

    async def status_becomes(stub, want, timeout_s=60.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            if reply.status == want or asyncio.get_running_loop().time() > deadline:
                return reply.status
            await asyncio.sleep(0.05)

    async def main():
        stop = asyncio.Event()
        config = BatcherConfig(worker=f"127.0.0.1:{port}", port=bport, pool_gib=0.05)
        # `started` would only fire once a worker is attached; the health service is up first
        batcher = asyncio.create_task(serve_batcher(config, stop=stop))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bport}") as channel:
            await channel.channel_ready()
            stub = health_pb2_grpc.HealthStub(channel)
            serving, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            seen = [await status_becomes(stub, serving, timeout_s=1.0)]  # no worker yet
            workers.append(start_worker_process(model_dir, port))
            seen.append(await status_becomes(stub, serving))
            workers[0].kill()
            workers[0].wait()
            seen.append(await status_becomes(stub, not_serving))
        stop.set()
        await batcher
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        for w in workers:
            w.kill()
            w.wait()
    names = health_pb2.HealthCheckResponse.ServingStatus.Name
    assert [names(s) for s in seen] == ["NOT_SERVING", "SERVING", "NOT_SERVING"]


def test_metrics_keep_their_colons_for_prometheus():
    """Prometheus asks for OpenMetrics 1.0 first; our server answers in the classic format,
    so `alignedserve:*` names reach it unescaped."""
    import urllib.request

    from alignedserve.common import metrics

    port = free_port()
    server = metrics.start_metrics_server(port, "127.0.0.1")
    try:
        accept = (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
    assert "# TYPE alignedserve:num_requests_waiting gauge" in text
    assert "alignedserve_num_requests_waiting" not in text


def test_stop_while_waiting_for_the_first_worker_stops_at_once():
    """SIGTERM (the stop event) before any worker answers: the batcher stops within a
    moment, not after worker_startup_s (600 s)."""

    async def main():
        stop = asyncio.Event()
        config = BatcherConfig(worker=f"127.0.0.1:{free_port()}", port=0, pool_gib=0.05)
        batcher = asyncio.create_task(serve_batcher(config, stop=stop))
        await asyncio.sleep(0.5)  # connecting: nothing listens there
        assert not batcher.done()
        stop.set()
        await asyncio.wait_for(batcher, timeout=5.0)  # TimeoutError: it ignored the stop

    asyncio.run(main())


def test_the_pool_is_reserved_while_the_worker_loads_and_removed_at_stop(monkeypatch):
    """The pool's memory is allocated before any worker answers (it tells the KV layout, and
    a large pool takes tens of seconds to allocate); a batcher stopped before then leaves no
    segment behind."""
    from alignedserve.batcher import kv_pool

    name = f"{kv_pool.NAME_PREFIX}t{os.getpid():x}"[:28]
    monkeypatch.setattr(kv_pool, "_new_name", lambda: name)
    path = Path("/dev/shm") / name

    async def main():
        stop = asyncio.Event()
        config = BatcherConfig(worker=f"127.0.0.1:{free_port()}", port=0, pool_gib=0.05)
        batcher = asyncio.create_task(serve_batcher(config, stop=stop))
        await eventually(lambda: path.exists() and path.stat().st_blocks * 512 >= 0.05 * 2**30)
        assert path.stat().st_size == int(0.05 * 2**30)  # not yet cut into blocks
        assert not batcher.done()
        stop.set()
        await asyncio.wait_for(batcher, timeout=5.0)

    asyncio.run(main())
    assert not path.exists()


def test_a_dev_shm_too_small_fails_at_start_without_a_worker(monkeypatch):
    """The pool cannot be reserved: the batcher fails with why at once, not after waiting
    worker_startup_s for a worker (none listens here)."""
    from alignedserve.batcher import kv_pool

    monkeypatch.setattr(kv_pool, "_shm_free_bytes", lambda: 1 << 20)

    async def main():
        config = BatcherConfig(worker=f"127.0.0.1:{free_port()}", port=0, pool_gib=0.05)
        await asyncio.wait_for(serve_batcher(config, stop=asyncio.Event()), timeout=10.0)

    with pytest.raises(ConfigError, match="too small"):
        asyncio.run(main())


def test_an_attach_that_times_out_is_retried_with_the_same_pool(model_dir, monkeypatch):
    """Attach answers once the worker has page-locked the pool, which takes tens of seconds
    for a large one. A batcher whose Attach timed out used to create a new pool at each retry,
    leaking the last in /dev/shm until none fitted (aligned never started with a 96 GiB pool
    on 2xH200). Here the worker has loaded its model (so Attach's deadline is the pool's
    own), and the first Attach outlasts it: the retry reuses the one pool, and the batcher
    serves."""
    from alignedserve.batcher import worker_link
    from alignedserve.batcher.kv_pool import PoolSegment
    from alignedserve.worker.service import WorkerServicer

    monkeypatch.setattr(worker_link, "ATTACH_BASE_S", 0.5)
    monkeypatch.setattr(worker_link, "ATTACH_S_PER_GIB", 0.0)
    attach = WorkerServicer.Attach
    calls = []

    async def slow_first_attach(self, request, context):
        calls.append(request.pool_name)
        if len(calls) == 1:
            await asyncio.sleep(1.5)  # past the batcher's deadline
        return await attach(self, request, context)

    monkeypatch.setattr(WorkerServicer, "Attach", slow_first_attach)
    created = []
    carve = PoolSegment.carve

    def counting_carve(self, layout):
        created.append(carve(self, layout))
        return created[-1]

    monkeypatch.setattr(PoolSegment, "carve", counting_carve)
    prompt = random_prompts((12,), seed=3)[0]
    expected = LocalRuntime.from_dir(model_dir).generate([prompt], [greedy(5)])[0]

    async def main():
        async with stack(model_dir, free_port(), worker_first=True) as (stub, _):
            return await asyncio.wait_for(generate(stub, "a", prompt, greedy(5)), 60)

    tokens, finish, _ = asyncio.run(main())
    assert tokens == expected.token_ids and finish == "length"
    assert len(calls) >= 2 and len(set(calls)) == 1, calls  # retried, with the same pool
    assert len(created) == 1, [pool.name for pool in created]


def test_fcfs_mirrors_its_devices_blocks_in_a_sparse_pool_the_worker_does_not_lock(
    model_dir, monkeypatch, caplog
):
    """fcfs keeps every running request's KV on the device, so its pool only numbers the
    device's blocks: a sparse segment of exactly them, whatever --pool-gib says (here a
    pool of fewer blocks than the device, which used to cap fcfs at the pool's), attached
    mirror-only, so the worker neither page-locks nor touches it; and it serves the runtime's
    tokens."""
    from alignedserve.common.kv_layout import KVLayout
    from alignedserve.common.model_config import ModelConfig
    from alignedserve.worker import server as worker_server

    layout = KVLayout.for_model(ModelConfig.from_dir(model_dir))
    device_blocks = 2 * int(0.05 * 2**30 // layout.block_bytes)  # twice stack's 0.05 GiB pool
    copied = []
    map_pool = worker_server.map_pool

    def recorded_map_pool(pool, is_copied, gpu):
        copied.append(is_copied)
        return map_pool(pool, is_copied, gpu)

    monkeypatch.setattr(worker_server, "map_pool", recorded_map_pool)
    prompt = random_prompts((30,), seed=21)[0]
    expected = LocalRuntime.from_dir(model_dir).generate([prompt], [greedy(6)])[0]

    async def main():
        async with stack(model_dir, free_port(), device_blocks=device_blocks, policy="fcfs") as (
            stub,
            _,
        ):
            served = await asyncio.wait_for(generate(stub, "r", prompt, greedy(6)), 60)
            attached = next(
                r.getMessage() for r in caplog.records if r.getMessage().startswith("attached")
            )
            name = attached.split("'")[1]
            segment = os.stat(f"/dev/shm/{name}")
            return served, attached, segment

    with caplog.at_level("INFO", logger="alignedserve.worker.service"):
        (tokens, finish, _), attached, segment = asyncio.run(main())
    assert (tokens, finish) == (expected.token_ids, "length")
    assert f"({device_blocks} blocks, mirror only: not page-locked)" in attached
    assert copied == [False]
    assert segment.st_size == device_blocks * layout.block_bytes
    assert segment.st_blocks * 512 < segment.st_size / 100  # sparse: its pages never written
