"""Serving one worker process: serve the Worker gRPC service (`service.py`) at once, load
the model meanwhile (and, beside a prefetch device, the prefill replica), then run steps
until told to stop. The batcher's pool is attached and page-locked while the model loads.

Like the service, this module imports no torch at import time; `load` does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common.errors import ConfigError
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.model_config import ModelConfig
from alignedserve.common.policy import PREFILL_DEVICE_RESERVE_BYTES
from alignedserve.common.proto import worker_pb2, worker_pb2_grpc
from alignedserve.common.rpc import aio_server, set_serving
from alignedserve.common.tokenizer import TOKENIZER_FILE, Tokenizer
from alignedserve.common.wire import layout_to_proto
from alignedserve.worker.kernel_cache import check_kernel_cache, kernel_cache_dir
from alignedserve.worker.service import (
    AUTO_BLOCKS,
    PREFILL_STAGING_EXTRA_TOKENS,
    SERVICE_NAME,
    STOP_GRACE_S,
    LoadedModel,
    WorkerConfig,
    WorkerServicer,
)

if TYPE_CHECKING:
    from alignedserve.worker.pool_mapping import PoolMapping

logger = logging.getLogger(__name__)


def torch_device_is_cuda(device: str) -> bool:
    return device.split(":")[0] == "cuda"


def decode_kernel_cost(device: str) -> str:
    """How a decode step's attention cost grows with its members' lengths (attention.py's
    attend_cached): on a GPU the Triton paged kernel reads each member's own blocks, so the
    cost is the sum of the lengths ("balanced"); the torch path that runs elsewhere gathers
    every member's blocks into one tensor as wide as the longest member's ("padded")."""
    return "balanced" if torch_device_is_cuda(device) else "padded"


def limit_cpu_threads() -> None:
    """A GPU worker's host work is serial Python that queues device work; torch's CPU thread
    pool only wakes for a large host tensor (a wide block table) and then keeps a thread
    spinning on every core. Two fcfs workers on one node did that every step, and each host
    op of a step then took ~0.4 ms (the profile of ALIGNEDSERVE_WORKER_PROFILE): the steps
    waited for the host. vLLM's workers run with one torch thread for the same reason.
    OMP_NUM_THREADS, if set, is left to decide."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        logger.info(
            "torch CPU threads: %d -> 1 (a GPU worker; OMP_NUM_THREADS sets another number)",
            torch.get_num_threads(),
        )
        torch.set_num_threads(1)


def prefill_decode_blocks(config: WorkerConfig, block_bytes: int) -> int:
    """The prefill device's decode KV blocks: as configured, or (AUTO_BLOCKS) as many as the
    decode device's, fewer where its free memory (its replica and staging cache loaded), less
    a reserve for its passes' activations and decode graphs, holds fewer."""
    if config.prefill_decode_blocks != AUTO_BLOCKS:
        return config.prefill_decode_blocks
    if not torch_device_is_cuda(config.prefetch_device):
        return config.num_device_blocks
    import torch

    free_bytes, _ = torch.cuda.mem_get_info(torch.device(config.prefetch_device))
    fit = (free_bytes - PREFILL_DEVICE_RESERVE_BYTES) // block_bytes
    return int(max(0, min(config.num_device_blocks, fit)))


def kv_layout(config: WorkerConfig, model_config: ModelConfig) -> KVLayout:
    """The block format of the model's KV: the pool's, Describe's from the start."""
    return KVLayout.for_model(model_config, config.block_tokens, config.dtype)


def loading_info(config: WorkerConfig) -> worker_pb2.ModelInfo:
    """What Describe says while the model loads: its name and KV layout (from its config)."""
    model_dir = Path(config.model_dir)
    layout = kv_layout(config, ModelConfig.from_dir(model_dir))
    return worker_pb2.ModelInfo(
        model_name=model_dir.resolve().name, kv_layout=layout_to_proto(layout), loading=True
    )


def map_pool(pool: CpuKVPool, copied: bool, gpu: bool) -> PoolMapping:
    """The pool mapped, and page-locked on a GPU when its blocks are `copied` to and from the
    device (not a mirror-only pool: AttachRequest.mirror_only)."""
    from alignedserve.worker.pool_mapping import PoolMapping

    return PoolMapping(pool, ("pinned" if gpu else "mapped") if copied else "mirror")


def load(config: WorkerConfig) -> LoadedModel:
    """Load the model and its device KV cache, and warm up (blocking: seconds to minutes)."""
    # The torch side, imported here and not at the top: see the module docstring.
    from alignedserve.worker.ceilings import measure as measure_ceilings
    from alignedserve.worker.executor import StepExecutor
    from alignedserve.worker.kv_cache import KVCache
    from alignedserve.worker.loader import load_model
    from alignedserve.worker.residency import DeviceResidency
    from alignedserve.worker.runner import ModelRunner

    begin = time.perf_counter()
    model_dir = Path(config.model_dir)
    model_config = ModelConfig.from_dir(model_dir)
    on_gpu = torch_device_is_cuda(config.device)
    cached_kernels = 0
    if on_gpu:  # before the weights load: a cache it cannot write fails the first launch
        cache = kernel_cache_dir()
        cached_kernels = check_kernel_cache(cache)
        logger.info("Triton kernel cache %s: %d entries", cache, cached_kernels)
    model = load_model(model_dir, device=config.device, dtype=config.dtype)
    ceilings = measure_ceilings(config.device)  # before the KV cache takes the memory
    layout = kv_layout(config, model_config)
    kv_cache = KVCache(layout, config.num_device_blocks, device=config.device, scratch_block=on_gpu)
    eos = set(model_config.eos_token_ids)
    if (model_dir / TOKENIZER_FILE).is_file():  # generation_config's end-of-turn ids
        eos |= set(Tokenizer.from_dir(model_dir).eos_token_ids)
    info = worker_pb2.ModelInfo(
        model_name=model_dir.resolve().name,
        max_model_len=model_config.max_position_embeddings,
        vocab_size=model_config.vocab_size,
        eos_token_ids=sorted(eos),
        kv_layout=layout_to_proto(layout),
        num_device_blocks=config.num_device_blocks,
        device=str(kv_cache.blocks.device),
        # a tied embedding is one parameter: counted once, as a step reads it once
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        decode_kernel_cost=decode_kernel_cost(config.device),
        ridge_flops_per_byte=ceilings.ridge_flops_per_byte if ceilings else 0,
    )
    if ceilings:
        logger.info(
            "%s: bf16 matmul %.0f TFLOP/s, HBM read %.0f GB/s: ridge %d FLOPs per byte",
            config.device,
            ceilings.matmul_flops_per_s / 1e12,
            ceilings.hbm_read_bytes_per_s / 1e9,
            ceilings.ridge_flops_per_byte,
        )
    prefiller = second_runner = second_kv = None
    if config.prefetch_device and config.offload_prefill:
        from alignedserve.worker.prefiller import Prefiller

        staging_tokens = config.prefill_kv_tokens or (
            model_config.max_position_embeddings + PREFILL_STAGING_EXTRA_TOKENS
        )
        staging = KVCache(layout, layout.blocks_for(staging_tokens), device=config.prefetch_device)
        replica = load_model(model_dir, device=config.prefetch_device, dtype=config.dtype)
        prefiller = Prefiller(ModelRunner(replica, staging))
        info.prefill_device = str(staging.blocks.device)
        info.num_prefill_blocks = staging.num_blocks
        num_decode_blocks = prefill_decode_blocks(config, layout.block_bytes)
        if num_decode_blocks:  # it decodes too, on the same replica
            on_gpu1 = torch_device_is_cuda(config.prefetch_device)
            second_kv = KVCache(
                layout, num_decode_blocks, device=config.prefetch_device, scratch_block=on_gpu1
            )
            second_runner = ModelRunner(replica, second_kv)
            info.num_prefill_decode_blocks = num_decode_blocks
        logger.info(
            "prefill device %s: %d staging KV blocks, %d decode KV blocks",
            config.prefetch_device,
            staging.num_blocks,
            num_decode_blocks,
        )
    runner = ModelRunner(model, kv_cache)
    start = time.perf_counter()
    info.load_seconds, info.kernel_cache_entries = start - begin, cached_kernels
    num_graphs = runner.warm_up(config.warm_up_batch, info.max_model_len)
    if prefiller is not None:
        # no decode graphs; its prefill kernels, and the decode kernel's smallest variant,
        # which a chunk of one token there runs
        prefiller.runner.warm_up(0, info.max_model_len)
    if second_runner is not None:
        num_graphs += second_runner.warm_up(config.warm_up_batch, info.max_model_len)
    if on_gpu:  # on the CPU nothing is compiled or captured: warm_up_seconds stays 0
        info.warm_up_seconds = time.perf_counter() - start
        logger.info(
            "warmed up in %.1f s: prefill kernels compiled, %d decode graphs captured",
            info.warm_up_seconds,
            num_graphs,
        )
        limit_cpu_threads()
    return LoadedModel(
        info,
        StepExecutor(info, runner, prefiller, second_runner),
        functools.partial(
            DeviceResidency,
            kv_cache,
            prefetch_device=config.prefetch_device,
            prefill_decode_kv=second_kv,
        ),
    )


async def serve_worker(
    config: WorkerConfig,
    ready: asyncio.Event | None = None,
    on_ready: Callable[[WorkerServicer], None] | None = None,
) -> None:
    """Serve at once and load the model meanwhile; serve until cancelled, then stop
    gracefully. Once the model is loaded, `on_ready` gets the servicer (its `port` is the
    bound port) and `ready` is set."""
    servicer = WorkerServicer(
        await asyncio.to_thread(loading_info, config),
        functools.partial(map_pool, gpu=torch_device_is_cuda(config.device)),
        session_handover_s=config.session_handover_s,
        overlap_steps=config.overlap_steps,
    )
    server, health = aio_server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    host = f"[{config.host}]" if ":" in config.host else config.host  # IPv6 literal
    try:
        servicer.port = server.add_insecure_port(f"{host}:{config.port}")
    except RuntimeError as e:  # grpc reports a port it cannot bind this way
        raise ConfigError(f"WorkerConfig: cannot listen on {host}:{config.port} ({e})") from e
    await set_serving(health, [SERVICE_NAME], serving=False)  # until the model is loaded
    await server.start()
    try:
        logger.info(
            "worker listening on %s:%d, loading %s",
            config.host,
            servicer.port,
            servicer.info.model_name,
        )
        try:
            servicer.loaded(await asyncio.to_thread(load, config))
        except BaseException as e:
            servicer.load_failed(e)
            raise
        await set_serving(health, [SERVICE_NAME], serving=True)
        logger.info(
            "worker serving %s on %s:%d (%s)",
            servicer.info.model_name,
            config.host,
            servicer.port,
            servicer.info.device,
        )
        if on_ready is not None:
            on_ready(servicer)
        if ready is not None:
            ready.set()
        # Shielded: cancelling grpc's own wait also cancels the future that stop() awaits,
        # and stop() would then raise instead of stopping gracefully.
        await asyncio.shield(server.wait_for_termination())
    finally:
        await set_serving(health, [SERVICE_NAME], serving=False)
        await server.stop(STOP_GRACE_S)
        servicer.close()
        logger.info("worker stopped")


def run_worker(config: WorkerConfig) -> int:
    """Blocking entry for `alignedserve serve worker`: serve until SIGTERM or SIGINT."""

    async def main() -> None:
        serving = asyncio.ensure_future(serve_worker(config))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, serving.cancel)
        try:
            await serving
        except asyncio.CancelledError:
            if not serving.cancelled():  # we were cancelled, not the server by a signal
                raise

    asyncio.run(main())
    return 0
