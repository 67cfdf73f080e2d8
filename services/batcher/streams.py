"""The engine's fan-out: each live request's sink, and the deltas it is given.

A request's answered tokens go to its sink as they are resolved (`emit`), then one last
delta with its finish reason and usage, or the exception that failed it (`close`). The
engine calls both in its loop; a sink must not block (the Batcher service's sinks put into
a queue or a call's outbox).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from alignedserve.batcher.request import Request


@dataclass(frozen=True)
class Delta:
    """What one step produced for one request, as sent to its Generate stream."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    prompt_tokens: int
    completion_tokens: int


# Where a request's deltas go, called in the engine's loop: each Delta, then its last one
# (finish_reason set) or the exception that failed it. Must not block.
Sink = Callable[["Delta | Exception"], None]


class Streams:
    def __init__(self) -> None:
        self._sinks: dict[str, Sink] = {}  # live requests
        self._num_sent: dict[str, int] = {}  # tokens given to each request's sink so far

    def __len__(self) -> int:
        return len(self._sinks)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._sinks

    def __iter__(self) -> Iterator[str]:
        return iter(self._sinks)

    def open(self, request_id: str, sink: Sink) -> None:
        self._sinks[request_id] = sink

    def emit(self, r: Request, logprob: float) -> None:
        """Give the request's sink its tokens answered since the last delta."""
        out, rid, end = r.output_token_ids, r.request_id, r.num_answered
        sent = self._num_sent.get(rid, 0)
        sink = self._sinks.get(rid)
        if end <= sent or sink is None:
            return
        self._num_sent[rid] = end
        sink(
            Delta(
                token_ids=tuple(out[sent:end]),
                logprobs=(logprob,) * (end - sent) if r.params.logprobs else (),
                finish_reason=None,
                prompt_tokens=len(r.prompt_token_ids),
                completion_tokens=end,
            )
        )

    def close(self, r: Request, error: Exception | None = None) -> None:
        """The final delta (usage: the tokens sent, all of them unless it was aborted) or
        the error that ends the stream; the request is forgotten here."""
        sink = self._sinks.pop(r.request_id, None)
        num_sent = self._num_sent.pop(r.request_id, 0)
        if sink is not None:
            sink(error or Delta((), (), r.finish_reason, len(r.prompt_token_ids), num_sent))
