"""The router's side of the Batcher contract as frozen types; protobuf stops here.

Sampling parameters go through alignedserve.common.wire, shared with the batcher; the load
report through alignedserve.common.load_report, shared with the operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignedserve.common import wire
from alignedserve.common.load_report import LoadReport, load_from_proto
from alignedserve.common.proto import batcher_pb2
from alignedserve.common.sampling_params import SamplingParams

__all__ = [
    "GenerateChunk",
    "LoadReport",
    "Usage",
    "chunk_from_proto",
    "generate_request_to_proto",
    "load_from_proto",
]


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


def merge_chunks(chunks: Sequence[GenerateChunk]) -> GenerateChunk:
    """Consecutive chunks of one request as one: their tokens in order, the last one's end."""
    if len(chunks) == 1:
        return chunks[0]
    return GenerateChunk(
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        finish_reason=chunks[-1].finish_reason,
        usage=chunks[-1].usage,
    )


def generate_request_to_proto(
    request_id: str, prompt_ids: Sequence[int], params: SamplingParams
) -> batcher_pb2.GenerateRequest:
    return batcher_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt_ids),
        params=wire.sampling_to_proto(params),
    )


def chunk_from_proto(msg: batcher_pb2.GenerateResponse | batcher_pb2.RequestDelta) -> GenerateChunk:
    """A Generate message, or one request's delta from a Stream message (not an error delta:
    error_code is 0): the two carry the same fields."""
    usage = None
    if msg.HasField("usage"):
        usage = Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens)
    return GenerateChunk(
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(msg.logprobs),
        finish_reason=msg.finish_reason or None,
        usage=usage,
    )
