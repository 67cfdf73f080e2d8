"""The batch sizes the worker captures its decode CUDA graphs for (torch-free: the
simulator's cost model pads its steps the same way).

A decode step of n requests replays the graph of the smallest size >= n; the extra rows
are padding, and cost the step their share of every GEMM. Powers of two up to 8, then four
sizes per doubling (16 -> 20, 24, 28, 32): a step pads fewer than a quarter of its rows,
where powers of two alone padded up to all but one of them (73 OPT-13B residents ran a
128-row graph, 1.5 ms of a 27 ms step). Up to 512 requests that is 28 graphs.
"""

from __future__ import annotations

SIZES_PER_DOUBLING = 4
SMALLEST_STEPPED = 8  # sizes up to this one are the powers of two


def graph_batch(num_requests: int) -> int:
    """The batch size of the graph a decode step of `num_requests` replays."""
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")
    if num_requests <= SMALLEST_STEPPED:
        return 1 << (num_requests - 1).bit_length()
    step = (1 << (num_requests - 1).bit_length()) // (2 * SIZES_PER_DOUBLING)
    return -(-num_requests // step) * step


def graph_batches(max_requests: int) -> list[int]:
    """Every graph batch size a step of up to `max_requests` requests can use, largest first
    (so a memory pool they share is sized once)."""
    if max_requests < 1:
        return []
    sizes, n = [], 1
    while True:
        size = graph_batch(n)
        sizes.append(size)
        if size >= max_requests:
            return sizes[::-1]
        n = size + 1
