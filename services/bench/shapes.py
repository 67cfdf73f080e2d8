"""Load shapes: when each request of a run is sent."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Offline:
    """Every request arrives at t=0. The bound only keeps thousands of requests from opening
    thousands of sockets: set it above what the server can run at once."""

    max_concurrency: int


@dataclass(frozen=True)
class Poisson:
    """Open loop: each request is sent at its arrival time, a Poisson process at this rate
    drawn by the workload, whether or not earlier ones have finished."""

    rate_per_s: float


@dataclass(frozen=True)
class Concurrency:
    """Closed loop: a new request is sent as soon as one of the num_in_flight finishes."""

    num_in_flight: int


LoadShape = Offline | Poisson | Concurrency


def describe(shape: LoadShape) -> str:
    if isinstance(shape, Offline):
        return "offline"
    if isinstance(shape, Poisson):
        return f"{shape.rate_per_s:g} req/s"
    return f"{shape.num_in_flight} in flight"
