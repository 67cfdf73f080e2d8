"""No step plan asks the worker for more device KV blocks than it has, for both policies,
over random workloads on small devices.

The engine turns each plan into the StepRequest it sends (its own `_to_proto`, releases
included) and applies the answer (`_after_step`), one or two steps in flight as its loop
runs them; `DeviceModel` stands for the worker: it allocates and frees blocks for a
StepRequest exactly as worker/service.py `_execute` does over worker/residency.py (release,
load, prefill chunks, decode, then write-back and free of the chunks not kept resident and
of the evicted), and fails the way the worker does when a plan asks for more than is free.
It also checks that a load only asks for KV that a write-back put in the pool, and that every
input token is the right one: its "model" samples a fixed token per request and position
(`token_at`, a stop token now and then), so a decode sent before its input token was
answered must name the one the device sampled. Random aborts and worker losses (the
engine's recovery) mix in; every request must finish with exactly its tokens, up to its
first stop token where it heeds them. No model, no gRPC: thousands of steps a second.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from alignedserve.batcher import engine as engine_module
from alignedserve.batcher.engine import BatcherEngine
from alignedserve.batcher.engine_config import EngineConfig, scheduler_config_for
from alignedserve.batcher.scheduler import SchedulerConfig, make_scheduler
from alignedserve.batcher.scheduler.core import PREFILL_BATCHES_IN_FLIGHT
from alignedserve.batcher.streams import Delta
from alignedserve.common import wire
from alignedserve.common.errors import InvalidRequestError, OutOfBlocksError
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.proto import worker_pb2
from alignedserve.common.sampling_params import SamplingParams

MAX_MODEL_LEN = 256
EOS = 2


def token_at(request_id: str, position: int, prompt_tokens: int) -> int:
    """The token at `position` of a request: its prompt (1, 2, ...), then what the model
    samples: a stop token (EOS) every 37th position or so, else a token of its own."""
    if position < prompt_tokens:
        return position + 1
    i = int(request_id[1:])
    return EOS if (i * 7 + position) % 37 == 0 else 10 + (i * 13 + position) % 300


def heeds_eos(i: int) -> bool:
    return i % 3 == 0


class DeviceModel:
    """The worker's device blocks per request, as residency.py allocates them, and how much
    of each request's KV its write-backs have put in the pool (a load must find it there)."""

    def __init__(
        self,
        num_blocks: int,
        block_tokens: int,
        num_staging_blocks: int = 0,
        prefill_delay=0,
        num_there_blocks: int = 0,
    ):
        self.num_blocks = num_blocks
        # the prefill device's decode blocks, and its residents (on_prefill_device entries)
        self.num_there_blocks = num_there_blocks
        self.there: dict[str, list[int]] = {}
        self.num_decoded_there = 0
        self.decoded_here: set[str] = set()  # requests decoded on the decode device
        self.num_moved_there = 0  # loads there of requests the decode device had decoded
        self.num_staging_blocks = num_staging_blocks  # the prefill device's
        self.prefill_delay = prefill_delay  # steps its batch runs beyond the one that sent it
        self.in_flight: list = []  # its queued batches, oldest first: [chunks, steps left]
        self.num_prefilled_elsewhere = 0  # chunks run there
        self.max_queued = 0  # most batches queued there at once
        self.block_tokens = block_tokens
        self.resident: dict[str, list[int]] = {}  # request -> [blocks, kv tokens]
        self.in_pool: dict[str, int] = {}  # request -> KV tokens of it its pool blocks hold
        self.prompt_tokens: dict[str, int] = {}  # set by the driver as requests arrive
        self.last_sampled: dict[str, int] = {}  # this session's, as the worker keeps it
        self.peak = 0

    def lose(self) -> None:
        """The worker dies: a new one starts with an empty device and no prefill batch."""
        self.resident.clear()
        self.there.clear()
        self.last_sampled.clear()
        self.in_flight = []

    def _sample(self, request_id: str, position: int) -> worker_pb2.SampledToken:
        token = token_at(request_id, position, self.prompt_tokens[request_id])
        self.last_sampled[request_id] = token
        return worker_pb2.SampledToken(request_id=request_id, token_id=token)

    def _check_input(self, request_id: str, first: int, token_ids) -> None:
        prompt = self.prompt_tokens[request_id]
        want = [token_at(request_id, p, prompt) for p in range(first, first + len(token_ids))]
        assert list(token_ids) == want, f"{request_id}: input {list(token_ids)} != {want}"

    @property
    def num_used(self) -> int:
        return sum(blocks for blocks, _ in self.resident.values())

    def _device(self, request_id: str) -> dict[str, list[int]]:
        return self.there if request_id in self.there else self.resident

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def _grow(self, request_id: str, num_tokens: int) -> None:  # ensure_room
        device = self._device(request_id)
        entry = device[request_id]
        need = self._blocks_for(num_tokens) - entry[0]
        if need > 0:
            capacity = self.num_there_blocks if device is self.there else self.num_blocks
            free = capacity - sum(blocks for blocks, _ in device.values())
            if need > free:
                raise OutOfBlocksError(f"asked for {need} KV blocks, {free} free")
            entry[0] += need
            self.peak = max(self.peak, self.num_used)

    def _load(self, request_id: str, num_kv_tokens: int, there: bool = False) -> None:
        assert request_id not in self.resident, f"load {request_id}: already resident"
        assert request_id not in self.there, f"load {request_id}: resident on the prefill device"
        assert not there or self.num_there_blocks, f"load {request_id}: no decode blocks there"
        in_pool = self.in_pool.get(request_id, 0)
        assert num_kv_tokens <= in_pool, f"load {request_id}: {num_kv_tokens} > {in_pool} in pool"
        (self.there if there else self.resident)[request_id] = [0, num_kv_tokens]
        self.num_moved_there += there and request_id in self.decoded_here
        self._grow(request_id, num_kv_tokens)

    def step(self, msg: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        self._check_not_in_flight(msg)
        for request_id in msg.release:
            self.resident.pop(request_id, None)
            self.there.pop(request_id, None)
            self.last_sampled.pop(request_id, None)
        for e in msg.load:
            self._load(e.request_id, e.num_kv_tokens, e.on_prefill_device)
        computed, sampled, write_back = [], [], []
        self._prefill_elsewhere([c for c in msg.prefill if c.on_prefill_device])
        for c in msg.prefill:
            if c.on_prefill_device:
                continue
            if c.request_id in self.resident:
                assert self.resident[c.request_id][1] == c.num_cached_tokens, c.request_id
            else:
                self._load(c.request_id, c.num_cached_tokens)
            self._check_input(c.request_id, c.num_cached_tokens, c.token_ids)
            self._grow(c.request_id, c.num_cached_tokens + len(c.token_ids))
            computed.append((c.request_id, len(c.token_ids)))
            if c.sample:
                sampled.append((c.request_id, c.num_cached_tokens + len(c.token_ids)))
            if not c.keep_resident:
                write_back.append(c.request_id)
        for d in msg.decode:
            device = self._device(d.request_id)
            assert (device is self.there) == d.on_prefill_device, d.request_id
            if d.on_prefill_device:  # it decodes only while it prefills nothing
                assert not self.in_flight, f"{d.request_id}: decoded beside a prefill batch"
                self.num_decoded_there += 1
            else:
                self.decoded_here.add(d.request_id)
            assert device[d.request_id][1] == d.num_kv_tokens, d.request_id
            token = self.last_sampled[d.request_id] if d.last_sampled else d.token_id
            self._check_input(d.request_id, d.num_kv_tokens, [token])
            self._grow(d.request_id, d.num_kv_tokens + 1)
            computed.append((d.request_id, 1))
            sampled.append((d.request_id, d.num_kv_tokens + 1))
        for request_id, n in computed:  # the forward pass wrote their KV
            self._device(request_id)[request_id][1] += n
        for e in msg.evict:
            assert (e.request_id in self.there) == e.on_prefill_device, e.request_id
        for request_id in [*write_back, *(e.request_id for e in msg.evict)]:
            self.in_pool[request_id] = self._device(request_id).pop(request_id)[1]
        # the prefill device holds residents only while no prefill batch runs there
        assert not (self.in_flight and self.there), "a prefill batch beside residents there"
        prefilled = self._take_prefilled(msg.wait_prefill)
        sampled += [
            (c.request_id, c.num_cached_tokens + len(c.token_ids)) for c in prefilled if c.sample
        ]
        tokens = [self._sample(request_id, position) for request_id, position in sampled]
        return worker_pb2.StepResponse(
            step=msg.step,
            tokens=tokens,
            prefilled=[c.request_id for c in prefilled],
            # the decode device's time: 1 ms a step and 0.1 ms a token it computed (the
            # batcher bounds its prefill turns' share by these)
            compute_s=0.001 + 0.0001 * sum(n for _, n in computed) if computed else 0.0,
        )

    def _prefill_elsewhere(self, chunks) -> None:
        """Chunks for the prefill device (worker/prefiller.py): from the pool, into the pool,
        within its staging blocks all at once (the scheduler's promise), never resident; one
        batch at a time, done `prefill_delay` steps later (or when a step waits for it)."""
        if not chunks:
            return
        assert len(self.in_flight) < PREFILL_BATCHES_IN_FLIGHT, "more batches than it queues"
        staged = sum(self._blocks_for(c.num_cached_tokens + len(c.token_ids)) for c in chunks)
        assert staged <= self.num_staging_blocks, (staged, self.num_staging_blocks)
        for c in chunks:
            assert c.request_id not in self.resident, f"{c.request_id}: resident"
            assert not c.keep_resident, c.request_id
            self._check_input(c.request_id, c.num_cached_tokens, c.token_ids)
            in_pool = self.in_pool.get(c.request_id, 0)
            assert c.num_cached_tokens <= in_pool, f"{c.request_id}: cached KV not in the pool"
        self.in_flight.append([list(chunks), self.prefill_delay])
        self.max_queued = max(self.max_queued, len(self.in_flight))
        self.num_prefilled_elsewhere += len(chunks)

    def _take_prefilled(self, wait: bool) -> list:
        """The batches done, in order: each runs `prefill_delay` steps beyond the step that
        sent it, and none finishes before the one queued ahead of it."""
        done = []
        for batch in self.in_flight:
            batch[1] -= 1
        while self.in_flight and (wait or self.in_flight[0][1] < 0):
            chunks, _ = self.in_flight.pop(0)
            for c in chunks:  # its KV reached the pool
                self.in_pool[c.request_id] = c.num_cached_tokens + len(c.token_ids)
            done += chunks
        return done

    def _check_not_in_flight(self, msg: worker_pb2.StepRequest) -> None:
        """Nothing in a step touches a request, or a pool block, that the prefill device's
        batch is still writing (an aborted request's blocks must not be handed out again)."""
        queued = [c for chunks, _ in self.in_flight for c in chunks]
        busy_ids = {c.request_id for c in queued}
        busy_blocks = {b for c in queued for b in c.pool_blocks}
        for entry in (*msg.load, *msg.prefill, *msg.evict):
            assert entry.request_id not in busy_ids, f"{entry.request_id}: being prefilled"
            overlap = busy_blocks & set(entry.pool_blocks)
            assert not overlap, f"{entry.request_id}: pool blocks {overlap} being prefilled"
        for d in msg.decode:
            assert d.request_id not in busy_ids, f"{d.request_id}: being prefilled"


def model_info(
    device_blocks: int, block_tokens: int, staging_blocks: int = 0, there_blocks: int = 0
):
    layout = KVLayout(1, 1, 4, block_tokens, "float32")
    return worker_pb2.ModelInfo(
        model_name="device-model",
        max_model_len=MAX_MODEL_LEN,
        vocab_size=320,
        kv_layout=wire.layout_to_proto(layout),
        num_device_blocks=device_blocks,
        prefill_device="cpu" if staging_blocks else "",
        num_prefill_blocks=staging_blocks,
        num_prefill_decode_blocks=there_blocks if staging_blocks else 0,
    )


def states(engine: BatcherEngine) -> dict[str, tuple]:
    return {
        r.request_id: (r.state.value, r.num_tokens, r.num_prefilled, len(r.blocks))
        for r in engine.scheduler.store
    }


def run(
    config: EngineConfig,
    info: worker_pb2.ModelInfo,
    pool_blocks: int,
    arrivals: list[tuple[int, int, int]],  # (step, prompt tokens, max_tokens)
    aborts: dict[int, int],  # step -> index of the request to abort then
    losses: frozenset[int] = frozenset(),  # steps whose worker dies while running them
    prefill_delay: int = 0,  # steps the prefill device's batch runs beyond the one sending it
) -> tuple[dict[str, list], DeviceModel]:
    """Drive the engine's plan -> StepRequest -> answer cycle, as its loop does, against the
    device model, on a simulated clock (10 ms a turn). Returns each request's deltas and
    the device."""
    clock = SimpleNamespace(now=0.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "time", SimpleNamespace(monotonic=lambda: clock.now))
        return _run(clock, config, info, pool_blocks, arrivals, aborts, losses, prefill_delay)


def _run(clock, config, info, pool_blocks, arrivals, aborts, losses, prefill_delay):
    engine = BatcherEngine(config)
    engine.info = info
    scheduler_config = scheduler_config_for(config, info, pool_blocks)
    engine.scheduler = make_scheduler(
        scheduler_config, max_model_len=MAX_MODEL_LEN, eos_token_ids=(EOS,)
    )
    layout = wire.layout_from_proto(info.kv_layout)
    engine.layout = layout  # (for the metrics; no pool is mapped)
    device = DeviceModel(
        info.num_device_blocks,
        layout.block_tokens,
        info.num_prefill_blocks,
        prefill_delay,
        info.num_prefill_decode_blocks,
    )
    queues, deltas = {}, {}
    sent: deque[worker_pb2.StepRequest] = deque()  # what the device has still to run
    limit = 80 * sum(prompt + out + 4 for _, prompt, out in arrivals) + 400
    idle = 0  # turns in a row with nothing sent or answered: only the clock changes
    for turn in range(limit):
        for i, (at, prompt, out) in enumerate(arrivals):
            if at == turn:
                params = SamplingParams(
                    max_tokens=out, temperature=0.0, ignore_eos=not heeds_eos(i)
                )
                device.prompt_tokens[f"r{i}"] = prompt
                queues[f"r{i}"] = engine.submit(f"r{i}", list(range(1, prompt + 1)), params)
        if turn in aborts:
            engine.abort(f"r{aborts[turn] % len(arrivals)}")
        if not engine._has_work() and turn > max(at for at, _, _ in arrivals):
            break
        clock.now += 0.01
        plan = engine._next_plan()  # the loop: send while it may, else answer the oldest
        if plan is not None:
            idle = 0
            sent.append(engine._send(plan))
            continue
        if not engine._in_flight:
            idle += 1
            assert idle < 50, f"stalled: {states(engine)}"
            continue
        idle = 0
        if turn in losses:  # a new worker: an empty device, and the engine recovers
            device.lose()
            sent.clear()
            engine._forget_worker()
            continue
        engine._after_step(engine._in_flight.popleft(), device.step(sent.popleft()))
        engine.scheduler.check_invariants()
    else:
        pytest.fail(f"not done in {limit} turns: {states(engine)}")
    # no pool block leaked: an aborted request's blocks came back once its prefill was done
    assert engine.scheduler.allocator.num_used == 0 and not engine.scheduler.prefilling
    for request_id, queue in queues.items():
        deltas[request_id] = []
        while not queue.empty():
            deltas[request_id].append(queue.get_nowait())
    return deltas, device


def check_tokens(deltas: dict[str, list], arrivals) -> None:
    """Each request got exactly its tokens (token_at), in order: all max_tokens of them, or
    up to and with its first stop token where it heeds them, or a prefix if aborted."""
    for i, (_, prompt, out) in enumerate(arrivals):
        rid = f"r{i}"
        *middle, final = deltas[rid]
        assert isinstance(final, Delta), final
        got = [t for d in middle for t in d.token_ids]
        want = [token_at(rid, prompt + k, prompt) for k in range(out)]
        if heeds_eos(i) and EOS in want:
            want = want[: want.index(EOS) + 1]
        assert final.completion_tokens == len(got), (rid, final, len(got))
        if final.finish_reason == "abort":
            assert got == want[: len(got)], rid
        else:
            assert got == want, (rid, got, want)
            stopped = bool(want) and want[-1] == EOS and heeds_eos(i)
            assert final.finish_reason == ("stop" if stopped else "length"), (rid, final)


def found(policy, block_tokens, arrivals, starvation_s=5.0, **kw):
    """An example an earlier version failed (kept so that it runs every time)."""
    settings = dict(
        device_slack=0,
        pool_factor=1.0,
        aborts={},
        losses=frozenset(),
        growth_tokens=1,
        kv_fraction=1.0,
        prefill_tokens=8,
        assist_tokens=4,
        max_batch=1,
        staging_slack=None,
        prefill_delay=0,
        steps_in_flight=2,
        prefill_share=0.5,
        there_slack=None,
        weight_tokens=None,
    )
    return example(
        policy=policy,
        block_tokens=block_tokens,
        arrivals=arrivals,
        starvation_s=starvation_s,
        **{**settings, **kw},
    )


# Each scheduled about 1 ms of simulated time; ~400 examples take about 3 s.
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# two chunked prefills overcommitted a small pool; nothing was left to preempt
@found("aligned", 1, [(0, 45, 29), (0, 45, 32)], pool_factor=0.5, kv_fraction=0.3, max_batch=4)
# a preempted request waiting for room blocked the chunked prefill that held it
@found("aligned", 1, [(0, 9, 1), (0, 1, 3)], pool_factor=0.5, starvation_s=0.001)
# a landed request sent back to the pool for a starving one in the same step, forever
@found(
    "aligned",
    1,
    [
        *((0, 58, 12), (0, 61, 35), (0, 78, 25), (0, 78, 15), (0, 87, 7), (0, 28, 9)),
        *((20, 59, 31), (0, 58, 12), (5, 83, 25), (13, 75, 5), (5, 40, 23), (12, 90, 36)),
        *((16, 47, 8), (13, 12, 18)),
    ],
    device_slack=12,
    pool_factor=1.0468872235239397,
    growth_tokens=40,
    kv_fraction=0.3,
    prefill_tokens=123,
    assist_tokens=30,
    max_batch=5,
    starvation_s=0.001,
)
# fcfs: a worker lost mid chunked prefill; the next chunk claimed KV the pool never got
@found("fcfs", 1, [(17, 9, 1)], losses=frozenset([18]), starvation_s=0.001)
# a worker lost while evicting: the evicted request's new KV never reached the pool
@found("aligned", 1, [(0, 1, 3), (0, 1, 2)], losses=frozenset([2]), starvation_s=0.001)
@given(
    policy=st.sampled_from(["aligned", "fcfs"]),
    block_tokens=st.sampled_from([1, 4, 16]),
    arrivals=st.lists(
        st.tuples(st.integers(0, 20), st.integers(1, 90), st.integers(1, 40)),
        min_size=1,
        max_size=14,
    ),
    device_slack=st.integers(0, 24),
    pool_factor=st.floats(0.5, 3.0),
    aborts=st.dictionaries(st.integers(0, 60), st.integers(0, 13), max_size=3),
    losses=st.frozensets(st.integers(0, 80), max_size=2),
    growth_tokens=st.integers(1, 64),
    kv_fraction=st.floats(0.3, 1.0),
    prefill_tokens=st.integers(8, 200),
    assist_tokens=st.integers(4, 64),
    max_batch=st.integers(1, 6),
    starvation_s=st.sampled_from([0.001, 5.0]),
    staging_slack=st.one_of(st.none(), st.integers(0, 24)),
    prefill_delay=st.integers(0, 3),
    steps_in_flight=st.sampled_from([1, 2]),
    prefill_share=st.sampled_from([0.0, 0.5, 0.9]),
    there_slack=st.one_of(st.none(), st.integers(-8, 24)),
    weight_tokens=st.sampled_from([None, 8]),
)
def test_no_plan_asks_the_device_for_more_blocks_than_it_has(
    policy,
    block_tokens,
    arrivals,
    device_slack,
    pool_factor,
    aborts,
    growth_tokens,
    kv_fraction,
    prefill_tokens,
    assist_tokens,
    max_batch,
    starvation_s,
    losses,
    staging_slack,
    prefill_delay,
    steps_in_flight,
    prefill_share,
    there_slack,
    weight_tokens,
):
    """staging_slack: None, no prefill device; else it stages that many blocks more than
    the largest request needs (the least it may have, by admission), and each batch of its
    chunks is done prefill_delay steps after the step that sent it. steps_in_flight: the
    engine's max_steps_in_flight. prefill_share: decode_prefill_share, the most share of the
    decode device's time its prefill turns take beside a prefill device. there_slack: None,
    the prefill device only prefills; else it decodes too, in that many blocks more than the
    largest request needs (fewer, when negative: some requests must never go there).
    weight_tokens: the weights' read cost in KV tokens (None: the default, 122k; 8 makes
    the decode device send residents to the prefill device)."""
    needs = [-(-(prompt + out) // block_tokens) for _, prompt, out in arrivals]
    device_blocks = max(needs) + device_slack  # from room for one request alone, upwards
    pool_blocks = max(max(needs), int(sum(needs) * pool_factor))  # small: pool preemption
    scheduler = SchedulerConfig(
        policy=policy,
        growth_tokens=growth_tokens,
        max_resident_kv_fraction=kv_fraction,
        prefill_tokens_per_step=prefill_tokens,
        assist_tokens_per_step=assist_tokens,
        max_batch_size=max_batch,
        starvation_s=starvation_s,
        decode_prefill_share=prefill_share,
        prefill_lane_quiet_s=0.0,  # the lane's mechanics: it opens at every chance
    )
    config = EngineConfig(
        "unused:1",
        pool_bytes=1,
        scheduler=scheduler,
        max_steps_in_flight=steps_in_flight,
        weight_kv_tokens=weight_tokens,
    )
    staging = 0 if staging_slack is None else max(needs) + staging_slack
    there = 0 if there_slack is None else max(1, max(needs) + there_slack)
    info = model_info(device_blocks, block_tokens, staging, there)
    deltas, device = run(config, info, pool_blocks, arrivals, aborts, losses, prefill_delay)

    assert device.peak <= device_blocks
    assert device.resident == {} == device.there  # every request's blocks were freed
    assert not device.in_flight  # the prefill device's last batch was answered
    check_tokens(deltas, arrivals)


@pytest.mark.parametrize("staging", [0, 8])
@pytest.mark.parametrize("policy", ["aligned", "fcfs"])
def test_the_batcher_service_scenario_fits_the_device(policy, staging):
    """test_batcher_service's full-device case (8 prompts of ~40 tokens, 12 blocks of 16,
    40 tokens each), here with the default scheduler settings: the aligned plans used to ask
    for every prompt's prefill blocks at once, beside the resident batch. With a prefill
    device of 8 staging blocks, aligned prefills there (two prompts per step) and fcfs, the
    baseline, never does."""
    arrivals = [(0, p, 40) for p in (40, 35, 50, 45, 38, 42, 47, 33)]
    config = EngineConfig("unused:1", pool_bytes=1, scheduler=SchedulerConfig(policy=policy))
    deltas, device = run(config, model_info(12, 16, staging), 4096, arrivals, {})
    assert device.peak <= 12
    check_tokens(deltas, arrivals)
    offloads = policy == "aligned" and staging > 0
    assert (device.num_prefilled_elsewhere > 0) == offloads, device.num_prefilled_elsewhere


def test_the_prefill_device_queues_the_next_batch_behind_a_slow_one():
    """While a batch runs (three steps here), the next is already planned and queued behind
    it, so the device never waits for the batcher to learn that one is done. (The later
    prompts arrive once a batch decodes: the decode device then leaves prefill to it.)"""
    prompts = (40, 35, 50, 45, 38, 42, 47, 33, 30, 41)
    arrivals = [(0 if i < 3 else 20, p, 30) for i, p in enumerate(prompts)]
    scheduler = SchedulerConfig(prefill_tokens_per_step=64)  # one or two prompts a batch
    config = EngineConfig("unused:1", pool_bytes=1, scheduler=scheduler)
    deltas, device = run(config, model_info(64, 16, 8), 4096, arrivals, {}, prefill_delay=3)
    check_tokens(deltas, arrivals)
    assert device.max_queued == PREFILL_BATCHES_IN_FLIGHT == 2


@pytest.mark.parametrize(("device_blocks", "weight_tokens"), [(24, None), (64, 8)])
def test_the_prefill_device_decodes_once_no_prompt_waits(device_blocks, weight_tokens):
    """Ten prompts at once, then two more mid-run. Once every prompt is prefilled the
    prefill device decodes residents of its own: from the pool, while the decode device is
    full (24 blocks); or, when the decode device holds them all (64 blocks), sent by it,
    when the KV it holds beyond the prefill device's costs more than a read of the weights
    (weight_tokens: 8 KV tokens here, 122k by default). The later prompts
    send them back to the pool before the next batch runs there (the device model fails a
    plan that decodes there beside a batch, or keeps residents there while one runs), and
    every request still gets exactly its tokens."""
    prompts = (40, 35, 50, 45, 38, 42, 47, 33, 30, 41, 36, 44)
    arrivals = [(0 if i < 10 else 40, p, 30) for i, p in enumerate(prompts)]
    scheduler = SchedulerConfig(
        prefill_tokens_per_step=128, growth_tokens=8, prefill_lane_quiet_s=0.0
    )
    config = EngineConfig(
        "unused:1", pool_bytes=1, scheduler=scheduler, weight_kv_tokens=weight_tokens
    )
    info = model_info(device_blocks, 16, staging_blocks=16, there_blocks=24)
    deltas, device = run(config, info, 4096, arrivals, {}, prefill_delay=1)
    check_tokens(deltas, arrivals)
    assert device.num_decoded_there > 30, device.num_decoded_there
    if weight_tokens is not None:  # the decode device had them all: it sent some there
        assert device.num_moved_there > 0
    assert device.num_prefilled_elsewhere >= len(prompts)  # (chunks of them)


def test_a_request_larger_than_the_device_is_refused_at_admission():
    info = model_info(4, 16)  # 64 tokens of device KV
    config = EngineConfig("unused:1", pool_bytes=1, scheduler=SchedulerConfig())
    sched = make_scheduler(scheduler_config_for(config, info, 1000), max_model_len=MAX_MODEL_LEN)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    sched.add_request("fits", range(44), params, now=0.0)  # 64 tokens at most: 4 blocks
    with pytest.raises(InvalidRequestError, match="decode device holds"):
        sched.add_request("too-long", range(45), params, now=0.0)
    # beside a prefill device, a request must fit its staging blocks too (a re-prefill
    # after preemption stages the whole context at once)
    staged = make_scheduler(
        scheduler_config_for(config, model_info(16, 16, staging_blocks=3), 1000),
        max_model_len=MAX_MODEL_LEN,
    )
    staged.add_request("fits", range(28), params, now=0.0)  # 48 tokens: 3 blocks
    with pytest.raises(InvalidRequestError, match="prefill device stages"):
        staged.add_request("too-long", range(29), params, now=0.0)
    # max_tokens beyond max_model_len cannot be reached: only what can is counted
    short = SamplingParams(max_tokens=10_000, ignore_eos=True)
    big = make_scheduler(scheduler_config_for(config, model_info(16, 16), 1000), max_model_len=64)
    big.add_request("capped", range(10), short, now=0.0)


def test_an_evict_only_plan_is_sent():
    """A plan whose only work is to evict (to make room) must reach the worker: the policy
    has already moved those requests to the pool."""
    from alignedserve.batcher.scheduler import BatchPlan

    assert not BatchPlan(evict=("a",)).is_empty
    assert BatchPlan().is_empty
