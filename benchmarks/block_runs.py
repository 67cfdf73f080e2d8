"""How scattered are the device blocks a decode step reads, under each policy?

The real batcher and worker on loopback (the tests' `stack`, tiny model, CPU), a
paper-90-like mix scaled down (48 requests, prompts 16-200 tokens, one in ten 200-700,
outputs 16-96, greedy, EOS ignored), first under fcfs, then under aligned with a prefill
replica. Every decode row's block table is recorded as the worker builds it: its blocks, and
its runs of consecutive block ids. Many short runs would mean the kernel reads a request's
KV from scattered places. Every copy of blocks between pool and device (loads, write-backs,
prefill chunks) is recorded too: its blocks, and the transfers `kv_cache.copy_blocks` issues
for them (one per run of consecutive ids on both sides; on a GPU each is a host call).

    .venv/bin/python benchmarks/block_runs.py        # ~10 s on 2 cores
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_batcher_service import generate, greedy, stack

from alignedserve.serve import free_port
from alignedserve.worker import prefiller, residency
from alignedserve.worker.kv_cache import block_runs
from alignedserve.worker.tiny import init_tiny

BLOCK_TOKENS = 16
# (policy, prefill device, decode device blocks): the last holds about a third of the mix's
# KV, so requests move between pool and device (loads and write-backs)
RUNS = (("fcfs", None, 4096), ("aligned", "cpu", 4096), ("aligned", "cpu", 200))
tables: dict[str, list[tuple[int, int]]] = defaultdict(list)  # policy -> (blocks, runs)
copies: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)  # -> (blocks, copies)


def record(policy: list[str]):
    """Wrap DeviceResidency.decode_chunk: note each decode row's blocks and runs."""
    decode_chunk = residency.DeviceResidency.decode_chunk

    def recorded(self, request_id, token_id, num_kv_tokens, sampling):
        chunk = decode_chunk(self, request_id, token_id, num_kv_tokens, sampling)
        used = list(chunk.block_table)[: -(-(num_kv_tokens + 1) // BLOCK_TOKENS)]
        runs = 1 + sum(1 for a, b in itertools.pairwise(used) if abs(b - a) != 1)
        tables[policy[0]].append((len(used), runs))
        return chunk

    residency.DeviceResidency.decode_chunk = recorded

    def counted(module, where):
        copy_blocks = module.copy_blocks

        def copy(dst, src, pairs):
            copies[policy[0], where].append((len(pairs), len(block_runs(pairs))))
            return copy_blocks(dst, src, pairs)

        module.copy_blocks = copy

    counted(residency, "residency (loads, write-backs)")
    counted(prefiller, "prefiller (chunks to the pool)")


async def main() -> None:
    rng = random.Random(0)
    lengths = [
        rng.randint(200, 700) if rng.random() < 0.1 else rng.randint(16, 200) for _ in range(48)
    ]
    prompts = [[rng.randrange(10, 200) for _ in range(n)] for n in lengths]
    outputs = [rng.randint(16, 96) for _ in prompts]
    policy = [""]
    record(policy)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(init_tiny(Path(tmp), arch="llama"))
        for policy_name, prefill_replica, device_blocks in RUNS:
            policy[0] = name = f"{policy_name}, {device_blocks} device blocks"
            async with stack(
                model_dir,
                free_port(),
                "cpu",
                prefill_replica,
                device_blocks=device_blocks,
                policy=policy_name,
            ) as (stub, _):
                await asyncio.gather(
                    *(
                        generate(stub, f"r{i}", prompt, greedy(n))
                        for i, (prompt, n) in enumerate(zip(prompts, outputs, strict=True))
                    )
                )
            rows = tables[name]
            print(
                f"{name}: {len(rows)} decode rows, {statistics.mean(b for b, _ in rows):.1f} "
                f"blocks each in {statistics.mean(r for _, r in rows):.2f} runs of consecutive "
                f"ids: {sum(b for b, _ in rows) / sum(r for _, r in rows):.2f} blocks per run",
                flush=True,
            )
            for (name_, where), rows in sorted(copies.items()):
                if name_ == name:
                    blocks, calls = sum(b for b, _ in rows), sum(c for _, c in rows)
                    print(
                        f"  {where}: {len(rows)} copies of {blocks} blocks in {calls} "
                        f"transfers: {blocks / max(calls, 1):.2f} blocks per transfer",
                        flush=True,
                    )


if __name__ == "__main__":
    asyncio.run(main())
