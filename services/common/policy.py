"""The batching policies, and what each asks of a worker: one place for the rules that both
`alignedserve serve` (a local worker's command line) and the operator (a worker pod's) apply.
Pure Python: the operator imports it."""

from __future__ import annotations

POLICIES = ("aligned", "fcfs")
# aligned: which pooled requests load first after the starving (scheduler/aligned.py)
LOAD_ORDERS = ("fit-groups", "shortest-first")
# Kept free on the prefill device when its decode KV is sized to fit (worker/server.py,
# AUTO_BLOCKS; the simulator models it): a prefill pass's activations (Llama-3-8B, 8k
# tokens: ~0.5 GiB in the MLP), its decode graphs' pool, and the KV gather's two buffers
# (worker/prefetch.py: GATHER_CHUNK_BYTES each)
PREFILL_DEVICE_RESERVE_BYTES = 4 << 30


def worker_prefill_decode_blocks(policy: str, blocks: int) -> int:
    """The worker's `prefill_decode_blocks` (KV blocks on the prefill device for residents it
    decodes) under `policy`: only the aligned batcher sends it residents; under fcfs that
    memory would sit unused, so none is set aside."""
    return blocks if policy == "aligned" else 0


def reserves_pool(policy: str) -> bool:
    """Whether the batcher reserves its CPU KV pool (--pool-gib): aligned keeps its requests'
    KV there between their turns on the device; fcfs keeps every running request's KV on the
    device, and its pool only numbers the device's blocks (a sparse segment that takes no
    memory: batcher/pool_attachment.py)."""
    return policy == "aligned"
