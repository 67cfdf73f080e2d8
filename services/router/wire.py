"""The router's side of the Batcher contract as frozen types; protobuf stops here.

Sampling parameters go through alignedserve.common.wire, shared with the batcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignedserve.common import wire
from alignedserve.common.proto import batcher_pb2
from alignedserve.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateChunk:
    """One Generate message: the tokens of one decode step, and on the last, why it ended."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # one per token when requested, else empty
    finish_reason: str | None  # "stop" | "length" | "abort" on the last message
    usage: Usage | None  # on the last message


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


def generate_request_to_proto(
    request_id: str, prompt_ids: Sequence[int], params: SamplingParams
) -> batcher_pb2.GenerateRequest:
    return batcher_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt_ids),
        params=wire.sampling_to_proto(params),
    )


def chunk_from_proto(msg: batcher_pb2.GenerateResponse) -> GenerateChunk:
    usage = None
    if msg.HasField("usage"):
        usage = Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens)
    return GenerateChunk(
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(msg.logprobs),
        finish_reason=msg.finish_reason or None,
        usage=usage,
    )


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
    )
