"""What one request's run leaves behind: the contract between a target and the metrics.

Times are `time.perf_counter()` seconds: one monotonic clock for the target and the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from alignedserve.bench.workload import BenchRequest


@dataclass(frozen=True)
class Chunk:
    """One streamed chunk that carried output tokens."""

    time_s: float
    num_tokens: int  # from per-chunk usage when the server streams it, else 1 per chunk


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    send_s: float
    end_s: float  # the stream's end, or when the error or the cancellation came
    chunks: tuple[Chunk, ...]
    prompt_tokens: int  # the server's usage when it sent one, else the prompt's length
    completion_tokens: int  # the server's usage when it sent one, else the chunks' sum
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def first_token_s(self) -> float | None:
        return self.chunks[0].time_s if self.chunks else None


class Target(Protocol):
    """Sends one request, times its stream, returns its record; never raises for a failed
    request (the record says so). Here, not beside the HTTP target, so that the runner and the
    engine target import no HTTP client."""

    async def run(self, request: BenchRequest) -> RequestRecord: ...


@dataclass(frozen=True)
class RunRecords:
    """Every request of one run: those sent (finished, failed or cancelled) and a count of
    those the run's timeout came before."""

    records: tuple[RequestRecord, ...]
    num_not_sent: int = 0
