"""The batcher engine's settings, and the scheduler's settings it derives from its worker."""

from __future__ import annotations

from dataclasses import dataclass, replace

from alignedserve.batcher.scheduler import SchedulerConfig
from alignedserve.common import wire
from alignedserve.common.errors import ConfigError
from alignedserve.common.policy import reserves_pool
from alignedserve.common.proto import worker_pb2


@dataclass(frozen=True)
class EngineConfig:
    worker_address: str
    pool_bytes: int
    # block_tokens, pool and device sizes, and the decode cost model are filled in from the
    # worker (scheduler_config_for); the two cost fields below override the worker's
    scheduler: SchedulerConfig
    worker_recovery_s: float = 60.0
    worker_startup_s: float = 600.0  # the first connection: the worker may still load its model
    idle_probe_s: float = 1.0  # with nothing to do, send the worker an empty step this often
    stall_s: float = 60.0  # a step running longer than this marks the worker not ready (wedged)
    kernel_cost: str | None = None  # padded | balanced; None: what the worker's kernel is
    weight_kv_tokens: int | None = None  # None: the worker's weight bytes / KV bytes per token
    # steps sent before the first is answered: 2 overlaps the batcher's per-step work with the
    # worker's next step; 1 waits for each answer before planning the next step
    max_steps_in_flight: int = 2

    def __post_init__(self) -> None:
        if self.max_steps_in_flight < 1:
            raise ConfigError(f"max_steps_in_flight={self.max_steps_in_flight} must be >= 1")


def scheduler_config_for(
    config: EngineConfig, info: worker_pb2.ModelInfo, num_pool_blocks: int
) -> SchedulerConfig:
    """The scheduler's settings for this worker: `config.scheduler` with the block size, the
    pool and device sizes and the decode cost model (its ridge too) taken from the worker's
    ModelInfo (a cost field the worker does not report keeps the configured value;
    EngineConfig's overrides win over both)."""
    base = config.scheduler
    layout = wire.layout_from_proto(info.kv_layout)
    # fcfs keeps every running request's KV on the device: its budget is the device's (its
    # pool, a mirror of the device's blocks, holds as many: batcher/pool_attachment.py)
    if not reserves_pool(base.policy):
        num_pool_blocks = min(num_pool_blocks, info.num_device_blocks)
    kernel_cost = config.kernel_cost or info.decode_kernel_cost or base.kernel_cost
    if config.weight_kv_tokens is not None:
        weight_kv_tokens = config.weight_kv_tokens
    elif info.weight_bytes:
        weight_kv_tokens = max(1, info.weight_bytes // layout.token_bytes)
    else:
        weight_kv_tokens = base.weight_kv_tokens
    return replace(
        base,
        block_tokens=layout.block_tokens,
        num_pool_blocks=num_pool_blocks,
        gpu_kv_tokens=info.num_device_blocks * layout.block_tokens,
        kernel_cost=kernel_cost,
        weight_kv_tokens=weight_kv_tokens,
        ridge_flops_per_byte=info.ridge_flops_per_byte or base.ridge_flops_per_byte,
        # fcfs is the baseline as vLLM runs it: every chunk in the decode device's step
        num_prefill_device_blocks=info.num_prefill_blocks if base.policy == "aligned" else 0,
        num_prefill_decode_blocks=(
            info.num_prefill_decode_blocks if base.policy == "aligned" else 0
        ),
    )
