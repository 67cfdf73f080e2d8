"""A batcher's load as a frozen type, and the one GetLoad call that fetches it: the router
routes and answers /ready by it, the operator autoscales by it."""

from __future__ import annotations

from dataclasses import dataclass

from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc


@dataclass(frozen=True)
class LoadReport:
    num_waiting: int
    num_running: int
    num_pooled: int
    kv_pool_usage: float
    worker_ready: bool
    max_model_len: int
    model_name: str
    max_waiting: int
    # prompt + generated tokens of its live requests; None from a batcher older than the field
    num_context_tokens: int | None = None


def load_from_proto(msg: batcher_pb2.LoadReport) -> LoadReport:
    return LoadReport(
        num_waiting=msg.num_waiting,
        num_running=msg.num_running,
        num_pooled=msg.num_pooled,
        kv_pool_usage=msg.kv_pool_usage,
        worker_ready=msg.worker_ready,
        max_model_len=msg.max_model_len,
        model_name=msg.model_name,
        max_waiting=msg.max_waiting,
        num_context_tokens=(msg.num_context_tokens if msg.HasField("num_context_tokens") else None),
    )


async def get_load(stub: batcher_pb2_grpc.BatcherStub, timeout_s: float) -> LoadReport:
    """Raises grpc.aio.AioRpcError when the batcher does not answer within timeout_s."""
    return load_from_proto(await stub.GetLoad(batcher_pb2.GetLoadRequest(), timeout=timeout_s))
