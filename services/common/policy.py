"""The batching policies, and what each asks of a worker: one place for the rules that both
`alignedserve serve` (a local worker's command line) and the operator (a worker pod's) apply.
Pure Python: the operator imports it."""

from __future__ import annotations

POLICIES = ("aligned", "fcfs")
# aligned: which pooled requests load first after the starving (scheduler/aligned.py)
LOAD_ORDERS = ("fit-groups", "fewest-left")
# The prefill device's free memory kept back from its decode KV blocks (its passes'
# activations, decode graphs): worker/server.py sizes them so, and the simulator models it
PREFILL_DEVICE_RESERVE_BYTES = 4 << 30


def worker_prefill_decode_blocks(policy: str, blocks: int) -> int:
    """The worker's `prefill_decode_blocks` (KV blocks on the prefill device for residents it
    decodes) under `policy`: only the aligned batcher sends it residents; under fcfs that
    memory would sit unused, so none is set aside."""
    return blocks if policy == "aligned" else 0
