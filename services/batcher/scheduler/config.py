"""Scheduler settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, fields

from alignedserve.common.errors import ConfigError
from alignedserve.common.policy import LOAD_ORDERS, POLICIES


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "aligned"
    block_tokens: int = 16
    num_pool_blocks: int = 65536  # aligned: CPU-pool blocks; fcfs: decode-GPU KV blocks
    gpu_kv_tokens: int = 1 << 20  # decode GPU KV capacity, in tokens
    # members of one decode batch; for fcfs, its running requests (vLLM's max_num_seqs)
    max_batch_size: int = 512
    min_batch_size: int = (
        1  # aligned: fewest members of a length group, when that many are resident
    )
    max_resident_kv_fraction: float = 0.9  # aligned: decode-GPU KV for resident + streaming in
    # widest group, in length buckets (each <= 1/8 of its length); 113 covers 1..65536
    max_band_buckets: int = 113
    regroup_steps: int = 128  # aligned: re-optimise the length groups this often
    kernel_cost: str = "padded"  # decode kernel: padded (longest member sets the cost) | balanced
    # The weights' read cost in KV-token equivalents (weight bytes / KV bytes per token): a
    # padded step over n members of longest length L costs ~ weight_kv_tokens + n * L.
    weight_kv_tokens: int = 122_000  # Llama-3-8B bf16: 16.06 GB / 128 KiB
    # The decode GPU's bf16 matmul FLOP/s over its HBM read bytes/s (the worker measures it;
    # H200: 790 TFLOP/s / 4.23 TB/s ~ 190). A member's share of the projections is ~2 FLOPs
    # per parameter, i.e. 1 FLOP per byte of bf16 weights: worth weight_kv_tokens / ridge KV
    # tokens of reading. Fitted on the H200 grid (docs/benchmarks.md, issue 5): a Llama-3-8B
    # member costs ~19 us beyond its KV, ~600 KV tokens; this gives 640.
    ridge_flops_per_byte: int = 190
    starvation_s: float = 5.0  # no pooled request waits longer than this for a batch (+ one switch)
    growth_tokens: int = 256  # KV budget headroom per member for the tokens it will still decode
    pool_full: str = "wait"  # when the pool lacks room for a new prompt: wait | reject (429)
    admit_watermark: float = 0.05  # a new request starts prefill only if 5% of the pool stays free
    max_waiting: int = 10000  # bounded admission queue (waiting for prefill)
    prefill_tokens_per_step: int = 8192  # prefill chunk budget per step
    assist_tokens_per_step: int = 2048  # aligned alone on one GPU: prefill mixed into its step
    # aligned beside a prefill device: the most share of the decode GPU's time that its
    # prefill turns take while a backlog waits (see scheduler/turns.py); 0: never. Off by
    # default: on 2xH200 (Llama-3-8B, paper-90) 0.5 cut TTFT under overload (p50 1.24 s ->
    # 0.40 s at 30.7 req/s) but raised p99 TPOT (10.9 -> 19.3 ms) for no more tokens/s
    decode_prefill_share: float = 0.0
    # aligned: requests held past prefill (pooled + prefetching + running). Beyond it new
    # requests wait before prefill (visible as TTFT, as in fcfs) instead of in the pool
    # (where waiting would inflate every pooled request's time per output token).
    max_inflight: int = 1024
    # aligned: the prefill device's staging KV blocks (the worker's ModelInfo): the prefill
    # the policy plans (`BatchPlan.prefill`) runs there, across decode steps, and lands in the
    # pool, taking none of the decode device's blocks. 0: no prefill device; it runs on the
    # decode device, in the step.
    num_prefill_device_blocks: int = 0
    # aligned: KV blocks the prefill device decodes in while no prompt waits (the worker's
    # ModelInfo); 0: it only prefills
    num_prefill_decode_blocks: int = 0
    # aligned: ... once no prompt has waited this long (a lane opened between two prompts of a
    # steady trickle would send its residents back through the pool at the next)
    prefill_lane_quiet_s: float = 0.5
    # aligned beside a prefill device: its batches take whole prompts (one alone may pass
    # prefill_tokens_per_step): a prompt cut there copies its KV back in before its next chunk
    prefill_whole_prompts: bool = True
    # aligned: which pooled requests load first after the starving: "fit-groups" (lengths
    # inside a lane's group, then the oldest) or "shortest-first" (that order, stably sorted
    # by the max_tokens clients set, those with none last). shortest-first lowered p99 TPOT
    # served on OPT-13B paper-90 (thirty-second session)
    load_order: str = "shortest-first"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} not one of {POLICIES}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in (
                "num_prefill_device_blocks",
                "num_prefill_decode_blocks",
                "decode_prefill_share",
                "prefill_lane_quiet_s",
            ):
                if value < 0:
                    raise ConfigError(f"{f.name}={value} must be >= 0")
            elif isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                raise ConfigError(f"{f.name}={value} must be > 0")
        if not 0 < self.max_resident_kv_fraction <= 1:
            raise ConfigError(
                f"max_resident_kv_fraction={self.max_resident_kv_fraction} must be in (0, 1]"
            )
        if self.decode_prefill_share >= 1:
            raise ConfigError(
                f"decode_prefill_share={self.decode_prefill_share} must be below 1 (the decode "
                f"GPU must keep some of its time for decoding)"
            )
        if self.min_batch_size > self.max_batch_size:
            raise ConfigError(
                f"min_batch_size={self.min_batch_size} exceeds max_batch_size={self.max_batch_size}"
            )
        if self.load_order not in LOAD_ORDERS:
            raise ConfigError(f"load_order={self.load_order!r} not one of {LOAD_ORDERS}")
        if self.pool_full not in ("wait", "reject"):
            raise ConfigError(f"pool_full={self.pool_full!r} not 'wait' or 'reject'")
        if self.kernel_cost not in ("padded", "balanced"):
            raise ConfigError(f"kernel_cost={self.kernel_cost!r} not 'padded' or 'balanced'")
