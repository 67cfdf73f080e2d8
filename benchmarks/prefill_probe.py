"""The prefill device's throughput in the real `Prefiller`, one GPU: what its copies cost.

This drives the real `Prefiller` (weights, the server's staging cache, copies to and from a
pinned pool, fragmented pool blocks as the batcher's allocator leaves them) through sets of
prompt batches of the 90 %-short mix (whole prompts, as the batcher plans them), one run per
batch as the executor sends them:

  cold              the first set in the process
  serial copies     each run waits for its copies out before the next starts: the prefill
                    device as it was before session 13 (copies out behind the pass)
  overlapped        each run's copies out run on the copy stream beside the next pass (ours)
  no copies out     set 1 again with the copies left out: what they cost the passes
  DMA results       overlapped, with each pass's sampled tokens copied to the host by a copy
                    engine (as before session 30), behind the batch before's copies out
  gathered keys     overlapped, each layer's attention gathering the prompts' keys back out of
                    the blocks they were just written to (as before session 31), instead of
                    taking the pass's own k, v
  cut prompts       overlapped, each batch filled to the budget and its last prompt cut there,
                    as the batcher planned them before session 30: the rest copies the
                    prompt's KV back in from the pool before its next chunk
  +python           overlapped, beside a thread that runs pure Python a quarter of the time
                    (1 ms in 4, the way the service's event loop holds the GIL), at Python's
                    default GIL switch interval (5 ms) and at 0.5 ms

The same sets run serial and overlapped, in alternating order. Per set: prompt tok/s, the
median run, the host's share (the seconds spent queueing passes), and the caching
allocator's new device allocations, and the device's share (the passes' spans on the device,
CUDA events, over the set's wall time: the rest the device waited between passes). One batch of a
new set runs under torch.profiler; its top operators by host and by device time are printed.

The first call of this probe (docs/results/session6/prefill_probe_call1.txt) found a call
of torch's attention per request slow on the host for every new batch shape, and a thread
running pure Python without pause slowing the prefill 250-fold; prefill attention is now
one varlen call per layer. Its second call (prefill_probe_call2.txt) put the copies out at
11 % of the device's time, in series with the passes.

    python3 benchmarks/prefill_probe.py --out "$OUT"
    python3 benchmarks/prefill_probe.py --model-shape opt-13b --pool-blocks 1024 --out "$OUT"
    .venv/bin/python benchmarks/prefill_probe.py --tiny --device cpu --batches 3 --pool-blocks 1200
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from unittest import mock

from device_env import import_alignedserve

import_alignedserve()
import torch  # noqa: E402
from gpu_bench import random_model  # noqa: E402

from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.common.model_config import ModelConfig  # noqa: E402
from alignedserve.common.sampling_params import SamplingParams  # noqa: E402
from alignedserve.worker import attention, runner, transfer  # noqa: E402
from alignedserve.worker import prefiller as prefiller_module  # noqa: E402
from alignedserve.worker.kv_cache import KVCache  # noqa: E402
from alignedserve.worker.loader import fuse_projections  # noqa: E402
from alignedserve.worker.prefiller import Prefiller, PrefillJob  # noqa: E402
from alignedserve.worker.service import PREFILL_STAGING_EXTRA_TOKENS  # noqa: E402
from alignedserve.worker.tiny import SHAPE_FAMILIES  # noqa: E402

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def build(device: str, tiny: bool, shape: str) -> tuple[Prefiller, ModelConfig]:
    torch.manual_seed(0)
    model, config = random_model(shape, device, tiny)
    if device.startswith("cuda"):
        fuse_projections(model)  # as load_model does on a GPU
    layout = KVLayout.for_model(config, block_tokens=16, dtype="bfloat16")
    # as the worker sizes it (server.py): one whole context and a step's prefill budget
    staging_tokens = config.max_position_embeddings + PREFILL_STAGING_EXTRA_TOKENS
    staging = KVCache(layout, layout.blocks_for(staging_tokens), device=device)
    return Prefiller(runner.ModelRunner(model, staging)), config


def prompt_sets(seed: int, num_sets: int, tokens: int, config: ModelConfig) -> list[list]:
    """Each set: prompts of the 90 %-short mix, `tokens` of them in all at least."""
    rng = random.Random(seed)
    sets = []
    for _ in range(num_sets):
        prompts, used = [], 0
        while used < tokens:
            n = rng.randint(100, 1000) if rng.random() < 0.9 else rng.randint(1000, 8000)
            n = min(n, config.max_position_embeddings - 1)
            prompts.append([rng.randrange(config.vocab_size) for _ in range(n)])
            used += n
        sets.append(prompts)
    return sets


def batched(prompts: list, budget: int, num_batches: int, cut: bool) -> list[list[tuple]]:
    """The prompts in batches of at most `budget` tokens, first come first served, as the
    batcher plans the prefill device's: each chunk (prompt id, prompt, cached tokens, new
    tokens). Whole prompts (the batcher's rule): a prompt that would pass the budget leads
    the next batch, alone past it if it must. `cut` (its rule before session 30): each batch
    is filled to the budget, its last prompt cut there; the rest goes on in the batch after
    next (the batcher plans the next batch while a cut prompt's first chunk still runs) and
    first copies the prompt's KV so far in from the pool."""
    waiting = collections.deque((key, prompt, 0) for key, prompt in enumerate(prompts))
    later: dict[int, tuple] = {}  # batch index -> a cut prompt's rest, which leads it
    out = []
    for b in range(num_batches):
        if b in later:
            waiting.appendleft(later.pop(b))
        batch, used = [], 0
        while waiting and used < budget:
            key, prompt, done = waiting[0]
            n = len(prompt) - done
            if used + n > budget and cut:
                n = budget - used
                later[b + 2] = (key, prompt, done + n)
            elif used + n > budget and batch:
                break
            waiting.popleft()
            batch.append((key, prompt, done, n))
            used += n
        out.append(batch)
    return out


def jobs_for(batch, layout, blocks_of: dict, free_blocks: list[int], rng: random.Random):
    """Each prompt's pool blocks drawn at random from the free list (fragmented, as in
    serving) at its first chunk; every chunk of it uses them."""
    jobs = []
    for key, prompt, done, n in batch:
        if key not in blocks_of:
            blocks_of[key] = tuple(rng.sample(free_blocks, layout.blocks_for(len(prompt) + 1)))
        sampling = GREEDY if done + n == len(prompt) else None
        jobs.append(
            PrefillJob(f"p{key}", tuple(prompt[done : done + n]), done, blocks_of[key], sampling)
        )
    return jobs


HOST_S: list[float] = []


_launch = runner.ModelRunner.launch


def _recording_launch(self, chunks, carry=None):
    launched = _launch(self, chunks, carry)
    HOST_S.append(launched.host_s)
    return launched


runner.ModelRunner.launch = _recording_launch


def run_set(prefiller, pool, batches, layout, seed: int, serial: bool) -> dict:
    rng = random.Random(seed)
    free = list(range(pool.shape[0]))
    HOST_S.clear()
    on_gpu = prefiller.device.type == "cuda"
    stats0 = torch.cuda.memory_stats() if on_gpu else {}
    batch_s, tokens, device_s = [], 0, 0.0
    blocks_of: dict = {}
    start = time.perf_counter()
    for batch in batches:
        run = prefiller.run(jobs_for(batch, layout, blocks_of, free, rng), pool)
        device_s += run.pass_span_s
        if serial:
            run.wait_copied()
        batch_s.append(time.perf_counter() - start - sum(batch_s))
        tokens += sum(n for *_, n in batch)
    run.wait_copied()  # the last KV in the pool: the set is done
    wall = time.perf_counter() - start
    stats1 = torch.cuda.memory_stats() if on_gpu else {}
    return {
        "tokens": tokens,
        "tok_per_s": tokens / wall,
        "median_batch_s": statistics.median(batch_s),
        "first_batch_s": batch_s[0],
        "host_share": sum(HOST_S) / wall,
        "device_share": device_s / wall,
        "device_allocs": stats1.get("num_device_alloc", 0) - stats0.get("num_device_alloc", 0),
        "alloc_retries": stats1.get("num_alloc_retries", 0) - stats0.get("num_alloc_retries", 0),
    }


class PythonLoad:
    """A thread holding the GIL in pure Python for `busy_s` of every `period_s`."""

    def __init__(self, busy_s: float = 1e-3, period_s: float = 4e-3):
        self.busy_s, self.period_s = busy_s, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self):
        while not self.stop.is_set():
            until = time.perf_counter() + self.busy_s
            while time.perf_counter() < until:
                sum(i * i for i in range(50))
            time.sleep(self.period_s - self.busy_s)

    def __enter__(self):
        self.thread.start()

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def profile_batch(prefiller, pool, batch, layout, out: Path | None) -> None:
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(99)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefiller.run(jobs_for(batch, layout, {}, list(range(pool.shape[0])), rng), pool)
    averages = prof.key_averages()
    for key in ("self_cpu_time_total", "self_device_time_total"):
        table = averages.table(sort_by=key, row_limit=14, max_name_column_width=60)
        print(f"\n-- top operators by {key} --\n{table}", flush=True)
        if out:
            (out / f"profile_{key}.txt").write_text(table)


def main(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    prefiller, config = build(args.device, args.tiny, args.model_shape)
    layout = prefiller.layout
    pool = torch.empty((args.pool_blocks, *layout.block_shape), dtype=torch.bfloat16)
    if prefiller.device.type == "cuda":
        pool = pool.pin_memory()
    budget = 8192
    prompts = prompt_sets(0, 6, int(1.5 * budget * args.batches), config)
    sets = [batched(p, budget, args.batches, cut=False) for p in prompts]
    cut_sets = [batched(p, budget, args.batches, cut=True) for p in prompts]
    cells = []

    def cell(name: str, batches, serial: bool = False) -> None:
        row = run_set(prefiller, pool, batches, layout, seed=len(cells), serial=serial)
        row.update(cell=name, switch_interval_s=sys.getswitchinterval())
        cells.append(row)
        print(
            f"{name:<28} {row['tokens']:>7} tokens: {row['tok_per_s']:>7.0f} tok/s, "
            f"median batch {row['median_batch_s']:.3f} s, first {row['first_batch_s']:.3f} s, "
            f"host {100 * row['host_share']:.0f}%, device {100 * row['device_share']:.0f}%, "
            f"{row['device_allocs']} new device "
            f"allocations, {row['alloc_retries']} retries",
            flush=True,
        )

    cell("cold", sets[0])
    cell("serial copies, set 1", sets[1], serial=True)
    cell("overlapped, set 1", sets[1])
    cell("overlapped, set 2", sets[2])
    cell("serial copies, set 2", sets[2], serial=True)
    # the keys as attention took them before session 31: gathered back out of the blocks
    attend_prefill = attention.attend_prefill
    with mock.patch.object(attention, "attend_prefill", lambda *a: attend_prefill(*a[:5])):
        cell("gathered keys, set 1", sets[1])
        cell("gathered keys, set 2", sets[2])
    # the batcher's rule before session 30: a cut prompt copies its KV in before its next chunk
    cell("cut prompts, set 1", cut_sets[1])
    cell("cut prompts, set 2", cut_sets[2])
    # what the copies cost: set 1 again without them (fresh prompts copy nothing in)
    with mock.patch.object(prefiller_module, "copy_blocks", lambda dst, src, pairs: None):
        cell("no copies out, set 1", sets[1])

    # the results as they came back before session 30: a DMA copy behind the copies out
    def dma_to_host(src, host, on_device):
        host.copy_(transfer._bytes(src), non_blocking=True)

    with mock.patch.object(runner, "to_host", dma_to_host):
        cell("DMA results, set 1", sets[1])
        cell("DMA results, set 2", sets[2])
    few = args.batches // 3
    for n, interval in ((3, 5e-3), (4, 5e-4)):
        sys.setswitchinterval(interval)
        with PythonLoad():
            cell(f"overlapped +python, switch {1e3 * interval:g} ms", sets[n][:few])
    sys.setswitchinterval(5e-3)
    profile_batch(prefiller, pool, sets[5][0], layout, out)
    if out:
        (out / "prefill_probe.json").write_text(json.dumps(cells, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CPU dry run)")
    parser.add_argument("--batches", type=int, default=10, help="batches per set")
    parser.add_argument("--pool-blocks", type=int, default=4096)
    parser.add_argument("--model-shape", choices=SHAPE_FAMILIES, default="llama3-8b")
    parser.add_argument("--out", default="")
    main(parser.parse_args())
